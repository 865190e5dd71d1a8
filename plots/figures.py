"""Figures of a sweep folder (plots/sweep.py's run dirs): learning curves, gate use against the budget, gate against
|td|, one evaluation episode's timeline, final returns. Each names the policy it shows (sampled or greedy).

    python plots/figures.py --out plots/ablation [--dest plots] [--timeline-variant start_max]
    python plots/sweep.py figures --out plots/ablation             # the same
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from sweep import (FINAL_K, VARIANTS, collect, default_dest, final_eval, gwt_ib, main as sweep_main, mean_ci,
                   order_envs, order_variants, read_json)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "legend.fontsize": 9, "figure.dpi": 110,
                         "axes.grid": True, "grid.alpha": 0.3})
    return plt


def _colors(variants):
    import matplotlib
    cmap = matplotlib.colormaps["tab10"]
    fixed = {v: cmap(i) for i, v in enumerate(VARIANTS)}
    extra = [v for v in variants if v not in fixed]
    return {**fixed, **{v: cmap((len(VARIANTS) + i) % 10) for i, v in enumerate(extra)}}


def _style(v):
    return dict(lw=2.4, zorder=5) if v == "gwt_ib" else dict(lw=1.4, zorder=3)


def _align(curves):
    """[(x, y)] of several seeds -> (x_grid, Y (n, len(x_grid))): the common x if every seed has the same,
    else interpolation onto the x of the first seed cut to the range that every seed covers."""
    import numpy as np
    xs = [np.asarray(c[0], float) for c in curves]
    ys = [np.asarray(c[1], float) for c in curves]
    if all(len(x) == len(xs[0]) and np.allclose(x, xs[0]) for x in xs):
        return xs[0], np.stack(ys)
    hi = min(x[-1] for x in xs)
    grid = xs[0][xs[0] <= hi]
    return grid, np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])


def _band(ax, x, Y, color, label, style, kind="ci"):
    """Mean over seeds with a band: kind "ci" = 95% t-interval of the mean, "range" = min..max of the seeds."""
    import numpy as np
    m = np.nanmean(Y, 0)
    ax.plot(x, m, color=color, label=f"{label} (n={len(Y)})", **style)
    if len(Y) > 1:
        if kind == "ci":
            h = gwt_ib.t_quantile(0.975, len(Y) - 1) * np.nanstd(Y, 0, ddof=1) / math.sqrt(len(Y))
            lo, hi = m - h, m + h
        else:
            lo, hi = np.nanmin(Y, 0), np.nanmax(Y, 0)
        ax.fill_between(x, lo, hi, color=color, alpha=0.15, lw=0)


def _smooth(y, k):
    import numpy as np
    if k <= 1 or len(y) < k:
        return np.asarray(y, float)
    y = np.asarray(y, float)
    c = np.cumsum(np.insert(y, 0, 0.0))
    out = np.empty_like(y)
    for i in range(len(y)):  # trailing window, shorter at the start
        lo = max(0, i - k + 1)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def _policy(runs) -> str:
    """The evaluation policy of these runs' evaluations (summary.json's eval_mode), for labels."""
    return "/".join(sorted({r["summary"].get("eval_mode", "greedy") for r in runs}))


def _trace_policy(runs) -> str:
    """The policy of their eval_trace.json episodes (older traces were greedy and did not say so)."""
    return "/".join(sorted({(read_json(r["dir"] / "eval_trace.json") or {}).get("policy", "greedy") for r in runs}))


def _metrics(d: Path) -> list[dict]:
    try:
        return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    except OSError:
        return []


def _panels(plt, n, w=6.0, h=4.3, rows=1, sharey=False):
    fig, ax = plt.subplots(rows, n, figsize=(max(7.0, w * n), h * rows), squeeze=False, sharey=sharey)
    return fig, ax


def _legend_below(fig, ax_list, ncol=None):
    handles, labels = {}, {}
    for ax in ax_list:
        for hd, lb in zip(*ax.get_legend_handles_labels()):
            key = lb.split(" (")[0]
            if key not in handles:
                handles[key], labels[key] = hd, lb
    if handles:
        fig.legend(list(handles.values()), list(labels.values()), loc="lower center",
                   ncol=ncol or min(len(handles), 7), frameon=False, bbox_to_anchor=(0.5, 0.0))


def fig_learning_curves(plt, runs, envs, variants, colors, path):
    fig, ax = _panels(plt, len(envs))
    for i, env in enumerate(envs):
        a = ax[0, i]
        for v in variants:
            rs = [r for r in runs if r["env"] == env and r["variant"] == v]
            curves = []
            for r in rs:
                batch = r["cfg"]["num_envs"] * r["cfg"]["rollout_steps"]
                ev = [(u * batch, e) for u, e in r["summary"].get("evals", []) if e is not None]
                if ev:
                    curves.append(tuple(zip(*ev)))
            if curves:
                x, Y = _align(curves)
                _band(a, x, Y, colors[v], f"{v}", _style(v))
        a.set_title(env)
        a.set_xlabel("env steps")
        a.set_ylabel(f"{_policy(runs)} eval return")
        a.ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    _legend_below(fig, ax[0], ncol=4)
    fig.suptitle(f"Learning curves: {_policy(runs)} eval return, mean over seeds, band = 95% t-CI of the mean",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(variants) > 4 else 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def fig_gate_budget(plt, runs, envs, variants, colors, path, smooth):
    fig, ax = plt.subplots(2, len(envs), figsize=(max(7.0, 6.0 * len(envs)), 7.2), squeeze=False, sharex="col",
                           gridspec_kw=dict(height_ratios=[2.2, 1]))
    for i, env in enumerate(envs):
        targets = set()
        for v in variants:
            rs = [r for r in runs if r["env"] == env and r["variant"] == v]
            if not rs:
                continue
            learned = rs[0]["cfg"].get("force_c") is None
            cur_c, cur_l = [], []
            for r in rs:
                m = _metrics(r["dir"])
                if not m:
                    continue
                x = [row["env_steps"] for row in m]
                cur_c.append((x, _smooth([row["mean_c"] for row in m], smooth)))
                cur_l.append((x, [row.get("lambda_c", float("nan")) for row in m]))
                targets.add(r["cfg"].get("target_c"))
            if not cur_c:
                continue
            st = _style(v) if learned else dict(lw=1.0, ls="--", zorder=2)
            x, Y = _align(cur_c)
            _band(ax[0, i], x, Y, colors[v], v + ("" if learned else " (fixed)"), st, kind="range")
            if learned:
                x, Y = _align(cur_l)
                ax[1, i].plot(x, Y.mean(0), color=colors[v], label=v, **st)
        for t in sorted(t for t in targets if t is not None):
            ax[0, i].axhline(t, color="k", ls=":", lw=1.5, label=f"target_c = {t:g}", zorder=6)
        ax[0, i].set_title(env)
        ax[0, i].set_ylabel("mean gate c (per rollout)" + (f", {smooth}-update mean" if smooth > 1 else ""))
        ax[0, i].set_ylim(-0.02, 1.02)
        ax[1, i].set_ylabel("IB weight in force")
        ax[1, i].set_xlabel("env steps")
        ax[1, i].ticklabel_format(axis="x", style="sci", scilimits=(0, 3))
    _legend_below(fig, list(ax[0]) + list(ax[1]), ncol=4)
    fig.suptitle("Top: mean gate c per rollout (mean over seeds, band = seed min..max; dashed = fixed gate)\n"
                 "Bottom: IB weight in force (lambda_c with warm-up and schedule, or the constraint's multiplier)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1 if len(variants) > 4 else 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _binned(td, c, nbins, min_count=5):
    """Equal-count bins of |td| (it piles up near 0) with finer bins in the upper tail:
    -> (bin mean |td|, mean c, 10% c, 90% c) per bin, at least min_count steps per bin."""
    import numpy as np
    k = max(1, min(nbins, len(td) // min_count))
    q = list(np.linspace(0, 0.9, k)) + [0.95, 1.0] if k >= 4 and len(td) >= 20 * min_count else list(np.linspace(0, 1, k + 1))
    edges = np.unique(np.quantile(td, q))
    if len(edges) < 2:
        return [td.mean()], [c.mean()], [np.quantile(c, 0.1)], [np.quantile(c, 0.9)]
    idx = np.clip(np.searchsorted(edges, td, side="right") - 1, 0, len(edges) - 2)
    out = ([], [], [], [])
    for b in range(len(edges) - 1):
        sel = idx == b
        if sel.sum() == 0:
            continue
        for lst, val in zip(out, (td[sel].mean(), c[sel].mean(), np.quantile(c[sel], 0.1), np.quantile(c[sel], 0.9))):
            lst.append(val)
    return out


def fig_gate_vs_td(plt, runs, envs, variants, colors, path, nbins):
    """Small multiples: one row per env, one column per variant with a learned gate."""
    import numpy as np
    learned = [v for v in variants if any(r["variant"] == v and r["cfg"].get("force_c") is None for r in runs)]
    cols = max(1, len(learned))
    fig, ax = plt.subplots(len(envs), cols, figsize=(max(7.0, 3.4 * cols), 3.3 * len(envs) + 0.8), squeeze=False,
                           sharey=True, sharex="row")
    for i, env in enumerate(envs):
        for j, v in enumerate(learned):
            a = ax[i, j]
            rs = [r for r in runs if r["env"] == env and r["variant"] == v and r["cfg"].get("force_c") is None]
            td, c = [], []
            for r in rs:
                tr = read_json(r["dir"] / "eval_trace.json")
                if tr and tr.get("c"):
                    td += tr["td_abs"]
                    c += tr["c"]
            a.set_title(f"{v}" if i == 0 else "", fontsize=10, color=colors[v])
            if j == 0:
                a.set_ylabel(f"{env}\ngate c", fontsize=9)
            if i == len(envs) - 1:
                a.set_xlabel("|td_norm| (previous step)", fontsize=9)
            a.set_ylim(-0.03, 1.03)
            if len(td) < 2:
                a.text(0.5, 0.5, "no trace", ha="center", va="center", transform=a.transAxes, color="0.5")
                continue
            td, c = np.asarray(td, float), np.asarray(c, float)
            xs, mu, lo, hi = _binned(td, c, nbins)
            rho = float(np.corrcoef(td, c)[0, 1]) if td.std() > 0 and c.std() > 0 else float("nan")
            a.scatter(td, c, s=9, color="0.35", alpha=0.35, lw=0, zorder=2)
            a.fill_between(xs, lo, hi, color=colors[v], alpha=0.25, lw=0, zorder=3)
            a.plot(xs, mu, "o-", color=colors[v], ms=3.5, lw=2, zorder=4)
            a.text(0.97, 0.04, f"{len(rs)} runs, {len(td)} steps\nrho = {rho:.2f}", ha="right", va="bottom",
                   transform=a.transAxes, fontsize=8, bbox=dict(fc="white", ec="none", alpha=0.8))
    fig.suptitle(f"Gate vs surprise: one {_trace_policy(runs)} eval episode per run (eval_trace.json), seeds pooled\n"
                 "line = mean c per |td| bin (equal counts), band = 10-90% of c in the bin\n"
                 "dots = steps; sec: c = mean over memory units", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_timeline(plt, runs, envs, variant, path, seed):
    import numpy as np
    fig, ax = plt.subplots(3, len(envs), figsize=(max(7.0, 6.5 * len(envs)), 6.4), squeeze=False, sharex="col")
    for i, env in enumerate(envs):
        rs = sorted([r for r in runs if r["env"] == env and r["variant"] == variant], key=lambda r: r["seed"])
        if seed is not None:
            rs = [r for r in rs if r["seed"] == seed]
        tr, r = None, None
        for r in rs:
            tr = read_json(r["dir"] / "eval_trace.json")
            if tr and tr.get("c"):
                break
            tr = None
        ax[0, i].set_title(f"{env}\n{variant}, seed {r['seed']}" if tr else f"{env}\n(no {variant} trace)")
        if not tr:
            continue
        t = np.arange(len(tr["c"]))
        ax[0, i].step(t, tr["c"], where="mid", color="C0")
        ax[0, i].axhline(r["cfg"].get("target_c", float("nan")), color="k", ls=":", lw=1)
        ax[0, i].set_ylim(-0.03, 1.03)
        ax[0, i].set_ylabel("gate c_t\n(dotted: target_c)")
        ax[1, i].bar(t, tr["td_abs"], width=0.9, color="C1")
        ax[1, i].set_ylabel("|td_norm| (t-1)")
        ax[2, i].bar(t, tr["reward"], width=0.9, color=["C2" if x >= 0 else "C3" for x in tr["reward"]])
        ax[2, i].axhline(0, color="k", lw=0.6)
        ax[2, i].set_ylabel("reward r_t")
        ax[2, i].set_xlabel(f"step of the episode (return {sum(tr['reward']):.2f}, {len(t)} steps)")
    fig.suptitle(f"One {tr.get('policy', 'greedy') if tr else ''} evaluation episode at the end of training "
                 "(eval_trace.json)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def fig_final_eval(plt, runs, envs, variants, colors, path):
    import numpy as np
    fig, ax = _panels(plt, len(envs), w=5.0, h=4.2)
    for i, env in enumerate(envs):
        a = ax[0, i]
        for j, v in enumerate(variants):
            vals = [x for x in (final_eval(r["summary"]) for r in runs if r["env"] == env and r["variant"] == v)
                    if math.isfinite(x)]
            m, h, n = mean_ci(vals)
            if n == 0:
                continue
            a.errorbar(j, m, yerr=h if math.isfinite(h) else None, fmt="D", ms=7, color=colors[v], capsize=5,
                       elinewidth=2, zorder=4)
            a.scatter(j + np.linspace(-0.18, 0.18, n) if n > 1 else [j + 0.18], vals, color="k", s=12, zorder=5,
                      alpha=0.7)
        a.set_xticks(range(len(variants)))
        a.set_xticklabels(variants, rotation=30, ha="right")
        a.set_xlim(-0.6, len(variants) - 0.4)
        a.set_title(env)
        a.set_ylabel(f"final {_policy(runs)} eval (mean of last {FINAL_K} evals)")
    fig.suptitle(f"Final {_policy(runs)} eval return per variant: diamond = mean over seeds, bar = 95% t-CI, "
                 "dots = seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def cmd_figures(a) -> int:
    out, dest = Path(a.out), default_dest(a)
    runs = collect(out)
    if not runs:
        print(f"figures: no completed runs under {out}", file=sys.stderr)
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    plt = _plt()
    envs = order_envs(out, {r["env"] for r in runs})
    variants = order_variants({r["variant"] for r in runs})
    colors = _colors(variants)
    written = []
    for name, fn in [
        ("learning_curves.png", lambda p: fig_learning_curves(plt, runs, envs, variants, colors, p)),
        ("gate_budget.png", lambda p: fig_gate_budget(plt, runs, envs, variants, colors, p, a.smooth)),
        ("gate_vs_td.png", lambda p: fig_gate_vs_td(plt, runs, envs, variants, colors, p, a.bins)),
        ("eval_timeline.png", lambda p: fig_timeline(plt, runs, envs, a.timeline_variant, p, a.timeline_seed)),
        ("final_eval.png", lambda p: fig_final_eval(plt, runs, envs, variants, colors, p)),
    ]:
        fn(dest / name)
        written.append(dest / name)
    print(f"figures: {len(runs)} completed runs -> " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(sweep_main(["figures", *sys.argv[1:]]))

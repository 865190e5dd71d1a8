"""Throughput benchmark: GWT-IB (gwt_ib.py, default Cfg) against its own older code and an sb3-contrib peer.

In one invocation, every run a fresh subprocess, each repetition runs in turn:
  new   gwt_ib.py of this checkout (working tree, uncommitted edits included), default Cfg
  old   gwt_ib.py as it was at --ref GITREF (extracted with `git show GITREF:gwt_ib.py` into a temp dir
        and run with the same interpreter, flags and default Cfg); only with --ref
  peer  tests/peer_recurrent_ppo.py: sb3-contrib RecurrentPPO (MlpLstmPolicy) sized like the default Cfg;
        skipped with --skip-peer
and the final table gives medians over the repetitions, the ratios new/peer and new/old (as the ratio
of the medians and as the median of the per-repetition ratios) and PASS/FAIL against the target
new/old >= 0.95 (new/peer is reported beside it), judged on the median of the per-repetition ratios, which pairs
runs made minutes apart (throughput here drifts 30-50% within minutes; alternating is what makes
the comparison fair). The targets ask for at least 3 pairs; fewer are reported but flagged.

Optional extra (once, from the repo root; pinning torch on the same line keeps pip on the local CPU
build instead of pulling a multi-GB CUDA one, and sb3-contrib is the version this was verified with):
    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 -r requirements.txt sb3-contrib==2.9.2
All sides run under .venv-bench/bin/python when it exists, else under the interpreter running this file.
Run (from anywhere; every path is taken relative to this file's repository):
    python tests/bench.py --ref main                # 65536 env steps (16 updates) x 3 reps: new, old, peer
    python tests/bench.py --steps 16384 --reps 1 --ref HEAD   # smoke test
    python tests/bench.py --skip-peer --ref HEAD~3 --out bench.json
    python tests/bench.py --device cuda --threads 1 --extra "--num-envs 64" --skip-peer
    python tests/bench.py --device cuda --num-envs 16,64,256   # scaling sweep, new code only

GWT-IB figures: "e2e" is summary.json's steps_per_s (the training loop, including its periodic greedy
evaluations and checkpoints): the figure compared with the peer and with the old code. "rollout" and
"update" are env steps per second of the summed rollout_s and update_s in metrics.jsonl; "proc" is the
whole process (imports, setup, final eval trace). The peer's figure is its steps_per_s (model.learn
only: no evaluation inside). --threads sets gwt_ib's --torch-threads (both new and old); the peer uses
--peer-threads (default 2). Before the timed repetitions each side makes one short untimed run
(--warmup 0 to skip): it takes whatever a gwt_ib.py does once per machine (today's code builds and
calibrates its C kernel, cached in ~/.cache/gwt_ib) and warms the file cache.
Other CPU work wrecks these figures (2 torch threads on 2 cores slow down 5-15x when oversubscribed):
each run records "other load" (cores busy with anything but it, from /proc/stat) and the bench warns
when that exceeds 0.1 core. On a shared machine, --quiet-wait S makes each run first wait (up to S
seconds) until a 2-second sample shows the machine idle, and a repetition with a loaded run is
discarded and run again (at most --retry-loaded times, default 2).
"""
import argparse, json, os, platform, resource, shlex, statistics as st, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NEW = ROOT / "gwt_ib.py"
PEER = ROOT / "tests" / "peer_recurrent_ppo.py"
VENV_PY = ROOT / ".venv-bench" / "bin" / "python"
ENV_ID, NUM_ENVS, ROLLOUT = "popgym-CountRecallEasy-v0", 16, 256  # gwt_ib.py's defaults, which the peer copies
TARGET_PEER, TARGET_OLD, MIN_PAIRS = None, 0.95, 3  # no target against the peer: reported


def cpu_clock():  # (CPU s used by the whole machine incl. steal, CPU s of our finished children, wall s)
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), r.ru_utime + r.ru_stime, time.perf_counter()


def other_cores(c0):  # mean cores busy with work other than our subprocess since cpu_clock() gave c0
    c1 = cpu_clock()
    return max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / (c1[2] - c0[2])


def wait_quiet(a):
    """With --quiet-wait S: before a timed run, wait up to S seconds for a 2-second sample with < 0.1 core busy."""
    t_end = time.perf_counter() + a.quiet_wait
    while a.quiet_wait > 0:
        c0 = cpu_clock()
        time.sleep(2)
        busy = other_cores(c0)
        if busy < 0.1:
            return
        if time.perf_counter() >= t_end:
            print(f"  (machine still busy, {busy:.2f} cores, after {a.quiet_wait:.0f} s: running anyway)", flush=True)
            return


def git(*args):
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout


def extract_ref(ref, tmp):
    """gwt_ib.py as of git ref `ref`, written to tmp/ref/gwt_ib.py; returns (path, full commit hash).
    A path to a file is used as it is (a checkout without git history, e.g. a copy on another machine)."""
    if Path(ref).is_file():
        return Path(ref).resolve(), "file " + ref
    try:
        sha = git("rev-parse", "--verify", f"{ref}^{{commit}}").strip()
        src = git("show", f"{sha}:gwt_ib.py")
    except subprocess.CalledProcessError as e:
        sys.exit(f"--ref {ref}: {e.stderr.strip()}")
    d = Path(tmp) / "ref"
    d.mkdir()
    (d / "gwt_ib.py").write_text(src)
    return d / "gwt_ib.py", sha


def run_gwt(a, script, steps, tmp, name, num_envs=None):
    cmd = [a.python, str(script), "--total-timesteps", str(steps), "--progress", "false",
           "--save-plot", "false", "--out-dir", str(tmp), "--run-name", name, "--seed", str(a.seed)]
    cmd += ["--device", a.device] if a.device else []
    cmd += ["--torch-threads", str(a.threads)] if a.threads else []
    cmd += ["--num-envs", str(num_envs)] if num_envs else []
    cmd += shlex.split(a.extra)
    wait_quiet(a)
    c0, t = cpu_clock(), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    proc_s, busy = time.perf_counter() - t, other_cores(c0)
    if p.returncode != 0:
        sys.exit(f"{script} failed ({p.returncode}): {shlex.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    d = Path(tmp) / name
    s = json.loads((d / "summary.json").read_text())
    if s["status"] != "completed":
        sys.exit(f"{script} ended with status {s['status']!r}: {shlex.join(cmd)}\n{p.stdout[-2000:]}")
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    n, roll, upd = len(rows), sum(r["rollout_s"] for r in rows), sum(r["update_s"] for r in rows)
    steps_done = s["env_steps"]
    return dict(e2e=s["steps_per_s"], rollout=steps_done / roll, update=steps_done / upd,
                proc=steps_done / proc_s, rollout_s_per_upd=roll / n, update_s_per_upd=upd / n,
                other_s=s.get("wall_s", float("nan")) - roll - upd, proc_s=proc_s, updates=n,
                env_steps=steps_done, status=s["status"], final_eval=s.get("final_eval"), other_cores=busy)


def run_peer(a, steps):
    cmd = [a.python, "-u", str(PEER), "--env", ENV_ID, "--steps", str(steps), "--seed", str(a.seed),
           "--threads", str(a.peer_threads)]
    wait_quiet(a)
    c0, t = cpu_clock(), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    proc_s, busy = time.perf_counter() - t, other_cores(c0)
    res = [json.loads(l.split(" ", 1)[1]) for l in p.stdout.splitlines() if l.startswith("peer_result ")]
    if p.returncode != 0 or not res:
        hint = ("\n(the peer needs the optional extra: see the install command in tests/bench.py's docstring)"
                if "ModuleNotFoundError" in p.stderr else "")
        sys.exit(f"peer failed ({p.returncode}): {shlex.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}{hint}")
    return res[-1] | dict(proc_s=proc_s, other_cores=busy)


def machine(a, load1):
    code = ("import torch, platform, json; print(json.dumps(dict(torch=torch.__version__, "
            "threads=torch.get_num_threads(), cuda=torch.cuda.is_available() and torch.cuda.get_device_name(0) "
            "or None, python=platform.python_version())))")
    info = json.loads(subprocess.run([a.python, "-c", code], capture_output=True, text=True, check=True).stdout)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return dict(cpu=cpu, cores=len(os.sched_getaffinity(0)), python_exe=a.python, **info,
                gwt_threads=a.threads or info["threads"], peer_threads=a.peer_threads, load1_start=load1)


def med(runs, k):
    return st.median(r[k] for r in runs)


def gwt_line(rep, side, r):
    return (f"rep {rep} {side:4}: e2e {r['e2e']:7.0f} steps/s  rollout {r['rollout']:7.0f}  update "
            f"{r['update']:7.0f}  ({r['updates']} upd, {r['proc_s']:.1f} s process, "
            f"other load {r['other_cores']:.2f} cores)")


def ratio(res, num, den, target):
    """Ratio num/den of e2e figures: of the medians and the median of the per-rep ratios (the verdict's)."""
    fig = lambda r: r["steps_per_s"] if "steps_per_s" in r else r["e2e"]
    a, b = [fig(r) for r in res[num]], [fig(r) for r in res[den]]
    per_rep = [x / y for x, y in zip(a, b)]
    return dict(of_medians=st.median(a) / st.median(b), median_per_rep=st.median(per_rep), per_rep=per_rep,
                target=target, pairs=len(per_rep), passed=None if target is None else st.median(per_rep) >= target)


def sweep(a, tmp, res):  # scaling sweep: new code only, same rollout_steps, at least 4 updates per size
    sizes = [int(x) for x in a.num_envs.split(",")]
    for rep in range(a.reps):
        for n in sizes:
            r = run_gwt(a, NEW, max(a.steps, 4 * n * ROLLOUT), tmp, f"n{n}_r{rep}", n)
            res["sweep"].setdefault(str(n), []).append(r)
            print(f"rep {rep} num_envs {n:5d}: e2e {r['e2e']:8.0f} steps/s  rollout {r['rollout']:8.0f}"
                  f"  update {r['update']:8.0f}  ({r['updates']} upd, other load {r['other_cores']:.2f})",
                  flush=True)
    print(f"\n{'num_envs':>8} {'e2e/s':>9} {'rollout/s':>10} {'update/s':>9} {'roll s/upd':>10} {'upd s/upd':>9}")
    for n, runs in res["sweep"].items():
        print(f"{n:>8} {med(runs, 'e2e'):9.0f} {med(runs, 'rollout'):10.0f} {med(runs, 'update'):9.0f} "
              f"{med(runs, 'rollout_s_per_upd'):10.3f} {med(runs, 'update_s_per_upd'):9.3f}")


def compare(a, tmp, res, old):
    if a.warmup:  # untimed: one-off work of each gwt_ib.py (today: its C kernel), warms the file cache
        print("warm-up (untimed): " + ", ".join(["new"] + ["old"] * bool(old) + ["peer"] * (not a.skip_peer)),
              flush=True)
        run_gwt(a, NEW, NUM_ENVS * ROLLOUT, tmp, "warm_new")
        if old:
            run_gwt(a, old, NUM_ENVS * ROLLOUT, tmp, "warm_old")
        if not a.skip_peer:
            run_peer(a, NUM_ENVS * ROLLOUT)
    rep, tries, retries = 0, 0, a.retry_loaded
    while rep < a.reps:
        trio = {}
        r = trio["new"] = run_gwt(a, NEW, a.steps, tmp, f"new_r{rep}_{tries}")
        print(gwt_line(rep, "new", r), flush=True)
        if old:
            r = trio["old"] = run_gwt(a, old, a.steps, tmp, f"old_r{rep}_{tries}")
            print(gwt_line(rep, "old", r), flush=True)
        if not a.skip_peer:
            p = trio["peer"] = run_peer(a, a.steps)
            print(f"rep {rep} peer: e2e {p['steps_per_s']:7.0f} steps/s  ({p['wall_s']:.1f} s learn, "
                  f"{p['proc_s']:.1f} s process, other load {p['other_cores']:.2f} cores)", flush=True)
        tries += 1
        if retries > 0 and any(r["other_cores"] > 0.1 for r in trio.values()):
            retries -= 1
            res["discarded"].append(trio)
            print(f"rep {rep} discarded: other load > 0.1 core during it; running it again "
                  f"({retries} retr{'y' if retries == 1 else 'ies'} left)", flush=True)
            continue
        for side, r in trio.items():
            res[side].append(r)
        rep += 1

    sides = [s for s in ("new", "old") if res[s]]
    rows = [("e2e (steps/s)", "e2e", "%.0f"), ("process (steps/s)", "proc", "%.0f"),
            ("rollout (steps/s)", "rollout", "%.0f"), ("update (steps/s)", "update", "%.0f"),
            ("rollout (s/update)", "rollout_s_per_upd", "%.3f"), ("update (s/update)", "update_s_per_upd", "%.3f"),
            ("eval+ckpt+other (s)", "other_s", "%.1f")]
    order = ", ".join(sides + ["peer"] * bool(res["peer"]))
    print(f"\n{a.steps} env steps per run, {a.reps} reps, each rep in turn: {order}")
    print(f"{'':28}{'median':>9}   runs")
    res["median"] = {}
    for s in sides:
        for label, k, fmt in rows:
            print(f"{s + ' ' + label:28}{fmt % med(res[s], k):>9}   " + " ".join(fmt % r[k] for r in res[s]))
        res["median"][s] = {k: med(res[s], k) for _, k, _ in rows}
    if res["peer"]:
        res["median"]["peer"] = {"steps_per_s": med(res["peer"], "steps_per_s")}
        print(f"{'peer e2e (steps/s)':28}{res['median']['peer']['steps_per_s']:>9.0f}   "
              + " ".join(f"{p['steps_per_s']:.0f}" for p in res["peer"]))
    checks = [(k, n, d, t) for k, n, d, t in (("new/peer", "new", "peer", TARGET_PEER),
                                              ("new/old", "new", "old", TARGET_OLD)) if res[d]]
    if checks:
        print(f"\n{'e2e ratio':12}{'of medians':>11}{'median/rep':>11}{'target':>8}  verdict    per rep")
    for k, n, d, t in checks:
        q = res["ratios"][k] = ratio(res, n, d, t)
        few = f" (only {q['pairs']} pair{'s' * (q['pairs'] != 1)}; the target needs >= {MIN_PAIRS})" \
            if q["pairs"] < MIN_PAIRS else ""
        verdict = "-" if t is None else "PASS" if q["passed"] else "FAIL"
        print(f"{k:12}{q['of_medians']:>11.2f}{q['median_per_rep']:>11.2f}{'-' if t is None else '>= %.2f' % t:>8}  "
              f"{verdict:8}   " + " ".join(f"{x:.2f}" for x in q["per_rep"]) + few)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=65536, help="env steps per run (default 16 updates)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions, each running new, old, peer in turn")
    ap.add_argument("--ref", metavar="GITREF", help="also time gwt_ib.py as of this git ref or this file "
                    "(the 'old' side)")
    ap.add_argument("--skip-peer", action="store_true", help="time GWT-IB only")
    ap.add_argument("--warmup", type=int, default=1, choices=(0, 1), help="one short untimed run per side first")
    ap.add_argument("--threads", type=int, default=0, help="gwt_ib --torch-threads (0 = torch's default)")
    ap.add_argument("--peer-threads", type=int, default=2, help="torch threads of the peer")
    ap.add_argument("--device", default="", help="gwt_ib --device (default: gwt_ib's own default)")
    ap.add_argument("--num-envs", default="", help="comma list, e.g. 16,64,256: scaling sweep, new code only")
    ap.add_argument("--extra", default="", help="other gwt_ib flags, passed to new and old alike")
    ap.add_argument("--quiet-wait", type=float, default=0, metavar="S",
                    help="before each run, wait up to S seconds for the machine to be idle (default 0: don't)")
    ap.add_argument("--retry-loaded", type=int, default=2, metavar="N",
                    help="re-run a rep (new, old and peer) whose runs saw other load > 0.1 core, at most N "
                         "times per invocation; the discarded runs go to --out (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--python", default=str(VENV_PY) if VENV_PY.exists() else sys.executable)
    ap.add_argument("--out", help="write all raw figures as JSON here")
    a = ap.parse_args()
    mach = machine(a, os.getloadavg()[0])
    print("machine: " + ", ".join(f"{k}={v}" for k, v in mach.items()), flush=True)
    try:
        head = git("describe", "--always", "--dirty").strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        head = "?"
    res = dict(machine=mach, args=vars(a), new_code=f"{NEW} (worktree at {head})", old_code=None,
               new=[], old=[], peer=[], discarded=[], sweep={}, ratios={})
    with tempfile.TemporaryDirectory(prefix="gwt_bench_") as tmp:
        old = None
        if a.ref and a.num_envs:
            print("note: --ref is ignored by the --num-envs sweep (new code only)")
        if a.ref and not a.num_envs:
            old, sha = extract_ref(a.ref, tmp)
            res["old_code"] = f"{a.ref} = {sha}"
        print(f"new: {res['new_code']}" + (f"\nold: {res['old_code']}" if old else ""), flush=True)
        sweep(a, tmp, res) if a.num_envs else compare(a, tmp, res, old)
    runs = [(f"rep {i} {s}", r) for s in ("new", "old", "peer") for i, r in enumerate(res[s])]
    runs += [(f"rep {i} num_envs {n}", r) for n, rs in res["sweep"].items() for i, r in enumerate(rs)]
    loaded = [f"{name} ({r['other_cores']:.2f})" for name, r in runs if r["other_cores"] > 0.1]
    res["max_other_cores"] = max([r["other_cores"] for _, r in runs], default=0)
    res["loaded_runs"] = loaded
    if loaded:  # /proc/stat CPU time (incl. VM steal) minus our subprocess's own, over each run
        print(f"WARNING: other work kept > 0.1 core busy on average during {', '.join(loaded)}: torch threads "
              f"oversubscribe the cores, so the figures of those runs are not valid")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

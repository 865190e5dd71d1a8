"""Throughput benchmark: GWT-IB (gwt_ib.py, default Cfg) against the sb3-contrib RecurrentPPO peer.

Every run is a fresh subprocess, alternating gwt, peer, gwt, peer, ... for --reps; medians are reported.
Both sides run under the same interpreter: .venv-bench/bin/python when it exists, else this one.

Setup (once, from the repo root; the torch pin keeps pip on the local CPU build):
    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 gymnasium popgym sb3-contrib numpy tqdm matplotlib
Run:
    python tests/bench.py                          # 131072 env steps (32 updates) x 3 reps, with the peer
    python tests/bench.py --steps 16384 --reps 1   # smoke test
    python tests/bench.py --skip-peer --threads 1 --extra "--compile true" --out bench.json
    python tests/bench.py --device cuda --num-envs 16,64,256   # scaling sweep, GWT-IB only

GWT-IB figures: "e2e" is summary.json's steps_per_s (the training loop, including its periodic greedy
evaluations and checkpoints); "rollout" and "update" are env steps per second of the summed rollout_s
and update_s in metrics.jsonl; "proc" is the whole process (imports, setup, final eval trace).
The peer's figure is its own steps_per_s line (model.learn only; its 100 eval episodes are skipped);
it always uses 2 torch threads (--threads applies to GWT-IB only).
Other CPU work wrecks these figures (2 torch threads on 2 cores slow down 5-15x when oversubscribed):
each run records "other load" (cores busy with anything but it, from /proc/stat) and the bench warns
when that exceeds 0.1 core.
"""
import argparse, json, os, platform, re, resource, shlex, statistics as st, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = Path("/work/shared/peers/sb3_recurrent_ppo.py")
ENV_ID, ROLLOUT = "popgym-CountRecallEasy-v0", 256


def cpu_clock():  # (CPU s used by the whole machine incl. steal, CPU s of our finished children, wall s)
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK"), r.ru_utime + r.ru_stime, time.perf_counter()


def other_cores(c0):  # mean cores busy with work other than our subprocess since cpu_clock() gave c0
    c1 = cpu_clock()
    return max(0.0, (c1[0] - c0[0]) - (c1[1] - c0[1])) / (c1[2] - c0[2])


def run_gwt(a, steps, tmp, name, num_envs=None):
    cmd = [a.python, str(ROOT / "gwt_ib.py"), "--total-timesteps", str(steps), "--progress", "false",
           "--save-plot", "false", "--out-dir", tmp, "--run-name", name, "--seed", str(a.seed)]
    cmd += ["--device", a.device] if a.device else []
    cmd += ["--torch-threads", str(a.threads)] if a.threads else []
    cmd += ["--num-envs", str(num_envs)] if num_envs else []
    cmd += shlex.split(a.extra)
    c0, t = cpu_clock(), time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    proc_s, busy = time.perf_counter() - t, other_cores(c0)
    if p.returncode != 0:
        sys.exit(f"gwt_ib.py failed ({p.returncode}): {shlex.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    d = Path(tmp) / name
    s = json.loads((d / "summary.json").read_text())
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    n, roll, upd = len(rows), sum(r["rollout_s"] for r in rows), sum(r["update_s"] for r in rows)
    steps_done = s["env_steps"]
    return dict(e2e=s["steps_per_s"], rollout=steps_done / roll, update=steps_done / upd,
                proc=steps_done / proc_s, rollout_s_per_upd=roll / n, update_s_per_upd=upd / n,
                other_s=s["wall_s"] - roll - upd, wall_s=s["wall_s"], proc_s=proc_s, updates=n,
                env_steps=steps_done, status=s["status"], final_eval=s["final_eval"], other_cores=busy)


def run_peer(a, steps):
    cmd, c0 = [a.python, "-u", str(a.peer), ENV_ID, str(steps), str(a.seed)], cpu_clock()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # one pipe: no stall
    out = []
    for line in p.stdout:  # stop once the timed section has reported; its eval episodes are not timed
        out.append(line)
        m = re.match(r"steps_per_s (\d+)\s+wall_s ([\d.]+)", line)
        if m:
            p.terminate()
            p.wait()
            return dict(steps_per_s=float(m.group(1)), wall_s=float(m.group(2)), other_cores=other_cores(c0))
    p.wait()
    sys.exit(f"peer printed no steps_per_s line ({p.returncode}): {shlex.join(cmd)}\n{''.join(out)[-3000:]}")


def machine(a, load1):
    code = ("import torch, platform, json; print(json.dumps(dict(torch=torch.__version__, "
            "threads=torch.get_num_threads(), cuda=torch.cuda.is_available() and torch.cuda.get_device_name(0) "
            "or None, python=platform.python_version())))")
    info = json.loads(subprocess.run([a.python, "-c", code], capture_output=True, text=True, check=True).stdout)
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    return dict(cpu=cpu, cores=len(os.sched_getaffinity(0)), python_exe=a.python, **info,
                gwt_threads=a.threads or info["threads"], peer_threads=2,  # the peer calls set_num_threads(2)
                load1_start=load1)


def med(runs, k):
    return st.median(r[k] for r in runs)


def main():
    venv_py = ROOT / ".venv-bench" / "bin" / "python"
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=131072, help="env steps per run (default 32 updates)")
    ap.add_argument("--reps", type=int, default=3, help="runs per side, alternated")
    ap.add_argument("--skip-peer", action="store_true", help="time GWT-IB only")
    ap.add_argument("--threads", type=int, default=0, help="gwt_ib --torch-threads (0 = torch's default)")
    ap.add_argument("--device", default="", help="gwt_ib --device (default: gwt_ib's own default)")
    ap.add_argument("--num-envs", default="", help="comma list, e.g. 16,64,256: scaling sweep, GWT-IB only")
    ap.add_argument("--extra", default="", help='other gwt_ib flags, e.g. "--compile true"')
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--python", default=str(venv_py) if venv_py.exists() else sys.executable)
    ap.add_argument("--peer", type=Path, default=PEER)
    ap.add_argument("--out", help="write all raw figures as JSON here")
    a = ap.parse_args()
    mach = machine(a, os.getloadavg()[0])
    print("machine: " + ", ".join(f"{k}={v}" for k, v in mach.items()), flush=True)
    res = dict(machine=mach, args=vars(a) | dict(peer=str(a.peer)), gwt=[], peer=[], sweep={})
    with tempfile.TemporaryDirectory(prefix="gwt_bench_") as tmp:
        if a.num_envs:  # scaling sweep: GWT-IB only, same rollout_steps, at least 4 updates per size
            sizes = [int(x) for x in a.num_envs.split(",")]
            for rep in range(a.reps):
                for n in sizes:
                    r = run_gwt(a, max(a.steps, 4 * n * ROLLOUT), tmp, f"n{n}_r{rep}", n)
                    res["sweep"].setdefault(str(n), []).append(r)
                    print(f"rep {rep} num_envs {n:5d}: e2e {r['e2e']:8.0f} steps/s  rollout {r['rollout']:8.0f}"
                          f"  update {r['update']:8.0f}  ({r['updates']} upd, other load {r['other_cores']:.2f})",
                          flush=True)
            print(f"\n{'num_envs':>8} {'e2e/s':>9} {'rollout/s':>10} {'update/s':>9} {'roll s/upd':>10} "
                  f"{'upd s/upd':>9}")
            for n, runs in res["sweep"].items():
                print(f"{n:>8} {med(runs, 'e2e'):9.0f} {med(runs, 'rollout'):10.0f} {med(runs, 'update'):9.0f} "
                      f"{med(runs, 'rollout_s_per_upd'):10.3f} {med(runs, 'update_s_per_upd'):9.3f}")
        else:
            for rep in range(a.reps):
                r = run_gwt(a, a.steps, tmp, f"r{rep}")
                res["gwt"].append(r)
                print(f"rep {rep} gwt : e2e {r['e2e']:7.0f} steps/s  rollout {r['rollout']:7.0f}  update "
                      f"{r['update']:7.0f}  ({r['updates']} upd, {r['proc_s']:.1f} s process, "
                      f"other load {r['other_cores']:.2f} cores)", flush=True)
                if not a.skip_peer:
                    p = run_peer(a, a.steps)
                    res["peer"].append(p)
                    print(f"rep {rep} peer: {p['steps_per_s']:7.0f} steps/s  ({p['wall_s']:.1f} s learn, "
                          f"other load {p['other_cores']:.2f} cores)", flush=True)
            g = res["gwt"]
            rows = [("gwt e2e (steps/s)", "e2e", "%.0f"), ("gwt process (steps/s)", "proc", "%.0f"),
                    ("gwt rollout (steps/s)", "rollout", "%.0f"), ("gwt update (steps/s)", "update", "%.0f"),
                    ("gwt rollout (s/update)", "rollout_s_per_upd", "%.3f"),
                    ("gwt update (s/update)", "update_s_per_upd", "%.3f"),
                    ("gwt eval+ckpt+other (s)", "other_s", "%.1f")]
            print(f"\n{a.steps} env steps, {a.reps} reps{' (alternated with peer)' if res['peer'] else ''}")
            print(f"{'':26}{'median':>9}   runs")
            for label, k, fmt in rows:
                print(f"{label:26}{fmt % med(g, k):>9}   " + " ".join(fmt % r[k] for r in g))
            res["median"] = {k: med(g, k) for _, k, _ in rows}
            if res["peer"]:
                pm = med(res["peer"], "steps_per_s")
                res["median"] |= dict(peer=pm, ratio_e2e=res["median"]["e2e"] / pm)
                print(f"{'peer sb3 (steps/s)':26}{pm:>9.0f}   " + " ".join(f"{p['steps_per_s']:.0f}" for p in res["peer"]))
                print(f"{'ratio gwt e2e / peer':26}{res['median']['ratio_e2e']:>9.2f}")
    busy = max([r["other_cores"] for r in res["gwt"] + res["peer"] + sum(res["sweep"].values(), [])], default=0)
    if busy > 0.1:  # /proc/stat CPU time (incl. VM steal) minus our subprocess's own, over each run
        print(f"WARNING: other work kept {busy:.2f} cores busy on average during a run: torch threads "
              f"oversubscribe the cores, so these figures are not valid")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()

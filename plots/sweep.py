"""Ablation sweep for gwt_ib.py: run (variants x seeds x envs on Ray Tune), report (results.csv/.md), figures (PNGs).

    python plots/sweep.py run --envs popgym-CountRecallEasy-v0,popgym-RepeatPreviousEasy-v0 \
        --variants all --seeds 0,1,2 --total-timesteps 500000 --out plots/sweep [--extra "..."]
    python plots/sweep.py run ... --address auto --out $SHARED_DIR/sweep      # on a Ray cluster (ray start --head)
    python plots/sweep.py report  --out plots/sweep      # -> plots/results.csv, plots/results.md
    python plots/sweep.py figures --out plots/sweep      # -> plots/*.png

Every run is one Ray Tune trial that runs one `python gwt_ib.py` subprocess named {env}__{variant}__s{seed}
under --out. `run` needs Ray Tune (pip install "ray[tune]==2.60.0"); report and figures do not. Outputs of
report/figures go to --dest, which defaults to the parent folder of --out (plots/ for plots/sweep).
The trainer's settings (names, defaults, types) and statistics come from gwt_ib itself (importing it runs
nothing); runs are gwt_ib.py subprocesses, read through their output files (config.json, metrics.jsonl,
summary.json, eval_trace.json). The figures are plots/figures.py. Needs numpy and matplotlib, not scipy.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import ipaddress
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
TRAINER = HERE.parent / "gwt_ib.py"
sys.path.insert(0, str(TRAINER.parent))
import gwt_ib  # noqa: E402

# name -> CLI overrides of gwt_ib.py; the order here is the order of tables and legends
VARIANTS: dict[str, list[str]] = {
    "gwt_ib": [],
    "start_zero": ["--episode-start-td", "zero"],
    "start_carry": ["--episode-start-td", "carry"],
    "start_max": ["--episode-start-td", "max"],
    "no_gate": ["--force-c", "1.0"],
    "fixed_half": ["--force-c", "0.5"],
    "no_ib": ["--lambda-c", "0"],
    "prior_only": ["--use-router-residual", "false"],
    "constraint": ["--ib-loss", "constraint"],
    "memoryless": ["--memoryless", "true"],
    "lr0": ["--lr", "0"],
    "lr0_8upd": ["--lr", "0", "--total-timesteps", "32768"],
    "sec": ["--gate", "vector", "--ib-loss", "kl", "--lambda-c", "0.1", "--lambda-c-end", "0.01"],
    "surprise_none": ["--surprise", "none"],
    "gwt_lstm": ["--memory", "lstm"],
    "lstm": ["--memory", "lstm", "--force-c", "1.0"],
}
VARIANT_DOC = {
    "gwt_ib": "the full method (defaults)",
    "start_zero": "the router sees |td| = 0 at an episode's first step",
    "start_carry": "the router sees the env's last TD of the previous episode at an episode's first step",
    "start_max": "the router sees |td| = td_norm_clip at an episode's first step (a new memory knows nothing)",
    "no_gate": "gate fixed at 1: a plain GRU agent",
    "fixed_half": "gate fixed at 0.5",
    "no_ib": "learned gate, no information-bottleneck penalty",
    "prior_only": "gate = TD prior only (no router MLP over [z, h])",
    "constraint": "the budget as a constraint: a PI-controlled Lagrange multiplier holds the mean gate at target_c",
    "memoryless": "h reset to zero every step (no memory)",
    "lr0": "learning rate 0: an agent that cannot learn (GateCheck must FAIL)",
    "lr0_8upd": "learning rate 0, 8 updates (GateCheck must FAIL)",
    "sec": "GWT-IB-SEC: per-unit gate, KL bottleneck, lambda_c 0.1 -> 0.01",
    "surprise_none": "no surprise signal: the gate is its prior, the start rule and the router",
    "gwt_lstm": "the full method with an LSTM memory",
    "lstm": "gate fixed at 1 with an LSTM memory: a plain LSTM agent",
}
RUN_RE = re.compile(r"^(?P<env>.+)__(?P<variant>[A-Za-z0-9_]+?)__s(?P<seed>\d+)$")
# config fields that do not change what a run computes: ignored when checking an old run against the request
# (a field that only one side has, e.g. renamed in the trainer, is not compared either)
NON_SEMANTIC = {"out_dir", "run_name", "progress", "torch_threads", "device", "log_every", "checkpoint_every",
                "save_plot", "cpu_kernel", "cuda_graph", "halt_after", "async_envs", "env_workers"}
assert NON_SEMANTIC <= set(gwt_ib.Cfg.__dataclass_fields__), NON_SEMANTIC - set(gwt_ib.Cfg.__dataclass_fields__)
FINAL_K = 3  # "final eval" = mean of the last FINAL_K evaluations of a run


# ============================================================================ small helpers
def run_name(env: str, variant: str, seed: int) -> str:
    return f"{env.replace('/', '_')}__{variant}__s{seed}"


def parse_seeds(s: str) -> list[int]:
    """"0,1,2" or "0-4" or a mix ("0-2,7")."""
    parts = [p.strip() for p in s.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d+(-\d+)?", p) for p in parts):
        raise argparse.ArgumentTypeError(f"{s!r}: must be integers >= 0 or ranges, e.g. 0,1,2 or 0-4")
    out = [i for p in parts for i in range(int(p.split("-")[0]), int(p.split("-")[-1]) + 1)]
    return list(dict.fromkeys(out))


def parse_variants(s: str) -> list[str]:
    names = list(VARIANTS) if s.strip() == "all" else [v.strip() for v in s.split(",") if v.strip()]
    if not names or any(v not in VARIANTS for v in names):
        raise argparse.ArgumentTypeError(f"{s!r}: must be 'all' or a comma-separated subset of: {', '.join(VARIANTS)}")
    return names


def parse_extra(s: str) -> list[str]:
    try:
        argv = shlex.split(s)
        given = trainer_flags(argv)[1]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{s!r}: must be gwt_ib.py flags ({e})")
    for f in ("env_id", "seed", "out_dir", "run_name", "resume", "evaluate", "list_envs"):
        if f in given:
            raise argparse.ArgumentTypeError(f"{s!r}: must not set --{f.replace('_', '-')} (the sweep sets it)")
    return argv


def at_least(lo, kind=int):
    """An argparse type: a number of `kind` >= lo."""
    def check(s: str):
        if not re.fullmatch(r"\d+" if kind is int else r"\d+(\.\d*)?", s.strip()) or kind(s) < lo:
            raise argparse.ArgumentTypeError(f"{s!r}: must be {'an integer' if kind is int else 'a number'} >= {lo}")
        return kind(s)
    return check


def trainer_flags(argv: list[str]) -> tuple[gwt_ib.Cfg, set]:
    """The Cfg gwt_ib.py makes of these flags, by its own parser and types, and the names of the flags given;
    ValueError (one line) for anything the trainer would refuse before it starts."""
    p = gwt_ib.build_parser()

    def error(message):  # instead of printing and exiting: the caller says where the flags came from
        raise ValueError(message)
    p.error = error
    ns = p.parse_args(argv)
    try:
        cfg = gwt_ib.parse_overrides(ns, gwt_ib.Cfg())
        gwt_ib.validate(cfg)
    except gwt_ib.ConfigError as e:
        raise ValueError(str(e)) from None
    return cfg, {k for k, v in vars(ns).items() if v not in (None, False)}


def same_value(saved, want) -> bool:
    """Does a config.json value equal a setting (floats: to rounding)?"""
    if type(want) is float and type(saved) in (int, float):
        return math.isclose(saved, want, rel_tol=1e-9, abs_tol=1e-12)
    return saved == want and type(saved) is type(want)


def read_json(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def mean_ci(xs) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n) over the finite values (gwt_ib.mean_ci); half-width nan for n < 2."""
    x = [v for v in xs if v is not None and math.isfinite(v)]
    return (*gwt_ib.mean_ci(x), len(x)) if x else (float("nan"), float("nan"), 0)


# ============================================================================ run (Ray Tune)
RAY_INSTALL = 'pip install "ray[tune]==2.60.0"'  # the Ray version `run` is tested with; report/figures need no Ray
FINISHED = ("completed", "diverged")  # a run with such a status is a result: it is not started again


def check_existing(run_dir: Path, want: Optional[gwt_ib.Cfg] = None) -> tuple[str, list[str]]:
    """State of a run dir: 'completed', 'diverged', 'resumable' or 'redo' (also when there is none), and the
    fields where its config contradicts the requested Cfg, every field of it (one the run's config.json lacks, from
    an older trainer, is not compared)."""
    cfg, summ = read_json(run_dir / "config.json"), read_json(run_dir / "summary.json")
    want = dataclasses.asdict(want) if want is not None else {}
    diff = [f"{k}: run has {cfg[k]!r}, requested {v!r}" for k, v in want.items()
            if cfg is not None and k not in NON_SEMANTIC and k in cfg and not same_value(cfg[k], v)]
    if summ and summ.get("status") in FINISHED:
        return summ["status"], diff
    return ("resumable" if cfg is not None and (run_dir / "checkpoint.pt").exists() else "redo"), diff


def lock_holder(path: Path, hold: bool = False):
    """An exclusive flock on `path` (never through a link): the open file if `hold` and it was free (it then names
    this process until exit), else who holds it ('' if no one; the file is let go)."""
    try:
        flags = (os.O_RDWR | os.O_CREAT if hold else os.O_RDONLY) | os.O_NOFOLLOW
        f = open(os.open(path, flags, 0o644), "r+" if hold else "r")
    except FileNotFoundError:
        return ""
    except OSError as e:  # e.g. a symlink
        return f"no one it can name ({path.name} cannot be locked: {e.strerror})"
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = f.read().strip() or "another process"
        f.close()
        return holder
    if not hold:
        f.close()
        return ""
    f.truncate(0)
    f.write(f"sweep pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def exposed_ports() -> list[str]:
    """'address:port' of the TCP sockets this process and its children (Ray's processes) listen on, but not on
    loopback only. Needs psutil, which Ray brings."""
    import psutil
    found = set()
    for proc in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            for c in proc.net_connections(kind="tcp"):
                ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
                if c.status == psutil.CONN_LISTEN and not ip.is_loopback:
                    found.add(f"{f'[{ip}]' if ip.version == 6 else ip}:{c.laddr.port}")
    return sorted(found)


def trainer_rows(job: dict):
    """One run as its Tune trial sees it: gwt_ib.py as a subprocess (fresh, or --resume when the run dir has a
    checkpoint, so that a trial that Tune starts again continues); yields its metrics.jsonl rows as the trainer
    writes them, the last one with the run's summary and done=True. Closing the generator stops the trainer."""
    d, n, t0, row, pos = Path(job["dir"]), str(job["cpus"]), time.monotonic(), {}, 0
    state = check_existing(d)[0]
    resume, log = state == "resumable", d.parent / ".logs" / f"{d.name}.txt"
    if state not in FINISHED:  # (finished: a retried trial whose run completed meanwhile)
        if holder := lock_holder(d / "run.lock") if d.is_dir() and not d.is_symlink() else "":
            raise RuntimeError(f"{d.name}: its run directory is in use by {holder}; it is not replaced")
        if not resume:  # else the trainer would pick another dir name
            d.unlink() if d.is_symlink() else shutil.rmtree(d, ignore_errors=True)
        wait = (d / "config.json").stat().st_mtime_ns if resume else None
        # a resumed run gets only its dir and how to run (its settings are in its config.json)
        cmd = [sys.executable, str(TRAINER)] + (["--resume", str(d)] if resume else job["argv"] + ["--out-dir", str(
            d.parent), "--run-name", d.name]) + ["--progress", "false", "--torch-threads", n, "--device", job["device"]]
        log.parent.mkdir(exist_ok=True)
        with open(log, "a") as f:
            f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {socket.gethostname()} {shlex.join(cmd)}\n")
            f.flush()  # own session: a Ctrl-C reaches the trainer only through Tune stopping the trial
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=TRAINER.parent, start_new_session=True,
                                    env={**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n})
        try:
            while True:
                exited = proc.poll() is not None  # poll first: a trainer that has exited wrote all its rows
                if wait and (d / "config.json").stat().st_mtime_ns != wait:
                    wait = None  # a resumed trainer drops the rows after its checkpoint, then rewrites config.json
                try:
                    with open(d / "metrics.jsonl", "rb") as m:
                        m.seek(pos)
                        data = b"" if wait else m.read()
                except OSError:
                    data = b""
                data = data[:data.rfind(b"\n") + 1]
                pos += len(data)
                for line in data.splitlines():  # the newest row waits: the last one goes with the summary
                    if row:
                        yield row
                    with contextlib.suppress(ValueError):  # a damaged line: not a row
                        row = json.loads(line)
                if exited:
                    break
                time.sleep(0.5)
        finally:  # also when Tune stops the trial: the trainer finishes its update, checkpoints and exits
            if proc.poll() is None:
                proc.terminate()
                proc.wait()  # Tune kills the trial (and with it the trainer) if this takes too long
        s = read_json(d / "summary.json") or {}
        if proc.returncode not in (0, 3) or s.get("status") not in ("completed", "halted", "diverged"):
            tail = ([l.strip() for l in log.read_text(errors="ignore").splitlines() if l.strip()] or ["no output"])[-1]
            raise RuntimeError(f"{d.name}: trainer exited with code {proc.returncode}: {tail[:300]} (log: {log})")
        if s["status"] == "completed" and not job["keep"]:
            for f in [d / "checkpoint.pt", *d.glob("envs-*.pkl")]:  # the checkpoint and its env state; model.pt stays
                f.unlink(missing_ok=True)
    s = read_json(d / "summary.json") or {}
    yield {**row, "done": True, "status": s.get("status"), "final_eval": final_eval(s), "gate_mean_c": s.get("mean_c"),
           "verdict": (s.get("gatecheck") or {}).get("verdict", ""), "resumed": resume, "wall_s": time.monotonic() - t0}


def plan_jobs(a, out: Path, plan: list) -> tuple[dict, int, int, list]:
    """The runs still to do (name -> job), how many are finished, how many resumable, and runs with other settings."""
    jobs, finished, resumable, diffs = {}, 0, 0, []
    for env, var, seed in plan:
        name = run_name(env, var, seed)
        # the variant's flags come after --extra, so that a variant always is what its name says
        argv = ["--env-id", env, "--seed", str(seed), "--total-timesteps", str(a.total_timesteps), *a.extra, *VARIANTS[var]]
        state, diff = check_existing(out / name, trainer_flags(argv)[0])
        diffs += [f"{name}: {'; '.join(diff)}"] * bool(diff)
        finished, resumable = finished + (state in FINISHED), resumable + (state == "resumable")
        if state not in FINISHED:
            jobs[name] = dict(name=name, dir=str(out / name), argv=argv, cpus=a.cpus_per_trial, keep=a.keep_checkpoints,
                              device=a.device or ("cuda" if a.gpus_per_trial > 0 else "cpu"))
    return jobs, finished, resumable, diffs


def local_ray_token() -> None:
    """Before Ray is imported (it reads them then): Ray 2.60 listens on every interface whatever it is told, so a
    local instance's services must at least demand a token, a fresh random one known only to this user's processes
    (the environment, which Ray's processes inherit); unless RAY_AUTH_MODE is set already, the user's choice."""
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


def cmd_run(a) -> int:
    out = Path(a.out).expanduser().resolve()  # Ray workers run elsewhere (another cwd, other nodes)
    envs = [e.strip() for e in a.envs.split(",") if e.strip()]
    plan = [(e, v, s) for s in a.seeds for e in envs for v in a.variants]  # seed-major: a sweep cut short
    for attempt in range(2):  # has every variant on the first seeds; planned again once --out is this sweep's alone
        jobs, finished, resumable, diffs = plan_jobs(a, out, plan)
        if diffs:
            print(f"sweep.py run: error: {len(diffs)} existing run(s) in {out} were made with other settings (e.g. "
                  f"{diffs[0]}); use another --out, or delete them", file=sys.stderr)
            return 2
        if attempt or not jobs:
            break
        if not a.address:
            local_ray_token()
        try:
            import ray
            from ray import tune
        except ImportError as e:
            print(f"sweep.py run: error: Ray Tune is not installed ({e}); install it with: {RAY_INSTALL}",
                  file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        lock = lock_holder(out / ".sweep.lock", hold=True)  # held until exit: a second sweep on --out is refused
        if isinstance(lock, str):
            print(f"sweep.py run: error: --out {out} is in use by {lock}; one sweep at a time may write it",
                  file=sys.stderr)
            return 2
    print(f"sweep: {len(plan)} runs ({len(envs)} envs x {len(a.variants)} variants x {len(a.seeds)} seeds) into {out}; "
          f"{finished} already finished, {resumable} to resume, {len(jobs) - resumable} to start", flush=True)
    if not jobs:
        print("nothing to do")
        return 0
    old = read_json(out / "sweep.json") or {}  # several invocations into one --out: the union
    (out / "sweep.json").write_text(json.dumps(dict(
        envs=list(dict.fromkeys(old.get("envs", []) + envs)), seeds=list(dict.fromkeys(old.get("seeds", []) + a.seeds)),
        variants={**old.get("variants", {}), **{v: VARIANTS[v] for v in a.variants}}, extra=a.extra,
        total_timesteps=a.total_timesteps, python=sys.executable, updated=time.strftime("%Y-%m-%d %H:%M")), indent=2))
    ray.init(address=a.address, logging_level="warning", log_to_driver=False,
             **({} if a.address else dict(num_cpus=a.num_cpus or os.cpu_count(), include_dashboard=False)))
    if not a.address and (ports := exposed_ports()):
        auth = ("its services demand this sweep's random token" if os.environ.get("RAY_AUTH_MODE") == "token" else
                f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']}: anyone who reaches them can run code as you")
        print(f"sweep: note: Ray listens beyond loopback, on {', '.join(ports)} (Ray {ray.__version__} cannot be held "
              f"to loopback); {auth}; keep this machine on a trusted network (README, Sweeps)", flush=True)
    # SIGTERM (a scheduler, kill) stops like Ctrl-C: Tune stops the trials, each trainer checkpoints and exits
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))

    class Run(tune.Trainable):  # a class: Tune waits for cleanup() when it stops a trial, so the trainer checkpoints
        def setup(self, config, jobs):
            self.rows = trainer_rows(jobs[config["run"]])

        def step(self):
            return next(self.rows)

        def cleanup(self):
            self.rows.close()

    class Lines(tune.Callback):  # one line per finished run, with its final eval
        done = finished

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done, r = self.done + 1, trial.last_result
            print(f"[{self.done}/{len(plan)}] {trial.config['run']}: {r.get('status')}{' (resumed)' * r['resumed']} in "
                  f"{r['wall_s']:.0f} s | final_eval {r['final_eval']:.3f} {r['verdict']}", flush=True)

    exp = f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        tune.Tuner(tune.with_resources(tune.with_parameters(Run, jobs=jobs),
                                       {"cpu": a.cpus_per_trial, "gpu": a.gpus_per_trial}),
                   param_space={"run": tune.grid_search(list(jobs))},  # Tune's trial table shows the run names
                   tune_config=tune.TuneConfig(trial_name_creator=lambda t: t.config["run"],
                                               trial_dirname_creator=lambda t: t.config["run"]),
                   run_config=tune.RunConfig(name=exp, storage_path=str(out / ".tune"), verbose=a.verbose, callbacks=[
                       Lines()], checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                       failure_config=tune.FailureConfig(max_failures=a.max_failures))).fit()
    finally:
        ray.shutdown()
    left = [n for n in (run_name(*r) for r in plan) if check_existing(out / n)[0] not in FINISHED]
    print(f"sweep: {len(plan) - len(left)}/{len(plan)} finished; Tune's results (TensorBoard, CSV): {out / '.tune' / exp}"
          + (f"; not finished: {', '.join(left)} (run the same command again to resume)" * bool(left)), flush=True)
    return 1 if left else 0


# ============================================================================ collect
def collect(out: Path, include_all: bool = False) -> list[dict]:
    """One dict per run dir under `out` named {env}__{variant}__s{seed} that has a summary.json
    (only completed runs unless include_all)."""
    runs = []
    for d in sorted(out.iterdir()) if out.is_dir() else []:
        m = RUN_RE.match(d.name)
        if not (d.is_dir() and m):
            continue
        summ, cfg = read_json(d / "summary.json"), read_json(d / "config.json")
        if summ is None or cfg is None:
            continue
        if summ.get("status") != "completed" and not include_all:
            continue
        runs.append(dict(dir=d, env=cfg.get("env_id", m["env"]), variant=m["variant"], seed=int(m["seed"]),
                         summary=summ, cfg=cfg))
    return runs


def last_quarter_mean_c(run_dir: Path) -> float:
    """The mean gate of the rollouts of the run's last quarter of updates (metrics.jsonl), where a budget is judged."""
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    q = rows[len(rows) - max(1, len(rows) // 4):]
    return float(sum(r["mean_c"] for r in q) / len(q)) if q else float("nan")


# GateCheck's effects (gwt_ib.EFFECTS), in the order of the report's columns, with short column names
EFFECT_COLS = {"gate vs constant": "gate vs const", "start rule": "start rule", "after the start": "after start",
               "surprise term": "surprise term", "surprise timing": "surprise timing", "learned router": "router"}


def final_eval(summ: dict) -> float:
    """Mean of the last FINAL_K evaluations (fewer if the run has fewer), under the run's eval_mode."""
    ev = [e for _, e in summ.get("evals", []) if e is not None and math.isfinite(e)]
    return float(sum(ev[-FINAL_K:]) / len(ev[-FINAL_K:])) if ev else float("nan")


def order_variants(names) -> list[str]:
    known = [v for v in VARIANTS if v in names]
    return known + sorted(set(names) - set(known))


def order_envs(out: Path, names) -> list[str]:
    man = read_json(out / "sweep.json") or {}
    first = [e for e in man.get("envs", []) if e in names]
    return first + sorted(set(names) - set(first))


def default_dest(a) -> Path:
    return Path(a.dest) if a.dest else Path(a.out).resolve().parent


# ============================================================================ report
def cmd_report(a) -> int:
    out, dest = Path(a.out), default_dest(a)
    runs = collect(out, include_all=True)
    if not runs:
        print(f"report: no finished runs under {out}", file=sys.stderr)
        return 1
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in runs:
        s, g = r["summary"], r["summary"].get("gatecheck", {})
        sps = s.get("steps_per_s", float("nan"))
        if r["summary"].get("env_steps") and s.get("wall_s"):  # over the whole run, resumed parts included
            sps = s["env_steps"] / s["wall_s"]
        effects = (g.get("evidence") or {}).get("effects", {})
        arms = (g.get("evidence") or {}).get("returns", {})
        rows.append(dict(env=r["env"], variant=r["variant"], seed=r["seed"], final_eval=final_eval(s),
                         mmer=s.get("mmer", float("nan")), eval_mode=s.get("eval_mode", "greedy"),
                         **{f"effect {k}": effects.get(k, {}).get("mean", float("nan")) for k in EFFECT_COLS},
                         **{f"return {k}": v for k, v in arms.items()},
                         rho_td_res=g.get("rho_td_res", float("nan")), ev=s.get("ev"), mean_c=s.get("mean_c"),
                         mean_c_last_quarter=last_quarter_mean_c(r["dir"]), target_c=r["cfg"].get("target_c"),
                         verdict=g.get("verdict", ""),
                         td_std=g.get("td_std"), wall_s=s.get("wall_s"), steps_per_s=sps,
                         status=s.get("status"), last_eval=s.get("final_eval"), rho_td_c=g.get("rho_td_c"),
                         eval_ok=g.get("eval_ok"), std_ok=g.get("std_ok"), env_steps=s.get("env_steps"),
                         learned_gate=r["cfg"].get("force_c") is None, run_dir=str(r["dir"])))
    envs = order_envs(out, {r["env"] for r in rows})
    vorder = order_variants({r["variant"] for r in rows})
    rows.sort(key=lambda r: (envs.index(r["env"]), vorder.index(r["variant"]), r["seed"]))
    cols = list(dict.fromkeys(k for r in rows for k in r))  # arms differ between runs (no router, fixed gates)
    with open(dest / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})

    def f3(x):
        return "—" if x is None or not math.isfinite(x) else f"{x:.3f}"

    man = read_json(out / "sweep.json") or {}
    steps = sorted({r["env_steps"] for r in rows if r["status"] == "completed" and r["env_steps"]})
    modes = "/".join(sorted({r["eval_mode"] for r in rows}))
    md = ["# GWT-IB ablation results", "",
          f"Source: `{out}` ({sum(r['status'] == 'completed' for r in rows)} completed runs"
          + (f", {len(steps) == 1 and f'{steps[0]:,}' or ', '.join(f'{s:,}' for s in steps)} env steps each" if steps else "")
          + (f"; extra flags `{' '.join(man['extra'])}`" if man.get("extra") else "") + ").",
          "",
          f"- **final eval**: per run, the mean of its last {FINAL_K} evaluations (each the mean return of "
          f"`eval_episodes` episodes of the {modes} policy; evaluations "
          f"every `eval_every` updates and at the end), less noisy than the last evaluation alone. **MMER**: "
          f"POPGym's max over training of the mean return of a rollout's (sampled-policy) episodes. Both as the "
          f"mean over seeds ± the half-width of a 95% Student-t confidence interval (n-1 degrees of freedom; "
          f"none for n = 1).",
          f"- **What the gate does** (learned gates only): GateCheck's counterfactuals at the end of each run, "
          f"{modes} return differences on the same seeded evaluation episodes, paired per episode; each cell the "
          f"mean over seeds of the runs' mean differences ± the 95% t-interval over seeds. **gate vs const**: the "
          f"learned gate against the gate held at its mean; **start rule**: that constant with the learned gate "
          f"kept at each episode's first step, against the constant; **after start**: the learned gate against "
          f"the constant-with-start-rule (what varying the gate within an episode adds); **surprise term**: the "
          f"learned gate against itself with |td| = 0 after each episode's first step (this changes the gate's "
          f"level too); **surprise timing**: against itself with |td| held at its mean after the first step (the "
          f"level kept, the timing gone); **router**: against itself without the router's learned residual.",
          "- **mean c, last ¼**: the rollouts' mean gate over the last quarter of updates (the budget is "
          "`target_c`; for `sec`, the mean over memory units).",
          "- **GateCheck**: runs whose verdict is PASS (TD scale not pinned at its floor, and the last evaluations' "
          "episodes beat the first evaluation's by a one-sided Welch test and by a minimum share of the return "
          "range). EV, rho(td,c), rho(td,res) and each arm's return are in `results.csv`.",
          "- Only completed runs enter the statistics; other statuses are counted in the last column.", ""]
    for env in envs:
        md += [f"## {env}", "",
               f"| variant | n | final eval ({modes}) | MMER | mean c, last ¼ | "
               + " | ".join(EFFECT_COLS.values()) + " | GateCheck PASS | not completed |",
               "|---|---:|---:|---:|---:|" + "---:|" * len(EFFECT_COLS) + "---:|---|"]
        for v in vorder:
            rs = [r for r in rows if r["env"] == env and r["variant"] == v]
            if not rs:
                continue
            ok = [r for r in rs if r["status"] == "completed"]
            def ci(key):
                m, h, _ = mean_ci([r[key] for r in ok])
                return f"{f3(m)} ± {f3(h)}" if math.isfinite(h) else f3(m)

            n = len(ok)
            learned = ok and ok[0]["learned_gate"]
            effects = [ci(f"effect {k}") if learned else "—" for k in EFFECT_COLS]
            other = {}
            for r in rs:
                if r["status"] != "completed":
                    other[r["status"]] = other.get(r["status"], 0) + 1
            md.append(f"| {v} | {n} | {ci('final_eval')} | {ci('mmer')} | {ci('mean_c_last_quarter')} | "
                      f"{' | '.join(effects)} | "
                      f"{sum(r['verdict'] == 'PASS' for r in ok)}/{len(ok)} | "
                      f"{', '.join(f'{k} {c}' for k, c in other.items()) or ''} |")
        md.append("")
    flags = {**VARIANTS, **man.get("variants", {})}  # the flags the sweep really used, where it recorded them
    md += ["Variants:", ""] + [f"- `{v}`: {VARIANT_DOC.get(v, '')} — `{' '.join(flags.get(v, [])) or '(defaults)'}`"
                                for v in vorder] + [""]
    (dest / "results.md").write_text("\n".join(md))
    print(f"report: {len(rows)} runs -> {dest / 'results.csv'}, {dest / 'results.md'}")
    print("\n".join(md[md.index(next(l for l in md if l.startswith('## '))):]))
    return 0


# ============================================================================ main
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=__doc__.split("\n", 1)[1])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run variants x seeds x envs as Ray Tune trials (one gwt_ib.py subprocess each)")
    r.add_argument("--envs", default="popgym-CountRecallEasy-v0,popgym-RepeatPreviousEasy-v0", help="comma-separated env ids")
    r.add_argument("--variants", type=parse_variants, default="all", help=f"'all' or some of: {', '.join(VARIANTS)}")
    r.add_argument("--seeds", type=parse_seeds, default="0,1,2", help="e.g. 0,1,2 or 0-4")
    r.add_argument("--total-timesteps", type=at_least(1), default=500_000)
    r.add_argument("--out", default=str(HERE / "sweep"), help="folder of the run dirs (on a cluster: seen by every node)")
    r.add_argument("--extra", type=parse_extra, default="", help='gwt_ib.py flags for every run (a variant\'s own win)')
    r.add_argument("--address", help="join a running Ray cluster: 'auto' (on one of its nodes) or HOST:PORT of its "
                   "head; default: a local Ray instance")
    r.add_argument("--num-cpus", "--jobs", dest="num_cpus", type=at_least(1), help="CPUs of the local Ray instance "
                   "(default: os.cpu_count()); runs at once = num-cpus / cpus-per-trial")
    r.add_argument("--cpus-per-trial", type=at_least(1), default=1, help="CPUs per run; also its --torch-threads and "
                   "OMP/MKL/OPENBLAS_NUM_THREADS (default 1)")
    r.add_argument("--gpus-per-trial", type=at_least(0, float), default=0, help="GPUs per run, e.g. 1 or 0.5 (default 0)")
    r.add_argument("--device", choices=("cpu", "auto", "cuda"), help="default: cuda if --gpus-per-trial > 0, else cpu")
    r.add_argument("--max-failures", type=at_least(0), default=1, help="times Tune starts a failed run again; it "
                   "resumes the run's checkpoint (default 1)")
    r.add_argument("--verbose", type=int, default=1, choices=(0, 1, 2), help="Tune's console output (default 1)")
    r.add_argument("--keep-checkpoints", action="store_true", help="keep checkpoint.pt of completed runs")
    for name, h in (("report", "results.csv and results.md from the run dirs"), ("figures", "PNG figures from the run dirs")):
        s = sub.add_parser(name, help=h)
        s.add_argument("--out", default=str(HERE / "sweep"), help="the sweep folder given to run")
        s.add_argument("--dest", default="", help="where to write (default: the parent folder of --out)")
        if name == "figures":
            s.add_argument("--smooth", type=int, default=5, help="trailing moving mean (updates) for mean_c curves")
            s.add_argument("--bins", type=int, default=10, help="|td| bins (equal counts) of gate_vs_td.png")
            s.add_argument("--timeline-variant", default="gwt_ib")
            s.add_argument("--timeline-seed", type=int, default=None, help="default: the lowest seed with a trace")
    a = p.parse_args(argv)
    if a.cmd == "figures":
        import figures  # plots/figures.py, beside this file
        return figures.cmd_figures(a)
    return {"run": cmd_run, "report": cmd_report}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())

"""plots/sweep.py: `run` on a real local Ray instance (a tiny sweep, then report), resume after the sweep is
killed mid-way, the settings check, and report/run without Ray installed."""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT

SWEEP = ROOT / "plots" / "sweep.py"
ENV = "popgym-CountRecallEasy-v0"
TINY = ("--num-envs 2 --rollout-steps 32 --seq-len 16 --minibatches 2 --epochs 1 --eval-episodes 2 --eval-every 4 "
        "--enc-dim 16 --hid-dim 16 --router-hid 8 --head-hid 16 --save-plot false --checkpoint-every 1")
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='Ray Tune is not installed (pip install "ray[tune]==2.60.0")')
NO_RAY = "import sys, runpy; sys.modules['ray'] = None; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"


def sweep(*args, no_ray=False, **kw):
    pre = ["-c", NO_RAY] if no_ray else []
    return subprocess.run([sys.executable, *pre, str(SWEEP), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, **kw)


def run_args(out, variants, seeds, steps, *more):
    return ["run", "--envs", ENV, "--variants", variants, "--seeds", seeds, "--total-timesteps", str(steps),
            "--out", str(out), "--verbose", "0", "--extra", TINY, *more]


def headers(run_dir: Path) -> list[str]:
    """The trainer commands the sweep started for a run, from its sweep_log.txt."""
    return [l for l in (run_dir / "sweep_log.txt").read_text().splitlines() if l.startswith("# ")]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def our_processes(tag: str) -> list[int]:
    """Pids of live processes whose command line mentions `tag` (this test's temp dir)."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and p.name != str(os.getpid()):
            try:
                if tag in (p / "cmdline").read_bytes().decode(errors="ignore"):
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


@needs_ray
def test_sweep_runs_every_run_as_a_ray_trial_then_report(tmp_path):
    """2 variants x 2 seeds on a local Ray instance: every run completes in its usual run dir with the
    variant's flags and one torch thread, its metrics rows reach Tune, one line per run is printed, report
    reads the runs; running the command again does nothing and a settings change is refused before Ray."""
    out = tmp_path / "sweep"
    t = time.monotonic()
    p = sweep(*run_args(out, "gwt_ib,no_gate", "0,1", 1024, "--num-cpus", "2"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    print(f"sweep of 4 runs: {time.monotonic() - t:.1f} s")
    assert "0 already finished, 0 to resume, 4 to start; local Ray instance (2 CPUs)" in p.stdout
    assert "sweep: 4/4 finished (completed 4)" in p.stdout
    tune_dirs = list((out / ".tune").glob("sweep-*"))
    assert len(tune_dirs) == 1
    for var, force in (("gwt_ib", None), ("no_gate", 1.0)):
        for seed in (0, 1):
            name = f"{ENV}__{var}__s{seed}"
            d = out / name
            s = summary(d)
            assert s["status"] == "completed" and s["env_steps"] == 1024
            cfg = json.loads((d / "config.json").read_text())
            assert cfg["force_c"] == force and cfg["seed"] == seed and cfg["hid_dim"] == 16
            assert not (d / "checkpoint.pt").exists() and (d / "model.pt").exists()
            (cmd,) = headers(d)
            assert f"{sys.executable} {ROOT / 'gwt_ib.py'} " in cmd and "--resume" not in cmd
            assert "--torch-threads 1 " in cmd and cmd.endswith("--device cpu")
            assert f"--out-dir {out} --run-name {name}" in cmd
            assert any(l.startswith(f"[") and f"] {name}: completed in " in l and "final_eval -" in l
                       for l in p.stdout.splitlines()), p.stdout
            # every metrics row reached Tune, in order, and the last result carries the run's summary
            rows = metrics(d)
            with open(tune_dirs[0] / name / "progress.csv") as f:
                tune_rows = list(csv.DictReader(f))
            assert [int(r["update"]) for r in tune_rows] == [r["update"] for r in rows] == list(range(1, 17))
            assert [int(r["env_steps"]) for r in tune_rows] == [r["env_steps"] for r in rows]
            last = json.loads((tune_dirs[0] / name / "result.json").read_text().splitlines()[-1])
            assert last["status"] == "completed" and last["update"] == 16 and last["done"]
            assert abs(last["final_eval"] - sum(e for _, e in s["evals"][-3:]) / 3) < 1e-9

    r = sweep("report", "--out", str(out), "--dest", str(tmp_path / "res"), no_ray=True)  # report needs no Ray
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "res" / "results.csv") as f:
        res = list(csv.DictReader(f))
    assert sorted((x["variant"], x["seed"], x["status"]) for x in res) == [
        ("gwt_ib", "0", "completed"), ("gwt_ib", "1", "completed"), ("no_gate", "0", "completed"),
        ("no_gate", "1", "completed")]
    assert "| gwt_ib | 2 |" in (tmp_path / "res" / "results.md").read_text()

    again = sweep(*run_args(out, "gwt_ib,no_gate", "0,1", 1024), no_ray=True)  # nothing to do: Ray not needed
    assert again.returncode == 0 and "4 already finished" in again.stdout and "nothing to do" in again.stdout
    other = sweep(*run_args(out, "gwt_ib", "0", 2048), no_ray=True)
    assert other.returncode == 2 and "total_timesteps: run has 1024, requested '2048'" in other.stderr
    assert "were made with other settings" in other.stderr
    assert summary(out / f"{ENV}__gwt_ib__s0")["env_steps"] == 1024


@needs_ray
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_sweep_killed_midway_resumes_with_the_same_command(tmp_path, sig):
    """One trial at a time; the sweep is killed once seed 0 has completed and seed 1 has a checkpoint. No
    trainer outlives it. The same command again skips seed 0 and resumes seed 1 from its checkpoint with
    --resume; seed 1 then completes with one row per update."""
    out, steps = tmp_path / "sweep", 8192
    args = run_args(out, "gwt_ib", "0,1", steps, "--num-cpus", "1")
    s0, s1 = out / f"{ENV}__gwt_ib__s0", out / f"{ENV}__gwt_ib__s1"
    t = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        while not (s1 / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t < 150, "seed 1 never wrote a checkpoint"
            time.sleep(0.1)
        proc.send_signal(sig)
        first = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert summary(s0)["status"] == "completed"
    assert not (s1 / "summary.json").exists() or summary(s1)["status"] == "interrupted"
    if sig == signal.SIGTERM:  # Tune stops the trial, the trainer finishes its update and checkpoints
        assert proc.returncode == 1 and "not finished: " + s1.name in first, first
        assert summary(s1)["exit_code"] == 143
    deadline = time.monotonic() + 30
    while our_processes(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert our_processes(str(tmp_path)) == [], "a trainer outlived the sweep"
    s0_summary = (s0 / "summary.json").read_bytes()
    n_before = metrics(s1)[-1]["update"]
    assert n_before < steps // 64

    p = sweep(*args)
    print(f"kill {signal.Signals(sig).name}: both invocations {time.monotonic() - t:.1f} s")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "1 already finished, 1 to resume, 0 to start" in p.stdout
    assert f"] {s1.name}: completed in " in p.stdout and "(resumed)" in p.stdout and s0.name not in p.stdout
    assert (s0 / "summary.json").read_bytes() == s0_summary and len(headers(s0)) == 1  # not run again
    h = headers(s1)
    assert len(h) == 2 and "--resume" not in h[0]
    assert h[1].endswith(f"--resume {s1} --progress false --torch-threads 1 --device cpu")
    s = summary(s1)
    assert s["status"] == "completed" and s["env_steps"] == steps
    assert [r["update"] for r in metrics(s1)] == list(range(1, steps // 64 + 1))
    assert not (out / ".logs" / f"{s1.name}.txt").exists()


@needs_ray
def test_failed_trainer_is_one_line_and_exit_1(tmp_path):
    """A trainer that refuses its settings: the trial fails (no retry with --max-failures 0), the sweep
    prints the trainer's one-line error without a traceback and exits 1."""
    out = tmp_path / "sweep"
    p = sweep("run", "--envs", ENV, "--variants", "gwt_ib", "--seeds", "0", "--total-timesteps", "1024", "--out",
              str(out), "--verbose", "0", "--max-failures", "0", "--extra", "--num-envs 0")
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    name = f"{ENV}__gwt_ib__s0"
    assert f"[failed] {name}: trainer exited with code 2: gwt_ib.py: error: --num-envs 0: must be an integer >= 1 " \
           f"(log: {out / '.logs' / name}.txt)" in p.stdout
    assert "Traceback" not in p.stdout + p.stderr
    assert "sweep: 0/1 finished (failed 1)" in p.stdout


def test_run_without_ray_says_how_to_install_it(tmp_path):
    p = sweep(*run_args(tmp_path / "sweep", "gwt_ib", "0", 1024), no_ray=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("sweep.py run: error: Ray Tune is not installed")
    assert 'pip install "ray[tune]==2.60.0"' in p.stderr
    assert not list((tmp_path / "sweep").glob(f"{ENV}__*"))


@pytest.mark.parametrize("flag,value,says", [("--seeds", "0,x", "--seeds '0,x': must be integers"),
                                             ("--variants", "gwt_ib,nope", "--variants 'gwt_ib,nope': must be 'all'"),
                                             ("--cpus-per-trial", "0", "--cpus-per-trial 0: must be an integer >= 1"),
                                             ("--extra", "--seed 3", "must not set --seed")])
def test_run_bad_flag_exits_2_with_one_line(tmp_path, flag, value, says):
    p = sweep("run", "--out", str(tmp_path / "sweep"), flag, value, no_ray=True)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("sweep.py run: error: ") and says in line, line

"""plots/sweep.py: `run` on a real local Ray instance (a tiny sweep, then report; resume after the sweep is
killed mid-way), the settings check, run without Ray installed, bad flags."""
from __future__ import annotations

import csv
import fcntl
import importlib.util
import ipaddress
import json
import os
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


def sweep(*args, no_ray=False):
    pre = ["-c", NO_RAY] if no_ray else []
    return subprocess.run([sys.executable, *pre, str(SWEEP), *args], cwd=ROOT, capture_output=True, text=True, timeout=240)


def run_args(out, variants, seeds, steps, *more):
    return ["run", "--envs", ENV, "--variants", variants, "--seeds", seeds, "--total-timesteps", str(steps),
            "--out", str(out), "--verbose", "0", "--extra", TINY, *more]


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [pid] + [d for k in kids for d in tree(k)]


def listening(pids: list[int]) -> set[str]:
    """'address:port' of the TCP sockets these processes listen on, not on loopback only, read from /proc/net/tcp(6)."""
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            ip_hex, port = f[1].split(":")
            if f[3] != "0A" or f[9] not in inodes:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(ip_hex)  # 32-bit words in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            if not (ip.is_loopback or getattr(ip, "ipv4_mapped", None) and ip.ipv4_mapped.is_loopback):
                found.add(f"{'[' + str(ip) + ']' if ip.version == 6 else ip}:{int(port, 16)}")
    return found


def commands(out: Path, name: str) -> list[str]:
    """The trainer commands the sweep started for a run, from its log."""
    return [l for l in (out / ".logs" / f"{name}.txt").read_text().splitlines() if l.startswith("# ")]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.mark.slow
@needs_ray
def test_sweep_runs_every_run_as_a_ray_trial_then_report(tmp_path):
    """2 variants x 2 seeds on a local Ray instance: every run completes in its usual run dir with the variant's
    flags and one torch thread, its metrics rows reach Tune, one line per run; report reads the runs; the same
    command again does nothing (no Ray needed) and a settings change is refused before anything starts."""
    out = tmp_path / "sweep"
    args = run_args(out, "gwt_ib,no_gate", "0,1", 1024, "--num-cpus", "2")
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    exposed, raylet_env = set(), ""
    while proc.poll() is None:  # what Ray listens on while the sweep runs
        pids = tree(proc.pid)
        exposed |= listening(pids)
        for pid in pids:
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                    raylet_env = Path(f"/proc/{pid}/environ").read_text()
            except OSError:
                pass
        time.sleep(0.2)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, *proc.communicate())
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "0 already finished, 0 to resume, 4 to start" in p.stdout and "sweep: 4/4 finished;" in p.stdout
    # Ray 2.60 cannot be held to loopback: then the sweep says so, naming ports it really listens on, and its
    # services demand a token of this sweep's own
    note = [l for l in p.stdout.splitlines() if l.startswith("sweep: note: Ray listens beyond loopback, on ")]
    assert bool(note) == bool(exposed), (note, exposed)
    if note:
        named = set(note[0].split(", on ")[1].split(" (Ray")[0].split(", "))
        assert named and named <= exposed and "demand this sweep's random token" in note[0]
        assert "RAY_AUTH_MODE=token" in raylet_env and "RAY_AUTH_TOKEN=" in raylet_env
    (tune_dir,) = (out / ".tune").glob("sweep-*")
    for var, force in (("gwt_ib", None), ("no_gate", 1.0)):
        for seed in (0, 1):
            name = f"{ENV}__{var}__s{seed}"
            d = out / name
            s = summary(d)
            assert s["status"] == "completed" and s["env_steps"] == 1024
            cfg = json.loads((d / "config.json").read_text())
            assert cfg["force_c"] == force and cfg["seed"] == seed and cfg["hid_dim"] == 16
            assert not (d / "checkpoint.pt").exists() and (d / "model.pt").exists()
            (cmd,) = commands(out, name)
            assert f"{sys.executable} {ROOT / 'gwt_ib.py'} " in cmd and "--resume" not in cmd
            assert f"--out-dir {out} --run-name {name} --progress false --torch-threads 1 --device cpu" in cmd
            assert f"] {name}: completed in " in p.stdout
            with open(tune_dir / name / "progress.csv") as f:  # every metrics row reached Tune, in order
                tune_rows = list(csv.DictReader(f))
            assert [int(r["update"]) for r in tune_rows] == [r["update"] for r in metrics(d)] == list(range(1, 17))
            last = json.loads((tune_dir / name / "result.json").read_text().splitlines()[-1])
            assert last["status"] == "completed" and last["update"] == 16
            assert abs(last["final_eval"] - sum(e for _, e in s["evals"][-3:]) / 3) < 1e-9

    r = sweep("report", "--out", str(out), "--dest", str(tmp_path / "res"), no_ray=True)  # report needs no Ray
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "res" / "results.csv") as f:
        assert sorted((x["variant"], x["seed"], x["status"]) for x in csv.DictReader(f)) == [
            ("gwt_ib", "0", "completed"), ("gwt_ib", "1", "completed"), ("no_gate", "0", "completed"),
            ("no_gate", "1", "completed")]
    assert "| gwt_ib | 2 |" in (tmp_path / "res" / "results.md").read_text()

    again = sweep(*run_args(out, "gwt_ib,no_gate", "0,1", 1024), no_ray=True)
    assert again.returncode == 0 and "4 already finished" in again.stdout and "nothing to do" in again.stdout
    other = sweep(*run_args(out, "gwt_ib", "0", 2048), no_ray=True)
    assert other.returncode == 2 and other.stdout == ""
    (line,) = other.stderr.strip().splitlines()
    assert "1 existing run(s)" in line and "total_timesteps: run has 1024, requested 2048" in line


@pytest.mark.slow
@needs_ray
def test_sweep_killed_midway_resumes_with_the_same_command(tmp_path):
    """One trial at a time; the sweep gets SIGTERM once seed 0 has completed and seed 1 has a checkpoint: the
    trainer checkpoints and exits. The same command again skips seed 0 and resumes seed 1 with --resume; seed 1
    then completes with one row per update."""
    out, steps = tmp_path / "sweep", 4096
    args = run_args(out, "gwt_ib", "0,1", steps, "--num-cpus", "1")
    s0, s1 = out / f"{ENV}__gwt_ib__s0", out / f"{ENV}__gwt_ib__s1"
    proc = subprocess.Popen([sys.executable, str(SWEEP), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        t = time.monotonic()
        while not (s1 / "checkpoint.pt").exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() - t < 150, "seed 1 never wrote a checkpoint"
            time.sleep(0.1)
        proc.terminate()
        first = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "not finished: " + s1.name in first, first
    assert summary(s0)["status"] == "completed"
    assert summary(s1)["status"] == "interrupted" and summary(s1)["exit_code"] == 143  # SIGTERM reached it
    s0_summary = (s0 / "summary.json").read_bytes()
    assert metrics(s1)[-1]["update"] < steps // 64

    p = sweep(*args)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "1 already finished, 1 to resume, 0 to start" in p.stdout
    assert f"] {s1.name}: completed (resumed) in " in p.stdout and s0.name not in p.stdout
    assert (s0 / "summary.json").read_bytes() == s0_summary and len(commands(out, s0.name)) == 1  # not run again
    h = commands(out, s1.name)
    assert len(h) == 2 and "--resume" not in h[0]
    assert h[1].endswith(f"gwt_ib.py --resume {s1} --progress false --torch-threads 1 --device cpu")
    assert summary(s1)["status"] == "completed" and summary(s1)["env_steps"] == steps
    assert [r["update"] for r in metrics(s1)] == list(range(1, steps // 64 + 1))


def load_sweep():
    spec = importlib.util.spec_from_file_location("sweep", SWEEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_ray
def test_a_second_sweep_on_one_out_is_refused_before_it_touches_a_run(tmp_path):
    """While a sweep holds --out (its .sweep.lock), another one on the same --out exits 2 with one line naming the
    holder, and deletes or starts nothing (a run dir with no checkpoint would otherwise be made again)."""
    out = tmp_path / "sweep"
    half = out / f"{ENV}__gwt_ib__s0"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    with open(out / ".sweep.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("sweep pid 4242 on elsewhere since 2030-01-01 00:00:00\n")
        held.flush()
        p = sweep(*run_args(out, "gwt_ib", "0", 1024))
    assert p.returncode == 2
    (line,) = p.stderr.strip().splitlines()
    assert line == (f"sweep.py run: error: --out {out} is in use by sweep pid 4242 on elsewhere since 2030-01-01 "
                    "00:00:00; one sweep at a time may write it")
    assert sorted(x.name for x in out.iterdir()) == [".sweep.lock", half.name] and (half / "config.json").exists()


def test_a_trial_does_not_replace_a_run_directory_a_trainer_holds(tmp_path):
    """A trial whose run must start again (no checkpoint) while a trainer holds its run.lock: the trial fails with
    one line naming the holder, and the directory stays."""
    d = tmp_path / "run"
    d.mkdir()
    with open(d / "run.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 4242 on elsewhere since 2030-01-01 00:00:00\n")
        held.flush()
        rows = load_sweep().trainer_rows(dict(dir=str(d), cpus=1, argv=[], device="cpu", keep=False))
        with pytest.raises(RuntimeError, match="run: its run directory is in use by pid 4242 on elsewhere"):
            next(rows)
    assert (d / "run.lock").exists()


def test_run_without_ray_says_how_to_install_it(tmp_path):
    p = sweep(*run_args(tmp_path / "sweep", "gwt_ib", "0", 1024), no_ray=True)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1].startswith("sweep.py run: error: Ray Tune is not installed")
    assert 'pip install "ray[tune]==2.60.0"' in p.stderr
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("flag,value,says", [("--seeds", "0,x", "argument --seeds: '0,x': must be integers"),
                                             ("--variants", "gwt_ib,nope", "--variants: 'gwt_ib,nope': must be 'all'"),
                                             ("--cpus-per-trial", "0", "--cpus-per-trial: '0': must be an integer >= 1"),
                                             ("--extra", "--seed 3", "must not set --seed"),
                                             ("--extra", "--lr fast", "--lr 'fast': must be a number"),
                                             ("--extra", "--memory rnn", "--memory 'rnn': must be one of gru, lstm"),
                                             ("--extra", "--no-such-flag 1", "unrecognized arguments: --no-such-flag")])
def test_run_bad_flag_exits_2_with_one_line(tmp_path, flag, value, says):
    p = sweep("run", "--out", str(tmp_path / "sweep"), flag, value, no_ray=True)
    assert p.returncode == 2 and p.stdout == ""
    (line,) = p.stderr.strip().splitlines()
    assert line.startswith("sweep.py run: error: ") and says in line, line


def test_an_old_run_is_checked_against_every_trainer_setting_as_the_trainer_types_it(tmp_path):
    """A run dir's config.json is compared with the Cfg gwt_ib itself makes of the sweep's flags (its parser, types
    and defaults), every field: a default that differs is found, a value written another way ("1e-3") is not."""
    import dataclasses
    import gwt_ib
    sw = load_sweep()
    cfg, given = sw.trainer_flags(["--lr", "1e-3", "--memory", "lstm"])
    assert (cfg.lr, cfg.memory) == (0.001, "lstm") and given == {"lr", "memory"}
    assert dataclasses.replace(cfg, lr=gwt_ib.Cfg().lr, memory="gru") == gwt_ib.Cfg()  # the rest: the trainer's defaults
    saved = dataclasses.asdict(cfg)
    assert sw.same_value(saved["lr"], 0.001) and sw.same_value(1, 1.0) and not sw.same_value(True, 1)
    assert all(sw.same_value(saved[k], v) for k, v in dataclasses.asdict(cfg).items())
    assert not sw.same_value(saved["target_c"], 0.3) and not sw.same_value(None, 0.0)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({**saved, "target_c": 0.3, "device": "cuda"}))  # device: how, not what
    state, diff = sw.check_existing(run, cfg)
    assert state == "redo" and len(diff) == 1 and diff[0].startswith("target_c: run has 0.3, requested 0.35")

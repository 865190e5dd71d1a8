"""Runs you can trust with your data: the resume contract, one writer per run directory, faults that lose
nothing, checkpoints that load without running code, and evaluation that does not change training."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pickle
import random
import shutil
import stat
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import gymnasium
import numpy as np
import pytest
import torch

import gwt_ib
from conftest import ROOT, TINY_ARGS, WALL_KEYS, read_metrics, tiny_cfg

ARGS = TINY_ARGS + ["--cpu-kernel", "false", "--checkpoint-every", "1"]  # tiny_cfg as flags
EVAL_KEYS = ("eval", "eval_fresh")


# ----------------------------------------------------------------------------- test environments
class FaultEnv(gymnasium.Env):
    """Episodes of 8 steps. Counts the steps of all its instances in this process from the last one made (build()
    makes them all before the first step), and at step `at` does `fault`: raise, send itself a signal (twice for
    "SIGTERMx2"), sys.exit(0) ("exit"), os._exit(3) ("os_exit"), or return NaN rewards from then on. "init" and
    "reset" raise there instead; "init-SIGINT" sends SIGINT (twice: "init-SIGINTx2") as the first instances are
    made. With the tiny settings and 4 updates, steps 1-16 are the first evaluation, 17-80 update 1, 81-96 an
    evaluation, 97-160 update 2, ..., 257-320 update 4, 321-336 the final evaluation, then the end of the run:
    337-368 the gate effect's two greedy evaluations and 369-384 the greedy trace."""

    observation_space = gymnasium.spaces.Box(0.0, 8.0, (2,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)
    steps = inits = 0

    def __init__(self, fault: str, at: int = 0):
        if fault == "init":
            raise RuntimeError("no licence for this simulator")
        if fault.startswith("init-SIG"):
            FaultEnv.inits += 1
            if FaultEnv.inits <= 1 + fault.endswith("x2"):
                os.kill(os.getpid(), signal.SIGINT)
        self.fault, self.at, self.t = fault, at, 0
        FaultEnv.steps = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if self.fault == "reset":
            raise ConnectionError("simulator unreachable")
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        FaultEnv.steps += 1
        self.t += 1
        n, fault = FaultEnv.steps, self.fault
        if n == self.at and fault == "raise":
            raise RuntimeError("the sensor cable came loose")
        if n == self.at and fault == "exit":
            sys.exit(0)
        if n == self.at and fault == "os_exit":
            os._exit(3)
        if fault.startswith("SIG") and (n == self.at or (fault.endswith("x2") and n == self.at + 1)):
            os.kill(os.getpid(), getattr(signal, fault.removesuffix("x2")))
        reward = float("nan") if fault == "nan" and n >= self.at else float(action)
        return np.array([self.t, action], np.float32), reward, self.t >= 8, False, {}


class GlobalRngEnv(gymnasium.Env):
    """Observations drawn from Python's and numpy's global generators, both reseeded when reset with a seed (as
    POPGym's mazes do): an evaluation that resets with fixed seeds would replay them in training."""

    observation_space = gymnasium.spaces.Box(0.0, 1.0, (2,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        if seed is not None:
            random.seed(seed)
            np.random.seed(seed)
        self.t = 0
        return self._obs(), {}

    def _obs(self):
        return np.array([random.random(), np.random.random()], np.float32)

    def step(self, action):
        self.t += 1
        obs = self._obs()
        return obs, float(obs[int(action)] > 0.5), self.t >= 8, False, {}


def fault_env(fault: str, at: int = 0) -> str:
    env_id = f"gwtib-test-Fault-{fault}-{at}-v0"
    if env_id not in gymnasium.registry:
        gymnasium.register(env_id, entry_point=FaultEnv, kwargs=dict(fault=fault, at=at))
    return env_id


GLOBAL_RNG_ID = "gwtib-test-GlobalRng-v0"
if GLOBAL_RNG_ID not in gymnasium.registry:
    gymnasium.register(GLOBAL_RNG_ID, entry_point=GlobalRngEnv)


# ----------------------------------------------------------------------------- helpers
def snapshot(root: Path) -> dict:
    """Every file under root with the SHA-256 of its bytes, every directory as "dir"."""
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def checkpoint_update(run: Path) -> Optional[int]:
    """The update of run/checkpoint.pt, loaded as the trainer loads it (no code runs), or None if there is none."""
    if not (run / "checkpoint.pt").exists():
        return None
    return torch.load(run / "checkpoint.pt", weights_only=True)["state"]["update"]


def message_lines(err: str) -> list[str]:
    """stderr's lines, less the notice printed the moment a signal arrives ("[SIGTERM] stopping after ...")."""
    return [l for l in err.splitlines() if l.strip() and not l.startswith("[SIG")]


def training_rows(run) -> list[dict]:
    return read_metrics(run, drop=WALL_KEYS + EVAL_KEYS)


def assert_same_model(a: Path, b: Path) -> None:
    sa, sb = (torch.load(Path(r) / "model.pt", weights_only=True) for r in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Two finished runs to copy: "halted" after 2 of 4 updates, and "completed" (4 of 4)."""
    out = tmp_path_factory.mktemp("base")
    cfg = tiny_cfg(out, total_timesteps=256)
    return {"halted": Path(gwt_ib.train(dataclasses.replace(cfg, run_name="halted", halt_after=2))["run_dir"]),
            "completed": Path(gwt_ib.train(dataclasses.replace(cfg, run_name="completed"))["run_dir"])}


def edit_config(**kw) -> Callable:
    def edit(run: Path, tmp: Path):
        cfg = json.loads((run / "config.json").read_text())
        (run / "config.json").write_text(json.dumps({**cfg, **kw}))
    return edit


def write_file(name: str, data: Callable[[bytes], bytes]) -> Callable:
    def write(run: Path, tmp: Path):
        (run / name).write_bytes(data((run / name).read_bytes()))
    return write


class Payload:
    """Unpickling it runs code: it creates the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def edit_checkpoint(edit: Callable) -> Callable:
    """Change a field of checkpoint.pt, which still loads with weights_only=True: edit(ck) -> None."""
    def damage(run: Path, tmp: Path):
        ck = torch.load(run / "checkpoint.pt", weights_only=True)
        edit(ck)
        torch.save(ck, run / "checkpoint.pt")
    return damage


def evil_pickle(tmp: Path) -> Path:
    """A pickle outside the run whose unpickling creates tmp/pwned."""
    (tmp / "evil.pkl").write_bytes(pickle.dumps(Payload(tmp / "pwned")))
    return tmp / "evil.pkl"


def envs_named(name: Callable) -> Callable:
    """The checkpoint names another env-state file, name(tmp), a pickle that runs code, as its env state."""
    def damage(run: Path, tmp: Path):
        evil_pickle(tmp)
        shutil.copy(tmp / "evil.pkl", run.parent / "sibling.pkl")
        edit_checkpoint(lambda ck: ck.update(envs=name(tmp)))(run, tmp)
    return damage


def linked(name: str, hard: bool = False, outside: Optional[Callable] = None) -> Callable:
    """run/name replaced by a symlink (or hard link) to a file outside the run: a copy of it, or outside(tmp)."""
    def damage(run: Path, tmp: Path):
        target = outside(tmp) if outside else tmp / f"outside-{name}"
        if not outside:
            shutil.copy(run / name, target)
        (run / name).unlink(missing_ok=True)
        os.link(target, run / name) if hard else (run / name).symlink_to(target)
    return damage


def precious(tmp: Path) -> Path:
    (tmp / "precious.txt").write_text("a file of the user's, outside the run\n")
    return tmp / "precious.txt"


def in_update(ck: dict, key: str, value) -> None:
    ck["state"][key] = value


def fail_on_second(name: str, error: BaseException) -> Callable:
    """gwt_ib.<name> raises `error` on its second call (update 2)."""
    def patch(monkeypatch):
        real, calls = getattr(gwt_ib, name), []

        def fn(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise error
            return real(*a, **k)
        monkeypatch.setattr(gwt_ib, name, fn)
    return patch


def signal_after(name: str, sig: int = signal.SIGINT) -> Callable:
    """gwt_ib.<name> sends this process `sig` once it has returned."""
    def patch(monkeypatch):
        real = getattr(gwt_ib, name)

        def fn(*a, **k):
            out = real(*a, **k)
            os.kill(os.getpid(), sig)
            return out
        monkeypatch.setattr(gwt_ib, name, fn)
    return patch


def crafted_checkpoint(run: Path, tmp: Path):
    torch.save({"agent": Payload(tmp / "pwned")}, run / "checkpoint.pt")


def held_by_another_writer(run: Path, tmp: Path):
    f = open(run / "run.lock", "a+")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this open file is another holder than the one main() opens
    f.write("pid 4242 on elsewhere since 2030-01-01 00:00:00\n")
    f.flush()
    return f  # held until the case is done


def disk_full(name: str, nth: int = 1, on: bool = False) -> Callable:
    """The nth <name>.tmp fails to reach the disk (ENOSPC at fsync, where delayed writes fail); on: and every file
    written after it (a disk that stays full)."""
    def patch(monkeypatch):
        real, seen = os.fsync, []

        def fsync(fd):
            if os.readlink(f"/proc/self/fd/{fd}").endswith(f"{name}.tmp") or seen and on:
                seen.append(fd)
                if len(seen) >= nth:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)
        monkeypatch.setattr(os, "fsync", fsync)
    return patch


disk_full_at_second_checkpoint = disk_full("checkpoint.pt", 2)


# ----------------------------------------------------------------------------- hostile cases
@dataclasses.dataclass
class Case:
    argv: list  # {run}: a copy of `base` (damaged by `damage`), {tmp}: the test's directory; new runs go to {tmp}/out
    status: int  # exit status
    line: str  # the one line on stderr (on stdout for exit 0) contains this
    kept: object = "same"  # "same": every file as before, nothing new; else (summary status, checkpoint update)
    base: str = "halted"
    damage: Optional[Callable] = None  # (run, tmp) -> None, or something to keep open during the call
    patch: Optional[Callable] = None  # (monkeypatch) -> None


FRESH = ARGS + ["--total-timesteps", "256", "--out-dir", "{tmp}/out"]
CPUS = os.cpu_count()
MANY = 4 * CPUS + 2  # env processes: more than 4 per CPU
OOM = ("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried to allocate "
       "140737488355328 bytes. Error code 12 (Cannot allocate memory)")  # torch's words
RESUME = ["--resume", "{run}"]
CHANGE = "cannot change when resuming"
NOT_LOADED = "its checkpoint does not load"
HOSTILE = {
    # resuming with a setting the resume contract does not allow
    "resume-num-envs": Case(RESUME + ["--num-envs", "8", "--total-timesteps", "8192"], 2, f"--num-envs 8: {CHANGE}"),
    "resume-hid-dim": Case(RESUME + ["--hid-dim", "32"], 2, f"--hid-dim 32: {CHANGE} (the run has 16)"),
    "resume-env-id": Case(RESUME + ["--env-id", "CartPole-v1"], 2, f"--env-id 'CartPole-v1': {CHANGE}"),
    "resume-seed": Case(RESUME + ["--seed", "1"], 2, f"--seed 1: {CHANGE}"),
    "resume-run-name": Case(RESUME + ["--run-name", "other"], 2, f"--run-name 'other': {CHANGE}"),
    "resume-out-dir": Case(RESUME + ["--out-dir", "{tmp}/elsewhere"], 2, CHANGE),
    "resume-rollout-steps": Case(RESUME + ["--rollout-steps", "64"], 2, f"--rollout-steps 64: {CHANGE}"),
    "resume-lr": Case(RESUME + ["--lr", "0.001"], 2, f"--lr 0.001: {CHANGE}"),
    "resume-shrink": Case(RESUME + ["--total-timesteps", "128"], 2, f"--total-timesteps 128: {CHANGE} (the run has "
                          "256); a resume may change only --total-timesteps (to grow it, without anneal_lr"),
    "resume-extend-annealed": Case(RESUME + ["--total-timesteps", "1024"], 2, f"--total-timesteps 1024: {CHANGE}",
                                   damage=edit_config(anneal_lr=True)),
    # run directories that are not, or not any more, what they claim
    "resume-missing": Case(["--resume", "{tmp}/missing"], 2, "must be a run directory with config.json and checkpoint"),
    "checkpoint-truncated": Case(RESUME, 2, NOT_LOADED, damage=write_file("checkpoint.pt", lambda b: b[:len(b) // 2])),
    "checkpoint-empty": Case(RESUME, 2, NOT_LOADED, damage=write_file("checkpoint.pt", lambda b: b"")),
    "checkpoint-garbage": Case(RESUME, 2, NOT_LOADED, damage=write_file("checkpoint.pt", lambda b: os.urandom(999))),
    "checkpoint-runs-code": Case(RESUME, 2, "Unsupported global", damage=crafted_checkpoint),
    "config-garbage": Case(RESUME, 2, "config.json and checkpoint.pt (JSONDecodeError",
                           damage=write_file("config.json", lambda b: b[:20])),
    "config-bad-value": Case(RESUME, 2, "--lr -1: must be >= 0", damage=edit_config(lr=-1)),
    "config-other-model": Case(RESUME, 2, "size mismatch", damage=edit_config(hid_dim=32)),
    "run-in-use": Case(RESUME, 2, "is in use by pid 4242 on elsewhere", damage=held_by_another_writer),
    "resume-empty": Case(["--resume", ""], 2, "--resume '': must be a run directory"),
    # a checkpoint that loads without running code, but whose fields are not what this run needs
    "checkpoint-envs-outside": Case(RESUME, 2, "envs is '../sibling.pkl', must be None or 'envs-2.pkl'",
                                    damage=envs_named(lambda tmp: "../sibling.pkl")),
    "checkpoint-envs-absolute": Case(RESUME, 2, "/evil.pkl', must be None or 'envs-2.pkl'",
                                     damage=envs_named(lambda tmp: str(tmp / "evil.pkl"))),
    "checkpoint-update-negative": Case(RESUME, 2, "state.update is -1, must be an integer in 1..4",
                                       damage=edit_checkpoint(lambda ck: in_update(ck, "update", -1))),
    "checkpoint-update-beyond": Case(RESUME, 2, "state.update is 99, must be an integer in 1..4",
                                     damage=edit_checkpoint(lambda ck: in_update(ck, "update", 99))),
    "checkpoint-update-a-string": Case(RESUME, 2, "state.update is '2', must be an integer",
                                       damage=edit_checkpoint(lambda ck: in_update(ck, "update", "2"))),
    "checkpoint-steps-inconsistent": Case(RESUME, 2, "state.env_steps is 5, must be update*num_envs*rollout_steps = 128",
                                          damage=edit_checkpoint(lambda ck: in_update(ck, "env_steps", 5))),
    "checkpoint-evals-wrong-type": Case(RESUME, 2, "state.evals is a dict of a, must be a list of (update in 0..2",
                                        damage=edit_checkpoint(lambda ck: in_update(ck, "evals", {"a": 1}))),
    "checkpoint-no-state": Case(RESUME, 2, "the checkpoint is", damage=edit_checkpoint(lambda ck: ck.pop("state"))),
    "checkpoint-collector-shape": Case(RESUME, 2, "collector.h is a float32 tensor of shape (3, 16), must be a "
                                       "finite float32 tensor of shape (2, 16)",
                                       damage=edit_checkpoint(lambda ck: ck["collector"].update(h=torch.zeros(3, 16)))),
    "checkpoint-norm-extra-key": Case(RESUME, 2, "norm is a dict of mean, var, scale, count, window, wpos, wfill, cfg",
                                      damage=edit_checkpoint(lambda ck: ck["norm"].update(cfg=1))),
    "checkpoint-norm-nan": Case(RESUME, 2, "norm.mean is a float32 tensor of shape (), must be a finite",
                                damage=edit_checkpoint(lambda ck: ck["norm"].update(mean=torch.tensor(float("nan"))))),
    "checkpoint-norm-position": Case(RESUME, 2, "norm.wpos is 5000, must be < td_window (4096)",
                                     damage=edit_checkpoint(lambda ck: ck["norm"].update(wpos=5000))),
    "checkpoint-agent-nan": Case(RESUME, 2, "agent.bias is a float32 tensor of shape (1,), must be a finite",
                                 damage=edit_checkpoint(lambda ck: ck["agent"].update(bias=torch.tensor([float("nan")])))),
    "checkpoint-moment-shape": Case(RESUME, 2, "opt.state.exp_avg is a float32 tensor of shape (7,), must be a finite",
                                    damage=edit_checkpoint(lambda ck: ck["opt"]["state"][0].update(exp_avg=torch.zeros(7)))),
    "checkpoint-lr": Case(RESUME, 2, "opt.lr is 'fast', must be a number >= 0",
                          damage=edit_checkpoint(lambda ck: ck["opt"]["param_groups"][0].update(lr="fast"))),
    "checkpoint-rng": Case(RESUME, 2, f"{NOT_LOADED} (ValueError: state with version x passed to Random.setstate()",
                           damage=edit_checkpoint(lambda ck: ck["rng"].update(python="x"))),
    # run files that are links: never read, written or truncated through
    "checkpoint-symlink": Case(RESUME, 2, "checkpoint.pt is a link or not a regular file", damage=linked("checkpoint.pt")),
    "config-symlink": Case(RESUME, 2, "config.json is a link or not a regular file", damage=linked("config.json")),
    "envs-state-symlink": Case(RESUME, 2, "envs-2.pkl is a link", damage=linked("envs-2.pkl", outside=evil_pickle)),
    "metrics-symlink": Case(RESUME, 2, "metrics.jsonl cannot be read (OSError: metrics.jsonl is a link",
                            damage=linked("metrics.jsonl")),
    "metrics-hard-link": Case(RESUME, 2, "metrics.jsonl is a link", damage=linked("metrics.jsonl", hard=True)),
    "run-lock-symlink": Case(RESUME, 2, "cannot hold its run.lock (OSError: run.lock is a link",
                             damage=linked("run.lock", outside=precious)),
    "run-lock-hard-link": Case(RESUME, 2, "run.lock is a link", damage=linked("run.lock", hard=True, outside=precious)),
    "run-lock-symlink-complete": Case(RESUME, 2, "run.lock is a link", base="completed",
                                      damage=linked("run.lock", outside=precious)),
    "run-lock-symlink-refused": Case(RESUME + ["--hid-dim", "32"], 2, CHANGE, damage=linked("run.lock", outside=precious)),
    # a completed run: nothing to do, nothing written
    "resume-completed": Case(RESUME, 0, "is complete (4 updates); nothing was changed", base="completed"),
    "resume-completed-halt": Case(RESUME + ["--halt-after", "1"], 0, "is complete", base="completed"),
    # bad values and paths before a new run
    "seed-too-large": Case(FRESH + ["--seed", "4294967296"], 2, "--seed 4294967296: must be an integer >= 0 and < 2**"),
    "seed-negative": Case(FRESH + ["--seed", "-1"], 2, "--seed -1: must be an integer >= 0"),
    "out-dir-is-a-file": Case(FRESH + ["--out-dir", "{run}/config.json"], 2, "FileExistsError"),
    "out-dir-not-writable": Case(FRESH + ["--out-dir", "/sys/gwt-ib-test"], 2, "cannot hold a new run directory"),
    "run-name-too-long": Case(FRESH + ["--run-name", "x" * 300], 2, "must be a plain directory name"),
    "out-dir-name-too-long": Case(FRESH + ["--out-dir", "{tmp}/" + "y" * 300], 2, "File name too long"),
    "model-too-large": Case(FRESH + ["--hid-dim", str(10 ** 18)], 2, "--hid-dim 1000000000000000000: is too large"),
    "window-too-large": Case(FRESH + ["--td-window", str(10 ** 12)], 2, "--td-window 1000000000000: is too large"),
    "lr-nan": Case(FRESH + ["--lr", "nan"], 2, "--lr nan: must be finite"),
    "no-such-env": Case(FRESH + ["--env-id", "NoSuchEnv-v9"], 2, "is not a registered gymnasium id"),
    "env-fails-to-start": Case(FRESH + ["--env-id", fault_env("init")], 2, "no licence for this simulator"),
    "env-fails-to-reset": Case(FRESH + ["--env-id", fault_env("reset")], 2, "ConnectionError: simulator unreachable"),
    # settings that would take the machine down
    "torch-threads-huge": Case(FRESH + ["--torch-threads", "100000"], 2,
                               f"--torch-threads 100000: must be <= the number of CPUs here ({CPUS})"),
    "env-workers-huge": Case(FRESH + ["--num-envs", str(MANY), "--env-workers", str(MANY), "--total-timesteps", "10000000"],
                             2, f"--env-workers {MANY}: makes too many env processes: at most 4 per CPU"),
    "async-envs-huge": Case(FRESH + ["--num-envs", str(MANY), "--async-envs", "true", "--total-timesteps", "10000000"], 2,
                            f"--num-envs {MANY}: makes too many env processes"),
    "rollout-too-large": Case(FRESH + ["--rollout-steps", str(2 ** 40), "--total-timesteps", str(2 ** 42)], 2,
                              f"--rollout-steps {2 ** 40}: is too large: a rollout needs at least"),
    # stopped or failing before training: nothing written (no run directory, no out dir)
    "sigint-at-start-up": Case(FRESH + ["--env-id", fault_env("init-SIGINT")], 130,
                               "interrupted: stopped by SIGINT before training started; nothing was written"),
    "sigint-twice-at-start-up": Case(FRESH + ["--env-id", fault_env("init-SIGINTx2")], 130,
                                     "interrupted: stopped by SIGINT before training started; nothing was written"),
    "sigint-after-the-run-dir-is-made": Case(FRESH, 130, "[SIGINT] stopping after this update", kept=("interrupted", 1),
                                             patch=signal_after("start_run")),
    "disk-full-at-start-up": Case(FRESH, 2, "cannot hold a new run directory (OSError: [Errno 28] No space left on "
                                            "device)", patch=disk_full("config.json")),
    # faults during training: the last good checkpoint stays, summary.json says what happened
    "env-raises": Case(FRESH + ["--env-id", fault_env("raise", 120)], 4,
                       "env_error: the environment raised RuntimeError: the sensor cable came loose; kept the "
                       "checkpoint of update 1", kept=("env_error", 1)),
    "env-raises-at-once": Case(FRESH + ["--env-id", fault_env("raise", 20)], 4, "no checkpoint had been written yet",
                               kept=("env_error", None)),
    "sigterm": Case(FRESH + ["--env-id", fault_env("SIGTERM", 120)], 143, "[SIGTERM] stopping after this update",
                    kept=("interrupted", 2)),
    "sighup": Case(FRESH + ["--env-id", fault_env("SIGHUP", 120)], 129, "[SIGHUP] stopping after this update",
                   kept=("interrupted", 2)),
    "sigint": Case(FRESH + ["--env-id", fault_env("SIGINT", 120)], 130, "[SIGINT] stopping after this update",
                   kept=("interrupted", 2)),
    "sigterm-twice": Case(FRESH + ["--env-id", fault_env("SIGTERMx2", 120)], 143,
                          "interrupted: a second signal abandoned the update in progress; kept the checkpoint of "
                          "update 1", kept=("interrupted", 1)),
    "sigterm-twice-at-once": Case(FRESH + ["--env-id", fault_env("SIGTERMx2", 20)], 143,
                                  "no checkpoint had been written yet", kept=("interrupted", None)),
    "diverges": Case(FRESH + ["--env-id", fault_env("nan", 120)], 3, "diverged: update 2: TD mean is not finite",
                     kept=("diverged", 1)),
    "diverges-at-once": Case(FRESH + ["--env-id", fault_env("nan", 20)], 3, "no checkpoint had been written yet",
                             kept=("diverged", None)),
    "disk-full": Case(FRESH, 5, "io_error: OSError: [Errno 28] No space left on device; kept the checkpoint of "
                                "update 1", kept=("io_error", 1), patch=disk_full_at_second_checkpoint),
    "env-exits": Case(FRESH + ["--env-id", fault_env("exit", 120)], 4, "env_error: the environment raised SystemExit: 0; "
                      "kept the checkpoint of update 1", kept=("env_error", 1)),
    "worker-env-raises": Case(FRESH + ["--env-id", fault_env("raise", 40), "--env-workers", "2"], 4,
                              "env_error: the environment raised RuntimeError: the sensor cable came loose; kept the "
                              "checkpoint of update 1", kept=("env_error", 1)),
    "worker-env-exits": Case(FRESH + ["--env-id", fault_env("exit", 40), "--env-workers", "2"], 4,
                             "env_error: the environment raised SystemExit: 0; kept the checkpoint of update 1",
                             kept=("env_error", 1)),
    "worker-dies": Case(FRESH + ["--env-id", fault_env("os_exit", 40), "--env-workers", "2"], 4,
                        "env_error: env worker 0 (pid ", kept=("env_error", 1)),
    "out-of-memory": Case(FRESH, 6, "out_of_memory: RuntimeError: can't allocate memory: you tried to allocate "
                          "140737488355328 bytes; kept the checkpoint of update 1", kept=("out_of_memory", 1),
                          patch=fail_on_second("rollout", RuntimeError(OOM))),
    "memory-error": Case(FRESH, 6, "out_of_memory: MemoryError; kept the checkpoint of update 1",
                         kept=("out_of_memory", 1), patch=fail_on_second("ppo_update", MemoryError())),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_case_exits_with_one_line_and_loses_nothing(name, runs, tmp_path, capsys, monkeypatch):
    """Each case exits with its documented status and one line (no traceback). A refused case leaves every file
    byte for byte and creates nothing; a fault during training keeps the last good checkpoint (it loads without
    running code), summary.json records the status, no .tmp is left, and a resume hint is printed exactly when
    the run can be resumed from a checkpoint."""
    case = HOSTILE[name]
    run = tmp_path / "run"
    shutil.copytree(runs[case.base], run)
    held = case.damage(run, tmp_path) if case.damage else None
    if case.patch:
        case.patch(monkeypatch)
    before = snapshot(tmp_path)
    FaultEnv.inits = 0
    old = {sig: signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
           for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}  # as a shell's background job may not have them
    try:
        status = gwt_ib.main([a.format(run=run, tmp=tmp_path) for a in case.argv])
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if held:
            held.close()
    out, err = capsys.readouterr()
    assert status == case.status, err
    assert "Traceback" not in out + err
    lines = [l for l in (err if status else out + err).splitlines() if l.strip()]
    if len(lines) == 2 and lines[0].startswith("[SIG"):  # the notice of a first signal, then what the second did
        lines = lines[1:]
    assert len(lines) == 1 and case.line in lines[0], out[-2000:] + err
    if case.kept == "same":
        assert snapshot(tmp_path) == before  # also: no file made by a crafted checkpoint's code
        return
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out")} == before
    new, = (tmp_path / "out").iterdir()
    summary = json.loads((new / "summary.json").read_text())
    assert (summary["status"], checkpoint_update(new)) == case.kept
    assert summary["exit_code"] == status and summary["message"]
    assert not list(new.glob("*.tmp"))
    assert len(read_metrics(new)) >= (checkpoint_update(new) or 0)
    resumable = case.kept[1] is not None and case.kept[0] != "diverged"
    assert ("resume with: python gwt_ib.py --resume" in out) == resumable


def test_a_resume_after_a_full_disk_reaches_the_uninterrupted_run(runs, tmp_path, capsys, monkeypatch):
    """A checkpoint that could not be written (ENOSPC) costs nothing: the previous one, resumed, gives the same
    metrics and model as a run that never failed; the rows logged after it are dropped with a one-line note."""
    disk_full_at_second_checkpoint(monkeypatch)
    assert gwt_ib.main(FRESH + ["--out-dir", str(tmp_path / "out")]) == 5
    monkeypatch.undo()
    run, = (tmp_path / "out").iterdir()
    assert [r["update"] for r in read_metrics(run)] == [1, 2]  # update 2 was logged, its checkpoint failed
    capsys.readouterr()
    assert gwt_ib.main(["--resume", str(run)]) == 0
    assert message_lines(capsys.readouterr().err) == ["note: dropped 1 line(s) of metrics.jsonl: 1 logged after the "
                                                      "checkpoint (update 1)"]
    assert read_metrics(run) == read_metrics(runs["completed"])
    assert_same_model(run, runs["completed"])


# ----------------------------------------------------------------------------- the resume contract
def test_halt_after_holds_for_one_invocation_only(tmp_path):
    """halt_after is never saved to config.json: a later plain resume runs to the end."""
    cfg = tiny_cfg(tmp_path, total_timesteps=256, halt_after=1)
    s = gwt_ib.train(cfg)
    run = Path(s["run_dir"])
    assert s["status"] == "halted" and json.loads((run / "config.json").read_text())["halt_after"] == 0
    assert gwt_ib.main(["--resume", str(run), "--halt-after", "1"]) == 0
    assert json.loads((run / "summary.json").read_text())["updates"] == 2
    assert json.loads((run / "config.json").read_text())["halt_after"] == 0
    assert gwt_ib.main(["--resume", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert [r["update"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_every_allowed_resume_setting_leaves_the_training_unchanged(runs, tmp_path):
    """The settings a resume may change (all but cpu_kernel here, which changes rounding) change how the rest of
    the run is shown, saved and evaluated, not what it trains: the training metrics and the model are those of
    the uninterrupted run, and config.json still holds the run's own settings."""
    run = tmp_path / "run"
    shutil.copytree(runs["halted"], run)
    saved = (run / "config.json").read_bytes()
    assert gwt_ib.main(["--resume", str(run), "--device", "cpu", "--torch-threads", "1", "--progress", "false",
                        "--log-every", "3", "--save-plot", "true", "--checkpoint-every", "3", "--eval-every", "0",
                        "--eval-episodes", "3", "--halt-after", "0"]) == 0
    assert training_rows(run) == training_rows(runs["completed"])
    assert_same_model(run, runs["completed"])
    assert (run / "config.json").read_bytes() == saved and (run / "training.png").is_file()


def test_a_larger_total_extends_a_completed_run_as_if_it_had_been_asked_for_at_the_start(runs, tmp_path):
    """--total-timesteps beyond a completed run's continues it: the training is that of a run started with the
    larger total (its evaluations differ: the shorter run evaluated at its end), and config.json keeps it."""
    run = tmp_path / "run"
    shutil.copytree(runs["completed"], run)
    assert gwt_ib.main(["--resume", str(run), "--total-timesteps", "384"]) == 0
    longer = gwt_ib.train(tiny_cfg(tmp_path, total_timesteps=384))
    assert training_rows(run) == training_rows(longer["run_dir"])
    assert json.loads((run / "config.json").read_text())["total_timesteps"] == 384
    assert json.loads((run / "summary.json").read_text())["updates"] == 6


def test_resume_drops_a_torn_last_metrics_line(runs, tmp_path, capsys):
    """A row cut short by a kill mid-write is dropped with one note; the run then ends as if nothing happened."""
    run = tmp_path / "run"
    shutil.copytree(runs["halted"], run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"update": 3, "env_steps": 192, "loss": 0.1')
    assert gwt_ib.main(["--resume", str(run)]) == 0
    assert message_lines(capsys.readouterr().err) == ["note: dropped 1 line(s) of metrics.jsonl: 1 cut short or not "
                                                      "a row in order"]
    assert read_metrics(run) == read_metrics(runs["completed"])


# ----------------------------------------------------------------------------- one writer per run directory
def test_runs_racing_for_one_name_each_get_their_own_directory(tmp_path):
    """Directories are created by os.mkdir, not checked then created: 8 threads making 5 runs each at the same
    moment, with one run_name and with the automatic name, get 40 distinct new directories."""
    for name in ("race", ""):
        cfg, made, start = tiny_cfg(tmp_path / name, run_name=name), [], threading.Barrier(8)

        def make():
            start.wait()
            made.extend(gwt_ib.new_run_dir(cfg) for _ in range(5))
        threads = [threading.Thread(target=make) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(made)) == 40 and all(d.is_dir() and not any(d.iterdir()) for d in made)


def test_a_running_run_refuses_a_second_writer_and_sighup_stops_it_resumably(tmp_path, capsys):
    """While a run trains, its directory is locked: --resume of it exits 2 naming the process that holds it.
    SIGHUP (a closed terminal) stops the run like SIGTERM: checkpoint, summary.json, exit 129, a resume hint
    that works."""
    out, log = tmp_path / "runs", tmp_path / "log.txt"
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, "gwt_ib.py", *ARGS, "--total-timesteps", "10000000", "--eval-every",
                              "1000", "--out-dir", str(out), "--run-name", "held"], cwd=ROOT, stdout=f,
                             stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    run = out / "held"
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoint.pt").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (run / "checkpoint.pt").exists(), log.read_text()[-3000:]
        holder = (run / "run.lock").read_text()
        assert gwt_ib.main(["--resume", str(run)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and f"is in use by pid {p.pid} on " in err
        assert (run / "run.lock").read_text() == holder
        p.send_signal(signal.SIGHUP)
        assert p.wait(timeout=120) == 129
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["message"]) == ("interrupted", "stopped by SIGHUP")
    assert checkpoint_update(run) == summary["updates"] == len(read_metrics(run))
    assert f"resume with: python gwt_ib.py --resume {run}" in log.read_text()
    assert (run / "run.lock").read_text() == ""  # the holder's name goes with it
    assert gwt_ib.main(["--resume", str(run), "--halt-after", "1"]) == 0
    assert json.loads((run / "summary.json").read_text())["updates"] == summary["updates"] + 1


def test_a_run_under_nohup_ignores_sighup(tmp_path):
    """A SIGHUP that was ignored when the run started (nohup) stays ignored: the run goes on to the end."""
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        s = gwt_ib.train(tiny_cfg(tmp_path, env_id=fault_env("SIGHUP", 120), total_timesteps=256))
    finally:
        signal.signal(signal.SIGHUP, old)
    assert s["status"] == "completed" and s["updates"] == 4


# ----------------------------------------------------------------------------- safe loading
def test_checkpoint_holds_only_tensors_and_plain_types(runs):
    """checkpoint.pt loads with torch.load(weights_only=True): no pickled code in it. The env state that only
    pickle can store is in the one envs-<update>.pkl file it names."""
    ck = torch.load(runs["halted"] / "checkpoint.pt", weights_only=True)
    assert ck["state"]["update"] == 2 and ck["envs"] == "envs-2.pkl"
    assert sorted(p.name for p in runs["halted"].glob("envs-*")) == ["envs-2.pkl"]
    assert isinstance(ck["rng"]["torch"], torch.Tensor) and ck["rng"]["torch"].device.type == "cpu"


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_does_not_change_training(tmp_path):
    """An env that reseeds Python's and numpy's global generators on reset (evaluation resets with fixed seeds):
    evaluating after every update (eval_every 1) or only before and after training (eval_every 0) gives the same
    training metrics and the same model."""
    cfg = tiny_cfg(tmp_path, env_id=GLOBAL_RNG_ID, total_timesteps=256)
    every = gwt_ib.train(dataclasses.replace(cfg, eval_every=1))
    ends = gwt_ib.train(dataclasses.replace(cfg, eval_every=0))
    assert len(every["evals"]) == 5 and len(ends["evals"]) == 2
    assert training_rows(every["run_dir"]) == training_rows(ends["run_dir"])
    assert_same_model(every["run_dir"], ends["run_dir"])


# ----------------------------------------------------------------------------- the end of a run
def fresh(tmp: Path, *more: str, out: str = "out") -> list:
    """FRESH's flags for a new run in tmp/out."""
    return [a.format(tmp=tmp) for a in FRESH[:-1]] + [str(tmp / out), *more]


def reference_run(tmp_path: Path, env_id: str) -> Path:
    """The uninterrupted run of FRESH on env_id."""
    assert gwt_ib.main(fresh(tmp_path, "--env-id", env_id, out="reference")) == 0
    run, = (tmp_path / "reference").iterdir()
    return run


def assert_same_results(run: Path, ref: Path) -> None:
    """The same training, model and results (summary less timings, GateCheck samples, the greedy trace)."""
    assert training_rows(run) == training_rows(ref)
    assert_same_model(run, ref)
    timing = ("run_dir", "steps_per_s", "wall_s", "env_id")  # env_id: the same env under another name
    a, b = ({k: v for k, v in json.loads((r / "summary.json").read_text()).items() if k not in timing}
            for r in (run, ref))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)  # NaN == NaN here
    assert (run / "eval_trace.json").read_text() == (ref / "eval_trace.json").read_text()
    ga, gb = (np.load(r / "gate_samples.npz") for r in (run, ref))
    assert ga.files == gb.files and all(np.array_equal(ga[k], gb[k]) for k in ga.files)


END_FAULTS = {  # how the end of a run fails: (env fault, patch) -> exit status, the line, the checkpoint kept
    "second-signal-in-the-end": (("SIGTERMx2", 340), None, 143, "interrupted: stopped by SIGTERM while writing the end "
                                 "of the run; kept the checkpoint of update 4 in {run}, which has trained to its end: "
                                 "--resume writes its results", 4),
    "disk-full-at-the-model": (None, disk_full("model.pt"), 5, "io_error: OSError: [Errno 28] No space left on device "
                               "while writing the end of the run; kept the checkpoint of update 4 in {run}, which has "
                               "trained to its end: --resume writes its results", 4),
    "disk-full-at-the-summary": (None, disk_full("summary.json"), 5, "io_error: OSError: [Errno 28] No space left on "
                                 "device while writing the end of the run; kept the checkpoint of update 4 in {run}, "
                                 "which has trained to its end: --resume writes its results", 4),
    "disk-full-after-the-first-checkpoint": (None, disk_full("checkpoint.pt", 2, on=True), 5, "io_error: OSError: "
                                             "[Errno 28] No space left on device; kept the checkpoint of update 1 in "
                                             "{run}; the end of the run (summary.json) was not written (io_error: "
                                             "OSError: [Errno 28] No space left on device)", 1),
}


@pytest.mark.parametrize("name", END_FAULTS)
def test_a_run_whose_end_fails_keeps_its_results_for_resume(name, tmp_path, capsys, monkeypatch):
    """A second signal or a full disk while the end of a run is written (model.pt, GateCheck, summary.json): one line
    that says what was kept and that --resume writes the results, a resume hint; the resume then writes the results of
    the uninterrupted run (or trains on to them), and says so."""
    env, patch, code, line, kept = END_FAULTS[name]
    env_id = fault_env(*env) if env else fault_env("none")
    ref = reference_run(tmp_path, fault_env("none"))
    capsys.readouterr()
    if patch:
        patch(monkeypatch)
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert gwt_ib.main(fresh(tmp_path, "--env-id", env_id)) == code
    finally:
        signal.signal(signal.SIGTERM, old)
        monkeypatch.undo()
    out, err = capsys.readouterr()
    run, = (tmp_path / "out").iterdir()
    assert message_lines(err) == [f"gwt_ib.py: {line.format(run=run)}"] and "Traceback" not in out + err
    assert f"resume with: python gwt_ib.py --resume {run}" in out
    assert checkpoint_update(run) == kept and not (run / "summary.json").exists() and not list(run.glob("*.tmp"))
    assert gwt_ib.main(["--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert (f"run: {run} has trained to its end (4 updates), its results were not written: writing them" in out) == \
        (kept == 4)
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_results(run, ref)
    assert gwt_ib.main(["--resume", str(run)]) == 0 and "is complete (4 updates)" in capsys.readouterr().out


@pytest.mark.parametrize("at,when", [(300, "in the last update"), (330, "in the final evaluation"),
                                     (340, "in the gate effect's evaluation")])
def test_one_signal_at_the_end_still_writes_the_results(at, when, tmp_path, capsys):
    """A first SIGTERM once the last update has begun: training is complete, the results are written as in the
    uninterrupted run, exit 0."""
    env_id = fault_env("SIGTERM", at)
    ref = reference_run(tmp_path, fault_env("none"))
    old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        assert gwt_ib.main(fresh(tmp_path, "--env-id", env_id)) == 0
    finally:
        signal.signal(signal.SIGTERM, old)
    err = capsys.readouterr().err
    assert "[SIGTERM] stopping" in err and message_lines(err) == []
    run, = (tmp_path / "out").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_results(run, ref)


# ----------------------------------------------------------------------------- links and damaged files in a run
def test_a_resume_writes_nothing_outside_the_run_through_links_in_it(runs, tmp_path):
    """Every file a resume writes or replaces, planted as a symlink or a hard link to a file outside the run (and its
    .tmp too): the outside files stay as they were, and the run ends with files of its own."""
    run, outside = tmp_path / "run", tmp_path / "outside"
    shutil.copytree(runs["halted"], run)
    outside.mkdir()
    names = ["summary.json", "model.pt", "gate_samples.npz", "eval_trace.json", "training.png", "envs-3.pkl",
             "checkpoint.pt.tmp", "config.json.tmp", "summary.json.tmp", "model.pt.tmp", "metrics.jsonl.tmp"]
    for i, name in enumerate(names):
        (outside / name).write_text(f"the user's file {name}\n")
        (run / name).unlink(missing_ok=True)
        os.link(outside / name, run / name) if i % 2 else (run / name).symlink_to(outside / name)
    before = snapshot(outside)
    assert gwt_ib.main(["--resume", str(run), "--save-plot", "true"]) == 0
    assert snapshot(outside) == before
    for p in run.iterdir():
        st = os.lstat(p)
        assert stat.S_ISREG(st.st_mode) and st.st_nlink == 1, p.name
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def drop_first_row(lines):
    return lines[1:]


@pytest.mark.parametrize("damage,note,updates", [
    (lambda lines: ["garbage\n"] + lines, "note: dropped 1 line(s) of metrics.jsonl: 1 cut short or not a row in order",
     [1, 2, 3, 4]),
    (lambda lines: lines[:1] + ['{"update": 9}\n'] + lines[1:], "note: dropped 1 line(s) of metrics.jsonl: 1 logged "
     "after the checkpoint (update 2)", [1, 2, 3, 4]),
    (lambda lines: lines + lines[1:], "note: dropped 1 line(s) of metrics.jsonl: 1 cut short or not a row in order",
     [1, 2, 3, 4]),
    (drop_first_row, "note: metrics.jsonl lacks 1 of the checkpoint's 2 rows", [2, 3, 4]),
])
def test_resume_keeps_the_checkpoints_rows_and_says_what_it_dropped(damage, note, updates, runs, tmp_path, capsys):
    """The checkpoint is the truth: a resume keeps the rows of its updates by their update number, whatever else the
    file holds (a stray line, a row from elsewhere, a repeated row), and its note says what was dropped or is
    missing; the rows kept are the uninterrupted run's."""
    run = tmp_path / "run"
    shutil.copytree(runs["halted"], run)
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (run / "metrics.jsonl").write_text("".join(damage(lines)))
    assert gwt_ib.main(["--resume", str(run)]) == 0
    assert message_lines(capsys.readouterr().err) == [note]
    rows, ref = training_rows(run), training_rows(runs["completed"])
    assert [r["update"] for r in rows] == updates and all(r == ref[r["update"] - 1] for r in rows)


# ----------------------------------------------------------------------------- env workers
def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def start_trainer(tmp_path: Path, *more: str, sig: int = signal.SIGINT) -> tuple[subprocess.Popen, Path]:
    """A long run with 2 env workers in its own process group, with `sig` at its default disposition (a shell's
    background job starts with SIGINT ignored); returns once it has written a checkpoint."""
    out, log = tmp_path / "runs", open(tmp_path / "log.txt", "w")
    p = subprocess.Popen([sys.executable, "gwt_ib.py", *ARGS, "--total-timesteps", "10000000", "--eval-every", "1000",
                          "--env-workers", "2", "--out-dir", str(out), "--run-name", "w", *more], cwd=ROOT, stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True,
                         preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (out / "w" / "checkpoint.pt").exists():
        assert p.poll() is None and time.monotonic() < deadline, (tmp_path / "log.txt").read_text()[-3000:]
        time.sleep(0.1)
    return p, out / "w"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_a_dead_env_worker_ends_the_run_as_env_error_within_seconds(tmp_path):
    """SIGKILL one of two env workers: the trainer does not wait for it forever; it ends as env_error with one line
    naming the worker and how it died, keeps its checkpoint, and says how to resume."""
    p, run = start_trainer(tmp_path)
    try:
        workers = children(p.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        t = time.monotonic()
        assert p.wait(timeout=60) == 4
        assert time.monotonic() - t < 10
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log = (tmp_path / "log.txt").read_text()
    (line,) = [l for l in log.splitlines() if l.startswith("gwt_ib.py:")]
    assert f"env_error: env worker 1 (pid {workers[1]}) died (killed by SIGKILL); kept the checkpoint of update" in line
    assert "Traceback" not in log and f"resume with: python gwt_ib.py --resume {run}" in log
    assert json.loads((run / "summary.json").read_text())["status"] == "env_error"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_process_group_with_env_workers_is_an_interruption(sig, tmp_path):
    """Ctrl-C (SIGINT to the foreground process group) or `kill -TERM -PGID` reaches the env workers too: the run
    ends as interrupted with exit 128+N, a checkpoint and a resume hint, no worker traceback, no worker left."""
    p, run = start_trainer(tmp_path, sig=sig)
    try:
        workers = children(p.pid)
        os.killpg(p.pid, sig)
        assert p.wait(timeout=120) == 128 + sig
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    log = (tmp_path / "log.txt").read_text()
    assert "Traceback" not in log and "env_error" not in log and f"resume with: python gwt_ib.py --resume {run}" in log
    s = json.loads((run / "summary.json").read_text())
    assert (s["status"], s["message"]) == ("interrupted", f"stopped by {signal.Signals(sig).name}")
    time.sleep(0.5)
    alive = [w for w in workers if Path(f"/proc/{w}").exists() and Path(f"/proc/{w}/stat").read_text().split()[2] != "Z"]
    assert not alive


def test_ctrl_c_while_the_trainer_starts_is_one_line(tmp_path):
    """SIGINT while gwt_ib.py still imports torch (the first second): exit 130, one line, no traceback."""
    p = subprocess.Popen([sys.executable, "gwt_ib.py", *ARGS, "--out-dir", str(tmp_path / "out")], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGINT or p.returncode == 130, err
    assert err.strip().splitlines() == ["gwt_ib.py: interrupted: stopped by SIGINT before training started; nothing "
                                        "was written"] and not (tmp_path / "out").exists()

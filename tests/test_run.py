"""Whole runs: CLI output and run directory, GateCheck, determinism, halt/resume, Ctrl-C."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch

import gwt_ib
from conftest import COUNTER_ID, ROOT, TINY_ARGS, built, close, read_metrics, tiny_cfg

PROGRESS = re.compile(r"^upd\s+\d+/\d+ \| td_mean [-+]\d.*\| .*steps/s", re.M)
GATE_KEYS = {"rho_td_c", "rho_tail", "rho_td_dc", "rho_tail_dc", "rho_td_res", "td_std", "floor_frac", "std_ok",
             "eval_ok", "verdict", "evidence", "early_eval", "late_eval", "eval_t", "eval_t_crit", "eval_effect_share"}
SUMMARY_KEYS = {"gatecheck", "final_eval", "eval_mode", "mmer", "mean_c", "ev", "ep100", "steps_per_s", "env_steps",
                "wall_s"}


def cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "gwt_ib.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=240, env=env, **kw)


def state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- CLI run
def test_cli_run_prints_progress_and_gatecheck_and_writes_run_dir(tmp_path):
    """A CLI run prints progress lines and the GateCheck block, exits 0 and leaves a complete run directory."""
    out = tmp_path / "runs"
    p = cli(*TINY_ARGS, "--total-timesteps", "192", "--out-dir", str(out), "--run-name", "cli")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert len(PROGRESS.findall(p.stdout)) == 3, p.stdout
    assert re.search(r"^GATECHECK$", p.stdout, re.M)
    assert re.search(r"rho\(td,c\)=.*-> (PASS|FAIL)$", p.stdout, re.M | re.S)
    run = out / "cli"
    for name in ("config.json", "metrics.jsonl", "model.pt", "checkpoint.pt", "summary.json"):
        assert (run / name).is_file(), name
    s = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= s.keys()
    g = s["gatecheck"]
    assert GATE_KEYS <= g.keys()
    assert g["verdict"] == ("PASS" if g["std_ok"] and g["eval_ok"] else "FAIL")
    assert f"-> {g['verdict']}\n" in p.stdout  # the printed verdict is the recorded one
    assert s["status"] == "completed" and s["env_steps"] == 192
    assert s["wall_s"] > 0 and s["steps_per_s"] > 0 and 0 <= s["mean_c"] <= 1
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["hid_dim"] == 16 and cfg["total_timesteps"] == 192
    assert set(cfg) == {f.name for f in dataclasses.fields(gwt_ib.Cfg)}
    rows = read_metrics(run, drop=())
    assert [r["update"] for r in rows] == [1, 2, 3]
    assert {"loss", "mean_c", "td_std", "ev", "eval", "bias", "steps_per_s", "wall_s", "env_steps"} <= rows[0].keys()
    sd = torch.load(run / "model.pt", weights_only=True)
    assert any(v.ndim == 2 and v.shape[1] == 16 for v in sd.values())


def test_same_run_name_never_overwrites(tmp_path):
    """A second run with the same out_dir and run_name gets its own directory; the first is left untouched."""
    cfg = tiny_cfg(tmp_path, run_name="same", total_timesteps=64)
    s1 = gwt_ib.train(cfg)
    first = {p.name: p.read_bytes() for p in Path(s1["run_dir"]).iterdir()}
    s2 = gwt_ib.train(cfg)
    s3 = gwt_ib.train(cfg)
    dirs = {s1["run_dir"], s2["run_dir"], s3["run_dir"]}
    assert len(dirs) == 3 and all(Path(d).parent == tmp_path / "runs" for d in dirs)
    assert Path(s1["run_dir"]).name == "same"
    assert {p.name: p.read_bytes() for p in Path(s1["run_dir"]).iterdir()} == first


def test_list_envs_prints_every_popgym_id(capsys):
    """--list-envs prints one line per POPGym id with its spaces and exits 0."""
    assert gwt_ib.main(["--list-envs"]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("popgym-")]
    assert len(lines) == 42 and all(" obs " in l and " act " in l for l in lines)


# ----------------------------------------------------------------------------- GateCheck
def test_first_evaluation_is_after_one_rollout_and_before_any_update(tmp_path, monkeypatch):
    """GateCheck's early baseline measures the untrained agent's real gate: the TD normalizer has seen one
    rollout (so the gate is not the near-closed gate of scale 1), and no parameter has moved yet."""
    cfg = tiny_cfg(tmp_path, total_timesteps=128, eval_every=0)
    init = gwt_ib.build(cfg)
    close(init)
    seen, real = [], gwt_ib.evaluate

    def spy(ev, cfg_, *a, **kw):
        seen.append((ev.norm.count, state_equal(ev.agent.state_dict(), init.agent.state_dict())))
        return real(ev, cfg_, *a, **kw)
    monkeypatch.setattr(gwt_ib, "evaluate", spy)
    s = gwt_ib.train(cfg)
    assert seen[0] == (cfg.num_envs * cfg.rollout_steps, True)
    assert s["evals"][0][0] == 0 and len(s["evals"]) == 2  # after the first rollout, and at the end


@torch.no_grad()
def test_gate_samples_residual_is_the_routers_part_of_the_rollout_gate():
    """GateCheck's residual, recomputed batched from the stored obs and h0, is exactly what the rollout's gate
    added to the TD prior: c = sigmoid(prior(|td| the router saw) + residual)."""
    cfg = tiny_cfg(num_envs=4, episode_start_td="max")
    su = built(cfg)
    try:
        for p in su.agent.router.out.parameters():  # a router that has learned something
            p.normal_(0, 0.5)
        b, _, _ = gwt_ib.rollout(su.col, cfg.rollout_steps)
        gs = gwt_ib.gate_samples(su.agent, b, 0.0)
        prior = cfg.td_scale * gs["td_abs"] + cfg.base_logit + su.agent.bias.item()
        np.testing.assert_allclose(1 / (1 + np.exp(-(prior + gs["res"]))), gs["c"], atol=1e-5)
        assert gs["res"].std() > 0.01 and (gs["td_abs"][b["start"].numpy().ravel() > 0] == cfg.td_norm_clip).all()
    finally:
        close(su)


def test_mmer_is_the_best_mean_return_of_a_rollouts_training_episodes(tmp_path):
    """MMER (POPGym): the max over updates of the mean return of the sampled-policy episodes that ended in
    that update's rollout; in metrics.jsonl per update and in summary.json."""
    s = gwt_ib.train(tiny_cfg(tmp_path, total_timesteps=256))
    rows = read_metrics(s["run_dir"])
    means = [r["ep_mean"] for r in rows if not math.isnan(r["ep_mean"])]
    assert means and s["mmer"] == max(means) == rows[-1]["mmer"]
    assert [r["mmer"] for r in rows if not math.isnan(r["mmer"])] == sorted(r["mmer"] for r in rows
                                                                          if not math.isnan(r["mmer"]))


# ----------------------------------------------------------------------------- determinism and resume
def test_same_seed_same_metrics(tmp_path):
    """The same seed and Cfg on CPU give identical metrics.jsonl (wall-clock keys aside) and identical models."""
    cfg = tiny_cfg(tmp_path, total_timesteps=192, epochs=2, eval_every=2)
    a, b = gwt_ib.train(cfg), gwt_ib.train(cfg)
    assert read_metrics(a["run_dir"]) == read_metrics(b["run_dir"])
    assert state_equal(torch.load(Path(a["run_dir"]) / "model.pt"), torch.load(Path(b["run_dir"]) / "model.pt"))
    c = gwt_ib.train(dataclasses.replace(cfg, seed=1))
    assert read_metrics(c["run_dir"]) != read_metrics(a["run_dir"])  # and the seed does matter


def same(a, b, tol: float) -> bool:
    """a == b, numbers within relative and absolute tolerance tol (NaN equals NaN), through dicts and lists."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=tol, abs_tol=tol) or math.isnan(a) and math.isnan(b)
    return a == b


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("env_id,device,ib_loss", [("popgym-CountRecallEasy-v0", "cpu", "sq"),
                                                   ("CartPole-v1", "cpu", "constraint"),
                                                   pytest.param("popgym-CountRecallEasy-v0", "cuda", "sq", marks=CUDA)])
def test_halt_and_resume_reproduce_an_uninterrupted_run(tmp_path, env_id, device, ib_loss, capsys):
    """Halting after k updates and resuming twice (in-process and as `--resume RUN --halt-after 2`) gives the
    metrics rows, evaluations and final model of one uninterrupted run: bit for bit on the CPU, within
    floating-point tolerance on a GPU (where the RNG states come back to the CPU generators they belong to)."""
    tol = 0.0 if device == "cpu" else 1e-4
    cfg = tiny_cfg(tmp_path, env_id=env_id, device=device, total_timesteps=5 * 64, eval_every=2, checkpoint_every=100,
                   ib_loss=ib_loss)  # "constraint": its multiplier is part of the state
    full = gwt_ib.train(dataclasses.replace(cfg, run_name="full"))
    assert full["status"] == "completed"
    part_cfg = dataclasses.replace(cfg, run_name="part", halt_after=2)
    s = gwt_ib.train(part_cfg)
    assert s["status"] == "halted" and s["updates"] == 2
    run = s["run_dir"]
    assert len(read_metrics(run)) == 2
    s = gwt_ib.train(part_cfg, resume=run)
    assert s["status"] == "halted" and s["updates"] == 4 and s["run_dir"] == run
    assert gwt_ib.main(["--resume", run, "--halt-after", "2"]) == 0
    assert "note:" not in capsys.readouterr().err  # the env state was restored too
    s = json.loads((Path(run) / "summary.json").read_text())
    assert s["status"] == "completed" and s["updates"] == 5
    full_rows, part_rows = read_metrics(full["run_dir"]), read_metrics(run)
    assert [r["update"] for r in part_rows] == [1, 2, 3, 4, 5]
    for r_full, r_part in zip(full_rows, part_rows):
        assert same(r_full, r_part, tol), (r_full, r_part)
    model_full, model_part = (torch.load(Path(r) / "model.pt") for r in (full["run_dir"], run))
    assert model_full.keys() == model_part.keys()
    assert all(torch.allclose(model_full[k], model_part[k], rtol=tol, atol=tol) for k in model_full)
    assert same([s["final_eval"], s["env_steps"], s["evals"]], [full["final_eval"], full["env_steps"], full["evals"]],
                tol)


def test_resume_drops_metrics_rows_logged_after_the_checkpoint(tmp_path):
    """Rows logged after the last checkpoint (a crash between them) are dropped on resume: no update twice."""
    import shutil
    cfg = tiny_cfg(tmp_path, total_timesteps=4 * 64, checkpoint_every=100, eval_every=100, halt_after=2)
    run = Path(gwt_ib.train(cfg)["run_dir"])
    shutil.copytree(run, tmp_path / "at2")
    gwt_ib.train(dataclasses.replace(cfg, halt_after=1), resume=str(run))  # logs update 3, checkpoints at 3
    rows = read_metrics(run)
    assert [r["update"] for r in rows] == [1, 2, 3]
    for f in ("checkpoint.pt", "envs-2.pkl"):  # as if it crashed after logging 3, before its checkpoint
        shutil.copy(tmp_path / "at2" / f, run / f)
    s = gwt_ib.train(dataclasses.replace(cfg, halt_after=0), resume=str(run))
    assert s["status"] == "completed"
    again = read_metrics(run)
    assert [r["update"] for r in again] == [1, 2, 3, 4]
    assert again[:3] == rows  # update 3 redone from the update-2 checkpoint, identically


# ----------------------------------------------------------------------------- Ctrl-C and pipes
def test_sigint_stops_cleanly_with_summary_and_resume_hint(tmp_path):
    """SIGINT during training: finish the update, checkpoint, print GateCheck and a --resume hint, exit 130."""
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "gwt_ib.py", *TINY_ARGS, "--total-timesteps", "10000000",
                          "--eval-every", "1000", "--out-dir", str(out), "--run-name", "sig"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # a background job ignores it
    try:
        seen = []
        for line in p.stdout:
            seen.append(line)
            if PROGRESS.search(line):
                break
        assert any(PROGRESS.search(l) for l in seen), "".join(seen) + p.stderr.read()[-3000:]
        p.send_signal(signal.SIGINT)
        rest, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    stdout = "".join(seen) + rest
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert "GATECHECK" in stdout and re.search(r"-> (PASS|FAIL)", stdout)
    run = out / "sig"
    assert f"--resume {run}" in stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "interrupted"
    assert s["updates"] >= 1 and len(read_metrics(run)) == s["updates"]
    # the hint works: resuming continues from the checkpoint written at the interrupted update
    r = cli("--resume", str(run), "--halt-after", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    s2 = json.loads((run / "summary.json").read_text())
    assert s2["status"] == "halted" and s2["updates"] == s["updates"] + 1


def test_progress_lines_reach_a_pipe_while_training(tmp_path):
    """Progress lines are flushed as printed, so `python gwt_ib.py | tee log` shows them during training."""
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "gwt_ib.py", *TINY_ARGS, "--total-timesteps", "10000000",
                          "--eval-every", "1000", "--out-dir", str(out), "--run-name", "pipe"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    metrics = out / "pipe" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 180
        while p.poll() is None and time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break  # updates 1 and 2 are done: their progress lines have been printed
            time.sleep(0.2)
        assert p.poll() is None, "training ended early"
        p.kill()  # no chance to flush at exit: only what was flushed while training gets through
        stdout, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert PROGRESS.search(stdout), f"nothing reached the pipe: {stdout!r}"


def test_async_envs_give_the_same_run_as_in_process_envs(tmp_path):
    """async_envs=True (subprocess envs) is only a speed choice: same seed, same metrics as in-process envs."""
    a = gwt_ib.train(tiny_cfg(tmp_path, async_envs=True, total_timesteps=128))
    b = gwt_ib.train(tiny_cfg(tmp_path, async_envs=False, total_timesteps=128))
    assert a["status"] == b["status"] == "completed"
    assert read_metrics(a["run_dir"]) == read_metrics(b["run_dir"])


@pytest.mark.parametrize("env_id", ["popgym-AutoencodeEasy-v0", COUNTER_ID])
def test_env_workers_give_the_same_run_as_in_process_envs(tmp_path, env_id):
    """env_workers (envs sharded over subprocesses) is only a speed choice: same seed, same metrics.
    3 envs over 2 workers: uneven shards, a Tuple observation space, and time-limit truncations whose
    real final observations must come back from the workers."""
    kw = dict(env_id=env_id, num_envs=3, rollout_steps=32, seq_len=16, minibatches=2,
              total_timesteps=96 * 2)
    a = gwt_ib.train(tiny_cfg(tmp_path, env_workers=2, **kw))
    b = gwt_ib.train(tiny_cfg(tmp_path, **kw))
    assert a["status"] == b["status"] == "completed"
    assert read_metrics(a["run_dir"]) == read_metrics(b["run_dir"])


class NanRewardEnv(gymnasium.Env):
    """Returns a NaN reward from its 40th step on: a stand-in for a diverging run."""

    observation_space = gymnasium.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.n = getattr(self, "n", 0)
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.n += 1
        return np.zeros(2, np.float32), (float("nan") if self.n >= 40 else 0.1), self.n % 10 == 0, False, {}


def test_non_finite_td_stops_the_run_and_keeps_the_last_good_state(tmp_path):
    """A NaN reaching the TD statistics stops training: status diverged (exit code 3), a message naming the
    update and the quantity; the last good checkpoint, the metrics so far and summary.json stay on disk."""
    if "gwtib-test-NanReward-v0" not in gymnasium.registry:
        gymnasium.register("gwtib-test-NanReward-v0", entry_point=NanRewardEnv)
    cfg = tiny_cfg(tmp_path, env_id="gwtib-test-NanReward-v0", total_timesteps=64 * 4)  # 32 steps per rollout
    s = gwt_ib.train(cfg)
    run = Path(s["run_dir"])
    assert s["status"] == "diverged" and s["exit_code"] == 3
    assert "update 2" in s["message"] and "TD" in s["message"]  # the second update, as numbered in metrics.jsonl
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"
    assert len(read_metrics(run)) == 1  # the one good update
    assert not (run / "model.pt").exists()  # no diverged weights saved as the final model
    # the checkpoint holds the model after update 1: the one a run halted there saves
    good = gwt_ib.train(dataclasses.replace(cfg, halt_after=1))
    assert good["status"] == "halted" and good["updates"] == 1
    ck = torch.load(run / "checkpoint.pt", weights_only=False)["agent"]
    assert state_equal(ck, torch.load(Path(good["run_dir"]) / "checkpoint.pt", weights_only=False)["agent"])
    assert all(torch.isfinite(v).all() for v in ck.values())

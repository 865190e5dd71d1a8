"""Shared fixtures for the GWT-IB test suite: import path, tiny configs and two small test environments."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import gwt_ib  # noqa: E402

torch.set_num_threads(1)  # 2-core machine shared with other jobs; also keeps runs bit-reproducible

WALL_KEYS = ("rollout_s", "update_s", "steps_per_s", "wall_s")
TINY_ARGS = ["--num-envs", "2", "--rollout-steps", "32", "--seq-len", "16", "--minibatches", "2", "--epochs", "1",
             "--eval-episodes", "2", "--eval-every", "1", "--log-every", "1", "--enc-dim", "16", "--hid-dim", "16",
             "--router-hid", "8", "--head-hid", "16", "--progress", "false", "--save-plot", "false",
             "--device", "cpu", "--torch-threads", "1", "--seed", "0"]  # tiny_cfg's sizes as flags


def tiny_cfg(tmp_path=None, **kw) -> gwt_ib.Cfg:
    """A Cfg small enough to train in well under a second per update on one CPU thread. It runs the
    reference recurrent step (Agent.cell as torch ops): pass cpu_kernel=True for the C accelerator."""
    base = dict(env_id="popgym-CountRecallEasy-v0", num_envs=2, rollout_steps=32, seq_len=16, minibatches=2,
                epochs=1, total_timesteps=128, eval_episodes=2, eval_every=1, log_every=1, checkpoint_every=1,
                enc_dim=16, hid_dim=16, router_hid=8, head_hid=16, progress=False, save_plot=False,
                device="cpu", seed=0, cpu_kernel=False)
    if tmp_path is not None:
        base["out_dir"] = str(tmp_path / "runs")
    base.update(kw)
    return gwt_ib.Cfg(**base)


def read_metrics(run_dir, drop=WALL_KEYS) -> list[dict]:
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def built(cfg: gwt_ib.Cfg) -> gwt_ib.Setup:
    """build() + the collector reset train() does before its first rollout."""
    su = gwt_ib.build(cfg)
    su.col.reset(seed=cfg.seed)
    return su


def close(su: gwt_ib.Setup) -> None:
    su.envs.close()
    su.eval_envs.close()


def step_from_obs(agent: gwt_ib.Agent, obs, h_prev, td_prev, start):
    """One recurrent step from an observation, as the rollout takes it: features -> gate_prior -> step
    -> heads. obs (B, obs_dim), h_prev (B, S) the memory state, td_prev and start (B,) -> logits, value, c (B, G),
    the new state (B, S)."""
    c, h = agent.step(agent.features(obs), *agent.gate_prior(td_prev, start), h_prev)
    logits, value = agent.heads(h)
    return logits, value, c, h


# ----------------------------------------------------------------------------- test environments
class CounterEnv(gymnasium.Env):
    """obs = [steps taken in this episode, last action]; reward = 1 + action. Terminates when action 1 is
    taken at step >= 3; registered with max_episode_steps=6, so long episodes are truncated at 6 (and an
    episode can be terminated and truncated in the same step). Makes episode boundaries and the real final
    observation of a truncated episode exactly predictable."""

    observation_space = gymnasium.spaces.Box(0.0, 100.0, (2,), np.float32)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2, np.float32), {}

    def step(self, action):
        self.t += 1
        a = int(action)
        return np.array([self.t, a], np.float32), 1.0 + a, bool(a == 1 and self.t >= 3), False, {}


class TextObsEnv(gymnasium.Env):
    """An env whose observation space the trainer does not support."""

    observation_space = gymnasium.spaces.Text(5)
    action_space = gymnasium.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "abc", {}

    def step(self, action):
        return "abc", 0.0, False, False, {}


COUNTER_ID, COUNTER_LIMIT, TEXT_ID = "gwtib-test-Counter-v0", 6, "gwtib-test-TextObs-v0"
if COUNTER_ID not in gymnasium.registry:
    gymnasium.register(COUNTER_ID, entry_point=CounterEnv, max_episode_steps=COUNTER_LIMIT)
if TEXT_ID not in gymnasium.registry:
    gymnasium.register(TEXT_ID, entry_point=TextObsEnv)


@pytest.fixture
def cfg_factory(tmp_path):
    return lambda **kw: tiny_cfg(tmp_path, **kw)


def replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: starts a real local Ray instance (tests/test_sweep.py); "
                                       "deselect with -m 'not slow'")

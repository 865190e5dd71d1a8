"""Environments: flat observations, every POPGym task end to end, episode accounting, truncation bootstrap,
previous-action features."""
from __future__ import annotations

import copy
import json
import math

import gymnasium
import numpy as np
import pytest
import torch
from gymnasium import spaces

import gwt_ib
from conftest import COUNTER_ID, COUNTER_LIMIT, TINY_ARGS, built, close, read_metrics, step_from_obs, tiny_cfg

import popgym  # noqa: F401  registers popgym-*-v0

POPGYM_IDS = sorted(k for k in gymnasium.registry if k.startswith("popgym-"))


# ----------------------------------------------------------------------------- flat observations
def ref_encode(space, x) -> list[float]:
    """Naive one-observation reference: one-hot Discrete parts (value - start), flattened Box/MultiBinary,
    Tuple parts in order, Dict parts in the space's key order."""
    if isinstance(space, spaces.Discrete):
        v = [0.0] * int(space.n)
        v[int(x) - int(space.start)] = 1.0
        return v
    if isinstance(space, spaces.MultiDiscrete):
        out = []
        starts = np.broadcast_to(space.start, space.nvec.shape).reshape(-1)
        for xi, n, s in zip(np.asarray(x).reshape(-1), space.nvec.reshape(-1), starts):
            v = [0.0] * int(n)
            v[int(xi) - int(s)] = 1.0
            out += v
        return out
    if isinstance(space, (spaces.Box, spaces.MultiBinary)):
        return [float(v) for v in np.asarray(x).reshape(-1)]
    if isinstance(space, spaces.Tuple):
        return sum((ref_encode(s, xi) for s, xi in zip(space.spaces, x)), [])
    if isinstance(space, spaces.Dict):
        return sum((ref_encode(s, x[k]) for k, s in space.spaces.items()), [])
    raise TypeError(space)


class SpaceEnv(gymnasium.Env):
    """Emits random observations of a given space (Dicts with their keys in reverse order) and keeps the
    last one it emitted in `.last`, so a test can compare the trainer's observation with the env's."""

    action_space = spaces.Discrete(2)

    def __init__(self, space):
        self.observation_space = copy.deepcopy(space)

    def _emit(self):
        obs = self.observation_space.sample()
        self.last = obs
        return dict(reversed(list(obs.items()))) if isinstance(obs, dict) else obs

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(1 << 30)))
        return self._emit(), {}

    def step(self, action):
        return self._emit(), 0.0, False, False, {}


OBS_SPACES = {  # name: (space, flat dim)
    "discrete": (spaces.Discrete(5), 5),
    "discrete_start": (spaces.Discrete(3, start=2), 3),
    "multidiscrete": (spaces.MultiDiscrete([2, 3, 4]), 9),
    "multidiscrete_start": (spaces.MultiDiscrete([2, 3], start=[1, -1]), 5),
    "multidiscrete_2d": (spaces.MultiDiscrete([[2, 3], [4, 2]]), 11),
    "box": (spaces.Box(-1, 1, (2, 3), np.float32), 6),
    "box_f64": (spaces.Box(-1, 1, (4,), np.float64), 4),
    "box_int": (spaces.Box(0, 9, (3,), np.int64), 3),
    "multibinary": (spaces.MultiBinary(4), 4),
    "tuple": (spaces.Tuple([spaces.Discrete(2), spaces.Discrete(4, start=1), spaces.Box(0, 1, (2,))]), 8),
    "dict": (spaces.Dict({"pos": spaces.MultiDiscrete([3, 3]), "flag": spaces.MultiBinary(2),
                          "hint": spaces.Discrete(2)}), 10),
    "nested": (spaces.Tuple([spaces.Dict({"a": spaces.Discrete(3)}),
                             spaces.Tuple([spaces.Discrete(2), spaces.Box(0, 1, (1,))])]), 6),
}


def space_env_id(name: str) -> str:
    env_id = f"gwtib-test-Space-{name}-v0"
    if env_id not in gymnasium.registry:
        gymnasium.register(env_id, entry_point=SpaceEnv, kwargs={"space": OBS_SPACES[name][0]})
    return env_id


@pytest.mark.parametrize("name", list(OBS_SPACES))
@torch.no_grad()
def test_vector_env_observations_are_the_flattened_env_observations(name):
    """Row i of the observation the agent sees is gymnasium.spaces.flatten of env i's observation:
    float32 (N, flat dim), Discrete/MultiDiscrete parts one-hot from their start, Dict parts in the
    space's key order whatever order the env's dict has."""
    space, dim = OBS_SPACES[name]
    su = built(tiny_cfg(env_id=space_env_id(name), num_envs=3))
    try:
        assert su.envs.single_observation_space.shape == (dim,) and su.agent.obs_dim == dim
        differ = False
        for _ in range(4):
            obs = su.col.obs
            assert obs.dtype == torch.float32 and obs.shape == (3, dim)
            differ |= not torch.equal(obs[0], obs[1])
            for i, env in enumerate(su.envs.envs):
                raw = env.unwrapped.last
                expected = np.array(ref_encode(space, raw), np.float32)
                np.testing.assert_array_equal(obs[i].numpy(), expected)
                np.testing.assert_array_equal(obs[i].numpy(), spaces.flatten(space, raw).astype(np.float32))
            su.col.step(greedy=False, update_norm=True)
        assert differ  # the envs' observations differ, so the rows really are matched to their envs
    finally:
        close(su)


def test_flat_obs_one_hot_respects_start_offsets_and_dict_key_order():
    """FlatObs: Discrete(3, start=2) values 2, 3, 4 become one-hot 0, 1, 2; MultiDiscrete starts likewise;
    a Dict is flattened in the space's key order, not the observation's."""
    flat = lambda space, x: gwt_ib.FlatObs(SpaceEnv(space)).observation(x)  # noqa: E731
    d = spaces.Discrete(3, start=2)
    np.testing.assert_array_equal([flat(d, v) for v in (4, 2, np.int64(3))], np.eye(3)[[2, 0, 1]])
    md = spaces.MultiDiscrete([2, 3], start=[1, -1])
    np.testing.assert_array_equal(flat(md, np.array([2, -1])), [0, 1, 1, 0, 0])
    space = spaces.Dict({"b": spaces.Box(-5, 5, (1,)), "a": spaces.Discrete(2)})
    keys = list(space.spaces)
    parts = {"a": [0.0, 1.0], "b": [3.5]}
    np.testing.assert_array_equal(flat(space, {"b": np.array([3.5], np.float32), "a": 1}),
                                  sum((parts[k] for k in keys), []))


@pytest.mark.parametrize("env_id", POPGYM_IDS[::7] + ["CartPole-v1", "Pendulum-v1"])
@torch.no_grad()
def test_real_env_observations_are_finite_float_rows_of_the_flat_dim(env_id):
    """Observations of real POPGym/classic envs reach the agent as finite float32 (N, flatdim) rows."""
    raw = gymnasium.make(env_id)
    dim = spaces.flatdim(raw.observation_space)
    raw.close()
    su = built(tiny_cfg(env_id=env_id, num_envs=3))
    try:
        assert su.agent.obs_dim == dim
        for _ in range(3):
            obs = su.col.obs
            assert obs.dtype == torch.float32 and obs.shape == (3, dim) and torch.isfinite(obs).all()
            su.col.step(greedy=False, update_norm=True)
    finally:
        close(su)


# ----------------------------------------------------------------------------- every env end to end
def test_all_42_popgym_ids_are_registered():
    """importing popgym registers its 42 popgym-*-v0 tasks (the set the next test trains on)."""
    assert len(POPGYM_IDS) == 42


@pytest.mark.parametrize("env_id", POPGYM_IDS + ["CartPole-v1", "Pendulum-v1"])
def test_tiny_training_run_completes_on_every_env(env_id, tmp_path):
    """train() completes on every POPGym task (and a Box-action env) with finite metrics and a GateCheck verdict."""
    cfg = tiny_cfg(tmp_path, env_id=env_id, num_envs=2, rollout_steps=16, seq_len=8, minibatches=2, epochs=1,
                   total_timesteps=64, eval_episodes=2, eval_every=1, enc_dim=8, hid_dim=8, router_hid=4,
                   head_hid=8, log_every=100, checkpoint_every=100)
    s = gwt_ib.train(cfg)
    assert s["status"] == "completed", s["message"]
    assert s["env_steps"] == 64 and s["updates"] == 2
    assert math.isfinite(s["final_eval"]) and math.isfinite(s["mean_c"])
    g = s["gatecheck"]
    assert g["verdict"] == ("PASS" if g["std_ok"] and g["eval_ok"] else "FAIL")
    rows = read_metrics(s["run_dir"])
    assert [r["update"] for r in rows] == [1, 2]
    for r in rows:
        for k in ("loss", "pg_loss", "v_loss", "entropy", "ib_loss", "grad_norm", "mean_c", "td_mean", "td_std",
                  "bias", "eval", "ratio0_maxdev"):
            assert math.isfinite(r[k]), (k, r[k])
        assert r["ratio0_maxdev"] < 1e-4
        assert 0 <= r["mean_c"] <= 1


# ----------------------------------------------------------------------------- episode accounting
@pytest.fixture
def counter_rollout():
    cfg = tiny_cfg(env_id=COUNTER_ID, num_envs=3, rollout_steps=48, seq_len=16, minibatches=1,
                   total_timesteps=144, hid_dim=12, seed=3)
    su = built(cfg)
    b, last_value, finished = gwt_ib.rollout(su.col, 48)
    yield su, b, last_value, finished
    close(su)


def test_episode_boundaries_are_exact(counter_rollout):
    """start=1 exactly on each episode's first observation; each episode stores one transition per env step."""
    su, b, _, finished = counter_rollout
    count = b["obs"][..., 0]  # CounterEnv: steps taken so far in the episode
    start = b["start"] > 0
    assert torch.equal(start, count == 0)  # every first obs (count 0) and only those are flagged
    done = (b["term"] > 0) | (b["trunc"] > 0)
    assert torch.equal(start[1:], done[:-1])  # a new episode starts right after every end, never otherwise
    assert torch.all(count[1:][~done[:-1]] == count[:-1][~done[:-1]] + 1)  # no step skipped or repeated
    assert done.sum() >= 6
    # finished episodes: length == stored transitions since the start flag, return == their reward sum
    for n in range(b["obs"].shape[1]):
        ends = torch.nonzero(done[:, n]).flatten().tolist()
        starts = [0] + [e + 1 for e in ends[:-1]]
        got = [(R, length) for i, R, length in finished if i == n]
        assert len(got) == len(ends)
        for (R, length), s, e in zip(got, starts, ends):
            assert length == e - s + 1
            assert R == pytest.approx(b["reward"][s:e + 1, n].sum().item())
            assert count[e, n].item() == length - 1  # the last stored obs is the one before the final step
    assert torch.equal(su.col.start, done[-1].float())


def test_terminal_and_truncated_flags_follow_the_env(counter_rollout):
    """term marks the env's terminations (action 1 at step >= 3), trunc the time limit, both can coincide."""
    _, b, _, _ = counter_rollout
    count_after = b["obs"][..., 0] + 1
    act = b["act"][..., 0]  # (T, N, components)
    term = (act == 1) & (count_after >= 3)
    assert torch.equal(b["term"] > 0, term)
    assert torch.equal(b["trunc"] > 0, count_after == COUNTER_LIMIT)
    assert ((b["trunc"] > 0) & (b["term"] == 0)).any()
    assert torch.equal(b["reward"], 1.0 + act.float())


# ----------------------------------------------------------------------------- truncation bootstrap
@pytest.mark.parametrize("prev_action", [False, True])
@torch.no_grad()
def test_truncation_bootstraps_from_real_final_observation(prev_action):
    """Truncation: td = r + gamma*V(real final obs, h_t, td_prev=0) - V_t (never the reset obs); termination: r - V_t."""
    cfg = tiny_cfg(env_id=COUNTER_ID, num_envs=4, rollout_steps=64, seq_len=16, minibatches=1,
                   total_timesteps=256, hid_dim=12, seed=5, prev_action=prev_action, gamma=0.9)
    su = built(cfg)
    b, _, _ = gwt_ib.rollout(su.col, 64)
    agent = su.agent
    h_t = torch.cat([b["h0"][1:], su.col.h[None]])  # memory after step t
    trunc = (b["trunc"] > 0) & (b["term"] == 0)
    term = b["term"] > 0
    assert trunc.sum() >= 2 and term.sum() >= 2
    for t, n in torch.nonzero(trunc).tolist():
        a = b["act"][t, n].item()
        final = torch.tensor([float(COUNTER_LIMIT), float(a)] + ([1.0 - a, float(a)] if prev_action else []))
        reset = torch.zeros_like(final)
        zero = torch.zeros(1)
        v_final = step_from_obs(agent, final[None], h_t[t, n][None], zero, zero)[1].item()
        v_reset = step_from_obs(agent, reset[None], h_t[t, n][None], zero, zero)[1].item()
        assert b["v_boot"][t, n].item() == pytest.approx(v_final, abs=1e-5)
        expected = b["reward"][t, n].item() + cfg.gamma * v_final - b["value"][t, n].item()
        assert b["td"][t, n].item() == pytest.approx(expected, abs=1e-5)
        assert abs(v_final - v_reset) > 1e-5  # the check above could tell the two apart
    torch.testing.assert_close(b["td"][term], (b["reward"] - b["value"])[term], atol=1e-6, rtol=0)
    close(su)


# ----------------------------------------------------------------------------- previous action
def test_prev_action_appends_one_hot_of_previous_action_discrete():
    """prev_action=True appends one_hot(a_{t-1}) to obs_t, and zeros on an episode's first observation."""
    cfg = tiny_cfg(env_id=COUNTER_ID, num_envs=3, rollout_steps=32, seq_len=16, minibatches=1,
                   total_timesteps=96, prev_action=True, seed=1)
    su = built(cfg)
    assert su.col.obs.shape == (3, 2 + 2)  # [count, last action] + one-hot previous action
    b, _, _ = gwt_ib.rollout(su.col, 32)
    pa = b["obs"][..., 2:]
    start = b["start"] > 0
    assert torch.all(pa[start] == 0)
    assert b["act"].shape == (32, 3, 1)  # (T, N, components)
    expected = torch.nn.functional.one_hot(b["act"][:-1, :, 0], 2).float()
    torch.testing.assert_close(pa[1:][~start[1:]], expected[~start[1:]], atol=0, rtol=0)
    # and it is consistent with the env's own record of the last action
    torch.testing.assert_close(pa[1:][~start[1:]][:, 1], b["obs"][1:, :, 1][~start[1:]], atol=0, rtol=0)
    close(su)


def test_prev_action_multidiscrete_one_hot_per_component():
    """For MultiDiscrete actions the previous action is one one-hot block per component (MineSweeper 4x4)."""
    cfg = tiny_cfg(env_id="popgym-MineSweeperEasy-v0", num_envs=2, rollout_steps=32, seq_len=16, minibatches=1,
                   total_timesteps=64, prev_action=True, seed=2)
    su = built(cfg)
    b, _, _ = gwt_ib.rollout(su.col, 32)
    assert b["act"].shape[-1] == 2
    pa = b["obs"][..., -8:]
    start = b["start"] > 0
    assert torch.all(pa[start] == 0)
    oh = torch.cat([torch.nn.functional.one_hot(b["act"][..., k], 4) for k in range(2)], -1).float()
    torch.testing.assert_close(pa[1:][~start[1:]], oh[:-1][~start[1:]], atol=0, rtol=0)
    close(su)


def test_prev_action_box_is_the_clipped_action():
    """For Box actions the previous-action feature is the action the env received (clipped to the bounds)."""
    cfg = tiny_cfg(env_id="Pendulum-v1", num_envs=2, rollout_steps=32, seq_len=16, minibatches=1,
                   total_timesteps=64, prev_action=True, seed=2)
    su = built(cfg)
    with torch.no_grad():
        su.agent.log_std.fill_(math.log(3.0))  # many samples beyond Pendulum's [-2, 2]
    b, _, _ = gwt_ib.rollout(su.col, 32)
    assert (b["act"].abs() > 2).any()  # stored actions are the unclipped samples (their logp is what PPO needs)
    pa = b["obs"][..., -1]
    start = b["start"] > 0
    assert torch.all(pa[start] == 0)
    torch.testing.assert_close(pa[1:][~start[1:]], b["act"][:-1, :, 0].clamp(-2, 2)[~start[1:]], atol=1e-6, rtol=0)
    close(su)


# ----------------------------------------------------------------------------- POPGym's protocol
def test_popgym_wrappers_add_the_previous_action_and_a_first_step_flag():
    """--popgym-wrappers: POPGym's PreviousAction (its null action 0 after a reset) and Antialias (is-first-step),
    flattened after the observation: RepeatPrevious's Discrete(4) obs + Discrete(4) action + Discrete(2) flag."""
    cfg = tiny_cfg(env_id="popgym-RepeatPreviousEasy-v0", num_envs=3, rollout_steps=64, seq_len=16, minibatches=1,
                   total_timesteps=192, popgym_wrappers=True, seed=1)
    su = built(cfg)
    b, _, _ = gwt_ib.rollout(su.col, 64)
    obs, start, act = b["obs"], b["start"] > 0, b["act"][..., 0]
    assert obs.shape[-1] == 4 + 4 + 2
    one_hot = torch.nn.functional.one_hot
    torch.testing.assert_close(obs[..., 8:][start], one_hot(torch.ones_like(act[start]), 2).float())  # is_t0 = 1
    torch.testing.assert_close(obs[..., 8:][~start], one_hot(torch.zeros_like(act[~start]), 2).float())
    assert torch.all(obs[..., 4:8][start] == one_hot(torch.zeros_like(act[start]), 4).float())  # null action 0
    later = ~start[1:]
    torch.testing.assert_close(obs[1:, :, 4:8][later], one_hot(act[:-1], 4).float()[later], atol=0, rtol=0)
    close(su)


def test_the_popgym_preset_trains_a_short_run(tmp_path):
    """--preset popgym with a tiny size: 30 SGD passes per rollout, POPGym's wrappers, a completed run."""
    flags = dict(zip(TINY_ARGS[::2], TINY_ARGS[1::2]))
    del flags["--epochs"]  # the preset's 30 passes stay
    flags.update({"--env-id": "popgym-RepeatPreviousEasy-v0", "--total-timesteps": "128", "--minibatches": "1",
                  "--out-dir": str(tmp_path), "--run-name": "p"})
    rc = gwt_ib.main(["--preset", "popgym", *[x for kv in flags.items() for x in kv]])
    assert rc == 0
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    assert (cfg["epochs"], cfg["lr"], cfg["gae_lambda"], cfg["popgym_wrappers"], cfg["ent_coef"]) == (30, 5e-5, 1.0,
                                                                                                       True, 0.0)
    assert len(read_metrics(tmp_path / "p")) == 2

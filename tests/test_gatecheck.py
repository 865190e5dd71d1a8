"""GateCheck: the verdict's statistics, the counterfactual arms that say what in the gate matters, evaluation
(seeded, paired, `carry` measured as trained) and `--evaluate RUN`."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gwt_ib
from conftest import ROOT, built, close, tiny_cfg


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("p,df,want", [(0.975, 1, 12.706), (0.975, 4, 2.776), (0.975, 10, 2.228), (0.975, 30, 2.042),
                                       (0.99, 10, 2.764), (0.99, 2, 6.965), (0.99, 3, 4.541), (0.975, 1e6, 1.960)])
def test_t_quantile_matches_students_table(p, df, want):
    """Student's t quantiles as tables give them; Welch's non-integer df lie between their neighbours."""
    assert gwt_ib.t_quantile(p, df) == pytest.approx(want, abs=2e-3)
    assert 4.541 < gwt_ib.t_quantile(0.99, 2.5) < 6.965


def test_mean_ci_is_the_t_interval():
    x = np.array([1.0, 2.0, 4.0, np.nan])
    assert gwt_ib.mean_ci(x) == pytest.approx((7 / 3, 4.303 * np.std([1, 2, 4], ddof=1) / math.sqrt(3)), rel=1e-3)
    assert math.isnan(gwt_ib.mean_ci(np.array([1.0]))[1])


def test_welch_statistic_and_degrees_of_freedom():
    """t = (mean a - mean b) / sqrt(va/na + vb/nb), df by Welch-Satterthwaite; one-sided at level alpha."""
    a, b = np.array([3.0, 4.0, 5.0, 6.0]), np.array([1.0, 2.0, 2.5])
    va, vb = a.var(ddof=1) / 4, b.var(ddof=1) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    ok, t, crit = gwt_ib.welch_greater(a, b, 0.01)
    assert t == pytest.approx((a.mean() - b.mean()) / math.sqrt(va + vb))
    assert crit == pytest.approx(gwt_ib.t_quantile(0.99, df)) and ok == (t > crit)
    assert gwt_ib.welch_greater(b, a, 0.01)[0] is False


def verdict(evals, **kw):
    """GateCheck on gate samples that are fine (TD scale off its floor), with these per-episode evaluation returns."""
    rng = np.random.default_rng(0)
    td = np.abs(rng.normal(size=500))
    ok = np.ones(500, bool)
    return gwt_ib.gatecheck(td, td, td, ok, td, 0.0, 0.5, [np.asarray(e, float) for e in evals], tiny_cfg(**kw))


def test_eval_ok_is_a_test_on_episode_returns_with_a_minimum_effect():
    """eval_ok: the last k evaluations' episodes beat the first evaluation's by a one-sided Welch test AND by at
    least eval_ok_min_effect of the return range; never a fixed margin in return units."""
    rng = np.random.default_rng(1)
    noise = lambda mu, sd=1.0: mu + sd * rng.normal(size=32)  # noqa: E731
    same = verdict([noise(20, 10) for _ in range(9)])  # an agent that learned nothing: evaluations differ by noise
    assert same["eval_ok"] is False and same["verdict"] == "FAIL"
    learned = verdict([noise(20 + 30 * i, 10) for i in range(9)])
    assert learned["eval_ok"] and learned["verdict"] == "PASS" and learned["eval_k"] == 2
    lost = verdict([noise(20, 10), noise(400, 10), noise(20, 10)])  # learned, then lost it: the final policy fails
    assert lost["eval_ok"] is False and lost["best_eval"] == pytest.approx(400, abs=10)
    tiny = verdict([noise(0, 0.01), [-50.0, 50.0], noise(0.05, 0.01)])  # significant, but 0.05 of a range of 100
    assert tiny["eval_t"] > tiny["eval_t_crit"] and tiny["eval_ok"] is False
    assert verdict([noise(-0.5, 0.3), np.ones(32)])["eval_ok"]  # solved by the second evaluation: no spread there
    assert verdict([np.ones(32), np.ones(32)])["eval_ok"] is False  # nothing to improve: no difference
    assert verdict([noise(0)])["eval_ok"] is False and verdict([])["verdict"] == "FAIL"
    assert verdict([noise(0), noise(1)], eval_ok_alpha=0.2)["eval_t_crit"] < verdict([noise(0), noise(1)])["eval_t_crit"]


def test_gatecheck_std_ok_and_correlations():
    """std_ok: the TD scale off its clamp floor in at least half of the window's normalizer updates (a small scale
    off the floor is what a solved task has); correlations are Pearson's, rho(td,residual) on the residual alone."""
    cfg, rng = tiny_cfg(), np.random.default_rng(0)
    td = np.abs(rng.normal(size=2000))
    c = 1 / (1 + np.exp(-(5 * td - 2.5)))
    dc, ok, res = np.diff(c, prepend=c[:1]), np.ones(2000, bool), rng.normal(size=2000)
    ok[0] = False
    rising = [np.full(8, float(i)) + rng.normal(size=8) for i in range(8)]
    g = gwt_ib.gatecheck(td, c, dc, ok, res, 0.0, 0.5, rising, cfg)
    assert g["verdict"] == "PASS" and g["std_ok"] and g["eval_ok"]
    assert g["rho_td_c"] == pytest.approx(np.corrcoef(td, c)[0, 1]) and g["rho_td_c"] > 0.8 and g["rho_tail"] > 0
    assert g["rho_td_res"] == pytest.approx(np.corrcoef(td, res)[0, 1]) and abs(g["rho_td_res"]) < 0.1
    assert gwt_ib.gatecheck(td, c, dc, ok, res, 0.0, 4.8 * cfg.td_std_min, rising, cfg)["verdict"] == "PASS"
    pinned = gwt_ib.gatecheck(td, c, dc, ok, res, 0.9, cfg.td_std_min, rising, cfg)  # scale stuck at its floor
    assert pinned["std_ok"] is False and pinned["verdict"] == "FAIL"
    e = np.zeros(0)
    empty = gwt_ib.gatecheck(e, e, e, np.zeros(0, bool), e, float("nan"), 0.5, [], cfg)
    assert empty["verdict"] == "FAIL" and math.isnan(empty["rho_td_c"]) and math.isnan(empty["rho_td_res"])


def test_gatecheck_fails_when_nothing_can_be_learned(tmp_path):
    """With lr=0 the weights never change, so evaluation does not improve and GateCheck says FAIL."""
    for seed in range(3):
        s = gwt_ib.train(tiny_cfg(tmp_path, lr=0.0, total_timesteps=512, eval_every=2, eval_episodes=8, seed=seed,
                                  env_id="CartPole-v1"))
        assert s["gatecheck"]["eval_ok"] is False and s["gatecheck"]["verdict"] == "FAIL"


def test_gatecheck_passes_a_task_the_agent_learns(tmp_path):
    """CartPole-v1 with a plain GRU learns within a few thousand steps: the verdict is PASS."""
    s = gwt_ib.train(tiny_cfg(tmp_path, env_id="CartPole-v1", force_c=1.0, num_envs=4, total_timesteps=12_288,
                              lr=3e-3, epochs=4, eval_every=8, eval_episodes=16, seed=0))
    assert s["gatecheck"]["verdict"] == "PASS", s["gatecheck"]


# ----------------------------------------------------------------------------- the counterfactual arms
def evidence(cfg, gate_surprise=None, perturb=True):
    """GateCheck's evidence for a constructed agent (its router made to vary, optionally a patched gate_surprise)."""
    su = built(cfg)
    try:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            for p in su.agent.parameters() if perturb else []:  # an agent whose actions depend on its memory
                p.add_(0.5 * torch.randn(p.shape, generator=g))
            su.agent.bias.fill_(cfg.bias_init)
        if gate_surprise is not None:
            su.agent.gate_surprise = gate_surprise
        return gwt_ib.gate_evidence(su.agent, su.evc, cfg)
    finally:
        close(su)


RF = dict(env_id="popgym-RepeatFirstEasy-v0", eval_episodes=24, hid_dim=16)


def test_a_gate_that_only_follows_the_start_rule_has_no_surprise_timing():
    """A gate that sees |td| only at an episode's first step (max there, 0 after): holding it at its mean after the
    first step, or removing |td| after the first step, changes no episode: those effects are 0 within their CI,
    and the start rule carries all of the gate's effect."""
    cfg = tiny_cfg(**RF, use_router_residual=False)
    start_only = lambda td, start: torch.where(start > 0, cfg.td_norm_clip, 0.0)  # noqa: E731
    e = evidence(cfg, gate_surprise=start_only)
    for k in ("after the start", "surprise term", "surprise timing"):
        assert abs(e["effects"][k]["mean"]) <= e["effects"][k]["ci"] or e["effects"][k]["mean"] == 0, (k, e)
    assert e["effects"]["start rule"]["mean"] == pytest.approx(e["effects"]["gate vs constant"]["mean"], abs=1e-6)
    assert "learned router" not in e["effects"] and e["policy"] == "sampled" and e["episodes"] == 24


def test_a_gate_that_ignores_the_start_gains_nothing_from_the_start_rule():
    """A gate that is the same at a first step as at every other (no TD term, no router): the constant with the
    start rule kept is the constant itself, so every arm plays the same episodes."""
    e = evidence(tiny_cfg(**RF, td_scale=0.0, use_router_residual=False), perturb=True)
    assert e["returns"]["const_start"] == e["returns"]["const"] == e["returns"]["learned"]
    assert all(v["mean"] == 0 for v in e["effects"].values())


def test_arms_change_what_they_say():
    """Each arm is the learned gate with its one part changed: const holds c at the learned mean everywhere;
    const_start keeps the learned gate at first steps; no_surprise and no_router change the gate; every effect
    is a paired difference of the same episodes, reported with its t-interval."""
    cfg = tiny_cfg(**RF)
    e = evidence(cfg)
    assert set(e["returns"]) == set(gwt_ib.ARMS) and set(e["effects"]) == set(gwt_ib.EFFECTS)
    assert e["consts"]["mean_surprise"] > 0
    assert 0 < e["consts"]["const"] < 1 and 0 < e["consts"]["const_start"] < 1
    for name, (a, b) in gwt_ib.EFFECTS.items():
        d = np.array(e["episode_returns"][a]) - np.array(e["episode_returns"][b])
        assert e["effects"][name]["mean"] == pytest.approx(d.mean())
        assert e["effects"][name]["ci"] == pytest.approx(gwt_ib.t_quantile(0.975, len(d) - 1) * d.std(ddof=1)
                                                         / math.sqrt(len(d)))


def test_fixed_gates_have_no_evidence():
    assert gwt_ib.gate_evidence(None, None, tiny_cfg(force_c=1.0)) == {}


@torch.no_grad()
def test_counterfactual_steps_are_the_agents_own_step_with_one_part_changed():
    """The arms' gated steps against their definitions: learned = Agent.step; const = the gated update with c fixed,
    h_prev + c*(nn.GRUCell(c*z, h_prev) - h_prev); const_start = the learned c at first steps, the constant
    elsewhere; no_surprise / mean_surprise = the step with td 0 / held at a value after first steps; no_router =
    sigmoid(prior) alone."""
    cfg = tiny_cfg(num_envs=4)
    su = built(cfg)
    try:
        ag, H = su.agent, su.agent.H
        for p in ag.router.out.parameters():
            p.normal_(0, 0.5)
        g = torch.Generator().manual_seed(3)
        obs, h = torch.randn(4, ag.obs_dim, generator=g), torch.randn(4, H, generator=g)
        td, start = torch.randn(4, generator=g), torch.tensor([1.0, 0.0, 0.0, 1.0])
        x, hp = ag.features(obs), h * (1 - start)[:, None]  # x = z, the encoded observation
        learned = ag.step(x, *ag.gate_prior(td, start), h)
        for k in (0, 1):
            assert torch.equal(gwt_ib.counterfactual(ag, "learned")(x, td, start, h)[k], learned[k])
        gru = torch.nn.GRUCell(cfg.enc_dim, H)  # a plain GRU cell carrying the agent's memory weights
        gru.load_state_dict(ag.memory.cell.state_dict())
        c, hc = gwt_ib.counterfactual(ag, "const", 0.3)(x, td, start, h)
        assert (c == 0.3).all() and torch.allclose(hc, hp + 0.3 * (gru(0.3 * ag.enc(obs), hp) - hp), atol=1e-6)
        c, _ = gwt_ib.counterfactual(ag, "const_start", 0.3)(x, td, start, h)
        assert torch.equal(c[start > 0], learned[0][start > 0]) and (c[start == 0] == 0.3).all()
        c, _ = gwt_ib.counterfactual(ag, "no_surprise")(x, td, start, h)
        assert torch.equal(c, ag.step(x, *ag.gate_prior(torch.where(start > 0, td, 0.0), start), h)[0])
        c, _ = gwt_ib.counterfactual(ag, "mean_surprise", 0.7)(x, td, start, h)
        assert torch.equal(c, ag.step(x, *ag.gate_prior(torch.where(start > 0, td, 0.7), start), h)[0])
        c, _ = gwt_ib.counterfactual(ag, "no_router")(x, td, start, h)
        assert torch.allclose(c, torch.sigmoid(ag.gate_prior(td, start)[0]))
        assert ag.router.out.weight.abs().sum() > 0 and not torch.equal(c, learned[0])  # the agent itself is untouched
    finally:
        close(su)


# ----------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("mode", ["zero", "max", "carry"])
def test_evaluation_scores_episodes_that_start_as_in_training(mode):
    """The router sees at the scored episode's first step what it sees in training: 0, td_norm_clip, or with
    `carry` the TD carried from an episode before (each eval env first plays one unscored episode)."""
    cfg = tiny_cfg(num_envs=2, eval_episodes=3, episode_start_td=mode)
    su = built(cfg)
    try:
        su.norm.scale.fill_(0.01)  # TD errors in units where the carried one is clearly not 0
        tr = gwt_ib.evaluate(su.evc, cfg, trace=True).trace
        first = tr["td_abs"][0]
        assert {"zero": first == 0, "max": first == cfg.td_norm_clip, "carry": 0 < first}[mode], (mode, first)
        assert tr["policy"] == "sampled"
    finally:
        close(su)


def test_sampled_evaluation_replays_the_same_episodes():
    """Fixed env seeds and fixed sampling noise: sampled and greedy returns repeat exactly, and training's
    random streams are untouched."""
    cfg = tiny_cfg(num_envs=2, eval_episodes=4)
    su = built(cfg)
    try:
        before = torch.get_rng_state()
        for greedy in (False, True):
            a, b = gwt_ib.evaluate(su.evc, cfg, greedy=greedy), gwt_ib.evaluate(su.evc, cfg, greedy=greedy)
            np.testing.assert_array_equal(a.returns, b.returns)
            assert len(a.returns) == 4 and 0 <= a.mean_c <= 1
        assert torch.equal(before, torch.get_rng_state())
    finally:
        close(su)


# ----------------------------------------------------------------------------- --evaluate RUN
def test_evaluate_a_finished_run_again_writes_only_a_new_file(tmp_path):
    """--evaluate RUN --eval-episodes N: the run's checkpoint with GateCheck's arms over N episodes, printed and
    written to a new evaluate-*.json; every other file of the run is unchanged; other settings are refused."""
    s = gwt_ib.train(tiny_cfg(tmp_path, env_id="popgym-RepeatFirstEasy-v0", total_timesteps=128))
    run = Path(s["run_dir"])
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    p = subprocess.run([sys.executable, "gwt_ib.py", "--evaluate", str(run), "--eval-episodes", "12"], cwd=ROOT,
                       capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr
    assert "over 12 paired episodes" in p.stdout and "start rule" in p.stdout
    new = [q for q in run.iterdir() if q.name not in before]
    assert len(new) == 1 and new[0].name.startswith("evaluate-") and new[0].suffix == ".json"
    out = json.loads(new[0].read_text())
    assert out["episodes"] == 12 and out["update"] == 2 and set(out["evidence"]["returns"]) == set(gwt_ib.ARMS)
    assert {q.name: q.read_bytes() for q in run.iterdir() if q.name in before} == before
    for args, field in ((["--lr", "0.1"], "--lr"), (["--eval-episodes", "0"], "--eval-episodes")):
        p = subprocess.run([sys.executable, "gwt_ib.py", "--evaluate", str(run), *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=240)
        assert p.returncode == 2 and p.stderr.startswith(f"gwt_ib.py: error: {field}") and p.stderr.count("\n") == 1
    (run / "checkpoint.pt").write_bytes(b"garbage")
    p = subprocess.run([sys.executable, "gwt_ib.py", "--evaluate", str(run)], cwd=ROOT, capture_output=True,
                       text=True, timeout=240)
    assert p.returncode == 2 and "--evaluate" in p.stderr and "does not load" in p.stderr
    assert p.stderr.count("\n") == 1

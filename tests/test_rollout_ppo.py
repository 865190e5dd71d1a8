"""Rollout, recurrent PPO minibatching, the clean TD bootstrap, GAE, the IB loss and the TD normalizer."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gwt_ib
from conftest import built, tiny_cfg

T, N, L = 64, 4, 16


@pytest.fixture(scope="module")
def roll():
    """One rollout of CountRecallEasy (frequent episode ends) from a fresh build."""
    cfg = tiny_cfg(num_envs=N, rollout_steps=T, seq_len=L, minibatches=4, total_timesteps=T * N, hid_dim=24)
    su = built(cfg)
    b, last_value, finished = gwt_ib.rollout(su.col, T)
    yield su, b, last_value, finished
    su.envs.close()
    su.eval_envs.close()


def next_obs_and_h(su, b):
    """o_{t+1} and h_t (the memory after step t) for every stored step, including the last one."""
    obs_next = torch.cat([b["obs"][1:], su.col.obs[None]])
    h_t = torch.cat([b["h0"][1:], su.col.h[None]])
    return obs_next, h_t


@torch.no_grad()
def test_collector_carries_the_next_steps_hidden_projection_exactly():
    """The rollout computes recur(h_t) once, for the clean bootstrap, and reuses it as the next step's
    recur(h_t * keep): after steps with episode ends it equals a fresh recur(hp) bit for bit."""
    cfg = tiny_cfg(num_envs=N, hid_dim=24)
    su = built(cfg)
    col, starts = su.col, 0
    for _ in range(120):  # CountRecallEasy episodes last ~50 steps
        col.step(greedy=False, update_norm=True)
        keep = su.agent.gate_prior(col.td_prev, col.start)[1]
        assert torch.equal(col.hp, col.h * keep)
        assert torch.equal(col.hh, su.agent.recur(col.hp))
        starts += int(col.start.sum())
    assert starts > 0  # episode ends happened, so the b_h rows were exercised
    su.envs.close()
    su.eval_envs.close()


def test_buffer_has_every_key_with_time_major_shapes(roll):
    """rollout() returns (T, N, ...) tensors for every documented key, last_value (N,) and finished episodes."""
    su, b, last_value, finished = roll
    keys = {"obs", "h0", "td_prev", "start", "act", "logp", "value", "reward", "term", "trunc", "c", "td", "v_boot"}
    assert keys <= set(b)
    for k in keys:
        assert b[k].shape[:2] == (T, N), k
        assert torch.isfinite(b[k].float()).all(), k
    assert b["h0"].shape == (T, N, su.agent.H)
    assert last_value.shape == (N,)
    assert torch.all(b["start"][0] == 1)  # fresh reset
    assert torch.all(b["h0"][0] == 0) and torch.all(b["td_prev"][0] == 0)
    assert len(finished) > 0
    assert ((b["c"] >= 0) & (b["c"] <= 1)).all() and b["c"].std() > 0.01  # a gate, and it moves with |td|


@torch.no_grad()
def test_stored_h0_is_the_rollout_memory_at_each_sequence_start(roll):
    """to_sequences(b, L)["h0"][s] is the memory the rollout had just before sequence s's first step."""
    su, b, _, _ = roll
    agent = su.agent
    # replay the rollout with Agent.step from the first stored state
    h = b["h0"][0]
    replay = []
    for t in range(T):
        replay.append(h)
        _, _, _, h = agent.step(b["obs"][t], h, b["td_prev"][t], b["start"][t])
    replay = torch.stack(replay)
    torch.testing.assert_close(replay, b["h0"], atol=1e-5, rtol=0)
    torch.testing.assert_close(h, su.col.h, atol=1e-5, rtol=0)
    seq = gwt_ib.to_sequences(b, L)
    S = T // L * N
    assert seq["h0"].shape == (S, agent.H) and seq["obs"].shape[:2] == (L, S)
    seen = set()
    for s in range(S):  # locate each sequence in the rollout by its (unique, float) values
        hits = [(k, n) for k in range(T // L) for n in range(N)
                if torch.equal(seq["value"][:, s], b["value"][k * L:(k + 1) * L, n])]
        assert len(hits) == 1
        k, n = hits[0]
        seen.add((k, n))
        for key in ("obs", "td_prev", "start", "act", "logp"):
            assert torch.equal(seq[key][:, s], b[key][k * L:(k + 1) * L, n]), key
        torch.testing.assert_close(seq["h0"][s], replay[k * L, n], atol=1e-5, rtol=0)
    assert len(seen) == S
    assert any(seq["h0"][s].abs().sum() > 0 for s in range(S))  # not all zeros: state is carried across sequences


def test_first_minibatch_recomputes_rollout_logprobs_exactly(roll):
    """Before any gradient step the PPO forward pass reproduces the rollout's log-probs (ratio == 1)."""
    su, b, last_value, _ = roll
    cfg = su.cfg
    seq = gwt_ib.to_sequences(b, L)
    with torch.no_grad():
        logits, value, cs, hs = su.agent.unroll(seq["obs"], seq["h0"], seq["td_prev"], seq["start"])
        newlogp, _ = gwt_ib.logp_entropy(su.agent, logits, seq["act"])
    assert (newlogp - seq["logp"]).abs().max().item() < 1e-5
    assert (value - seq["value"]).abs().max().item() < 1e-5
    assert (cs.mean(-1) - seq["c"]).abs().max().item() < 1e-5
    # and ppo_update sees the same on its first minibatch (work on a copy: the fixture's agent stays untouched)
    su2 = built(cfg)
    su2.agent.load_state_dict(su.agent.state_dict())
    adv, ret = gwt_ib.gae(b, last_value, cfg.gamma, cfg.gae_lambda)
    m = gwt_ib.ppo_update(su2.agent, su2.opt, b, adv, ret, cfg, lam_c=0.05, update=0)
    assert m["ratio0_maxdev"] < 1e-5
    if su.agent.kern is not None and su.agent.kern.gemm:  # every product in the kernel's GEMM: the same bits
        assert torch.equal(newlogp, seq["logp"]) and torch.equal(value, seq["value"])
        assert m["ratio0_maxdev"] == 0.0
    for k in ("pg_loss", "v_loss", "entropy", "ib_loss", "approx_kl", "clipfrac", "grad_norm", "loss"):
        assert math.isfinite(m[k]), k
    assert any(not torch.equal(p, q) for p, q in zip(su.agent.parameters(), su2.agent.parameters()))
    su2.envs.close()
    su2.eval_envs.close()


@torch.no_grad()
def test_td_bootstrap_is_clean(roll):
    """td[t] = r + gamma*(1-term)*V(o_{t+1}, h_t, td_prev=0, start=0) - V_t, not the value under the real td_prev."""
    su, b, _, _ = roll
    gamma = su.cfg.gamma
    obs_next, h_t = next_obs_and_h(su, b)
    done = torch.maximum(b["term"], b["trunc"]) > 0
    zeros = torch.zeros(T, N)
    v_clean = torch.stack([su.agent.step(obs_next[t], h_t[t], zeros[t], zeros[t])[1] for t in range(T)])
    expected = b["reward"] + gamma * (1 - b["term"]) * v_clean - b["value"]
    ok = ~done
    assert ok.sum() > T * N // 2
    torch.testing.assert_close(b["td"][ok], expected[ok], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["v_boot"][ok], v_clean[ok], atol=1e-5, rtol=0)
    # the value under the td_prev the next step really used differs wherever that td_prev is not 0
    v_real = torch.cat([b["value"][1:], torch.full((1, N), float("nan"))])
    nz = ok & (torch.cat([b["td_prev"][1:], zeros[:1]]).abs() > 0.05)
    assert nz.sum() > 10
    assert ((v_real[nz] - v_clean[nz]).abs() > 1e-6).float().mean() > 0.9


def test_router_input_is_previous_normalized_td(roll):
    """td_prev[t+1] = normalize(td[t]) with the normalizer updated once per vector step, and 0 after an episode end."""
    su, b, _, _ = roll
    norm = gwt_ib.TDNormalizer(su.cfg, torch.device("cpu"))
    done = torch.maximum(b["term"], b["trunc"])
    nxt = torch.cat([b["td_prev"][1:], su.col.td_prev[None]])
    for t in range(T):
        norm.update(b["td"][t])
        torch.testing.assert_close(nxt[t], norm.normalize(b["td"][t]) * (1 - done[t]), atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.scale, su.norm.scale, atol=1e-7, rtol=0)
    assert (nxt.abs() > 0.5).any()  # the router really sees surprise


@torch.no_grad()
def test_terminal_steps_are_not_bootstrapped(roll):
    """At a termination td = r - V_t: no value of the next (reset) observation leaks in."""
    su, b, _, _ = roll
    term = b["term"] > 0
    assert term.sum() > 0
    torch.testing.assert_close(b["td"][term], (b["reward"] - b["value"])[term], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- GAE
def gae_reference(r, v, term, trunc, v_boot, last_value, gamma, lam):
    """Per-env, per-step Python GAE: terminal -> no bootstrap; truncation -> bootstrap from v_boot
    (the value of the real final observation) and cut the trace; otherwise the next stored value."""
    Tn, Nn = len(r), len(r[0])
    adv = [[0.0] * Nn for _ in range(Tn)]
    for n in range(Nn):
        running = 0.0
        for t in reversed(range(Tn)):
            if term[t][n]:
                next_v, cont = 0.0, 0.0
            elif trunc[t][n]:
                next_v, cont = v_boot[t][n], 0.0
            else:
                next_v = last_value[n] if t == Tn - 1 else v[t + 1][n]
                cont = 1.0
            delta = r[t][n] + gamma * next_v - v[t][n]
            running = delta + gamma * lam * cont * running
            adv[t][n] = running
    ret = [[adv[t][n] + v[t][n] for n in range(Nn)] for t in range(Tn)]
    return adv, ret


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (0.9, 1.0), (0.5, 0.0)])
def test_gae_matches_naive_reference_with_terminations_and_truncations(gamma, lam):
    """gae() equals a per-env Python loop; truncations bootstrap from v_boot, terminations from nothing."""
    Tn, Nn = 7, 5
    g = torch.Generator().manual_seed(0)
    term = torch.zeros(Tn, Nn)
    trunc = torch.zeros(Tn, Nn)
    term[2, 0] = term[6, 1] = 1  # mid-rollout and last-step terminations
    trunc[3, 2] = trunc[6, 3] = 1  # mid-rollout and last-step truncations
    term[4, 4] = trunc[4, 4] = 1  # terminated and truncated together: terminal wins
    trunc[1, 0] = 1
    b = dict(reward=torch.randn(Tn, Nn, generator=g), value=torch.randn(Tn, Nn, generator=g),
             term=term, trunc=trunc, v_boot=torch.randn(Tn, Nn, generator=g) * 3)
    last_value = torch.randn(Nn, generator=g)
    adv, ret = gwt_ib.gae(b, last_value, gamma, lam)
    ref_adv, ref_ret = gae_reference(b["reward"].tolist(), b["value"].tolist(), term.tolist(), trunc.tolist(),
                                     b["v_boot"].tolist(), last_value.tolist(), gamma, lam)
    torch.testing.assert_close(adv, torch.tensor(ref_adv), atol=1e-5, rtol=0)
    torch.testing.assert_close(ret, torch.tensor(ref_ret), atol=1e-5, rtol=0)


def test_gae_uses_v_boot_only_at_truncations():
    """Changing v_boot changes the advantages only on and before truncated steps of the same episode."""
    b = dict(reward=torch.zeros(4, 2), value=torch.zeros(4, 2), term=torch.zeros(4, 2), trunc=torch.zeros(4, 2),
             v_boot=torch.zeros(4, 2))
    b["trunc"][1, 0] = 1
    b["term"][1, 1] = 1
    adv0, _ = gwt_ib.gae(b, torch.zeros(2), 0.9, 0.8)
    b["v_boot"] += 10.0
    adv1, _ = gwt_ib.gae(b, torch.zeros(2), 0.9, 0.8)
    changed = (adv1 - adv0).abs() > 1e-6
    assert changed.tolist() == [[True, False], [True, False], [False, False], [False, False]]
    assert adv1[1, 0].item() == pytest.approx(9.0)
    assert adv1[0, 0].item() == pytest.approx(0.9 * 0.8 * 9.0)


# ----------------------------------------------------------------------------- IB loss and weight
def test_ib_sq_loss_known_value():
    """"sq": mean over sequences of (mean_t c - target_c)^2, with vector gates averaged over units too."""
    cfg = tiny_cfg(target_c=0.35)
    c = torch.tensor([[0.5, 0.0], [0.5, 0.2], [0.5, 0.4], [0.5, 0.2]]).unsqueeze(-1)  # (L=4, B=2, 1)
    expected = ((0.5 - 0.35) ** 2 + (0.2 - 0.35) ** 2) / 2
    assert gwt_ib.ib_loss(c, cfg).item() == pytest.approx(expected, abs=1e-7)
    cv = torch.stack([torch.full((4, 2), 0.1), torch.full((4, 2), 0.9)], -1)  # (4, 2, G=2), unit mean 0.5
    assert gwt_ib.ib_loss(cv, cfg).item() == pytest.approx((0.5 - 0.35) ** 2, abs=1e-7)


def test_ib_sq_loss_zero_when_every_sequence_meets_the_budget():
    """A sequence whose mean gate equals target_c costs nothing, however its gates vary over time."""
    cfg = tiny_cfg(target_c=0.25)
    c = torch.tensor([[0.0, 0.25, 1.0], [0.5, 0.25, 0.0], [0.5, 0.25, 0.0], [0.0, 0.25, 0.0]]).unsqueeze(-1)
    assert gwt_ib.ib_loss(c, cfg).item() == pytest.approx(0.0, abs=1e-12)
    # the budget is per sequence: two sequences at 0 and 0.5 average to 0.25 but still pay
    c2 = torch.tensor([[0.0, 0.5]] * 4).unsqueeze(-1)
    assert gwt_ib.ib_loss(c2, cfg).item() == pytest.approx(0.25 ** 2, abs=1e-7)


def test_ib_kl_loss_nonnegative_zero_at_target_and_known_value():
    """"kl": mean KL(Bern(c) || Bern(target_c)) is >= 0, 0 at c == target_c, and matches the formula."""
    cfg = tiny_cfg(ib_loss="kl", target_c=0.35)
    torch.manual_seed(0)
    c = torch.rand(16, 8, 1)
    assert gwt_ib.ib_loss(c, cfg).item() >= 0
    assert gwt_ib.ib_loss(torch.full((16, 8, 1), 0.35), cfg).item() == pytest.approx(0.0, abs=1e-6)
    p = 0.35
    kl = 0.5 * math.log(0.5 / p) + 0.5 * math.log(0.5 / (1 - p))
    assert gwt_ib.ib_loss(torch.full((3, 2, 1), 0.5), cfg).item() == pytest.approx(kl, rel=1e-5)
    for edge in (0.0, 1.0):  # saturated gates give a finite loss and gradient
        ce = torch.full((3, 2, 1), edge, requires_grad=True)
        loss = gwt_ib.ib_loss(ce, cfg)
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(ce.grad).all()


def test_ib_weight_warms_up_linearly_from_zero():
    """ib_weight is 0 at update 0, rises linearly over budget_warmup_updates, then stays at lambda_c."""
    cfg = tiny_cfg(lambda_c=0.2, budget_warmup_updates=10)
    w = [gwt_ib.ib_weight(cfg, u, 100) for u in range(30)]
    assert w[0] == 0.0
    for u in range(11):
        assert w[u] == pytest.approx(0.2 * u / 10)
    assert all(x == pytest.approx(0.2) for x in w[10:])
    nowarm = tiny_cfg(lambda_c=0.2, budget_warmup_updates=0)
    assert gwt_ib.ib_weight(nowarm, 0, 100) == pytest.approx(0.2)


def test_ib_weight_follows_lambda_c_end_schedule():
    """With lambda_c_end the weight moves linearly from lambda_c (first update) to lambda_c_end (last update)."""
    cfg = tiny_cfg(lambda_c=0.1, lambda_c_end=0.5, budget_warmup_updates=0)
    n = 9
    w = [gwt_ib.ib_weight(cfg, u, n) for u in range(n)]
    assert w[0] == pytest.approx(0.1) and w[-1] == pytest.approx(0.5)
    assert np.allclose(np.diff(w), 0.05)
    warm = tiny_cfg(lambda_c=0.1, lambda_c_end=0.5, budget_warmup_updates=4)
    assert gwt_ib.ib_weight(warm, 2, n) == pytest.approx(0.5 * (0.1 + 0.4 * 2 / 8))


# ----------------------------------------------------------------------------- bias clamp
@pytest.mark.parametrize("target_c,side", [(0.99, "max"), (0.01, "min")])
def test_bias_stays_clamped_under_huge_updates(target_c, side):
    """After every optimizer step the gate bias lies in [bias_clamp_min, bias_clamp_max], however hard it is pushed."""
    lo, hi = -2.0, 1.0
    start = hi - 0.1 if side == "max" else lo + 0.1
    cfg = tiny_cfg(num_envs=2, rollout_steps=32, seq_len=16, minibatches=1, epochs=2, total_timesteps=64,
                   lr=10.0, target_c=target_c, lambda_c=1e4, bias_clamp_min=lo, bias_clamp_max=hi, bias_init=start)
    su = built(cfg)
    b, last_value, _ = gwt_ib.rollout(su.col, cfg.rollout_steps)
    adv, ret = gwt_ib.gae(b, last_value, cfg.gamma, cfg.gae_lambda)
    # Adam's first step moves the bias by ~lr = 10 towards the budget: far past either clamp
    gwt_ib.ppo_update(su.agent, su.opt, b, adv, ret, cfg, lam_c=cfg.lambda_c, update=0)
    assert su.agent.bias.item() == (hi if side == "max" else lo)
    su.envs.close()
    su.eval_envs.close()


# ----------------------------------------------------------------------------- TD normalizer
MODES = ["ema", "quantile", "ema_quantile"]
HALF_NORMAL_Q90 = 1.6448536  # quantile_0.9 of |N(0, 1)|


def feed(norm, sigma, steps, n=16, gen=None, mean=0.0):
    for _ in range(steps):
        norm.update(torch.randn(n, generator=gen) * sigma + mean)


def expected_scale(mode, sigma):
    return sigma if mode == "ema" else HALF_NORMAL_Q90 * sigma


def steps_to_adapt(cfg, mode, n=16):
    """Vector steps after which a 100x change of the TD scale is tracked to within a factor 2.
    ema: the variance is an EMA with rate td_ema: its old part (up to 1e4 x) decays below 3x the new
    one after ln(1e4/3)/(1-td_ema) steps. ema_quantile: the scale is an EMA with rate td_scale_ema2: the
    old part (up to 100 x) decays below the new one after ln(100)/(1-td_scale_ema2) steps. quantile:
    the window holds td_window errors, so it is entirely new after td_window/n steps."""
    if mode == "ema":
        k = math.log(1e4 / 3) / (1 - cfg.td_ema)
    elif mode == "ema_quantile":
        k = math.log(100) / (1 - cfg.td_scale_ema2)
    else:
        k = cfg.td_window / n
    return int(math.ceil(k * 1.1))


@pytest.mark.parametrize("mode", MODES)
def test_td_normalizer_does_not_pin_at_floor_for_small_nonzero_tds(mode):
    """TD errors of std 0.01 give a scale near their std (ema) or |td| 0.9-quantile, far above td_std_min."""
    cfg = tiny_cfg(td_scale_mode=mode)
    norm = gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
    feed(norm, 0.01, 600, gen=torch.Generator().manual_seed(0))
    s = norm.scale.item()
    assert s == pytest.approx(expected_scale(mode, 0.01), rel=0.15)
    assert s > 5 * cfg.td_std_min  # GateCheck's std_ok
    assert abs(norm.mean.item()) < 0.003


@pytest.mark.parametrize("direction", ["up", "down"])
@pytest.mark.parametrize("mode", MODES)
def test_td_normalizer_adapts_to_100x_scale_change(mode, direction):
    """After a 100x change of the TD std, the scale is within 2x of the new one after steps_to_adapt() steps."""
    cfg = tiny_cfg(td_scale_mode=mode)
    norm = gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    s0, s1 = (0.01, 1.0) if direction == "up" else (1.0, 0.01)
    feed(norm, s0, steps_to_adapt(cfg, mode), gen=gen)
    assert norm.scale.item() == pytest.approx(expected_scale(mode, s0), rel=0.2)
    feed(norm, s1, steps_to_adapt(cfg, mode), gen=gen)
    ratio = norm.scale.item() / expected_scale(mode, s1)
    assert 0.5 < ratio < 2.0


@pytest.mark.parametrize("n", [1, 2, 3, 16, 17, 4096])
def test_td_normalizer_quantile_equals_torch_quantile(n):
    """The normalizer's sort-based quantile (torch.quantile costs ~100 us per env step) is torch.quantile."""
    g = torch.Generator().manual_seed(n)
    for q in (0.0, 0.1, 0.5, 0.9, 0.95, 1.0):
        v = torch.randn(n, generator=g)
        assert torch.equal(gwt_ib.TDNormalizer.quantile(v, q), torch.quantile(v, q)), q


@pytest.mark.parametrize("mode", ["quantile", "ema_quantile"])
def test_td_normalizer_robust_to_one_huge_outlier(mode):
    """In the quantile modes one TD error of 1e6 in a batch moves neither the mean nor the scale much."""
    cfg = tiny_cfg(td_scale_mode=mode)
    norm = gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
    gen = torch.Generator().manual_seed(2)
    feed(norm, 1.0, 300, n=64, gen=gen)
    m0, s0 = norm.mean.item(), norm.scale.item()
    d = torch.randn(64, generator=gen)
    d[17] = 1e6
    norm.update(d)
    assert abs(norm.mean.item() - m0) < 0.1
    assert 0.8 < norm.scale.item() / s0 < 1.25
    assert norm.normalize(torch.tensor([1e6])).item() == cfg.td_norm_clip


@pytest.mark.parametrize("mode", MODES)
def test_td_normalizer_output_is_clipped_and_centered(mode):
    """normalize() = clip((d - mean)/scale, -td_norm_clip, td_norm_clip)."""
    cfg = tiny_cfg(td_scale_mode=mode, td_norm_clip=3.0)
    norm = gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
    feed(norm, 2.0, 50, gen=torch.Generator().manual_seed(3), mean=1.0)
    d = torch.tensor([-1e9, -3.0, 0.0, 1.0, 2.5, 1e9])
    out = norm.normalize(d)
    assert out[0].item() == -3.0 and out[-1].item() == 3.0
    torch.testing.assert_close(out, ((d - norm.mean) / norm.scale).clamp(-3, 3), atol=1e-6, rtol=0)
    assert out.abs().max().item() <= 3.0


@pytest.mark.parametrize("mode", MODES)
def test_td_normalizer_scale_clamped_to_bounds(mode):
    """The scale never leaves [td_std_min, td_std_max]: all-zero TDs give td_std_min, huge ones td_std_max."""
    cfg = tiny_cfg(td_scale_mode=mode)
    norm = gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
    feed(norm, 0.0, 5)
    assert norm.scale.item() == pytest.approx(cfg.td_std_min)
    norm2 = gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
    feed(norm2, 1e6, 5, gen=torch.Generator().manual_seed(4))
    assert norm2.scale.item() == pytest.approx(cfg.td_std_max)

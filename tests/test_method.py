"""The method's invariants, checked against reference behaviour (plain torch modules), never against how the agent
lays out its weights:

  c_t = sigmoid(td_scale*|surprise_t| + base_logit + bias [+ MLP([z_t, h_{t-1}])])
  s_t = s_{t-1} + c_t * (cell(c_t * z_t, s_{t-1}) - s_{t-1})
        cell: nn.GRUCell (s = h) or nn.LSTMCell (s = (h, cell state)), with the agent's memory weights
  surprise_{t+1} = normalize(signal_t), signal_t by --surprise:
        td            r_t + gamma*(1-term_t)*V(o_{t+1}, s_t, surprise=0) - V_t
        value_change  gamma*(1-term_t)*V(o_{t+1}, s_t, surprise=0) - V_t
        reward        r_t
        none          no signal: surprise stays 0, the gate is its prior
  loss = PPO clip + vf_coef*value - ent_coef*entropy + lambda_c * IB(c)

Gated memory (GRU and LSTM), episode resets, the surprise prior and the router, action distributions, the rollout
buffer, recurrent PPO's stored state, the clean TD bootstrap and the surprise signals, GAE, the IB loss and weight,
the bias clamp and the TD normalizer. The C accelerator has its own tests; here it appears only where the PPO ratio
must be 1 with it too."""
from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gymnasium import spaces

import gwt_ib
from conftest import built, close, step_from_obs, tiny_cfg

OBS_DIM, B = 7, 5
MEMORIES = ["gru", "lstm"]


def make_agent(act_space=spaces.Discrete(4), obs_dim=OBS_DIM, seed=0, **kw) -> gwt_ib.Agent:
    torch.manual_seed(seed)
    kw = {"enc_dim": 12, "hid_dim": 10, "router_hid": 6, "head_hid": 8, **kw}
    agent = gwt_ib.Agent(obs_dim, gwt_ib.action_spec(act_space), tiny_cfg(**kw))
    assert agent.accel is None  # the reference step
    return agent


# --- the memory state as the plain cells hold it: h for nn.GRUCell, (h, cell state) for nn.LSTMCell, which the
# agent carries as one (B, 2H) tensor [h, cell state]
def parts(agent, state) -> tuple:
    H = agent.cfg.hid_dim
    return (state,) if agent.cfg.memory == "gru" else (state[..., :H], state[..., H:])


def state_of(*ps) -> torch.Tensor:
    return torch.cat(ps, -1)


def h_of(agent, state) -> torch.Tensor:
    """What the router and the heads read: h (not the LSTM's cell state)."""
    return parts(agent, state)[0]


def plain_cell(agent):
    """The reference memory: a fresh nn.GRUCell / nn.LSTMCell carrying agent.memory.cell's weights, as a function
    (z, state) -> next state; state None = the cell's own zero state."""
    E, H = agent.cfg.enc_dim, agent.cfg.hid_dim
    cell = (torch.nn.GRUCell if agent.cfg.memory == "gru" else torch.nn.LSTMCell)(E, H)
    cell.load_state_dict(agent.memory.cell.state_dict())  # strict: the same parameters, nothing more or less
    cell.to(next(agent.parameters()).dtype)

    def step(z, state=None):
        if agent.cfg.memory == "gru":
            return cell(z, state)
        return state_of(*cell(z, None if state is None else parts(agent, state)))
    return step


def inputs(agent, seed=1, b=B):
    """obs, a previous memory state (h in (-1, 1); an LSTM cell state unbounded), a surprise and no episode start."""
    g = torch.Generator().manual_seed(seed)
    H = agent.cfg.hid_dim
    obs = torch.randn(b, OBS_DIM, generator=g)
    ps = [torch.randn(b, H, generator=g).tanh()] + [2 * torch.randn(b, H, generator=g)] * (agent.cfg.memory == "lstm")
    surprise = torch.randn(b, generator=g) * 0.5
    return obs, state_of(*ps), surprise, torch.zeros(b)


def randomize_router(agent, std=1.0):
    """The router's output layer starts at zero; a non-zero one makes the residual MLP matter."""
    with torch.no_grad():
        for p in agent.router.out.parameters():
            p.normal_(0, std)


def prior_logit(agent, surprise):
    cfg = agent.cfg
    return cfg.td_scale * surprise.abs() + cfg.base_logit + agent.bias.detach()


def linears(seq) -> list:
    return [m for m in seq if isinstance(m, torch.nn.Linear)]


def router_residual(agent, z, h_prev):
    """The router written out as a plain MLP over cat([z, h_prev]): router_layers tanh layers of width router_hid,
    then the output layer to G gate logits."""
    cfg, r = agent.cfg, agent.router
    hidden = linears(r.mlp)
    assert len(hidden) == cfg.router_layers
    assert [(l.in_features, l.out_features) for l in hidden] == \
        [(cfg.enc_dim + cfg.hid_dim, cfg.router_hid)] + [(cfg.router_hid, cfg.router_hid)] * (cfg.router_layers - 1)
    a = torch.cat([z, h_prev], -1)
    for lin in hidden:
        a = torch.tanh(a @ lin.weight.T + lin.bias)
    return a @ r.out.weight.T + r.out.bias


def gated(agent, c, z, state):
    """The reference gated write: each memory unit j (h_j and, for the LSTM, its cell state c_j) moves c_j of the way
    to the plain cell's proposal from the input scaled by the (mean) gate."""
    c_in = c.mean(-1, keepdim=True)
    proposal = plain_cell(agent)(c_in * z, state)
    return state_of(*(p + c * (q - p) for p, q in zip(parts(agent, state), parts(agent, proposal))))


# ----------------------------------------------------------------------------- gated memory
def _learned_gate_at_zero(memory):
    agent = make_agent(memory=memory)
    agent.bias.fill_(-1e4)  # sigmoid underflows to exactly 0
    return agent


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("zero_gate", [lambda m: make_agent(force_c=0.0, memory=m), _learned_gate_at_zero],
                         ids=["forced c=0", "learned gate at 0"])
@torch.no_grad()
def test_gate_zero_freezes_memory_exactly(zero_gate, memory):
    """With c = 0, forced or learned, the memory is not written at all: the whole state (h, and the LSTM's cell
    state) equals the previous one bit for bit."""
    agent = zero_gate(memory)
    obs, s_prev, surprise, start = inputs(agent)
    assert not torch.allclose(plain_cell(agent)(torch.zeros(B, agent.cfg.enc_dim), s_prev), s_prev)  # a cell moves it
    _, _, c, s = step_from_obs(agent, obs, s_prev, surprise, start)
    assert torch.all(c == 0)
    assert s.shape == s_prev.shape
    for name, p, q in zip(("h", "cell state"), parts(agent, s), parts(agent, s_prev)):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("memory", MEMORIES)
@torch.no_grad()
def test_gate_one_is_a_plain_cell_step(memory):
    """With c = 1 (force_c=1) the update is the plain nn.GRUCell(z, h_prev) / nn.LSTMCell(z, (h_prev, cell_prev))
    carrying the agent's memory weights."""
    agent = make_agent(force_c=1.0, memory=memory)
    obs, s_prev, surprise, start = inputs(agent)
    _, _, c, s = step_from_obs(agent, obs, s_prev, surprise, start)
    assert torch.all(c == 1)
    torch.testing.assert_close(s, plain_cell(agent)(agent.features(obs), s_prev), atol=1e-6, rtol=0)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("residual", [True, False], ids=["router-residual", "prior-only"])
@torch.no_grad()
def test_learned_gate_follows_the_formula(residual, memory):
    """c = sigmoid(td_scale*|surprise| + base_logit + bias [+ MLP([z, h_prev])]) and
    s = s_prev + c*(cell(c*z, s_prev) - s_prev) for the whole state."""
    agent = make_agent(use_router_residual=residual, memory=memory)
    assert (agent.router is not None) == residual
    if residual:
        randomize_router(agent)
    obs, s_prev, surprise, start = inputs(agent)
    _, _, c, s = step_from_obs(agent, obs, s_prev, surprise, start)
    z = agent.features(obs)
    logit = prior_logit(agent, surprise)[:, None] + (router_residual(agent, z, h_of(agent, s_prev)) if residual else 0)
    assert c.shape == (B, 1)
    torch.testing.assert_close(c, torch.sigmoid(logit), atol=1e-6, rtol=0)
    assert ((c > 0.01) & (c < 0.99)).all() and c.std() > 1e-3  # distinct gates strictly inside (0, 1)
    torch.testing.assert_close(s, gated(agent, c, z, s_prev), atol=1e-6, rtol=0)


@pytest.mark.parametrize("memory", MEMORIES)
@torch.no_grad()
def test_vector_gate_has_one_gate_per_unit_and_zero_freezes(memory):
    """gate="vector": c is (B, hid_dim), c_j = sigmoid(prior + MLP_j([z, h_prev])); unit j (h_j, and the LSTM's
    cell state c_j) moves c_j of the way to the cell's proposal made from the input scaled by the mean gate; all
    gates 0 leave the whole state as it was."""
    agent = make_agent(gate="vector", memory=memory)
    randomize_router(agent)
    obs, s_prev, surprise, start = inputs(agent)
    _, _, c, s = step_from_obs(agent, obs, s_prev, surprise, start)
    assert c.shape == (B, agent.cfg.hid_dim)
    assert c.std(-1).max() > 0.05  # gates differ across units
    z = agent.features(obs)
    torch.testing.assert_close(c, torch.sigmoid(prior_logit(agent, surprise)[:, None]
                                                + router_residual(agent, z, h_of(agent, s_prev))), atol=1e-6, rtol=0)
    torch.testing.assert_close(s, gated(agent, c, z, s_prev), atol=1e-6, rtol=0)
    agent.bias.fill_(-1e4)
    _, _, c0, s0 = step_from_obs(agent, obs, s_prev, surprise, start)
    assert torch.all(c0 == 0)
    assert torch.equal(s0, s_prev)


@pytest.mark.parametrize("memory", MEMORIES)
@torch.no_grad()
def test_heads_read_the_new_memory(memory):
    """logits and value are the actor and critic heads applied to the new h (not to h_prev, nor to a cell state)."""
    agent = make_agent(memory=memory)
    obs, s_prev, surprise, start = inputs(agent)
    logits, value, _, s = step_from_obs(agent, obs, s_prev, surprise, start)
    assert not torch.allclose(h_of(agent, s), h_of(agent, s_prev))
    torch.testing.assert_close(logits, agent.actor(h_of(agent, s)), atol=0, rtol=0)
    torch.testing.assert_close(value, agent.critic(h_of(agent, s)).squeeze(-1), atol=0, rtol=0)
    assert value.shape == (B,) and logits.shape == (B, 4)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("force_c", [None, 1.0], ids=["learned-gate", "force_c=1"])
@torch.no_grad()
def test_memoryless_ignores_the_previous_state(force_c, memory):
    """memoryless=True: the new state (and so c, logits, value) does not depend on the previous state at all."""
    agent = make_agent(memoryless=True, force_c=force_c, memory=memory)
    if force_c is None:
        randomize_router(agent)  # the router reads h_prev too
    obs, s_prev, surprise, start = inputs(agent)
    a = step_from_obs(agent, obs, s_prev, surprise, start)
    b = step_from_obs(agent, obs, torch.randn_like(s_prev) * 3, surprise, start)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    assert not torch.allclose(a[3], torch.zeros_like(a[3]))  # it still writes memory from the observation


# ----------------------------------------------------------------------------- episode starts and unroll
@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("force_c", [None, 1.0], ids=["learned-gate", "force_c=1"])
@torch.no_grad()
def test_episode_start_zeroes_the_whole_state_and_the_surprise(force_c, memory):
    """With episode_start_td="zero", episode_start=1 makes the step identical to a step from an all-zero state
    (h and the LSTM's cell state) and surprise 0; with c = 1 that is the plain cell from its own zero state."""
    agent = make_agent(force_c=force_c, episode_start_td="zero", memory=memory)
    randomize_router(agent)
    obs, s_prev, surprise, _ = inputs(agent)
    start = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    keep, new = 1 - start, start == 1
    out = step_from_obs(agent, obs, s_prev, surprise, start)
    ref = step_from_obs(agent, obs, torch.where(new[:, None], 0.0, s_prev), surprise * keep, torch.zeros(B))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    if force_c is not None:
        torch.testing.assert_close(out[3][new], plain_cell(agent)(agent.features(obs[new])), atol=1e-6, rtol=0)
    free = step_from_obs(agent, obs, s_prev, surprise, torch.zeros(B))  # without the reset rows differ
    for p, q in zip(parts(agent, out[3][new]), parts(agent, free[3][new])):
        assert not torch.allclose(p, q)
    if force_c is None:
        assert not torch.allclose(out[2][new], free[2][new])


@pytest.mark.parametrize("mode", ["zero", "carry", "max"])
@torch.no_grad()
def test_router_sees_episode_start_surprise_at_an_episode_start(mode):
    """At an episode's first step the prior sees |surprise| = 0 ("zero"), the carried surprise of the episode before
    ("carry") or td_norm_clip ("max"); elsewhere the surprise itself. h_prev is zeroed in every mode."""
    agent = make_agent(episode_start_td=mode)
    randomize_router(agent)
    obs, h_prev, surprise, _ = inputs(agent)
    start = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    seen = {"zero": torch.zeros(B), "carry": surprise, "max": torch.full((B,), agent.cfg.td_norm_clip)}[mode]
    seen = torch.where(start > 0, seen, surprise)
    torch.testing.assert_close(agent.gate_surprise(surprise, start), seen, atol=0, rtol=0)
    out = step_from_obs(agent, obs, h_prev, surprise, start)
    z = agent.features(obs)
    keep = (1 - start)[:, None]
    want_c = torch.sigmoid(prior_logit(agent, seen)[:, None] + router_residual(agent, z, h_prev * keep))
    torch.testing.assert_close(out[2], want_c, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[3], step_from_obs(agent, obs, h_prev * keep, seen, torch.zeros(B))[3], atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("memory", MEMORIES)
@pytest.mark.parametrize("gate", ["scalar", "vector"])
@torch.no_grad()
def test_unroll_equals_a_loop_of_steps_with_mid_sequence_resets(gate, memory):
    """unroll() over (L, B) from stored state gives the logits, values, gates and states of L rollout steps."""
    agent = make_agent(gate=gate, memory=memory)
    randomize_router(agent, 0.5)
    L = 9
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(L, B, OBS_DIM, generator=g)
    surprise = torch.randn(L, B, generator=g)
    start = torch.zeros(L, B)
    start[0, 1] = start[4, 0] = start[4, 2] = start[7, 3] = 1.0  # resets mid-sequence
    s0 = inputs(agent, seed=4)[1]
    logits, value, cs, states = agent.unroll(obs, s0, surprise, start)
    assert cs.shape == (L, B, agent.G) and states.shape == (L, B, *s0.shape[1:])
    s = s0
    for t in range(L):
        lt, vt, ct, s = step_from_obs(agent, obs[t], s, surprise[t], start[t])
        torch.testing.assert_close(logits[t], lt, atol=1e-5, rtol=0)
        torch.testing.assert_close(value[t], vt, atol=1e-5, rtol=0)
        torch.testing.assert_close(cs[t], ct, atol=1e-5, rtol=0)
        torch.testing.assert_close(states[t], s, atol=1e-5, rtol=0)
    assert not torch.allclose(states[3], states[5])  # the state moves


@pytest.mark.parametrize("memory", MEMORIES)
def test_unroll_gradients_reach_every_parameter(memory):
    """Every parameter (encoder, memory cell, router, gate bias, heads), by name, gets a non-zero gradient through
    unroll, and the gate bias's gradient, which reaches the loss only through c and the state over time, is the
    finite-difference one (float64)."""
    agent = make_agent(memory=memory).double()
    randomize_router(agent)
    L = 4
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(L, B, OBS_DIM, generator=g, dtype=torch.float64)
    surprise = torch.randn(L, B, generator=g, dtype=torch.float64)
    s0 = inputs(agent, seed=5)[1].double()
    w = [torch.randn(L, B, 4, generator=g, dtype=torch.float64), torch.randn(L, B, generator=g, dtype=torch.float64)]

    def loss():
        logits, value, cs, _ = agent.unroll(obs, s0, surprise, torch.zeros(L, B, dtype=torch.float64))
        return (logits * w[0]).sum() + (value * w[1]).sum() + cs.sum()

    loss().backward()
    grads = {n: p.grad for n, p in agent.named_parameters()}
    blocks = {f"memory.cell.{k}" for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")} | {
        "router.mlp.0.weight", "router.mlp.0.bias", "router.out.weight", "router.out.bias", "bias"}
    assert blocks <= set(grads) and any(n.startswith("enc") for n in grads)
    assert {n.split(".")[0] for n in grads} == {"enc", "memory", "router", "bias", "actor", "critic"}
    assert [n for n, gr in grads.items() if gr is None or gr.abs().sum() == 0] == []
    eps = 1e-6
    with torch.no_grad():
        b0 = agent.bias.item()
        agent.bias.fill_(b0 + eps)
        up = loss().item()
        agent.bias.fill_(b0 - eps)
        down = loss().item()
    assert agent.bias.grad.item() == pytest.approx((up - down) / (2 * eps), rel=1e-6)


# ----------------------------------------------------------------------------- surprise prior and router
@pytest.mark.parametrize("layers", [1, 2])
@torch.no_grad()
def test_router_residual_is_zero_at_init_so_gate_equals_surprise_prior(layers):
    """At initialization c = sigmoid(td_scale*|surprise| + base_logit + bias) exactly: the residual MLP outputs 0."""
    agent = make_agent(router_layers=layers)
    obs, h_prev, surprise, start = inputs(agent)
    _, _, c, _ = step_from_obs(agent, obs, h_prev, surprise, start)
    torch.testing.assert_close(c.squeeze(-1), torch.sigmoid(prior_logit(agent, surprise)), atol=1e-7, rtol=0)
    _, _, c2, _ = step_from_obs(agent, torch.randn(B, OBS_DIM), -h_prev, surprise, start)
    torch.testing.assert_close(c, c2, atol=0, rtol=0)  # neither obs nor h_prev moves it yet


@pytest.mark.parametrize("memory", MEMORIES)
@torch.no_grad()
def test_router_of_two_hidden_layers_is_the_written_out_mlp(memory):
    """router_layers=2: the residual is out(tanh(W2 tanh(W1 [z, h_prev] + b1) + b2)), widths router_hid, and it
    reads h_prev, not the LSTM's cell state."""
    agent = make_agent(router_layers=2, router_hid=5, memory=memory)
    randomize_router(agent)
    r = agent.router
    l1, l2 = linears(r.mlp)  # exactly two hidden layers
    assert (l1.in_features, l1.out_features, l2.in_features, l2.out_features) == (22, 5, 5, 5)
    assert (r.out.in_features, r.out.out_features) == (5, 1)
    obs, s_prev, surprise, start = inputs(agent)
    _, _, c, s = step_from_obs(agent, obs, s_prev, surprise, start)
    z, h = agent.features(obs), h_of(agent, s_prev)
    a1 = torch.tanh(torch.cat([z, h], -1) @ l1.weight.T + l1.bias)
    a2 = torch.tanh(a1 @ l2.weight.T + l2.bias)
    residual = a2 @ r.out.weight.T + r.out.bias
    torch.testing.assert_close(c, torch.sigmoid(prior_logit(agent, surprise)[:, None] + residual), atol=1e-6, rtol=0)
    one_layer = a1 @ r.out.weight.T + r.out.bias  # what a router of one layer fewer would give
    assert (residual - one_layer).abs().max() > 1e-3
    torch.testing.assert_close(s, gated(agent, c, z, s_prev), atol=1e-6, rtol=0)
    if memory == "lstm":  # the cell state does not reach the gate
        _, _, c2, _ = step_from_obs(agent, obs, state_of(h, -3 * parts(agent, s_prev)[1]), surprise, start)
        torch.testing.assert_close(c2, c, atol=0, rtol=0)


@torch.no_grad()
def test_surprise_prior_increases_with_surprise_and_is_sign_symmetric():
    """The gate opens monotonically with |surprise| and treats positive and negative surprise alike."""
    agent = make_agent()
    surprise = torch.linspace(0, 4, 21)
    n = len(surprise)
    obs, s, start = torch.zeros(n, OBS_DIM), torch.zeros_like(inputs(agent, b=n)[1]), torch.zeros(n)
    c_pos = step_from_obs(agent, obs, s, surprise, start)[2].squeeze(-1)
    c_neg = step_from_obs(agent, obs, s, -surprise, start)[2].squeeze(-1)
    assert torch.all(c_pos[1:] > c_pos[:-1])
    torch.testing.assert_close(c_pos, c_neg, atol=0, rtol=0)
    cfg = agent.cfg
    assert c_pos[0].item() == pytest.approx(1 / (1 + math.exp(-(cfg.base_logit + cfg.bias_init))), abs=1e-6)


# ----------------------------------------------------------------------------- action distributions
ACT_SPACES = {
    "discrete": spaces.Discrete(4),
    "discrete_start": spaces.Discrete(3, start=-1),
    "multidiscrete": spaces.MultiDiscrete([3, 5]),
    "box": spaces.Box(-1.0, 1.0, (2,), np.float32),
}


@pytest.mark.parametrize("name", list(ACT_SPACES))
def test_sampled_logp_matches_recomputed_logp(name):
    """sample_action's log-prob equals logp_entropy's log-prob of the same action under the same logits."""
    agent = make_agent(ACT_SPACES[name])
    torch.manual_seed(0)
    logits = torch.randn(64, agent.act.n_out) * 2
    a, logp = gwt_ib.sample_action(agent, logits, greedy=False)
    logp2, ent = gwt_ib.logp_entropy(agent, logits, a)
    torch.testing.assert_close(logp, logp2, atol=1e-6, rtol=0)
    assert logp.shape == ent.shape == (64,)
    if agent.act.kind == "discrete":
        assert torch.all(logp <= 0) and torch.all(logp > -30)  # a probability, never a padded category


@pytest.mark.parametrize("name,expected", [("discrete", math.log(4)), ("discrete_start", math.log(3)),
                                           ("multidiscrete", math.log(3) + math.log(5))])
def test_entropy_of_uniform_logits_is_sum_of_log_n(name, expected):
    """Uniform logits have entropy sum_k log(n_k) (padding of unequal MultiDiscrete sizes adds nothing)."""
    agent = make_agent(ACT_SPACES[name])
    logits = torch.zeros(3, agent.act.n_out)
    a, logp = gwt_ib.sample_action(agent, logits, greedy=False)
    _, ent = gwt_ib.logp_entropy(agent, logits, a)
    torch.testing.assert_close(ent, torch.full((3,), expected), atol=1e-6, rtol=0)
    torch.testing.assert_close(logp, torch.full((3,), -expected), atol=1e-6, rtol=0)


def test_multidiscrete_unequal_sizes_samples_in_range_with_correct_frequencies():
    """MultiDiscrete([3, 5]): each component is sampled from its own softmax and never from padding."""
    agent = make_agent(ACT_SPACES["multidiscrete"])
    torch.manual_seed(0)
    base = torch.tensor([0.5, -1.0, 1.0, 0.2, 0.0, -0.5, 1.5, -2.0])
    logits = base.expand(20000, 8)
    a, _ = gwt_ib.sample_action(agent, logits, greedy=False)
    assert a.shape == (20000, 2)
    assert a[:, 0].max() <= 2 and a[:, 1].max() <= 4 and a.min() >= 0
    for k, sl in ((0, slice(0, 3)), (1, slice(3, 8))):
        p = torch.softmax(base[sl], 0)
        freq = torch.bincount(a[:, k], minlength=len(p)).float() / len(a)
        torch.testing.assert_close(freq, p, atol=0.015, rtol=0)
    greedy, _ = gwt_ib.sample_action(agent, logits[:2], greedy=True)
    assert greedy.tolist() == [[2, 3]] * 2


def test_gaussian_entropy_and_logp_formula():
    """Box: logp is the diagonal Gaussian density with std = exp(log_std); entropy is the Gaussian's
    (relative tolerance: log-densities far in the tails are large numbers)."""
    agent = make_agent(ACT_SPACES["box"])
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([0.3, -0.7]))
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(10, 2, generator=g)
    a = torch.randn(10, 2, generator=g) * 3
    logp, ent = gwt_ib.logp_entropy(agent, mean, a)
    dist = torch.distributions.Normal(mean, agent.log_std.detach().exp())
    torch.testing.assert_close(logp, dist.log_prob(a).sum(-1), rtol=1e-5, atol=0)
    torch.testing.assert_close(ent, dist.entropy().sum(-1), rtol=1e-5, atol=0)


def test_box_logp_is_of_the_unclipped_sample():
    """Box actions are returned unclipped (clipping happens only for the env) and logp is of that sample."""
    agent = make_agent(ACT_SPACES["box"])
    with torch.no_grad():
        agent.log_std.fill_(math.log(3.0))  # std 3 >> bounds [-1, 1]: most samples are outside
    torch.manual_seed(0)
    mean = torch.zeros(200, 2)
    a, logp = gwt_ib.sample_action(agent, mean, greedy=False)
    assert (a.abs() > 1).any()
    ref = torch.distributions.Normal(mean, 3.0).log_prob(a).sum(-1)
    torch.testing.assert_close(logp, ref, rtol=1e-5, atol=0)
    clipped = torch.distributions.Normal(mean, 3.0).log_prob(a.clamp(-1, 1)).sum(-1)
    assert not torch.allclose(logp, clipped)
    greedy, _ = gwt_ib.sample_action(agent, mean + 5, greedy=True)
    assert torch.all(greedy == 5)  # the mean itself, not clipped to the bounds


# ----------------------------------------------------------------------------- rollout
T, N, L = 64, 4, 16


def rollout_cfg(**kw):
    return tiny_cfg(num_envs=N, rollout_steps=T, seq_len=L, minibatches=4, total_timesteps=T * N, hid_dim=24, **kw)


@pytest.fixture(scope="module")
def rolls():
    """rolls(**cfg) -> one rollout of CountRecallEasy (frequent episode ends) from a fresh build of rollout_cfg(**cfg),
    made once per module; `prepare(agent)` runs before it."""
    made = {}

    def get(prepare=None, **kw):
        key = (prepare, *sorted(kw.items()))
        if key not in made:
            su = built(rollout_cfg(**kw))
            if prepare is not None:
                prepare(su.agent)
            made[key] = (su, *gwt_ib.rollout(su.col, T))
        return made[key]
    yield get
    for r in made.values():
        close(r[0])


@pytest.fixture
def roll(rolls):
    return rolls()


def next_obs_and_state(su, b):
    """o_{t+1} and s_t (the memory state after step t) for every stored step, including the last one."""
    return torch.cat([b["obs"][1:], su.col.obs[None]]), torch.cat([b["h0"][1:], su.col.h[None]])


def test_buffer_has_every_key_with_time_major_shapes(roll):
    """rollout() returns (T, N, ...) tensors for every key, last_value (N,) and the finished episodes;
    the first step starts from a fresh reset (start 1, state 0, surprise 0)."""
    su, b, last_value, finished = roll
    keys = {"obs", "h0", "surprise", "start", "act", "logp", "value", "reward", "term", "trunc", "c", "td", "v_boot"}
    assert keys <= set(b)
    for k in keys:
        assert b[k].shape[:2] == (T, N), k
        assert torch.isfinite(b[k].float()).all(), k
    assert b["obs"].dtype == torch.float32 and b["obs"].shape[2] == su.agent.obs_dim
    assert b["h0"].shape == (T, N, su.cfg.hid_dim)  # a GRU's state is h
    assert last_value.shape == (N,)
    assert torch.all(b["start"][0] == 1)
    assert torch.all(b["h0"][0] == 0) and torch.all(b["surprise"][0] == 0)
    assert len(finished) > 0
    assert ((b["c"] >= 0) & (b["c"] <= 1)).all() and b["c"].std() > 0.01  # a gate, and it moves with |surprise|


@pytest.mark.parametrize("memory", MEMORIES)
@torch.no_grad()
def test_stored_h0_is_the_rollout_state_at_each_sequence_start(rolls, memory):
    """b["h0"][t] is the whole memory state before step t (replaying the rollout's steps reproduces it, the LSTM's
    cell state included), and to_sequences(b, L)["h0"][s] is the state just before sequence s's first step."""
    su, b, _, _ = rolls(memory=memory)
    agent = su.agent
    s, replay = b["h0"][0], []
    assert torch.all(s == 0)
    for t in range(T):
        replay.append(s)
        _, value, _, s = step_from_obs(agent, b["obs"][t], s, b["surprise"][t], b["start"][t])
        torch.testing.assert_close(value, b["value"][t], atol=1e-5, rtol=0)
    replay = torch.stack(replay)
    torch.testing.assert_close(replay, b["h0"], atol=1e-5, rtol=0)
    torch.testing.assert_close(s, su.col.h, atol=1e-5, rtol=0)
    for p in parts(agent, b["h0"]):  # every part of the state is stored, and carried
        assert p.abs().sum() > 0
    seq = gwt_ib.to_sequences(b, L)
    S = T // L * N
    assert seq["h0"].shape == (S, *b["h0"].shape[2:]) and seq["obs"].shape[:2] == (L, S)
    seen = set()
    for i in range(S):  # locate each sequence in the rollout by its (unique, float) values
        hits = [(k, n) for k in range(T // L) for n in range(N)
                if torch.equal(seq["value"][:, i], b["value"][k * L:(k + 1) * L, n])]
        assert len(hits) == 1
        k, n = hits[0]
        seen.add((k, n))
        for key in ("obs", "surprise", "start", "act", "logp"):
            assert torch.equal(seq[key][:, i], b[key][k * L:(k + 1) * L, n]), key
        assert torch.equal(seq["h0"][i], b["h0"][k * L, n])
    assert len(seen) == S
    assert any(seq["h0"][i].abs().sum() > 0 for i in range(S))  # state is carried across sequences


@pytest.mark.parametrize("mode", ["zero", "carry", "max"])
@pytest.mark.parametrize("memory,cpu_kernel", [("gru", False), ("gru", True), ("lstm", False)],
                         ids=["gru-reference", "gru-C-accelerator", "lstm-reference"])
def test_first_minibatch_reproduces_rollout_logprobs(memory, cpu_kernel, mode):
    """Before any gradient step the training forward pass (unroll from the stored h0) reproduces the
    rollout's log-probs, values and gates, so PPO's first ratio is 1; for either memory, with the C accelerator
    too (GRU), and for every choice of what the router sees at an episode start."""
    cfg = rollout_cfg(cpu_kernel=cpu_kernel, episode_start_td=mode, memory=memory)
    su = built(cfg)
    try:
        if not cpu_kernel:
            assert su.agent.accel is None
        elif su.agent.accel is None:
            if shutil.which("cc") is None:
                pytest.skip("no C compiler here")
            pytest.fail("a C compiler is here but the accelerator was not used (see the note on stderr)")
        b, last_value, _ = gwt_ib.rollout(su.col, T)
        seq = gwt_ib.to_sequences(b, L)
        with torch.no_grad():
            logits, value, cs, _ = su.agent.unroll(seq["obs"], seq["h0"], seq["surprise"], seq["start"])
            newlogp, _ = gwt_ib.logp_entropy(su.agent, logits, seq["act"])
        assert (newlogp - seq["logp"]).abs().max().item() < 1e-5
        assert (value - seq["value"]).abs().max().item() < 1e-5
        assert (cs.mean(-1) - seq["c"]).abs().max().item() < 1e-5
        before = [p.detach().clone() for p in su.agent.parameters()]
        adv, ret = gwt_ib.gae(b, last_value, cfg.gamma, cfg.gae_lambda)
        m = gwt_ib.ppo_update(su.agent, su.opt, b, adv, ret, cfg, lam_c=0.05, update=0)
        assert m["ratio0_maxdev"] < 1e-5
        for k in ("pg_loss", "v_loss", "entropy", "ib_loss", "approx_kl", "clipfrac", "grad_norm", "loss"):
            assert math.isfinite(m[k]), k
        assert m["approx_kl"] > 0  # later minibatches see the moved policy
        assert any(not torch.equal(p, q) for p, q in zip(before, su.agent.parameters()))
    finally:
        close(su)


@torch.no_grad()
def test_rollout_after_an_update_steps_with_the_new_parameters():
    """The next rollout's first step uses the updated weights (the carried features are recomputed)."""
    cfg = rollout_cfg()
    su = built(cfg)
    b, last_value, _ = gwt_ib.rollout(su.col, T)
    adv, ret = gwt_ib.gae(b, last_value, cfg.gamma, cfg.gae_lambda)
    with torch.enable_grad():
        gwt_ib.ppo_update(su.agent, su.opt, b, adv, ret, cfg, lam_c=0.05, update=0)
    b2, _, _ = gwt_ib.rollout(su.col, 2)
    _, value, c, _ = step_from_obs(su.agent, b2["obs"][0], b2["h0"][0], b2["surprise"][0], b2["start"][0])
    torch.testing.assert_close(b2["value"][0], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(b2["c"][0], c.mean(-1), atol=1e-6, rtol=0)
    close(su)


@torch.no_grad()
def test_td_bootstrap_is_clean(roll):
    """td[t] = r + gamma*(1-term)*V(o_{t+1}, s_t, surprise=0, start=0) - V_t, not the value under the real
    surprise."""
    su, b, _, _ = roll
    obs_next, s_t = next_obs_and_state(su, b)
    done = torch.maximum(b["term"], b["trunc"]) > 0
    zeros = torch.zeros(T, N)
    v_clean = torch.stack([step_from_obs(su.agent, obs_next[t], s_t[t], zeros[t], zeros[t])[1] for t in range(T)])
    expected = b["reward"] + su.cfg.gamma * (1 - b["term"]) * v_clean - b["value"]
    ok = ~done
    assert ok.sum() > T * N // 2
    torch.testing.assert_close(b["td"][ok], expected[ok], atol=1e-5, rtol=0)
    torch.testing.assert_close(b["v_boot"][ok], v_clean[ok], atol=1e-5, rtol=0)
    # the value under the surprise the next step really used differs wherever that surprise is not 0
    v_real = torch.cat([b["value"][1:], torch.full((1, N), float("nan"))])
    nz = ok & (torch.cat([b["surprise"][1:], zeros[:1]]).abs() > 0.05)
    assert nz.sum() > 10
    assert ((v_real[nz] - v_clean[nz]).abs() > 1e-6).float().mean() > 0.9


SIGNALS = {  # --surprise: the signal written out from the buffer's reward, value, v_boot and term
    "td": lambda b, gamma: b["reward"] + gamma * (1 - b["term"]) * b["v_boot"] - b["value"],
    "value_change": lambda b, gamma: gamma * (1 - b["term"]) * b["v_boot"] - b["value"],
    "reward": lambda b, gamma: b["reward"],
}


@pytest.mark.parametrize("kind", list(SIGNALS))
def test_gate_input_is_previous_normalized_surprise(rolls, kind):
    """surprise[t+1] = normalize(signal[t]), with the normalizer fed exactly the signal of --surprise once per
    vector step, also across an episode end (what the gate makes of it at an episode's first step is
    Agent.gate_surprise's business): td = r + gamma*(1-term)*v_boot - V, value_change = gamma*(1-term)*v_boot - V,
    reward = r."""
    su, b, _, _ = rolls(surprise=kind)
    norm = gwt_ib.TDNormalizer(su.cfg, torch.device("cpu"))
    done = torch.maximum(b["term"], b["trunc"])
    assert done.sum() > 0
    signal = SIGNALS[kind](b, su.cfg.gamma)
    others = [SIGNALS[k](b, su.cfg.gamma) for k in SIGNALS if k != kind]
    assert all((signal - o).abs().max() > 1e-3 for o in others)  # the kinds are told apart by this rollout
    torch.testing.assert_close(b["td"], SIGNALS["td"](b, su.cfg.gamma), atol=1e-6, rtol=0)  # td: kept for GAE logs
    nxt = torch.cat([b["surprise"][1:], su.col.surprise[None]])
    for t in range(T):
        norm.update(signal[t])
        torch.testing.assert_close(nxt[t], norm.normalize(signal[t]), atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.scale, su.norm.scale, atol=1e-7, rtol=0)
    torch.testing.assert_close(norm.mean, su.norm.mean, atol=1e-7, rtol=0)
    assert (nxt.abs() > 0.5).any()  # the gate really sees surprise


@torch.no_grad()
def test_surprise_none_keeps_the_gate_at_its_prior(rolls):
    """surprise="none": the surprise stays 0, so c = sigmoid(base_logit + bias + MLP([z, h_prev])) at every step
    but an episode's first, where episode_start_td="max" still adds td_scale*td_norm_clip (and h_prev is 0)."""
    su, b, _, _ = rolls(prepare=randomize_router, surprise="none")  # a non-zero residual: the gate moves
    agent, cfg = su.agent, su.cfg
    assert torch.all(b["surprise"] == 0) and torch.all(su.col.surprise == 0)
    start = b["start"] > 0
    assert start[1:].any() and (~start).sum() > T * N // 2  # episode starts mid-rollout, and other steps
    h_prev = h_of(agent, b["h0"]) * (~start)[..., None]
    residual = router_residual(agent, agent.features(b["obs"]), h_prev).squeeze(-1)
    logit = cfg.base_logit + agent.bias + residual + cfg.td_scale * cfg.td_norm_clip * start
    torch.testing.assert_close(b["c"], torch.sigmoid(logit), atol=1e-6, rtol=0)
    assert b["c"][~start].std() > 0.01  # the residual, not a constant prior, moves it between starts


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
    term, trunc = torch.zeros(Tn, Nn), torch.zeros(Tn, Nn)
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
    assert gwt_ib.ib_loss(torch.rand(16, 8, 1), cfg).item() > 0
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
    assert gwt_ib.ib_weight(tiny_cfg(lambda_c=0.2, budget_warmup_updates=0), 0, 100) == pytest.approx(0.2)


def test_ib_weight_follows_lambda_c_end_schedule():
    """With lambda_c_end the weight moves linearly from lambda_c (first update) to lambda_c_end (last update)."""
    cfg = tiny_cfg(lambda_c=0.1, lambda_c_end=0.5, budget_warmup_updates=0)
    n = 9
    w = [gwt_ib.ib_weight(cfg, u, n) for u in range(n)]
    assert w[0] == pytest.approx(0.1) and w[-1] == pytest.approx(0.5)
    assert np.allclose(np.diff(w), 0.05)
    warm = tiny_cfg(lambda_c=0.1, lambda_c_end=0.5, budget_warmup_updates=4)
    assert gwt_ib.ib_weight(warm, 2, n) == pytest.approx(0.5 * (0.1 + 0.4 * 2 / 8))


def test_budget_constraint_is_a_pi_controlled_lagrange_multiplier():
    """"constraint": the loss term is multiplier * (mean c - target_c); after each update the multiplier is
    integral + kp*e with integral += ki*e, e = the rollout's mean gate - target_c; signed, so a gate below budget
    is pushed up as one above is pushed down. The weight in force is the multiplier (no warm-up schedule)."""
    cfg = tiny_cfg(ib_loss="constraint", target_c=0.35, budget_ki=0.5, budget_kp=5.0)
    c = torch.full((4, 2, 1), 0.45, requires_grad=True)
    loss = gwt_ib.ib_loss(c, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(0.10) and torch.allclose(c.grad, torch.full_like(c, 1 / 8))
    i, m = gwt_ib.dual_step(cfg, 0.0, 0.45)
    assert (i, m) == pytest.approx((0.05, 0.55))
    assert gwt_ib.dual_step(cfg, i, 0.35) == pytest.approx((0.05, 0.05))  # at the target only the integral stays
    assert gwt_ib.dual_step(cfg, 0.0, 0.25)[1] == pytest.approx(-0.55)
    assert gwt_ib.ib_weight(cfg, 0, 100, 0.7) == 0.7
    assert gwt_ib.dual_step(tiny_cfg(), 1.0, 0.9) == (0.0, 0.0)  # the penalty forms have no multiplier


def test_budget_constraint_pulls_the_gate_to_its_target(tmp_path):
    """In training, a gate far above target_c under "constraint" ends nearer the target than with no budget."""
    runs = {ib: gwt_ib.train(tiny_cfg(tmp_path, total_timesteps=64 * 40, target_c=0.1, lr=3e-3, eval_every=0,
                                      ib_loss=ib, lambda_c=0.0)) for ib in ("sq", "constraint")}
    rows = {ib: [json.loads(l) for l in (Path(s["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
            for ib, s in runs.items()}
    last = {ib: np.mean([r["mean_c"] for r in rs[-10:]]) for ib, rs in rows.items()}
    assert abs(last["constraint"] - 0.1) < abs(last["sq"] - 0.1) and rows["constraint"][-1]["lambda_c"] != 0, last


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
    close(su)


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
    assert s > 5 * cfg.td_std_min and norm.floor_hits.item() == 0  # GateCheck's std_ok
    assert abs(norm.mean.item()) < 0.003


@pytest.mark.parametrize("mode", MODES)
def test_td_normalizer_counts_updates_with_the_scale_at_its_floor(mode):
    """Identical TD errors (no spread) clamp the scale to td_std_min at every update: floor_hits counts them."""
    cfg = tiny_cfg(td_scale_mode=mode)
    norm = gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
    for _ in range(50):
        norm.update(torch.full((8,), 0.3))
    assert norm.scale.item() == pytest.approx(cfg.td_std_min) and norm.floor_hits.item() == 50


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
    assert 0.5 < norm.scale.item() / expected_scale(mode, s1) < 2.0


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
    assert norm.mean.item() == pytest.approx(1.0, abs=0.3) and norm.scale.item() > 1.0
    d = torch.tensor([-1e9, -3.0, 0.0, 1.0, 2.5, 1e9])
    out = norm.normalize(d)
    assert out[0].item() == -3.0 and out[-1].item() == 3.0
    torch.testing.assert_close(out, ((d - norm.mean) / norm.scale).clamp(-3, 3), atol=1e-6, rtol=0)


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


def test_td_normalizer_state_round_trips():
    """state_dict/load_state_dict carry everything normalize() and the next update() depend on (resume)."""
    for mode in MODES:
        cfg = tiny_cfg(td_scale_mode=mode)
        a, b = gwt_ib.TDNormalizer(cfg, torch.device("cpu")), gwt_ib.TDNormalizer(cfg, torch.device("cpu"))
        feed(a, 0.5, 40, gen=torch.Generator().manual_seed(5), mean=0.2)
        b.load_state_dict(copy.deepcopy(a.state_dict()))  # as torch.save/torch.load give it
        d = torch.randn(16, generator=torch.Generator().manual_seed(6))
        a.update(d)
        b.update(d)
        assert torch.equal(a.normalize(d), b.normalize(d)), mode

"""Model and gating: the gated GRU memory, episode resets, the TD prior, vector gates and action distributions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces

import gwt_ib
from conftest import tiny_cfg

OBS_DIM, B = 7, 5


@pytest.fixture(params=[True, False], ids=["C-kernel", "torch-ops"])
def kernel(request) -> bool:
    """The gating invariants hold for both backends of Agent.cell: the C kernel (CPU float32) and torch ops."""
    if request.param and gwt_ib.cell_kernel() is None:
        skip_unless_no_compiler()
    return request.param


def skip_unless_no_compiler():
    """A missing kernel is a failure where a C compiler exists, a skip only where none does."""
    import os, shutil
    if any([os.environ.get("CC"), shutil.which("cc"), shutil.which("gcc"), shutil.which("clang")]):
        pytest.fail("a C compiler is here but the C kernel did not build or load (see the note on stderr)")
    pytest.skip("no C compiler here")


def make_agent(act_space=spaces.Discrete(4), obs_dim=OBS_DIM, seed=0, **kw) -> gwt_ib.Agent:
    torch.manual_seed(seed)
    kw = {"enc_dim": 12, "hid_dim": 10, "router_hid": 6, "head_hid": 8, **kw}
    return gwt_ib.Agent(obs_dim, gwt_ib.action_spec(act_space), tiny_cfg(**kw))


def inputs(seed=1, b=B, h_dim=10):
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(b, OBS_DIM, generator=g)
    h_prev = torch.randn(b, h_dim, generator=g).tanh()
    td_prev = torch.randn(b, generator=g) * 0.5
    return obs, h_prev, td_prev, torch.zeros(b)


def gru_cell(agent) -> torch.nn.GRUCell:
    """A plain nn.GRUCell carrying the agent's GRU weights."""
    w_ih, w_hh, b_ih, b_hh = (p.detach() for p in agent.gru_params())
    cell = torch.nn.GRUCell(w_ih.shape[1], w_hh.shape[1])
    with torch.no_grad():
        for dst, src in zip((cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh), (w_ih, w_hh, b_ih, b_hh)):
            dst.copy_(src)
    return cell


def prior_gate(agent, td_prev):
    cfg = agent.cfg
    return torch.sigmoid(cfg.td_scale * td_prev.abs() + cfg.base_logit + agent.bias.detach())


# ----------------------------------------------------------------------------- gated GRU update
@torch.no_grad()
def test_gate_zero_freezes_memory_exactly(kernel):
    """With c = 0 (force_c=0) the memory is not written at all: h == h_prev bit for bit."""
    agent = make_agent(force_c=0.0, cpu_kernel=kernel)
    obs, h_prev, td_prev, start = inputs()
    _, _, c, h = agent.step(obs, h_prev, td_prev, start)
    assert torch.all(c == 0)
    assert torch.equal(h, h_prev)


@torch.no_grad()
def test_gate_one_is_a_plain_gru_step(kernel):
    """With c = 1 (force_c=1) the update is exactly nn.GRUCell(z, h_prev) with the weights of gru_params()."""
    agent = make_agent(force_c=1.0, cpu_kernel=kernel)
    obs, h_prev, td_prev, start = inputs()
    _, _, c, h = agent.step(obs, h_prev, td_prev, start)
    assert torch.all(c == 1)
    z = agent.enc(obs)
    torch.testing.assert_close(h, gru_cell(agent)(z, h_prev), atol=1e-6, rtol=0)


@pytest.mark.parametrize("residual", [True, False])
@torch.no_grad()
def test_learned_gate_interpolates_between_h_prev_and_gru_of_gated_input(residual, kernel):
    """With the learned gate, h = h_prev + c*(GRUCell(c*z, h_prev) - h_prev) for the c that step() reports."""
    agent = make_agent(use_router_residual=residual, cpu_kernel=kernel)
    if residual:  # make the residual MLP non-trivial so c is not just the prior
        for p in agent.r_out.parameters():
            p.normal_(0, 1.0)
    obs, h_prev, td_prev, start = inputs()
    _, _, c, h = agent.step(obs, h_prev, td_prev, start)
    assert c.shape == (B, 1)
    assert ((c > 0.01) & (c < 0.99)).all()
    assert c.std() > 1e-3  # the per-sample gate differs, so the check below sees different c's
    z = agent.enc(obs)
    expected = h_prev + c * (gru_cell(agent)(c * z, h_prev) - h_prev)
    torch.testing.assert_close(h, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_heads_read_the_new_memory():
    """logits and value are the actor/critic heads applied to the new h."""
    agent = make_agent()
    logits, value, _, h = agent.step(*inputs())
    l2, v2 = agent.heads(h)
    torch.testing.assert_close(logits, l2, atol=0, rtol=0)
    torch.testing.assert_close(value, v2, atol=0, rtol=0)
    assert value.shape == (B,)


# ----------------------------------------------------------------------------- episode starts and unroll
@pytest.mark.parametrize("force_c", [None, 1.0])
@torch.no_grad()
def test_episode_start_zeroes_h_prev_and_td_prev(force_c, kernel):
    """episode_start=1 makes the step identical to a step from h_prev = 0 and td_prev = 0."""
    agent = make_agent(force_c=force_c, cpu_kernel=kernel)
    obs, h_prev, td_prev, _ = inputs()
    start = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    out = agent.step(obs, h_prev, td_prev, start)
    keep = (1 - start)
    ref = agent.step(obs, h_prev * keep[:, None], td_prev * keep, torch.zeros(B))
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    # and the reset really matters: without it the started rows would differ
    free = agent.step(obs, h_prev, td_prev, torch.zeros(B))
    assert not torch.allclose(out[3][start == 1], free[3][start == 1])


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@torch.no_grad()
def test_unroll_equals_a_loop_of_steps_with_mid_sequence_resets(gate, kernel):
    """unroll() over (L, B) gives the same logits, values, gates and memories as calling step() L times."""
    agent = make_agent(gate=gate, cpu_kernel=kernel)
    for p in agent.r_out.parameters():
        p.normal_(0, 0.5)
    L = 9
    g = torch.Generator().manual_seed(3)
    obs = torch.randn(L, B, OBS_DIM, generator=g)
    td_prev = torch.randn(L, B, generator=g)
    start = torch.zeros(L, B)
    start[0, 1] = start[4, 0] = start[4, 2] = start[7, 3] = 1.0  # resets mid-sequence
    h0 = torch.randn(B, agent.H, generator=g).tanh()
    logits, value, cs, hs = agent.unroll(obs, h0, td_prev, start)
    h = h0
    for t in range(L):
        lt, vt, ct, h = agent.step(obs[t], h, td_prev[t], start[t])
        torch.testing.assert_close(logits[t], lt, atol=1e-5, rtol=0)
        torch.testing.assert_close(value[t], vt, atol=1e-5, rtol=0)
        torch.testing.assert_close(cs[t], ct, atol=1e-5, rtol=0)
        torch.testing.assert_close(hs[t], h, atol=1e-5, rtol=0)


def test_unroll_gradients_reach_gate_and_gru():
    """The training forward pass is differentiable w.r.t. the gate bias and the GRU weights."""
    agent = make_agent()
    L = 4
    obs, td = torch.randn(L, B, OBS_DIM), torch.randn(L, B)
    logits, value, cs, hs = agent.unroll(obs, torch.zeros(B, agent.H), td, torch.zeros(L, B))
    (value.sum() + cs.sum() + logits.sum()).backward()
    assert agent.bias.grad is not None and agent.bias.grad.abs() > 0
    missing = [n for n, p in agent.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


# ----------------------------------------------------------------------------- TD prior and router
@pytest.mark.parametrize("kw", [{}, {"use_router_residual": False}, {"gate": "vector"}, {"force_c": 0.5},
                                {"force_c": 1.0, "use_router_residual": False}, {"memoryless": True}])
def test_fused_unroll_backward_equals_autograd(kw):
    """FusedUnroll's hand-written backward gives autograd's gradients (float64), for every gate variant."""
    agent = make_agent(**kw).double()
    with torch.no_grad():  # a non-zero router output, so its gradient path is exercised
        if agent.R:
            agent.r_out.weight.normal_()
            agent.r_out.bias.normal_()
    g = torch.Generator().manual_seed(3)
    L, b = 7, 3
    obs = torch.randn(L, b, OBS_DIM, generator=g, dtype=torch.float64)
    h0 = torch.randn(b, 10, generator=g, dtype=torch.float64)
    td = torch.randn(L, b, generator=g, dtype=torch.float64)
    start = torch.zeros(L, b, dtype=torch.float64)
    start[0, 0] = start[3, 1] = 1.0
    w_lg, w_v = torch.randn(L, b, 4, generator=g, dtype=torch.float64), torch.randn(L, b, generator=g, dtype=torch.float64)
    grads = []
    for fused in (True, False):
        agent.zero_grad()
        logits, value, c, hs = agent.unroll(obs, h0, td, start, fused=fused)
        ((logits * w_lg).sum() + (value * w_v).sum() + 0.7 * (c ** 2).sum() + 0.1 * (hs ** 3).sum()).backward()
        grads.append({n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in agent.named_parameters()})
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-10), name


KW_VARIANTS = [{}, {"use_router_residual": False}, {"gate": "vector"}, {"gate": "vector", "use_router_residual": False},
               {"force_c": 0.5}, {"force_c": 0.5, "gate": "vector"}, {"memoryless": True}]


@pytest.mark.parametrize("gemm", [True, False], ids=["kernel-gemm", "blas"])
@pytest.mark.parametrize("kw", KW_VARIANTS)
def test_c_kernel_equals_torch_ops_and_autograd_in_float32(kw, gemm, monkeypatch):
    """The C kernel's unroll gives torch-op cell()'s outputs (1e-6) and autograd's gradients (1e-5
    relative) for every gate variant, with mid-sequence resets, whether its products run in its own
    GEMM (whole time loops in C) or in torch's BLAS (calibrate() picks one per CPU); the float64 test
    above pins the math."""
    if gwt_ib.cell_kernel() is None:
        skip_unless_no_compiler()
    monkeypatch.setattr(gwt_ib.cell_kernel(), "gemm", gemm)
    agent = make_agent(**kw)
    with torch.no_grad():
        if agent.R:
            agent.r_out.weight.normal_(0, 0.5)
            agent.r_out.bias.normal_()
    g = torch.Generator().manual_seed(5)
    L, b = 9, 4
    obs, h0 = 2 * torch.randn(L, b, OBS_DIM, generator=g), torch.randn(b, 10, generator=g).tanh()
    td, start = torch.randn(L, b, generator=g), (torch.rand(L, b, generator=g) < 0.2).float()
    w_lg, w_c, w_h = torch.randn(L, b, 4, generator=g), torch.randn(L, b, agent.Gc, generator=g), torch.randn(L, b, 10, generator=g)
    outs, grads = [], []
    for kernel, fused in ((True, True), (False, False)):  # C kernel vs plain autograd through torch ops
        agent.kern, agent._cell = (gwt_ib.cell_kernel() if kernel else None), agent.cell
        agent.zero_grad()
        logits, value, c, hs = agent.unroll(obs, h0, td, start, fused=fused)
        ((logits * w_lg).sum() + value.sum() + (c * w_c).sum() + (hs * w_h).sum()).backward()
        outs.append((logits, value, c, hs))
        grads.append({n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None})
    for a, r in zip(*outs):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=0)
    for name, ref in grads[1].items():
        got = grads[0].get(name, torch.zeros_like(ref))
        assert (got - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7, name


def test_c_kernel_reuses_its_buffers_without_leaking_state():
    """Forward+backward on batch A, then B, then A again: the second A gives the first A's gradients
    exactly (the kernel's work buffers are reused between minibatches)."""
    if gwt_ib.cell_kernel() is None:
        skip_unless_no_compiler()
    agent = make_agent()
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(6, B, OBS_DIM, generator=g), torch.randn(B, 10, generator=g), torch.randn(6, B, generator=g),
                (torch.rand(6, B, generator=g) < 0.3).float()) for _ in range(2)]
    res = []
    for obs, h0, td, start in (batches[0], batches[1], batches[0]):
        agent.zero_grad()
        logits, value, c, hs = agent.unroll(obs, h0, td, start)
        (logits.sum() + value.sum() + c.sum() + hs.sum()).backward()
        res.append([p.grad.clone() for p in agent.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(res[0], res[2]))
    assert not all(torch.equal(a, b) for a, b in zip(res[0], res[1]))


def test_c_kernel_buffers_are_not_shared_between_gate_shapes():
    """A fixed vector gate (one gate per row) and a learned vector gate (one per unit) of the same size
    run one after the other: the second still matches autograd (buffers are keyed by the gate count)."""
    if gwt_ib.cell_kernel() is None:
        skip_unless_no_compiler()
    g = torch.Generator().manual_seed(8)
    obs, h0 = torch.randn(5, B, OBS_DIM, generator=g), torch.randn(B, 10, generator=g)
    td, start = torch.randn(5, B, generator=g), torch.zeros(5, B)
    for kw in ({"gate": "vector", "force_c": 0.5}, {"gate": "vector"}):
        agent = make_agent(**kw)
        grads = []
        for fused in (True, False):
            agent.zero_grad()
            logits, value, c, hs = agent.unroll(obs, h0, td, start, fused=fused)
            (logits.sum() + value.sum() + c.sum() + hs.sum()).backward()
            grads.append({n: p.grad.clone() for n, p in agent.named_parameters() if p.grad is not None})
        for name, ref in grads[1].items():
            assert (grads[0][name] - ref).abs().max() <= 1e-5 * ref.abs().max() + 1e-7, (kw, name)


def test_without_a_c_compiler_the_cell_runs_as_torch_ops(monkeypatch, tmp_path, capsys):
    """No working compiler: one note on stderr, Agent.kern is None, and the agent works on torch ops."""
    monkeypatch.setattr(gwt_ib, "_KERNEL", False)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    agent = make_agent()
    assert agent.kern is None and "C kernel unavailable" in capsys.readouterr().err
    logits, value, c, h = agent.step(*inputs())
    assert torch.isfinite(h).all()
    monkeypatch.setattr(gwt_ib, "_KERNEL", False)
    assert make_agent(cpu_kernel=False).kern is None and capsys.readouterr().err == ""  # not even tried


def kernel_or_skip() -> gwt_ib.CellKernel:
    k = gwt_ib.cell_kernel()
    if k is None:
        skip_unless_no_compiler()
    return k


@pytest.mark.parametrize("rows,n_in,n_out,bias", [(1, 3, 1, True), (13, 7, 33, True), (40, 130, 70, False),
                                                  (1024, 128, 832, False)])
def test_kernel_linear_equals_f_linear_and_its_gradients(rows, n_in, n_out, bias):
    """linear() through the kernel's GEMM gives F.linear's values and gradients, for row counts that are
    not a multiple of its 8-row blocks and output sizes that are not a multiple of its panel width."""
    kern = kernel_or_skip()
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, n_in, generator=g, requires_grad=True)
    W = torch.randn(n_out, n_in, generator=g, requires_grad=True)
    b = torch.randn(n_out, generator=g, requires_grad=True) if bias else None
    w_y = torch.randn(rows, n_out, generator=g)
    res = []
    for k in (kern, None):
        y = gwt_ib.linear(x, W, b, k)
        res.append((y, torch.autograd.grad((y * w_y).sum(), [t for t in (x, W, b) if t is not None])))
    for a, r in zip([res[0][0], *res[0][1]], [res[1][0], *res[1][1]]):  # float32 sums in another order
        assert (a - r).abs().max() <= 1e-6 * r.abs().max() * math.sqrt(max(rows, n_in, n_out)), (a - r).abs().max()


@torch.no_grad()
def test_kernel_rows_do_not_depend_on_their_batch_or_threads():
    """A row's product has the same bits alone, among the rollout's 16 rows or the update's 1024, on one
    thread or two: this is what makes the PPO recomputation of the rollout exact (ratio0_maxdev 0.0)."""
    kern = kernel_or_skip()
    g = torch.Generator().manual_seed(4)
    x, W, b = torch.randn(1024, 256, generator=g), torch.randn(832, 256, generator=g), torch.randn(832, generator=g)
    full = kern.linear(x, W, b)
    for lo, hi in ((0, 16), (5, 6), (3, 17), (1000, 1024)):  # inside, across and at the end of 8-row blocks
        assert torch.equal(kern.linear(x[lo:hi], W, b), full[lo:hi]), (lo, hi)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(kern.linear(x, W, b), full)
    finally:
        torch.set_num_threads(threads)


def test_kernel_repacks_weights_after_every_change():
    """The kernel packs each weight once and reuses it while the weight is unchanged. A fused Adam step does
    not bump a tensor's version counter, so a stale pack would go unnoticed: after optimizer steps,
    in-place edits and load_state_dict the kernel still computes with the current weights."""
    kern = kernel_or_skip()
    torch.manual_seed(0)
    lin, x = gwt_ib.Linear(5, 7, kern), torch.randn(9, 5)
    try:
        opt = torch.optim.Adam(lin.parameters(), lr=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.Adam(lin.parameters(), lr=0.1)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), rtol=1e-6, atol=1e-6)

    check()
    for _ in range(3):
        opt.zero_grad()
        lin(x).square().sum().backward()
        opt.step()
        check()
    with torch.no_grad():
        lin.weight.mul_(-2)
    check()
    lin.load_state_dict(gwt_ib.Linear(5, 7, kern).state_dict())
    check()


def test_kernel_gemm_choice_is_measured_once_and_stored(tmp_path):
    """calibrate() stores its choice beside the kernel; a stored choice is what every later process
    takes (so parallel runs on one machine agree), not a new measurement."""
    kern = kernel_or_skip()
    before = kern.gemm
    try:
        stamp = tmp_path / "cell_x.so"
        kern.calibrate(stamp)
        f = tmp_path / f"cell_x.gemm{torch.get_num_threads()}"
        assert f.read_text() in ("0", "1") and kern.gemm == (f.read_text() == "1")
        f.write_text("0" if kern.gemm else "1")
        kern.calibrate(stamp)
        assert kern.gemm == (f.read_text() == "1")
    finally:
        kern.gemm = before


def test_cpu_tanh_equals_torch_tanh_with_and_without_autograd():
    """Tanh (CPU: 2*sigmoid(2x) - 1) is torch.tanh to 2.5e-7, gradient included, and its no-grad path
    (the rollout) gives the same bits as its autograd path (the update)."""
    x = torch.cat([torch.randn(4096) * 4, torch.tensor([0.0, -0.0, 1e-8, -50.0, 50.0, 1e30, -1e30])])
    xg = x.clone().requires_grad_()
    y = gwt_ib.Tanh()(xg)
    assert (y - torch.tanh(x)).abs().max() <= 2.5e-7
    (g,) = torch.autograd.grad((y * x.cos()).sum(), xg)
    torch.testing.assert_close(g, x.cos() * (1 - torch.tanh(x) ** 2), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(gwt_ib.Tanh()(x), y.detach())


@torch.no_grad()
def test_router_residual_is_zero_at_init_so_gate_equals_td_prior():
    """At initialization c = sigmoid(td_scale*|td_prev| + base_logit + bias) exactly (residual MLP outputs 0)."""
    agent = make_agent()
    obs, h_prev, td_prev, start = inputs()
    _, _, c, _ = agent.step(obs, h_prev, td_prev, start)
    torch.testing.assert_close(c.squeeze(-1), prior_gate(agent, td_prev), atol=1e-7, rtol=0)
    # the residual does not depend on h_prev or obs at init either
    _, _, c2, _ = agent.step(torch.randn(B, OBS_DIM), -h_prev, td_prev, start)
    torch.testing.assert_close(c, c2, atol=1e-7, rtol=0)


@torch.no_grad()
def test_td_prior_increases_with_surprise_and_is_sign_symmetric():
    """The gate opens monotonically with |td_prev| and treats positive and negative surprise alike."""
    agent = make_agent()
    td = torch.linspace(0, 4, 21)
    obs = torch.zeros(len(td), OBS_DIM)
    h = torch.zeros(len(td), agent.H)
    start = torch.zeros(len(td))
    c_pos = agent.step(obs, h, td, start)[2].squeeze(-1)
    c_neg = agent.step(obs, h, -td, start)[2].squeeze(-1)
    assert torch.all(c_pos[1:] > c_pos[:-1])
    torch.testing.assert_close(c_pos, c_neg, atol=0, rtol=0)
    cfg = agent.cfg
    assert c_pos[0].item() == pytest.approx(1 / (1 + math.exp(-(cfg.base_logit + cfg.bias_init))), abs=1e-6)


# ----------------------------------------------------------------------------- vector gate, memoryless
@torch.no_grad()
def test_vector_gate_has_one_gate_per_unit_and_zero_freezes(kernel):
    """gate="vector": c is (B, hid_dim) with differing entries; driving every gate to 0 leaves h == h_prev."""
    agent = make_agent(gate="vector", cpu_kernel=kernel)
    for p in agent.r_out.parameters():
        p.normal_(0, 1.0)
    obs, h_prev, td_prev, start = inputs()
    _, _, c, h = agent.step(obs, h_prev, td_prev, start)
    assert c.shape == (B, agent.H)
    assert c.std(-1).max() > 0.05  # gates differ across units
    # unit j moves c_j of the way to the GRU proposal made from the input scaled by the mean gate
    z, c_in = agent.enc(obs), c.mean(-1, keepdim=True)
    torch.testing.assert_close(h, h_prev + c * (gru_cell(agent)(c_in * z, h_prev) - h_prev), atol=1e-6, rtol=0)
    agent.bias.fill_(-1e4)  # logit -> -1e4: sigmoid is exactly 0 in float32
    _, _, c0, h0 = agent.step(obs, h_prev, td_prev, start)
    assert torch.all(c0 == 0)
    assert torch.equal(h0, h_prev)


@torch.no_grad()
def test_scalar_learned_gate_at_zero_freezes_memory(kernel):
    """The learned scalar gate driven to exactly 0 also leaves h == h_prev bit for bit."""
    agent = make_agent(cpu_kernel=kernel)
    agent.bias.fill_(-1e4)
    obs, h_prev, td_prev, start = inputs()
    _, _, c, h = agent.step(obs, h_prev, td_prev, start)
    assert torch.all(c == 0)
    assert torch.equal(h, h_prev)


@pytest.mark.parametrize("force_c", [None, 1.0])
@torch.no_grad()
def test_memoryless_ignores_h_prev(force_c, kernel):
    """memoryless=True: the new h (and so logits, value) does not depend on h_prev at all."""
    agent = make_agent(memoryless=True, force_c=force_c, cpu_kernel=kernel)
    obs, h_prev, td_prev, start = inputs()
    a = agent.step(obs, h_prev, td_prev, start)
    b = agent.step(obs, torch.randn_like(h_prev) * 3, td_prev, start)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=0, rtol=0)
    # ... and it still writes memory from the current observation
    assert not torch.allclose(a[3], torch.zeros_like(a[3]))


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
    assert torch.all(logp <= 1e-6) or agent.act.kind == "box"


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
    """Box: logp is the diagonal Gaussian density with std = exp(log_std); entropy is the Gaussian's."""
    agent = make_agent(ACT_SPACES["box"])
    with torch.no_grad():
        agent.log_std.copy_(torch.tensor([0.3, -0.7]))
    mean = torch.randn(10, 2)
    a = torch.randn(10, 2) * 3
    logp, ent = gwt_ib.logp_entropy(agent, mean, a)
    dist = torch.distributions.Normal(mean, agent.log_std.exp())
    torch.testing.assert_close(logp, dist.log_prob(a).sum(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, dist.entropy().sum(-1), atol=1e-5, rtol=0)


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
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=0)
    clipped = torch.distributions.Normal(mean, 3.0).log_prob(a.clamp(-1, 1)).sum(-1)
    assert not torch.allclose(logp, clipped)
    greedy, _ = gwt_ib.sample_action(agent, mean + 5, greedy=True)
    assert torch.all(greedy == 5)  # the mean itself, not clipped to the bounds


def test_compiled_cell_agrees_with_eager_and_falls_back_cleanly(monkeypatch, capsys):
    """--compile: the torch.compile'd cell gives eager's outputs (within 1e-5); if compiling fails the
    trainer notes it and carries on in eager mode with identical results."""
    agent = make_agent(cpu_kernel=False)  # --compile replaces the C kernel
    L = 5
    g = torch.Generator().manual_seed(4)
    obs, td = torch.randn(L, B, OBS_DIM, generator=g), torch.randn(L, B, generator=g)
    start, h0 = torch.zeros(L, B), torch.randn(B, agent.H, generator=g)
    with torch.no_grad():
        ref = agent.unroll(obs, h0, td, start)
    agent._cell = gwt_ib.compiled_cell(agent)
    with torch.no_grad():
        got = agent.unroll(obs, h0, td, start)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    def broken(fn, **kw):
        def f(*a):
            raise RuntimeError("no compiler here")
        return f
    monkeypatch.setattr(torch, "compile", broken)
    agent._cell = gwt_ib.compiled_cell(agent)
    with torch.no_grad():
        got = agent.unroll(obs, h0, td, start)
    assert "torch.compile failed" in capsys.readouterr().err and agent._cell == agent.cell
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0, rtol=0)

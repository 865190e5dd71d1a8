"""The optional accelerator (the C cell at the end of gwt_ib.py): it equals Agent.step in values and
gradients for every gate variant, it is only used when it supports and matches the agent being trained, and its
compiled library is only ever loaded from bytes just checked against the checksum recorded at build time,
read from a private cache that no other user can replace. Without a C compiler these tests are skipped, and the
trainer runs the reference."""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import shutil
import stat
import subprocess

import pytest
import torch
import torch.nn as nn

import gwt_ib
from conftest import tiny_cfg

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and not os.environ.get("CC"), reason="no C compiler")

VARIANTS = {
    "learned scalar gate": {},
    "prior-only gate": {"use_router_residual": False},
    "vector gate": {"gate": "vector"},
    "fixed gate 0.5": {"force_c": 0.5},
    "fixed gate 0": {"force_c": 0.0},
    "fixed gate 1, vector": {"force_c": 1.0, "gate": "vector"},
    "memoryless": {"memoryless": True},
    "memoryless, fixed gate": {"memoryless": True, "force_c": 1.0},
}
ACT = gwt_ib.ActSpec("discrete", 3, (3,), (0,))


@pytest.fixture(scope="module")
def lib():
    return gwt_ib.load_library()


def perturbed_agent(seed=0, **kw):
    """An agent of the given variant whose parameters are all non-trivial (the router's output layer
    starts at zero, which would hide any difference in the router)."""
    torch.manual_seed(seed)
    agent = gwt_ib.Agent(5, ACT, tiny_cfg(hid_dim=12, router_hid=6, enc_dim=8, head_hid=8, **kw))
    with torch.no_grad():
        for p in agent.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return agent


def run_both(agent, lib, L=7, B=4, seed=1):
    """unroll + a loss over every output, with the reference and with the C cell -> {name: tensor}."""
    g = torch.Generator().manual_seed(seed)
    obs, h0 = torch.randn(L, B, 5, generator=g), torch.randn(B, agent.memory.state_dim, generator=g)
    td, start = 2 * torch.randn(L, B, generator=g), (torch.rand(L, B, generator=g) < 0.25).float()
    weights = None
    out = {}
    for name, accel in (("ref", None), ("C", gwt_ib.CCell(lib))):
        agent.accel = accel
        logits, value, c, h = agent.unroll(obs, h0, td, start)
        weights = weights or [torch.randn(t.shape, generator=g) for t in (logits, value, c, h)]
        loss = sum((t * w).sum() for t, w in zip((logits, value, c, h), weights))
        agent.zero_grad()
        loss.backward()
        with torch.no_grad():
            x = agent.features(obs[0])
            c1, h1 = agent.step(x, *agent.gate_prior(td[0], start[0]), h0)
        out[name] = dict(logits=logits.detach(), value=value.detach(), c=c.detach(), h=h.detach(), step_c=c1,
                         step_h=h1, **{f"grad {n}": p.grad.clone() for n, p in agent.named_parameters()
                                       if p.grad is not None})
    agent.accel = None
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_c_cell_equals_the_reference_in_values_and_every_gradient(variant, threads, lib):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = run_both(perturbed_agent(**VARIANTS[variant]), lib)
    finally:
        torch.set_num_threads(old)
    assert out["C"].keys() == out["ref"].keys()  # the same parameters receive gradients
    for k, want in out["ref"].items():
        scale = want.abs().max().item()
        torch.testing.assert_close(out["C"][k], want, rtol=1e-4, atol=1e-5 * (1 + scale), msg=k)


def test_c_cell_steps_as_a_rollout_does_and_sees_every_parameter_change(lib):
    """Within Agent.frozen (a rollout) the C step packs the weights once and reuses W_x z for the same z: steps that
    share z, and a z changed in place, still equal the reference step. Outside it, a parameter changed in place
    between two steps (as an optimizer does) is seen by the next step."""
    ref = perturbed_agent()
    fast = perturbed_agent()
    fast.accel = gwt_ib.CCell(lib)
    g = torch.Generator().manual_seed(3)
    z, h = torch.randn(4, ref.cfg.enc_dim, generator=g), torch.randn(4, ref.H, generator=g)
    prior, keep = torch.randn(4, 1, generator=g), torch.ones(4, 1)
    with torch.no_grad():
        with fast.frozen():
            for _ in range(3):  # the same z each time: the clean bootstrap and the next step share z_{t+1}
                c, h_next = fast.step(z, prior, keep, h)
                torch.testing.assert_close((c, h_next), ref.step(z, prior, keep, h), rtol=1e-5, atol=1e-6)
                h = h_next
            z.mul_(-0.5)  # changed in place: a new projection
            torch.testing.assert_close(fast.step(z, prior, keep, h), ref.step(z, prior, keep, h), rtol=1e-5, atol=1e-6)
        fast.step(z, prior, keep, h)  # a step outside any rollout, then an in-place change of the weights
        for a in (ref, fast):
            a.memory.cell.weight_ih.mul_(2.0)
            a.router.mlp[0].weight.add_(0.3)
        torch.testing.assert_close(fast.step(z, prior, keep, h), ref.step(z, prior, keep, h), rtol=1e-5, atol=1e-6)


def test_c_cell_keeps_memory_exactly_where_the_gate_is_zero(lib):
    agent = perturbed_agent(force_c=0.0)
    agent.accel = gwt_ib.CCell(lib)
    g = torch.Generator().manual_seed(2)
    obs, h0 = torch.randn(9, 4, 5, generator=g), torch.randn(4, agent.H, generator=g)
    start = (torch.rand(9, 4, generator=g) < 0.25).float()
    with torch.no_grad():
        h = agent.unroll(obs, h0, torch.randn(9, 4, generator=g), start)[3]
    prev = h0
    for t in range(9):  # h_t = h_{t-1} * keep_t, bit for bit
        assert torch.equal(h[t], prev * (1 - start[t])[:, None])
        prev = h[t]


def test_a_run_uses_the_c_cell_when_it_matches(tmp_path, capsys):
    su = gwt_ib.build(tiny_cfg(tmp_path, cpu_kernel=True))
    assert isinstance(su.agent.accel, gwt_ib.CCell)
    assert "C cell not used" not in capsys.readouterr().err
    su.envs.close()
    su.eval_envs.close()


class TwoLayerRouter(gwt_ib.Agent):
    """A researcher's edit in the file, not through --router-layers: one more hidden layer in the router's MLP."""

    def __init__(self, obs_dim, act, cfg):
        super().__init__(obs_dim, act, cfg)
        R, EH = cfg.router_hid, cfg.enc_dim + cfg.hid_dim
        self.router.mlp = nn.Sequential(nn.Linear(EH, R), nn.Tanh(), nn.Linear(R, R), nn.Tanh())
        self.router.out.weight.data.normal_()  # not zero: the router must matter


def edited_gate(agent, obs, h_prev, surprise, start):
    """The edited formula written out: c = sigmoid(prior + W3 tanh(W2 tanh(W1 [z, h] + b1) + b2) + b3)."""
    cfg, (l1, _, l2, _), l3 = agent.cfg, agent.router.mlp, agent.router.out
    z, h = agent.enc(obs), h_prev * (1 - start[:, None])
    residual = l3(torch.tanh(l2(torch.tanh(l1(torch.cat([z, h], -1))))))
    seen = torch.where(start[:, None] > 0, cfg.td_norm_clip, surprise[:, None])  # episode_start_td="max"
    prior = cfg.td_scale * seen.abs() + cfg.base_logit + agent.bias
    return torch.sigmoid(prior + residual)[:, 0]


@pytest.mark.parametrize("how", ["edited in the file", "--router-layers 2"])
def test_a_deeper_router_runs_on_the_reference_and_trains(how, tmp_path, capsys, monkeypatch):
    """The C cell steps aside with one line naming what it does not support; the deeper router is what runs and
    what the update trains."""
    if how == "edited in the file":
        monkeypatch.setattr(gwt_ib, "Agent", TwoLayerRouter)
    cfg = tiny_cfg(tmp_path, cpu_kernel=True, num_envs=4, rollout_steps=32, seq_len=16, minibatches=2,
                   episode_start_td="max", router_layers=1 if how == "edited in the file" else 2)
    su = gwt_ib.build(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert su.agent.accel is None
    what = "an edited router" if how == "edited in the file" else "a router of 2 hidden layers"
    assert len(err) == 1 and f"this run has {what}); Agent.step runs as torch ops" in err[0], err
    if how == "--router-layers 2":
        su.agent.router.out.weight.data.normal_()
    su.col.reset(seed=0)
    b, last_value, _ = gwt_ib.rollout(su.col, cfg.rollout_steps)
    with torch.no_grad():  # the rollout's gate is the edited formula, step by step
        want = torch.stack([edited_gate(su.agent, b["obs"][t], b["h0"][t], b["surprise"][t], b["start"][t])
                            for t in range(cfg.rollout_steps)])
    torch.testing.assert_close(b["c"], want, rtol=1e-5, atol=1e-6)
    before = {n: p.detach().clone() for n, p in su.agent.router.named_parameters()}
    adv, ret = gwt_ib.gae(b, last_value, cfg.gamma, cfg.gae_lambda)
    m = gwt_ib.ppo_update(su.agent, su.opt, b, adv, ret, cfg, lam_c=0.05, update=0)
    assert m["ratio0_maxdev"] < 1e-5
    for n, p in su.agent.router.named_parameters():  # every layer is trained
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        assert not torch.equal(p, before[n]), n
    su.envs.close()
    su.eval_envs.close()


def test_an_lstm_memory_runs_on_the_reference_with_one_note(tmp_path, capsys):
    su = gwt_ib.build(tiny_cfg(tmp_path, cpu_kernel=True, memory="lstm"))
    err = capsys.readouterr().err.strip().splitlines()
    assert su.agent.accel is None
    assert len(err) == 1 and "it supports memory gru" in err[0] and "this run has memory lstm" in err[0], err
    su.envs.close()
    su.eval_envs.close()


@pytest.mark.parametrize("part", ["gate", "memory"])
def test_a_patched_step_is_detected(part, tmp_path, capsys, monkeypatch):
    """An edit of the formula that adds no parameter and keeps every type (the gate halved, or the GRU's proposal
    halved) is caught by the start-up comparison, not by the supported-parts check."""
    if part == "gate":
        ref = gwt_ib.Agent.gate
        monkeypatch.setattr(gwt_ib.Agent, "gate", lambda self, z, prior, s: 0.5 * ref(self, z, prior, s))
    else:
        ref = gwt_ib.GRUMemory.forward
        monkeypatch.setattr(gwt_ib.GRUMemory, "forward", lambda self, z, s: 0.5 * ref(self, z, s))
    su = gwt_ib.build(tiny_cfg(tmp_path, cpu_kernel=True))
    assert su.agent.accel is None
    assert "disagrees with Agent.step" in capsys.readouterr().err
    su.envs.close()
    su.eval_envs.close()


def test_without_a_c_compiler_the_reference_runs_with_one_note(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(gwt_ib, "_LIB", None)
    su = gwt_ib.build(tiny_cfg(tmp_path, cpu_kernel=True))
    err = capsys.readouterr().err.strip().splitlines()
    assert su.agent.accel is None
    assert err == ["note: C cell not used (no C compiler found ($CC, cc, gcc, clang)); Agent.step runs as torch ops"]
    su.envs.close()
    su.eval_envs.close()
    monkeypatch.setattr(gwt_ib, "_LIB", None)  # let later tests load the real library


# ----------------------------------------------------------------------------- the kernel cache
PLANTED_C = r"""#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char *p = getenv("GWT_PLANTED_MARK");
    FILE *f = p ? fopen(p, "w") : NULL;
    if (f) fclose(f);
}
void cell_fwd(void) {}
void cell_bwd(void) {}
"""


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty XDG cache home, a marker path, and a planted library that creates the marker when loaded."""
    home = tmp_path / "xdg"
    home.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    monkeypatch.setattr(gwt_ib, "_TMP_DIR", None)
    mark = tmp_path / "planted_ran"
    monkeypatch.setenv("GWT_PLANTED_MARK", str(mark))
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    planted = tmp_path / "planted.so"
    subprocess.run([os.environ.get("CC") or "cc", "-shared", "-fPIC", str(src), "-o", str(planted)], check=True)
    return home / "gwt_ib", mark, planted


def load_and_check(lib, mark):
    """The library load_library returned is the real cell, and nothing planted ran."""
    assert hasattr(lib, "cell_fwd") and not mark.exists()
    out = run_both(perturbed_agent(), lib)
    torch.testing.assert_close(out["C"]["h"], out["ref"]["h"], rtol=1e-4, atol=1e-5)


def cached(d):
    """The cached library in d and its checksum record."""
    (so,) = d.glob("cell_*.so")
    return so, so.with_suffix(".sha256")


def plant(so, planted):
    """The planted library under the cached library's name, with a checksum record that matches it."""
    shutil.copyfile(planted, so)
    so.with_suffix(".sha256").write_text(hashlib.sha256(planted.read_bytes()).hexdigest())


def test_library_is_built_once_into_a_private_directory_with_its_checksum(cache, monkeypatch):
    d, mark, _ = cache
    lib = gwt_ib.load_library()
    assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
    so, rec = cached(d)
    for f in (so, rec):
        st = os.lstat(f)
        assert stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077
    assert rec.read_bytes().strip() == hashlib.sha256(so.read_bytes()).hexdigest().encode()
    assert lib._name.startswith("/proc/self/fd/")  # loaded from the checked bytes, not from the cache's path
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("rebuilt a valid cached library"))
    load_and_check(gwt_ib.load_library(), mark)
    load_and_check(lib, mark)


def test_a_truncated_cached_library_is_rebuilt_not_loaded(cache):
    d, mark, _ = cache
    gwt_ib.load_library()
    so, _ = cached(d)
    size = so.stat().st_size
    with open(so, "r+b") as f:
        f.truncate(size // 3)
    lib = gwt_ib.load_library()
    assert so.stat().st_size == size
    load_and_check(lib, mark)


def test_an_altered_cached_library_is_rebuilt_not_loaded(cache):
    d, mark, planted = cache
    gwt_ib.load_library()
    so, _ = cached(d)
    shutil.copyfile(planted, so)  # same name, other contents, checksum record untouched
    lib = gwt_ib.load_library()
    assert so.read_bytes() != planted.read_bytes()
    load_and_check(lib, mark)


def test_a_symlinked_cached_library_is_not_followed(cache):
    d, mark, planted = cache
    gwt_ib.load_library()
    so, rec = cached(d)
    so.unlink()
    so.symlink_to(planted)
    rec.write_text(hashlib.sha256(planted.read_bytes()).hexdigest())
    lib = gwt_ib.load_library()
    assert not so.is_symlink() and planted.exists()
    load_and_check(lib, mark)


def test_a_library_swapped_after_its_check_is_not_what_is_loaded(cache, monkeypatch):
    """The file is replaced (with a checksum record to match) right after its bytes were read and checked: what is
    loaded is the bytes that were checked, never the file's path."""
    d, mark, planted = cache
    gwt_ib.load_library()
    so, _ = cached(d)
    real = gwt_ib._read_own

    def read_then_swap(dfd, name):
        data = real(dfd, name)
        if name.endswith(".sha256"):
            plant(so, planted)
        return data
    monkeypatch.setattr(gwt_ib, "_read_own", read_then_swap)
    load_and_check(gwt_ib.load_library(), mark)


def test_a_cache_directory_swapped_after_its_check_is_not_used(cache, monkeypatch, tmp_path):
    """The checked cache directory is exchanged for one holding the planted library and a matching record, as a
    renameat2(RENAME_EXCHANGE) loop would: the library is read through the directory that was checked."""
    d, mark, planted = cache
    gwt_ib.load_library()
    so, _ = cached(d)
    evil = tmp_path / "evil"
    shutil.copytree(d, evil)
    plant(evil / so.name, planted)
    real = gwt_ib._private_dir

    def open_then_swap(path):
        fd = real(path)
        os.rename(d, tmp_path / "checked")
        os.rename(evil, d)
        return fd
    monkeypatch.setattr(gwt_ib, "_private_dir", open_then_swap)
    load_and_check(gwt_ib.load_library(), mark)


@pytest.mark.parametrize("how", ["symlinked directory", "world-writable directory", "another user's directory",
                                 "world-writable parent", "group-writable parent", "parent of another user's"])
def test_a_cache_directory_others_can_write_or_replace_is_not_used(cache, how, tmp_path, capsys):
    """Neither the cache directory nor any directory above it may let another user replace what is in it (the
    cache directory swapped under the check by another user of a 0777 parent): the library is then built in a
    fresh private directory, with one note, and nothing is written in the cache."""
    d, mark, planted = cache
    if how == "symlinked directory":
        target = tmp_path / "elsewhere"
        target.mkdir(mode=0o700)
        d.symlink_to(target)
    elif how.endswith("directory"):
        d.mkdir(mode=0o700)
        if how == "world-writable directory":
            os.chmod(d, 0o777)
        else:
            if os.getuid() != 0:
                pytest.skip("needs root to create a directory owned by another user")
            os.chown(d, 65534, 65534)
    else:
        if how == "parent of another user's" and os.getuid() != 0:
            pytest.skip("needs root to create a directory owned by another user")
        os.chmod(d.parent, 0o777 if how == "world-writable parent" else 0o770)
        if how == "parent of another user's":
            os.chmod(d.parent, 0o755)
            os.chown(d.parent, 65534, 65534)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    lib = gwt_ib.load_library()
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert "note: C cell built in /" in capsys.readouterr().err
    load_and_check(lib, mark)


def test_a_sticky_world_writable_parent_is_safe(cache):
    """In a sticky directory (as /tmp) only an entry's owner can rename it: such a parent is fine."""
    d, mark, _ = cache
    os.chmod(d.parent, 0o1777)
    load_and_check(gwt_ib.load_library(), mark)
    assert cached(d)


def test_a_relative_xdg_cache_home_is_ignored(cache, tmp_path, monkeypatch):
    """The XDG spec: a relative XDG_CACHE_HOME is invalid and ignored (else the cache lands in the working
    directory); ~/.cache is used."""
    _, mark, _ = cache
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir(mode=0o700)
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", "rel")
    monkeypatch.chdir(cwd)
    load_and_check(gwt_ib.load_library(), mark)
    assert not any(cwd.iterdir()) and cached(home / ".cache" / "gwt_ib")


def test_the_accelerated_default_run_trains_like_the_reference(tmp_path):
    """Two tiny training runs, C cell and reference, agree on every logged loss to float32 accuracy."""
    cfg = tiny_cfg(tmp_path, total_timesteps=128, eval_every=0)
    runs = [gwt_ib.train(dataclasses.replace(cfg, cpu_kernel=k, run_name=f"k{k}")) for k in (False, True)]
    import json
    rows = [[json.loads(l) for l in open(f"{r['run_dir']}/metrics.jsonl")] for r in runs]
    for a, b in zip(*rows):
        for k in ("pg_loss", "v_loss", "entropy", "ib_loss", "mean_c", "td_std"):
            assert b[k] == pytest.approx(a[k], rel=1e-3, abs=1e-5), k

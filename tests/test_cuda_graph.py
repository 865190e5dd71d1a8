"""The CUDA-graph update (accelerator section, GraphGradients): the same code as eager gradients(), captured once and
replayed; checked at the first update; a graph that cannot be captured steps aside with one line. CUDA only."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import gwt_ib
from conftest import read_metrics, tiny_cfg

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_cfg(tmp_path, **kw):
    return tiny_cfg(tmp_path, device="cuda", num_envs=8, total_timesteps=8 * 32 * 4, epochs=2, **kw)


def test_graph_replays_equal_eager_over_a_run(tmp_path, capsys):
    """Every update's metrics with the graph equal eager's (the same kernels: to rounding of 1e-5)."""
    runs = {}
    for on in (False, True):
        s = gwt_ib.train(dataclasses.replace(cuda_cfg(tmp_path, cuda_graph=on), run_name=f"g{on}"))
        assert s["status"] == "completed"
        runs[on] = read_metrics(s["run_dir"])
    assert "CUDA graph not used" not in capsys.readouterr().err
    assert len(runs[True]) == len(runs[False]) == 4
    for a, b in zip(runs[True], runs[False]):
        for k, v in b.items():
            if isinstance(v, float) and v == v:
                assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_setup_uses_the_graph_only_when_asked(tmp_path):
    assert isinstance(gwt_ib.graph_gradients(cuda_cfg(tmp_path), torch.device("cuda")), gwt_ib.GraphGradients)
    assert gwt_ib.graph_gradients(cuda_cfg(tmp_path, cuda_graph=False), torch.device("cuda")) is gwt_ib.gradients
    assert gwt_ib.graph_gradients(tiny_cfg(tmp_path), torch.device("cpu")) is gwt_ib.gradients


def test_a_step_a_graph_cannot_hold_runs_eagerly_with_one_line(tmp_path, capsys, monkeypatch):
    """An edited loss that asks the host for a value (a sync, which a capture refuses) trains eagerly."""
    loss = gwt_ib.minibatch_loss

    def syncing(agent, m, cfg, lam_c):
        out = loss(agent, m, cfg, lam_c)
        out[0].detach().item()  # a host sync
        return out
    monkeypatch.setattr(gwt_ib, "minibatch_loss", syncing)
    s = gwt_ib.train(cuda_cfg(tmp_path))
    assert s["status"] == "completed"
    notes = [l for l in capsys.readouterr().err.splitlines() if "CUDA graph not used" in l]
    assert len(notes) == 1 and "capturing it failed" in notes[0] and notes[0].endswith("the update runs eagerly")


def test_a_graph_that_disagrees_with_eager_is_not_used(tmp_path, capsys, monkeypatch):
    """A captured step that computes something else than eager (here: a loss scaled inside the capture only)."""
    loss = gwt_ib.minibatch_loss

    def differs(agent, m, cfg, lam_c):
        l, stats = loss(agent, m, cfg, lam_c)
        return (l * 2, stats) if torch.cuda.is_current_stream_capturing() else (l, stats)
    monkeypatch.setattr(gwt_ib, "minibatch_loss", differs)
    s = gwt_ib.train(cuda_cfg(tmp_path))
    assert s["status"] == "completed"
    (note,) = [l for l in capsys.readouterr().err.splitlines() if "CUDA graph not used" in l]
    assert "it disagrees with eager: grad " in note

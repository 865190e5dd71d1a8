"""Micro-benchmarks behind README's "Speed" notes: the C kernel's GEMM against torch's BLAS, the training
unroll's time loop on either, tanh against sigmoid, gymnasium's vector env against a plain loop over its
envs, and the rollout's cost per vector step. Not part of the test suite; run on a quiet machine:

    python tests/bench_kernel.py            # torch's default thread count
    python tests/bench_kernel.py --threads 1
Each figure is the best of several repetitions (microseconds unless said otherwise).
"""
import argparse, sys, time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import gwt_ib  # noqa: E402


def best_us(fn, n=20, reps=7):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t0) / n)
    return min(ts) * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    kern = gwt_ib.cell_kernel()
    if kern is None:
        sys.exit("no C kernel here (no compiler?)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel GEMM chosen by calibration: {kern.gemm}")
    g = torch.Generator().manual_seed(0)

    print("\nproduct x @ W^T (M x K x N): kernel GEMM vs F.linear (torch's BLAS)")
    for M, K, N in ((16, 256, 832), (16, 256, 256), (1024, 256, 256), (1024, 128, 832)):
        x, W = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
        tk, tt = best_us(lambda: kern.linear(x, W, None)), best_us(lambda: F.linear(x, W))
        print(f"  {M:5d} x {K} x {N}: kernel {tk:7.1f} us ({2 * M * K * N / tk / 1e3:5.0f} GFLOP/s)   "
              f"F.linear {tt:7.1f} us ({2 * M * K * N / tt / 1e3:5.0f} GFLOP/s)")

    print("\ntraining unroll, default sizes (64 steps x 16 sequences), forward only: per step")
    agent = gwt_ib.Agent(16, gwt_ib.action_spec(__import__("gymnasium").spaces.Discrete(4)), gwt_ib.Cfg())
    L, B = 64, 16
    x = torch.randn(L, B, 3 * agent.H + agent.R, generator=g)
    prior, keep, h0 = torch.randn(L, B, 1, generator=g), torch.ones(L, B, 1), torch.randn(B, agent.H, generator=g)
    chosen = kern.gemm
    with torch.no_grad():
        for use in (True, False):
            kern.gemm = use
            t = best_us(lambda: kern.release(kern.unroll(agent, x, prior, keep, h0)[2]), n=5) / L
            print(f"  time loop {'in C with the kernel GEMM' if use else 'in Python, torch matmul + C cell':34s} {t:6.1f} us per step")
    kern.gemm = chosen

    y = torch.randn(1024, 256, generator=g)
    print(f"\n1024 x 256 elements: torch.tanh {best_us(lambda: torch.tanh(y)):.0f} us, torch.sigmoid "
          f"{best_us(lambda: torch.sigmoid(y)):.0f} us, GWT-IB's CPU tanh {best_us(lambda: gwt_ib._tanh_cpu(y)):.0f} us")

    cfg = gwt_ib.Cfg(progress=False)
    envs = gwt_ib.make_envs(cfg, cfg.num_envs)
    envs.reset(seed=0)
    acts = [np.stack([envs.single_action_space.sample() for _ in range(cfg.num_envs)]) for _ in range(256)]
    t0 = time.perf_counter()
    for act in acts:
        envs.step(act)
    t_vec = (time.perf_counter() - t0) / len(acts) * 1e6
    t0 = time.perf_counter()
    for act in acts:
        for e, ai in zip(envs.envs, act):
            if any(e.step(ai)[2:4]):
                e.reset()
    t_raw = (time.perf_counter() - t0) / len(acts) * 1e6
    print(f"\n{cfg.num_envs} envs of {cfg.env_id}: SyncVectorEnv.step {t_vec:.0f} us, a plain loop over them {t_raw:.0f} us")
    envs.close()

    su = gwt_ib.build(cfg)
    su.col.reset(seed=0)
    gwt_ib.rollout(su.col, 64)
    t = min(best_us(lambda: gwt_ib.rollout(su.col, 64), n=1, reps=5) for _ in range(2)) / 64
    from torch.autograd.profiler import profile
    with profile() as p:
        gwt_ib.rollout(su.col, 32)
    n_ops = sum(1 for e in p.function_events if e.cpu_parent is None) / 32
    print(f"rollout (default Cfg): {t / 1e3:.2f} ms per vector step, {n_ops:.0f} top-level torch ops per step")
    su.envs.close()
    su.eval_envs.close()


if __name__ == "__main__":
    main()

"""Peer runner for tests/bench.py: sb3-contrib RecurrentPPO (MlpLstmPolicy) sized like GWT-IB's default Cfg.

Sizing (gwt_ib.py's Cfg defaults): 16 envs x 256 steps per rollout (4096 env steps per update), 4 epochs,
4 minibatches (batch_size 1024), lr 2.5e-4, gamma 0.99, GAE lambda 0.95, clip 0.2, entropy 0.01,
value 0.5, grad-norm clip 0.5. Memory: one LSTM of 256 units shared by actor and critic, then a
256-unit hidden layer in each head. Discrete observations are one-hot (gymnasium FlattenObservation).
Envs are stepped in this process (sb3's DummyVecEnv), as GWT-IB's default does. Device: cpu.

Needs the optional bench extra (see tests/bench.py's docstring for the install command).

Usage:
    python tests/peer_recurrent_ppo.py [--env ID] [--steps N] [--seed S] [--threads T] [--eval-episodes E]

Prints one machine-readable line, `peer_result {json}`, whose "steps_per_s" is env steps per second of
model.learn() alone (model construction, imports and the optional eval are not timed). With
--eval-episodes E > 0 it then runs E greedy episodes and adds "eval_return" (mean) and "eval_se".
"""
import argparse
import json
import platform
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--env", default="popgym-CountRecallEasy-v0", help="gymnasium/POPGym env id")
    ap.add_argument("--steps", type=int, default=65536, help="total env steps passed to model.learn")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--eval-episodes", type=int, default=0, help="greedy eval episodes after training (0 = skip)")
    a = ap.parse_args()

    import numpy as np
    import torch
    import gymnasium as gym
    import popgym  # noqa: F401  (registers the popgym-* ids)
    import sb3_contrib
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    torch.set_num_threads(a.threads)
    wrap = gym.wrappers.FlattenObservation
    venv = make_vec_env(a.env, n_envs=16, seed=a.seed, wrapper_class=wrap)
    model = RecurrentPPO(
        "MlpLstmPolicy", venv, n_steps=256, batch_size=1024, n_epochs=4, learning_rate=2.5e-4,
        gamma=0.99, gae_lambda=0.95, clip_range=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5,
        policy_kwargs=dict(lstm_hidden_size=256, n_lstm_layers=1, shared_lstm=True, enable_critic_lstm=False,
                           net_arch=dict(pi=[256], vf=[256])),
        seed=a.seed, verbose=0, device="cpu")

    t0 = time.perf_counter()
    model.learn(total_timesteps=a.steps)
    dt = time.perf_counter() - t0
    done = int(model.num_timesteps)  # sb3 finishes the last rollout, so this can exceed --steps
    res = dict(env=a.env, env_steps=done, wall_s=round(dt, 3), steps_per_s=round(done / dt, 1),
               threads=torch.get_num_threads(), torch=torch.__version__, sb3_contrib=sb3_contrib.__version__,
               python=platform.python_version())
    print("peer_result " + json.dumps(res), flush=True)

    if a.eval_episodes > 0:
        env = wrap(gym.make(a.env))
        rets = []
        for ep in range(a.eval_episodes):
            obs, _ = env.reset(seed=10_000 + ep)
            state, start, done_ep, ret = None, np.ones((1,), bool), False, 0.0
            while not done_ep:
                act, state = model.predict(obs, state=state, episode_start=start, deterministic=True)
                obs, r, term, trunc, _ = env.step(act)
                start, done_ep, ret = np.zeros((1,), bool), term or trunc, ret + float(r)
            rets.append(ret)
        res |= dict(eval_episodes=a.eval_episodes, eval_return=float(np.mean(rets)),
                    eval_se=float(np.std(rets) / np.sqrt(len(rets))))
        print("peer_result " + json.dumps(res), flush=True)


if __name__ == "__main__":
    main()

"""GWT-IB: recurrent PPO whose GRU memory is written only when the agent is surprised.

    c_t   = sigmoid(td_scale*|s_{t-1}| + base_logit + bias [+ MLP([z_t, h_{t-1}])])     gate in [0, 1]
    h_t   = h_{t-1} + c_t * (GRU(c_t * z_t, h_{t-1}) - h_{t-1})                          c=0 freezes memory
    s_t   = normalize(r_t + gamma*(1-term_t)*V(o_{t+1}, h_t, s=0) - V_t)                 surprise: the "clean" TD error
    loss  = PPO clip + vf_coef*value - ent_coef*entropy + lambda_c*mean_seq(mean_t c - target_c)^2

Three parts are one setting each: the memory (--memory, MEMORIES), the router (--router-layers, Router) and the
surprise signal (--surprise, surprise_signal). Read top to bottom: config, environments, model (Agent.step is the
recurrent step), TD normalizer, rollout, PPO+IB update, GateCheck, run management, main; last, an optional
accelerator (the step in C, checked against Agent.step at start-up). `python gwt_ib.py --help` lists every setting."""
from __future__ import annotations

import sys
if __name__ == "__main__":  # Ctrl-C while torch loads (seconds): one line, not a traceback
    sys.excepthook = lambda t, e, tb: print("gwt_ib.py: interrupted: stopped by SIGINT before training started; "
                                            "nothing was written", file=sys.stderr) if t is KeyboardInterrupt \
        else sys.__excepthook__(t, e, tb)

import argparse, contextlib, copy, ctypes, dataclasses, difflib, json, math, os, pickle, random, re, signal
import atexit, errno, fcntl, hashlib, io, platform, shlex, shutil, stat, subprocess, tempfile, threading, time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ============================================================================ config
def knob(default: Any, doc: str, allowed: Any = None) -> Any:
    """A Cfg field: its default, its one-line doc (--help), and what is allowed: a tuple of choices or a
    (test, description) pair; validate() checks it."""
    return dataclasses.field(default=default, metadata=dict(doc=doc, allowed=allowed))

# what is allowed, as (test, description): beside each field below
INT_1, INT_0 = (lambda v: v >= 1, "must be an integer >= 1"), (lambda v: v >= 0, "must be an integer >= 0")
NONNEG, POS = (lambda v: v >= 0, "must be >= 0"), (lambda v: v > 0, "must be > 0")
UNIT, OPEN_UNIT = (lambda v: 0 <= v <= 1, "must be in [0, 1]"), (lambda v: 0 < v < 1, "must be in (0, 1)")
NOT_EMPTY = (lambda v: v.strip() != "", "must not be empty")

@dataclass
class Cfg:
    env_id: str = knob("popgym-CountRecallEasy-v0", "any registered gymnasium id; popgym ids are registered on demand",
                       NOT_EMPTY)
    num_envs: int = knob(16, "environments stepped in parallel during the rollout", INT_1)
    seed: int = knob(42, "seeds python, numpy, torch and the environments",
                     (lambda v: 0 <= v < 2 ** 32, "must be an integer >= 0 and < 2**32 (numpy's seed range)"))
    prev_action: bool = knob(False, "append the previous action (one-hot; raw for Box) to the observation, as POPGym does")
    popgym_wrappers: bool = knob(False, "wrap each POPGym env in POPGym's PreviousAction and Antialias (its PPO "
                                 "protocol: the previous action, null action 0 at a reset, and an is-first-step flag)")
    async_envs: bool = knob(False, "step each environment in its own subprocess (env_workers = num_envs)")
    env_workers: int = knob(0, "step the envs in this many subprocesses, num_envs/env_workers each; 0 = in this process",
                            INT_0)
    total_timesteps: int = knob(500_000, "environment steps over the whole run (all envs together)")
    rollout_steps: int = knob(256, "steps per environment per rollout", INT_1)
    seq_len: int = knob(64, "BPTT length of a training sequence; must divide rollout_steps", INT_1)
    epochs: int = knob(4, "passes over each rollout", INT_1)
    minibatches: int = knob(4, "minibatches per epoch (sequences are shuffled as units)", INT_1)
    lr: float = knob(2.5e-4, "Adam learning rate", NONNEG)
    anneal_lr: bool = knob(False, "decay lr linearly to 0 over the run")
    gamma: float = knob(0.99, "discount", UNIT)
    gae_lambda: float = knob(0.95, "GAE lambda", UNIT)
    clip_eps: float = knob(0.2, "PPO ratio clip", POS)
    vf_coef: float = knob(0.5, "value-loss weight", NONNEG)
    ent_coef: float = knob(0.01, "entropy-bonus weight", NONNEG)
    max_grad_norm: float = knob(0.5, "global gradient-norm clip", POS)
    norm_adv: bool = knob(True, "normalize advantages per minibatch")
    enc_dim: int = knob(128, "encoder width (obs -> enc_dim -> enc_dim, tanh)", INT_1)
    memory: str = knob("gru", "the gated memory cell (MEMORIES): gru (nn.GRUCell) or lstm (nn.LSTMCell)", ("gru", "lstm"))
    hid_dim: int = knob(256, "memory size (the cell's hidden units)", INT_1)
    use_router_residual: bool = knob(True, "add the router, a zero-initialized MLP([z, h_prev]), to the prior logit")
    router_hid: int = knob(64, "hidden width of the router's MLP over [z, h_prev]", INT_1)
    router_layers: int = knob(1, "hidden (tanh) layers of the router's MLP", INT_1)
    head_hid: int = knob(256, "hidden width of the actor and critic MLPs", INT_1)
    surprise: str = knob("td", "what drives the gate (surprise_signal): td, value_change, reward or none",
                         ("td", "value_change", "reward", "none"))
    td_scale: float = knob(5.0, "weight of |surprise_norm_prev| in the gate logit", NONNEG)
    base_logit: float = knob(-1.0, "fixed gate logit offset (gate ~0.27 at zero surprise, before bias)")
    bias_init: float = knob(-1.5, "initial value of the learnable gate bias")
    bias_clamp_min: float = knob(-4.0, "lower clamp of the bias, applied after every optimizer step")
    bias_clamp_max: float = knob(2.0, "upper clamp of the bias")
    episode_start_td: str = knob("max", "the surprise the gate sees at an episode's 1st step: max (clip), zero, carry",
                                 ("zero", "carry", "max"))
    gate: str = knob("scalar", "scalar: one gate per step; vector: one gate per memory unit (GWT-IB-SEC)",
                     ("scalar", "vector"))
    force_c: Optional[float] = knob(None, "fix the gate to this value in [0, 1] (ablations); none = learned gate",
                                    (lambda v: v is None or 0 <= v <= 1, "must be in [0, 1] or none"))
    memoryless: bool = knob(False, "baseline: reset the memory to zero before every step (no memory at all)")
    target_c: float = knob(0.35, "gate budget: target mean gate per sequence", OPEN_UNIT)
    lambda_c: float = knob(0.05, "IB weight (at the start of the run if lambda_c_end is set)", NONNEG)
    lambda_c_end: Optional[float] = knob(None, "if set, the IB weight moves linearly from lambda_c to this (GWT-IB-SEC)",
                                         (lambda v: v is None or v >= 0, "must be >= 0 or none"))
    budget_warmup_updates: int = knob(25, "IB weight ramps linearly from 0 over this many updates", INT_0)
    ib_loss: str = knob("sq", "sq: (mean_t c - target_c)^2 per sequence; kl: KL(Bern(c)||Bern(target_c)); constraint",
                        ("sq", "kl", "constraint"))
    budget_ki: float = knob(0.5, "constraint: mean c = target_c by a Lagrange multiplier; its integral gain per update",
                            NONNEG)
    budget_kp: float = knob(5.0, "constraint: the multiplier's proportional gain (damps dual ascent's oscillation)",
                            NONNEG)
    td_scale_mode: str = knob("ema_quantile", "how the surprise is normalized: ema, quantile or ema_quantile "
                              "(TDNormalizer)", ("ema", "quantile", "ema_quantile"))
    td_ema: float = knob(0.99, "EMA rate of the surprise's mean (and of the variance in ema mode)", OPEN_UNIT)
    td_scale_ema2: float = knob(0.995, "EMA rate of the quantile scale in ema_quantile mode", OPEN_UNIT)
    td_quantile: float = knob(0.90, "quantile of |surprise - mean| used as scale in the quantile modes", OPEN_UNIT)
    td_window: int = knob(4096, "surprises kept for the quantile mode's sliding window",
                          (lambda v: v >= 2, "must be an integer >= 2"))
    td_std_min: float = knob(1e-3, "lower clamp of the surprise scale", POS)
    td_std_max: float = knob(50.0, "upper clamp of the surprise scale")
    td_norm_clip: float = knob(5.0, "the normalized surprise is clipped to [-clip, clip]", POS)
    eval_every: int = knob(10, "evaluation every this many updates (also after the first rollout and at the end)",
                           INT_0)
    eval_episodes: int = knob(32, "episodes per evaluation, one per eval env, run in parallel", INT_1)
    eval_mode: str = knob("sampled", "evaluation policy: sampled (as POPGym reports) or greedy (argmax/mean action)",
                          ("sampled", "greedy"))
    eval_ok_alpha: float = knob(0.01, "GateCheck eval_ok: level of the one-sided Welch test 'late evals > the first'",
                                OPEN_UNIT)
    eval_ok_min_effect: float = knob(0.1, "GateCheck eval_ok: late - first must also be this share of the evals' "
                                     "return range", NONNEG)
    gatecheck_rollouts: int = knob(4, "the last this-many rollouts supply GateCheck's (surprise, c) samples", INT_1)
    log_every: int = knob(10, "print the progress line every this many updates", INT_1)
    out_dir: str = knob("runs", "parent directory of run directories", NOT_EMPTY)
    run_name: str = knob("", "run directory name; empty = <env>__s<seed>__<time>; never overwrites",
                         (lambda v: "/" not in v and v not in (".", "..") and len(v.encode()) < 240,
                          "must be a plain directory name (no '/', under 240 bytes)"))
    checkpoint_every: int = knob(10, "write checkpoint.pt (atomically) every this many updates", INT_1)
    save_plot: bool = knob(True, "write training.png into the run directory at the end")
    progress: bool = knob(True, "show the tqdm progress bar")
    device: str = knob("auto", "auto (cuda when available), cpu, cuda or cuda:N")
    torch_threads: int = knob(0, "torch intra-op threads; 0 = leave torch's default", INT_0)
    halt_after: int = knob(0, "stop cleanly (checkpoint + summary) after this many updates in this invocation; "
                           "0 = never", INT_0)
    cpu_kernel: bool = knob(True, "on CPU, run the C cell (end of file) if it matches Agent.step at start-up")
    cuda_graph: bool = knob(True, "on CUDA, run each minibatch's forward and backward as a captured CUDA graph (end of "
                            "file) if it matches eager at the first update")

# --preset NAME: defaults that flags then override. popgym: this trainer's counterparts of POPGym's PPO settings (its
# baselines' ppo.py): batch 65,536 (64 envs x 1,024 steps), minibatch 8,192, lr 5e-5, GAE lambda 1.0, 30 SGD passes,
# clip 0.3, value weight 1.0, no entropy bonus, memory 256, 10M env steps, its PreviousAction and Antialias wrappers.
PRESETS = {"popgym": dict(popgym_wrappers=True, num_envs=64, rollout_steps=1024, minibatches=8, lr=5e-5,
                          gae_lambda=1.0, epochs=30, clip_eps=0.3, vf_coef=1.0, ent_coef=0.0, hid_dim=256,
                          total_timesteps=10_000_000)}

class ConfigError(ValueError):
    """A bad setting: names the field, the value and what is allowed."""
    def __init__(self, name: str, value: Any, allowed: str):
        super().__init__(f"--{name.replace('_', '-')} {value!r}: {allowed}")
        self.name, self.value, self.allowed = name, value, allowed

def one_line(e: BaseException) -> str:
    """An exception as one line for an error message: its type and the first sentence of its text (torch's run on)."""
    text = re.sub(r"(?s).*WeightsUnpickler error:", "", str(e)).strip().split("\n\n")[0].split(". ")[0]
    return f"{type(e).__name__}: {' '.join(text.split())}".removesuffix(": ")[:200]

def field_docs() -> dict[str, str]:
    return {f.name: f.metadata["doc"] for f in dataclasses.fields(Cfg)}

def _field_kind(f: dataclasses.Field) -> tuple[type, bool]:
    """(base type, optional) of a Cfg field from its annotation string."""
    base = str(f.type).removeprefix("Optional[").removesuffix("]")
    return {"int": int, "float": float, "bool": bool, "str": str}[base], base != str(f.type)

_BOOLS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
def _convert(name: str, raw: str, typ: type, optional: bool) -> Any:
    if optional and raw.lower() in ("none", "null", ""):
        return None
    try:
        return _BOOLS[raw.lower()] if typ is bool else int(raw.replace("_", "")) if typ is int else typ(raw)
    except (KeyError, ValueError):
        what = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[typ]
        raise ConfigError(name, raw, f"must be {what}{' or none' if optional else ''}") from None

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, suggestions for a mistyped flag
        if m := re.search(r"unrecognized arguments: (\S+)", message):
            flags = [s for a in self._actions for s in a.option_strings]
            close = difflib.get_close_matches(m.group(1).split("=")[0], flags, n=3)
            message += f" (did you mean {', '.join(close)}?)" if close else ""
        print(f"gwt_ib.py: error: {message}", file=sys.stderr)
        sys.exit(2)

def build_parser() -> argparse.ArgumentParser:
    """--field-name for every Cfg field (as a string: parse_overrides converts and validate() checks it)."""
    p = _Parser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                allow_abbrev=False,  # a typo such as --num-env must not silently set --num-envs
                epilog="Examples:\n  python gwt_ib.py\n  python gwt_ib.py --env-id popgym-BattleshipEasy-v0 "
                       "--total-timesteps 100000 --force-c 1.0\n  python gwt_ib.py --resume runs/<run>")
    for f in dataclasses.fields(Cfg):
        typ = _field_kind(f)[0]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, metavar=typ.__name__.upper(), default=None,
                       help=f"{f.metadata['doc']} (default: {f.default})",
                       **(dict(nargs="?", const="true") if typ is bool else {}))
    p.add_argument("--preset", choices=sorted(PRESETS), help="start from these settings instead of Cfg's defaults "
                   "(PRESETS; popgym: POPGym's PPO protocol); the other flags override them")
    p.add_argument("--list-envs", action="store_true", help="print POPGym ids with their spaces and exit")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                   "(its config.json is used; flags given here override it)")
    p.add_argument("--evaluate", metavar="RUN_DIR", help="evaluate RUN_DIR's last checkpoint again with GateCheck's "
                   "counterfactual arms (--eval-episodes N for tighter CIs); writes RUN_DIR/evaluate-<time>.json")
    return p

def parse_overrides(ns: argparse.Namespace, base: Cfg) -> Cfg:
    """Typed Cfg from argparse strings; only flags that were given override `base`."""
    return dataclasses.replace(base, **{f.name: _convert(f.name, getattr(ns, f.name), *_field_kind(f))
                                        for f in dataclasses.fields(Cfg) if getattr(ns, f.name) is not None})

def validate(cfg: Cfg) -> None:
    """Check every field's type and what it allows, then the fields' relations, before anything starts; raise
    ConfigError on the first bad one."""
    def need(name, cond, allowed):
        if not cond:
            raise ConfigError(name, getattr(cfg, name), allowed)

    for f in dataclasses.fields(Cfg):
        v, (typ, opt), allowed = getattr(cfg, f.name), _field_kind(f), f.metadata["allowed"]
        need(f.name, (v is None and opt) or (type(v) is typ) or (typ is float and type(v) is int),
             f"must be {typ.__name__}{' or None' if opt else ''}")
        need(f.name, not isinstance(v, float) or math.isfinite(v), "must be finite")
        if isinstance(allowed, tuple) and isinstance(allowed[0], str):
            need(f.name, v in allowed, f"must be one of {', '.join(allowed)}")
        elif allowed:
            need(f.name, allowed[0](v), allowed[1])
    c = cfg  # the fields' relations
    need("seq_len", c.rollout_steps % c.seq_len == 0, f"must divide rollout_steps ({c.rollout_steps})")
    n_seq = c.num_envs * c.rollout_steps // c.seq_len  # sequences per rollout
    need("minibatches", n_seq % c.minibatches == 0,
         f"must divide the number of sequences per rollout (num_envs*rollout_steps/seq_len = {n_seq})")
    need("total_timesteps", c.total_timesteps >= c.num_envs * c.rollout_steps,
         f"must be >= num_envs*rollout_steps ({c.num_envs * c.rollout_steps}) for at least one update")
    need("bias_clamp_min", c.bias_clamp_min < c.bias_clamp_max, f"must be < bias_clamp_max ({c.bias_clamp_max})")
    need("bias_init", c.bias_clamp_min <= c.bias_init <= c.bias_clamp_max,
         f"must lie in [bias_clamp_min, bias_clamp_max] = [{c.bias_clamp_min}, {c.bias_clamp_max}]")
    need("td_std_min", c.td_std_min < c.td_std_max, f"must be < td_std_max ({c.td_std_max})")
    need("gate", c.gate == "scalar" or c.use_router_residual,
         "vector gates need use_router_residual=true (the prior alone is one number per step)")
    need("prev_action", not (c.prev_action and c.popgym_wrappers), "cannot be combined with popgym_wrappers=true "
         "(POPGym's PreviousAction adds the previous action already)")
    need("env_workers", c.env_workers <= c.num_envs, f"must be <= num_envs ({c.num_envs})")
    need("env_workers", not (c.env_workers and c.async_envs), "cannot be combined with async_envs=true")
    cpus = os.cpu_count() or 1  # settings that would take the machine down rather than run faster
    need("torch_threads", c.torch_threads <= cpus, f"must be <= the number of CPUs here ({cpus})")
    need("num_envs" if c.async_envs else "env_workers", (c.num_envs if c.async_envs else c.env_workers) <= 4 * cpus,
         f"makes too many env processes: at most 4 per CPU ({4 * cpus} here)")
    m = re.fullmatch(r"(auto|cpu|cuda)(:(\d+))?", c.device)
    need("device", m is not None and (m.group(2) is None or m.group(1) == "cuda"), "must be auto, cpu, cuda or cuda:N")
    n = torch.cuda.device_count() if m.group(1) == "cuda" else 1
    need("device", n > 0, "no CUDA device is available here (use cpu or auto)")
    need("device", m.group(3) is None or int(m.group(3)) < n, f"must index one of the {n} CUDA devices")



# ============================================================================ environments
def _gym():
    """gymnasium with POPGym's ids registered (imported only when an env is made: it is slow)."""
    try:
        import popgym  # noqa: F401
    except ImportError:
        pass
    return gym

def check_env_id(env_id: str) -> None:
    if env_id not in _gym().registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else "see `python gwt_ib.py --list-envs`"
        raise ConfigError("env_id", env_id, f"is not a registered gymnasium id; {hint}")

def check_obs_space(space, env_id: str, path: str = "obs") -> None:
    """The spaces FlatObs turns into a vector (Discrete, MultiDiscrete one-hot, as POPGym's baselines do)."""
    S = gym.spaces
    if isinstance(space, (S.Tuple, S.Dict)):
        for k, s in (space.spaces.items() if isinstance(space, S.Dict) else enumerate(space.spaces)):
            check_obs_space(s, env_id, f"{path}[{k!r}]")
    elif not isinstance(space, (S.Box, S.Discrete, S.MultiDiscrete, S.MultiBinary)):
        raise ConfigError("env_id", env_id, f"its {path} is {space}, an unsupported observation space; supported: "
                                            "Box, Discrete, MultiDiscrete, MultiBinary and Tuple/Dict of these")

@dataclass
class ActSpec:
    """How the actor's flat output maps to an action space."""
    kind: str  # "discrete" (Discrete / MultiDiscrete: one categorical per component) or "box" (diagonal Gaussian)
    n_out: int  # actor output size
    nvec: tuple = ()  # categories per component (discrete)
    start: tuple = ()  # first category of each component (discrete)
    multi: bool = False  # MultiDiscrete (env expects an array) rather than Discrete (env expects an int)
    low: Optional[np.ndarray] = None  # bounds (box)
    high: Optional[np.ndarray] = None
    shape: tuple = ()  # action shape the env expects (box)

    @property
    def enc_dim(self) -> int:  # size of the previous-action encoding
        return sum(self.nvec) if self.kind == "discrete" else self.n_out

def action_spec(space) -> ActSpec:
    S = gym.spaces
    if isinstance(space, S.Discrete):
        return ActSpec("discrete", int(space.n), (int(space.n),), (int(space.start),))
    if isinstance(space, S.MultiDiscrete) and space.nvec.ndim == 1:
        nvec, start = tuple(map(int, space.nvec)), tuple(map(int, np.broadcast_to(space.start, space.nvec.shape)))
        return ActSpec("discrete", sum(nvec), nvec, start, multi=True)
    if isinstance(space, S.Box) and np.issubdtype(space.dtype, np.floating):
        return ActSpec("box", int(np.prod(space.shape)), low=space.low.reshape(-1).astype(np.float32),
                       high=space.high.reshape(-1).astype(np.float32), shape=tuple(space.shape))
    raise ConfigError("env_id", str(space), "has an unsupported action space; supported: Discrete, "
                                            "MultiDiscrete (1-D) and float Box")

class FlatObs(gym.ObservationWrapper):
    """Observations as flat vectors by gymnasium.spaces.flatten. gymnasium's FlattenObservation does
    the same through a lambda, which does not pickle (checkpoints store in-process env state)."""
    def __init__(self, env):
        super().__init__(env)
        self.observation_space = gym.spaces.flatten_space(env.observation_space)

    def observation(self, obs):
        return gym.spaces.flatten(self.env.observation_space, obs)

    def reset(self, *, seed=None, options=None):  # env i gets seed + i: keep it a seed numpy takes (POPGym's mazes)
        return super().reset(seed=None if seed is None else seed % 2 ** 32, options=options)

EnvError = type("EnvError", (RuntimeError,), {"__doc__": "The environment raised: an error before training, "
                                                          "status env_error during it."})

def env_call(fn, *args, **kw):
    """fn(*args, **kw), with whatever the environment raises (its bugs, its I/O, a sys.exit) as an EnvError."""
    try:
        return fn(*args, **kw)
    except (ConfigError, EnvError):
        raise
    except (Exception, SystemExit) as e:
        raise EnvError(f"the environment raised {one_line(e)}") from e

def make_env(env_id: str, popgym_wrappers: bool = False):
    env = _gym().make(env_id, disable_env_checker=True)  # the checker only warns about popgym infos
    if popgym_wrappers:  # POPGym's baselines wrap every env so (they assert a POPGymEnv inside)
        from popgym.core.env import POPGymEnv
        from popgym.wrappers import Antialias, PreviousAction
        if not isinstance(env, POPGymEnv):
            raise ConfigError("popgym_wrappers", True, f"needs a POPGym env; {env_id} is not one")
        env = Antialias(PreviousAction(env))
    check_obs_space(env.observation_space, env_id)
    return FlatObs(env)

def make_envs(cfg: Cfg, n: int, async_envs: bool = False, workers: int = 0):
    """SAME_STEP autoreset: step() returns the new episode's first observation and puts the real last one
    in info["final_obs"], so every stored transition is one the env made (no dummy reset step)."""
    if workers or async_envs:
        return ShardedVectorEnv(cfg, n, n if async_envs else workers)
    from gymnasium.vector import AutoresetMode, SyncVectorEnv
    return SyncVectorEnv([lambda: make_env(cfg.env_id, cfg.popgym_wrappers)] * n,
                         autoreset_mode=AutoresetMode.SAME_STEP)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)  # what StopFlag handles

def _shard_worker(pipe, cfg: Cfg, n: int, inherited: list) -> None:
    """Steps n envs for ShardedVectorEnv. Stop signals are the trainer's (a Ctrl-C reaches the whole process group):
    ignored here, the trainer closes its workers. What the envs raise, sys.exit included, goes back as a message."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the trainer while it forked
    for conn in inherited:  # the other pipes' ends: only then does a dead peer read as EOF
        conn.close()
    try:
        envs = make_envs(cfg, n)
        while (msg := pipe.recv())[0] != "close":
            if msg[0] == "reset":
                pipe.send(("ok", envs.reset(seed=msg[1])[0]))
            else:
                obs, r, term, trunc, info = envs.step(msg[1])
                pipe.send(("ok", (obs, r, term, trunc, info.get("final_obs", np.full(n, None, object)))))
        envs.close()
    except EOFError:  # the trainer is gone
        pass
    except BaseException as e:
        with contextlib.suppress(OSError):
            pipe.send(("error", f"the environment raised {one_line(e)}"))

class ShardedVectorEnv:
    """n envs stepped by `workers` subprocesses, each a SAME_STEP SyncVectorEnv over its share: unlike
    one process per env (gymnasium's AsyncVectorEnv) the messages stay few. Env i gets seed `seed + i`
    at reset, as in SyncVectorEnv, so a run is the same as in-process. A worker that dies is an EnvError."""
    def __init__(self, cfg: Cfg, n: int, workers: int):
        import multiprocessing as mp
        from multiprocessing.connection import wait
        fork = "fork" in mp.get_all_start_methods()
        ctx, self.wait = mp.get_context("fork" if fork else "spawn"), wait
        with make_env(cfg.env_id, cfg.popgym_wrappers) as probe:
            self.single_observation_space, self.single_action_space = probe.observation_space, probe.action_space
        self.num_envs, self.sizes = n, [len(a) for a in np.array_split(np.arange(n), workers)]
        self.pipes, children = zip(*[ctx.Pipe() for _ in self.sizes])
        ends = [*self.pipes, *children]  # a forked worker inherits all of them
        self.procs = [ctx.Process(target=_shard_worker, daemon=True,
                                  args=(c, cfg, k, [e for e in ends if e is not c] if fork else []))
                      for c, k in zip(children, self.sizes)]
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # no signal before a worker ignores them
        try:
            for p in self.procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for c in children:
            c.close()
        atexit.register(self.close)  # before multiprocessing's exit handler, which would wait for them forever

    def _recv(self, i: int):
        pipe, proc = self.pipes[i], self.procs[i]
        self.wait([pipe, proc.sentinel])
        with contextlib.suppress(EOFError, OSError):
            if pipe.poll():
                kind, value = pipe.recv()
                if kind == "ok":
                    return value
                raise EnvError(value)
        proc.join(1)
        code = proc.exitcode
        how = f"killed by {signal.Signals(-code).name}" if code and code < 0 else f"exit status {code}"
        raise EnvError(f"env worker {i} (pid {proc.pid}) died ({how})")

    def reset(self, seed: Optional[int] = None):
        with contextlib.suppress(BrokenPipeError):
            for pipe, o in zip(self.pipes, np.cumsum([0] + self.sizes[:-1])):
                pipe.send(("reset", None if seed is None else seed + int(o)))
        return np.concatenate([self._recv(i) for i in range(len(self.pipes))]), {}

    def step(self, actions):
        with contextlib.suppress(BrokenPipeError):  # a dead worker: _recv says which and how
            for pipe, a in zip(self.pipes, np.split(actions, np.cumsum(self.sizes)[:-1])):
                pipe.send(("step", a))
        obs, r, term, trunc, final = (np.concatenate(z) for z in zip(*[self._recv(i) for i in range(len(self.pipes))]))
        return obs, r, term, trunc, {"final_obs": final}

    def close(self):
        for pipe, p in zip(self.pipes, self.procs):
            with contextlib.suppress(OSError):  # a worker that died already
                pipe.send(("close", None))
        for p in self.procs:
            p.join(timeout=5)
            if p.exitcode is None:  # stuck in an env: it ignores SIGTERM
                p.kill()
                p.join()
        for pipe in self.pipes:
            pipe.close()
        atexit.unregister(self.close)

def list_envs() -> str:
    lines = []
    for env_id in sorted(i for i in _gym().registry if i.startswith("popgym-")):
        with gym.make(env_id) as e:
            lines.append(f"{env_id:45s} obs {e.observation_space}  act {e.action_space}".replace("\n", ""))
    return "\n".join(lines)


# ============================================================================ model
def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias: float = 0.0) -> nn.Linear:
    nn.init.orthogonal_(layer.weight, std)  # CleanRL's PPO init
    nn.init.constant_(layer.bias, bias)
    return layer

# --- memory: a recurrent cell whose state the rest of the file never looks into (PureJaxRL's `ScannedRNN`).
# `forward(z, s)` is the cell's proposed next state, `read(s)` what the router and the heads see. Agent.step gates it:
# the input is c*z and the new state lerp(s, forward(c*z, s), c), so c = 0 keeps the whole state and c = 1 is the cell.
class GRUMemory(nn.Module):
    """nn.GRUCell; state (B, H) = h."""
    def __init__(self, E: int, H: int):
        super().__init__()
        self.cell, self.H, self.state_dim = nn.GRUCell(E, H), H, H

    def read(self, s: torch.Tensor) -> torch.Tensor:
        return s

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return self.cell(z, s)

class LSTMMemory(nn.Module):
    """nn.LSTMCell; state (B, 2H) = [h, cell state]: the gate holds both."""
    def __init__(self, E: int, H: int):
        super().__init__()
        self.cell, self.H, self.state_dim = nn.LSTMCell(E, H), H, 2 * H

    def read(self, s: torch.Tensor) -> torch.Tensor:
        return s[..., :self.H]

    def forward(self, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.cell(z, s.chunk(2, -1)), -1)

MEMORIES = {"gru": GRUMemory, "lstm": LSTMMemory}  # --memory; a new cell: a class with read/forward/state_dim here

class Router(nn.Module):
    """The gate's learned residual logit MLP([z, h_prev]) -> (B, G): `layers` tanh layers of width `hid`. Its output
    layer starts at zero, so at initialization the surprise prior alone sets the gate."""
    def __init__(self, E: int, H: int, hid: int, layers: int, G: int):
        super().__init__()
        dims = [E + H] + [hid] * layers
        self.mlp = nn.Sequential(*[m for i, o in zip(dims, dims[1:]) for m in (nn.Linear(i, o), nn.Tanh())])
        self.out = nn.Linear(hid, G)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.mlp(torch.cat([z, h], -1)))

class Agent(nn.Module):
    """Encoder -> router (gate c) -> gated memory -> actor and critic heads.

    `step` is the one definition of the recurrent step; what does not depend on the memory runs batched over whole
    sequences (`features`, `gate_prior`, `heads`). E = enc_dim, H = hid_dim, S = the memory's state size, G = gates
    per step (1, or H for a vector gate). `accel`: a fast path from the accelerator section, checked equal to `step`."""
    def __init__(self, obs_dim: int, act: ActSpec, cfg: Cfg):
        super().__init__()
        E, H = cfg.enc_dim, cfg.hid_dim
        self.cfg, self.act, self.obs_dim, self.H = cfg, act, obs_dim, H
        self.G = H if cfg.gate == "vector" else 1
        self.enc = nn.Sequential(layer_init(nn.Linear(obs_dim, E)), nn.Tanh(), layer_init(nn.Linear(E, E)), nn.Tanh())
        self.memory = MEMORIES[cfg.memory](E, H)
        self.router = Router(E, H, cfg.router_hid, cfg.router_layers, self.G) if cfg.use_router_residual else None
        self.bias = nn.Parameter(torch.tensor(float(cfg.bias_init)))
        head = lambda n, std: nn.Sequential(layer_init(nn.Linear(H, cfg.head_hid)), nn.Tanh(),  # noqa: E731
                                            layer_init(nn.Linear(cfg.head_hid, n), std))
        self.actor, self.critic = head(act.n_out, 0.01), head(1, 1.0)
        self.log_std = nn.Parameter(torch.zeros(act.n_out)) if act.kind == "box" else None
        self.accel = None  # set by accelerate() (end of file) when its fast path equals step() for this agent

    def features(self, obs: torch.Tensor) -> torch.Tensor:
        """z = the encoded observation: (..., obs_dim) -> (..., E)."""
        return self.enc(obs)

    def gate_surprise(self, surprise: torch.Tensor, episode_start: torch.Tensor) -> torch.Tensor:
        """The normalized surprise the gate sees (...): the previous step's, except at an episode's first step, where
        it is 0 ("zero"), the env's last of the episode before ("carry") or td_norm_clip ("max": a new memory)."""
        mode = self.cfg.episode_start_td
        return surprise if mode == "carry" else torch.where(episode_start > 0, 0.0 if mode == "zero" else
                                                            self.cfg.td_norm_clip, surprise)

    def gate_prior(self, surprise: torch.Tensor, episode_start: torch.Tensor):
        """-> prior gate logit (..., 1) and keep (..., 1), the mask applied to the memory (zeroed at an episode
        start). With force_c the 'logit' is the fixed gate itself."""
        keep = (1.0 - episode_start).unsqueeze(-1)
        keep_h = torch.zeros_like(keep) if self.cfg.memoryless else keep
        if self.cfg.force_c is not None:
            return torch.full_like(keep, self.cfg.force_c), keep_h
        s = self.gate_surprise(surprise, episode_start).unsqueeze(-1)
        return self.cfg.td_scale * s.abs() + self.cfg.base_logit + self.bias, keep_h

    def gate(self, z: torch.Tensor, prior: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """c (B, G) = sigmoid(prior + router(z, h_prev)); the prior itself with force_c."""
        if self.cfg.force_c is not None:
            return prior
        return torch.sigmoid(prior if self.router is None else prior + self.router(z, self.memory.read(s)))

    def step(self, z, prior, keep, state):
        """The recurrent step: z (B, E), prior and keep (B, 1), state (B, S) -> c (B, G), state (B, S)."""
        if self.accel is not None and not torch.is_grad_enabled():  # the accelerator's, checked equal to the code below
            return self.accel.step(self, z, prior, keep, state)
        s = state * keep  # a new episode starts from an empty memory
        c = self.gate(z, prior, s)
        c_in = c if c.shape[-1] == 1 else c.mean(-1, keepdim=True)  # the gate on the input z: a vector gate's mean
        c_s = c if c.shape[-1] == 1 else c.repeat(1, s.shape[-1] // c.shape[-1])  # unit j's gate on all of its state
        return c, torch.lerp(s, self.memory(c_in * z, s), c_s)  # s + c*(cell(c*z, s) - s): exactly s at c = 0

    def frozen(self):
        """A block in which the parameters do not change (a rollout, an evaluation): the accelerator may pack them."""
        return contextlib.nullcontext() if self.accel is None else self.accel.frozen(self)

    def value(self, state: torch.Tensor) -> torch.Tensor:
        return self.critic(self.memory.read(state)).squeeze(-1)

    def heads(self, state: torch.Tensor):
        return self.actor(self.memory.read(state)), self.value(state)

    def unroll(self, obs, state0, surprise, episode_start):
        """The step over sequences from stored state: obs (L, B, D), state0 (B, S), surprise/episode_start (L, B)
        -> logits (L, B, n_out), value (L, B), c (L, B, G), state (L, B, S)."""
        z = self.features(obs)  # (L, B, E), batched
        prior, keep = self.gate_prior(surprise, episode_start)  # (L, B, 1) each
        if self.accel is not None:  # the same loop as one autograd node, its backward in C
            states, cs = self.accel.unroll(self, z, prior, keep, state0)
        else:
            out = [(None, state0)]
            for zt, pt, kt in zip(z.unbind(0), prior.unbind(0), keep.unbind(0)):  # unbind: one backward node
                out.append(self.step(zt, pt, kt, out[-1][1]))
            cs, states = (torch.stack(v) for v in zip(*out[1:]))
        logits, value = self.heads(states)  # batched over all L*B steps
        return logits, value, cs, states

# --- action distributions (plain tensor code: torch.distributions costs per-step overhead)
def _cat_logits(act: ActSpec, logits: torch.Tensor) -> torch.Tensor:
    """(..., sum nvec) -> (..., K, max n) log-probs; padded categories get -1e9 (probability 0)."""
    parts = [F.pad(p, (0, max(act.nvec) - p.shape[-1]), value=-1e9) for p in logits.split(list(act.nvec), -1)]
    return F.log_softmax(torch.stack(parts, -2), -1)

def _gauss_logp(a, mean, log_std):  # diagonal Gaussian, components summed
    return (-0.5 * ((a - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

def sample_action(agent: Agent, logits: torch.Tensor, greedy: bool):
    """-> action (B, K) long or (B, dim) float, log-prob (B,)."""
    if agent.act.kind == "discrete":
        logp = _cat_logits(agent.act, logits)  # (B, K, m)
        a = logp.argmax(-1) if greedy else (logp - torch.empty_like(logp).exponential_().log()).argmax(-1)  # Gumbel-max
        return a, logp.gather(-1, a.unsqueeze(-1)).squeeze(-1).sum(-1)
    a = logits if greedy else logits + agent.log_std.exp() * torch.randn_like(logits)
    return a, _gauss_logp(a, logits, agent.log_std)

def logp_entropy(agent: Agent, logits: torch.Tensor, a: torch.Tensor):
    """Log-prob and entropy of stored actions under new logits; components summed."""
    if agent.act.kind == "discrete":
        logp = _cat_logits(agent.act, logits)
        return logp.gather(-1, a.unsqueeze(-1)).squeeze(-1).sum(-1), -(logp.exp() * logp).sum(-1).sum(-1)
    ent = (0.5 + 0.5 * math.log(2 * math.pi) + agent.log_std).sum(-1).expand(logits.shape[:-1])
    return _gauss_logp(a, logits, agent.log_std), ent


# ============================================================================ TD normalizer
class TDNormalizer:
    """td_norm = clip((delta - mu) / s, -td_norm_clip, td_norm_clip), updated once per vector step with the
    batch d of TD errors (first batch: direct estimates); a = td_ema, a2 = td_scale_ema2, q = td_quantile:
      "ema":          mu <- a*mu + (1-a)*mean(d);  v <- a*v + (1-a)*mean((d-mu)^2);  s = sqrt(v)
      "ema_quantile": mu <- a*mu + (1-a)*median(d);  s <- a2*s + (1-a2)*quantile_q(|d-mu|)
      "quantile":     mu = median(W);  s = quantile_q(|W-mu|) over the last td_window errors W
    s is clamped to [td_std_min, td_std_max]. Medians and quantiles: one huge outlier cannot blow up mu
    or s. Everything stays on the device: no host sync per step."""
    def __init__(self, cfg: Cfg, device: torch.device):
        self.cfg, self.mode, self.count, self.wpos, self.wfill = cfg, cfg.td_scale_mode, 0, 0, 0
        self.mean, self.var, self.scale = (torch.full((), v, device=device) for v in (0.0, 1.0, 1.0))
        self.floor_hits = torch.zeros((), dtype=torch.long, device=device)  # updates whose scale hit td_std_min
        self.window = torch.zeros(cfg.td_window, device=device)

    def update(self, d: torch.Tensor) -> None:
        cfg, a, first = self.cfg, self.cfg.td_ema, self.count == 0
        d = d.detach().float().reshape(-1)
        if self.mode == "ema":
            self.mean = d.mean() if first else torch.lerp(self.mean, d.mean(), 1 - a)  # a*mean + (1-a)*m in one op
            v = ((d - self.mean) ** 2).mean()
            var = v if first else torch.lerp(self.var, v, 1 - a)
            self.var, raw = var.clamp(cfg.td_std_min ** 2, cfg.td_std_max ** 2), var.sqrt()
            self.scale = self.var.sqrt()
        elif self.mode == "ema_quantile":
            self.mean = d.median() if first else torch.lerp(self.mean, d.median(), 1 - a)
            q = self.quantile((d - self.mean).abs(), cfg.td_quantile)
            raw = q if first else torch.lerp(self.scale, q, 1 - cfg.td_scale_ema2)
            self.scale = raw.clamp(cfg.td_std_min, cfg.td_std_max)
        else:  # quantile over a sliding window
            n, W = d.numel(), self.window.numel()
            self.window[(self.wpos + torch.arange(n, device=d.device)) % W] = d
            self.wpos, self.wfill = (self.wpos + n) % W, min(W, self.wfill + n)
            w = self.window[:self.wfill]
            self.mean = w.median()
            raw = self.quantile((w - self.mean).abs(), cfg.td_quantile)
            self.scale = raw.clamp(cfg.td_std_min, cfg.td_std_max)
        self.floor_hits += raw < cfg.td_std_min  # GateCheck's std_ok: was the scale pinned at its floor?
        self.count += d.numel()

    @staticmethod
    def quantile(v: torch.Tensor, q: float) -> torch.Tensor:  # torch.quantile (linear) without its ~0.2 ms overhead
        s, pos = v.sort().values, q * (v.numel() - 1)
        return torch.lerp(s[int(pos)], s[min(int(pos) + 1, v.numel() - 1)], pos - int(pos))

    def normalize(self, d: torch.Tensor) -> torch.Tensor:
        return ((d - self.mean) / self.scale).clamp(-self.cfg.td_norm_clip, self.cfg.td_norm_clip)

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("mean", "var", "scale", "count", "window", "wpos", "wfill")}

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            setattr(self, k, v.to(self.mean.device) if torch.is_tensor(v) else v)


# ============================================================================ rollout
def surprise_signal(kind: str, r, disc, v_next, v) -> torch.Tensor:
    """The surprise of a transition (N,) before normalization: what drives the gate (--surprise). v = V(o_t, h_{t-1}),
    v_next = V(o_{t+1}, h_t, surprise = 0) (the clean bootstrap), disc = gamma*(1-term_t):
      td            r + disc*v_next - v    the TD error: reward and value together (the default)
      value_change  disc*v_next - v        the change of the value estimate alone
      reward        r                      the reward alone: a value-free signal"""
    return {"td": lambda: r + disc * v_next - v, "value_change": lambda: disc * v_next - v, "reward": lambda: r}[kind]()

class Collector:
    """Steps a vector env with Agent.step (the function the update unrolls), carrying the memory state h, the
    normalized surprise and episode_start between steps; serves training rollouts and evaluation alike.
    `start[i] = 1` marks the first observation of an episode (the env reset in the same step that ended
    the last one). Terminated steps are not bootstrapped; truncated ones (time limits) are bootstrapped
    from the value of the real final observation, computed like every TD target with surprise = 0."""
    STATE = ("obs", "h", "surprise", "start", "prev_a", "ep_ret", "ep_len")  # what a checkpoint stores

    def __init__(self, cfg: Cfg, envs, agent: Agent, norm: TDNormalizer, device: torch.device):
        self.cfg, self.envs, self.agent, self.norm, self.dev = cfg, envs, agent, norm, device
        self.N, self.act = envs.num_envs, agent.act
        self.arm = None  # in an evaluation, GateCheck's counterfactual gated step (counterfactual()); None: Agent.step

    def reset(self, seed: Optional[int]) -> None:
        N = self.N
        self.prev_a = np.zeros((N, self.act.enc_dim), np.float32)
        self.obs = self._obs(env_call(self.envs.reset, seed=seed)[0], self.prev_a)
        self.h = torch.zeros(N, self.agent.memory.state_dim, device=self.dev)
        self.surprise, self.start = torch.zeros(N, device=self.dev), torch.ones(N, device=self.dev)
        self.ep_ret, self.ep_len = np.zeros(N), np.zeros(N, np.int64)
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Features of the current obs and the clean bootstrap's prior, after each update (rollout() does)."""
        self.z, zero = self.agent.features(self.obs), torch.zeros_like(self.surprise)
        self.clean = self.agent.gate_prior(zero, zero)

    def _obs(self, flat: np.ndarray, prev_a: Optional[np.ndarray]) -> torch.Tensor:
        flat = np.asarray(flat, np.float32)
        return torch.from_numpy(np.concatenate([flat, prev_a], 1) if self.cfg.prev_action else flat).to(self.dev)

    def _prev_action(self, env_a) -> np.ndarray:  # one-hot per component (discrete), the clipped action (box)
        return np.stack([gym.spaces.flatten(self.envs.single_action_space, x) for x in env_a]).astype(np.float32)

    def _to_env(self, a: np.ndarray):
        act = self.act
        if act.kind == "box":
            return np.clip(a, act.low, act.high).reshape(len(a), *act.shape)  # clip only what the env sees
        return a + np.asarray(act.start) if act.multi else a[:, 0] + act.start[0]

    @torch.no_grad()
    def value(self) -> torch.Tensor:
        """V of the current state with the current surprise (GAE's bootstrap after the last step)."""
        ag = self.agent
        return ag.value(ag.step(self.z, *ag.gate_prior(self.surprise, self.start), self.h)[1])

    @torch.no_grad()
    def step(self, greedy: bool, update_norm: bool):
        """One vector step from the current state -> (record, finished): record holds this step's
        tensors for the buffer; finished lists (env, return, length) of episodes that ended."""
        ag, cfg = self.agent, self.cfg
        h0, surprise, start, obs = self.h, self.surprise, self.start, self.obs  # Agent.gate_surprise reads start
        if self.arm is None:
            c, h = ag.step(self.z, *ag.gate_prior(surprise, start), h0)
        else:  # only the memory write changes: actor, critic and the surprise are the agent's
            c, h = self.arm(self.z, surprise, start, h0)
        logits, value = ag.heads(h)
        a, logp = sample_action(ag, logits, greedy)
        a_np = a.cpu().numpy()  # the one device->host copy per step
        env_a = self._to_env(a_np)
        raw, r, term, trunc, info = env_call(self.envs.step, env_a)
        done = term | trunc
        a_enc = self._prev_action(env_a) if cfg.prev_action else None
        if cfg.prev_action:
            self.prev_a = a_enc * (~done)[:, None]  # a new episode starts with no previous action
        next_obs = self._obs(raw, self.prev_a)
        z_next = z_boot = ag.features(next_obs)
        # clean bootstrap V(o_{t+1}, h_t, surprise=0); at a truncation o_{t+1} is the real final obs
        idx = np.flatnonzero(trunc & ~term)
        if len(idx):
            fin = self._obs(np.stack([info["final_obs"][i] for i in idx]), None if a_enc is None else a_enc[idx])
            z_boot = z_next.clone()
            z_boot[torch.as_tensor(idx, device=self.dev)] = ag.features(fin)
        v_boot = ag.value(ag.step(z_boot, *self.clean, h)[1])
        host = np.stack([r, term, trunc, done, cfg.gamma * ~term]).astype(np.float32)  # one copy in
        r_t, term_t, trunc_t, done_t, disc_t = torch.from_numpy(host).to(self.dev)
        delta = r_t + disc_t * v_boot - value  # the TD error r + gamma*(1-term)*V_clean(o_{t+1}) - V(o_t)
        if cfg.surprise == "none":  # no signal to normalize: the gate is its prior (the start rule stays)
            self.surprise = torch.zeros_like(delta)
        else:
            sig = surprise_signal(cfg.surprise, r_t, disc_t, v_boot, value)
            if update_norm:
                self.norm.update(sig)
            self.surprise = self.norm.normalize(sig)  # kept across an episode end for episode_start_td="carry"
        self.h, self.start, self.obs, self.z = h, done_t, next_obs, z_next
        self.ep_ret += r  # episode bookkeeping on the host
        self.ep_len += 1
        finished = [(int(i), float(self.ep_ret[i]), int(self.ep_len[i])) for i in np.flatnonzero(done)]
        self.ep_ret[done], self.ep_len[done] = 0.0, 0
        return dict(obs=obs, h0=h0, surprise=surprise, start=start, act=a, logp=logp, value=value, reward=r_t,
                    term=term_t, trunc=trunc_t, c=c.mean(-1), td=delta, v_boot=v_boot), finished

def gae(b: dict, last_value: torch.Tensor, gamma: float, lam: float):
    """GAE(gamma, lambda) over (T, N). The value after step t is values[t+1] within an episode,
    0 after termination, and v_boot[t] (value of the real final obs) after truncation."""
    v, term, trunc = b["value"], b["term"], b["trunc"]
    done = torch.maximum(term, trunc)
    nv = torch.cat([v[1:], last_value[None]]) * (1 - done) + b["v_boot"] * trunc * (1 - term)
    delta = b["reward"] + gamma * nv - v  # (T, N), all steps at once; only the scan below is sequential
    decay = gamma * lam * (1 - done)
    adv, last = torch.empty_like(delta), torch.zeros_like(last_value)
    for t in reversed(range(v.shape[0])):
        last = adv[t] = delta[t] + decay[t] * last
    return adv, adv + v

@torch.no_grad()
def rollout(col: Collector, steps: int):
    """`steps` vector steps with the sampling policy -> (buffer dict of (T, N, ...) tensors,
    last_value (N,) for GAE, finished episodes [(env, return, length)])."""
    col.refresh()  # the parameters changed in the last update
    with col.agent.frozen():
        recs, fins = zip(*[col.step(greedy=False, update_norm=True) for _ in range(steps)])
        return {k: torch.stack([r[k] for r in recs]) for k in recs[0]}, col.value(), [f for fin in fins for f in fin]


# ============================================================================ PPO + IB update
def ib_weight(cfg: Cfg, update: int, num_updates: int, multiplier: float = 0.0) -> float:
    """The IB term's weight at update `update` (0-based): for "sq"/"kl" lambda_c with a linear warm-up from 0 and
    an optional linear schedule; for "constraint" the Lagrange multiplier in force."""
    if cfg.ib_loss == "constraint":
        return multiplier
    lam = cfg.lambda_c
    if cfg.lambda_c_end is not None:
        lam += (cfg.lambda_c_end - cfg.lambda_c) * update / max(1, num_updates - 1)
    return lam * (1.0 if cfg.budget_warmup_updates == 0 else min(1.0, update / cfg.budget_warmup_updates))

def ib_loss(c_seq: torch.Tensor, cfg: Cfg) -> torch.Tensor:
    """c_seq: (L, B, G) gates of B sequences. "sq": mean over sequences of (mean_t c - target)^2; "constraint":
    mean c - target, the constraint the multiplier weighs (a signed one: mean c is held at target from both sides)."""
    if cfg.ib_loss == "constraint":
        return c_seq.mean() - cfg.target_c
    if cfg.ib_loss == "sq":
        return ((c_seq.mean(dim=(0, 2)) - cfg.target_c) ** 2).mean()
    c, p = c_seq.clamp(1e-6, 1 - 1e-6), cfg.target_c
    return (c * torch.log(c / p) + (1 - c) * torch.log((1 - c) / (1 - p))).mean()

def dual_step(cfg: Cfg, integral: float, mean_c: float) -> tuple[float, float]:
    """The budget constraint mean c = target_c: e = the rollout's mean gate - target_c; dual ascent integral += ki*e
    and the multiplier = integral + kp*e: a PI controller on the constraint, as in Stooke et al. 2020 ("Responsive
    Safety in RL by PID Lagrangian Methods"): the proportional term damps the oscillation of pure dual ascent.
    Signed: the gate is held at target_c from above and below, as "sq" does -> (integral, multiplier)."""
    if cfg.ib_loss != "constraint":
        return 0.0, 0.0
    e = mean_c - cfg.target_c
    return integral + cfg.budget_ki * e, integral + cfg.budget_ki * e + cfg.budget_kp * e

def to_sequences(b: dict, L: int) -> dict:
    """(T, N, ...) -> (L, S, ...) with S = (T/L)*N sequences; h0 -> (S, H) state at each sequence start."""
    T, N = b["h0"].shape[:2]  # (T, N, ...) -> (T/L, L, N, ...) -> (L, T/L, N, ...) -> (L, S, ...)
    out = {k: v.reshape(T // L, L, N, *v.shape[2:]).transpose(0, 1).reshape(L, T // L * N, *v.shape[2:])
           for k, v in b.items()}
    out["h0"] = out["h0"][0]  # (S, H): the hidden state stored before each sequence's first step
    return out

class NonFinite(RuntimeError):  # its message numbers updates from 1, as metrics.jsonl does
    pass

def check_finite(update: int, when: str, tensors: dict) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise NonFinite(f"update {update + 1}: {name} is not finite {when}")

def minibatch_loss(agent: Agent, m: dict, cfg: Cfg, lam_c) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO + IB loss of one minibatch m of whole sequences (L, B, ...) -> loss, stats (8,) = pg, value, entropy, ib,
    approx_kl, clipfrac, loss, max |ratio - 1|. lam_c: a number, or a 0-d tensor (a CUDA graph's input)."""
    logits, value, c, _ = agent.unroll(m["obs"], m["h0"], m["surprise"], m["start"])
    newlogp, ent = logp_entropy(agent, logits, m["act"])
    logratio = newlogp - m["logp"]
    ratio = logratio.exp()
    a = m["adv"]
    if cfg.norm_adv:
        a = (a - a.mean()) / (a.std() + 1e-8)
    pg = torch.max(-a * ratio, -a * ratio.clamp(1 - cfg.clip_eps, 1 + cfg.clip_eps)).mean()
    vl, en, ib = 0.5 * ((value - m["ret"]) ** 2).mean(), ent.mean(), ib_loss(c, cfg)
    loss = pg + cfg.vf_coef * vl - cfg.ent_coef * en + lam_c * ib
    with torch.no_grad():
        kl, clipfrac = ((ratio - 1) - logratio).mean(), ((ratio - 1).abs() > cfg.clip_eps).float().mean()
        return loss, torch.stack([pg, vl, en, ib, kl, clipfrac, loss, (ratio - 1).abs().max()]).detach()

def gradients(agent: Agent, m: dict, cfg: Cfg, lam_c: float) -> torch.Tensor:
    """Every parameter's .grad = d loss / d parameter for minibatch m -> minibatch_loss's stats. On CUDA the
    accelerator section may replace this by a captured graph of the same code (Setup.gradients)."""
    loss, stats = minibatch_loss(agent, m, cfg, lam_c)
    agent.zero_grad(set_to_none=True)
    loss.backward()
    return stats

def ppo_update(agent: Agent, opt: torch.optim.Optimizer, b: dict, adv: torch.Tensor, ret: torch.Tensor,
               cfg: Cfg, lam_c: float, update: int, grads=gradients) -> dict:
    """Recurrent PPO + IB over shuffled sequences; returns metrics averaged over every minibatch."""
    seq = to_sequences({**b, "adv": adv, "ret": ret}, cfg.seq_len)
    sums, n_mb, ratio0 = torch.zeros(8, device=adv.device), 0, float("nan")
    for epoch in range(cfg.epochs):
        for mb in torch.randperm(seq["h0"].shape[0], device=adv.device).chunk(cfg.minibatches):
            m = {k: v[mb] if k == "h0" else v[:, mb] for k, v in seq.items()}  # whole sequences
            stats = grads(agent, m, cfg, lam_c)  # pg, value, entropy, ib, kl, clipfrac, loss, max |ratio - 1|
            if not torch.isfinite(stats[6]):
                pg, vl, en, ib = stats[:4].tolist()
                raise NonFinite(f"update {update + 1}: loss is {stats[6].item()} (pg {pg}, value {vl}, entropy {en}, "
                                f"ib {ib})")
            if n_mb == 0:  # first minibatch: the recomputation must reproduce the rollout exactly
                ratio0 = stats[7].item()
            gn = nn.utils.clip_grad_norm_(agent.parameters(), cfg.max_grad_norm)
            if not torch.isfinite(gn):
                raise NonFinite(f"update {update + 1}: gradient norm is {gn.item()}")
            opt.step()
            with torch.no_grad():
                agent.bias.clamp_(cfg.bias_clamp_min, cfg.bias_clamp_max)
                sums += torch.cat([stats[:6], gn.reshape(1), stats[6:7]])
            n_mb += 1
    names = ["pg_loss", "v_loss", "entropy", "ib_loss", "approx_kl", "clipfrac", "grad_norm", "loss"]
    return dict(zip(names, (sums / n_mb).tolist()), ratio0_maxdev=ratio0)

def explained_variance(v: torch.Tensor, ret: torch.Tensor) -> float:
    return float("nan") if ret.var() == 0 else (1 - (ret - v).var() / ret.var()).item()


# ============================================================================ evaluation and GateCheck
def t_quantile(p: float, df: float) -> float:
    """Student's t quantile for p in (0.5, 1), df > 0 (not an integer for Welch's df): bisection on the CDF, whose
    integral of the density from 0 is taken by Simpson's rule (2,000 panels: < 1e-6 off for these uses)."""
    const = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(t):
        u = np.linspace(0.0, t, 2001)
        f = np.exp(const - (df + 1) / 2 * np.log1p(u * u / df))
        return 0.5 + (u[1] - u[0]) / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, 1.0
    while cdf(hi) < p:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        lo, hi = (lo, (lo + hi) / 2) if cdf((lo + hi) / 2) >= p else ((lo + hi) / 2, hi)
    return (lo + hi) / 2

def mean_ci(x: np.ndarray) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t interval over the finite values (NaN for fewer than 2)."""
    x = np.asarray(x, float)[np.isfinite(x)]
    if len(x) < 2:
        return (float(x.mean()) if len(x) else float("nan")), float("nan")
    return float(x.mean()), float(t_quantile(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))

Eval = namedtuple("Eval", "mean returns mean_c mean_c_later mean_td_later trace")  # returns: (eval_episodes,), NaN if unfinished
EVAL_SEED = 1_000_003  # evaluation's envs and sampling noise: cfg.seed + this, the same for every evaluation

@contextlib.contextmanager
def isolated_rng():
    """Training's random streams set aside: evaluation must not move them, and some envs (POPGym's mazes) reseed
    Python's and numpy's global generators on reset. As a decorator, around each call."""
    state = random.getstate(), np.random.get_state()
    # CUDA's generators only where CUDA is in use: a CPU run on a GPU machine must not start it
    with torch.random.fork_rng(devices=range(torch.cuda.device_count() if torch.cuda.is_initialized() else 0)):
        yield
    random.setstate(state[0])
    np.random.set_state(state[1])

@isolated_rng()
@torch.no_grad()
def evaluate(ev: Collector, cfg: Cfg, greedy: Optional[bool] = None, trace: bool = False, arm=None) -> Eval:
    """One scored episode in each eval env with the policy cfg.eval_mode names unless `greedy` is given; fixed
    env seeds and sampling noise make them the same episodes every time (paired across evaluations and GateCheck's
    arms); the TD normalizer is frozen. With episode_start_td="carry" each env first plays one unscored episode, so
    that the scored one starts, as in training, with the TD carried from the episode before. arm: a
    counterfactual gated step (counterfactual()). mean_c: the gate over the scored steps; mean_c_later, mean_td_later:
    the gate and the |td| fed to the router over those after each episode's first. With trace, env 0's scored episode
    as lists of c, |td_norm| fed to the router, reward."""
    torch.manual_seed(cfg.seed + EVAL_SEED)
    ev.reset(seed=cfg.seed + EVAL_SEED)
    ev.arm, warm = arm, np.full(ev.N, int(cfg.episode_start_td == "carry"))  # unscored episodes left per env
    rets, tr = {}, {"c": [], "td_abs": [], "reward": []}
    sums, n = torch.zeros(3, device=ev.dev), torch.zeros(3, device=ev.dev)  # c over scored, later steps; |td| later
    with ev.agent.frozen(), contextlib.ExitStack() as done:  # frozen: the C cell packs its weights once
        done.callback(setattr, ev, "arm", None)
        for _ in range(100_000):
            scored = torch.tensor([warm[i] == 0 and i not in rets for i in range(ev.N)], device=ev.dev)
            rec, fin = ev.step(greedy=cfg.eval_mode == "greedy" if greedy is None else greedy, update_norm=False)
            later, td_in = scored & (rec["start"] == 0), ev.agent.gate_surprise(rec["surprise"], rec["start"])
            sums += torch.stack([(rec["c"] * scored).sum(), (rec["c"] * later).sum(), (td_in.abs() * later).sum()])
            n += torch.stack([scored.sum(), later.sum(), later.sum()])
            if trace and scored[0]:
                for k, v in (("c", rec["c"]), ("td_abs", td_in.abs()), ("reward", rec["reward"])):
                    tr[k].append(v[0].item())
            for i, R, _ in fin:
                if warm[i]:
                    warm[i] -= 1
                else:
                    rets.setdefault(i, R)
            if len(rets) == ev.N:
                break
    r = np.array([rets.get(i, np.nan) for i in range(ev.N)])
    return Eval(float(np.mean(list(rets.values()))) if rets else float("nan"), r, *(sums / n.clamp(min=1)).tolist(),
                {"policy": policy(cfg, greedy), **tr})

def policy(cfg: Cfg, greedy: Optional[bool] = None) -> str:
    return cfg.eval_mode if greedy is None else "greedy" if greedy else "sampled"

# GateCheck's counterfactual arms: the learned gate with one part taken away, on the same seeded episodes.
ARMS = {"learned": "the learned gate",
        "const": "the gate held at its mean over all steps",
        "const_start": "held at its mean over the steps after the first; the learned gate at each episode's first step",
        "no_surprise": "the learned gate with |td| = 0 at every step after an episode's first",
        "mean_surprise": "the learned gate with |td| held at its mean at every step after an episode's first",
        "no_router": "the learned gate without the router's learned residual (its output layer zeroed)"}
EFFECTS = {  # name: (arm, baseline arm): the effect is return(arm) - return(baseline), paired per episode
    "gate vs constant": ("learned", "const"),  # everything the gate's variation does
    "start rule": ("const_start", "const"),  # writing as episode_start_td says at a first step, nothing else
    "after the start": ("learned", "const_start"),  # what varying the gate within an episode adds
    "surprise term": ("learned", "no_surprise"),  # the |td| term after the first step: its level and its timing
    "surprise timing": ("learned", "mean_surprise"),  # its timing alone: the same mean |td|, at every step
    "learned router": ("learned", "no_router"),  # the router's residual MLP
}

def counterfactual(agent: Agent, arm: str, const: float = float("nan")):
    """Arm `arm` as the gated step of Collector.step: (z, surprise, start, h_prev) -> (c, h), built from Agent's own
    gate_prior and step on the reference cell; const: the constant gate of the const arms, the |td| of mean_surprise."""
    ag = copy.copy(agent)  # shares the parameters; the reference cell
    ag.accel = None
    if arm == "no_router":
        ag = copy.deepcopy(ag)
        for p in ag.router.out.parameters():
            p.detach().zero_()
    fixed = copy.copy(ag)  # Agent.gate takes the prior as c when force_c is set
    fixed.cfg = dataclasses.replace(ag.cfg, force_c=const)

    def step(z, surprise, start, h_prev):
        if arm in ("no_surprise", "mean_surprise"):  # the start rule stays: gate_surprise still sees episode_start
            surprise = torch.where(start > 0, surprise, torch.full_like(surprise, 0.0 if arm == "no_surprise" else const))
        prior, keep = ag.gate_prior(surprise, start)
        if arm not in ("const", "const_start"):
            return ag.step(z, prior, keep, h_prev)
        c = torch.full_like(prior, const)
        if arm == "const_start":
            c = torch.where(start[:, None] > 0, ag.step(z, prior, keep, h_prev)[0], c)
        return fixed.step(z, c, keep, h_prev)
    return step

def gate_evidence(agent: Agent, evc: Collector, cfg: Cfg) -> dict:
    """Each arm's returns on the same seeded evaluation episodes under cfg.eval_mode, and each effect of EFFECTS as
    the mean paired difference with its 95% t-interval. {} for a fixed gate."""
    if cfg.force_c is not None:
        return {}
    learned = evaluate(evc, cfg, arm=counterfactual(agent, "learned"))
    consts = {"const": learned.mean_c, "const_start": learned.mean_c_later, "mean_surprise": learned.mean_td_later}
    runs = {"learned": learned, **{a: evaluate(evc, cfg, arm=counterfactual(agent, a, consts.get(a, math.nan)))
                                   for a in ARMS if a != "learned" and (a != "no_router" or agent.router)}}
    effects = {}
    for name, (a, b) in EFFECTS.items():
        if a in runs and b in runs:
            mean, ci = mean_ci(runs[a].returns - runs[b].returns)
            effects[name] = dict(mean=mean, ci=ci)
    return dict(policy=policy(cfg), episodes=len(learned.returns), effects=effects, consts=consts,
                returns={a: e.mean for a, e in runs.items()},
                episode_returns={a: e.returns.tolist() for a, e in runs.items()})

def welch_greater(a: np.ndarray, b: np.ndarray, alpha: float) -> tuple[bool, float, float]:
    """One-sided Welch test of mean(a) > mean(b) at level alpha -> (rejected, t, critical t)."""
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    d = a.mean() - b.mean()
    if va + vb == 0:  # no spread on either side: the difference is exact
        return bool(d > 0), math.copysign(math.inf, d) if d else 0.0, 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1) + 1e-300)
    t, crit = d / math.sqrt(va + vb), t_quantile(1 - alpha, max(df, 1.0))
    return bool(t > crit), float(t), float(crit)

def _corr(x: np.ndarray, y: np.ndarray) -> float:
    return float("nan") if len(x) < 3 or x.std() == 0 or y.std() == 0 else float(np.corrcoef(x, y)[0, 1])

def gatecheck(td_abs: np.ndarray, c: np.ndarray, dc: np.ndarray, dc_ok: np.ndarray, res: np.ndarray,
              floor_frac: float, td_std: float, eval_returns: list, cfg: Cfg) -> dict:
    """Does the gate track surprise, and did the agent learn? td_abs, c: |surprise| fed to the gate and the
    gate, per step of the last rollouts; dc = c_t - c_{t-1} where dc_ok (not at an episode start); res: the
    router's learned residual logit (empty without one). rho: Pearson; tail: steps with |td| in the top 20%.
    rho(td,c) is high by construction (the prior is td_scale*|td|); rho(td,res) is what the router learned.
    std_ok: the TD scale sat at its clamp floor td_std_min in under half of the window's normalizer updates
    (floor_frac); small TD errors alone are what a solved task has (the spec's rule td_std > 5*td_std_min
    fails those). eval_ok: per-episode returns (eval_returns: one list per evaluation) of the last k evaluations,
    k = max(1, min(3, (n_evals - 1) // 4)), beat those of the first (after one rollout, before any update) by a
    one-sided Welch test at level eval_ok_alpha, by at least eval_ok_min_effect of the range of all evaluation
    returns (the task's return scale as this run saw it)."""
    tail = td_abs >= np.quantile(td_abs, 0.8) if len(td_abs) else np.zeros(0, bool)
    tdd, dcc = td_abs[dc_ok], dc[dc_ok]
    taild = tdd >= np.quantile(tdd, 0.8) if len(tdd) else np.zeros(0, bool)
    ev = [np.asarray(r, float)[np.isfinite(r)] for r in eval_returns]
    k = max(1, min(3, (len(ev) - 1) // 4))
    first, late = (ev[0], np.concatenate(ev[-k:])) if len(ev) >= 2 else (np.zeros(0), np.zeros(0))
    eval_ok, t, crit, share = False, float("nan"), float("nan"), float("nan")
    if len(first) >= 2 and len(late) >= 2:
        span = np.ptp(np.concatenate(ev))
        share = float((late.mean() - first.mean()) / span) if span > 0 else 0.0
        sig, t, crit = welch_greater(late, first, cfg.eval_ok_alpha)
        eval_ok = sig and share >= cfg.eval_ok_min_effect
    std_ok = bool(floor_frac < 0.5)
    return dict(rho_td_c=_corr(td_abs, c), rho_tail=_corr(td_abs[tail], c[tail]), rho_td_dc=_corr(tdd, dcc),
                rho_tail_dc=_corr(tdd[taild], dcc[taild]), rho_td_res=_corr(td_abs, res) if len(res) else float("nan"),
                td_std=float(td_std), floor_frac=float(floor_frac), std_ok=std_ok,
                early_eval=float(first.mean()) if len(first) else float("nan"),  # best: a policy that was lost again
                best_eval=max((float(e.mean()) for e in ev[1:] if len(e)), default=float("nan")),
                late_eval=float(late.mean()) if len(late) else float("nan"), eval_k=k, eval_t=t, eval_t_crit=crit,
                eval_effect_share=share, eval_ok=bool(eval_ok), verdict="PASS" if (std_ok and eval_ok) else "FAIL")

@torch.no_grad()
def gate_samples(agent: Agent, b: dict, floor_frac: float) -> dict:
    """GateCheck's samples from one rollout b (T, N): |td| the router saw, c, dc = c_t - c_{t-1} and dc_ok
    (within an episode), and the router's residual logit, recomputed batched from the stored obs and h0 (with
    the parameters that made the rollout); floor_frac: the share of its normalizer updates at the floor."""
    c, start = b["c"], b["start"]
    res = torch.zeros(0)
    if agent.router is not None and agent.cfg.force_c is None:
        keep = agent.gate_prior(b["surprise"], start)[1]
        res = agent.router(agent.features(b["obs"]), agent.memory.read(b["h0"] * keep)).mean(-1)  # vector: unit mean
    dc_ok = (start == 0) & (torch.arange(len(start), device=start.device)[:, None] > 0)
    out = dict(td_abs=agent.gate_surprise(b["surprise"], start).abs(), c=c, dc=c - torch.cat([c[:1], c[:-1]]),
               dc_ok=dc_ok, res=res)
    return {**{k: v.cpu().numpy().ravel() for k, v in out.items()}, "floor_frac": floor_frac}

def format_evidence(e: dict) -> list:
    eff = [f"{k} {v['mean']:+.3f} ± {v['ci']:.3f}" for k, v in e["effects"].items()]
    held = {a: f" ({'|td|' if a == 'mean_surprise' else 'c'} {v:.3f})" for a, v in e["consts"].items()}
    return [f"what the gate does, in {e['policy']} return over {e['episodes']} paired episodes (± 95% t-CI):",
            "  " + " | ".join(eff[:3]), "  " + " | ".join(eff[3:]),
            "  (gate vs constant: learned - c held at its mean | start rule: that constant but the learned c at first steps"
            " - the constant | after the start: learned - that", "   surprise term / timing: learned - |td| 0 / |td| at its "
            "mean after first steps | learned router: learned - no router residual)",
            "  arms: " + " | ".join(f"{a}{held.get(a, '')} {r:.3f}" for a, r in e["returns"].items())]

def format_gatecheck(g: dict, mean_c: float, ev: float, ep100: float, mmer: float, cfg: Cfg) -> str:
    lines = ["GATECHECK", f"rho(td,c)={g['rho_td_c']:.3f}  rho_tail={g['rho_tail']:.3f} | rho(td,Δc)={g['rho_td_dc']:.3f} "
             f"rho_tailΔ={g['rho_tail_dc']:.3f} | rho(td,residual)={g['rho_td_res']:.3f}"]
    lines += format_evidence(g["evidence"]) if g.get("evidence") else []
    lines += [f"td_std={g['td_std']:.6f} (at floor {g['floor_frac']:.0%}, std_ok={g['std_ok']}) | eval_ok={g['eval_ok']} "
              f"({cfg.eval_mode}: first {g['early_eval']:.3f} -> last {g['eval_k']} {g['late_eval']:.3f}, Welch t "
              f"{g['eval_t']:.2f} vs {g['eval_t_crit']:.2f} at {cfg.eval_ok_alpha:g}, {g['eval_effect_share']:.0%} of the "
              f"return range, need {cfg.eval_ok_min_effect:.0%}; best eval {g['best_eval']:.3f}) -> {g['verdict']}",
              f"mean_c={mean_c:.4f} (target {cfg.target_c:g})  EV={ev:.4f}  ep100={ep100:.2f}  MMER={mmer:.3f}"]
    return "\n".join(lines)


# ============================================================================ run management
def new_run_dir(cfg: Cfg) -> Path:
    """A new directory out_dir/<run_name or env__s<seed>__time>, with -2, -3, ... when the name is taken. os.mkdir
    is the test (no check-then-create): of two runs racing for one name, one gets it and the other the next."""
    name = cfg.run_name or f"{cfg.env_id.replace('/', '_')}__s{cfg.seed}__{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i in range(1, sys.maxsize):
        with contextlib.suppress(FileExistsError):
            os.mkdir(d := out / (name if i == 1 else f"{name}-{i}"))
            return d

def write_atomic(path: Path, data: bytes) -> None:
    """Write a new file beside `path`, then rename it over `path`: a kill or a full disk mid-write leaves the last good
    file whole and no .tmp behind (after a kill -9, the next resume removes it); a link there is replaced, never
    written through."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

def write_json(obj: Any, path: Path) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())

def torch_bytes(obj: Any) -> bytes:
    torch.save(obj, buf := io.BytesIO())  # in memory first: a full disk is then an OSError of write_atomic's
    return buf.getvalue()

def open_run_file(path: Path, flags: int, own: bool = False) -> int:
    """A descriptor of a file of a run directory, never through a link: a regular file, not a symlink, and where it is
    written in place (own), with no other name (a hard link would carry the write outside the run); else OSError."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)  # NONBLOCK: a FIFO
    except OSError as e:
        if e.errno != errno.ELOOP:  # ELOOP: a symlink
            raise
    else:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and not (own and st.st_nlink > 1):
            return fd
        os.close(fd)
    raise OSError(f"{path.name} is a link or not a regular file; a run reads and writes only files of its own")

def read_run_file(path: Path, own: bool = False) -> bytes:
    with open(open_run_file(path, os.O_RDONLY, own), "rb") as f:
        return f.read()

def lock_run(run_dir: Path, cleanup: contextlib.ExitStack) -> None:
    """One writer per run directory: an exclusive flock on run.lock until `cleanup` closes it (the kernel drops it
    when the process dies). While held, the file names its holder; it is left empty."""
    try:
        f = cleanup.enter_context(open(open_run_file(run_dir / "run.lock", os.O_RDWR | os.O_CREAT, own=True), "r+"))
    except OSError as e:
        raise ConfigError("resume", str(run_dir), f"cannot hold its run.lock ({one_line(e)})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError("resume", str(run_dir), f"is in use by {f.read().strip() or 'another process'}; one "
                                                  "process at a time may write a run") from None
    cleanup.callback(f.truncate, 0)  # before the close: still held
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {platform.node()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()

def start_run(cfg: Cfg, cleanup: contextlib.ExitStack) -> Path:
    """A new run directory holding run.lock (held) and config.json. Whatever fails here (a full disk) removes what it
    made: nothing was written, a ConfigError of out_dir says why."""
    made, run_dir = not os.path.lexists(cfg.out_dir), None
    try:
        run_dir = new_run_dir(cfg)
        lock_run(run_dir, cleanup)
        write_json(dataclasses.asdict(dataclasses.replace(cfg, halt_after=0)), run_dir / "config.json")
        return run_dir
    except BaseException as e:
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):
                os.rmdir(cfg.out_dir)
        if isinstance(e, (OSError, ConfigError)):
            why = one_line(e) if isinstance(e, OSError) else e.allowed
            raise ConfigError("out_dir", cfg.out_dir, f"cannot hold a new run directory ({why})") from None
        raise

# The resume contract (README): `--resume RUN` may change only these; none changes what is trained or how. A larger
# total_timesteps extends it (an update stays num_envs*rollout_steps steps; not where a schedule spans the total);
# halt_after, progress, log_every, save_plot: when this invocation stops, what it shows; checkpoint_every: any
# checkpoint continues the same run; eval_every, eval_episodes: evaluation sets training's random state aside
# (isolated_rng); device, torch_threads, cpu_kernel, cuda_graph: where and how fast (another device, other rounding).
RESUMABLE = ("total_timesteps", "halt_after", "progress", "log_every", "save_plot", "checkpoint_every", "eval_every",
             "eval_episodes", "device", "torch_threads", "cpu_kernel", "cuda_graph")
# `--evaluate RUN` may change only these: how many episodes, which policy, where it runs
EVALUATE_FLAGS = ("eval_episodes", "eval_mode", "device", "torch_threads", "cpu_kernel", "progress")
MAY_CHANGE = {"resume": (RESUMABLE, "when resuming", "a resume may change only --total-timesteps (to grow it, "
                                                     "without anneal_lr or lambda_c_end), "),
              "evaluate": (EVALUATE_FLAGS, "with --evaluate", "it may change only ")}  # and how a refusal says so

def run_config(run: str, flag: str = "resume") -> Cfg:
    """The Cfg saved in RUN/config.json (fields it lacks keep their defaults; halt_after is never read back)."""
    what, run_dir = "must be a run directory with config.json and checkpoint.pt", Path(run)
    if not run.strip() or not (run_dir / "checkpoint.pt").is_file():  # "": not the working directory
        raise ConfigError(flag, run, what)
    try:
        saved = json.loads(read_run_file(run_dir / "config.json"))
        return Cfg(**{k: v for k, v in saved.items() if k in Cfg.__dataclass_fields__ and k != "halt_after"})
    except (OSError, ValueError, AttributeError) as e:  # unreadable or a link, not JSON, not a JSON object
        raise ConfigError(flag, run, f"{what} ({one_line(e)})") from None

def check_changes(cfg: Cfg, saved: Cfg, flag: str) -> None:
    """cfg differs from RUN's saved Cfg only where `--<flag> RUN` may change it (MAY_CHANGE; total_timesteps only to
    grow it, where no schedule spans it; halt_after, for one invocation, is never saved), else ConfigError."""
    may, when, only = MAY_CHANGE[flag]
    grows = cfg.total_timesteps > saved.total_timesteps and not saved.anneal_lr and saved.lambda_c_end is None
    for f in dataclasses.fields(Cfg):
        old, new = getattr(saved, f.name), getattr(cfg, f.name)
        if new != old and (f.name not in may + ("halt_after",) or f.name == "total_timesteps" and not grows):
            raise ConfigError(f.name, new, f"cannot change {when} (the run has {old!r}); {only}" + ", ".join(
                "--" + n.replace("_", "-") for n in may if n != "total_timesteps"))

def metrics_plan(run_dir: Path, update: int) -> tuple[Optional[bytes], str, dict]:
    """The checkpoint is the truth: metrics.jsonl as it must be for its `update` updates, read and checked now, written
    once the resume writes -> (the new contents or None if unchanged, a note saying what was dropped, the last row)."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = read_run_file(path, own=True).decode(errors="replace").splitlines(True) if os.path.lexists(path) else []
    except OSError as e:
        raise ConfigError("resume", str(run_dir), f"its metrics.jsonl cannot be read ({one_line(e)})") from None
    keep, late, bad, last = [], 0, 0, {}
    for line in lines:
        row = None
        with contextlib.suppress(ValueError):
            row = json.loads(line) if line.endswith("\n") else None
        u = row.get("update") if isinstance(row, dict) else None
        if type(u) is int and last.get("update", 0) < u <= update:  # the rows of updates 1..update, in order
            keep.append(line)
            last = row
        elif type(u) is int and u > update:
            late += 1
        else:
            bad += 1
    what = [f"{late} logged after the checkpoint (update {update})"] * bool(late) + [f"{bad} cut short or not a row "
                                                                                     "in order"] * bool(bad)
    notes = [f"dropped {late + bad} line(s) of metrics.jsonl: {', '.join(what)}"] * bool(what)
    notes += [f"metrics.jsonl lacks {update - len(keep)} of the checkpoint's {update} rows"] * (len(keep) < update)
    note = "note: " + "; ".join(notes) if notes else ""
    return ("".join(keep).encode() if keep != lines else None), note, last if last.get("update") == update else {}

def resume_writes(cfg: Cfg, saved: Cfg, run_dir: Path, rows: Optional[bytes], note: str) -> None:
    """A resume's first writes, once all it reads is checked: no .tmp left by a process killed mid-write,
    metrics.jsonl cut back to the checkpoint's rows (metrics_plan), config.json with the total_timesteps asked for."""
    for tmp in run_dir.glob("*.tmp"):
        tmp.unlink()
    if note:
        print(note, file=sys.stderr)
    if rows is not None:
        write_atomic(run_dir / "metrics.jsonl", rows)
    # per-invocation settings are not saved (resume: only total_timesteps may change); plots/sweep.py takes
    # this rewrite as the sign that the rows after the checkpoint are gone
    saved = dataclasses.replace(saved, total_timesteps=cfg.total_timesteps, halt_after=0)
    write_json(dataclasses.asdict(saved), run_dir / "config.json")

def results_written(run_dir: Path, st: dict) -> bool:
    """Does summary.json hold the completed results of the checkpoint's state (the end of the run was written)?"""
    with contextlib.suppress(OSError, ValueError):
        s = json.loads(read_run_file(run_dir / "summary.json"))
        return isinstance(s, dict) and s.get("status") == "completed" and s.get("updates") == st["update"]
    return False

class StopFlag:
    """First Ctrl-C/SIGTERM/SIGHUP: stop at the next safe point (`notice` says where). Second: abandon it now."""
    notice = "before training starts (again to stop at once)"

    def __enter__(self):
        self.signum, main = 0, threading.current_thread() is threading.main_thread()  # handlers: main thread only
        sigs = STOP_SIGNALS if main else ()  # SIGHUP: the terminal went away; an ignored one (nohup) stays ignored
        self._old = {sig: signal.signal(sig, self._handle) for sig in sigs
                     if signal.getsignal(sig) is not signal.SIG_IGN}
        return self

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt(signum)
        self.signum = signum
        print(f"\n[{signal.Signals(signum).name}] stopping {self.notice}", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

def plot_training(run_dir: Path, cfg: Cfg) -> None:
    """training.png: returns, gate use vs budget, TD scale (log) and explained variance over env steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(l) for l in read_run_file(run_dir / "metrics.jsonl").decode().splitlines() if l.strip()]
    fig, ax = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    for a, k, line in zip(ax.flat, ("ep100", "mean_c", "td_std", "ev"), (None, cfg.target_c, cfg.td_std_min * 5, None)):
        a.plot([r["env_steps"] for r in rows], [r[k] for r in rows], label=k)
        if line is not None:
            a.axhline(line, ls="--", c="k", label=f"{line:g}")
        a.set_xlabel("env steps")
    ax[0, 0].plot(*zip(*[(r["env_steps"], r["eval"]) for r in rows if r.get("eval_fresh")] or [[], []]), "o-",
                  label=f"eval ({cfg.eval_mode})")
    ax[1, 0].set_yscale("log")
    for a in ax.flat:
        a.legend(fontsize=8)
    fig.suptitle(run_dir.name)
    fig.tight_layout()
    fig.savefig(buf := io.BytesIO(), format="png", dpi=90)
    plt.close(fig)
    write_atomic(run_dir / "training.png", buf.getvalue())

Setup = namedtuple("Setup", "cfg dev envs eval_envs agent opt norm col evc gradients")  # what build(cfg) makes

def build(cfg: Cfg) -> Setup:
    """Validate, seed, make envs and model. Every check that can fail does so here, before any output."""
    validate(cfg)
    check_env_id(cfg.env_id)
    random.seed(cfg.seed)  # the one place where randomness is seeded (envs: at their first reset)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # also seeds every CUDA device
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)

    def sized(make, *names):  # a size that cannot be allocated is a bad setting like any other
        try:
            return make()
        except (RuntimeError, MemoryError, TypeError, OverflowError) as e:  # torch: "can't allocate", "Overflow"
            if not re.search("alloc|overflow|memory", f"{type(e).__name__}: {e}", re.I):
                raise
            name = max(names, key=lambda n: getattr(cfg, n))
            raise ConfigError(name, getattr(cfg, name), f"is too large: cannot be allocated on {dev}") from None
    need = cfg.rollout_steps * cfg.num_envs * (cfg.hid_dim + 1) * 4  # a rollout's h0 and obs, at the least
    have = math.inf
    with contextlib.suppress(ValueError, OSError, AttributeError):  # no sysconf: no check
        have = (torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else
                os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > have:
        name = max(("num_envs", "rollout_steps", "hid_dim"), key=lambda n: getattr(cfg, n))
        raise ConfigError(name, getattr(cfg, name), f"is too large: a rollout needs at least {need / 2 ** 30:.1f} GiB, "
                                                    f"more than the {have / 2 ** 30:.1f} GiB of {dev}")
    envs = env_call(make_envs, cfg, cfg.num_envs, cfg.async_envs, cfg.env_workers)
    eval_envs = env_call(make_envs, cfg, cfg.eval_episodes)
    act = action_spec(envs.single_action_space)
    obs_dim = envs.single_observation_space.shape[0] + (act.enc_dim if cfg.prev_action else 0)
    agent = sized(lambda: Agent(obs_dim, act, cfg).to(dev), "enc_dim", "hid_dim", "router_hid", "head_hid")
    accelerate(agent, dev)  # the optional section at the end: sets agent.accel if it supports and equals Agent.step
    try:  # fused Adam: one kernel for all parameters (5x faster per step on CPU than the per-tensor loop)
        opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch, or a device without a fused Adam
        opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr, eps=1e-5)
    norm = sized(lambda: TDNormalizer(cfg, dev), "td_window")
    return Setup(cfg, dev, envs, eval_envs, agent, opt, norm, Collector(cfg, envs, agent, norm, dev),
                 Collector(cfg, eval_envs, agent, norm, dev), graph_gradients(cfg, dev))  # the accelerator's, or eager

def save_checkpoint(su: Setup, st: dict, run_dir: Path) -> None:
    """checkpoint.pt holds tensors and plain types only (torch.load(weights_only=True) reads it); the pickled state
    of in-process envs goes to envs-<update>.pkl, written first and named in it. Each file is replaced atomically,
    so a failure at any point leaves the last good pair."""
    try:  # env state, for a bit-identical resume (in-process envs that pickle)
        envs = pickle.dumps(su.envs.envs)
    except Exception:
        envs = None
    if name := envs and f"envs-{st['update']}.pkl":
        write_atomic(run_dir / name, envs)
    npr = np.random.get_state()
    rng = dict(python=random.getstate(), numpy=(npr[0], npr[1].tolist(), *npr[2:]), torch=torch.get_rng_state(),
               cuda=torch.cuda.get_rng_state(su.dev) if su.dev.type == "cuda" else None)
    col = {k: torch.as_tensor(getattr(su.col, k)) for k in Collector.STATE}  # numpy arrays as tensors
    st = {**st, "gc_hist": [{k: torch.as_tensor(v) for k, v in h.items()} for h in st["gc_hist"]]}
    write_atomic(run_dir / "checkpoint.pt", torch_bytes(dict(
        agent=su.agent.state_dict(), opt=su.opt.state_dict(), norm=su.norm.state_dict(), collector=col, state=st,
        cfg=dataclasses.asdict(su.cfg), rng=rng, envs=name)))
    for old in run_dir.glob("envs-*.pkl"):  # env states of earlier checkpoints
        if old.name != name:
            old.unlink()

def _need(where: str, v: Any, ok: bool, allowed: str) -> None:
    if not ok:
        brief = (f"a {str(v.dtype)[6:]} tensor of shape {tuple(v.shape)}" if torch.is_tensor(v) else repr(v)[:160]
                 if isinstance(v, str) else f"a dict of {', '.join(map(str, v))}"[:80] if isinstance(v, dict) else
                 repr(v)[:60])
        raise ValueError(f"{where} is {brief}, must be {allowed}")

def _like(where: str, v: Any, ref: Any) -> None:
    """v is built as ref is: the same keys, lengths and types, tensors of its shapes and dtypes; finite; ints >= 0."""
    if isinstance(ref, (dict, list, tuple)):
        same = type(v) is type(ref) and (v.keys() == ref.keys() if isinstance(ref, dict) else len(v) == len(ref))
        _need(where, v, same, f"a {type(ref).__name__} of {', '.join(ref) if isinstance(ref, dict) else len(ref)}")
        for k in (ref if isinstance(ref, dict) else range(len(ref))):
            _like(f"{where}.{k}", v[k], ref[k])
    elif torch.is_tensor(ref):
        _need(where, v, torch.is_tensor(v) and v.shape == ref.shape and v.dtype == ref.dtype and
              bool(torch.isfinite(v).all()), f"a finite {str(ref.dtype)[6:]} tensor of shape {tuple(ref.shape)}")
    else:
        _need(where, v, type(v) is type(ref) and v >= 0 and math.isfinite(v), f"a {type(ref).__name__} >= 0")

def check_checkpoint(ck: Any, su: Setup) -> None:
    """Every field of a checkpoint has the type, shape and range this run needs, or ValueError names the first that has
    not: a file that loads with weights_only=True runs no code, but may hold anything. opt: check_optimizer."""
    cfg, batch, num = su.cfg, su.cfg.num_envs * su.cfg.rollout_steps, lambda v: type(v) in (int, float)
    keys = ("agent", "opt", "norm", "collector", "state", "rng", "envs")
    st_keys = ("update", "env_steps", "wall_s", "ep_hist", "evals", "eval_returns", "gc_hist", "mmer", "budget_i",
               "multiplier")
    _need("the checkpoint", ck, isinstance(ck, dict) and all(k in ck for k in keys), f"a dict of {', '.join(keys)}")
    st, n = ck["state"], cfg.total_timesteps // batch
    _need("state", st, isinstance(st, dict) and all(k in st for k in st_keys), f"a dict of {', '.join(st_keys)}")
    u, w, h, e, g = st["update"], st["wall_s"], st["ep_hist"], st["evals"], st["gc_hist"]
    _need("state.update", u, type(u) is int and 1 <= u <= n, f"an integer in 1..{n}")
    _need("state.env_steps", st["env_steps"], type(st["env_steps"]) is int and st["env_steps"] == u * batch,
          f"update*num_envs*rollout_steps = {u * batch}")
    _need("state.wall_s", w, num(w) and 0 <= w < math.inf, "a number >= 0")
    _need("state.mmer", st["mmer"], num(st["mmer"]) and not math.isinf(st["mmer"]), "a number or NaN")
    _need("state.ep_hist", h, isinstance(h, list) and len(h) <= 100 and all(num(x) and math.isfinite(x) for x in h),
          "a list of at most 100 finite returns")
    def pair(x):  # (update, return)
        return isinstance(x, (tuple, list)) and len(x) == 2 and type(x[0]) is int and 0 <= x[0] <= u and num(x[1])
    _need("state.evals", e, isinstance(e, list) and all(map(pair, e)), f"a list of (update in 0..{u}, return) pairs")
    _need("state.eval_returns", st["eval_returns"], isinstance(st["eval_returns"], list) and len(st["eval_returns"])
          == len(e) and all(isinstance(r, list) and all(num(x) for x in r) for r in st["eval_returns"]),
          "a list of per-episode returns for each evaluation")
    for k in ("budget_i", "multiplier"):
        _need(f"state.{k}", st[k], num(st[k]) and math.isfinite(st[k]), "a finite number")
    _need("state.gc_hist", g, isinstance(g, list) and len(g) <= cfg.gatecheck_rollouts and all(
        isinstance(x, dict) and all(type(k) is str and torch.is_tensor(v) for k, v in x.items()) for x in g),
        f"a list of at most {cfg.gatecheck_rollouts} dicts of tensors")
    _need("envs", ck["envs"], ck["envs"] is None or ck["envs"] == f"envs-{u}.pkl", f"None or 'envs-{u}.pkl'")
    for k, v in ck["agent"].items():  # keys and shapes: load_state_dict
        _need(f"agent.{k}", v, torch.is_tensor(v) and bool(torch.isfinite(v).all()), "a finite tensor")
    _like("collector", ck["collector"], {k: torch.as_tensor(getattr(su.col, k)).cpu() for k in Collector.STATE})
    _like("norm", ck["norm"], {k: v.cpu() if torch.is_tensor(v) else v for k, v in su.norm.state_dict().items()})
    _need("norm.wpos", ck["norm"]["wpos"], ck["norm"]["wpos"] < cfg.td_window, f"< td_window ({cfg.td_window})")
    _need("norm.wfill", ck["norm"]["wfill"], ck["norm"]["wfill"] <= cfg.td_window, f"<= td_window ({cfg.td_window})")

def check_optimizer(opt: torch.optim.Optimizer) -> None:
    """The hyperparameters and moment tensors a loaded optimizer state brought (load_state_dict checks only groups)."""
    for group in opt.param_groups:
        for k in ("lr", "eps", "weight_decay"):
            _need(f"opt.{k}", group.get(k), type(group.get(k)) in (int, float) and 0 <= group[k] < math.inf,
                  "a number >= 0")
        b = group.get("betas")
        _need("opt.betas", b, isinstance(b, (tuple, list)) and len(b) == 2 and all(
            type(x) in (int, float) and 0 <= x < 1 for x in b), "two numbers in [0, 1)")
        for p in group["params"]:
            for k, v in opt.state.get(p, {}).items():
                ok = torch.is_tensor(v) and v.shape in (p.shape, ()) and bool(torch.isfinite(v).all())
                _need(f"opt.state.{k}", v, ok, f"a finite tensor of shape {tuple(p.shape)} or ()")

def load_checkpoint(su: Setup, run_dir: Path, flag: str = "resume") -> dict:
    """RUN/checkpoint.pt into su once every field is checked, else a ConfigError of --<flag>: the model and the TD
    normalizer, and to resume also the optimizer, the collector with its envs, and the RNGs. It is read onto the CPU,
    where torch.set_rng_state needs the RNG states; the rest moves to su.dev. Returns its state (train's st)."""
    su.col.reset(seed=su.cfg.seed)  # the envs must be reset before their saved state replaces them
    try:
        ck = torch.load(io.BytesIO(read_run_file(run_dir / "checkpoint.pt")), map_location="cpu",
                        weights_only=True)  # never through a link; runs no code
        su.agent.load_state_dict(ck["agent"])  # first: it names a model of another size best
        check_checkpoint(ck, su)
        su.norm.load_state_dict(ck["norm"])
        if flag != "resume":  # --evaluate: the model and its normalizer are all it uses
            return ck["state"]
        su.opt.load_state_dict(ck["opt"])
        check_optimizer(su.opt)
        st, col, rng = ck["state"], ck["collector"], ck["rng"]
        st["gc_hist"] = [{k: v.numpy() for k, v in h.items()} for h in st["gc_hist"]]
        name = f"envs-{st['update']}.pkl"  # its one name, in the run directory: a checkpoint cannot point elsewhere
        if ck["envs"] and hasattr(su.envs, "envs") and os.path.lexists(run_dir / name):
            envs = pickle.loads(read_run_file(run_dir / name))  # a run directory is trusted like code
            _need(name, envs, isinstance(envs, list) and len(envs) == su.cfg.num_envs, f"{su.cfg.num_envs} envs")
            su.envs.envs = envs
            for k in Collector.STATE:
                setattr(su.col, k, col[k].to(su.dev) if torch.is_tensor(getattr(su.col, k)) else col[k].numpy())
            su.col.refresh()
        else:  # e.g. async envs: their state lives in subprocesses, and h and obs belong to episodes that are gone
            print("note: env state could not be restored; all envs start fresh episodes", file=sys.stderr)
            su.col.reset(seed=su.cfg.seed + 7919 * st["update"])
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if su.dev.type == "cuda" and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"], su.dev)
        return st
    except Exception as e:
        raise ConfigError(flag, str(run_dir), f"its checkpoint does not load ({one_line(e)})") from None

EXIT_CODES = {"completed": 0, "halted": 0, "diverged": 3, "env_error": 4, "io_error": 5, "out_of_memory": 6}

def fault(e: BaseException, stop: StopFlag) -> Optional[tuple[str, str]]:
    """(status, message) of an exception that ends a run with a status, or None: a bug, whose traceback shows. A
    KeyboardInterrupt is a second signal; stop.signum says which (SIGINT: one that StopFlag did not handle)."""
    if isinstance(e, KeyboardInterrupt):
        stop.signum = stop.signum or signal.SIGINT
        return "interrupted", "a second signal abandoned the update in progress"
    if isinstance(e, (NonFinite, EnvError)):
        return "diverged" if isinstance(e, NonFinite) else "env_error", str(e)
    if isinstance(e, OSError):
        return "io_error", one_line(e)
    oom = re.search(r"(out of memory|can't allocate|not enough memory)[^.]*", str(e), re.I)  # torch's words, CPU, GPU
    if isinstance(e, MemoryError) or isinstance(e, RuntimeError) and oom:
        return "out_of_memory", f"{type(e).__name__}{': ' + oom[0] if oom else ''}"
    return None

def add_eval(st: dict, update: int, e: Eval) -> None:
    st["evals"].append((update, e.mean))
    st["eval_returns"].append(e.returns.tolist())

def mean_of(x) -> float:
    return float(np.mean(x)) if len(x) else math.nan

def metrics_row(su: Setup, st: dict, b: dict, ret: torch.Tensor, m: dict, lam_c: float, ep_mean: float,
                seconds: tuple, rate: float) -> dict:
    """metrics.jsonl's row for the update st has just counted: PPO's losses (m), the IB weight, the gate, the TD
    statistics, returns, the latest evaluation; last, the wall-clock keys (seconds: the rollout's, the update's)."""
    return dict(update=st["update"], env_steps=st["env_steps"], **m, lambda_c=lam_c, mean_c=b["c"].mean().item(),
                c_std=b["c"].std().item(), td_mean=su.norm.mean.item(), td_std=su.norm.scale.item(),
                td_raw_std=b["td"].std().item(), ev=explained_variance(b["value"], ret), ep100=mean_of(st["ep_hist"]),
                episodes=len(st["ep_hist"]), ep_mean=ep_mean, mmer=st["mmer"], bias=su.agent.bias.item(),
                eval=st["evals"][-1][1], eval_fresh=st["evals"][-1][0] == st["update"],
                lr=su.opt.param_groups[0]["lr"], rollout_s=seconds[0], update_s=seconds[1], steps_per_s=rate,
                wall_s=st["wall_s"])

def log_update(fd: int, bar, m: dict, num_updates: int, cfg: Cfg) -> None:
    """An update's row appended to metrics.jsonl (a kill loses at most the update in progress); every log_every
    updates and at the end, its progress line."""
    os.write(fd, (json.dumps(m) + "\n").encode())
    bar.update(1)
    if m["update"] % cfg.log_every == 0 or m["update"] == num_updates:
        bar.write(f"upd {m['update']:4d}/{num_updates} | td_mean {m['td_mean']:+.3f} td_std {m['td_std']:.4f} | "
                  f"mean_c {m['mean_c']:.3f} (tgt {cfg.target_c:.2f}, ib_w {m['lambda_c']:.3f}) | EV {m['ev']:.3f} | "
                  f"ep100 {m['ep100']:.2f} | bias {m['bias']:+.3f} | {m['steps_per_s']:,.0f} steps/s | "
                  f"eval {m['eval']:.2f} ({cfg.eval_mode})", file=sys.stdout)
        sys.stdout.flush()  # tqdm.write does not flush: keep `| tee log` and nohup logs live

def end_run(su: Setup, run_dir: Path, st: dict, how: tuple, last: dict, rate: float, ck_update: int,
            stop: StopFlag) -> dict:
    """The results of whatever exists: model.pt (not a diverged one), GateCheck (with the gate's evidence once
    completed) printed, summary.json, training.png and the files for plots; then a fault's one line and, where the run
    can go on from a checkpoint, how to resume. A second signal or a fault while the results are written leaves the
    last checkpoint, from which --resume writes them again; the line says so."""
    (status, message, failed), cfg, end = how, su.cfg, None
    stop.notice = "once the results are written (again to abandon them; --resume writes them)"
    try:
        if status != "diverged":  # a diverged model is not worth keeping; checkpoint.pt holds the last good one
            write_atomic(run_dir / "model.pt", torch_bytes(su.agent.state_dict()))
        gs = {k: np.concatenate([h[k] for h in st["gc_hist"]] or [np.zeros(0, bool if k == "dc_ok" else float)])
              for k in ("td_abs", "c", "dc", "dc_ok", "res")}
        g = gatecheck(**gs, floor_frac=mean_of([h["floor_frac"] for h in st["gc_hist"]]),
                      td_std=su.norm.scale.item(), eval_returns=st["eval_returns"], cfg=cfg)
        np.savez_compressed(buf := io.BytesIO(), **gs)  # for plots
        write_atomic(run_dir / "gate_samples.npz", buf.getvalue())
        if status == "completed":  # the gate's counterfactuals, and one evaluation episode's gate/TD/reward for plots
            g["evidence"] = gate_evidence(su.agent, su.evc, cfg)
            write_json(evaluate(su.evc, cfg, trace=True).trace, run_dir / "eval_trace.json")
        summary = dict(status=status, message=message, exit_code=EXIT_CODES.get(status, 128 + stop.signum),
                       run_dir=str(run_dir), env_id=cfg.env_id, seed=cfg.seed, updates=st["update"], gatecheck=g,
                       final_eval=st["evals"][-1][1] if st["evals"] else math.nan, eval_mode=cfg.eval_mode,
                       evals=st["evals"], mmer=st["mmer"], mean_c=mean_of(gs["c"]), ev=last.get("ev", math.nan),
                       ep100=mean_of(st["ep_hist"]), steps_per_s=rate, env_steps=st["env_steps"], wall_s=st["wall_s"])
        write_json(summary, run_dir / "summary.json")
        try:
            if cfg.save_plot:
                plot_training(run_dir, cfg)
        except Exception as e:  # a missing font or backend must not lose the run's summary
            print(f"note: training.png not written ({e})", file=sys.stderr)
        print("\n" + format_gatecheck(g, summary["mean_c"], summary["ev"], summary["ep100"], summary["mmer"], cfg),
              flush=True)
        print(f"run: {run_dir}  ({status}, {st['env_steps']:,} env steps, {st['wall_s']:.1f} s)", flush=True)
    except BaseException as e:
        if (end := fault(e, stop)) is None:
            raise
        summary = None
        if end[0] == "interrupted":  # a second signal, by name: what it abandoned is the end
            end = "interrupted", f"stopped by {signal.Signals(stop.signum).name}"
    kept = f"kept the checkpoint of update {ck_update}" if ck_update else "no checkpoint had been written yet"
    kept += f" in {run_dir}"
    line = f"{status}: {message}; {kept}" if failed else ""
    if end and status in ("completed", "halted"):  # what failed is the end: its status is the run's
        line = f"{end[0]}: {end[1]} while writing the end of the run; {kept}" + (
            ", which has trained to its end: --resume writes its results" if status == "completed" else "")
        status, message = end
    elif end:
        line = f"{status}: {message}; {kept}; the end of the run (summary.json) was not written ({': '.join(end)})"
    if line:
        print(f"gwt_ib.py: {line}", file=sys.stderr)
    if ck_update and status not in ("completed", "diverged"):  # exactly when the run can go on from a checkpoint
        print(f"resume with: python gwt_ib.py --resume {shlex.quote(str(run_dir))}", flush=True)
    return summary or dict(status=status, message=message, exit_code=EXIT_CODES.get(status, 128 + stop.signum),
                           run_dir=str(run_dir))

def train(cfg: Cfg, resume: Optional[str] = None) -> dict:
    """Train GWT-IB with `cfg`, or continue the run in directory `resume` (the resume contract: RESUMABLE); returns
    the summary (also written to <run_dir>/summary.json). summary["status"] is "completed", "halted" (halt_after),
    "interrupted", "diverged", "env_error", "io_error" or "out_of_memory". A bad setting raises ConfigError before
    anything is written."""
    with contextlib.ExitStack() as cleanup:  # the envs and the run's lock are let go however the run ends
        stop = cleanup.enter_context(StopFlag())  # from the start: a signal during start-up stops it before any write
        if resume is not None:  # the contract first: nothing in the run directory is written before it holds
            run_dir, saved = Path(resume), run_config(resume)
            check_changes(cfg, saved, "resume")
            lock_run(run_dir, cleanup)
        su = build(cfg)
        cleanup.callback(su.eval_envs.close)
        cleanup.callback(su.envs.close)
        agent, opt, norm, batch = su.agent, su.opt, su.norm, cfg.num_envs * cfg.rollout_steps
        num_updates = cfg.total_timesteps // batch
        # what a checkpoint carries besides modules and RNGs; evals: (update, mean return), eval_returns: each one's
        # per-episode returns; gc_hist: GateCheck samples; mmer: the max over updates of the mean return of the
        # training (sampled-policy) episodes that ended in it; budget_i, multiplier: the budget constraint's (dual_step)
        st = dict(update=0, env_steps=0, wall_s=0.0, ep_hist=[], evals=[], eval_returns=[], gc_hist=[],
                  mmer=float("nan"), budget_i=0.0, multiplier=0.0)
        if resume is not None:  # every file the resume reads is read and checked here, before anything is written
            st = load_checkpoint(su, run_dir)
            rows, note, last_row = metrics_plan(run_dir, st["update"])
            if st["update"] >= num_updates and results_written(run_dir, st):
                print(f"run: {run_dir} is complete ({st['update']} updates); nothing was changed (a larger "
                      "--total-timesteps extends it)", flush=True)
                return dict(status="completed", message="complete already", exit_code=0, run_dir=str(run_dir))
        if stop.signum:
            why = f"stopped by {signal.Signals(stop.signum).name} before training started"
            print(f"gwt_ib.py: interrupted: {why}; nothing was written", file=sys.stderr)
            return dict(status="interrupted", message=why, exit_code=128 + stop.signum, run_dir="")
        stop.notice = "after this update (again to abandon it)"  # from here on a first signal stops after an update
        if resume is None:
            su.col.reset(seed=cfg.seed)
            run_dir = start_run(cfg, cleanup)
        status, message, failed, last, bar = "completed", "", False, {}, None
        ck_update, start_update = st["update"], st["update"]  # ck_update: the update of the last checkpoint
        steps0, wall0, t0 = st["env_steps"], st["wall_s"], time.perf_counter()

        def clock() -> float:  # st["wall_s"] brought up to now (metrics_row reads it); this invocation's steps/s
            st["wall_s"] = wall0 + time.perf_counter() - t0
            return (st["env_steps"] - steps0) / max(time.perf_counter() - t0, 1e-9)
        try:  # from here on every failure is a status of the run, with its checkpoint kept
            if resume is not None:
                resume_writes(cfg, saved, run_dir, rows, note)
            if start_update >= num_updates:  # trained to its end before, its results never written
                print(f"run: {run_dir} has trained to its end ({start_update} updates), its results were not "
                      "written: writing them", flush=True)
                last = last_row
            metrics_fd = open_run_file(run_dir / "metrics.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, own=True)
            cleanup.callback(os.close, metrics_fd)  # unbuffered: nothing is left to fail at the close
            from tqdm import tqdm
            bar = tqdm(total=num_updates, initial=start_update, disable=not cfg.progress, desc=cfg.env_id, unit="upd")
            for update in range(start_update, num_updates):
                if cfg.anneal_lr:
                    opt.param_groups[0]["lr"] = cfg.lr * (1 - update / num_updates)
                t_start, floor0 = time.perf_counter(), norm.floor_hits.item()
                b, last_value, fin = rollout(su.col, cfg.rollout_steps)
                adv, ret = gae(b, last_value, cfg.gamma, cfg.gae_lambda)
                t_roll = time.perf_counter() - t_start
                if not st["evals"]:  # GateCheck's early baseline: no update yet, a normalizer that saw a rollout
                    add_eval(st, 0, evaluate(su.evc, cfg))
                check_finite(update, "in the rollout", {"TD mean": norm.mean, "TD scale": norm.scale, "return": ret})
                gs = gate_samples(agent, b, (norm.floor_hits.item() - floor0) / cfg.rollout_steps)
                lam_c = ib_weight(cfg, update, num_updates, st["multiplier"])
                m = ppo_update(agent, opt, b, adv, ret, cfg, lam_c, update, su.gradients)
                st["budget_i"], st["multiplier"] = dual_step(cfg, st["budget_i"], b["c"].mean().item())
                t_upd = time.perf_counter() - t_start - t_roll
                check_finite(update, "after the update", {f"parameter {n}": p for n, p in agent.named_parameters()})
                st["gc_hist"] = (st["gc_hist"] + [gs])[-cfg.gatecheck_rollouts:]
                st["ep_hist"] = (st["ep_hist"] + [R for _, R, _ in fin])[-100:]
                ep_mean = mean_of([R for _, R, _ in fin])
                st["mmer"] = max(st["mmer"], ep_mean, key=lambda v: -math.inf if math.isnan(v) else v)  # POPGym's
                done = st["update"] = update + 1
                st["env_steps"] += batch
                if done == num_updates or cfg.eval_every and done % cfg.eval_every == 0:
                    add_eval(st, done, evaluate(su.evc, cfg))
                last = metrics_row(su, st, b, ret, m, lam_c, ep_mean, (t_roll, t_upd), clock())
                log_update(metrics_fd, bar, last, num_updates, cfg)
                # a first signal or halt_after stops the run at this update's checkpoint; in the last, it completes
                halt = done < num_updates and (stop.signum or cfg.halt_after and done - start_update >= cfg.halt_after)
                if halt or done % cfg.checkpoint_every == 0 or done == num_updates:
                    save_checkpoint(su, st, run_dir)
                    ck_update = done
                if halt:
                    status, message = ("interrupted", f"stopped by {signal.Signals(stop.signum).name}") \
                        if stop.signum else ("halted", "")
                    break
        except BaseException as e:  # the last good checkpoint stays as it was
            if (f := fault(e, stop)) is None:
                raise
            (status, message), failed = f, True
        finally:
            if bar is not None:
                bar.close()
        rate = clock()  # and st["wall_s"]
        if start_update >= num_updates:  # no update in this invocation: the rate of the run's last
            rate = last.get("steps_per_s", math.nan)
        return end_run(su, run_dir, st, (status, message, failed), last, rate, ck_update, stop)

def reevaluate(cfg: Cfg, run_dir: Path) -> dict:
    """--evaluate: RUN's last checkpoint (model and TD normalizer) evaluated again, with GateCheck's counterfactual
    arms, on cfg.eval_episodes episodes; printed and written to a new evaluate-<time>.json, nothing else changed."""
    check_changes(cfg, run_config(str(run_dir), "evaluate"), "evaluate")
    su = build(cfg)
    try:
        update = load_checkpoint(su, run_dir, "evaluate")["update"]  # read as --resume reads it
        e = evaluate(su.evc, cfg)
        out = dict(run_dir=str(run_dir), update=update, policy=policy(cfg), episodes=len(e.returns),
                   eval=mean_ci(e.returns), mean_c=e.mean_c, returns=e.returns.tolist(),
                   evidence=gate_evidence(su.agent, su.evc, cfg))
    finally:
        su.envs.close()
        su.eval_envs.close()
    print(f"evaluate: {run_dir} at update {update}: {out['policy']} return {out['eval'][0]:.3f} ± {out['eval'][1]:.3f}"
          f" over {out['episodes']} episodes, mean_c {e.mean_c:.3f}", *format_evidence(out["evidence"]) if
          out["evidence"] else [], sep="\n")
    stem = f"evaluate-{time.strftime('%Y%m%d-%H%M%S')}"
    path = next(p for i in range(1, 10 ** 6) if not (p := run_dir / f"{stem}{'' if i == 1 else f'-{i}'}.json").exists())
    write_json(out, path)
    print(f"wrote {path}", flush=True)
    return out


# ============================================================================ main
def main(argv: Optional[list] = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.list_envs:
        print(list_envs())
        return 0
    try:
        if ns.preset and (ns.resume is not None or ns.evaluate is not None):
            raise ConfigError("preset", ns.preset, "cannot be combined with --resume or --evaluate (the run has its "
                                                   "settings)")
        if ns.evaluate is not None:
            reevaluate(parse_overrides(ns, run_config(ns.evaluate, "evaluate")), Path(ns.evaluate))
            return 0
        base = run_config(ns.resume) if ns.resume is not None else Cfg(**PRESETS.get(ns.preset, {}))
        summary = train(parse_overrides(ns, base), resume=ns.resume)  # build() validates before anything runs
    except (ConfigError, EnvError, OSError) as e:  # before anything is written: a faulty setting, environment or path
        print(f"gwt_ib.py: error: {one_line(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # a second signal before training started
        sig = signal.Signals(e.args[0] if e.args and isinstance(e.args[0], int) else signal.SIGINT)
        print(f"gwt_ib.py: interrupted: stopped by {sig.name} before training started; nothing was written",
              file=sys.stderr)
        return 128 + sig
    return summary["exit_code"]  # README, "Exit statuses"


# ============================================================================ accelerator (optional)
# Agent.step's elementwise math for the GRU memory and a one-layer router, forward and backward, in C for CPU
# float32, one call per time step around torch's matmul: on a CPU the time loop is bound by per-op overhead (the
# step: ~15 small torch ops, its backward ~30 autograd nodes). What it supports is CCell.SUPPORTS; it is used only
# if it equals Agent.step for the agent being trained (values and every parameter's gradient on a random batch).
# Delete this section, Cfg.cpu_kernel and the call in build(), and the reference runs.
_CELL_C = r"""/* One time step t of a (L, B) batch, forward and backward. Row-major float32; X = 3H+R. */
#include <math.h>
#include <stdint.h>
#include <string.h>
typedef const float *restrict in_t;   /* arrays a row helper reads ... */
typedef float *restrict out_t;        /* ... and writes: never aliased */
typedef struct {
    int64_t B, H, R, G, learned;                 /* G: gates per row (1 for a scalar or fixed gate) */
    const float *x, *prior, *keep, *b_ih, *w_o, *b_o;   /* (L,B,X) (L,B) (L,B) (3H) (G,R) (G) */
    float *hp, *hh, *c, *h, *ci, *a, *tape;      /* (L,B,H) (B,X) (L,B,G) (L,B,H) (L,B) (L,B,R) (L,B,4H) */
    const float *d_h, *d_c;                      /* (L,B,H) (L,B,G): gradients arriving at h and c */
    float *dgn, *dhh, *dlogit, *dhp, *dmm, *dx;  /* (L,B,H) (L,B,X) (L,B,G) (B,H) (B,H) (L,B,X) */
} Cell;
/* e^x to ~2 ulp (Cephes' polynomial after Cody-Waite reduction), written so that compilers vectorize it;
   0 below -87.3 and inf above 88.7, so sigmoid saturates to exactly 0 and 1 as torch's does; NaN stays NaN */
static inline float ex(float x0) {
    float x = x0 < -87.f ? -87.f : x0 > 88.f ? 88.f : x0, k = (x * 1.44269504f + 12582912.f) - 12582912.f, s;
    float r = x - k * 0.693359375f + k * 2.12194440e-4f, p = 1.9875691500e-4f;   /* k = round(x / ln 2) */
    p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f; p = (p * r + 5.0000001201e-1f) * r * r + r + 1.f;
    int32_t e = ((int32_t)k + 127) << 23;
    memcpy(&s, &e, 4);
    return x0 < -87.3f ? 0.f : x0 > 88.7f ? INFINITY : p * s;
}
static inline float sigm(float x) { return 1.f / (1.f + ex(-x)); }
static inline float tanh_(float x) { float t = ex(-2.f * fabsf(x)); return copysignf((1.f - t) / (1.f + t), x); }
static inline float lerp(float s, float e, float w) { return w < 0.5f ? s + w * (e - s) : e - (e - s) * (1.f - w); }
static float dot(in_t a, in_t b, int64_t n) {   /* 16 partial sums: vectorizes */
    float acc[16] = {0}, s = 0.f;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) for (int l = 0; l < 16; l++) acc[l] += a[i + l] * b[i + l];
    for (; i < n; i++) s += a[i] * b[i];
    for (int l = 0; l < 16; l++) s += acc[l];
    return s;
}
/* c, h and the tape (r, u, n, hh_n) of step t from x, prior, hp[t] and hh; then hp[t+1] = h * keep[t+1]. */
/* A row's GRU part: tape (r, u, n, hh_n), h = hp + c*(GRUCell(c*z, hp) - hp); cs: gate stride (a constant) */
static inline void gru_fwd(int64_t H, float ci, in_t c, int64_t cs, in_t x, in_t hh, in_t hp, in_t bi, out_t tp,
                           out_t h) {
    for (int64_t j = 0; j < H; j++) {
        const float r = sigm((bi[j] + ci * x[j]) + hh[j]), u = sigm((bi[H + j] + ci * x[H + j]) + hh[H + j]);
        const float n = tanh_((bi[2 * H + j] + ci * x[2 * H + j]) + r * hh[2 * H + j]);
        tp[j] = r; tp[H + j] = u; tp[2 * H + j] = n; tp[3 * H + j] = hh[2 * H + j];
        h[j] = lerp(hp[j], lerp(n, hp[j], u), c[j * cs]);
    }
}
/* c, h and the tape of step t from x, prior, hp[t] and hh; then hp[t+1] = h * keep[t+1]. */
void cell_fwd(const Cell *k, int64_t t, int64_t last) {
    const int64_t B = k->B, H = k->H, R = k->R, G = k->G, X = 3 * H + R;
    for (int64_t b = 0; b < B; b++) {
        const int64_t row = t * B + b;
        const float *x = k->x + row * X, *hh = k->hh + b * X;
        float *c = k->c + row * G, *h = k->h + row * H, ci = 0.f;
        if (!k->learned) c[0] = k->prior[row];
        else if (R) {   /* c = sigmoid(prior + w_o tanh(x_r + hh_r) + b_o) */
            float *a = k->a + row * R;
            for (int64_t j = 0; j < R; j++) a[j] = tanh_(x[3 * H + j] + hh[3 * H + j]);
            for (int64_t g = 0; g < G; g++) c[g] = sigm(k->prior[row] + (dot(k->w_o + g * R, a, R) + k->b_o[g]));
        } else c[0] = sigm(k->prior[row]);
        for (int64_t g = 0; g < G; g++) ci += c[g];   /* the gate on the input z: a vector gate's mean */
        k->ci[row] = ci /= (float)G;
        if (G > 1) gru_fwd(H, ci, c, 1, x, hh, k->hp + row * H, k->b_ih, k->tape + row * 4 * H, h);
        else gru_fwd(H, ci, c, 0, x, hh, k->hp + row * H, k->b_ih, k->tape + row * 4 * H, h);
        if (!last) for (int64_t j = 0; j < H; j++) k->hp[(row + B) * H + j] = h[j] * k->keep[row + B];
    }
}
/* Backward of a row's GRU part: d hp (direct), d gi, d hh (GRU rows) and d h / d c from d h. */
static inline void gru_bwd(int64_t H, in_t dh, in_t c, int64_t cs, in_t tp, in_t hp, out_t df, out_t dhp, out_t dgi,
                           out_t dhh) {
    for (int64_t j = 0; j < H; j++) {
        const float r = tp[j], u = tp[H + j], n = tp[2 * H + j], hh_n = tp[3 * H + j];
        df[j] = lerp(n, hp[j], u) - hp[j];              /* d h / d c = q - hp */
        const float dq = dh[j] * c[j * cs];             /* h = hp + c*(q - hp) */
        dhp[j] = dh[j] - dq + dq * u;                   /* q = (1-u)*n + u*hp */
        const float dn = (dq - dq * u) * (1.f - n * n); /* n = tanh(gi_n + r*hh_n) */
        const float dr = dn * hh_n * r * (1.f - r);     /* r, u = sigmoid(gi_ru + hh_ru) */
        const float du = dq * (hp[j] - n) * u * (1.f - u);
        dgi[j] = dr; dgi[H + j] = du; dgi[2 * H + j] = dn;
        dhh[j] = dr; dhh[H + j] = du; dhh[2 * H + j] = dn * r;
    }
}
/* Step t's backward (t = L-1 ... 0). dmm: dhh[t+1] @ W_h (the caller's); dhp: d hp[t+1] direct, then d hp[t]'s. */
void cell_bwd(const Cell *k, int64_t t, int64_t last) {
    const int64_t B = k->B, H = k->H, R = k->R, G = k->G, X = 3 * H + R;
    float dh[H], df[H], dgi[3 * H], ds[R > 0 ? R : 1];
    for (int64_t b = 0; b < B; b++) {
        const int64_t row = t * B + b;
        const float *x = k->x + row * X, *hp = k->hp + row * H, *c = k->c + row * G, *tp = k->tape + row * 4 * H;
        float *dhp = k->dhp + b * H, *dhh = k->dhh + row * X, *dl = k->dlogit + row * G, *dx = k->dx + row * X;
        for (int64_t j = 0; j < H; j++)   /* d h[t] = d_h[t] + d hp[t+1] * keep[t+1] */
            dh[j] = k->d_h[row * H + j] + (last ? 0.f : (dhp[j] + k->dmm[b * H + j]) * k->keep[row + B]);
        if (G > 1) gru_bwd(H, dh, c, 1, tp, hp, df, dhp, dgi, dhh);
        else gru_bwd(H, dh, c, 0, tp, hp, df, dhp, dgi, dhh);
        memcpy(k->dgn + row * H, dgi + 2 * H, H * sizeof(float));   /* d gi's r, u parts equal dhh's */
        const float dci = dot(dgi, x, 3 * H), ci = k->ci[row];        /* gi = b_ih + ci * x_g */
        for (int64_t j = 0; j < 3 * H; j++) dx[j] = dgi[j] * ci;
        for (int64_t j = 0; j < R; j++) dhh[3 * H + j] = dx[3 * H + j] = 0.f;
        if (!k->learned) { dl[0] = 0.f; continue; }   /* fixed gate: nothing reaches the router */
        for (int64_t g = 0; g < G; g++)   /* dl = d logit; ci = mean(c) */
            dl[g] = (k->d_c[row * G + g] + (G > 1 ? dh[g] * df[g] : dot(dh, df, H)) + dci / G) * c[g] * (1.f - c[g]);
        for (int64_t j = 0; j < R; j++) ds[j] = 0.f;   /* a = tanh(x_r + hh_r) */
        for (int64_t g = 0; g < G; g++) for (int64_t j = 0; j < R; j++) ds[j] += dl[g] * k->w_o[g * R + j];
        const float *a = k->a + row * R;
        for (int64_t j = 0; j < R; j++) dhh[3 * H + j] = dx[3 * H + j] = ds[j] * (1.f - a[j] * a[j]);
    }
}
"""

class _CellArgs(ctypes.Structure):  # mirrors `Cell` in _CELL_C
    _fields_ = [(n, ctypes.c_int64) for n in "B H R G learned".split()] + [(n, ctypes.c_void_p) for n in (
        "x prior keep b_ih w_o b_o hp hh c h ci a tape d_h d_c dgn dhh dlogit dhp dmm dx").split()]

class CCell:
    """`step` stands in for Agent.step without gradients (rollout), `unroll` for Agent.unroll's loop (training). It reads
    the memory's and the router's weights as [GRU ; router] rows (X = 3H+R): W_x (X, E) = [W_ih ; the router's z
    columns], W_h (X, H) = [W_hh ; its h columns], b_h (X) = [b_hh ; its bias]; b_ih; the router's output layer."""
    SUPPORTS = "memory gru with the router of one hidden layer or none; scalar, vector or fixed gates; float32"

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.packed, self.x_of = lib, None, None  # within frozen(): packed weights, (z, version, W_x z)
        for f in (lib.cell_fwd, lib.cell_bwd):  # (struct, step t, is t the last step?)
            f.argtypes, f.restype = [ctypes.POINTER(_CellArgs), ctypes.c_int64, ctypes.c_int64], None

    @staticmethod
    def unsupported(ag: Agent) -> Optional[str]:
        """What of this agent is outside SUPPORTS, or None."""
        r = ag.router
        if type(ag.memory) is not GRUMemory or type(ag.memory.cell) is not nn.GRUCell:
            return f"memory {ag.cfg.memory}" if type(ag.memory) is not GRUMemory else "an edited GRUMemory"
        if r is not None and [type(m) for m in (*r.mlp, r.out)] != [nn.Linear, nn.Tanh, nn.Linear]:
            return f"a router of {ag.cfg.router_layers} hidden layers" if ag.cfg.router_layers != 1 else "an edited router"
        if any(p.dtype != torch.float32 for p in ag.parameters()):
            return "parameters that are not float32"
        return None

    @staticmethod
    def router(ag: Agent) -> Optional[Router]:  # a fixed gate reads no router
        return ag.router if ag.cfg.force_c is None else None

    @staticmethod
    def rows(ag: Agent) -> tuple[list, list, list]:
        """The parts of W_x, W_h and b_h (see the class doc), GRU first."""
        cell, r = ag.memory.cell, CCell.router(ag)
        if r is None:
            return [cell.weight_ih], [cell.weight_hh], [cell.bias_hh]
        lin, E = r.mlp[0], cell.input_size
        return [cell.weight_ih, lin.weight[:, :E]], [cell.weight_hh, lin.weight[:, E:]], [cell.bias_hh, lin.bias]

    @staticmethod
    def workspace(ag: Agent, L: int, B: int, grad: bool, **tensors) -> tuple[dict, _CellArgs]:
        """Work buffers for L steps of B rows (d*: backward only), and the C struct with their addresses."""
        r, learned = CCell.router(ag), ag.cfg.force_c is None
        R = r.mlp[0].out_features if r is not None else 0
        H, X, G = ag.H, 3 * ag.H + R, ag.G if R else 1  # G: gates per row
        ws = {k: torch.empty(v) for k, v in dict(hp=(L, B, H), hh=(B, X), ci=(L, B), a=(L, B, max(R, 1)),
              c=(L, B, G), h=(L, B, H), tape=(L, B, 4 * H), dgn=(L, B, H), dhh=(L, B, X), dlogit=(L, B, G),
              dhp=(B, H), dmm=(B, H), dx=(L, B, X)).items() if grad or not k.startswith("d")}
        ws.update({k: v.contiguous() for k, v in tensors.items()})
        args = _CellArgs(B, H, R, G, int(learned), b_ih=ag.memory.cell.bias_ih.data_ptr(),
                         **{k: v.data_ptr() for k, v in ws.items()})
        if R:
            args.w_o, args.b_o = r.out.weight.data_ptr(), r.out.bias.data_ptr()
        return ws, args

    @contextlib.contextmanager
    def frozen(self, ag: Agent):
        """A block in which ag's parameters do not change (Agent.frozen: a rollout, an evaluation): step packs the
        weights once, and keeps W_x z with the z it was made from (the clean bootstrap and the next step share z_{t+1})."""
        self.packed, self.x_of = [torch.cat(p) for p in self.rows(ag)], None
        try:
            yield
        finally:
            self.packed = self.x_of = None

    def step(self, ag: Agent, z, prior, keep, state):
        """Agent.step for one step, without gradients (the rollout): the projections as two matmuls, then C."""
        W_x, W_h, b_h = self.packed or [torch.cat(p) for p in self.rows(ag)]  # outside frozen(): packed per call
        if self.packed is None or self.x_of is None or self.x_of[0] is not z or self.x_of[1] != z._version:
            self.x_of = z, z._version, F.linear(z, W_x)  # holding z: its id is not reused
        hp = state * keep
        x, hh = self.x_of[2], F.linear(hp, W_h, b_h)
        ws, args = self.workspace(ag, 1, z.shape[0], False, x=x, prior=prior, hp=hp, hh=hh)
        self.lib.cell_fwd(ctypes.byref(args), 0, 1)
        return ws["c"][0], ws["h"][0]

    def unroll(self, ag: Agent, z, prior, keep, h0):  # the router's output layer learns only with a learned gate
        W_x, W_h, b_h = (torch.cat(p) for p in self.rows(ag))  # autograd splits their gradients back
        out = [] if (r := self.router(ag)) is None else [r.out.weight, r.out.bias]
        return _CUnroll.apply(self, ag, F.linear(z, W_x), prior, keep, h0, W_h, b_h, ag.memory.cell.bias_ih, *out)

    def disagreement(self, agent: Agent) -> Optional[str]:
        """Where this C cell and agent's reference differ on a random batch (every output of unroll and step,
        every parameter's gradient), or None; on a copy with perturbed parameters (a zero router hides edits)."""
        g = torch.Generator().manual_seed(0)  # never the global generators: runs must not depend on this check
        ref = copy.deepcopy(agent)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))
        fast = copy.deepcopy(ref)
        fast.accel = self
        obs, h0 = torch.randn(6, 3, agent.obs_dim, generator=g), torch.randn(3, agent.memory.state_dim, generator=g)
        td, start = torch.randn(6, 3, generator=g), (torch.rand(6, 3, generator=g) < 0.3).float()
        res = {}
        for name, m in (("reference", ref), ("C", fast)):
            try:
                with torch.enable_grad():
                    outs = m.unroll(obs, h0, td, start)
                    w = torch.Generator().manual_seed(1)  # the same random weights for both: every output counts
                    loss = sum((o * torch.randn(o.shape, generator=w)).sum() for o in outs)
                    grads = torch.autograd.grad(loss, list(m.parameters()), allow_unused=True)
                with torch.no_grad(), m.frozen():  # as a rollout runs it
                    step = m.step(m.features(obs[0]), *m.gate_prior(td[0], start[0]), h0)
            except Exception as e:  # e.g. an edited memory that the C cell reads wrongly
                return f"the {name} step raised {type(e).__name__}: {str(e)[:120]}"
            res[name] = dict(zip(["logits", "value", "c", "h", "step c", "step h"], (*outs, *step)),
                             **{f"grad {n}": torch.zeros_like(p) if d is None else d
                                for (n, p), d in zip(m.named_parameters(), grads)})
        return first_difference(res["C"], res["reference"])

def first_difference(got: dict, want: dict) -> Optional[str]:
    """The first of want's tensors that got lacks or does not hold within 1e-5 + 1e-3 * max|want| (a fast path's
    check against the reference), in words; None if there is none."""
    for k, w in want.items():
        g = got.get(k)
        if (g is None) != (w is None):
            return f"{k} is {'missing' if g is None else 'computed where the reference has none'}"
        if w is not None and not (err := (g - w).abs().max().item()) <= 1e-5 + 1e-3 * w.abs().max().item():
            return f"{k} differs by {err:.2g}"
    return None

class _CUnroll(torch.autograd.Function):
    """Agent.unroll's loop as one autograd node: x (L,B,X), prior, keep (L,B,1), h0 (B,H) -> h (L,B,H), c (L,B,G)."""
    @staticmethod
    def forward(ctx, cc, ag, x, prior, keep, h0, W_h, b_h, b_ih, *router):
        L, B = x.shape[:2]
        ws, args = cc.workspace(ag, L, B, True, x=x, prior=prior, keep=keep)
        torch.mul(h0, keep[0], out=ws["hp"][0])
        for t in range(L):
            torch.addmm(b_h, ws["hp"][t], W_h.t(), out=ws["hh"])  # hh = W_h hp[t] + b_h; cell_fwd writes hp[t+1]
            cc.lib.cell_fwd(ctypes.byref(args), t, t == L - 1)
        ctx.save_for_backward(cs := ws.pop("c"))  # cell_bwd reads it; an output kept on ctx would leak the graph
        ctx.cc, ctx.ag, ctx.ws, ctx.args, ctx.n_router, ctx.W_h = cc, ag, ws, args, len(router), W_h.detach()
        return ws.pop("h"), cs

    @staticmethod
    def backward(ctx, d_hs, d_cs):
        ws, args, ag, H, _ = ctx.ws, ctx.args, ctx.ag, ctx.ag.H, ctx.saved_tensors
        L, B = ws["x"].shape[:2]
        ws["d_h"], ws["d_c"] = d_hs.contiguous(), d_cs.contiguous()  # kept alive while C reads them
        args.d_h, args.d_c = ws["d_h"].data_ptr(), ws["d_c"].data_ptr()
        for t in range(L - 1, -1, -1):
            ctx.cc.lib.cell_bwd(ctypes.byref(args), t, t == L - 1)
            torch.mm(ws["dhh"][t], ctx.W_h, out=ws["dmm"])  # d hp[t] through hh[t] = W_h hp[t] + b_h
        dhh, dl = ws["dhh"].view(L * B, -1), ws["dlogit"].view(L * B, -1)
        grads = [dhh.T @ ws["hp"].view(L * B, H), dhh.sum(0),  # W_h, b_h, and b_ih from d gi = [d hh_ru, d gi_n]
                 torch.cat([ws["dhh"][..., :2 * H].sum((0, 1)), ws["dgn"].sum((0, 1))])]
        grads += [dl.T @ ws["a"].view(L * B, -1), dl.sum(0)][:ctx.n_router]  # c = sigmoid(prior + r_out(a))
        dprior = ws["dlogit"].sum(-1, keepdim=True) if ag.cfg.force_c is None else None
        ctx.ws = ctx.args = None
        return None, None, ws["dx"], dprior, None, (ws["dhp"] + ws["dmm"]) * ws["keep"][0], *grads

KernelUnavailable = type("KernelUnavailable", (RuntimeError,), {"__doc__": "Why the C cell cannot run here."})

_private = lambda st: st.st_uid == os.getuid() and not st.st_mode & 0o022  # noqa: E731  (ours; no one else writes)
# a directory whose entries no other user can rename or replace (in a sticky one, such as /tmp: only their owners')
_guarded = lambda st: st.st_uid in (0, os.getuid()) and (not st.st_mode & 0o022 or st.st_mode & stat.S_ISVTX)  # noqa

def _private_dir(path: str) -> int:
    """A descriptor of directory `path` (missing parts made 0700), opened one part at a time from / without
    following links: it must be ours and private, and every directory above it guarded; else OSError."""
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in Path(os.path.realpath(os.path.dirname(path)), os.path.basename(path)).parts[1:]:  # last: no link
            if not _guarded(os.fstat(fd)):
                raise PermissionError(f"another user can replace what is in a directory above {path}")
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o700, dir_fd=fd)
            fd, parent = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd), fd
            os.close(parent)
        if not _private(os.fstat(fd)):
            raise PermissionError(f"{path} is not a directory only this user can write")
        return fd
    except BaseException:
        os.close(fd)
        raise

def _cache_dir() -> tuple[int, str]:
    """(descriptor, path) of $XDG_CACHE_HOME/gwt_ib (default ~/.cache/gwt_ib; a relative XDG_CACHE_HOME is ignored, as
    the XDG spec says) if _private_dir accepts it; else of a fresh private temporary directory for this process."""
    global _TMP_DIR
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    d = str(Path(xdg if os.path.isabs(xdg) else Path.home() / ".cache") / "gwt_ib")
    try:
        return _private_dir(d), d
    except OSError as e:
        why = e
    if _TMP_DIR is None:
        _TMP_DIR = tempfile.mkdtemp(prefix="gwt_ib_")  # mode 0700, a fresh random name
        atexit.register(shutil.rmtree, _TMP_DIR, True)
        print(f"note: C cell built in {_TMP_DIR}, not in {d} ({one_line(why)})", file=sys.stderr)
    try:
        return _private_dir(_TMP_DIR), _TMP_DIR
    except OSError as e:
        raise KernelUnavailable(f"no private directory to build it in ({one_line(e)})") from None

def _read_own(dfd: int, name: str) -> Optional[bytes]:
    """The bytes of file `name` in directory dfd if it is a regular file of this user's that no one else can write,
    never through a symlink."""
    with contextlib.suppress(OSError), os.fdopen(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dfd), "rb") as f:
        st = os.fstat(f.fileno())
        return f.read() if stat.S_ISREG(st.st_mode) and _private(st) else None

def _write_own(dfd: int, name: str, data: bytes) -> None:
    """A new file beside `name` (O_EXCL, never through a symlink), renamed over `name` atomically."""
    tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}"
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd), "wb") as f:
        f.write(data)
    os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)

def _load_bytes(data: bytes) -> ctypes.CDLL:
    """A library loaded from exactly these bytes: copied into an anonymous memory file, loaded through its
    descriptor (kept open: a reused descriptor number would name the first library to the loader)."""
    fd = os.memfd_create("gwt_ib_cell", os.MFD_CLOEXEC)
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
    lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    lib.memfd = fd
    return lib

def load_library() -> ctypes.CDLL:
    """_CELL_C compiled into the private cache, loaded from the bytes whose SHA-256 was just checked against the one
    recorded when it was built (a truncated, altered or foreign file is rebuilt, never loaded)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc or not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
        raise KernelUnavailable("no C compiler found ($CC, cc, gcc, clang)" if not cc else
                                "loading it from checked bytes needs Linux (memfd_create, /proc/self/fd)")
    flags = ["-O3", "-std=c99", "-ffp-contract=fast", "-shared", "-fPIC"]
    cpu = platform.machine() + (Path("/proc/cpuinfo").read_text()[:4000] if Path("/proc/cpuinfo").exists() else "")
    key = hashlib.sha256("\0".join([_CELL_C, cc, *flags, platform.platform(), cpu]).encode()).hexdigest()[:16]
    so, rec = f"cell_{key}.so", f"cell_{key}.sha256"
    dfd, path = _cache_dir()
    try:
        data, want = _read_own(dfd, so), _read_own(dfd, rec)
        if data is None or want is None or hashlib.sha256(data).hexdigest().encode() != want.strip():
            with tempfile.TemporaryDirectory(dir=path) as tmp:  # private too: mode 0700, in a checked directory
                (Path(tmp) / "cell.c").write_text(_CELL_C)
                for arch in (["-march=native"], []):  # the CPU's widest vectors where the compiler knows them
                    r = subprocess.run([cc, *flags, *arch, f"{tmp}/cell.c", "-o", f"{tmp}/cell.so"],
                                       capture_output=True, text=True)
                    if r.returncode == 0:
                        break
                else:
                    raise KernelUnavailable(f"{cc} failed: {r.stderr.strip()[-200:]}")
                data = _read_own(dfd, f"{Path(tmp).name}/cell.so")
            if data is None:
                raise KernelUnavailable(f"{cc} wrote no library")
            _write_own(dfd, so, data)
            _write_own(dfd, rec, hashlib.sha256(data).hexdigest().encode())
    finally:
        os.close(dfd)
    return _load_bytes(data)

_TMP_DIR, _LIB = None, None  # this process's private build directory if needed; the library or why there is none

def accelerate(agent: Agent, dev: torch.device) -> None:
    """agent.accel = the C cell if cpu_kernel is on, it runs here, supports this agent and equals Agent.step; else one
    line why not."""
    global _LIB
    if not agent.cfg.cpu_kernel:
        return
    if dev.type == "cpu" and _LIB is None:
        try:
            _LIB = load_library()
        except (KernelUnavailable, OSError) as e:
            _LIB = KernelUnavailable(str(e) if isinstance(e, KernelUnavailable) else f"loading it failed: {e}")
    if dev.type != "cpu":
        why = f"it runs on CPU only and this run is on {dev}"
    elif isinstance(_LIB, KernelUnavailable):
        why = str(_LIB)
    elif (other := CCell.unsupported(agent)) is not None:
        why = f"it supports {CCell.SUPPORTS}; this run has {other}"
    elif (diff := CCell(_LIB).disagreement(agent)) is not None:
        why = f"it disagrees with Agent.step: {diff}"
    else:
        agent.accel = CCell(_LIB)
        return
    print(f"note: C cell not used ({why}); Agent.step runs as torch ops", file=sys.stderr)


# --- CUDA graphs: on a GPU the update is bound by kernel launches (the time loop: ~15 kernels a step forward, ~50
# backward). gradients() of one minibatch, captured once as a CUDA graph (torch.cuda.graph) of the same code and
# replayed; clipping and Adam stay eager. Checked against eager on the first real minibatch.
class GraphGradients:
    """Stands in for gradients(agent, m, cfg, lam_c): the first call checks a captured graph against eager on its
    minibatch (stats and every parameter's gradient within 1e-5 + 1e-3 * max|eager|); a graph that cannot be
    captured or differs is dropped with one line, and eager runs from then on."""
    def __init__(self):
        self.graph, self.eager = None, False

    def __call__(self, agent: Agent, m: dict, cfg: Cfg, lam_c: float) -> torch.Tensor:
        if self.eager:
            return gradients(agent, m, cfg, lam_c)
        if self.graph is None:
            return self.capture(agent, m, cfg, lam_c)
        for k, v in m.items():
            self.static[k].copy_(v)
        self.lam.fill_(lam_c)
        self.graph.replay()
        for p, g in zip(agent.parameters(), self.grads):  # the graph's own tensors, whatever set them aside
            p.grad = g
        return self.stats.clone()

    def capture(self, agent: Agent, m: dict, cfg: Cfg, lam_c: float) -> torch.Tensor:
        want = gradients(agent, m, cfg, lam_c)
        want_g = {f"grad {n}": None if p.grad is None else p.grad.clone() for n, p in agent.named_parameters()}
        rng = torch.cuda.default_generators[want.device.index]
        rng_state = rng.clone_state()  # a failed capture leaves the generator in capture mode: set back after one
        try:
            self.static, self.lam = {k: v.clone() for k, v in m.items()}, torch.tensor(float(lam_c), device=want.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: lazy initializations must not happen during the capture
                for _ in range(3):
                    gradients(agent, self.static, cfg, self.lam)
            torch.cuda.current_stream().wait_stream(side)
            agent.zero_grad(set_to_none=True)  # the backward in the graph allocates its gradients in its pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                loss, self.stats = minibatch_loss(agent, self.static, cfg, self.lam)
                loss.backward()
            self.grads = [p.grad for p in agent.parameters()]
            got = self(agent, m, cfg, lam_c)
            have = {f"grad {n}": p.grad for n, p in agent.named_parameters()}
            bad = first_difference({"the loss's stats": got, **have}, {"the loss's stats": want, **want_g})
            if bad is None:
                return got
            why = f"it disagrees with eager: {bad}"
        except Exception as e:  # e.g. an edited step that syncs with the host, which a graph cannot hold
            why = f"capturing it failed: {one_line(e)}"
            rng.graphsafe_set_state(rng_state)
        print(f"note: CUDA graph not used ({why}); the update runs eagerly", file=sys.stderr)
        self.eager, self.graph, self.static = True, None, None
        return gradients(agent, m, cfg, lam_c)

def graph_gradients(cfg: Cfg, dev: torch.device):
    """The minibatch's gradients: a GraphGradients on CUDA with cuda_graph on, else gradients() itself."""
    return GraphGradients() if dev.type == "cuda" and cfg.cuda_graph else gradients


if __name__ == "__main__":  # run as the module an import makes: pickled env state then names gwt_ib.FlatObs
    sys.exit(__import__(Path(__file__).stem).main())

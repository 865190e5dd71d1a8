"""Configuration and command line: documented fields, typed overrides, one-line errors before anything starts."""
from __future__ import annotations

import dataclasses

import re
import subprocess
import sys

import gymnasium
import pytest
import torch

import gwt_ib
from conftest import ROOT, TEXT_ID

FIELDS = dataclasses.fields(gwt_ib.Cfg)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@pytest.fixture
def no_training(monkeypatch):
    """A bad setting must be refused before anything starts: if a check is missing, fail fast at the first
    environment instead of starting a 500k-step run."""
    def refuse(cfg, *a, **kw):
        raise AssertionError(f"environments were made for {cfg}")
    monkeypatch.setattr(gwt_ib, "make_envs", refuse)


def parse(argv) -> gwt_ib.Cfg:
    ns = gwt_ib.build_parser().parse_args(argv)
    return gwt_ib.parse_overrides(ns, gwt_ib.Cfg())


# ----------------------------------------------------------------------------- docs and --help
def test_every_field_has_a_one_line_doc():
    """field_docs() documents every Cfg field with a non-empty one-line string."""
    docs = gwt_ib.field_docs()
    missing = [f.name for f in FIELDS if not docs.get(f.name, "").strip()]
    assert missing == []
    assert all("\n" not in d for d in docs.values())


def test_help_lists_every_field_with_its_doc_and_default(capsys, monkeypatch):
    """--help shows --field-name, its doc and "(default: X)" for every Cfg field, and exits 0."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: one line per option
    with pytest.raises(SystemExit) as e:
        gwt_ib.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    docs = gwt_ib.field_docs()
    lines, cur = {}, None  # option -> its whole entry (argparse may put the help on the next line)
    for line in out.splitlines():
        m = re.match(r"\s+(--[\w-]+)", line)
        if m:
            cur = m.group(1)
            lines[cur] = line
        elif cur and line.startswith(" "):
            lines[cur] += " " + line.strip()
    for f in FIELDS:
        line = lines.get(flag(f.name))
        assert line is not None, f.name
        assert f"(default: {f.default})" in line, f.name
        assert docs[f.name] in line, f.name
    assert "--resume" in lines and "--list-envs" in lines


# ----------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("argv,expected", [
    (["--num-envs", "8"], {"num_envs": 8}),
    (["--total-timesteps", "1_000_000"], {"total_timesteps": 1_000_000}),
    (["--lr", "3e-4"], {"lr": 3e-4}),
    (["--gamma", "1"], {"gamma": 1.0}),
    (["--base-logit", "-2.5"], {"base_logit": -2.5}),
    (["--anneal-lr"], {"anneal_lr": True}),
    (["--anneal-lr", "true"], {"anneal_lr": True}),
    (["--norm-adv", "false"], {"norm_adv": False}),
    (["--norm-adv", "0"], {"norm_adv": False}),
    (["--progress", "no"], {"progress": False}),
    (["--save-plot=off"], {"save_plot": False}),
    (["--memoryless", "yes"], {"memoryless": True}),
    (["--force-c", "0.5"], {"force_c": 0.5}),
    (["--force-c", "none"], {"force_c": None}),
    (["--lambda-c-end", "0.1"], {"lambda_c_end": 0.1}),
    (["--lambda-c-end", "None"], {"lambda_c_end": None}),
    (["--gate", "vector"], {"gate": "vector"}),
    (["--td-scale-mode", "quantile"], {"td_scale_mode": "quantile"}),
    (["--run-name", "my-run"], {"run_name": "my-run"}),
])
def test_overrides_of_each_type_parse(argv, expected):
    """Flags convert to the field's type (int, float, bool, Optional[float] incl. "none", str); others keep defaults."""
    cfg = parse(argv)
    for k, v in expected.items():
        got = getattr(cfg, k)
        assert got == v and type(got) is type(v), k
    untouched = {f.name for f in FIELDS} - set(expected)
    defaults = gwt_ib.Cfg()
    assert all(getattr(cfg, k) == getattr(defaults, k) for k in untouched)


def test_help_examples_parse_and_validate():
    """Every example command in --help's epilog parses to a Cfg that validates with a registered env id."""
    lines = [l.split("gwt_ib.py", 1)[1].split() for l in gwt_ib.build_parser().epilog.splitlines()
             if "python gwt_ib.py" in l and "--resume" not in l]
    assert len(lines) >= 2 and any(lines)
    for argv in lines:
        cfg = parse(argv)
        gwt_ib.validate(cfg)
        gwt_ib.check_env_id(cfg.env_id)
    cfg = parse(max(lines, key=len))  # the one with flags gives exactly what they say
    assert (cfg.env_id, cfg.total_timesteps, cfg.force_c) == ("popgym-BattleshipEasy-v0", 100000, 1.0)


def test_default_config_is_valid():
    """Cfg() passes validate() (on a machine without CUDA too: device auto)."""
    gwt_ib.validate(gwt_ib.Cfg())


# ----------------------------------------------------------------------------- bad inputs
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")

BAD = [  # argv, field, the bad value as it must appear, a piece of what is allowed
    (["--seq-len", "48"], "seq_len", "48", "divide rollout_steps"),
    (["--rollout-steps", "100"], "seq_len", "64", "divide rollout_steps (100)"),
    (["--bias-clamp-min", "3"], "bias_clamp_min", "3", "< bias_clamp_max"),
    (["--bias-init", "5"], "bias_init", "5", "[bias_clamp_min, bias_clamp_max]"),
    (["--td-std-min", "60"], "td_std_min", "60", "< td_std_max"),
    (["--td-scale-mode", "median"], "td_scale_mode", "median", "ema, quantile, ema_quantile"),
    (["--force-c", "1.5"], "force_c", "1.5", "[0, 1]"),
    (["--force-c", "abc"], "force_c", "abc", "a number or none"),
    (["--lr", "-1"], "lr", "-1", ">= 0"),
    (["--lr", "nan"], "lr", "nan", "finite"),
    (["--gamma", "1.5"], "gamma", "1.5", "[0, 1]"),
    (["--gae-lambda", "-0.1"], "gae_lambda", "-0.1", "[0, 1]"),
    (["--num-envs", "0"], "num_envs", "0", ">= 1"),
    (["--num-envs", "abc"], "num_envs", "abc", "an integer"),
    (["--epochs", "2.5"], "epochs", "2.5", "an integer"),
    (["--lr", "fast"], "lr", "fast", "a number"),
    (["--anneal-lr", "maybe"], "anneal_lr", "maybe", "true or false"),
    (["--target-c", "0"], "target_c", "0", "(0, 1)"),
    (["--td-quantile", "1"], "td_quantile", "1", "(0, 1)"),
    (["--td-window", "1"], "td_window", "1", ">= 2"),
    (["--clip-eps", "0"], "clip_eps", "0", "> 0"),
    (["--lambda-c-end", "-1"], "lambda_c_end", "-1", ">= 0 or none"),
    (["--ib-loss", "l1"], "ib_loss", "l1", "sq, kl, constraint"),
    (["--gate", "matrix"], "gate", "matrix", "scalar, vector"),
    (["--gate", "vector", "--use-router-residual", "false"], "gate", "vector", "use_router_residual"),
    (["--device", "tpu"], "device", "tpu", "auto, cpu, cuda or cuda:N"),
    (["--device", "cpu:1"], "device", "cpu:1", "auto, cpu, cuda or cuda:N"),
    pytest.param(["--device", "cuda"], "device", "cuda", "no CUDA device", marks=no_cuda),
    pytest.param(["--device", "cuda:0"], "device", "cuda:0", "no CUDA device", marks=no_cuda),
    (["--minibatches", "3"], "minibatches", "3", "divide the number of sequences"),
    (["--total-timesteps", "100"], "total_timesteps", "100", ">= num_envs*rollout_steps"),
    (["--seed", "-1"], "seed", "-1", ">= 0"),
    (["--run-name", "a/b"], "run_name", "a/b", "plain directory name"),
    (["--env-id", "popgym-CountRecalEasy-v0"], "env_id", "popgym-CountRecalEasy-v0", "popgym-CountRecallEasy-v0"),
    (["--env-id", "NoSuchEnvAtAll-v9"], "env_id", "NoSuchEnvAtAll-v9", "not a registered gymnasium id"),
    (["--resume", "/nonexistent/run"], "resume", "/nonexistent/run", "config.json and checkpoint.pt"),
    (["--prev-action", "--popgym-wrappers"], "prev_action", "True", "cannot be combined with popgym_wrappers"),
    (["--preset", "popgym", "--resume", "runs/x"], "preset", "popgym", "cannot be combined with --resume"),
]


@pytest.mark.parametrize("argv,field,value,allowed", BAD, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_bad_input_is_one_line_naming_field_value_and_allowed(argv, field, value, allowed, capsys, tmp_path,
                                                              no_training):
    """A bad setting returns 2 before anything starts and prints one stderr line: --field, bad value, what is allowed."""
    argv = argv + ["--out-dir", str(tmp_path / "runs")]
    rc = gwt_ib.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert flag(field) in line
    assert value in line
    assert allowed in line
    assert "Traceback" not in err + out
    assert out == ""
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_unknown_env_suggests_close_ids(capsys, no_training):
    """A mistyped env id lists the closest registered ids."""
    assert gwt_ib.main(["--env-id", "popgym-CountRecalEasy-v0"]) == 2
    err = capsys.readouterr().err
    assert "did you mean" in err and "popgym-CountRecallEasy-v0" in err


@pytest.mark.parametrize("argv,needle", [
    (["--learning-rate", "0.1"], "--learning-rate"),
    (["--num-envz", "4"], "--num-envs"),  # suggestion for a near miss
    (["--num-env", "4"], "--num-envs"),  # a prefix is not silently taken for the full flag
    (["--seed", "1", "extra"], "extra"),
    (["--lr"], "--lr"),
])
def test_argparse_errors_exit_2_with_one_line(argv, needle, capsys, no_training):
    """Unknown or incomplete flags exit with status 2 and one stderr line (with a suggestion for near misses)."""
    with pytest.raises(SystemExit) as e:
        gwt_ib.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert needle in err and "Traceback" not in err


def test_validate_rejects_wrong_python_types():
    """validate() checks field types of a programmatic Cfg (e.g. a str where an int belongs, bool for int)."""
    for kw, name in (({"num_envs": "4"}, "num_envs"), ({"seq_len": True}, "seq_len"), ({"lr": "0.1"}, "lr"),
                     ({"force_c": "1"}, "force_c")):
        with pytest.raises(gwt_ib.ConfigError) as e:
            gwt_ib.validate(dataclasses.replace(gwt_ib.Cfg(), **kw))
        assert e.value.name == name
    gwt_ib.validate(dataclasses.replace(gwt_ib.Cfg(), lr=1, force_c=1))  # ints are fine for float fields


def test_config_error_carries_name_value_allowed():
    """ConfigError exposes name, value and allowed, and formats as '--name value: allowed'."""
    e = gwt_ib.ConfigError("seq_len", 48, "must divide rollout_steps (256)")
    assert (e.name, e.value, e.allowed) == ("seq_len", 48, "must divide rollout_steps (256)")
    assert str(e) == "--seq-len 48: must divide rollout_steps (256)"


def test_cli_subprocess_bad_lr_exits_2_with_one_line():
    """`python gwt_ib.py --lr -1` exits 2 with a single stderr line and no traceback."""
    p = subprocess.run([sys.executable, "gwt_ib.py", "--lr", "-1"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--lr" in lines[0] and "-1" in lines[0] and ">= 0" in lines[0]
    assert "Traceback" not in p.stderr + p.stdout


# ----------------------------------------------------------------------------- unsupported spaces
S = gymnasium.spaces


@pytest.mark.parametrize("space,where", [
    (S.Text(5), "obs"),
    (S.Tuple([S.Discrete(2), S.Text(3)]), "obs[1]"),
    (S.Dict({"ok": S.Box(0, 1, (2,)), "bad": S.Sequence(S.Discrete(2))}), "obs['bad']"),
    (S.Tuple([S.Dict({"g": S.Graph(S.Box(0, 1, (2,)), S.Discrete(2))})]), "obs[0]['g']"),
], ids=["text", "tuple-with-text", "dict-with-sequence", "nested-graph"])
def test_unsupported_observation_space_is_a_config_error_naming_env_id(space, where):
    """check_obs_space rejects spaces with no flat vector form, nested ones too: a ConfigError on env_id
    that says where in the observation the bad part is and lists what is supported."""
    with pytest.raises(gwt_ib.ConfigError) as e:
        gwt_ib.check_obs_space(space, "some-env-v0")
    assert e.value.name == "env_id"
    assert e.value.value == "some-env-v0"
    assert f"its {where} is" in e.value.allowed
    assert "unsupported observation space" in e.value.allowed and "Box" in e.value.allowed


def test_supported_observation_spaces_pass_the_check():
    """Box, Discrete, MultiDiscrete, MultiBinary and any Tuple/Dict nesting of them are accepted."""
    for space in (S.Box(0, 1, (2, 3)), S.Discrete(3, start=1), S.MultiDiscrete([[2, 3], [4, 5]]), S.MultiBinary(4),
                  S.Tuple([S.Discrete(2), S.Dict({"a": S.Box(0, 1, (1,)), "b": S.Tuple([S.MultiBinary(2)])})])):
        gwt_ib.check_obs_space(space, "some-env-v0")


def test_make_env_refuses_an_env_with_an_unsupported_observation_space():
    """make_env raises the ConfigError itself, before any env is wrapped or stepped."""
    with pytest.raises(gwt_ib.ConfigError) as e:
        gwt_ib.make_env(TEXT_ID)
    assert e.value.name == "env_id" and e.value.value == TEXT_ID and "Text" in str(e.value)


@pytest.mark.parametrize("space", [gymnasium.spaces.MultiBinary(3), gymnasium.spaces.Text(4),
                                   gymnasium.spaces.Box(0, 5, (2,), dtype=int),
                                   gymnasium.spaces.MultiDiscrete([[2, 3], [4, 5]]),
                                   gymnasium.spaces.Tuple([gymnasium.spaces.Discrete(2)])])
def test_unsupported_action_space_is_a_config_error(space):
    """action_spec accepts only Discrete, 1-D MultiDiscrete and float Box; anything else is a ConfigError."""
    with pytest.raises(gwt_ib.ConfigError):
        gwt_ib.action_spec(space)


def test_unsupported_env_fails_before_training(capsys, tmp_path):
    """An env with an unsupported observation space is refused by main() with exit 2 and no run directory."""
    rc = gwt_ib.main(["--env-id", TEXT_ID, "--out-dir", str(tmp_path / "runs"), "--progress", "false",
                      "--num-envs", "2", "--rollout-steps", "16", "--seq-len", "8", "--minibatches", "1",
                      "--total-timesteps", "32", "--eval-episodes", "1", "--hid-dim", "8", "--save-plot", "false"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and "unsupported observation space" in err
    assert not (tmp_path / "runs").exists()


def test_popgym_wrappers_refuse_an_env_that_is_not_popgyms(capsys, tmp_path):
    """POPGym's wrappers assert a POPGym env: any other id exits 2 with one line before anything is written."""
    assert gwt_ib.main(["--popgym-wrappers", "--env-id", "CartPole-v1", "--out-dir", str(tmp_path / "runs")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--popgym-wrappers True: needs a POPGym env; CartPole-v1 is not one" in line
    assert not (tmp_path / "runs").exists()


def test_the_popgym_preset_sets_popgyms_ppo_settings_and_flags_override_them():
    ns = gwt_ib.build_parser().parse_args(["--preset", "popgym", "--num-envs", "8"])
    cfg = gwt_ib.parse_overrides(ns, gwt_ib.Cfg(**gwt_ib.PRESETS[ns.preset]))
    assert (cfg.num_envs, cfg.rollout_steps * 64, cfg.epochs, cfg.lr, cfg.gae_lambda, cfg.clip_eps, cfg.vf_coef,
            cfg.ent_coef, cfg.popgym_wrappers) == (8, 65536, 30, 5e-5, 1.0, 0.3, 1.0, 0.0, True)
    full = gwt_ib.Cfg(**gwt_ib.PRESETS["popgym"])
    gwt_ib.validate(full)  # batch 65,536 in minibatches of 8,192
    assert full.num_envs * full.rollout_steps // full.minibatches == 8192

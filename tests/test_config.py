"""Typed configs: defaults <- YAML <- CLI flags; --help generated from field docs."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from dpolab.cli import COMMANDS, build_parser
from dpolab.config import SFTConfig, TrainConfig, add_arguments, resolve, save

REPO = Path(__file__).resolve().parents[1]


def parse(cls, argv):
    parser = argparse.ArgumentParser()
    add_arguments(parser, cls)
    return parser.parse_args(argv)


def test_yaml_then_flags_override(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(yaml.safe_dump({"beta": 0.3, "loss": "ipo", "lora": True, "batch_size": 2}))
    cfg = resolve(TrainConfig, parse(TrainConfig, ["--config", str(cfg_file), "--beta", "0.05", "--no-lora"]))
    assert (cfg.beta, cfg.loss, cfg.lora, cfg.batch_size) == (0.05, "ipo", False, 2)
    assert cfg.max_length == TrainConfig().max_length


def test_unknown_yaml_key_is_an_error(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("betaa: 0.1\n")
    with pytest.raises(ValueError, match=r"run.yaml: unknown option\(s\) betaa \(did you mean beta\?\)"):
        resolve(TrainConfig, parse(TrainConfig, ["--config", str(cfg_file)]))


def test_invalid_values_are_refused():
    with pytest.raises(ValueError, match="max_prompt_length"):
        resolve(TrainConfig, max_length=64, max_prompt_length=64)
    with pytest.raises(ValueError, match="scheduler"):
        resolve(TrainConfig, scheduler="exponential")


def test_resolved_config_round_trips(tmp_path):
    cfg = resolve(SFTConfig, lr=1e-4, lora=True)
    save(cfg, tmp_path / "config.yaml")
    again = resolve(SFTConfig, config=str(tmp_path / "config.yaml"))
    assert again == cfg


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_lists_every_option_with_default(command, capsys):
    cls = COMMANDS[command][0]
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(cls):
        flag = f.name.upper() if f.metadata.get("positional") else "--" + f.name.replace("_", "-")
        assert flag in text, f.name
        assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_every_shipped_yaml_config_parses():
    """Every YAML under examples/ that targets a dpolab command resolves (accelerate configs excluded)."""
    files = [p for p in (REPO / "examples").glob("*.yaml")]
    for path in files:
        data = yaml.safe_load(path.read_text())
        names = {f.name for cls in (c for c, _, _ in COMMANDS.values()) for f in dataclasses.fields(cls)}
        assert set(data) <= names, f"{path.name}: unknown keys {set(data) - names}"


def test_yaml_with_python_tags_is_refused(tmp_path):
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text("beta: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        resolve(TrainConfig, parse(TrainConfig, ["--config", str(cfg_file)]))
    assert not (tmp_path / "pwned").exists()


def test_positional_run_dirs_for_report():
    from dpolab.config import ReportConfig

    args = build_parser().parse_args(["report", "runs/a", "runs/b", "--title", "t"])
    cfg = resolve(ReportConfig, args)
    assert cfg.runs == "runs/a,runs/b" and cfg.title == "t"


def test_configs_built_in_python_are_validated_like_the_command_line():
    import pytest as _pytest

    from dpolab.config import SFTConfig, TrainConfig

    with _pytest.raises(ValueError, match="max_prompt_length must be < max_length"):
        TrainConfig(max_length=128, max_prompt_length=128)
    with _pytest.raises(ValueError, match="unknown loss 'dpo'"):
        TrainConfig(loss="dpo")
    with _pytest.raises(ValueError, match="keep_last must be >= 0"):
        SFTConfig(keep_last=-1)
    assert TrainConfig(max_length=128).max_prompt_length == 0  # 0 = half of max_length, resolved where used


def test_help_imports_no_torch():
    """Building the parser (every command's --help) needs config.py only: no torch, no command module."""
    import subprocess
    import sys

    code = ("import sys; from dpolab.cli import build_parser; build_parser(); "
            "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft', 'trl') "
            "or m in ('dpolab.train', 'dpolab.score', 'dpolab.evaluate', 'dpolab.models')); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_commands_are_registered_by_reference():
    for name, (cls, runner, help_text) in COMMANDS.items():
        assert dataclasses.is_dataclass(cls) and callable(runner) and help_text, name


def test_shared_fields_have_one_default_across_commands():
    """A field shared by commands through an option group has the group's default everywhere
    (max_length 512, bf16 auto), unless the command overrides it on purpose (listed here)."""
    from dpolab import config

    own = {("num_samples", "GenerateConfig"), ("num_samples", "ExperimentConfig"), ("num_samples", "SweepConfig"),
           ("num_samples", "LabelNoiseConfig"), ("max_new_tokens", "ExperimentConfig"), ("max_new_tokens", "SweepConfig"),
           ("max_new_tokens", "LabelNoiseConfig"), ("reward", "GenerateConfig"), ("reward", "ExperimentConfig"),
           ("reward", "SweepConfig"), ("reward", "LabelNoiseConfig"), ("beta", "RankConfig")}
    own |= {(f, c) for f in ("max_length", "max_prompt_length") for c in ("EvalConfig", "ScoreConfig", "RankConfig")}
    groups = [config.Runtime, config.ModelOptions, config.Lengths, config.Sampling, config.RewardSpec, config.PairColumns,
              config.Scoring, config.ImplicitReward]
    for name, (cls, _, _) in COMMANDS.items():
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for group in groups:
            for g in dataclasses.fields(group):
                if g.name in fields and (g.name, cls.__name__) not in own and issubclass(cls, group):
                    assert fields[g.name].default == g.default, (name, g.name)
    for cls in (config.TrainConfig, config.EvalConfig, config.ScoreConfig, config.RankConfig):
        f = {f.name: f.default for f in dataclasses.fields(cls)}
        # eval / score / rank: 0 = the run's own max_length (config.from_run), 512 (training's) for a bare model
        assert (f["max_length"], f["bf16"]) == (512 if cls is config.TrainConfig else 0, "auto"), cls.__name__
    assert config.GenerateConfig().bf16 == config.ExperimentConfig().bf16 == "auto"


@pytest.mark.parametrize("cls_name, values, message", [
    ("EvalConfig", {}, "nothing to evaluate"),
    ("EvalConfig", {"data": "p.jsonl", "ci": "exact"}, "ci must be wilson or bootstrap"),
    ("EvalConfig", {"prompts": "p.txt"}, "needs --reward"),
    ("EvalConfig", {"data": "p.jsonl", "top_p": 0}, "top_p must be in"),
    ("ScoreConfig", {}, "nothing to score"),
    ("RankConfig", {"models": "a", "data": "p.jsonl"}, "at least two models"),
    ("RankConfig", {"models": "a,b", "data": "p.jsonl", "prompts": "q.txt", "reward": "length"}, "not both"),
    ("ReportConfig", {}, "at least one run directory"),
    ("GenerateConfig", {"num_samples": 1}, "num_samples must be >= 2"),
    ("GenerateConfig", {"pair_strategy": "best"}, "pair_strategy must be one of"),
    ("GenerateConfig", {"temperature": -1.0}, "temperature must be >= 0"),
    ("GenerateConfig", {"flip_rate": 2.0}, "flip_rate must be in"),
    ("ExperimentConfig", {"bf16": "yes"}, "bf16 must be auto, true or false"),
    ("SweepConfig", {"baselines": "ppo"}, "unknown baseline"),
    ("LabelNoiseConfig", {"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_every_command_config_is_checked_at_construction(cls_name, values, message):
    from dpolab import config

    with pytest.raises(ValueError, match=message):
        getattr(config, cls_name)(**values)


def test_scoring_commands_resolve_a_zero_prompt_limit_to_half():
    from dpolab.config import EvalConfig, ScoreConfig

    assert ScoreConfig(data="x").max_prompt_length == 0  # max_length 0: the run's, decided by from_run
    assert ScoreConfig(data="x", max_length=512).max_prompt_length == 256
    assert EvalConfig(data="x", max_length=100).max_prompt_length == 50
    assert EvalConfig(data="x", max_length=100, max_prompt_length=10).max_prompt_length == 10


@pytest.mark.parametrize("given, recorded, expected", [
    ({}, {}, (0.1, 512, 256)),  # a model of no dpolab run
    ({}, {"beta": 0.3, "max_length": 100, "max_prompt_length": 30}, (0.3, 100, 30)),
    ({}, {"beta": 0.3, "max_length": 100, "max_prompt_length": 0}, (0.3, 100, 50)),  # the run's 0 = half
    ({"beta": 0.5, "max_length": 64}, {"beta": 0.3, "max_length": 100, "max_prompt_length": 30}, (0.5, 64, 32)),
    ({"max_prompt_length": 10}, {"max_length": 100, "max_prompt_length": 30}, (0.1, 100, 10)),
    ({}, {"beta": "x", "max_length": True}, (0.1, 512, 256)),  # not numbers: ignored
])
def test_scoring_settings_come_from_the_run_unless_given(given, recorded, expected):
    from dpolab.config import EvalConfig, from_run

    cfg = from_run(EvalConfig(data="x", **given), recorded)
    assert (cfg.beta, cfg.max_length, cfg.max_prompt_length) == expected


def test_a_given_prompt_limit_must_fit_the_runs_length():
    from dpolab.config import ScoreConfig, from_run

    with pytest.raises(ValueError, match="max_prompt_length must be < max_length"):
        from_run(ScoreConfig(data="x", max_prompt_length=200), {"max_length": 100})

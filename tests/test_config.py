"""Typed configs: defaults <- YAML <- CLI flags; --help generated from field docs."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest
import yaml

from dpolab.cli import available, build_parser
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


@pytest.mark.parametrize("command", sorted(available()))
def test_help_lists_every_option_with_default(command, capsys):
    cls = available()[command][0]
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
        names = {f.name for cls in (c for c, _, _ in available().values()) for f in dataclasses.fields(cls)}
        assert set(data) <= names, f"{path.name}: unknown keys {set(data) - names}"


def test_yaml_with_python_tags_is_refused(tmp_path):
    cfg_file = tmp_path / "evil.yaml"
    cfg_file.write_text("beta: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        resolve(TrainConfig, parse(TrainConfig, ["--config", str(cfg_file)]))
    assert not (tmp_path / "pwned").exists()


def test_positional_run_dirs_for_report():
    from dpolab.report import ReportConfig

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

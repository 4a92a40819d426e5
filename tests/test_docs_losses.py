"""README's loss table and docs/losses.md list exactly the registered losses."""

import re
from pathlib import Path

from dpolab.kto import NAME as KTO
from dpolab.listwise import NAME as LISTWISE
from dpolab.losses import LOSSES

# every --loss name: the pair losses of the registry plus KTO (unpaired data) and the
# Plackett-Luce loss (ranked lists), which have their own objectives
NAMES = set(LOSSES) | {KTO, LISTWISE}

ROOT = Path(__file__).resolve().parents[1]


def table_names(text: str) -> list[str]:
    """First-column names (`name`, optionally followed by a note) of the markdown table rows."""
    return [m.group(1) for m in re.finditer(r"^\| `([a-z_0-9]+)`", text, flags=re.M)]


def section(text: str, title: str) -> str:
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else len(text)]


def test_readme_loss_table_names_every_registered_loss_and_nothing_else():
    names = table_names(section((ROOT / "README.md").read_text(), "Losses"))
    assert len(names) == len(set(names)), "a loss is listed twice"
    assert set(names) == NAMES, (
        f"in README, not registered: {sorted(set(names) - NAMES)}; "
        f"registered, not in README: {sorted(NAMES - set(names))}")


def test_docs_loss_table_names_every_registered_loss_and_nothing_else():
    names = table_names(section((ROOT / "docs" / "losses.md").read_text(), "Losses (`--loss`)"))
    assert set(names) == NAMES and len(names) == len(NAMES)


def test_docs_option_table_names_every_loss_field_of_train_config():
    from dataclasses import fields

    from dpolab.config import TrainConfig

    options = (ROOT / "docs" / "losses.md").read_text()
    loss_fields = ["beta", "label_smoothing", "gamma", "alpha", "discopop_tau", "loss_weights", "f_divergence",
                   "f_alpha", "sft_weight", "sft_token_weighted", "ipo_average_logps", "sync_ref_every", "ref_mix_alpha",
                   "wpo", "ld_alpha", "desirable_weight", "undesirable_weight"]
    names = {f.name for f in fields(TrainConfig)}
    for name in loss_fields:
        assert name in names
        assert "--" + name.replace("_", "-") in options, name

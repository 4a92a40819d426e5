"""The shipped default model and real HH-RLHF data, end to end (slow: loads 135M weights)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import HH_PATH
from dpolab.models import ModelError, default_model_path, load_model, load_tokenizer, resolve_model_path, same_tokenizer


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model_path(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a model directory"):
        resolve_model_path(str(tmp_path / "empty"))


def test_same_tokenizer(tiny_model_dir):
    a = load_tokenizer(str(tiny_model_dir))
    b = load_tokenizer(str(tiny_model_dir))
    assert same_tokenizer(a, b)
    b.add_tokens(["brandnewtoken"])
    assert not same_tokenizer(a, b)


@pytest.mark.slow
def test_default_model_converts_once_to_safetensors():
    path = default_model_path()
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert default_model_path() == path  # second call reuses the cache
    tok = load_tokenizer("default")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = load_model("default")
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000


@pytest.mark.slow
def test_dpo_on_real_hh_rlhf_with_default_model(tmp_path):
    from dpolab.train import train

    out = tmp_path / "hh"
    result = train(data=str(HH_PATH), output_dir=str(out), max_steps=1, batch_size=2, eval_fraction=0.0, progress=False)
    first = result["history"][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-4)
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows_read"] == 2000
    assert report["kept"] + sum(report["dropped"].values()) == 2000
    assert report["format"] == "implicit"


def test_add_lora_emits_no_deprecation_warning(tiny_model_dir):
    """peft reads a deprecated transformers attribute while wrapping; a user should not see that."""
    import warnings

    from dpolab.models import add_lora

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = add_lora(load_model(str(tiny_model_dir)), 4, 8, 0.0, "all-linear")
    assert any(p.requires_grad for p in model.parameters())

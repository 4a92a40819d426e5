"""The shipped default model and real HH-RLHF data, end to end (slow: loads 135M weights)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import HH_PATH
from dpolab.models import (ModelError, default_model_path, load_model, load_tokenizer, own_weights, resolve_model_path,
                           same_tokenizer)


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


def _in_a_safetensors_mapping(tensor) -> bool:
    """Whether the tensor's memory lies in a memory-mapped .safetensors file (Linux /proc/self/maps)."""
    address = tensor.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].endswith(".safetensors"):
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= address < high:
                return True
    return False


def test_own_weights_copies_trainable_weights_out_of_the_file_mapping(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    # the premise: transformers maps the checkpoint file, so the loaded weights are its pages
    assert all(_in_a_safetensors_mapping(p) for p in model.parameters())
    model.model.norm.weight.requires_grad_(False)  # a frozen weight is only read: it stays mapped
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert own_weights(model) == trainable
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
        assert _in_a_safetensors_mapping(p) == (name == "model.norm.weight"), name
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied


@pytest.mark.slow
def test_default_model_converts_once_to_safetensors():
    path = default_model_path()
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert default_model_path() == path  # second call reuses the cache
    tok = load_tokenizer("default")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    model = load_model("default")
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000


def test_default_model_special_tokens_come_from_its_gguf():
    """The conversion sets them from the GGUF's metadata: transformers 5.17 read this file's
    end-of-sequence token as <|im_start|>, so chat turns would never end."""
    from dpolab.models import _gguf_location, gguf_special_tokens

    assert gguf_special_tokens(_gguf_location()) == {"bos_token": 1, "eos_token": 2, "pad_token": 2}
    tok = load_tokenizer("default")
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


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

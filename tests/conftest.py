"""Shared fixtures: a tiny randomly initialised Llama and a real (trained-here) tokenizer.

Integration tests train this model on CPU in seconds; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import os
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_PATH = SHARED_DATA / "hh-rlhf-harmless-2000.jsonl.gz"

WORDS = (
    "the a movie film was is great good bad awful terrible wonderful boring fun plot actor acting "
    "story i you it this that and but not very really loved hated liked enjoyed human assistant "
    "what how why can do help me please thanks yes no sure sorry one two three"
).split()

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """A small byte-level BPE with ChatML specials, trained here in milliseconds: real
    `tokenizers` machinery, exact decode round trip, vocab of a few hundred."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)]
    corpus += ["Human: what? Assistant: sure.", "user\nhello", "assistant\nok"]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(vocab_size: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + tokenizer checkpoint directory (safetensors)."""
    path = tmp_path_factory.mktemp("tiny-model")
    tokenizer = build_tokenizer()
    model = build_tiny_model(len(tokenizer))
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_toy_pairs(path: Path, n: int, seed: int = 0, fmt: str = "explicit") -> Path:
    """A learnable toy preference set: chosen completions praise, rejected ones complain."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "human : " + sentence(rng, rng.randint(2, 8)) + " ? assistant :"
        chosen = " " + " ".join(rng.choice(["great", "wonderful", "loved", "good", "fun"]) for _ in range(rng.randint(1, 5)))
        rejected = " " + " ".join(rng.choice(["awful", "terrible", "boring", "bad", "hated"]) for _ in range(rng.randint(1, 5)))
        if fmt == "explicit":
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"chosen": prompt + chosen, "rejected": prompt + rejected})
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture
def toy_data(tmp_path) -> Path:
    return write_toy_pairs(tmp_path / "toy.jsonl", 24)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never touch the user's cache, except for the converted default model, which is
    # read-only and expensive to rebuild (pointed to by DPOLAB_TEST_CACHE when set).
    monkeypatch.setenv("DPOLAB_CACHE", os.environ.get("DPOLAB_TEST_CACHE", str(tmp_path_factory.getbasetemp() / "cache")))
    torch.set_num_threads(min(2, torch.get_num_threads()))


def import_benchmark(name: str):
    """A script of benchmarks/ (a folder of scripts, not a package) imported as a module."""
    import importlib
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

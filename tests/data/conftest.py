"""Fixtures for the data tests: a real (tiny, offline) HF tokenizer and the shared HH-RLHF file."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-2000.jsonl.gz"

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "<s>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "Human: how do I bake bread? Assistant: Sure, mix flour, water, salt and yeast.",
    "Human: tell me a joke Assistant: Why did the chicken cross the road?",
    "I am sorry, I can not help with that. Is there anything else you need?",
]


def make_tokenizer(add_bos: bool = False, chat_template: str | None = CHATML):
    """A real ``PreTrainedTokenizerFast``: byte-level BPE (any text encodes), ChatML template.

    ``add_bos=True`` makes ``add_special_tokens=True`` prepend ``<s>`` (Llama-style); otherwise it
    adds nothing (GPT-2 / SmolLM2-style).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                           special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>",
                                   bos_token="<s>", chat_template=chat_template,
                                   name_or_path="tiny-bpe-bos" if add_bos else "tiny-bpe")


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer():
    return make_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def hh_file():
    if not HH_FILE.is_file():
        pytest.skip(f"shared data not found: {HH_FILE}")
    return HH_FILE

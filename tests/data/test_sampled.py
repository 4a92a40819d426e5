"""Sampled token ids carried in generated rows: used as they are with the same tokenizer, text otherwise."""

import json

import pytest

from dpolab.data.files import DataError
from dpolab.data.sampled import NOTE_OTHER_TOKENIZER, NOTE_SAMPLER_CUT, fingerprint, row_fields
from dpolab.data.tokenize import load_pairs

from tests.conftest import build_tokenizer

from .conftest import make_tokenizer


def split_spelling(tok, word: str) -> list[int]:
    """`word` spelled one byte-level token per character: ids the tokenizer never produces for it."""
    return [tok.convert_tokens_to_ids(ch) for ch in word]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sampled_ids_that_do_not_round_trip_are_trained_on_as_sampled(tokenizer, tmp_path):
    eos = tokenizer.eos_token_id
    cut = split_spelling(tokenizer, "the")       # sampled t, h, e then cut at max_new_tokens
    whole = split_spelling(tokenizer, "fox") + [eos]  # sampled f, o, x then the stop token
    # decode -> encode does NOT give these ids back: the text route would train on other tokens
    assert tokenizer("the", add_special_tokens=False)["input_ids"] != cut
    assert tokenizer("fox", add_special_tokens=False)["input_ids"] + [eos] != whole
    prompt = tokenizer("the quick brown", add_special_tokens=True)["input_ids"]
    row = {"prompt": "the quick brown", "chosen": "the", "rejected": "fox", "chosen_truncated": True,
           "rejected_truncated": False, **row_fields(prompt, cut, whole, fingerprint(tokenizer))}
    pairs, report = load_pairs(write(tmp_path / "g.jsonl", [row]), tokenizer, max_length=64, max_prompt_length=32)
    assert (pairs[0].prompt_ids, pairs[0].chosen_ids, pairs[0].rejected_ids) == (prompt, cut, whole)
    assert eos not in pairs[0].chosen_ids  # the cut one gets no EOS
    assert report.notes == {NOTE_SAMPLER_CUT: 1}


def test_other_tokenizer_falls_back_to_text_and_is_counted(tokenizer, tmp_path):
    other = build_tokenizer()  # trained on another corpus: another id -> token table
    assert fingerprint(other)["vocab_sha256"] != fingerprint(tokenizer)["vocab_sha256"]
    row = {"prompt": "the quick", "chosen": "the", "rejected": "fox", "chosen_truncated": True,
           **row_fields([1, 2], split_spelling(other, "the"), split_spelling(other, "fox"), fingerprint(other))}
    pairs, report = load_pairs(write(tmp_path / "g.jsonl", [row, row]), tokenizer, max_length=64, max_prompt_length=32)
    assert pairs[0].chosen_ids == tokenizer("the", add_special_tokens=False)["input_ids"]  # text, cut: no EOS
    assert pairs[0].rejected_ids[-1] == tokenizer.eos_token_id                           # text, whole: EOS added
    assert report.notes == {NOTE_OTHER_TOKENIZER: 2, NOTE_SAMPLER_CUT: 2}


def test_fingerprint_ignores_the_path_but_not_the_vocabulary(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "copy")
    from transformers import AutoTokenizer

    copy = AutoTokenizer.from_pretrained(tmp_path / "copy")
    a, b = fingerprint(tokenizer), fingerprint(copy)
    assert (a["vocab_size"], a["vocab_sha256"]) == (b["vocab_size"], b["vocab_sha256"]) and a["name"] != b["name"]
    # a BOS-adding post-processor changes how text is split, not what the ids mean
    assert fingerprint(make_tokenizer(add_bos=True))["vocab_sha256"] == a["vocab_sha256"]


@pytest.mark.parametrize("change, field", [({"chosen_ids": None}, "chosen_ids"), ({"rejected_ids": [1, "x"]}, "rejected_ids"),
                                           ({"sampled_with": "tiny"}, "sampled_with")])
def test_broken_sampled_fields_are_one_line_errors(tokenizer, tmp_path, change, field):
    row = {"prompt": "a", "chosen": "b", "rejected": "c", **row_fields([1], [2], [3], fingerprint(tokenizer)), **change}
    with pytest.raises(DataError, match=rf"g.jsonl: row 1: field '{field}'"):
        load_pairs(write(tmp_path / "g.jsonl", [row]), tokenizer, max_length=64, max_prompt_length=32)

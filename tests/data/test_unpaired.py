"""Unpaired (KTO) rows: detection, drops with reasons, one-line errors, tokenisation."""

import json

import pytest

from dpolab.data.files import DataError, read_rows
from dpolab.data.formats import normalise
from dpolab.data.unpaired import load_unpaired, normalise_unpaired
from tests.conftest import build_tokenizer


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_rows_are_kept_or_dropped_with_reasons(tmp_path):
    f = write(tmp_path / "u.jsonl", [
        {"prompt": "p1", "completion": " good", "label": True},
        {"prompt": "p2", "completion": " bad", "label": False},
        {"prompt": "p3", "completion": None, "label": True},
        {"prompt": "  ", "completion": " x", "label": False},
        {"prompt": "p5", "completion": "   ", "label": True},
        {"prompt": "p6", "completion": " y"},
    ])
    examples, report = normalise_unpaired(read_rows(str(f)), str(f))
    assert [(e.row, e.label) for e in examples] == [(1, True), (2, False)]
    assert report.format == "unpaired"
    assert report.dropped == {"missing field": 2, "empty prompt": 1, "empty completion": 1}
    assert report.rows_read == report.kept + sum(report.dropped.values()) == 6


@pytest.mark.parametrize("bad,field", [
    ({"prompt": "p", "completion": " c", "label": 1}, "label"),
    ({"prompt": "p", "completion": " c", "label": "true"}, "label"),
    ({"prompt": "p", "completion": 7, "label": True}, "completion"),
])
def test_wrong_types_are_one_line_errors(tmp_path, bad, field):
    f = write(tmp_path / "u.jsonl", [{"prompt": "p", "completion": " c", "label": True}, bad])
    with pytest.raises(DataError, match=rf"u.jsonl: row 2: field '{field}'"):
        normalise_unpaired(read_rows(str(f)), str(f))


def test_pair_loader_names_kto_for_unpaired_rows(tmp_path):
    f = write(tmp_path / "u.jsonl", [{"prompt": "p", "completion": " c", "label": True}])
    with pytest.raises(DataError, match="--loss kto"):
        normalise(read_rows(str(f)), str(f))


def test_conversational_unpaired_rows_render_with_the_template(tmp_path):
    tok = build_tokenizer()
    if not getattr(tok, "chat_template", None):
        pytest.skip("test tokenizer has no chat template")
    f = write(tmp_path / "u.jsonl", [
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "good"}], "label": True},
        {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "user", "content": "x"}], "label": False},
    ])
    examples, report = load_unpaired(str(f), tok, max_length=64, max_prompt_length=32)
    assert report.format == "unpaired-conversational" and report.dropped == {"bad messages": 1}
    assert len(examples) == 1 and examples[0].completion_ids


def test_text_completions_get_eos_and_pairs_are_split(tmp_path):
    tok = build_tokenizer()
    f = write(tmp_path / "u.jsonl", [{"prompt": "human : hi ? assistant :", "completion": " great fun", "label": False}])
    (ex,), report = load_unpaired(str(f), tok, max_length=64, max_prompt_length=32)
    assert ex.completion_ids[-1] == tok.eos_token_id and ex.label is False and report.kept == 1
    pairs = write(tmp_path / "p.jsonl", [{"prompt": "human : hi ? assistant :", "chosen": " good", "rejected": " bad"}])
    split, _ = load_unpaired(str(pairs), tok, max_length=64, max_prompt_length=32)
    assert [e.label for e in split] == [True, False] and split[0].prompt_ids == split[1].prompt_ids


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("max_length, max_prompt_length", [(256, 128), (10, 6)])
def test_an_unpaired_row_gets_the_ids_of_a_pairs_chosen_side(tmp_path, add_bos, max_length, max_prompt_length):
    """One prompt encoding (data/tokenize.py): a completion tokenises and truncates as the chosen
    side of a pair does (BOS rule, EOS, TRL's truncation), text and conversational alike."""
    from dpolab.data.tokenize import load_pairs
    from tests.conftest import write_toy_pairs
    from tests.data.conftest import make_tokenizer

    tok = make_tokenizer(add_bos=add_bos)
    pairs = [json.loads(x) for x in write_toy_pairs(tmp_path / "p.jsonl", 30, seed=3).read_text().splitlines()]
    rows = [{"prompt": p["prompt"], "chosen": p["chosen"] + " and more", "rejected": " ok"} for p in pairs]
    rows += [{"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
              "rejected": [{"role": "assistant", "content": "ok"}]} for r in rows[:10]]
    for r in rows:  # the text rows and the conversational ones each in a file of their own format
        r["kind"] = "text" if isinstance(r["prompt"], str) else "chat"
    for kind in ("text", "chat"):
        mine = [r for r in rows if r["kind"] == kind]
        pair_file = write(tmp_path / f"{kind}-pairs.jsonl", [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in mine])
        unpaired_file = write(tmp_path / f"{kind}-u.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"], "label": True}
                                                              for r in mine])
        kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
        expected = {p.row: (p.prompt_ids, p.chosen_ids) for p in load_pairs(str(pair_file), tok, **kw)[0]}
        unpaired, report = load_unpaired(str(unpaired_file), tok, **kw)
        got = {u.row: (u.prompt_ids, u.completion_ids) for u in unpaired}
        assert len(expected) == len(mine) and got == expected
        assert (report.truncated > 0) == (max_length < 100)  # the short limit really cuts

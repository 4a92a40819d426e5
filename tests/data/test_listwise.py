"""Listwise rows: both layouts, drops with reasons, one-line errors, tokenisation."""

import json

import pytest

from dpolab.data.files import DataError, read_rows
from dpolab.data.formats import normalise
from dpolab.data.listwise import load_listwise, normalise_listwise
from tests.conftest import build_tokenizer


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_responses_ranking_rows_are_sorted_best_first_or_dropped(tmp_path):
    f = write(tmp_path / "r.jsonl", [
        {"prompt": "p", "responses": [" b", " a", " c"], "ranking": [2, 1, 3]},
        {"prompt": "p", "responses": [" a", " b"], "ranking": [1, 1]},
        {"prompt": "p", "responses": [" a"], "ranking": [1]},
        {"prompt": "p", "responses": [" a", " a"], "ranking": [1, 2]},
        {"prompt": "p", "responses": [" a", "  "], "ranking": [1, 2]},
        {"prompt": "p", "responses": None, "ranking": [1, 2]},
    ])
    examples, report = normalise_listwise(read_rows(str(f)), str(f))
    assert [(e.responses, e.ranked) for e in examples] == [([" a", " b", " c"], 2)]
    assert report.dropped == {"bad ranking": 1, "too few responses": 1, "duplicate responses": 1,
                              "empty completion": 1, "missing field": 1}
    assert report.rows_read == report.kept + sum(report.dropped.values())


def test_chosen_with_rejected_list_is_a_top1_ranking(tmp_path):
    f = write(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": " good", "rejected": [" bad", " worse"]}])
    (ex,), report = normalise_listwise(read_rows(str(f)), str(f))
    assert ex.responses == [" good", " bad", " worse"] and ex.ranked == 1
    assert report.format == "listwise (chosen-rejected-list)"


@pytest.mark.parametrize("bad,field", [
    ({"prompt": "p", "responses": [" a", 3], "ranking": [1, 2]}, "responses"),
    ({"prompt": "p", "responses": [" a", " b"], "ranking": ["1", "2"]}, "ranking"),
    ({"prompt": 5, "responses": [" a", " b"], "ranking": [1, 2]}, "prompt"),
])
def test_wrong_types_are_one_line_errors(tmp_path, bad, field):
    f = write(tmp_path / "r.jsonl", [{"prompt": "p", "responses": [" a", " b"], "ranking": [1, 2]}, bad])
    with pytest.raises(DataError, match=rf"r.jsonl: row 2: field '{field}'"):
        normalise_listwise(read_rows(str(f)), str(f))


def test_pair_loader_names_the_listwise_loss(tmp_path):
    f = write(tmp_path / "c.jsonl", [{"prompt": "p", "chosen": " good", "rejected": [" bad", " worse"]}])
    with pytest.raises(DataError, match="field 'rejected'.*--loss plackett_luce"):
        normalise(read_rows(str(f)), str(f))


def test_tokenised_lists_share_one_prompt_and_pairs_become_lists_of_two(tmp_path):
    tok = build_tokenizer()
    f = write(tmp_path / "r.jsonl", [{"prompt": "human : hi ? assistant :", "responses": [" fun", " great fun good"],
                                      "ranking": [2, 1]}])
    (lst,), report = load_listwise(str(f), tok, max_length=64, max_prompt_length=32)
    assert len(lst.response_ids) == 2 and all(r[-1] == tok.eos_token_id for r in lst.response_ids)
    assert tok.decode(lst.response_ids[0][:-1]).strip() == "great fun good"
    pairs = write(tmp_path / "p.jsonl", [{"prompt": "human : hi ? assistant :", "chosen": " good", "rejected": " bad"}])
    (two,), _ = load_listwise(str(pairs), tok, max_length=64, max_prompt_length=32)
    assert len(two.response_ids) == 2 and two.ranked == 1

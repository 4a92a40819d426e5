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


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("max_length, max_prompt_length", [(256, 128), (10, 6)])
def test_a_list_of_two_gets_the_ids_of_a_pair(tmp_path, add_bos, max_length, max_prompt_length):
    """One prompt encoding (data/tokenize.py): a ranked list [a, b] tokenises and truncates as the
    pair (chosen a, rejected b) does (BOS rule, EOS, TRL's truncation on the longest response)."""
    from dpolab.data.tokenize import load_pairs
    from tests.conftest import write_toy_pairs
    from tests.data.conftest import make_tokenizer

    tok = make_tokenizer(add_bos=add_bos)
    pair_file = write_toy_pairs(tmp_path / "p.jsonl", 30, seed=4)
    pairs = [json.loads(x) for x in pair_file.read_text().splitlines()]
    lists = write(tmp_path / "l.jsonl", [{"prompt": p["prompt"], "responses": [p["rejected"], p["chosen"]], "ranking": [2, 1]}
                                         for p in pairs])
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length)
    expected = {p.row: (p.prompt_ids, [p.chosen_ids, p.rejected_ids]) for p in load_pairs(str(pair_file), tok, **kw)[0]}
    got, report = load_listwise(str(lists), tok, **kw)
    got = {t.row: (t.prompt_ids, t.response_ids) for t in got}
    assert len(expected) >= 25 and {r: got[r] for r in expected} == expected
    assert (report.truncated > 0) == (max_length < 100)

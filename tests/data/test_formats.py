"""normalise: format detection, every format, drop reasons, type errors, the report, the real HH file."""

import gzip
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.data.files import DataError, read_rows
from dpolab.data.formats import ASSISTANT_MARKER, DataReport, PreferenceExample, normalise


def rows(*dicts):
    return list(enumerate(dicts, start=1))


def msg(role, content):
    return {"role": role, "content": content}


def one_line(excinfo, *parts):
    text = str(excinfo.value)
    assert "\n" not in text
    for p in parts:
        assert p in text, text


def check_invariant(report: DataReport):
    assert report.rows_read == report.kept + sum(report.dropped.values())


# ---------------------------------------------------------------- formats

def test_explicit():
    ex, rep = normalise(rows({"prompt": "Q?", "chosen": " yes", "rejected": " no"}), "d.jsonl")
    assert rep.format == "explicit"
    assert ex == [PreferenceExample(1, "Q?", " yes", " no")]
    assert (rep.rows_read, rep.kept) == (1, 1)


def test_implicit_multi_turn_keeps_all_turns_and_leading_space():
    head = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: a joke?\n\nAssistant:"
    ex, rep = normalise(rows({"chosen": head + " Sure, here is one.", "rejected": head + " No."}), "d.jsonl")
    assert rep.format == "implicit"
    assert ex[0].prompt == head  # every earlier turn, up to and including the last marker
    assert (ex[0].chosen, ex[0].rejected) == (" Sure, here is one.", " No.")


def test_conversational_multi_turn():
    prompt = [msg("system", "be kind"), msg("user", "hi"), msg("assistant", "hello"), msg("user", "joke?")]
    ex, rep = normalise(rows({"prompt": prompt, "chosen": [msg("assistant", "ha")],
                              "rejected": [msg("assistant", "no")]}), "d.jsonl")
    assert rep.format == "conversational"
    assert ex[0].prompt == prompt and ex[0].chosen == [msg("assistant", "ha")]


def test_conversational_implicit():
    shared = [msg("user", "hi"), msg("assistant", "hello"), msg("user", "joke?")]
    ex, rep = normalise(rows({"chosen": shared + [msg("assistant", "ha")],
                              "rejected": shared + [msg("assistant", "no")]}), "d.jsonl")
    assert rep.format == "conversational-implicit"
    assert ex[0].prompt == shared
    assert (ex[0].chosen, ex[0].rejected) == ([msg("assistant", "ha")], [msg("assistant", "no")])


def test_text_prompt_beside_message_lists_is_ignored():
    # The HuggingFaceH4/ultrafeedback_binarized layout: prompt string + full conversations.
    row = {"prompt": "hi", "chosen": [msg("user", "hi"), msg("assistant", "a")],
           "rejected": [msg("user", "hi"), msg("assistant", "b")]}
    ex, rep = normalise(rows(row), "d.jsonl")
    assert rep.format == "conversational-implicit" and ex[0].prompt == [msg("user", "hi")]


def test_null_valued_message_keys_are_dropped():
    # Parquet / datasets fill keys that other messages have with None.
    row = {"chosen": [{"role": "user", "content": "q", "name": None}, msg("assistant", "a")],
           "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b", "name": None}]}
    ex, _ = normalise(rows(row), "d.jsonl")
    assert ex[0].prompt == [msg("user", "q")] and ex[0].rejected == [msg("assistant", "b")]


def test_column_overrides():
    data = rows({"question": "Q", "good": " a", "bad": " b"})
    ex, rep = normalise(data, "d.csv", prompt_column="question", chosen_column="good", rejected_column="bad")
    assert rep.format == "explicit" and ex[0] == PreferenceExample(1, "Q", " a", " b")
    head = "\n\nHuman: q\n\nAssistant:"
    ex, rep = normalise(rows({"win": head + " a", "lose": head + " b"}), "d", chosen_column="win",
                        rejected_column="lose")
    assert rep.format == "implicit" and ex[0].prompt == head


# ---------------------------------------------------------------- drops

HEAD = "\n\nHuman: q\n\nAssistant:"


@pytest.mark.parametrize("first, bad, reason", [
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}, "missing field"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": None, "rejected": "b"}, "missing field"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "  ", "chosen": "a", "rejected": "b"}, "empty prompt"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": " \n", "rejected": "b"}, "empty completion"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "a"}, "chosen == rejected"),
    ({"chosen": HEAD + " a", "rejected": HEAD + " b"}, {"chosen": HEAD + " a", "rejected": "\n\nHuman: x\n\nAssistant: b"}, "prefix mismatch"),
    # The rejected completion would contain another turn: its last marker is later than chosen's.
    ({"chosen": HEAD + " a", "rejected": HEAD + " b"}, {"chosen": HEAD + " a", "rejected": HEAD + " b" + HEAD + " c"}, "prefix mismatch"),
    ({"chosen": HEAD + " a", "rejected": HEAD + " b"}, {"chosen": "no marker", "rejected": "at all"}, "prefix mismatch"),
    ({"chosen": HEAD + " a", "rejected": HEAD + " b"}, {"chosen": HEAD + " ", "rejected": HEAD + " b"}, "empty completion"),
    ({"chosen": HEAD + " a", "rejected": HEAD + " b"}, {"chosen": HEAD + " a", "rejected": HEAD + " a"}, "chosen == rejected"),
])
def test_text_drop_reasons(first, bad, reason):
    ex, rep = normalise(rows(first, bad), "d.jsonl")
    assert rep.dropped == {reason: 1} and rep.dropped_rows == {reason: [2]}
    assert len(ex) == 1 and rep.kept == 1
    check_invariant(rep)


U, A, B = msg("user", "q"), msg("assistant", "a"), msg("assistant", "b")
CONV = {"prompt": [U], "chosen": [A], "rejected": [B]}
CONV_I = {"chosen": [U, A], "rejected": [U, B]}


@pytest.mark.parametrize("first, bad, reason", [
    (CONV, {"prompt": [{"role": "user"}], "chosen": [A], "rejected": [B]}, "bad messages"),
    (CONV, {"prompt": [msg("wizard", "q")], "chosen": [A], "rejected": [B]}, "bad messages"),
    (CONV, {"prompt": ["q"], "chosen": [A], "rejected": [B]}, "bad messages"),
    (CONV, {"prompt": [{"role": "user", "content": 5}], "chosen": [A], "rejected": [B]}, "bad messages"),
    (CONV, {"prompt": [U], "chosen": [msg("user", "a")], "rejected": [B]}, "bad messages"),
    (CONV, {"prompt": [], "chosen": [A], "rejected": [B]}, "empty prompt"),
    (CONV, {"prompt": [U], "chosen": [], "rejected": [B]}, "empty completion"),
    (CONV, {"prompt": [U], "chosen": [msg("assistant", " ")], "rejected": [B]}, "empty completion"),
    (CONV, {"prompt": [U], "chosen": [A], "rejected": [A]}, "chosen == rejected"),
    (CONV, {"prompt": None, "chosen": [A], "rejected": [B]}, "missing field"),
    (CONV_I, {"chosen": [U, A], "rejected": [msg("user", "other"), B]}, "prefix mismatch"),
    (CONV_I, {"chosen": [U, A], "rejected": [U, B, U]}, "prefix mismatch"),
    (CONV_I, {"chosen": [A], "rejected": [B]}, "empty prompt"),
    (CONV_I, {"chosen": [U, A], "rejected": [U, A]}, "chosen == rejected"),
    (CONV_I, {"chosen": [U, A], "rejected": [U, {"role": "assistant"}]}, "bad messages"),
    (CONV_I, {"chosen": [U, A], "rejected": []}, "empty completion"),
])
def test_message_drop_reasons(first, bad, reason):
    ex, rep = normalise(rows(first, bad), "d.jsonl")
    assert rep.dropped == {reason: 1}, rep.dropped
    assert len(ex) == 1
    check_invariant(rep)


def test_dropped_rows_listed_up_to_20():
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    ex, rep = normalise(rows(good, *[{"prompt": "p", "chosen": "a"}] * 30), "d")
    assert rep.dropped == {"missing field": 30} and rep.dropped_rows["missing field"] == list(range(2, 22))
    check_invariant(rep)


# ---------------------------------------------------------------- errors

def test_wrong_type_in_later_row_is_error():
    data = rows({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": 7, "rejected": "b"})
    with pytest.raises(DataError) as e:
        normalise(data, "data.jsonl")
    one_line(e, "data.jsonl: row 2: field 'chosen'", "expected a string", "got int")


def test_wrong_type_beats_missing_field():
    # A wrong type is an error even if another field of the row is missing.
    data = rows({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": {"x": 1}, "chosen": "a"})
    with pytest.raises(DataError) as e:
        normalise(data, "d.jsonl")
    one_line(e, "row 2", "field 'prompt'", "got dict")


@pytest.mark.parametrize("first, parts", [
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, ["row 1", "field 'chosen'", "string or a list of messages", "got int"]),
    ({"prompt": {"a": 1}, "chosen": "a", "rejected": "b"}, ["row 1", "field 'prompt'", "got dict"]),
    ({"prompt": [U], "chosen": "a", "rejected": "b"}, ["row 1", "field 'prompt'", "got list"]),
    ({"prompt": 5, "chosen": [A], "rejected": [B]}, ["row 1", "field 'prompt'", "got int"]),
    ({"chosen": [U, A], "rejected": "b"}, ["row 1", "field 'rejected'", "list of messages", "got string"]),
])
def test_first_row_matching_no_format(first, parts):
    with pytest.raises(DataError) as e:
        normalise(rows(first), "d.jsonl")
    one_line(e, "d.jsonl", *parts)


def test_missing_columns_name_existing_columns_and_overrides():
    with pytest.raises(DataError) as e:
        normalise(rows({"question": "q", "good": "a", "bad": "b"}), "d.csv")
    one_line(e, "d.csv: row 1", "'chosen'", "'rejected'", "'question', 'good', 'bad'",
             "--prompt-column", "--chosen-column", "--rejected-column")
    with pytest.raises(DataError) as e:  # an overridden prompt column must exist
        normalise(rows({"chosen": "a", "rejected": "b"}), "d.csv", prompt_column="question")
    one_line(e, "'question'")


def test_no_rows_is_error():
    with pytest.raises(DataError) as e:
        normalise([], "empty.jsonl")
    one_line(e, "empty.jsonl", "no rows")


# ---------------------------------------------------------------- report

def test_report_to_dict_and_atomic_write(tmp_path):
    _, rep = normalise(rows({"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p"}), "d")
    out = tmp_path / "sub" / "report.json"
    rep.write(out)
    assert json.loads(out.read_text()) == rep.to_dict()
    assert DataReport.from_dict(rep.to_dict()) == rep
    assert [p.name for p in out.parent.iterdir()] == ["report.json"]  # no temp file left behind


text = st.one_of(st.none(), st.sampled_from(["", " ", "a", "b", HEAD + " a", HEAD + " b", "x" + HEAD + " a"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.fixed_dictionaries({"chosen": text, "rejected": text}), min_size=1, max_size=8))
def test_every_row_is_accounted_for(dicts):
    dicts = [{"chosen": HEAD + " a", "rejected": HEAD + " b"}] + dicts  # a valid first row fixes the format
    ex, rep = normalise(rows(*dicts), "d")
    check_invariant(rep)
    assert rep.rows_read == len(dicts) and rep.kept == len(ex)
    assert all(e.prompt.endswith(ASSISTANT_MARKER) for e in ex)


# ---------------------------------------------------------------- the real HH-RLHF file

def test_hh_rlhf_file(hh_file):
    ex, rep = normalise(read_rows(str(hh_file)), str(hh_file))
    assert rep.format == "implicit"
    assert rep.rows_read == 2000 == rep.kept + sum(rep.dropped.values())
    assert rep.dropped == {"prefix mismatch": 4, "empty completion": 4}
    assert rep.dropped_rows["prefix mismatch"] == [1255, 1689, 1951, 1953]
    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    for e in ex[::50]:  # prompt + completion gives back the transcript, leading space included
        assert e.prompt + e.chosen == raw[e.row - 1]["chosen"]
        assert e.prompt + e.rejected == raw[e.row - 1]["rejected"]
        assert e.prompt.endswith(ASSISTANT_MARKER) and e.chosen.startswith(" ")

"""Property tests: random malformed preference files through `load_pairs` (read_rows -> normalise ->
tokenize, real tokenizer) end either in a dataset whose report is exactly what the generated rows
call for, or in ONE `DataError` line naming the file and the first bad row; never another exception.

Every generated row carries its expected fate, decided when it is built (not recomputed from the
code under test): kept, dropped for a named reason, or an error. Container faults (truncated or
invalid JSON, invalid UTF-8, unpaired surrogate escapes, absurd nesting or numbers, broken CSV
quoting, wrong cell counts) make their row an error; blank lines shift row numbers.
Kept completions start with different letters ("A..." / "B..."), and max_length leaves at least
48 tokens for them, so no pair can become identical by truncation.
"""

from __future__ import annotations

import collections
import csv
import functools
import io
import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpolab.data import DataError, load_pairs
from dpolab.data.formats import ASSISTANT_MARKER, MAX_ROWS_LISTED
from tests.conftest import build_tokenizer

MAX_LENGTH, MAX_PROMPT = 64, 16
KEEP, ERROR = ("keep",), ("error",)
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@functools.lru_cache(maxsize=1)
def tokenizer():
    return build_tokenizer()


def drop(reason: str) -> tuple:
    return ("drop", reason)


# ----------------------------------------------------------------------------- text
# '@' is kept out of generated text: it marks where container faults are spliced in.
CHARS = st.characters(blacklist_categories=("Cs",), blacklist_characters="@")
SMALL = st.text(CHARS, max_size=12).filter(lambda t: ASSISTANT_MARKER not in t)
HUGE = st.builds(lambda s, k: (s * k)[:12_000], st.text(st.characters(blacklist_characters="@", blacklist_categories=("Cs",)),
                                                         min_size=1, max_size=4), st.integers(300, 4000))
TEXT = st.one_of(*[SMALL] * 9, HUGE.filter(lambda t: ASSISTANT_MARKER not in t))
BLANK = st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x1f\x85\xa0\u1680\u2003\u2028\u3000"), max_size=5)
NONBLANK = st.builds(lambda c, t: c + t, st.sampled_from("QWXYZ?"), TEXT)
WRONG_SCALAR = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True), st.booleans(),
                         st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
WRONG_FOR_TEXT = st.one_of(WRONG_SCALAR, st.lists(st.integers(), max_size=2))
WRONG_FOR_MESSAGES = st.one_of(WRONG_SCALAR, SMALL)
JSONISH = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), SMALL,
                    st.lists(st.integers(), max_size=3))
EXTRA = st.dictionaries(st.text(CHARS, max_size=8).filter(lambda k: k not in ("prompt", "chosen", "rejected")),
                        JSONISH, max_size=2)


def _with_extra(row_outcome, extra):
    row, outcome = row_outcome
    return {**extra, **row}, outcome


def _missing(row_outcome, field, how):
    """The row with `field` left out or null: dropped as a missing field."""
    row = dict(row_outcome[0])
    if how == "absent":
        del row[field]
    else:
        row[field] = None
    return row, drop("missing field")


def _wrong(row_outcome, field, value):
    return {**row_outcome[0], field: value}, ERROR


# ----------------------------------------------------------------------------- explicit
EXPLICIT_KEEP = st.builds(lambda p, c, r: ({"prompt": p, "chosen": "A" + c, "rejected": "B" + r}, KEEP),
                          NONBLANK, TEXT, TEXT)


def explicit_rows():
    k = EXPLICIT_KEEP
    fields = st.sampled_from(["prompt", "chosen", "rejected"])
    return st.one_of(
        k, k, k,
        st.builds(_with_extra, k, EXTRA),
        st.builds(_missing, k, fields, st.sampled_from(["absent", "null"])),
        st.builds(lambda r, b: ({**r[0], "prompt": b}, drop("empty prompt")), k, BLANK),
        st.builds(lambda r, f, b: ({**r[0], f: b}, drop("empty completion")), k, st.sampled_from(["chosen", "rejected"]), BLANK),
        st.builds(lambda r: ({**r[0], "rejected": r[0]["chosen"]}, drop("chosen == rejected")), k),
        st.builds(_wrong, k, fields, WRONG_FOR_TEXT),
    )


# ----------------------------------------------------------------------------- implicit (HH)
HUMAN = st.lists(st.tuples(SMALL, SMALL), min_size=1, max_size=3).map(
    lambda turns: ASSISTANT_MARKER.join(f"\n\nHuman: {h}" + (f" {a}" if i < len(turns) - 1 else "")
                                        for i, (h, a) in enumerate(turns)))


def _hh(human, c, r, human_rejected=None):
    rejected_prefix = human if human_rejected is None else human_rejected
    return {"chosen": human + ASSISTANT_MARKER + c, "rejected": rejected_prefix + ASSISTANT_MARKER + r}


IMPLICIT_KEEP = st.builds(lambda h, c, r: (_hh(h, " A" + c, " B" + r), KEEP), HUMAN, TEXT, TEXT)


def implicit_rows():
    k = IMPLICIT_KEEP
    fields = st.sampled_from(["chosen", "rejected"])
    return st.one_of(
        k, k, k,
        st.builds(_with_extra, k, EXTRA),
        st.builds(_missing, k, fields, st.sampled_from(["absent", "null"])),
        st.builds(lambda h, c, r: (_hh(h, " A" + c, " B" + r, h + "?"), drop("prefix mismatch")), HUMAN, TEXT, TEXT),
        st.builds(lambda r, f: ({**r[0], f: r[0][f].replace(ASSISTANT_MARKER, "\n\nAI:")}, drop("prefix mismatch")), k, fields),
        st.builds(lambda h, b, r: (_hh(h, b, " B" + r), drop("empty completion")), HUMAN, BLANK, TEXT),
        st.builds(lambda h, c: (_hh(h, " A" + c, " A" + c), drop("chosen == rejected")), HUMAN, TEXT),
        st.builds(_wrong, k, fields, st.one_of(WRONG_FOR_TEXT, st.just([{"role": "user", "content": "hi"}]))),
    )


# ----------------------------------------------------------------------------- conversational
ROLE = st.sampled_from(["system", "user", "assistant", "tool"])
MESSAGE = st.builds(lambda role, content, extra: {"role": role, "content": content, **extra}, ROLE, st.one_of(TEXT, BLANK),
                    st.sampled_from([{}, {"name": "bob"}, {"tool_calls": None}]))
PROMPT = st.lists(MESSAGE, min_size=1, max_size=3)
BAD_MESSAGE = st.one_of(
    st.builds(lambda c: {"content": c}, SMALL),                                  # no role
    st.builds(lambda r, c: {"role": r, "content": c}, st.sampled_from(["robot", "User", "", "bot"]), SMALL),  # unknown role
    st.builds(lambda r, c: {"role": r, "content": c}, st.one_of(st.none(), st.integers(), st.lists(ROLE, max_size=2),
                                                               st.dictionaries(ROLE, ROLE, max_size=1)), SMALL),
    st.builds(lambda r, c: {"role": r, "content": c}, ROLE, st.one_of(st.none(), st.integers(), st.lists(SMALL, max_size=2))),
    st.one_of(SMALL, st.integers(), st.lists(SMALL, max_size=2), st.none()),   # not a message at all
)


def asst(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _spoil(messages: list, bad, where: int) -> list:
    out = list(messages)
    out[where % len(out)] = bad
    return out


CONV_KEEP = st.builds(lambda p, c, r: ({"prompt": p, "chosen": [asst("A" + c)], "rejected": [asst("B" + r)]}, KEEP),
                      PROMPT, TEXT, TEXT)


def conversational_rows():
    k = CONV_KEEP
    fields = st.sampled_from(["prompt", "chosen", "rejected"])
    return st.one_of(
        k, k, k,
        st.builds(_with_extra, k, EXTRA),
        st.builds(_missing, k, fields, st.sampled_from(["absent", "null"])),
        st.builds(lambda r, f, bad, i: ({**r[0], f: _spoil(r[0][f], bad, i)}, drop("bad messages")), k, fields, BAD_MESSAGE,
                  st.integers(0, 5)),
        st.builds(lambda r, m: ({**r[0], "chosen": r[0]["chosen"] + [{**m, "role": "user"}]}, drop("bad messages")), k, MESSAGE),
        st.builds(lambda r, m: ({**r[0], "chosen": [{**m, "role": "user"}] + r[0]["chosen"]}, drop("template prefix mismatch")),
                  k, MESSAGE),
        st.builds(lambda r: ({**r[0], "prompt": []}, drop("empty prompt")), k),
        st.builds(lambda r, f, b: ({**r[0], f: b}, drop("empty completion")), k, st.sampled_from(["chosen", "rejected"]),
                  st.one_of(st.just([]), BLANK.map(lambda t: [asst(t)]))),
        st.builds(lambda r: ({**r[0], "rejected": r[0]["chosen"]}, drop("chosen == rejected")), k),
        st.builds(_wrong, k, fields, WRONG_FOR_MESSAGES),
    )


def _ci(prefix, c_last, r_last, r_prefix=None):
    return {"chosen": prefix + [c_last], "rejected": (prefix if r_prefix is None else r_prefix) + [r_last]}


CI_KEEP = st.builds(lambda p, c, r: (_ci(p, asst("A" + c), asst("B" + r)), KEEP), PROMPT, TEXT, TEXT)


def conversational_implicit_rows():
    k = CI_KEEP
    fields = st.sampled_from(["chosen", "rejected"])
    return st.one_of(
        k, k, k,
        st.builds(_with_extra, k, EXTRA),
        st.builds(_missing, k, fields, st.sampled_from(["absent", "null"])),
        st.builds(lambda r, f, bad, i: ({**r[0], f: _spoil(r[0][f], bad, i)}, drop("bad messages")), k, fields, BAD_MESSAGE,
                  st.integers(0, 5)),
        st.builds(lambda p, m, c, r: (_ci(p, asst("A" + c), asst("B" + r), p + [m]), drop("prefix mismatch")),
                  PROMPT, MESSAGE, TEXT, TEXT),
        st.builds(lambda p, m, r: (_ci(p, {**m, "role": "user"}, asst("B" + r)), drop("prefix mismatch")), PROMPT, MESSAGE, TEXT),
        st.builds(lambda c, r: (_ci([], asst("A" + c), asst("B" + r)), drop("empty prompt")), TEXT, TEXT),
        st.builds(lambda r, f: ({**r[0], f: []}, drop("empty completion")), k, fields),
        st.builds(lambda p, b, r: (_ci(p, asst(b), asst("B" + r)), drop("empty completion")), PROMPT, BLANK, TEXT),
        st.builds(lambda p, c: (_ci(p, asst("A" + c), asst("A" + c)), drop("chosen == rejected")), PROMPT, TEXT),
        st.builds(_wrong, k, fields, WRONG_FOR_MESSAGES),
    )


FORMATS = {
    "explicit": (EXPLICIT_KEEP, explicit_rows),
    "implicit": (IMPLICIT_KEEP, implicit_rows),
    "conversational": (CONV_KEEP, conversational_rows),
    "conversational-implicit": (CI_KEEP, conversational_implicit_rows),
}


@st.composite
def datasets(draw, formats=tuple(FORMATS)):
    """(format, [(row, outcome)]) with a valid first row (it decides the format)."""
    fmt = draw(st.sampled_from(formats))
    keep, rows = FORMATS[fmt]
    return fmt, [draw(keep)] + draw(st.lists(rows(), max_size=10))


# ----------------------------------------------------------------------------- containers
# A container fault replaces this placeholder (in an extra field) with the bad bytes.
PLACEHOLDER = '"@@"'
LINE_FAULTS = {
    "invalid UTF-8": st.sampled_from([b'"\xff"', b'"\xc3\x28"', b'"\xed\xa0\x80"', b'"\x80x"', b'"ok\xe2\x82"']),
    "unpaired surrogate": st.sampled_from([b'"\\ud800"', b'"x\\udfffy"', b'"\\uDC00"', b'"\\ude00\\ud83d"']),
    "deep nesting": st.just(b"[" * 20_000 + b"]" * 20_000),
    "huge number": st.just(b"1" * 5000),
}


def _serialise(row: dict, ensure_ascii: bool, fault: bytes | None) -> bytes:
    if fault is None:
        return json.dumps(row, ensure_ascii=ensure_ascii).encode()
    text = json.dumps({"@fault": "@@", **row}, ensure_ascii=ensure_ascii).encode()
    return text.replace(PLACEHOLDER.encode(), fault, 1)


@st.composite
def jsonl_files(draw):
    """(bytes, format, [(row number, outcome)]): rows of one format plus line-level faults."""
    fmt, rows = draw(datasets())
    ensure_ascii = draw(st.booleans())
    lines, numbered = [], []
    for i, (row, outcome) in enumerate(rows):
        lines += draw(st.lists(st.sampled_from([b"", b"  ", b"\t", b"\r"]), max_size=2))  # blank lines count as lines
        fault = draw(st.sampled_from([None] * 12 + ["truncated", "not an object", *LINE_FAULTS])) if i else None
        if fault == "truncated":
            text = _serialise(row, ensure_ascii, None)
            line, outcome = text[: draw(st.integers(1, len(text) - 1))], ERROR
        elif fault == "not an object":
            line, outcome = json.dumps(draw(st.one_of(JSONISH, st.lists(JSONISH, max_size=2)))).encode(), ERROR
        elif fault is not None:
            line, outcome = _serialise(row, ensure_ascii, draw(LINE_FAULTS[fault])), ERROR
        else:
            line = _serialise(row, ensure_ascii, None)
        lines.append(line)
        numbered.append((len(lines), row, outcome))
    ending = draw(st.sampled_from([b"\n", b"\r\n"]))
    undecodable = [n for n, line in enumerate(lines, start=1) if not _is_utf8(line)]
    return ending.join(lines) + draw(st.sampled_from([b"", ending])), fmt, numbered, undecodable


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@st.composite
def json_files(draw):
    """A .json document: a list of rows (maybe under one key); non-objects are row errors,
    a truncated document or invalid bytes are document errors (reported by line)."""
    fmt, rows = draw(datasets())
    numbered, items = [], []
    for i, (row, outcome) in enumerate(rows, start=1):
        if i > 1 and draw(st.integers(0, 15)) == 0:
            row, outcome = draw(st.one_of(SMALL, st.integers(), st.lists(st.integers(), max_size=2))), ERROR
        items.append(row)
        numbered.append((i, row, outcome))
    doc = {"data": items} if draw(st.booleans()) else items
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()), indent=draw(st.sampled_from([None, 1]))).encode()
    doc_fault = draw(st.sampled_from([None] * 6 + ["truncated", "invalid UTF-8"]))
    if doc_fault == "truncated":
        text = text[: draw(st.integers(1, len(text) - 1))]
    elif doc_fault == "invalid UTF-8":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + b"\xff" + text[at:]
    return text, fmt, numbered, doc_fault


CSV_KINDS = st.one_of(
    EXPLICIT_KEEP, EXPLICIT_KEEP,
    st.builds(lambda r, b: ({**r[0], "prompt": b}, drop("empty prompt")), EXPLICIT_KEEP, BLANK),
    st.builds(lambda r, f, b: ({**r[0], f: b}, drop("empty completion")), EXPLICIT_KEEP, st.sampled_from(["chosen", "rejected"]),
              BLANK),
    st.builds(lambda r: ({**r[0], "rejected": r[0]["chosen"]}, drop("chosen == rejected")), EXPLICIT_KEEP),
)


def _csv_line(cells: list[str], quoting: int = csv.QUOTE_MINIMAL) -> bytes:
    # "\r\n" as terminator makes the writer quote cells holding "\r" or "\n", as CSV requires.
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\r\n", quoting=quoting).writerow(cells)
    return buffer.getvalue().encode()


@st.composite
def csv_files(draw):
    """A CSV file of explicit rows (every cell a string) with record-level faults."""
    columns = draw(st.permutations(["prompt", "chosen", "rejected", "note"]))
    rows = [draw(EXPLICIT_KEEP)] + draw(st.lists(CSV_KINDS, max_size=10))
    quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]))
    out, numbered = [_csv_line(columns, quoting)], []
    for i, (row, outcome) in enumerate(rows, start=1):
        out += draw(st.lists(st.sampled_from([b"\n", b"\r\n"]), max_size=1))  # blank lines are not records
        cells = [row.get(c, "x") for c in columns]
        fault = draw(st.sampled_from([None] * 8 + ["broken quote", "cells", "invalid UTF-8"])) if i > 1 else None
        if fault == "broken quote":  # text after a closing quote: strict CSV refuses it
            line, outcome = _csv_line(cells[:-1], quoting)[:-2] + b',"x"y\r\n', ERROR
        elif fault == "cells":
            line, outcome = _csv_line(cells + ["extra"] if draw(st.booleans()) else cells[:-1], quoting), ERROR
        elif fault == "invalid UTF-8":
            bad = draw(st.sampled_from([b"\xff", b"\xc3\x28"]))
            line, outcome = _csv_line(cells[:-1] + ["@@"], quoting).replace(b"@@", bad), ERROR
        else:
            line = _csv_line(cells, quoting)
        out.append(line)
        numbered.append((i, row, outcome))
    if draw(st.integers(0, 9)) == 0:  # a quote left open at the end of the file
        out.append(b'"unterminated,x,y,z\n')
        numbered.append((len(rows) + 1, None, ERROR))
    return b"".join(out), "explicit", numbered


# ----------------------------------------------------------------------------- the oracle
def _load(data: bytes, suffix: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(data)
        try:
            result = load_pairs(str(path), tokenizer(), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT,
                                cache_dir=str(Path(tmp) / "cache"))
        except DataError as e:
            return path, None, str(e)
        again = load_pairs(str(path), tokenizer(), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT,
                           cache_dir=str(Path(tmp) / "cache"))
        assert again[0] == result[0] and again[1].to_dict() == result[1].to_dict()  # a cache hit is the same
        return path, result, None


def _assert_error(path: Path, message: str, row: int | None) -> None:
    """One line naming the file and the row (`row` None: a whole-document error, named by line).
    A .json file is decoded as a whole first, so invalid bytes in JSON Lines under a .json name
    are reported by line, which for JSON Lines is the row number."""
    assert "\n" not in message and message.strip() == message
    if row is None:
        assert message.startswith(f"{path}: line "), message
    elif path.suffix == ".json":
        assert message.startswith((f"{path}: row {row}:", f"{path}: line {row}:")), (row, message)
    else:
        assert message.startswith(f"{path}: row {row}:"), (row, message)


def _text_truncated(row: dict, fmt: str) -> bool:
    """Whether a kept text pair exceeds max_length before truncation (EOS appended, as documented)."""
    tok = tokenizer()
    if fmt == "explicit":
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        cut = row["chosen"].rfind(ASSISTANT_MARKER) + len(ASSISTANT_MARKER)
        prompt, chosen, rejected = row["chosen"][:cut], row["chosen"][cut:], row["rejected"][cut:]
    p = tok(prompt)["input_ids"]
    c, r = (tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in (chosen, rejected))
    return len(p) + max(len(c), len(r)) > MAX_LENGTH


def check(data: bytes, suffix: str, fmt: str, numbered: list, doc_error: bool = False, first_error: int | None = None) -> None:
    """`first_error` overrides which row the error must name (default: the first row whose fate is an error)."""
    path, result, message = _load(data, suffix)
    errors = [first_error] if first_error is not None else [n for n, _, outcome in numbered if outcome == ERROR]
    if doc_error or errors:
        assert message is not None, f"expected an error at row {errors[:1]}, got a dataset"
        _assert_error(path, message, None if doc_error else errors[0])
        return
    assert message is None, message
    pairs, report = result
    kept = [(n, row) for n, row, outcome in numbered if outcome == KEEP]
    dropped = collections.defaultdict(list)
    for n, _, outcome in numbered:
        if outcome[0] == "drop":
            dropped[outcome[1]].append(n)
    assert report.format == fmt
    assert report.rows_read == len(numbered) == report.kept + sum(report.dropped.values())
    assert report.kept == len(kept) == len(pairs)
    assert [p.row for p in pairs] == [n for n, _ in kept]
    assert report.dropped == {reason: len(rows) for reason, rows in dropped.items()}
    assert report.dropped_rows == {reason: rows[:MAX_ROWS_LISTED] for reason, rows in dropped.items()}
    for p in pairs:
        assert p.prompt_ids and p.chosen_ids != p.rejected_ids
        assert len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= MAX_LENGTH
    if fmt in ("explicit", "implicit"):
        assert report.truncated == sum(_text_truncated(row, fmt) for _, row in kept)


# ----------------------------------------------------------------------------- the tests
@FUZZ
@given(jsonl_files(), st.sampled_from([".jsonl", ".json"]))
def test_jsonl_fuzz(case, suffix):
    """JSON Lines (also under a .json name, read as JSON Lines) with line-level faults."""
    data, fmt, numbered, undecodable = case
    if suffix == ".json" and len(numbered) == 1:
        suffix = ".jsonl"  # one object in a .json file is a document, not JSON Lines
    # A .json file is decoded as a whole before it is parsed: invalid bytes are found first.
    first_error = undecodable[0] if suffix == ".json" and undecodable else None
    check(data, suffix, fmt, numbered, first_error=first_error)


@settings(FUZZ, max_examples=50)
@given(json_files())
def test_json_document_fuzz(case):
    data, fmt, numbered, doc_fault = case
    check(data, ".json", fmt, numbered, doc_error=doc_fault is not None)


@settings(FUZZ, max_examples=100)
@given(csv_files())
def test_csv_fuzz(case):
    data, fmt, numbered = case
    check(data, ".csv", fmt, numbered)


@st.composite
def first_row_faults(draw):
    """A first row whose fields no format accepts (an error at row 1), then valid rows."""
    fmt = draw(st.sampled_from(list(FORMATS)))
    keep = FORMATS[fmt][0]
    row = dict(draw(keep)[0])
    fields = ["chosen", "rejected"] + (["prompt"] if fmt in ("explicit", "conversational") else [])
    field = draw(st.sampled_from(fields))
    if draw(st.booleans()) and field != "prompt":
        del row[field]  # a missing chosen/rejected column
    elif fmt in ("explicit", "implicit"):
        row[field] = draw(WRONG_FOR_TEXT if field != "chosen" else st.one_of(WRONG_SCALAR, st.none()))
    elif field == "prompt":  # a text prompt beside message lists is allowed (and ignored)
        row[field] = draw(WRONG_SCALAR)
    else:
        row[field] = draw(WRONG_SCALAR if field != "chosen" else st.one_of(WRONG_SCALAR, st.none()))
    rest = draw(st.lists(keep, max_size=3))
    lines = [json.dumps(row)] + [json.dumps(r) for r, _ in rest]
    return "\n".join(lines).encode(), fmt


@settings(FUZZ, max_examples=50)
@given(first_row_faults())
def test_first_row_decides_the_format_or_fails_at_row_1(case):
    data, _ = case
    path, _, message = _load(data, ".jsonl")
    assert message is not None
    _assert_error(path, message, 1)


def test_empty_files_are_one_line_errors(tmp_path):
    for name, data in [("e.jsonl", b""), ("b.jsonl", b"\n \n\t\n"), ("e.json", b"[]"), ("e.csv", b"prompt,chosen,rejected\n")]:
        path = tmp_path / name
        path.write_bytes(data)
        try:
            load_pairs(str(path), tokenizer(), max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
        except DataError as e:
            assert str(e) == f"{path}: no rows"
        else:
            raise AssertionError(f"{name}: no error")

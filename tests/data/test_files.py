"""read_rows: every container, and one-line DataErrors for malformed input."""

import csv
import gzip
import json

import pytest

from dpolab.data.files import DataError, read_rows, source_fingerprint

ROWS = [
    {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
    {"prompt": "Count, please", "chosen": " 1, 2, 3", "rejected": " \"three\"\nlines"},
]


def write_jsonl(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def write_csv(path, rows, opener=open):
    with opener(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def assert_one_line_error(excinfo, *parts):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for p in parts:
        assert p in msg, msg


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_jsonl(tmp_path, name):
    opener = gzip.open if name.endswith(".gz") else open
    path = write_jsonl(tmp_path / name, ROWS, opener)
    assert list(read_rows(str(path))) == [(1, ROWS[0]), (2, ROWS[1])]


def test_jsonl_blank_lines_skipped_and_row_is_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n")
    assert [n for n, _ in read_rows(str(path))] == [1, 4]


@pytest.mark.parametrize("wrap", [lambda rows: rows, lambda rows: {"version": 2, "data": rows}])
@pytest.mark.parametrize("name", ["d.json", "d.json.gz"])
def test_json_list_and_dict_of_one_list(tmp_path, wrap, name):
    opener = gzip.open if name.endswith(".gz") else open
    with opener(tmp_path / name, "wt", encoding="utf-8") as f:
        json.dump(wrap(ROWS), f)
    assert list(read_rows(str(tmp_path / name))) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_file_holding_json_lines(tmp_path):
    path = write_jsonl(tmp_path / "d.json", ROWS)
    assert [r for _, r in read_rows(str(path))] == ROWS


def test_parquet_with_messages(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}]
    pq.write_table(pa.Table.from_pylist(rows * 3), tmp_path / "d.parquet")
    got = list(read_rows(str(tmp_path / "d.parquet")))
    assert [n for n, _ in got] == [1, 2, 3]
    assert got[0][1] == rows[0]


@pytest.mark.parametrize("name", ["d.csv", "d.csv.gz"])
def test_csv(tmp_path, name):
    opener = gzip.open if name.endswith(".gz") else open
    path = write_csv(tmp_path / name, ROWS, opener)
    # The second row has a quoted multi-line cell: still one record, row 2.
    assert list(read_rows(str(path))) == [(1, ROWS[0]), (2, ROWS[1])]


def test_save_to_disk_dataset_and_dict(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert [r for _, r in read_rows(str(tmp_path / "one"))] == ROWS
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert list(read_rows(str(tmp_path / "dd"), split="test")) == [(1, ROWS[1])]
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "dd"), split="validation"))
    assert_one_line_error(e, "dd", "'validation'", "test", "train")


def test_hub_name_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the Hub\nretry later")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # past dpolab.hub's check, to datasets
    with pytest.raises(DataError) as e:
        list(read_rows("someone/some-prefs", split="train"))
    assert_one_line_error(e, "someone/some-prefs", "hub dataset", "Couldn't reach")


@pytest.mark.parametrize("content, parts", [
    (b'{"chosen": "a", "rejected": "b"}\n{"chosen": "a", rejected: 1}\n', ["row 2", "invalid JSON"]),
    (b'{"chosen": "a", "rejected": "b"}\n["a", "b"]\n', ["row 2", "expected a JSON object, got list"]),
    (b'{"chosen": "a", "rejected": "b"}\n{"chosen": "\xff\xfe", "rejected": "b"}\n', ["row 2", "invalid UTF-8"]),
])
def test_bad_jsonl(tmp_path, content, parts):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "bad.jsonl")))
    assert_one_line_error(e, "bad.jsonl", *parts)


@pytest.mark.parametrize("content, parts", [
    (b'[{"chosen": "a"}, 3]', ["row 2", "expected a JSON object, got int"]),
    (b'[{"chosen": "a"},\n {"chosen": }]', ["line 2", "invalid JSON"]),
    (b'{"a": [], "b": []}', ["exactly one list"]),
])
def test_bad_json(tmp_path, content, parts):
    (tmp_path / "bad.json").write_bytes(content)
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "bad.json")))
    assert_one_line_error(e, "bad.json", *parts)


@pytest.mark.parametrize("content, parts", [
    (b'prompt,chosen,rejected\np,c,r\np,"unterminated,r\n', ["row 2", "broken CSV"]),
    (b'prompt,chosen,rejected\np,c,r\np,"c"x,r\n', ["row 2", "broken CSV"]),
    (b'prompt,chosen,rejected\np,c,r\np,c,r,extra\n', ["row 2", "expected 3 cells"]),
    (b'prompt,chosen,rejected\np,c,r\np,c\xff,r\n', ["row 2", "invalid UTF-8"]),
])
def test_bad_csv(tmp_path, content, parts):
    (tmp_path / "bad.csv").write_bytes(content)
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "bad.csv")))
    assert_one_line_error(e, "bad.csv", *parts)


def test_missing_unsupported_and_bad_gzip(tmp_path):
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "nope.jsonl")))
    assert_one_line_error(e, "nope.jsonl", "file not found")
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "d.txt")))
    assert_one_line_error(e, "d.txt", "unsupported file type")
    (tmp_path / "d.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "d.jsonl.gz")))
    assert_one_line_error(e, "d.jsonl.gz", "cannot read file")
    (tmp_path / "d.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError) as e:
        list(read_rows(str(tmp_path / "d.parquet")))
    assert_one_line_error(e, "d.parquet", "cannot read parquet")


def test_source_fingerprint_follows_content(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    first = source_fingerprint(str(path))
    assert source_fingerprint(str(path)) == first
    write_jsonl(path, ROWS[:1])
    assert source_fingerprint(str(path)) != first
    assert source_fingerprint("org/name") == "name:org/name"


@pytest.mark.parametrize("name", ["bom.jsonl", "bom.csv"])
def test_utf8_byte_order_mark_is_ignored(tmp_path, name):
    path = write_jsonl(tmp_path / name, ROWS) if name.endswith("jsonl") else write_csv(tmp_path / name, ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert [r for _, r in read_rows(str(path))] == ROWS

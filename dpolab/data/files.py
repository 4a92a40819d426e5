"""Read preference data containers into raw rows.

``read_rows(source, split)`` yields ``(row_number, dict)`` pairs, row numbers starting at 1, from:

- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line. The row number is the LINE number, so a
  user can jump to it in an editor; blank lines are skipped (but still counted as lines).
- ``.json`` / ``.json.gz``: a list of objects, or a dict holding exactly one list of objects
  (``{"data": [...]}``, ``{"train": [...]}``...). A ``.json`` file that is really JSON Lines
  (common on the hub) is read as JSON Lines. The row number is the index in the list, 1-based.
- ``.parquet``: the row number is the table row, 1-based.
- ``.csv`` / ``.csv.gz``: header line required; the row number counts data records (not the
  header, and a quoted multi-line cell is still one record). Every cell is a string.
- a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset`` or a ``DatasetDict``, from
  which ``split`` is picked); any other folder or name goes to ``datasets.load_dataset(source,
  split=split)`` (a hub dataset name, or a folder of data files).

Every problem with the container itself (missing file, bad gzip, invalid UTF-8, a bad JSON line,
a line that is not an object, broken CSV quoting, a CSV record with the wrong number of cells, a
hub dataset that cannot be loaded) raises ``DataError`` whose message is ONE line naming the file
and, where there is one, the row. Nothing here raises a traceback-worthy exception at a user.
Problems with the CONTENT of well-formed rows are judged later, in ``formats.py``.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

__all__ = ["DataError", "json_lines", "read_rows"]

# Suffixes that mean "this is a file path", so a missing one is "file not found", not a hub name.
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".jsonl.gz", ".json.gz", ".csv.gz")


def json_lines(path) -> list[str]:
    """The non-blank lines of a JSON Lines file we wrote. Split at "\\n" only: `str.splitlines()`
    also splits at U+2028, U+2029 and U+0085, which `json.dumps(ensure_ascii=False)` leaves raw
    inside strings (a sampled completion held one and was counted as two rows)."""
    return [line for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


class DataError(ValueError):
    """User-facing input error. ``str(e)`` is ONE line naming file, row (1-based) and field, e.g.
    ``"data.jsonl: row 17: field 'chosen': expected a string or a list of messages, got int"``."""

    def __init__(self, message: str):
        # Underlying library messages can contain newlines; the CLI prints exactly one line.
        super().__init__(" ".join(str(message).split()))


def read_rows(source: str, split: str = "train") -> Iterator[tuple[int, dict]]:
    """Yield ``(row_number, raw_row)`` for every row of ``source``; row numbers start at 1.

    ``raw_row`` is a plain ``dict`` (column name -> Python value). Raises ``DataError`` (one line)
    for malformed containers; see the module docstring for what each container accepts.
    """
    source = str(source)
    path = Path(source)
    name = path.name.lower()
    if path.is_dir():
        yield from _read_folder(source, split)
        return
    if name.endswith(_FILE_SUFFIXES):
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        if name.endswith((".jsonl", ".jsonl.gz")):
            yield from _read_jsonl(source)
        elif name.endswith((".json", ".json.gz")):
            yield from _read_json(source)
        elif name.endswith(".parquet"):
            yield from _read_parquet(source)
        else:
            yield from _read_csv(source)
        return
    if path.is_file():
        raise DataError(f"{source}: unsupported file type; use .jsonl, .json, .parquet or .csv "
                        f"(optionally .gz for jsonl/json/csv)")
    yield from _read_hub(source, split)



def peek_rows(source: str, split: str = "train") -> tuple[tuple, Iterator]:
    """The first ``(row number, row)`` of ``source`` (to detect its format) and an iterator over
    all rows, that first one included. An empty file is a ``DataError``."""
    rows = read_rows(str(source), split)
    first = next(rows, None)
    if first is None:
        raise DataError(f"{source}: no rows")
    return first, itertools.chain([first], rows)

def _read_bytes(source: str) -> bytes:
    """The whole (decompressed) file, without a UTF-8 byte order mark (Windows tools write one).

    Files here are preference datasets, small enough to hold in memory.
    """
    try:
        if source.lower().endswith(".gz"):
            with gzip.open(source, "rb") as f:
                data = f.read()
        else:
            data = Path(source).read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{source}: cannot read file: {e}") from None
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def _json_lines(source: str, data: bytes) -> Iterator[tuple[int, dict]]:
    for line_no, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: row {line_no}: invalid UTF-8 at byte {e.start} of the line") from None
        try:
            obj = _loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{source}: row {line_no}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{source}: row {line_no}: expected a JSON object, got {_type_name(obj)}")
        if _may_hold_surrogates(text):
            _check_surrogates(source, line_no, obj)
        yield line_no, obj


def _loads(text: str):
    """``json.loads``; its other failures (nesting deeper than Python's recursion limit, integers
    too long to convert) are raised as ``JSONDecodeError`` too."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", text, 0) from None
    except ValueError as e:
        raise json.JSONDecodeError(" ".join(str(e).split(";")[0].split()), text, 0) from None


def _may_hold_surrogates(text: str) -> bool:
    return "\\ud" in text or "\\uD" in text


def _check_surrogates(source: str, row: int, obj) -> None:
    """A ``\\udXXX`` escape without its pair is valid JSON but not Unicode text: no tokenizer takes
    it, so it is refused like invalid UTF-8. Callers walk only rows whose text has such an escape."""
    stack = [obj]
    while stack:  # iterative: a deeply nested row must not hit the recursion limit here
        value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{source}: row {row}: invalid Unicode: a \\u escape encodes an unpaired "
                                f"UTF-16 surrogate, which is not a character") from None
        elif isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)


def _read_jsonl(source: str) -> Iterator[tuple[int, dict]]:
    yield from _json_lines(source, _read_bytes(source))


def _read_json(source: str) -> Iterator[tuple[int, dict]]:
    """A JSON document holding a list of objects (or a dict with exactly one such list)."""
    data = _read_bytes(source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{source}: line {line}: invalid UTF-8") from None
    try:
        doc = _loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # Many hub files named .json are JSON Lines: one object per line.
            yield from _json_lines(source, data)
            return
        raise DataError(f"{source}: line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(doc, dict):
        lists = [k for k, v in doc.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{source}: expected a list of objects or a dict holding exactly one list "
                            f"(like {{\"data\": [...]}}); found list keys {lists}")
        doc = doc[lists[0]]
    if not isinstance(doc, list):
        raise DataError(f"{source}: expected a list of objects, got {_type_name(doc)}")
    surrogates = _may_hold_surrogates(text)
    for i, obj in enumerate(doc, start=1):
        if not isinstance(obj, dict):
            raise DataError(f"{source}: row {i}: expected a JSON object, got {_type_name(obj)}")
        if surrogates:
            _check_surrogates(source, i, obj)
        yield i, obj


def _read_parquet(source: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq  # why: heavy (with datasets, 0.6 s); only when a parquet file is read

    try:
        pf = pq.ParquetFile(source)
        row = 0
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                row += 1
                yield row, obj
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
        raise DataError(f"{source}: cannot read parquet: {e}") from None


class _BadBytes(Exception):
    """Raised from inside the CSV line feed; the reader knows the record number."""

    def __init__(self, line: int):
        self.line = line


def _decoded_lines(data: bytes) -> Iterator[str]:
    for line_no, raw in enumerate(io.BytesIO(data), start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _BadBytes(line_no) from None


def _read_csv(source: str) -> Iterator[tuple[int, dict]]:
    """CSV with a header line; every cell is a string. Strict quoting: a broken quote is an error."""
    data = _read_bytes(source)
    # Long transcripts exceed csv's default 128 KiB cell limit; raising it is harmless.
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(_decoded_lines(data), strict=True)
    header: list[str] | None = None
    record = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except _BadBytes as e:
            raise DataError(f"{source}: row {record + 1}: invalid UTF-8 (line {e.line})") from None
        except csv.Error as e:
            raise DataError(f"{source}: row {record + 1}: broken CSV ({e}; line {reader.line_num})") from None
        if not cells:  # blank line
            continue
        if header is None:
            header = cells
            continue
        record += 1
        if len(cells) != len(header):
            raise DataError(f"{source}: row {record}: expected {len(header)} cells "
                            f"({', '.join(header)}), got {len(cells)}")
        yield record, dict(zip(header, cells))
    if header is None:
        raise DataError(f"{source}: empty CSV file (no header line)")


def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file()


def _read_folder(source: str, split: str) -> Iterator[tuple[int, dict]]:
    folder = Path(source)
    if not _is_saved_dataset(folder):
        # A folder of data files: let datasets' packaged loaders deal with it.
        yield from _read_hub(source, split)
        return
    import datasets  # why: 0.6 s to import; only when a datasets folder or hub name is read

    try:
        ds = datasets.load_from_disk(source)
    except Exception as e:  # datasets raises many unrelated types; all mean "unreadable folder"
        raise DataError(f"{source}: cannot load saved dataset: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r}; splits are {sorted(ds)} (choose with --split)")
        ds = ds[split]
    yield from _iter_dataset(ds)


def _read_hub(source: str, split: str) -> Iterator[tuple[int, dict]]:
    import datasets  # why: as in _read_folder

    from ..hub import hub_dataset_problem  # why: huggingface_hub loads only for a hub dataset name

    problem = hub_dataset_problem(source)  # seconds, not load_dataset's retries, when it cannot load
    if problem:
        raise DataError(f"{source}: not a file or folder, and not a loadable hub dataset: {problem}; "
                        f"pass a local file (.jsonl, .json, .csv, .parquet, optionally .gz) or folder")
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, missing repo, bad split...: all one user-facing line
        raise DataError(f"{source}: not a file or folder, and loading it as a hub dataset "
                        f"(split {split!r}) failed: {type(e).__name__}: {e}") from None
    yield from _iter_dataset(ds)


def _iter_dataset(ds) -> Iterator[tuple[int, dict]]:
    """Rows of a ``datasets.Dataset`` as plain dicts, in order, numbered from 1."""
    for i, obj in enumerate(ds, start=1):
        yield i, dict(obj)


def _type_name(value) -> str:
    """JSON-ish type names for messages: null, bool, int, float, string, list, dict."""
    if value is None:
        return "null"
    return {str: "string", list: "list", dict: "dict"}.get(type(value), type(value).__name__)


def source_fingerprint(source: str) -> str:
    """A string that changes when the data behind ``source`` changes (used as a cache key part).

    Files: the sha256 of their bytes. Folders: the path plus every file's relative path, size and
    mtime. Anything else (a hub name): the name itself.
    """
    path = Path(source)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "file:" + h.hexdigest()
    if path.is_dir():
        parts = [str(path.resolve())]
        for root, _dirs, files in sorted(os.walk(path)):
            for fn in sorted(files):
                st = os.stat(os.path.join(root, fn))
                parts.append(f"{os.path.relpath(os.path.join(root, fn), path)}:{st.st_size}:{st.st_mtime_ns}")
        return "dir:" + hashlib.sha256("\n".join(parts).encode()).hexdigest()
    return "name:" + source

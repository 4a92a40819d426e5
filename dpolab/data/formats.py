"""Detect the preference-data format and normalise rows into ``PreferenceExample``; the data report.

Formats (detected ONCE, from the first row; column names come from the overrides):

==========================  ==========================================================================
``explicit``                ``{prompt: str, chosen: str, rejected: str}``
``implicit``                ``{chosen: str, rejected: str}``: whole HH-RLHF style transcripts
                            (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``). The prompt is each transcript up
                            to and including its LAST ``"\\n\\nAssistant:"`` marker (the rule of the DPO
                            reference code); both transcripts must give the same prompt. The completion
                            is the rest, leading space kept (``" Sure..."``).
``conversational``          ``{prompt: [messages], chosen: [assistant message(s)], rejected: [...]}``
``conversational-implicit`` ``{chosen: [messages], rejected: [messages]}``: the prompt is all messages but
                            the last (they must be equal in both lists), the completion is the final
                            assistant message. A string ``prompt`` column next to message lists (as in
                            HuggingFaceH4/ultrafeedback_binarized) is ignored, as TRL does.
==========================  ==========================================================================

Multi-turn conversations keep every earlier turn in the prompt; the completion (where the loss
goes) is the final assistant response only.

Errors versus drops (the rule: a problem with the FILE'S SHAPE is an error, a problem with ONE
ROW'S CONTENT is a drop):

- ``DataError`` (one line naming file, row and field): the first row lacks the chosen/rejected
  columns (or an overridden prompt column), its fields have types no format accepts, or any later
  row has a field of the wrong TYPE for the detected format (e.g. ``chosen`` is an int, ``prompt`` a
  dict, a message list where the format has strings). Such rows mean the columns are wrong or the
  file is mixed, and silently dropping them would hide it.
- Dropped and counted in ``DataReport.dropped`` (reason -> count):
  ``missing field`` (key absent or null), ``empty prompt`` (blank prompt text or no prompt messages:
  nothing to condition on), ``empty completion`` (blank after stripping whitespace),
  ``chosen == rejected``, ``prefix mismatch`` (implicit transcripts that do not share a prompt ending
  in an assistant marker, or message lists that differ before the final assistant message or do
  not end with one), ``bad messages`` (a message that is not a dict, lacks ``role``/``content``, has a
  non-string content or a role outside system/user/assistant/tool, or a completion that does not
  end with an assistant message). ``tokenize.py`` adds its own reasons to the same report.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from ..perms import atomic_path
from .files import DataError, _type_name
from .sampled import SampledIds, parse_sampled

__all__ = ["Message", "PreferenceExample", "DataReport", "normalise", "ASSISTANT_MARKER", "ROLES"]

Message = dict  # {"role": str, "content": str} (other non-null keys, e.g. tool_calls, are kept)

ASSISTANT_MARKER = "\n\nAssistant:"  # HH-RLHF's turn marker, matched exactly as the DPO reference code does
ROLES = frozenset({"system", "user", "assistant", "tool"})
MAX_ROWS_LISTED = 20  # per drop reason, so the report stays small on a large bad file


@dataclass
class PreferenceExample:
    row: int                      # 1-based row number in the source
    prompt: str | list[Message]   # text, or messages (conversational)
    chosen: str | list[Message]   # completion text, or assistant message(s)
    rejected: str | list[Message]
    # (chosen, rejected) cut by a sampler's length limit (`chosen_truncated` / `rejected_truncated`
    # in rows `dpolab generate` writes): no EOS / end-of-turn is added, the model never sampled one
    truncated: tuple[bool, bool] = (False, False)
    # the token ids `dpolab generate` sampled (see data/sampled.py); training prefers them to the text
    sampled: SampledIds | None = None


@dataclass
class DataReport:
    """What happened to every row. Invariant: ``rows_read == kept + sum(dropped.values())``."""

    source: str
    rows_read: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)             # reason -> count
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)  # reason -> first 20 row numbers
    format: str = ""  # "explicit" | "implicit" | "conversational" | "conversational-implicit"
    notes: dict[str, int] = field(default_factory=dict)               # kept rows handled specially -> count

    def note(self, what: str) -> None:
        """Count one kept row handled in a way the user should know about (e.g. sampled ids not usable)."""
        self.notes[what] = self.notes.get(what, 0) + 1

    def drop(self, reason: str, row: int) -> None:
        """Count one dropped row. Does not touch ``kept``: each stage sets ``kept`` when it ends."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        rows = self.dropped_rows.setdefault(reason, [])
        if len(rows) < MAX_ROWS_LISTED:
            rows.append(row)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataReport":
        return cls(**d)

    def write(self, path) -> None:
        """Write the report as JSON, atomically (a reader never sees a half-written file)."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


class _Drop(Exception):
    """A row-level problem: the row is dropped with this reason (never reaches the user as an error)."""

    def __init__(self, reason: str):
        self.reason = reason


@dataclass(frozen=True)
class _Columns:
    prompt: str
    chosen: str
    rejected: str


def normalise(rows: Iterable[tuple[int, dict]], source: str, prompt_column="prompt",
              chosen_column="chosen", rejected_column="rejected") -> tuple[list[PreferenceExample], DataReport]:
    """Detect the format from the first row and turn every row into a ``PreferenceExample``.

    ``rows`` are ``(row_number, raw_dict)`` as from ``read_rows``. Returns the kept examples (in
    source order) and a report accounting for every row read. Raises ``DataError`` for shape and
    type errors (see the module docstring); an empty source is an error too.
    """
    cols = _Columns(prompt_column, chosen_column, rejected_column)
    report = DataReport(source=str(source))
    examples: list[PreferenceExample] = []
    convert = None
    for row_no, raw in rows:
        if convert is None:
            report.format = detect_format(raw, row_no, source, cols, prompt_overridden=prompt_column != "prompt")
            convert = _CONVERTERS[report.format]
        report.rows_read += 1
        try:
            examples.append(convert(raw, row_no, source, cols))
        except _Drop as d:
            report.drop(d.reason, row_no)
    if convert is None:
        raise DataError(f"{source}: no rows")
    report.kept = len(examples)
    return examples, report


def detect_format(raw: dict, row: int, source: str, cols: _Columns, prompt_overridden: bool = False) -> str:
    """The format name for a source whose first row is ``raw``; ``DataError`` if none fits."""
    wanted = [cols.chosen, cols.rejected] + ([cols.prompt] if prompt_overridden else [])
    missing = [c for c in wanted if c not in raw]
    if ("responses" in raw and "ranking" in raw and cols.chosen not in raw) or (
            isinstance(raw.get(cols.chosen), str) and isinstance(raw.get(cols.rejected), list)):
        field_name = "responses" if "responses" in raw and cols.chosen not in raw else cols.rejected
        raise DataError(f"{source}: row {row}: field {field_name!r}: a list of responses is listwise data "
                        "(several ranked responses per prompt): train it with --loss plackett_luce")
    if missing and "completion" in raw and "label" in raw:
        raise DataError(f"{source}: row {row}: unpaired rows (prompt, completion, label) are KTO data: "
                        "train them with --loss kto")
    if missing:
        raise DataError(
            f"{source}: row {row}: missing column(s) {', '.join(map(repr, missing))}; the columns are "
            f"{', '.join(map(repr, raw)) or 'none'}; name yours with --prompt-column/--chosen-column/--rejected-column")
    chosen = raw[cols.chosen]
    if not isinstance(chosen, (str, list)):
        raise DataError(f"{source}: row {row}: field {cols.chosen!r}: expected a string or a list of "
                        f"messages, got {_type_name(chosen)}")
    has_prompt = cols.prompt in raw
    prompt = raw.get(cols.prompt)
    if isinstance(chosen, list):
        # A text prompt beside message lists is a copy of the first user turn: ignore it (as TRL does).
        if has_prompt and isinstance(prompt, list):
            return "conversational"
        if has_prompt and not isinstance(prompt, str):
            raise DataError(f"{source}: row {row}: field {cols.prompt!r}: expected a list of messages, "
                            f"got {_type_name(prompt)}")
        return "conversational-implicit"
    if not has_prompt:
        return "implicit"
    if not isinstance(prompt, str):
        raise DataError(f"{source}: row {row}: field {cols.prompt!r}: expected a string (like "
                        f"{cols.chosen!r}), got {_type_name(prompt)}")
    return "explicit"


def _fields(raw: dict, names: tuple[str, ...], kind: type, row: int, source: str, fmt: str) -> list:
    """``[raw[name] for name in names]``, each checked to be of ``kind``.

    Types are checked for ALL fields first, so a wrong type is always an error even when another
    field is missing; then an absent or null field drops the row as ``missing field``.
    """
    values = [raw.get(name) for name in names]
    for name, value in zip(names, values):
        if value is not None and not isinstance(value, kind):
            what = "a string" if kind is str else "a list of messages"
            raise DataError(f"{source}: row {row}: field {name!r}: expected {what} ({fmt} format, "
                            f"detected from the first row), got {_type_name(value)}")
    if any(v is None for v in values):
        raise _Drop("missing field")
    return values


def _check_pair(chosen, rejected, empty) -> None:
    if empty(chosen) or empty(rejected):
        raise _Drop("empty completion")
    if chosen == rejected:
        raise _Drop("chosen == rejected")


def _blank(text: str) -> bool:
    return not text.strip()


def _explicit(raw: dict, row: int, source: str, cols: _Columns) -> PreferenceExample:
    prompt, chosen, rejected = _fields(raw, (cols.prompt, cols.chosen, cols.rejected), str, row, source, "explicit")
    if _blank(prompt):
        raise _Drop("empty prompt")
    _check_pair(chosen, rejected, _blank)
    return PreferenceExample(row, prompt, chosen, rejected, _cut_flags(raw), parse_sampled(raw, row, source))


def split_transcript(text: str) -> tuple[str, str] | None:
    """``(prompt, completion)`` split after the LAST assistant marker, or None if there is none."""
    at = text.rfind(ASSISTANT_MARKER)
    if at < 0:
        return None
    cut = at + len(ASSISTANT_MARKER)
    return text[:cut], text[cut:]


def _implicit(raw: dict, row: int, source: str, cols: _Columns) -> PreferenceExample:
    chosen, rejected = _fields(raw, (cols.chosen, cols.rejected), str, row, source, "implicit")
    c_split, r_split = split_transcript(chosen), split_transcript(rejected)
    # Both transcripts must end their shared prompt at their own last assistant marker; otherwise one
    # completion would contain further turns (or the prompts differ) and the pair is not comparable.
    if c_split is None or r_split is None or c_split[0] != r_split[0]:
        raise _Drop("prefix mismatch")
    _check_pair(c_split[1], r_split[1], _blank)
    return PreferenceExample(row, c_split[0], c_split[1], r_split[1])


def _message(m) -> Message:
    """A validated copy of one message (null-valued keys dropped: parquet fills absent struct keys)."""
    # The role is checked to be a string first: a list or dict role is unhashable for the set lookup.
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or m["role"] not in ROLES \
            or not isinstance(m.get("content"), str):
        raise _Drop("bad messages")
    return {k: v for k, v in m.items() if v is not None}


def _messages(value: list) -> list[Message]:
    return [_message(m) for m in value]


def _no_content(messages: list[Message]) -> bool:
    return all(_blank(m["content"]) for m in messages)


def _conversational(raw: dict, row: int, source: str, cols: _Columns) -> PreferenceExample:
    fields = _fields(raw, (cols.prompt, cols.chosen, cols.rejected), list, row, source, "conversational")
    prompt, chosen, rejected = (_messages(v) for v in fields)
    if not prompt:
        raise _Drop("empty prompt")
    # A completion must be the assistant's answer; one ending in a user turn is a malformed row.
    if any(c and c[-1]["role"] != "assistant" for c in (chosen, rejected)):
        raise _Drop("bad messages")
    _check_pair(chosen, rejected, _no_content)
    return PreferenceExample(row, prompt, chosen, rejected, _cut_flags(raw), parse_sampled(raw, row, source))


def _cut_flags(raw: dict) -> tuple[bool, bool]:
    return raw.get("chosen_truncated") is True, raw.get("rejected_truncated") is True


def _conversational_implicit(raw: dict, row: int, source: str, cols: _Columns) -> PreferenceExample:
    fields = _fields(raw, (cols.chosen, cols.rejected), list, row, source, "conversational-implicit")
    chosen, rejected = (_messages(v) for v in fields)
    if not chosen or not rejected:
        raise _Drop("empty completion")
    if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant" or chosen[:-1] != rejected[:-1]:
        raise _Drop("prefix mismatch")
    if not chosen[:-1]:
        raise _Drop("empty prompt")
    _check_pair(chosen[-1:], rejected[-1:], _no_content)
    return PreferenceExample(row, chosen[:-1], chosen[-1:], rejected[-1:])


_CONVERTERS = {
    "explicit": _explicit,
    "implicit": _implicit,
    "conversational": _conversational,
    "conversational-implicit": _conversational_implicit,
}

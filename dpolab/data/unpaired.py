"""Unpaired (KTO) data: one completion per row with a desirable / undesirable label.

Rows: ``{"prompt": str, "completion": str, "label": bool}`` or, conversational,
``{"prompt": [messages], "completion": [assistant message(s)], "label": bool}`` (TRL's unpaired
preference format). The format is detected from the first row (``completion`` and ``label``
columns, no ``chosen``). Same rules as for pairs (``formats.py``): a wrong TYPE is a
``DataError`` naming file, row and field (``label`` must be a JSON boolean: 0/1 or "true" are
refused rather than guessed); a missing or empty field drops the row with a counted reason in
the same ``DataReport`` (``missing field``, ``empty prompt``, ``empty completion``,
``bad messages``, ``chat template error``, ``template prefix mismatch``, ``prompt does not fit``).

Preference pairs given to KTO are split as TRL's ``unpair_preference_dataset`` does: the
chosen completion becomes a desirable example, the rejected one an undesirable example (both
keep the pair's row number).
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2

from .files import DataError, _type_name, peek_rows
from .formats import DataReport, _blank, _Drop, _messages, _no_content
from .tokenize import _adds_bos, encode_completions, encode_prompts, load_pairs, render_prompt, render_reply, truncate

__all__ = ["UnpairedExample", "TokenizedCompletion", "is_unpaired", "normalise_unpaired", "tokenize_unpaired",
           "load_unpaired"]


@dataclass
class UnpairedExample:
    row: int
    prompt: str | list[dict]
    completion: str | list[dict]
    label: bool  # True = desirable


@dataclass
class TokenizedCompletion:
    row: int
    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool


def is_unpaired(raw: dict, chosen_column: str = "chosen") -> bool:
    """Whether a first row is in the unpaired format."""
    return "completion" in raw and "label" in raw and chosen_column not in raw


def _convert(raw: dict, row: int, source: str, prompt_column: str, conversational: bool) -> UnpairedExample:
    kind = list if conversational else str
    what = "a list of messages" if conversational else "a string"
    for name in (prompt_column, "completion"):
        value = raw.get(name)
        if value is not None and not isinstance(value, kind):
            raise DataError(f"{source}: row {row}: field {name!r}: expected {what} (unpaired format, detected "
                            f"from the first row), got {_type_name(value)}")
    label = raw.get("label")
    if label is not None and not isinstance(label, bool):
        raise DataError(f"{source}: row {row}: field 'label': expected true or false, got {_type_name(label)}")
    prompt, completion = raw.get(prompt_column), raw.get("completion")
    if prompt is None or completion is None or label is None:
        raise _Drop("missing field")
    if conversational:
        prompt, completion = _messages(prompt), _messages(completion)
        if completion and completion[-1]["role"] != "assistant":
            raise _Drop("bad messages")
        empty_prompt, empty_completion = not prompt, _no_content(completion)
    else:
        empty_prompt, empty_completion = _blank(prompt), _blank(completion)
    if empty_prompt:
        raise _Drop("empty prompt")
    if empty_completion:
        raise _Drop("empty completion")
    return UnpairedExample(row, prompt, completion, label)


def normalise_unpaired(rows, source: str, prompt_column: str = "prompt") -> tuple[list[UnpairedExample], DataReport]:
    """Rows -> kept examples and a report accounting for every row (``rows_read = kept + dropped``)."""
    report = DataReport(source=str(source))
    examples: list[UnpairedExample] = []
    conversational = None
    for row_no, raw in rows:
        if conversational is None:
            if not is_unpaired(raw):
                raise DataError(f"{source}: row {row_no}: expected unpaired columns 'prompt', 'completion', 'label'; "
                                f"the columns are {', '.join(map(repr, raw)) or 'none'}")
            conversational = isinstance(raw.get("completion"), list)
            report.format = "unpaired-conversational" if conversational else "unpaired"
        report.rows_read += 1
        try:
            examples.append(_convert(raw, row_no, source, prompt_column, conversational))
        except _Drop as d:
            report.drop(d.reason, row_no)
    if conversational is None:
        raise DataError(f"{source}: no rows")
    report.kept = len(examples)
    return examples, report


def _render(example: UnpairedExample, tokenizer) -> tuple[str, str] | None:
    """(prompt text, completion text) as pairs render them (``tokenize.render``); None on a prefix mismatch."""
    try:
        prompt_text = render_prompt(example.prompt, tokenizer)
    except DataError as e:
        raise DataError(f"row {example.row}: field 'prompt': {e}") from None
    if isinstance(example.prompt, str):
        return prompt_text, example.completion
    completion = render_reply(example.prompt, prompt_text, example.completion, tokenizer)
    return None if completion is None else (prompt_text, completion)


def tokenize_unpaired(examples, tokenizer, report: DataReport, max_length: int, max_prompt_length: int) -> list[TokenizedCompletion]:
    """Tokenise (the one encoding of ``tokenize.py``: a pair's chosen side gets the same ids) and
    truncate (TRL's rule, as for pairs); updates ``report`` (drops, truncated, kept)."""
    out = []
    adds_bos = _adds_bos(tokenizer)
    for ex in examples:
        try:
            texts = _render(ex, tokenizer)
        except jinja2.TemplateError:
            report.drop("chat template error", ex.row)
            continue
        if texts is None:
            report.drop("template prefix mismatch", ex.row)
            continue
        p = encode_prompts([texts[0]], tokenizer)[0]
        c = encode_completions([texts[1]], tokenizer, [isinstance(ex.prompt, str)])[0]  # EOS after a text completion
        if not p or not c:
            report.drop("empty prompt" if not p else "empty completion", ex.row)
            continue
        cut = truncate(p, c, c, max_length, max_prompt_length, keep_first=adds_bos)
        if cut is None:
            report.drop("prompt does not fit", ex.row)
            continue
        report.truncated += cut[3]
        out.append(TokenizedCompletion(ex.row, list(cut[0]), list(cut[1]), ex.label))
    report.kept = len(out)
    return out


def load_unpaired(source: str, tokenizer, *, max_length: int, max_prompt_length: int, prompt_column="prompt",
                  chosen_column="chosen", rejected_column="rejected", split="train", cache_dir=None):
    """Unpaired data (or pairs, split into desirable + undesirable) -> ``(TokenizedCompletion list, DataReport)``."""
    first, rows = peek_rows(source, split)
    if not is_unpaired(first[1], chosen_column):
        pairs, report = load_pairs(source, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                   prompt_column=prompt_column, chosen_column=chosen_column,
                                   rejected_column=rejected_column, split=split, cache_dir=cache_dir)
        return [TokenizedCompletion(p.row, p.prompt_ids, ids, label) for p in pairs
                for ids, label in ((p.chosen_ids, True), (p.rejected_ids, False))], report
    examples, report = normalise_unpaired(rows, source, prompt_column)
    return tokenize_unpaired(examples, tokenizer, report, max_length, max_prompt_length), report

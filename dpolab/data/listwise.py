"""Listwise data: several ranked responses per prompt (for the Plackett-Luce loss).

Two row layouts, detected from the first row:

``{"prompt": str, "chosen": str, "rejected": [str, ...]}``
    one best response and several worse ones, unordered among themselves (a top-1 ranking).
``{"prompt": str, "responses": [str, ...], "ranking": [int, ...]}``
    ``ranking[i]`` is the rank of ``responses[i]``, 1 = best; it must be a permutation of 1..K
    (a full ranking).

Text only (a conversational prompt/response list is refused with a one-line error). Same rules
as pairs (``formats.py``): a wrong TYPE is a ``DataError`` naming file, row and field; a row's
content problem drops it with a counted reason: ``missing field``, ``empty prompt``,
``empty completion``, ``too few responses`` (fewer than 2), ``bad ranking`` (not a permutation
of 1..K), ``duplicate responses``, and in tokenisation ``prompt does not fit``.
Preference pairs given to the listwise loss become lists of two (chosen first).
"""

from __future__ import annotations

from dataclasses import dataclass

from .files import DataError, _type_name, peek_rows
from .formats import DataReport, _blank, _Drop
from .tokenize import _adds_bos, encode_completions, encode_prompts, load_pairs, truncate

__all__ = ["ListwiseExample", "TokenizedList", "listwise_layout", "normalise_listwise", "load_listwise"]


@dataclass
class ListwiseExample:
    row: int
    prompt: str
    responses: list[str]  # best first
    ranked: int  # how many leading positions are ordered: K-1 for a full ranking, 1 for chosen + rejected list


@dataclass
class TokenizedList:
    row: int
    prompt_ids: list[int]
    response_ids: list[list[int]]  # best first
    ranked: int


def listwise_layout(raw: dict) -> str | None:
    """"chosen-rejected-list", "responses-ranking" or None for a first row."""
    if "responses" in raw and "ranking" in raw:
        return "responses-ranking"
    if isinstance(raw.get("chosen"), str) and isinstance(raw.get("rejected"), list):
        return "chosen-rejected-list"
    return None


def _texts(value, name: str, row: int, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{source}: row {row}: field {name!r}: expected a list of strings (listwise format), "
                        f"got {_type_name(value)}")
    return value


def _convert(raw: dict, row: int, source: str, layout: str) -> ListwiseExample:
    prompt = raw.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise DataError(f"{source}: row {row}: field 'prompt': expected a string (listwise format), got {_type_name(prompt)}")
    names = ("responses", "ranking") if layout == "responses-ranking" else ("chosen", "rejected")
    if prompt is None or any(raw.get(n) is None for n in names):
        raise _Drop("missing field")
    if layout == "responses-ranking":
        responses = _texts(raw["responses"], "responses", row, source)
        ranking = raw["ranking"]
        if not isinstance(ranking, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking):
            raise DataError(f"{source}: row {row}: field 'ranking': expected a list of integers, got {_type_name(ranking)}")
        if sorted(ranking) != list(range(1, len(responses) + 1)):
            raise _Drop("bad ranking")
        responses, ranked = [r for _, r in sorted(zip(ranking, responses))], len(responses) - 1
    else:
        if not isinstance(raw["chosen"], str):
            raise DataError(f"{source}: row {row}: field 'chosen': expected a string, got {_type_name(raw['chosen'])}")
        responses, ranked = [raw["chosen"]] + _texts(raw["rejected"], "rejected", row, source), 1
    if _blank(prompt):
        raise _Drop("empty prompt")
    if len(responses) < 2:
        raise _Drop("too few responses")
    if any(_blank(r) for r in responses):
        raise _Drop("empty completion")
    if len(set(responses)) < len(responses):
        raise _Drop("duplicate responses")
    return ListwiseExample(row, prompt, responses, ranked)


def normalise_listwise(rows, source: str) -> tuple[list[ListwiseExample], DataReport]:
    report = DataReport(source=str(source))
    examples, layout = [], None
    for row_no, raw in rows:
        if layout is None:
            layout = listwise_layout(raw)
            if layout is None:
                raise DataError(f"{source}: row {row_no}: expected listwise columns (prompt, chosen, rejected list) or "
                                f"(prompt, responses, ranking); the columns are {', '.join(map(repr, raw)) or 'none'}")
            report.format = f"listwise ({layout})"
        report.rows_read += 1
        try:
            examples.append(_convert(raw, row_no, source, layout))
        except _Drop as d:
            report.drop(d.reason, row_no)
    if layout is None:
        raise DataError(f"{source}: no rows")
    report.kept = len(examples)
    return examples, report


def tokenize_listwise(examples, tokenizer, report: DataReport, max_length: int, max_prompt_length: int) -> list[TokenizedList]:
    """The one encoding of ``tokenize.py`` (a list of two gets a pair's ids); TRL's truncation rule
    on the longest response; EOS appended to every response."""
    adds_bos = _adds_bos(tokenizer)
    out = []
    for ex in examples:
        p = encode_prompts([ex.prompt], tokenizer)[0]
        rs = encode_completions(ex.responses, tokenizer, [True] * len(ex.responses))
        if not p or not all(rs):
            report.drop("empty prompt" if not p else "empty completion", ex.row)
            continue
        longest = max(rs, key=len)
        kept = truncate(p, longest, longest, max_length, max_prompt_length, keep_first=adds_bos)
        if kept is None:
            report.drop("prompt does not fit", ex.row)
            continue
        p, was_cut, room = kept[0], kept[3], max_length - len(kept[0])
        report.truncated += was_cut
        out.append(TokenizedList(ex.row, list(p), [r[:room] for r in rs], ex.ranked))
    report.kept = len(out)
    return out


def load_listwise(source: str, tokenizer, *, max_length: int, max_prompt_length: int, prompt_column="prompt",
                  chosen_column="chosen", rejected_column="rejected", split="train", cache_dir=None):
    """Listwise rows (or preference pairs, as lists of two) -> ``(TokenizedList list, DataReport)``."""
    first, rows = peek_rows(source, split)
    if listwise_layout(first[1]) is None:
        pairs, report = load_pairs(source, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                   prompt_column=prompt_column, chosen_column=chosen_column,
                                   rejected_column=rejected_column, split=split, cache_dir=cache_dir)
        return [TokenizedList(p.row, p.prompt_ids, [p.chosen_ids, p.rejected_ids], 1) for p in pairs], report
    examples, report = normalise_listwise(rows, source)
    return tokenize_listwise(examples, tokenizer, report, max_length, max_prompt_length), report

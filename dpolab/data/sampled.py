"""Token ids a sampler wrote next to its text, so training sees exactly the tokens that were sampled.

`dpolab generate` writes, in each pair row, the prompt ids it sampled from (``prompt_ids``), each
completion's sampled ids (``chosen_ids`` / ``rejected_ids``: the stop token included when one was
sampled, none when ``--max-new-tokens`` cut the sample) and ``sampled_with``, the fingerprint of the
tokenizer that made them. Decoding ids to text and tokenising the text again does not always give
the same ids back (a word split across two sampled tokens is re-merged into one, whitespace is
normalised), so training uses these ids when the training tokenizer has the same fingerprint, and
the text otherwise (counted in the data report's ``notes``).

The fingerprint covers what ids MEAN: vocabulary size and a hash of the id -> token table and the
special-token ids. Merges and normalisers decide how text is split, which does not matter once the
ids are given; the tokenizer's path does not matter either (a run's ``final/`` holds a copy).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .files import DataError

__all__ = ["SampledIds", "fingerprint", "same_tokenizer", "row_fields", "parse_sampled", "pick_ids", "FIELDS",
           "NOTE_OTHER_TOKENIZER", "NOTE_SAMPLER_CUT"]

FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", "sampled_with")
NOTE_OTHER_TOKENIZER = "sampled ids from another tokenizer: text re-tokenised"
NOTE_SAMPLER_CUT = "with a completion cut at the sampler's max_new_tokens (no EOS added)"


@dataclass(frozen=True)
class SampledIds:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    tokenizer: dict  # {"name", "vocab_size", "vocab_sha256"} as `fingerprint` returns


def fingerprint(tokenizer) -> dict:
    """``{"name", "vocab_size", "vocab_sha256"}``; two tokenizers give the same ids the same meaning iff
    their ``vocab_size`` and ``vocab_sha256`` agree (``name`` is for people reading the file)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id]
    digest = hashlib.sha256(json.dumps([vocab, specials], ensure_ascii=False).encode()).hexdigest()
    return {"name": str(getattr(tokenizer, "name_or_path", "")), "vocab_size": len(vocab), "vocab_sha256": digest}


def same_tokenizer(a: dict, b: dict) -> bool:
    return a.get("vocab_size") == b.get("vocab_size") and a.get("vocab_sha256") == b.get("vocab_sha256")


def row_fields(prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], tokenizer_fp: dict) -> dict:
    """The fields a sampler adds to one pair row (see the module docstring)."""
    return {"prompt_ids": list(prompt_ids), "chosen_ids": list(chosen_ids), "rejected_ids": list(rejected_ids),
            "sampled_with": tokenizer_fp}


def _ids(raw: dict, key: str, row: int, source: str) -> list[int]:
    value = raw.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                           for t in value):
        raise DataError(f"{source}: row {row}: field '{key}': expected a non-empty list of token ids "
                        f"(written by `dpolab generate`), got {json.dumps(value)[:60]}")
    return value


def parse_sampled(raw: dict, row: int, source: str) -> SampledIds | None:
    """The row's sampled ids, or None when it has none. A row with only some of the fields, or ids
    that are not lists of non-negative ints, is a ``DataError``: the file was edited or mixed."""
    present = [k for k in FIELDS if raw.get(k) is not None]
    if not present:
        return None
    if len(present) < len(FIELDS):
        missing = next(k for k in FIELDS if k not in present)
        raise DataError(f"{source}: row {row}: field '{missing}': missing, but the row has {', '.join(present)} "
                        f"(rows of `dpolab generate` have all of {', '.join(FIELDS)})")
    tok = raw["sampled_with"]
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab_sha256"), str):
        raise DataError(f"{source}: row {row}: field 'sampled_with': expected the tokenizer fingerprint "
                        f"{{name, vocab_size, vocab_sha256}}")
    return SampledIds(*(_ids(raw, k, row, source) for k in FIELDS[:3]), tok)


def pick_ids(sampled: SampledIds | None, tokenizer_fp: dict, report) -> tuple[list[int], list[int], list[int]] | None:
    """The sampled ``(prompt, chosen, rejected)`` ids if this tokenizer gives them their meaning;
    None (use the text) otherwise, noting in ``report`` when ids were there but could not be used."""
    if sampled is None:
        return None
    if not same_tokenizer(sampled.tokenizer, tokenizer_fp):
        report.note(NOTE_OTHER_TOKENIZER)
        return None
    return list(sampled.prompt), list(sampled.chosen), list(sampled.rejected)

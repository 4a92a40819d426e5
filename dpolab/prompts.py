"""Prompt sets and prompt encoding, shared by `generate`, `eval`, `rank` and the experiment.

A prompt is a text or a list of chat messages. `read_prompts` accepts every source a user
passes as `--prompts`: the built-in movie-review openings (empty source), a .txt file (one
prompt per line), a table with a prompt column (or a `review` column, cut to its first words),
or a preference-pair file whose prompts are taken. `encode_prompt` turns a prompt into the
token ids training uses for it (chat template + generation prompt for messages).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from .data.files import DataError, read_rows
from .data.formats import normalise
from .data.tokenize import encode_prompts, render_prompt

BUILTIN_PROMPTS = Path(__file__).parent / "resources" / "sentiment_prompts.txt"


def read_prompts(source: str = "", column: str = "prompt", limit: int = 0, prefix_words: int = 8) -> list:
    """Prompts from the built-in set (empty source), a .txt file (one per line), a `review`
    column (its first `prefix_words` words, `<br />` removed) or a prompt column / pair file."""
    path = Path(source) if source else BUILTIN_PROMPTS
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(f"{source}: file not found")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        prompts = _table_prompts(source, column, prefix_words)
    prompts = prompts[:limit] if limit else prompts
    if not prompts:
        raise DataError(f"{source or path}: no prompts")
    return prompts


def _table_prompts(source: str, column: str, prefix_words: int) -> list:
    first = next(iter(read_rows(source)), None)
    if first is not None and column not in first[1] and "review" in first[1]:
        return [review_prefix(str(row.get("review") or ""), prefix_words) for _, row in read_rows(source)]
    return load_prompts(source, column)


def review_prefix(review: str, words: int) -> str:
    """The first `words` words of a review, HTML line breaks removed."""
    return " ".join(review.replace("<br />", " ").replace("<br/>", " ").split()[:words])


def prompt_text(prompt) -> str:
    """What a reward function sees as the prompt: the text, or the last message's content."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))


def load_prompts(source: str, prompt_column: str = "prompt", limit: int = 0) -> list:
    """Prompts (text or messages) from a prompt column, or the prompts of a preference-pair file."""
    rows = list(itertools.islice(read_rows(source), limit or None))
    if not rows:
        raise ValueError(f"{source}: empty prompt set")
    if prompt_column in rows[0][1]:
        prompts = []
        for n, raw in rows:
            p = raw.get(prompt_column)
            if not isinstance(p, (str, list)) or not p or (isinstance(p, str) and not p.strip()):
                raise DataError(f"{source}: row {n}: field '{prompt_column}': expected a non-empty prompt text or messages")
            prompts.append(p)
        return prompts
    if "chosen" in rows[0][1] and "rejected" in rows[0][1]:
        prompts = [e.prompt for e in normalise(rows, source, prompt_column)[0]]
        if not prompts:
            raise ValueError(f"{source}: empty prompt set (no usable pair to take a prompt from)")
        return prompts
    raise DataError(f"{source}: row {rows[0][0]}: no '{prompt_column}' column (and no preference pairs to take prompts from)")


def encode_prompt(prompt, tokenizer, chat: bool = False) -> list[int]:
    """Prompt token ids exactly as training tokenises them (`data.tokenize.render_prompt` and
    `encode_prompts`: chat template + generation prompt for messages, BOS rule)."""
    ids = encode_prompts([render_prompt(prompt, tokenizer, chat)], tokenizer)[0]
    if not ids:
        raise ValueError("empty prompt: nothing to continue from")
    return ids

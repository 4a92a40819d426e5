"""Preference examples -> token ids (prompt, chosen, rejected kept apart), truncation, on-disk cache.

Decisions (beyond the TRL conventions this follows):

- A prompt is tokenised with ``add_special_tokens=True`` so a BOS is added where the tokenizer does
  that. If a chat template already wrote the BOS text, the duplicate BOS is removed.
- Left truncation of a long prompt keeps the tokenizer's BOS (when it adds one) plus the last
  ``max_prompt_length - 1`` tokens: models trained with a BOS behave badly without it.
- Text completions get ``eos_token_id`` appended (unless already there, or the tokenizer has none);
  conversational completions end with the template's end-of-turn already. Rows `dpolab generate`
  wrote carry the sampled ids (``data/sampled.py``): with the same tokenizer those ids are used as
  they are (no EOS added, none removed), as decode -> encode does not always give them back.
- Drop reasons added here: ``template prefix mismatch`` (the chat template does not render the
  prompt as a prefix of prompt + completion), ``chat template error`` (the template raised for that
  row, e.g. roles that do not alternate), ``empty prompt`` / ``empty completion`` (tokenises to
  nothing), ``prompt does not fit``, and
  ``chosen == rejected after truncation`` (identical completions give zero gradient and a fake
  50% accuracy, so they are not kept).
- The cache (``load_pairs(cache_dir=...)``) is a numpy ``.npz`` loaded with ``allow_pickle=False``:
  flat int32 id arrays with int64 offsets, the row numbers, and the report as a JSON string.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from ..perms import atomic_path
from .files import DataError, read_rows, source_fingerprint
from .formats import DataReport, PreferenceExample, normalise
from .sampled import NOTE_SAMPLER_CUT, fingerprint, pick_ids

__all__ = ["TokenizedPair", "render", "render_prompt", "render_reply", "encode_prompts",
           "encode_completions", "encode", "tokenize_examples", "truncate", "load_pairs", "split_eval"]

CACHE_VERSION = 3  # bump when the tokenisation rules change, so old caches are not reused


@dataclass
class TokenizedPair:
    row: int                 # 1-based row number in the source
    prompt_ids: list[int]    # shared by both completions; may start with BOS
    chosen_ids: list[int]    # completion only; ends with EOS / end-of-turn unless cut by truncation
    rejected_ids: list[int]


def _has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(prompt, tokenizer, chat: bool = False) -> str:
    """The text a prompt is tokenised from: a text as it is (with ``chat``: as one user message);
    messages through the chat template with its generation prompt. DataError without a template."""
    if isinstance(prompt, str) and chat:
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(prompt, str):
        return prompt
    if not _has_chat_template(tokenizer):
        raise DataError(f"conversational prompts need a tokenizer with a chat template; "
                        f"{getattr(tokenizer, 'name_or_path', 'this tokenizer')} has none")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def render_reply(prompt: list, prompt_text: str, messages: list, tokenizer, cut: bool = False) -> str | None:
    """The completion text of ``messages`` after a conversational prompt: the rest of the full render
    (so it ends with the template's end of turn); None when the prompt render is not its prefix.
    ``cut``: the reply was cut by the sampler's length limit, so it ends with its last sampled text."""
    full = tokenizer.apply_chat_template(list(prompt) + list(messages), tokenize=False)
    if not full.startswith(prompt_text):
        return None
    completion = full[len(prompt_text):]
    end = completion.rfind(messages[-1]["content"]) if cut else -1
    return completion[: end + len(messages[-1]["content"])] if end >= 0 else completion


def render(example: PreferenceExample, tokenizer) -> tuple[str, str, str] | None:
    """``(prompt_text, chosen_text, rejected_text)`` for one example; None on a template prefix mismatch.

    Text formats pass through unchanged. Conversational examples go through the chat template:
    the prompt with the generation prompt appended, each completion as the rest of the full
    render. Raises ``DataError`` if the tokenizer has no chat template.
    """
    if isinstance(example.prompt, str):
        return example.prompt, example.chosen, example.rejected
    try:
        prompt_text = render_prompt(example.prompt, tokenizer)
    except DataError as e:
        raise DataError(f"row {example.row}: field 'prompt': {e}") from None
    completions = [render_reply(example.prompt, prompt_text, messages, tokenizer, cut)
                   for messages, cut in zip((example.chosen, example.rejected), example.truncated)]
    return None if None in completions else (prompt_text, completions[0], completions[1])


def encode_prompts(texts: list[str], tokenizer) -> list[list[int]]:
    """Rendered prompt texts -> ids, the one rule every command uses: special tokens added (a BOS
    where the tokenizer adds one), and a BOS the chat template also wrote removed."""
    ids = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    if not _adds_bos(tokenizer):
        return ids
    bos = tokenizer.bos_token_id
    return [p[1:] if p[:2] == [bos, bos] else p for p in ids]


def encode_completions(texts: list[str], tokenizer, add_eos: list[bool]) -> list[list[int]]:
    """Completion texts -> ids (no special tokens); EOS appended where ``add_eos`` says so (whole
    text responses) unless the text already ends with it or the tokenizer has none."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [c + [eos] if add and eos is not None and c and c[-1] != eos else c for c, add in zip(ids, add_eos)]


def encode(prompt, completion: str, tokenizer, max_length: int = 1024, max_prompt_length: int = 512,
           full_response: bool = True) -> tuple[list[int], list[int]] | None:
    """(prompt_ids, completion_ids) of one response exactly as ``tokenize_examples`` builds a pair's;
    None if the template cannot render it or nothing fits (training drops such rows).

    prompt: text, or messages (the response becomes the assistant's reply). full_response: the
    completion is a whole response, so it ends with EOS (text) or the template's end of turn
    (messages); False for sampled text scored as it was generated (as a sampler-cut reply).
    """
    prompt_text = render_prompt(prompt, tokenizer)
    if isinstance(prompt, str):
        completion_text = completion
    else:
        completion_text = render_reply(prompt, prompt_text, [{"role": "assistant", "content": completion}],
                                       tokenizer, cut=not full_response)
        if completion_text is None:
            return None
    p = encode_prompts([prompt_text], tokenizer)[0]
    c = encode_completions([completion_text], tokenizer, [full_response and isinstance(prompt, str)])[0]
    if not p or not c:
        return None
    cut = truncate(p, c, c, max_length, max_prompt_length, keep_first=_adds_bos(tokenizer))
    return None if cut is None else (list(cut[0]), list(cut[1]))


def _adds_bos(tokenizer) -> bool:
    """Whether ``add_special_tokens=True`` puts a BOS in front (it does for Llama, not for GPT-2/SmolLM2)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int,
             max_prompt_length: int, keep_first: bool = False):
    """TRL's rule. Returns ``(prompt, chosen, rejected, was_truncated)`` or None if the prompt leaves no room.

    If ``len(prompt) + max(len(chosen), len(rejected)) > max_length``: keep the LAST
    ``max_prompt_length`` prompt tokens (with ``keep_first``: the first token, i.e. BOS, plus the
    last ``max_prompt_length - 1``); if still too long, cut both completions from the right to
    ``max_length - len(prompt)``.
    """
    longest = max(len(chosen), len(rejected))
    if len(prompt) + longest <= max_length:
        return prompt, chosen, rejected, False
    if len(prompt) > max_prompt_length:
        if keep_first and max_prompt_length > 1:
            prompt = prompt[:1] + prompt[len(prompt) - (max_prompt_length - 1):]
        else:
            prompt = prompt[len(prompt) - max_prompt_length:]
    room = max_length - len(prompt)
    if room <= 0:
        return None
    return prompt, chosen[:room], rejected[:room], True


def _render_all(examples, tokenizer, report: DataReport) -> tuple[list[PreferenceExample], list[tuple]]:
    """Render every example; drop those the chat template cannot render as prompt + completion."""
    if any(not isinstance(e.prompt, str) for e in examples) and not _has_chat_template(tokenizer):
        first = next(e for e in examples if not isinstance(e.prompt, str))
        raise DataError(f"{report.source}: row {first.row}: field 'prompt': conversational data needs a "
                        f"tokenizer with a chat template; {getattr(tokenizer, 'name_or_path', '')} has none")
    kept, texts = [], []
    for ex in examples:
        try:
            rendered = render(ex, tokenizer)
        except jinja2.TemplateError:
            report.drop("chat template error", ex.row)
            continue
        if rendered is None:
            report.drop("template prefix mismatch", ex.row)
            continue
        kept.append(ex)
        texts.append(rendered)
    return kept, texts


def tokenize_examples(examples: Sequence[PreferenceExample], tokenizer, report: DataReport, max_length: int,
                      max_prompt_length: int) -> list[TokenizedPair]:
    """Tokenise and truncate. Returns one ``TokenizedPair`` per kept example, in order.

    Updates ``report`` in place: drops (with reasons), ``truncated`` (pairs cut in any way) and
    ``kept`` (set to the number of pairs returned).
    """
    if max_length < 2 or max_prompt_length < 1:
        # A pair needs at least one prompt token to predict the first completion token from.
        raise ValueError(f"need max_length >= 2 and max_prompt_length >= 1, got {max_length}, {max_prompt_length}")
    examples, texts = _render_all(list(examples), tokenizer, report)
    if not texts:
        report.kept = 0
        return []
    prompts, chosens, rejecteds = (list(t) for t in zip(*texts))
    # Batch calls: the fast tokenizer parallelises and avoids per-call Python overhead.
    p_ids = encode_prompts(prompts, tokenizer)
    text = [isinstance(ex.prompt, str) for ex in examples]  # EOS only after whole text completions
    c_ids = encode_completions(chosens, tokenizer, [t and not ex.truncated[0] for t, ex in zip(text, examples)])
    r_ids = encode_completions(rejecteds, tokenizer, [t and not ex.truncated[1] for t, ex in zip(text, examples)])
    adds_bos = _adds_bos(tokenizer)
    pairs = []
    fp = fingerprint(tokenizer) if any(ex.sampled is not None for ex in examples) else {}
    for ex, p, c, r in zip(examples, p_ids, c_ids, r_ids):
        sampled = pick_ids(ex.sampled, fp, report)
        if sampled is not None:  # exactly what was sampled: a stop token iff the sampler drew one
            p, c, r = sampled
        if not p:  # nothing to predict the first completion token from
            report.drop("empty prompt", ex.row)
            continue
        if not c or not r:
            report.drop("empty completion", ex.row)
            continue
        cut = truncate(p, c, r, max_length, max_prompt_length, keep_first=adds_bos)
        if cut is None:
            report.drop("prompt does not fit", ex.row)
            continue
        p, c, r, was_cut = cut
        if was_cut and c == r:
            report.drop("chosen == rejected after truncation", ex.row)
            continue
        report.truncated += was_cut
        if any(ex.truncated):  # not `truncated` above (that is max_length): said apart so "0 truncated" is not misread
            report.note(NOTE_SAMPLER_CUT)
        pairs.append(TokenizedPair(ex.row, list(p), list(c), list(r)))
    report.kept = len(pairs)
    return pairs


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over what decides the ids: vocabulary/merges/normaliser, special tokens, chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocab, merges, normaliser, pre/post-processors in one string
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    meta = [type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), len(tokenizer),
            tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(tokenizer, "chat_template", None)]
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(source: str, tokenizer, settings: dict) -> str:
    parts = {"version": CACHE_VERSION, "source": source_fingerprint(source),
             "tokenizer": tokenizer_fingerprint(tokenizer), "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _flat(lists: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Flat int32 ids + int64 offsets (``ids[off[i]:off[i+1]]`` is list i)."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in lists])
    ids = np.fromiter((t for x in lists for t in x), dtype=np.int32, count=int(offsets[-1]))
    return ids, offsets


def _unflat(ids: np.ndarray, offsets: np.ndarray) -> list[list[int]]:
    flat = ids.tolist()
    bounds = offsets.tolist()
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def save_cache(path: Path, pairs: list[TokenizedPair], report: DataReport) -> None:
    """Write pairs + report to ``path`` (.npz) atomically: a crash never leaves a half file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"rows": np.array([p.row for p in pairs], dtype=np.int64),
              "report": np.array(json.dumps(report.to_dict()))}
    for name in ("prompt", "chosen", "rejected"):
        arrays[f"{name}_ids"], arrays[f"{name}_offsets"] = _flat([getattr(p, f"{name}_ids") for p in pairs])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_cache(path: Path) -> tuple[list[TokenizedPair], DataReport] | None:
    """Pairs + report from ``path``, or None if it is missing or unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            report = DataReport.from_dict(json.loads(str(z["report"][()])))
            rows = z["rows"].tolist()
            cols = [_unflat(z[f"{n}_ids"], z[f"{n}_offsets"]) for n in ("prompt", "chosen", "rejected")]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [TokenizedPair(r, p, c, j) for r, p, c, j in zip(rows, *cols)], report


def load_pairs(source: str, tokenizer, *, max_length: int, max_prompt_length: int, prompt_column="prompt",
               chosen_column="chosen", rejected_column="rejected", split="train",
               cache_dir: str | None = None) -> tuple[list[TokenizedPair], DataReport]:
    """``read_rows`` -> ``normalise`` -> ``tokenize_examples``, cached under ``cache_dir`` if given.

    The cache key covers the data (file bytes; folder path + mtimes; hub name), the tokenizer
    (``tokenizer_fingerprint``) and every setting, so any change rebuilds. A hit returns pairs and
    a report equal to the ones first computed (``report.source`` is set to this call's ``source``).
    """
    source = str(source)
    settings = dict(max_length=max_length, max_prompt_length=max_prompt_length, prompt_column=prompt_column,
                    chosen_column=chosen_column, rejected_column=rejected_column, split=split)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"pairs-{_cache_key(source, tokenizer, settings)[:40]}.npz"
        hit = load_cache(path) if path.is_file() else None
        if hit is not None:
            hit[1].source = source
            return hit
    examples, report = normalise(read_rows(source, split), source, prompt_column, chosen_column, rejected_column)
    pairs = tokenize_examples(examples, tokenizer, report, max_length, max_prompt_length)
    if path is not None:
        save_cache(path, pairs, report)
    return pairs, report


def split_eval(pairs: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic random split into ``(train, eval)``, each in source order.

    ``round(len * fraction)`` pairs go to eval, at least 1 when ``fraction > 0`` and there are 2 or
    more pairs, and never all of them. Same pairs + fraction + seed -> same split.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"eval fraction must be in [0, 1), got {fraction}")
    n = len(pairs)
    if fraction == 0 or n < 2:
        return list(pairs), []
    k = min(n - 1, max(1, round(n * fraction)))
    chosen = set(random.Random(seed).sample(range(n), k))
    train = [p for i, p in enumerate(pairs) if i not in chosen]
    held = [p for i, p in enumerate(pairs) if i in chosen]
    return train, held

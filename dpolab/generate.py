"""`dpolab generate`: sample K completions per prompt, score them, write preference pairs.

Sampling (`sample`) is batched Hugging Face generation with left padding, stopping at EOS or
the end-of-turn token. Every row (prompt i, sample j) draws its randomness from its own
generator seeded by (seed, i, j), through the Gumbel-max trick: the next token is
`argmax(logits / T + Gumbel noise)` after top-p filtering, which is an exact sample from the
tempered, truncated softmax. So a completion depends on the seed and its prompt index only,
not on the batch size or on which other prompts share its batch.

Prompts: plain text is continued as text (a review opening is completed, not answered);
message lists always go through the chat template; `chat=True` wraps plain text as one user
message. Pairs keep that choice: text prompts give text pairs, chat prompts give the
conversational format, so `dpolab train` sees exactly the tokens that were sampled from.

Pairing per prompt (scores s_1..s_K): `best-vs-worst` (argmax vs argmin), `random` (two
distinct samples), `all` (every pair). Pairs with equal scores are ties and dropped; pairs
whose gap is under `min_gap` are dropped too; both are counted. Label noise for robustness
studies: `bt_temperature` T > 0 keeps the higher-scored completion as chosen with probability
sigmoid((r_w - r_l) / T) (Bradley-Terry) instead of always; `flip_rate` then swaps that
fraction of pairs. Output rows: {prompt, chosen, rejected, chosen_score, rejected_score,
prompt_index, chosen_sample, rejected_sample, flipped, chosen_truncated, rejected_truncated,
prompt_ids, chosen_ids, rejected_ids, sampled_with} (the sampled token ids: see data/sampled.py).

Resumable: a progress file next to the output (`<output>.progress.jsonl`) records the settings
and every finished prompt; a rerun with the same settings appends and skips finished prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

from .config import PAIR_STRATEGIES as STRATEGIES, GenerateConfig, resolve
from .data.sampled import fingerprint, row_fields
from .prompts import BUILTIN_PROMPTS, encode_prompt, prompt_text, read_prompts, review_prefix  # noqa: F401 (re-exported)

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")


# ----------------------------------------------------------------------------- sampling
def sample(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 48,
           temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
           chat: bool = False, autocast=None, on_batch=None, prompt_indices=None) -> list[list[str]]:
    """`num_samples` completions for each prompt (text or messages): out[i][j] is sample j of prompt i.

    Deterministic in (seed, i, j) whatever the batch size; `prompt_indices` replaces i in the
    seed (a prompt's index in a larger set). `autocast`: a context factory (bf16). `on_batch(n)`
    is called after each batch with the number of sequences done (for progress bars).
    """
    ids = sample_ids(model, tokenizer, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, chat=chat,
                     autocast=autocast, on_batch=on_batch, prompt_indices=prompt_indices)
    return [[tokenizer.decode(c, skip_special_tokens=True) for c in row] for row in ids]


def sample_ids(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 48,
               temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
               chat: bool = False, autocast=None, on_batch=None, prompt_indices=None,
               keep_stop: bool = False) -> list[list[list[int]]]:
    """Like `sample` but returns the completion token ids (the stop token excluded, unless `keep_stop`)."""
    import contextlib

    check_sampling(num_samples, max_new_tokens, temperature, top_p, batch_size)
    prompt_ids = [encode_prompt(p, tokenizer, chat) for p in prompts]
    seed_index = list(prompt_indices) if prompt_indices is not None else list(range(len(prompts)))
    rows = [(i, j) for i in range(len(prompts)) for j in range(num_samples)]
    rows.sort(key=lambda r: len(prompt_ids[r[0]]))  # similar lengths together: less padding
    out: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prompts]
    stops = stop_token_ids(tokenizer, model)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        with autocast() if autocast else contextlib.nullcontext():
            done = _generate_batch(model, tokenizer, [prompt_ids[i] for i, _ in chunk],
                                   [row_seed(seed, seed_index[i], j) for i, j in chunk], max_new_tokens, temperature, top_p, stops,
                                   keep_stop)
        for (i, j), completion in zip(chunk, done):
            out[i][j] = completion
        if on_batch:
            on_batch(len(chunk))
    return out


def check_sampling(num_samples: int, max_new_tokens: int, temperature: float, top_p: float, batch_size: int) -> None:
    checks = [(num_samples >= 1, "num_samples must be >= 1"), (max_new_tokens >= 1, "max_new_tokens must be >= 1"),
              (temperature >= 0, "temperature must be >= 0"), (0 < top_p <= 1, "top_p must be in (0, 1]"),
              (batch_size >= 1, "batch_size must be >= 1")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """EOS plus the end-of-turn tokens this vocabulary knows (chat models end turns with those)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids |= {vocab[t] for t in STOP_TOKENS if t in vocab}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return sorted(ids)


def row_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """An independent 63-bit seed per (seed, prompt, sample)."""
    import numpy as np

    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, prompt_index, sample_index]).generate_state(2, np.uint64)[0] >> 1)


def _generate_batch(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int,
                    temperature: float, top_p: float, stops: list[int], keep_stop: bool = False) -> list[list[int]]:
    """One left-padded generate call; returns each row's completion ids up to its first stop token."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    width = max(len(p) for p in prompt_ids)
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids], device=device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad)
    processors = LogitsProcessorList([GumbelSampler(seeds, temperature, top_p)])
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=config,
                             logits_processor=processors)
    completions = []
    for row in out[:, width:].tolist():
        cut = next((k for k, t in enumerate(row) if t in stops), len(row))
        completions.append(row[: cut + 1] if keep_stop and cut < len(row) else row[:cut])
    return completions


class GumbelSampler:
    """Logits processor turning greedy decoding into per-row seeded sampling.

    argmax(log_softmax(z / T) + G) with G ~ Gumbel(0, 1) i.i.d. is distributed as softmax(z / T);
    each row's G comes from its own generator, so rows never share random numbers.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        if self.temperature == 0:
            return scores
        scores = scores.float() / self.temperature
        if self.top_p < 1:
            scores = top_p_filter(scores, self.top_p)
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1 - 1e-7)))
        return scores + gumbel.to(scores.device)


def top_p_filter(scores, top_p: float):
    """Set to -inf every token outside the smallest set whose probability reaches top_p (B, V)."""
    import torch

    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
    return scores.scatter(-1, order, sorted_scores.masked_fill(outside, -math.inf)) if outside.any() else scores


# ----------------------------------------------------------------------------- pairs and label noise
def make_pairs(scores: list[float], strategy: str, min_gap: float = 0.0, rng: random.Random | None = None):
    """Index pairs (higher, lower) for one prompt's K scores, and counts of what was dropped.

    Returns (pairs [(i, j), ...] with scores[i] > scores[j], {"ties": n, "below_gap": n}).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"pair_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    k = len(scores)
    if strategy == "best-vs-worst":
        best = max(range(k), key=lambda i: (scores[i], -i))  # first of the best
        worst = min(range(k), key=lambda i: (scores[i], i))  # first of the worst
        candidates = [(best, worst)] if k >= 2 else []
    elif strategy == "random":
        candidates = [tuple((rng or random.Random(0)).sample(range(k), 2))] if k >= 2 else []
    else:
        candidates = [(i, j) for i in range(k) for j in range(i + 1, k)]
    pairs, dropped = [], {"ties": 0, "below_gap": 0}
    for i, j in candidates:
        gap = abs(scores[i] - scores[j])
        if gap == 0:
            dropped["ties"] += 1
        elif gap < min_gap:
            dropped["below_gap"] += 1
        else:
            pairs.append((i, j) if scores[i] > scores[j] else (j, i))
    return pairs, dropped


def noisy_label(high: float, low: float, rng: random.Random, flip_rate: float = 0.0,
                bt_temperature: float = 0.0) -> bool:
    """Whether a pair (higher score first) is swapped by label noise.

    bt_temperature T > 0: keep the order with probability sigmoid((high - low) / T); then
    flip_rate swaps the outcome with that probability.
    """
    swapped = False
    if bt_temperature > 0:
        p_keep = 1.0 / (1.0 + math.exp(-(high - low) / bt_temperature))
        swapped = rng.random() >= p_keep
    if flip_rate > 0 and rng.random() < flip_rate:
        swapped = not swapped
    return swapped


def pair_rows(prompt, prompt_index: int, completions: list[str], scores: list[float], cfg, chat: bool,
              truncated: list[bool] | None = None, token_ids: tuple | None = None):
    """Output rows of one prompt and its drop counts; `truncated[j]`: sample j hit max_new_tokens.

    `token_ids`: ``(prompt_ids, [ids of sample j], tokenizer fingerprint)``, written into each row so
    training sees exactly the sampled tokens (data/sampled.py).
    """
    rng = random.Random(f"{cfg.seed}:{prompt_index}")  # str seeds are stable across runs
    pairs, dropped = make_pairs(scores, cfg.pair_strategy, cfg.min_gap, rng)
    rows = []
    for i, j in pairs:
        flipped = noisy_label(scores[i], scores[j], rng, cfg.flip_rate, cfg.bt_temperature)
        w, l = (j, i) if flipped else (i, j)
        rows.append({
            "prompt": as_messages(prompt) if chat or not isinstance(prompt, str) else prompt,
            "chosen": as_reply(completions[w], prompt, chat), "rejected": as_reply(completions[l], prompt, chat),
            "chosen_score": scores[w], "rejected_score": scores[l], "prompt_index": prompt_index,
            "chosen_sample": w, "rejected_sample": l, "flipped": flipped,
            **({"chosen_truncated": truncated[w], "rejected_truncated": truncated[l]} if truncated is not None else {}),
            **(row_fields(token_ids[0], token_ids[1][w], token_ids[1][l], token_ids[2]) if token_ids else {}),
        })
    return rows, dropped


def as_messages(prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def as_reply(text: str, prompt, chat: bool):
    return [{"role": "assistant", "content": text}] if chat or not isinstance(prompt, str) else text


# ----------------------------------------------------------------------------- the command
def generate(cfg: GenerateConfig | None = None, **overrides) -> dict:
    """Sample, score and pair every prompt; append to cfg.output. Returns counts and the output path."""
    from .models import bf16_default, load_model, load_tokenizer, pick_device

    cfg = cfg or resolve(GenerateConfig, **overrides)
    check_generate(cfg)
    prompts = read_prompts(cfg.prompts, cfg.prompt_column, cfg.limit, cfg.prefix_words)
    reward_fn = reward_from_config(cfg)
    out = Path(cfg.output)
    done = resume_state(out, settings(cfg, prompts), cfg.overwrite)
    todo = [i for i in range(len(prompts)) if i not in done]
    totals = {"prompts": len(prompts), "skipped": len(done), "pairs": 0, "ties": 0, "below_gap": 0, "flipped": 0}
    if todo:
        device = pick_device(cfg.device)
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
        model = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code).to(device).eval()
        use_bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and bf16_default(device))
        autocast = _autocast(device) if use_bf16 else None
        with SampleProgress(len(todo) * cfg.num_samples, cfg.progress) as bar:
            for start in range(0, len(todo), max(1, cfg.batch_size // cfg.num_samples)):
                chunk = todo[start : start + max(1, cfg.batch_size // cfg.num_samples)]
                write_chunk(model, tokenizer, prompts, chunk, reward_fn, cfg, out, totals, autocast, bar.advance)
    totals["output"] = str(out)
    print(f"dpolab generate: {totals['pairs']} pairs from {len(todo)} prompts -> {out} "
          f"({totals['ties']} ties and {totals['below_gap']} below min_gap dropped, {totals['flipped']} labels flipped, "
          f"{totals['skipped']} prompts already done)")
    return totals


def check_generate(cfg: GenerateConfig) -> None:
    check_sampling(cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.batch_size)
    checks = [
        (cfg.pair_strategy in STRATEGIES, f"pair_strategy must be one of {', '.join(STRATEGIES)}"),
        (cfg.num_samples >= 2, "num_samples must be >= 2 to make pairs"),
        (0 <= cfg.flip_rate <= 1, "flip_rate must be in [0, 1]"),
        (cfg.bt_temperature >= 0, "bt_temperature must be >= 0"),
        (cfg.min_gap >= 0, "min_gap must be >= 0"),
        (cfg.bf16 in ("auto", "true", "false"), "bf16 must be auto, true or false"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def reward_from_config(cfg):
    """The reward function a Generate/Experiment config names (see `rewards.reward_from_config`)."""
    from .rewards import reward_from_config as from_config

    return from_config(cfg)


def write_chunk(model, tokenizer, prompts, chunk, reward_fn, cfg, out: Path, totals: dict, autocast, advance) -> None:
    """Sample, score and pair the prompts `chunk`; append their rows, then mark them done."""
    batch = [prompts[i] for i in chunk]
    ids = sample_ids(model, tokenizer, batch, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                     temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
                     chat=cfg.chat, autocast=autocast, on_batch=advance, prompt_indices=chunk, keep_stop=True)
    stops = set(stop_token_ids(tokenizer, model))
    # no stop token at the end: the sampler cut it at max_new_tokens (training must not add EOS there)
    cut = [[not c or c[-1] not in stops for c in row] for row in ids]
    texts = [[tokenizer.decode(c if k else c[:-1], skip_special_tokens=True) for c, k in zip(row, cuts)]
             for row, cuts in zip(ids, cut)]
    fp = fingerprint(tokenizer)
    flat_prompts = [prompt_text(p) for p in batch for _ in range(cfg.num_samples)]
    scores = reward_fn(flat_prompts, [c for row in texts for c in row])
    k = cfg.num_samples
    with open(out, "a", encoding="utf-8") as pairs_file, open(progress_path(out), "a", encoding="utf-8") as log:
        for n, i in enumerate(chunk):
            rows, dropped = pair_rows(prompts[i], i, texts[n], [float(s) for s in scores[n * k : (n + 1) * k]], cfg,
                                      cfg.chat, cut[n], (encode_prompt(prompts[i], tokenizer, cfg.chat), ids[n], fp))
            for row in rows:
                pairs_file.write(json.dumps(row, ensure_ascii=False) + "\n")
            totals["pairs"] += len(rows)
            totals["ties"] += dropped["ties"]
            totals["below_gap"] += dropped["below_gap"]
            totals["flipped"] += sum(r["flipped"] for r in rows)
        pairs_file.flush()
        for i in chunk:  # written after the pairs: a crash in between re-does these prompts
            log.write(json.dumps({"prompt_index": i}) + "\n")


def settings(cfg: GenerateConfig, prompts: list) -> dict:
    """What decides the output: a resumed file must have been written with the same values."""
    keep = ("model", "reward", "reward_model", "reward_pattern", "reward_absent", "reward_target_length", "num_samples",
            "max_new_tokens", "temperature", "top_p", "seed", "chat", "pair_strategy", "min_gap", "flip_rate",
            "bt_temperature")
    values = {k: v for k, v in asdict(cfg).items() if k in keep}
    values["prompts_sha256"] = hashlib.sha256(json.dumps(prompts, sort_keys=True).encode()).hexdigest()[:16]
    return values


def progress_path(out: Path) -> Path:
    return out.with_name(out.name + ".progress.jsonl")


def resume_state(out: Path, current: dict, overwrite: bool) -> set[int]:
    """Prompt indices already done in `out` (after dropping rows of unfinished prompts)."""
    log = progress_path(out)
    if not overwrite and not log.exists() and out.exists() and out.stat().st_size > 0:
        raise ValueError(f"{out} exists and has no {log.name} to resume from: pass --overwrite to replace it")
    if overwrite or not log.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("")
        log.write_text(json.dumps({"settings": current}) + "\n")
        return set()
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not records or records[0].get("settings") != current:
        changed = sorted(k for k in current if not records or records[0].get("settings", {}).get(k) != current[k])
        raise ValueError(f"{out} was generated with other settings ({', '.join(changed)}): "
                         "pass --overwrite to start over or choose another --output")
    done = {r["prompt_index"] for r in records[1:] if "prompt_index" in r}
    rows = [line for line in out.read_text(encoding="utf-8").splitlines() if line.strip()] if out.exists() else []
    kept = [line for line in rows if json.loads(line).get("prompt_index") in done]
    if len(kept) != len(rows):  # rows of a prompt interrupted before it was marked done
        out.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return done


def _autocast(device):
    import torch

    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class SampleProgress:
    """A rich progress bar counting sampled sequences, with samples/s (or nothing when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.start, self.done = total, enabled, time.perf_counter(), 0
        self.bar = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("[bold]samples"), MofNCompleteColumn(), BarColumn(), TimeElapsedColumn(),
                                TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[rate]}"),
                                console=Console(stderr=True))
            self.task = self.bar.add_task("generate", total=self.total, rate="")
            self.bar.start()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.2f} samples/s")

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False

"""`dpolab generate`: sample K completions per prompt, score them, write preference pairs.

Sampling (`sample`, from `dpolab.sampling`) is batched generation seeded per (seed, prompt,
sample): a completion depends on the seed and its prompt index only, not on the batch size
or on which other prompts share its batch.

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
from dataclasses import asdict
from pathlib import Path

from .config import PAIR_STRATEGIES as STRATEGIES, GenerateConfig, resolve
from .data.files import json_lines
from .data.sampled import fingerprint, row_fields
from .metrics import ItemProgress, counted
from .models import bf16_default, load_model, load_tokenizer, pick_device
from .prompts import BUILTIN_PROMPTS, encode_prompt, prompt_text, read_prompts, review_prefix  # noqa: F401 (re-exported)
from .rewards import reward_from_config as _reward_from_config
# the sampler lives in sampling.py; `dpolab.generate.sample` is the documented entry point, so re-exported
from .sampling import (STOP_TOKENS, GumbelSampler, autocast_factory, check_sampling, draw, row_seed, sample,  # noqa: F401
                       sample_ids, stop_token_ids, top_p_filter)


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
    cfg = cfg or resolve(GenerateConfig, **overrides)
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
        autocast = autocast_factory(device, use_bf16)
        with ItemProgress("generate", len(todo) * cfg.num_samples, "sample", cfg.progress, transient=False) as bar:
            for start in range(0, len(todo), max(1, cfg.batch_size // cfg.num_samples)):
                chunk = todo[start : start + max(1, cfg.batch_size // cfg.num_samples)]
                write_chunk(model, tokenizer, prompts, chunk, reward_fn, cfg, out, totals, autocast, bar.advance)
    totals["output"] = str(out)
    print(f"dpolab generate: {counted(totals['pairs'], 'pair')} from {counted(len(todo), 'prompt')} -> {out} "
          f"({counted(totals['ties'], 'tie')} and {totals['below_gap']} below min_gap dropped, "
          f"{counted(totals['flipped'], 'label')} flipped, {counted(totals['skipped'], 'prompt')} already done)")
    return totals


def reward_from_config(cfg):
    """The reward function a Generate/Experiment config names (see `rewards.reward_from_config`)."""
    return _reward_from_config(cfg)


def write_chunk(model, tokenizer, prompts, chunk, reward_fn, cfg, out: Path, totals: dict, autocast, advance) -> None:
    """Sample, score and pair the prompts `chunk`; append their rows, then mark them done."""
    batch = [prompts[i] for i in chunk]
    drawn = draw(model, tokenizer, batch, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens,
                 temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size,
                 chat=cfg.chat, autocast=autocast, on_batch=advance, prompt_indices=chunk, keep_stop=True)
    ids, texts = drawn.by_prompt(drawn.completion_ids), drawn.by_prompt(drawn.texts)  # texts without the stop token
    stops = set(stop_token_ids(tokenizer, model))
    # no stop token at the end: the sampler cut it at max_new_tokens (training must not add EOS there)
    cut = [[not c or c[-1] not in stops for c in row] for row in ids]
    fp = fingerprint(tokenizer)
    flat_prompts = [prompt_text(p) for p in batch for _ in range(cfg.num_samples)]
    scores = reward_fn(flat_prompts, [c for row in texts for c in row])
    k = cfg.num_samples
    with open(out, "a", encoding="utf-8") as pairs_file, open(progress_path(out), "a", encoding="utf-8") as log:
        for n, i in enumerate(chunk):
            rows, dropped = pair_rows(prompts[i], i, texts[n], [float(s) for s in scores[n * k : (n + 1) * k]], cfg,
                                      cfg.chat, cut[n], (drawn.prompt_ids[n * k], ids[n], fp))
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
    records = [json.loads(line) for line in json_lines(log)]
    if not records or records[0].get("settings") != current:
        changed = sorted(k for k in current if not records or records[0].get("settings", {}).get(k) != current[k])
        raise ValueError(f"{out} was generated with other settings ({', '.join(changed)}): "
                         "pass --overwrite to start over or choose another --output")
    done = {r["prompt_index"] for r in records[1:] if "prompt_index" in r}
    rows = json_lines(out) if out.exists() else []
    kept = [line for line in rows if json.loads(line).get("prompt_index") in done]
    if len(kept) != len(rows):  # rows of a prompt interrupted before it was marked done
        out.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return done

"""Sampling completions: one seeded, batched implementation for `generate`, `eval`, `rank` and the experiment.

Batched Hugging Face generation with left padding, stopping at EOS or an end-of-turn token.
Every row (prompt i, sample j) draws its randomness from its own generator seeded by
(seed, i, j), through the Gumbel-max trick: the next token is `argmax(logits / T + Gumbel
noise)` after top-p filtering, which is an exact sample from the tempered, truncated softmax.
So a completion depends on the seed and its prompt index only, not on the batch size or on
which other prompts share its batch; two models sampled with the same seed share their noise
(common random numbers: a policy equal to the reference gives identical samples).

Prompts are encoded by `prompts.encode_prompt` (the training rule). `draw` returns exactly the
sampled token ids (stop token excluded; `keep_stop` keeps it, for the rows `generate` writes)
with their prompts' ids, so `sequence_kl` scores the very tokens that were sampled, never a
re-tokenisation of their text.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, LogitsProcessorList

from .prompts import encode_prompt
from .stats import kl_estimate

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>")


@dataclass
class Samples:
    """num_samples completions per prompt, flattened prompt-major (sample j of prompt i at i*n + j)."""

    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]  # exactly the sampled tokens, the stop token excluded (kept with keep_stop)
    texts: list[str]
    num_samples: int = 1

    def by_prompt(self, values: list) -> list[list]:
        """A flat prompt-major list (texts, ids, rewards) as one list per prompt."""
        n = self.num_samples
        return [values[i : i + n] for i in range(0, len(values), n)]


def draw(model, tokenizer, prompts: list, *, num_samples: int = 1, max_new_tokens: int = 48, temperature: float = 1.0,
         top_p: float = 1.0, seed: int = 0, batch_size: int = 16, chat: bool = False, autocast=None, on_batch=None,
         prompt_indices=None, keep_stop: bool = False) -> Samples:
    """Sample `num_samples` completions of every prompt; ids and decoded texts (special tokens dropped).

    `keep_stop`: the completion ids end with the stop token the sampler drew (none when it was cut
    at `max_new_tokens`); the texts never include it."""
    prompt_ids = [encode_prompt(p, tokenizer, chat) for p in prompts]
    stops = stop_token_ids(tokenizer, model)
    ids = _sample_encoded(model, tokenizer, prompt_ids, num_samples, max_new_tokens, temperature, top_p, seed,
                          batch_size, autocast, on_batch, prompt_indices, stops, keep_stop)
    flat = [(prompt_ids[i], c) for i, row in enumerate(ids) for c in row]
    texts = [tokenizer.decode(c[:-1] if keep_stop and c and c[-1] in stops else c, skip_special_tokens=True)
             for _, c in flat]
    return Samples([p for p, _ in flat], [c for _, c in flat], texts, num_samples)


def settings(cfg) -> dict:
    """`draw`'s keyword arguments from an eval / rank config (same seed for every model compared)."""
    return dict(num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                top_p=cfg.top_p, seed=cfg.seed, batch_size=cfg.batch_size)


def sample(model, tokenizer, prompts: list, **kwargs) -> list[list[str]]:
    """`num_samples` completions for each prompt (text or messages): out[i][j] is sample j of prompt i.

    Deterministic in (seed, i, j) whatever the batch size; `prompt_indices` replaces i in the
    seed (a prompt's index in a larger set). `autocast`: a context factory (bf16). `on_batch(n)`
    is called after each batch with the number of sequences done (for progress bars).
    Keywords: those of `draw`.
    """
    drawn = draw(model, tokenizer, prompts, **kwargs)
    return drawn.by_prompt(drawn.texts)


def sample_ids(model, tokenizer, prompts: list, **kwargs) -> list[list[list[int]]]:
    """Like `sample` but returns the completion token ids (the stop token excluded, unless `keep_stop`)."""
    drawn = draw(model, tokenizer, prompts, **kwargs)
    return drawn.by_prompt(drawn.completion_ids)


def _sample_encoded(model, tokenizer, prompt_ids, num_samples, max_new_tokens, temperature, top_p, seed, batch_size,
                    autocast, on_batch, prompt_indices, stops: list[int], keep_stop: bool) -> list[list[list[int]]]:
    """out[i][j]: the completion ids of sample j of encoded prompt i."""
    check_sampling(num_samples, max_new_tokens, temperature, top_p, batch_size)
    seed_index = list(prompt_indices) if prompt_indices is not None else list(range(len(prompt_ids)))
    rows = [(i, j) for i in range(len(prompt_ids)) for j in range(num_samples)]
    rows.sort(key=lambda r: len(prompt_ids[r[0]]))  # similar lengths together: less padding
    out: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prompt_ids]
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
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, prompt_index, sample_index]).generate_state(2, np.uint64)[0] >> 1)


def _generate_batch(model, tokenizer, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int,
                    temperature: float, top_p: float, stops: list[int], keep_stop: bool = False) -> list[list[int]]:
    """One left-padded generate call; returns each row's completion ids up to its first stop token
    (with it when `keep_stop`)."""
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
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
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
    sorted_scores, order = scores.sort(dim=-1, descending=True)
    probs = sorted_scores.softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
    return scores.scatter(-1, order, sorted_scores.masked_fill(outside, -math.inf)) if outside.any() else scores


def autocast_factory(device, bf16: bool):
    """A context factory for `draw(autocast=...)`: bf16 autocast on `device`, or None (fp32)."""
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else None


def sequence_kl(pair, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 8,
                packing: bool = True, label: str = "") -> dict:
    """KL(pi || pi_ref) estimate from samples y ~ pi: mean and SE of log pi(y|x) - log pi_ref(y|x).

    `pair`: a `pair.ModelPair`. The log-probs are of the sampled token ids themselves (no
    re-tokenisation); an empty sample contributes 0. `label`: show progress under this name.
    """
    kept = [(p, c) for p, c in zip(prompt_ids, completion_ids) if c]
    policy_token_logps, reference_token_logps = pair.token_logps(kept, batch_size, packing, label)
    empty = len(completion_ids) - len(kept)
    policy_logps = [float(t.double().sum()) for t in policy_token_logps] + [0.0] * empty
    reference_logps = [float(t.double().sum()) for t in reference_token_logps] + [0.0] * empty
    mean, se = kl_estimate(policy_logps, reference_logps)
    return {"mean": mean, "se": se, "n": len(completion_ids), "empty_samples": empty}

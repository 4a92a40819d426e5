"""A policy and its reference, loaded together, giving log-probs of the same token ids.

Every evaluation-side command (score, eval, rank, the unpaired eval, the experiment's
measurements and the generation KL) holds its models as one `ModelPair`. Its `reference` is
one of two things:

- a model (frozen, eval mode; may be the policy object itself, then every reward is 0), or
- `ADAPTER`: the policy with its LoRA adapter switched off (same weights, no second copy).

`reference_path` decides which from what the user gave: `--ref-model`, else the base of a
LoRA adapter, else the `model` recorded in the run's config.yaml next to a checkpoint. The
training-side reference (which can also be a cached tensor) is mapped in `dpolab.reference`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.collate import Layout, collate, collate_pairs, to_device
from .logprobs import forward_logps, split_tokens
from .metrics import ItemProgress
from .models import (ModelError, bf16_default, load_model, load_tokenizer, pick_device, resolve_model_path,
                     run_config, same_tokenizer)

ADAPTER = "adapter"  # reference = the policy with its LoRA adapter disabled


def reference_path(model: str, ref_model: str = "") -> str:
    """The reference of `model`: `ref_model`, ADAPTER for a LoRA adapter, or the run config's model."""
    if ref_model:
        return ref_model
    path = Path(resolve_model_path(model))
    if (path / "adapter_config.json").exists():
        return ADAPTER
    recorded = run_config(model)
    if recorded.get("ref_model") or recorded.get("model"):
        return recorded.get("ref_model") or recorded["model"]
    raise ModelError(f"{model}: no reference model known: pass --ref-model "
                     "(automatic only for a LoRA adapter or a checkpoint inside a dpolab run)")


@dataclass
class ModelPair:
    """A policy and its reference, ready to give log-probs of the same token ids."""

    policy: object
    reference: object  # a model, or ADAPTER
    tokenizer: object
    device: object
    bf16: bool
    names: tuple[str, str]

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def with_policy(self, policy, name: str) -> ModelPair:
        """The same reference (and tokenizer, device, precision) with another policy."""
        return dataclasses.replace(self, policy=policy, names=(name, self.names[1]))

    @contextlib.contextmanager
    def reference_model(self):
        """The reference as a model (for generation); for an adapter, the base while inside."""
        if self.reference is ADAPTER:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.reference

    def token_logps(self, items, batch_size: int, packing: bool = True, label: str = ""):
        """items [(prompt_ids, completion_ids)] -> (policy per-token logps, reference per-token logps),
        each a list of (len_i,) fp32 CPU tensors. `label`: show progress under this name ("" = none)."""
        run = lambda model, advance: batched_token_logps(model, items, self, batch_size, packing, advance)  # noqa: E731
        return self._both(run, len(items), label, "sequence")

    def pair_token_logps(self, pairs, batch_size: int, packing: bool = True, label: str = "", reference_token_logps=None):
        """TokenizedPairs -> (policy, reference) per-token logps of [every chosen..., every rejected...],
        the training fast path: each prompt computed once for both completions (prefix sharing).
        `reference_token_logps`: the reference's, when already computed (rank: runs sharing one)."""
        run = lambda model, advance: batched_pair_token_logps(model, pairs, self, batch_size, packing, advance)  # noqa: E731
        return self._both(run, len(pairs), label, "pair", reference_token_logps)

    def _both(self, run, total: int, label: str, unit: str, reference_token_logps=None):
        """`run(model, advance)` on the reference (unless given), then on the policy (once when
        they are one model)."""
        one = self.reference is self.policy  # one model asked to be its own reference: rewards are 0
        if reference_token_logps is None:
            with self.reference_model() as reference, \
                    ItemProgress(label if one else f"{label} (reference)", total, unit, bool(label)) as bar:
                reference_token_logps = run(reference, bar.advance)
        if one:
            return reference_token_logps, reference_token_logps
        with ItemProgress(f"{label} (policy)", total, unit, bool(label)) as bar:
            return run(self.policy, bar.advance), reference_token_logps


def load_frozen(name: str, device, trust_remote_code: bool = False):
    """A model in eval mode on `device` with gradients off (a reference, a baseline, a judge's policy)."""
    model = load_model(name, trust_remote_code=trust_remote_code).to(device).eval()
    model.requires_grad_(False)
    return model


def load_reference(name: str, device: str = "auto", trust_remote_code: bool = False) -> ModelPair:
    """A frozen model as its own pair (rewards 0); `with_policy` then measures policies against it."""
    dev = pick_device(device)
    model = load_frozen(name, dev, trust_remote_code)
    return ModelPair(model, model, load_tokenizer(name, trust_remote_code), dev, False, (name, name))


def load_model_pair(model: str, ref_model: str = "", *, device: str = "auto", bf16: str = "false",
                    trust_remote_code: bool = False) -> ModelPair:
    """Load the policy and its reference; different tokenizers stop here with one clear line."""
    if bf16 not in ("auto", "true", "false"):
        raise ValueError("bf16 must be auto, true or false")
    tokenizer = load_tokenizer(model, trust_remote_code)  # first: a model that cannot load says so before its reference
    ref = reference_path(model, ref_model)
    same = ref != ADAPTER and Path(resolve_model_path(ref)).resolve() == Path(resolve_model_path(model)).resolve()
    if ref != ADAPTER and not same and not same_tokenizer(tokenizer, load_tokenizer(ref, trust_remote_code)):
        raise ModelError(f"model {model} and reference {ref} use different tokenizers: "
                         "the implicit reward compares log-probs of the same token ids")
    dev = pick_device(device)
    policy = load_frozen(model, dev, trust_remote_code)
    reference = ADAPTER if ref == ADAPTER else policy if same else load_frozen(ref, dev, trust_remote_code)
    use_bf16 = bf16 == "true" or (bf16 == "auto" and bf16_default(dev))
    if ref == ADAPTER:
        base = json.loads(Path(resolve_model_path(model), "adapter_config.json").read_text()).get("base_model_name_or_path")
        ref = f"{base} (the adapter's base)"
    return ModelPair(policy, reference, tokenizer, dev, use_bf16, (model, ref))


def batched_token_logps(model, items, pair: ModelPair, batch_size: int, packing: bool = True, on_batch=None) -> list:
    """Per-token completion log-probs of every (prompt_ids, completion_ids) item, batch by batch;
    `on_batch(n)` after each batch of n items."""
    out = []
    pad_id = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            batch = collate([p for p, _ in chunk], [c for _, c in chunk], pad_id, packing)
            batch = to_device(batch, pair.device)
            with pair.autocast():
                token_logps = forward_logps(model, batch)
            out += [t.float().cpu() for t in split_tokens(token_logps, batch)]
            if on_batch:
                on_batch(len(chunk))
    return out


def batched_pair_token_logps(model, pairs, pair: ModelPair, batch_size: int, packing: bool = True, on_batch=None) -> list:
    """Per-token log-probs of every chosen then every rejected completion, `batch_size // 2` pairs
    (batch_size sequences) per forward: packed, prefix-shared, segment attention, as in training;
    `on_batch(n)` after each batch of n pairs."""
    layout = Layout(packing=True, prefix_sharing=True, segment_attention=True) if packing else Layout(packing=False)
    pad_id = pair.tokenizer.pad_token_id if pair.tokenizer.pad_token_id is not None else 0
    step = max(1, batch_size // 2)
    chosen, rejected = [], []
    with torch.inference_mode():
        for start in range(0, len(pairs), step):
            chunk = pairs[start : start + step]
            batch = to_device(collate_pairs(chunk, pad_id, layout), pair.device)
            with pair.autocast():
                tokens = [t.float().cpu() for t in split_tokens(forward_logps(model, batch), batch)]
            chosen += tokens[: len(chunk)]
            rejected += tokens[len(chunk):]
            if on_batch:
                on_batch(len(chunk))
    return chosen + rejected

"""Reference log-probs: a frozen model, the LoRA base with adapters disabled, or a disk cache.

The training-side reference is one of five values; `kind` names them (the one place that
maps them) and `reference_logps` dispatches on it. Evaluation commands hold the reference
in a `pair.ModelPair` instead (a model or ADAPTER: the same marker as here).

DPO needs `log pi_ref(y|x)` for every chosen and rejected completion. They never change
during training, so `--precompute-ref` computes them once (no autograd state), stores them
as safetensors keyed by a hash of the token ids and the reference model, and frees the
reference model. Live and cached give the same numbers.

In a multi-process run each process computes its share of the batches, a sum across
processes assembles the full table on every rank, and rank 0 alone writes the cache. Forwards
run under `no_grad`, not `inference_mode`: FSDP and ZeRO-3 modify parameters in place while
gathering them, which inference tensors refuse.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data.collate import collate_pairs, to_device
from .distributed import main_decides, rounds
from .logprobs import pair_logps
from .pair import ADAPTER
from .perms import atomic_path

INITIAL = "initial"  # the policy itself before training: a reference until --precompute-ref caches it


def kind(reference) -> str:
    """Which training-side reference `reference` is:

    - "none": None, a reference-free loss (SimPO, ORPO, ...) needs no reference;
    - "adapter": ADAPTER, the LoRA policy with its adapters switched off (the base weights);
    - "initial": INITIAL, the policy before training, only until `--precompute-ref` turns it
      into a cached tensor (train.finish_reference);
    - "cached": an (N, 2) tensor of [chosen, rejected] reference log-probs, indexed by batch["index"];
    - "model": a frozen reference model (possibly wrapped by DDP/FSDP/DeepSpeed).
    """
    if reference is None:
        return "none"
    if isinstance(reference, torch.Tensor):
        return "cached"
    if isinstance(reference, str):
        if reference not in (ADAPTER, INITIAL):
            raise ValueError(f"unknown reference marker {reference!r}")
        return "adapter" if reference == ADAPTER else "initial"
    return "model"


def reference_logps(policy, reference, batch: dict, autocast, pair_fn=pair_logps) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference_chosen_logps (B,), reference_rejected_logps (B,)) for a pair batch.

    `reference`: a model, ADAPTER or cached values (see `kind`). `pair_fn(model, batch)` computes
    the pair log-probs of a live model (LD-DPO passes its own).
    """
    which = kind(reference)
    if which in ("none", "initial"):
        raise ValueError(f"reference log-probs need a model, the adapter's base or a cache, not {which!r}")
    if which == "cached":
        cached = reference[batch["index"].cpu()].to(batch["input_ids"].device)
        return cached[:, 0], cached[:, 1]
    with torch.no_grad(), autocast():
        if which == "adapter":  # same weights, LoRA switched off
            # call the (possibly FSDP/DDP-wrapped) policy itself so sharded weights are gathered;
            # eval mode: ZeRO-3 mixes up its fetch order in a no-grad forward of a training module
            training = policy.training
            policy.eval()
            try:
                with unwrap(policy).disable_adapter():
                    return pair_fn(policy, batch)
            finally:
                policy.train(training)
        return pair_fn(reference, batch)


def unwrap(model):
    """The model inside a DDP/FSDP wrapper, if any."""
    return getattr(model, "module", model)


def fingerprint(pairs, model_id: str, packing: bool) -> str:
    """Key of a reference cache: the exact token ids of every pair plus the reference identity."""
    h = hashlib.sha256(model_id.encode())
    h.update(b"packed" if packing else b"padded")
    for p in pairs:
        for ids in (p.prompt_ids, p.chosen_ids, p.rejected_ids):
            h.update(torch.tensor(ids, dtype=torch.int32).numpy().tobytes())
            h.update(b"|")
    return h.hexdigest()[:24]


def model_identity(path: str) -> str:
    """Path plus size and mtime of each weights file: changes when the reference's weights change."""
    parts = [str(Path(path).resolve()) if Path(path).exists() else path]
    for f in sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{int(st.st_mtime)}")
    return ";".join(parts)


@torch.no_grad()
def compute_all(
    policy, reference, pairs, batch_size: int, pad_id: int, packing: bool, device, autocast, rank: int = 0, world: int = 1
) -> torch.Tensor:
    """Reference log-probs of every pair: (N, 2) fp32 tensor [chosen, rejected].

    With world > 1 only the rows of this process's batches are filled (the rest stay 0), and
    every process runs the same number of forwards (see `distributed.rounds`).
    """
    out = torch.zeros(len(pairs), 2)
    for start, keep in rounds(list(range(0, len(pairs), batch_size)), rank, world):
        chunk = pairs[start : start + batch_size]
        batch = to_device(collate_pairs(chunk, pad_id, packing), device)
        chosen, rejected = reference_logps(policy, reference, batch, autocast)
        if keep:
            out[start : start + len(chunk)] = torch.stack([chosen, rejected], dim=1).float().cpu()
    return out


def cached(path: Path, compute, accelerator=None) -> torch.Tensor:
    """Load the (N, 2) reference tensor from `path`, or compute and store it atomically.

    With an `accelerator` of several processes every process must call this: rank 0 decides
    whether the cache is there (all ranks follow), `compute()` returns each rank's rows with
    zeros elsewhere, a sum across processes gives every rank the full table, rank 0 writes.
    """
    acc = accelerator
    if acc is None or acc.num_processes == 1:
        if path.exists():
            return load_file(str(path))["logps"]
        values = compute()
    else:
        hit = main_decides(acc, lambda: load_file(str(path))["logps"] if path.exists() else None)
        if hit is not None:
            return hit
        values = acc.reduce(compute().to(acc.device), "sum").cpu()
    if acc is None or acc.is_main_process:
        with atomic_path(path) as tmp:
            save_file({"logps": values.contiguous()}, str(tmp))
    if acc is not None:
        acc.wait_for_everyone()
    return values

"""Reference log-probs: a frozen model, the LoRA base with adapters disabled, or a disk cache.

DPO needs `log pi_ref(y|x)` for every chosen and rejected completion. They never change
during training, so `--precompute-ref` computes them once (in inference mode, no autograd
state), stores them as safetensors keyed by a hash of the token ids and the reference
model, and frees the reference model. Live and cached give the same numbers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data.collate import collate_pairs, to_device
from .logprobs import pair_logps


def reference_logps(policy, reference, batch: dict, autocast) -> tuple[torch.Tensor, torch.Tensor]:
    """(reference_chosen_logps (B,), reference_rejected_logps (B,)) for a pair batch.

    `reference` is a model, the string "adapter" (LoRA base = reference), or a (N, 2)
    tensor of cached values indexed by batch["index"].
    """
    if isinstance(reference, torch.Tensor):
        cached = reference[batch["index"].cpu()].to(batch["input_ids"].device)
        return cached[:, 0], cached[:, 1]
    with torch.inference_mode(), autocast():
        if isinstance(reference, str):  # "adapter": same weights, LoRA switched off
            with unwrap(policy).disable_adapter():
                return pair_logps(policy, batch)
        return pair_logps(reference, batch)


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


@torch.inference_mode()
def compute_all(policy, reference, pairs, batch_size: int, pad_id: int, packing: bool, device, autocast) -> torch.Tensor:
    """Reference log-probs of every pair: (N, 2) fp32 tensor [chosen, rejected]."""
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = to_device(collate_pairs(chunk, pad_id, packing), device)
        chosen, rejected = reference_logps(policy, reference, batch, autocast)
        out.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def cached(path: Path, compute) -> torch.Tensor:
    """Load the (N, 2) reference tensor from `path`, or compute and store it atomically."""
    if path.exists():
        return load_file(str(path))["logps"]
    values = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"logps": values.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return values


@contextlib.contextmanager
def no_autocast():
    yield

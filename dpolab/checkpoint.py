"""Checkpoints: HF-format weights plus the training state, written atomically.

Layout of `<output_dir>/checkpoint-<step>/`:
    model.safetensors + config.json (full fine-tuning) or adapter_* (LoRA), tokenizer files,
    training_state.pt  optimizer, scheduler, step, RNG state, counters (tensors and plain
                       Python values only, so it loads with `weights_only=True`).

A checkpoint is first written to `checkpoint-<step>.tmp-<pid>` and renamed into place, so a
crash mid-write never leaves a checkpoint that looks complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import torch

STATE_FILE = "training_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def save(output_dir: Path, step: int, model, tokenizer, optimizer, scheduler, counters: dict, accelerator) -> Path:
    """Write checkpoint-<step> atomically; returns its path. Only the main process writes."""
    final = output_dir / f"checkpoint-{step}"
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
        "counters": counters,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    weights = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO shards onto rank 0
    if accelerator.is_main_process:
        tmp = output_dir / f"checkpoint-{step}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        save_model(accelerator.unwrap_model(model), tokenizer, tmp, weights)
        torch.save(state, tmp / STATE_FILE)
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def save_model(model, tokenizer, path: Path, state_dict=None) -> None:
    """HF format: safetensors weights (adapter only for a PEFT model), config, tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def latest(output_dir: Path) -> Path | None:
    """Newest complete checkpoint (temporary folders of interrupted writes are ignored)."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _CKPT.match(p.name))]
    found = [(s, p) for s, p in found if (p / STATE_FILE).exists()]
    return max(found)[1] if found else None


def load_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)


def load_weights(model, path: Path) -> None:
    """Load checkpoint weights into an existing (possibly PEFT-wrapped) model in place."""
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    weights = {}
    for f in sorted(path.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Tied embeddings are stored once; anything else missing means a wrong checkpoint.
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    random.setstate((3, tuple(state["python_rng"]), None))
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def prune(output_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return
    found = sorted((int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _CKPT.match(p.name)))
    for _, p in found[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)

"""Checkpoints: HF-format weights plus the training state, written atomically.

Layout of `<output_dir>/checkpoint-<step>/`:
    model.safetensors + config.json (full fine-tuning) or adapter_* (LoRA), tokenizer files,
    training_state.pt  optimizer, scheduler, step, RNG state, counters (tensors and plain
                       Python values only, so it loads with `weights_only=True`).
    accelerate/        FSDP / DeepSpeed runs only: every process's weight and optimizer shards
                       (Accelerate's save_state), read back by a resume under the same launch.
The weights are always consolidated, so any checkpoint loads in a single process.
`<output_dir>/final/` holds the trained model alone, plus `dpolab_run.json` with the step it
ended at (how `--resume` tells a finished run from an interrupted one).

A checkpoint (and the final model) is first written to `<name>.tmp-<pid>` and renamed into
place (`atomic_dir`), so a crash mid-write never leaves a checkpoint that looks complete; pruned
checkpoints are renamed to `<name>.deleting-<pid>` before deletion for the same reason.
`remove_partial` clears what interrupted processes leave behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from .distributed import is_sharded, main_decides
from .perms import public

STATE_FILE = "training_state.pt"
FINISHED_FILE = "dpolab_run.json"  # in final/: {"step": N}
SHARDS = "accelerate"  # per-process FSDP / DeepSpeed state (Accelerate's save_state) for resume
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_PARTIAL = re.compile(r"^(checkpoint-\d+|final|merged)\.(tmp|deleting)-\d+$")


def save(output_dir: Path, step: int, model, tokenizer, optimizer, scheduler, counters: dict, accelerator) -> Path:
    """Write checkpoint-<step> atomically; returns its path. Every process must call it.

    The main process writes the consolidated weights and the state. Under FSDP / DeepSpeed
    (optimizer state split across processes) every process also writes its shards, through
    Accelerate's `save_state`, into `SHARDS` inside the checkpoint (used only to resume).
    """
    final = output_dir / f"checkpoint-{step}"
    sharded = is_sharded(accelerator)
    state = {
        "step": step,
        "sharded": sharded,
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
        "counters": counters,
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if not sharded:
        state["optimizer"] = optimizer.state_dict()  # identical on every process
    weights = accelerator.get_state_dict(model)  # gathers FSDP / ZeRO shards onto rank 0
    # A complete checkpoint of this step already exists only when the run resumed from it and
    # made no step since (e.g. killed after its last checkpoint): it holds this very state, and
    # replacing it would open a window in which a kill leaves no checkpoint at all.
    done = main_decides(accelerator, lambda: (final / STATE_FILE).exists())
    shards = final.with_name(f"{final.name}.tmp-0")  # one name for all ranks (a pid differs per rank)
    if sharded and not done:
        if accelerator.is_main_process:
            shutil.rmtree(shards, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(shards))
        accelerator.wait_for_everyone()
    if accelerator.is_main_process and not done:
        with atomic_dir(final) as tmp:
            _write_model(accelerator.unwrap_model(model), tokenizer, tmp, weights)
            torch.save(state, tmp / STATE_FILE)
            if sharded:
                os.replace(shards, tmp / SHARDS)
    accelerator.wait_for_everyone()
    return final


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield an empty temporary sibling of `final`; when the block succeeds it becomes `final` in
    one rename. On an exception it is removed; after a kill it is left for `remove_partial`."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _make_public(tmp)
        _fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync_dir_entry(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model, tokenizer, path: Path, state_dict=None, step: int | None = None) -> None:
    """HF format, written atomically: safetensors weights (adapter only for PEFT), config, tokenizer,
    and (a run's final/) the step it ended at, so --resume can tell a finished run."""
    with atomic_dir(path) as tmp:
        _write_model(model, tokenizer, tmp, state_dict)
        if step is not None:
            (tmp / FINISHED_FILE).write_text(json.dumps({"step": step}) + "\n")


def finished_step(output_dir: Path) -> int | None:
    """The step a finished run ended at (None: not finished, or written before dpolab recorded it)."""
    try:
        return int(json.loads((Path(output_dir) / "final" / FINISHED_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def step_of(checkpoint_dir: Path) -> int:
    """The step of a `checkpoint-<step>` folder."""
    return int(_CKPT.match(Path(checkpoint_dir).name).group(1))


def _write_model(model, tokenizer, path: Path, state_dict=None) -> None:
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _make_public(folder: Path) -> None:
    """Files as readable as the user's umask allows: transformers writes weights 0600 (mkstemp)."""
    public(folder, folder=True)
    for p in folder.rglob("*"):
        public(p, folder=p.is_dir())


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _fsync_dir_entry(folder: Path) -> None:
    """Make a rename inside `folder` durable across power loss (a kill needs no fsync)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partial(output_dir: Path) -> None:
    """Delete temporary and half-deleted folders left by interrupted processes (never a checkpoint)."""
    for p in Path(output_dir).glob("*-*"):
        if _PARTIAL.match(p.name) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def latest(output_dir: Path) -> Path | None:
    """Newest complete checkpoint (temporary folders of interrupted writes are ignored)."""
    found = [(int(m.group(1)), p) for p in output_dir.glob("checkpoint-*") if (m := _CKPT.match(p.name))]
    found = [(s, p) for s, p in found if (p / STATE_FILE).exists()]
    return max(found)[1] if found else None


def load_state(path: Path) -> dict:
    """The training state; `weights_only=True` refuses any pickle that would build arbitrary objects."""
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with how to load it unsafely; keep only what was refused.
        found = re.search(r"WeightsUnpickler error: ([^.\n]*)", str(e))
        reason = found.group(1).strip() if found else "it would construct arbitrary objects"
        raise ValueError(f"{path / STATE_FILE}: refused to load: not a plain tensor state file ({reason})") from None
    except (RuntimeError, EOFError, OSError) as e:  # damaged after it was written (checkpoints are atomic)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path / STATE_FILE}: cannot read the training state ({reason}); delete {path} "
                         f"to resume from the checkpoint before it") from None


def load_weights(model, path: Path) -> None:
    """Load checkpoint weights into an existing (possibly PEFT-wrapped) model in place."""
    if (path / "adapter_model.safetensors").exists():
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
        # Renamed first, so a kill mid-delete never leaves a half checkpoint under a checkpoint name.
        doomed = p.with_name(f"{p.name}.deleting-{os.getpid()}")
        os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)

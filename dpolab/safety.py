"""Guards that keep a long run from being lost: a clean stop on SIGINT/SIGTERM, disk checks.

- `check_writable(output_dir)` (before anything is loaded): the run directory can be created
  and written to, or the run is refused with one line.
- `prepare_output(run, model, total_steps)` (before the first step): debris of interrupted
  checkpoint writes is removed, then the run is refused with one line when the disk cannot hold
  the next checkpoint plus the final model (estimated from the parameters, see
  `estimate_bytes`), and warned about when all the checkpoints the run will keep do not fit.
- `GracefulStop`: the first SIGINT/SIGTERM only sets a flag; the loop finishes the step it is
  in, saves a checkpoint and raises `Interrupted`, so `--resume` continues exactly. A second
  signal stops at once; that loses the current step but never a checkpoint, because checkpoint
  writes are atomic (`checkpoint.atomic_dir`).

Non-finite losses and gradients are handled in `train.train_step` (skip, count, stop at
`--max-bad-steps`).
"""

from __future__ import annotations

import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import torch

from . import checkpoint
from .errors import TrainingError

# Tokenizer files scale with the vocabulary (SmolLM2: 49k tokens, about 3.5 MB on disk).
TOKENIZER_BYTES_PER_TOKEN = 160
FILE_OVERHEAD = 1 << 20  # configs, chat template, generation config, training counters


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ----------------------------------------------------------------------------- disk
def check_writable(output_dir: Path) -> None:
    """Create `output_dir` if needed and prove a file can be written there; else one clear line."""
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        # os.access is not enough (root, ACLs, read-only mounts): really create a file.
        with tempfile.TemporaryFile(dir=output_dir, prefix=".dpolab-write-test-"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise TrainingError(f"output dir {output_dir} is not writable ({reason}); choose another --output-dir") from None


def estimate_bytes(model, tokenizer, merge_lora: bool = False) -> tuple[int, int]:
    """(bytes of one checkpoint, bytes of the final model folder(s)), estimated from `model`.

    A checkpoint holds the saved weights (every parameter for full fine-tuning, only the
    trainable adapter weights for a LoRA model) in their own dtype, AdamW's two moment tensors
    per trainable parameter (same dtype as the parameter) and the tokenizer files. Tied weights
    are counted once, as `model.parameters()` and safetensors both store them once.
    """
    params = list(model.parameters())
    every = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    weights = trainable if hasattr(model, "peft_config") else every
    files = TOKENIZER_BYTES_PER_TOKEN * len(tokenizer) + FILE_OVERHEAD
    final = weights + files + ((every + files) if merge_lora and weights != every else 0)
    return weights + 2 * trainable + files, final


def prepare_output(run, model, total_steps: int) -> None:
    """Remove debris of interrupted writes; refuse to start without room for a checkpoint + final."""
    cfg, acc = run.cfg, run.accelerator
    if acc.is_main_process:
        checkpoint.remove_partial(run.output_dir)
    ckpt, final = estimate_bytes(model, run.tokenizer, getattr(cfg, "merge_lora", False))
    free = shutil.disk_usage(run.output_dir).free
    periodic = (total_steps - 1) // cfg.save_every if cfg.save_every else 0  # the end is not a periodic save
    saves = periodic + int(cfg.final_checkpoint)
    if free < (ckpt if saves else 0) + final:
        raise TrainingError(
            f"not enough disk space in {run.output_dir}: {human_bytes(free)} free, but "
            + (f"a checkpoint needs about {human_bytes(ckpt)} and " if saves else "")
            + f"the final model {human_bytes(final)}; free some space or choose another --output-dir"
        )
    kept = min(saves, cfg.keep_last + 1) if cfg.keep_last else saves  # +1: written before the oldest is pruned
    if free < kept * ckpt + final:
        acc.print(
            f"warning: the {kept} checkpoints this run keeps need about {human_bytes(kept * ckpt + final)} but only "
            f"{human_bytes(free)} are free in {run.output_dir}; consider --keep-last"
        )


# ----------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """The run stopped on SIGINT/SIGTERM after saving a checkpoint; `--resume` continues it."""

    def __init__(self, signal_name: str, step: int, checkpoint_dir: Path):
        super().__init__(f"{signal_name}: stopped after step {step}; checkpoint saved in {checkpoint_dir}; continue with --resume")
        self.signal_name, self.step, self.checkpoint_dir = signal_name, step, checkpoint_dir


class GracefulStop:
    """SIGINT/SIGTERM -> a flag the loop checks at each step boundary (see the module docstring)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}

    def install(self) -> "GracefulStop":
        # Python only lets the main thread set handlers; elsewhere signals keep their defaults.
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            self.restore()
            raise KeyboardInterrupt(f"second {name}: stopping now")
        self.signal_name = name
        print(f"dpolab: {name} received: finishing this step (or ending the evaluation) and saving a checkpoint "
              "(send it again to stop at once)",
              file=sys.stderr, flush=True)

    def requested(self, accelerator) -> bool:
        """True on every process once any process got a signal (all must save together)."""
        flag = self.signal_name is not None
        if accelerator.num_processes > 1:
            total = accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum")
            flag = bool(total.item() > 0)
        return flag

    def interrupted(self, step: int, output_dir: Path, accelerator) -> Interrupted:
        """The exception that ends the run, after telling the user where its checkpoint is."""
        error = Interrupted(self.signal_name or "signal", step, Path(output_dir) / f"checkpoint-{step}")
        accelerator.print(f"dpolab: {error}", file=sys.stderr)
        return error

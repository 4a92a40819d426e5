"""TR-DPO: the reference model follows the policy, synchronised every N steps.

Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment": every
`sync_ref_every` optimizer steps the frozen reference becomes

    pi_ref <- alpha * pi_theta + (1 - alpha) * pi_ref        (alpha = `ref_mix_alpha`; 1 = hard update)

weight by weight, so the KL anchor moves with training instead of tying the policy to its
starting point for the whole run. Same rule and defaults as TRL's `sync_ref_model`
(`ref_model_mixup_alpha` 0.6, steps every `ref_model_sync_steps`).

Exact resume: the reference after step k depends on the policy at every earlier sync, which a
checkpoint does not hold. Each synchronised reference is therefore written (atomically, as
safetensors) to `<output_dir>/reference-sync/step-<k>.safetensors`, and a resumed run at step s
loads the one of step floor(s / N) * N (before the first sync: the initial reference). Files
that no remaining checkpoint needs are removed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

FOLDER = "reference-sync"
_FILE = re.compile(r"^step-(\d+)\.safetensors$")


class ReferenceSync:
    """Mixes the policy into a frozen reference model every `every` steps; see the module docstring."""

    def __init__(self, reference: torch.nn.Module, every: int, alpha: float, output_dir: Path, accelerator):
        self.reference, self.every, self.alpha = reference, every, alpha
        self.folder = Path(output_dir) / FOLDER
        self.acc = accelerator
        self.synced = 0  # step of the reference now held (0 = the initial one)

    def __call__(self, policy, step: int, resumed: bool = False) -> None:
        """After optimizer step `step` (or, `resumed`, once when a run restarts at `step`)."""
        target = (step // self.every) * self.every
        if target == self.synced:
            return
        if resumed:
            self._load(target)
        else:
            mix(self.reference, self.acc.unwrap_model(policy), self.alpha)
            self._save(target)
        self.synced = target

    def _path(self, step: int) -> Path:
        return self.folder / f"step-{step}.safetensors"

    def _load(self, step: int) -> None:
        path = self._path(step)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the TR-DPO reference of step {step} is needed to resume exactly")
        load_model(self.reference, str(path), device=str(next(self.reference.parameters()).device))

    def _save(self, step: int) -> None:
        if self.acc.is_main_process:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".step-{step}.tmp{os.getpid()}"
            save_model(self.reference, str(tmp))  # handles tied weights (embeddings = LM head)
            os.replace(tmp, self._path(step))
            prune(self.folder, self.every)
        self.acc.wait_for_everyone()


@torch.no_grad()
def mix(reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """reference <- alpha * policy + (1 - alpha) * reference, parameter by parameter (same names)."""
    theirs = dict(policy.named_parameters())
    for name, p in reference.named_parameters():
        p.lerp_(theirs[name].detach().to(p.dtype), alpha)


def prune(folder: Path, every: int) -> None:
    """Remove synced references older than the one the oldest checkpoint would resume with."""
    steps = [int(m.group(1)) for f in folder.parent.glob("checkpoint-*")
             if (m := re.match(r"^checkpoint-(\d+)$", f.name))]
    if not steps:
        return
    keep_from = (min(steps) // every) * every
    for f in folder.iterdir():
        m = _FILE.match(f.name)
        if m and int(m.group(1)) < keep_from:
            f.unlink(missing_ok=True)

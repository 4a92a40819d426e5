"""Settings whose meaning differs from TRL's, so that a config moved over from TRL is not silently
read another way.

Checked side by side with TRL 1.16 (`trl/trainer/dpo_trainer.py`):

- IPO: dpolab builds the margin from SUMMED log-probs, as the IPO paper writes it; TRL divides
  each log-ratio by its completion length. At the same beta the two losses differ by orders of
  magnitude (the target 1/(2 beta) is per sequence here, per token there). `--ipo-average-logps`
  gives TRL's form.
- SFT / RPO term: dpolab averages the NLL per pair (each pair's mean token NLL, then the mean
  over pairs); TRL's `sft` loss type averages over all chosen tokens of the batch, so long
  answers weigh more. `--sft-token-weighted` gives TRL's form.
- alpha-divergence: `--f-alpha` is the f-DPO paper's alpha (0 = reverse KL, 1 = forward KL);
  TRL's `f_alpha_divergence_coef` is 1 - alpha (the two agree at the default 0.5).

Each warning is issued once per process (Python's default warning filter), at the start of a run.
"""

from __future__ import annotations

import warnings

from .losses import loss_names


class ConventionWarning(UserWarning):
    """A setting means something else in TRL."""


def convention_notes(cfg) -> list[str]:
    """One line per setting of `cfg` (a TrainConfig) that TRL would read differently."""
    names = loss_names(cfg.loss)
    notes = []
    if "ipo" in names and not cfg.ipo_average_logps:
        notes.append(
            f"loss ipo uses summed log-probs as in the IPO paper (beta {cfg.beta} sets a target margin of "
            f"{1 / (2 * cfg.beta):g} nats per sequence); TRL's loss_type='ipo' averages per token: pass "
            "--ipo-average-logps for TRL's convention"
        )
    if (cfg.sft_weight > 0 or "sft" in names) and not cfg.sft_token_weighted:
        notes.append(
            "the SFT/RPO NLL is averaged per pair (each pair's mean token NLL); TRL's 'sft' averages over "
            "all chosen tokens of the batch: pass --sft-token-weighted for TRL's convention"
        )
    if cfg.f_divergence == "alpha_divergence" and abs(cfg.f_alpha - 0.5) > 1e-12:
        notes.append(
            f"f_alpha {cfg.f_alpha} is the f-DPO paper's alpha; TRL's f_alpha_divergence_coef for the same "
            f"loss is {1 - cfg.f_alpha:g}"
        )
    return notes


def warn_trl_conventions(cfg) -> list[str]:
    """Issue a ConventionWarning for each of `convention_notes(cfg)`; returns the notes."""
    notes = convention_notes(cfg)
    for note in notes:
        warnings.warn(note, ConventionWarning, stacklevel=2)
    return notes

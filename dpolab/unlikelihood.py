"""Unlikelihood training on preference pairs: the DPO paper's "Unlikelihood" baseline.

Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training" (Eq. 4, applied to
whole sequences): raise the likelihood of the preferred completion's tokens and push down
each token of the dispreferred one through log(1 - p), which, unlike -log p, is bounded and
vanishes once a token is unlikely. Rafailov et al. 2023 (Sec. 6) plot it as a baseline:

    loss(x, y_w, y_l) = -1/|y_w| sum_t log p(y_w,t | x, y_w,<t)
                        - alpha/|y_l| sum_t log(1 - p(y_l,t | x, y_l,<t))

It needs per-token log-probs (not the sequence sums the DPO-family losses in dpolab.losses
take), so it lives here with its own objective for `train.fit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SFTConfig, opt
from .data.collate import Layout, collate, to_device
from .logprobs import forward_logps, split_tokens
from .train import build_policy, fit, load_data, start_run


def log1m_exp(logps: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(logps)) for log-probs <= 0, elementwise, finite for every token.

    log(-expm1(l)) is exact near l = 0; l is clamped just below 0 so that a token the model
    is certain of (p rounds to 1) costs a large finite loss instead of inf.
    """
    return torch.log(-torch.expm1(logps.clamp(max=-1e-6)))


def unlikelihood_loss(chosen_token_logps: list[torch.Tensor], rejected_token_logps: list[torch.Tensor],
                      alpha: float = 1.0) -> torch.Tensor:
    """Per-pair unlikelihood loss (B,) from per-token log-probs.

    chosen_token_logps / rejected_token_logps: B tensors each, pair b's (|y_w|,) and (|y_l|,)
    completion-token log-probs under the policy. Formula in the module docstring.
    """
    if len(chosen_token_logps) != len(rejected_token_logps):
        raise ValueError("one chosen and one rejected completion per pair")
    losses = []
    for w, l in zip(chosen_token_logps, rejected_token_logps):
        likelihood = -w.sum() / max(w.numel(), 1)
        unlikelihood = -log1m_exp(l).sum() / max(l.numel(), 1)
        losses.append(likelihood + alpha * unlikelihood)
    return torch.stack(losses)


@dataclass
class UnlikelihoodConfig(SFTConfig):
    """Unlikelihood training on preference pairs (chosen up, rejected tokens down)."""

    alpha: float = opt(1.0, "Weight of the unlikelihood term on the rejected completion's tokens.")
    output_dir: str = opt("runs/unlikelihood", "Run directory.")


def train_unlikelihood(cfg: UnlikelihoodConfig) -> dict:
    """Train with the unlikelihood loss through dpolab's loop (data, checkpoints, metrics as `sft`)."""
    run = start_run(cfg)
    pairs, train_idx, eval_idx = load_data(cfg, run)
    policy = build_policy(cfg, run)
    layout = Layout.from_config(cfg)

    def make_batch(indices):
        chosen = [pairs[i] for i in indices]
        prompts = [p.prompt_ids for p in chosen]
        sequences = [p.chosen_ids for p in chosen] + [p.rejected_ids for p in chosen]
        return to_device(collate(prompts + prompts, sequences, run.tokenizer.pad_token_id, layout), run.device)

    def objective(model, batch):
        tokens = split_tokens(forward_logps(model, batch), batch)
        half = len(tokens) // 2
        losses = unlikelihood_loss(tokens[:half], tokens[half:], cfg.alpha)
        detached = [t.detach() for t in tokens]
        stats = {"loss": losses.detach(),
                 "logps/chosen": torch.stack([t.sum() for t in detached[:half]]),
                 "logps/rejected": torch.stack([t.sum() for t in detached[half:]])}
        return losses, stats

    return fit(run, policy, train_idx, eval_idx, objective, make_batch)

"""KTO: preference optimisation from unpaired desirable / undesirable completions.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8.
With r = log pi(y|x) - log pi_ref(y|x) and a reference point z0 = max(0, KL estimate):

    desirable y:    lambda_D * (1 - s(beta (r - z0)))
    undesirable y:  lambda_U * (1 - s(beta (z0 - r)))

(the paper's lambda_y - v(x, y)). z0 estimates KL(pi || pi_ref) from MISMATCHED pairs in the
batch: example i's prompt with example (i-1)'s completion (TRL's cycling), averaged over the
micro-batch, detached and clipped at 0. lambda_D, lambda_U = --desirable-weight,
--undesirable-weight (the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

Each micro-batch is laid out like a pair batch: unit i = [prompt_i][completion_i][completion_{i-1}]
(the second completion only feeds z0), so the prompt is computed once for both.
Differs from TRL: the KL estimate is per micro-batch and per process (TRL gathers it across
processes); ours is therefore noisier with small batches.
"""

from __future__ import annotations

import torch

from . import reference as ref
from .data.collate import collate_pairs
from .data.tokenize import TokenizedPair
from .logprobs import pair_logps

NAME = "kto"


def kto_loss(policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, labels, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """KTO per-example losses (B,), rewards beta*r (B,) detached, and z0 (a 0-dim tensor).

    policy_logps / reference_logps: (B,) summed log-probs of each example's own completion;
    policy_kl_logps / reference_kl_logps: (B,) of the mismatched completions; labels: (B,) bool.
    """
    z0 = (policy_kl_logps - reference_kl_logps).mean().clamp(min=0).detach()
    r = policy_logps - reference_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z0)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r)))
    losses = torch.where(labels, desirable, undesirable)
    return losses, (beta * r).detach(), z0


def collate(examples, pad_id: int, layout, max_length: int) -> dict:
    """TokenizedCompletions -> a pair-shaped batch: "chosen" = own completion, "rejected" = the
    previous example's completion (cut to the room the prompt leaves in max_length), plus
    `labels` (B,) bool."""
    units = [TokenizedPair(e.row, e.prompt_ids, e.completion_ids,
                           examples[i - 1].completion_ids[: max(1, max_length - len(e.prompt_ids))])
             for i, e in enumerate(examples)]
    batch = collate_pairs(units, pad_id, layout)
    batch["labels"] = torch.tensor([e.label for e in examples])
    return batch


def objective(params, model, reference, batch: dict, run):
    """KTO batch -> (per-example losses (B,), stats); `params` = (beta, desirable_weight, undesirable_weight)."""
    beta, w_d, w_u = params
    reference_logps, reference_kl_logps = ref.reference_logps(model, reference, batch, run.autocast)
    policy_logps, policy_kl_logps = pair_logps(model, batch)
    labels = batch["labels"].to(policy_logps.device)
    losses, rewards, z0 = kto_loss(policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, labels, beta, w_d, w_u)
    stats = {
        "loss": losses.detach(),
        "rewards/chosen": rewards[labels],  # desirable examples
        "rewards/rejected": rewards[~labels],  # undesirable examples
        "kl": z0.reshape(1),
        "logps/chosen": policy_logps.detach()[labels],
        "logps/rejected": policy_logps.detach()[~labels],
    }
    return losses, stats


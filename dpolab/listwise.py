"""Listwise DPO: the Plackett-Luce form for several ranked responses per prompt.

Rafailov et al. 2023, "Direct Preference Optimization", Appendix A.3 (Eq. 18 with the implicit
reward): for responses y_1 > y_2 > ... > y_K of one prompt (best first) and
z_k = beta (log pi(y_k|x) - log pi_ref(y_k|x)),

    loss = - sum_{k=1}^{m} [ z_k - log sum_{j=k}^{K} exp(z_j) ]

where m = K - 1 for a full ranking and m = 1 when only the best response is known (chosen
against a list of rejected ones: the K-way choice). For K = 2 it is exactly DPO's
-log s(z_1 - z_2). In a batch every prompt is ONE unit [prompt][y_1][y_2]...[y_K] with prefix
sharing, so the prompt is computed once for all its responses.
"""

from __future__ import annotations

import torch

from . import reference as ref
from .data.collate import collate_units
from .logprobs import forward_logps, sequence_logps

NAME = "plackett_luce"


def plackett_luce_loss(policy_logps: torch.Tensor, reference_logps: torch.Tensor, ranked: int, beta: float):
    """One prompt: log-probs (K,) of its responses, best first -> (loss 0-dim, rewards (K,) detached)."""
    z = beta * (policy_logps - reference_logps)
    # logsumexp over each suffix z_k..z_K, via a reversed cumulative logsumexp
    suffix = torch.logcumsumexp(z.flip(0), 0).flip(0)
    loss = -(z[:ranked] - suffix[:ranked]).sum()
    return loss, z.detach()


def collate(lists, pad_id: int, layout) -> dict:
    """TokenizedLists -> batch; sequences are numbered list by list (all of list 0, then list 1, ...).

    Adds `group_sizes` (B,) long and `ranked` (B,) long.
    """
    units, seqs, n = [], [], 0
    for lst in lists:
        k = len(lst.response_ids)
        if layout.prefix_sharing:
            units.append((lst.prompt_ids, lst.response_ids))
            seqs.append(list(range(n, n + k)))
        else:
            units += [(lst.prompt_ids, [r]) for r in lst.response_ids]
            seqs += [[n + j] for j in range(k)]
        n += k
    batch = collate_units(units, seqs, pad_id, layout)
    batch["group_sizes"] = torch.tensor([len(lst.response_ids) for lst in lists])
    batch["ranked"] = torch.tensor([lst.ranked for lst in lists])
    batch["rows"] = torch.tensor([lst.row for lst in lists])
    return batch


def objective(beta: float, model, reference, batch: dict, run):
    """Listwise batch -> (per-prompt losses (B,), stats)."""
    def all_logps(m, b):
        return sequence_logps(forward_logps(m, b), b), None

    reference_logps = ref.reference_logps(model, reference, batch, run.autocast, all_logps)[0]
    policy_logps = all_logps(model, batch)[0]
    sizes = batch["group_sizes"].tolist()
    losses, best, rest, right = [], [], [], []
    for pol, refl, ranked in zip(policy_logps.split(sizes), reference_logps.split(sizes), batch["ranked"].tolist()):
        loss, z = plackett_luce_loss(pol, refl, ranked, beta)
        losses.append(loss)
        best.append(z[0])
        rest.append(z[1:].mean())
        right.append((z[0] > z[1:]).all().float())
    losses = torch.stack(losses)
    stats = {"loss": losses.detach(), "rewards/chosen": torch.stack(best), "rewards/rejected": torch.stack(rest),
             "rewards/accuracies": torch.stack(right), "rewards/margins": torch.stack(best) - torch.stack(rest)}
    return losses, stats

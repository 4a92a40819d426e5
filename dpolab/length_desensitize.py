"""LD-DPO: sequence log-probs with the verbose tail of the longer completion down-weighted.

Liu et al. 2024, "Length Desensitization in Directly Preference Optimization" (LD-DPO), Eq. 9:
for a pair whose completions have lengths |y_w| and |y_l|, let l = min(|y_w|, |y_l|). Each
completion's log-prob becomes

    log p~(y|x) = sum_{t <= l} log p(y_t | ...) + alpha * sum_{t > l} log p(y_t | ...)

for the policy AND the reference, 0 <= alpha <= 1 (`--ld-alpha`; 1 = plain DPO, 0 = only the
shared length counts). Summed log-probs grow with length, so DPO's margin rewards length
itself; discounting the tail takes most of that away while keeping the whole answer trained.
Same convention as TRL's `ld_alpha`.
"""

from __future__ import annotations

import torch

from .logprobs import forward_logps, pair_logps


def desensitized_logps(token_logps: torch.Tensor, batch: dict, alpha: float) -> torch.Tensor:
    """Per-token log-probs (K,) of a pair batch (2B sequences, chosen first) -> (2B,) LD-DPO sums.

    `batch["seq_index"]` (K,) names each token's sequence and tokens come sequence by sequence,
    so a token's position in its completion is its index minus the start of its sequence.
    """
    lengths = batch["lengths"]  # (2B,)
    half = lengths.shape[0] // 2
    shared = torch.minimum(lengths[:half], lengths[half:]).repeat(2)  # (2B,)
    starts = torch.cumsum(lengths, 0) - lengths
    seq = batch["seq_index"]
    position = torch.arange(seq.shape[0], device=seq.device) - starts[seq]
    weight = torch.where(position < shared[seq], 1.0, alpha).to(token_logps.dtype)
    return token_logps.new_zeros(lengths.shape[0]).index_add(0, seq, token_logps * weight)


def pair_fn(alpha: float):
    """`(model, batch) -> (chosen (B,), rejected (B,))`: plain `pair_logps` at alpha = 1, else LD-DPO."""
    if alpha == 1.0:
        return pair_logps

    def ld_pair_logps(model, batch):
        logps = desensitized_logps(forward_logps(model, batch), batch, alpha)
        half = logps.shape[0] // 2
        return logps[:half], logps[half:]

    return ld_pair_logps

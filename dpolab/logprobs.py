"""Model + batch -> per-sequence (and per-token) completion log-probs.

`log pi(y|x)` is the SUM over completion tokens of `log p(y_t | x, y_<t)`; prompt and
padding never count. The LM head runs only at the K positions that predict a completion
token (transformers' `logits_to_keep` with a boolean mask), so the (positions x vocab)
logits tensor is K x V instead of N x L x V, and the log-softmax is never materialised:
`log p(y_t) = logit[y_t] - logsumexp(logits)`, evaluated in fp32 chunks.
"""

from __future__ import annotations

import torch

CHUNK = 2048  # rows of the K x V logits upcast to fp32 at a time


def token_logps_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """logits (K, V) any float dtype, targets (K,) -> log p(target) (K,) fp32, chunked."""
    out = []
    for start in range(0, logits.shape[0], CHUNK):
        chunk = logits[start : start + CHUNK].float()
        picked = chunk.gather(-1, targets[start : start + CHUNK, None]).squeeze(-1)
        out.append(picked - chunk.logsumexp(-1))
    return torch.cat(out) if out else logits.new_zeros(0, dtype=torch.float32)


def forward_logps(model, batch: dict) -> torch.Tensor:
    """Per-token completion log-probs (K,) fp32, in the order of batch['targets']."""
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=batch["keep_mask"],
        use_cache=False,
    )
    logits = out.logits.reshape(-1, out.logits.shape[-1])  # (K, V)
    return token_logps_from_logits(logits, batch["targets"])


def sequence_logps(token_logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """Sum per-token log-probs (K,) into per-sequence log-probs (S,) fp32."""
    num_seqs = batch["lengths"].shape[0]
    return token_logps.new_zeros(num_seqs).index_add(0, batch["seq_index"], token_logps)


def split_tokens(token_logps: torch.Tensor, batch: dict) -> list[torch.Tensor]:
    """Per-token log-probs (K,) -> one (len_s,) tensor per sequence."""
    return list(torch.split(token_logps, batch["lengths"].tolist()))


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of a pair batch: (chosen_logps (B,), rejected_logps (B,))."""
    logps = sequence_logps(forward_logps(model, batch), batch)
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]

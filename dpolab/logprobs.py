"""Model + batch -> per-sequence (and per-token) completion log-probs.

`log pi(y|x)` is the SUM over completion tokens of `log p(y_t | x, y_<t)`; prompt and
padding never count. The LM head runs only at the P positions whose logits are needed
(transformers' `logits_to_keep` with a boolean mask), so the (positions x vocab) logits
tensor is P x V instead of N x L x V, and the log-softmax is never materialised:
`log p(y_t) = logit[y_t] - logsumexp(logits)`, the logsumexp evaluated in fp32 chunks.
With prefix sharing one kept logit serves the first token of both completions
(`batch["target_rows"]`); with segment attention the batch's `segments` go to
`dpolab.attention`. The batch layouts are described in `dpolab.data.collate`.

Under bf16 autocast the LM head still runs in fp32 (`fp32_head`): a bf16 logit of size ~20
is rounded to 1/8, so a tiny weight update flips the rounding of many target logits and the
summed log-probs of policy and reference differ by noise of ~0.1 nats per sequence, which
swamps the implicit rewards at small learning rates (docs/performance.md, "bf16").
"""

from __future__ import annotations

import types

import torch
import transformers.modeling_utils

from . import attention
from .attention import SUPPORTED, model_config

CHUNK = 2048  # rows of the P x V logits upcast to fp32 at a time


def token_logps_from_logits(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """logits (P, V) any float dtype, targets (K,), rows (K,) -> log p(target) (K,) fp32.

    `rows[k]` is the logits row that predicts `targets[k]` (None: row k, so K == P).
    log p = logit[target] - logsumexp(logits row), in fp32, CHUNK rows at a time.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros(0, dtype=torch.float32)
    rows = torch.arange(targets.shape[0], device=targets.device) if rows is None else rows
    return _TargetLogps.apply(logits, targets, rows)


class _TargetLogps(torch.autograd.Function):
    """`token_logps_from_logits` with a backward that writes the (P, V) gradient once:
    d log p_k / d logits[r] = onehot(target_k) - softmax(logits[r]) for r = rows[k].
    logits (P, V), targets (K,), rows (K,) -> (K,) fp32.

    Autograd through logsumexp, row slices and a gather allocates several P x V buffers and
    made the LM head's log-softmax 2x slower on CPU (`benchmarks/profile_step.py`).
    """

    @staticmethod
    def forward(ctx, logits, targets, rows):
        lse = torch.cat([logits[s : s + CHUNK].float().logsumexp(-1) for s in range(0, logits.shape[0], CHUNK)])
        ctx.save_for_backward(logits, targets, rows, lse)
        return logits[rows, targets].float() - lse[rows]

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, rows, lse = ctx.saved_tensors
        per_row = torch.zeros_like(lse).index_add_(0, rows, grad_out.float())  # sum of grad_out over a row's targets
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], CHUNK):
            part = slice(s, s + CHUNK)
            if logits.dtype == torch.float32:  # the softmax computed in the gradient's own memory
                soft = torch.sub(logits[part], lse[part, None], out=grad[part])
            else:
                soft = logits[part].float() - lse[part, None]
            soft.exp_().mul_(-per_row[part, None])
            if soft.dtype != grad.dtype:
                grad[part] = soft
        grad.index_put_((rows, targets), grad_out.to(grad.dtype), accumulate=True)
        return grad, None, None


# Under bf16 autocast the head's two backward matmuls run in bf16, as every other layer's do:
# a bf16 training step ran 3-4% faster (`benchmarks/ab_step.py --bf16 --a head-fp32 --b new`, both ways round).
BF16_HEAD_BACKWARD = True


class _Fp32LogitsBf16Grads(torch.autograd.Function):
    """logits = hidden @ weight.T + bias in fp32; the gradients of hidden and weight from bf16
    matmuls (fp32 accumulation, bf16 result), as autocast's linear layers compute theirs.

    hidden (..., H) fp32, weight (V, H) fp32, bias (V,) or None -> logits (..., V) fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias):
        ctx.save_for_backward(hidden, weight)
        ctx.has_bias = bias is not None
        return torch.nn.functional.linear(hidden, weight, bias)

    @staticmethod
    def backward(ctx, grad_logits):
        hidden, weight = ctx.saved_tensors
        grad = grad_logits.to(torch.bfloat16)
        grad_hidden = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (grad @ weight.to(torch.bfloat16)).float()
        if ctx.needs_input_grad[1]:
            flat = grad.reshape(-1, grad.shape[-1])
            grad_weight = (flat.t() @ hidden.reshape(-1, hidden.shape[-1]).to(torch.bfloat16)).float()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_logits.reshape(-1, grad_logits.shape[-1]).sum(0)
        return grad_hidden, grad_weight, grad_bias


def fp32_head(model) -> None:
    """Make `model`'s LM head compute fp32 logits even inside a bf16 autocast region (idempotent).

    The head's forward is replaced on the instance (the state dict and saved checkpoints are
    unchanged); outside autocast it computes exactly what `nn.Linear` does in fp32. Under bf16
    autocast with autograd on, the logits are fp32 but their backward runs in bf16
    (`_Fp32LogitsBf16Grads`): the metrics users steer by come from the forward.
    """
    inner = getattr(model, "module", model)  # DDP / FSDP wrapper
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or getattr(head, "_dpolab_fp32", False):
        return

    # a bound method, not a closure over `head`: a deep copy of the model (a reference copied from
    # the policy) then computes with its own head's weights
    head.forward = types.MethodType(_fp32_head_forward, head)
    head._dpolab_fp32 = True


def _fp32_head_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`fp32_head`'s forward of `head`: hidden (..., H) -> fp32 logits (..., V)."""
    device = hidden.device.type
    bf16_grads = BF16_HEAD_BACKWARD and torch.is_grad_enabled() and attention.bf16_autocast(device)
    with torch.autocast(device, enabled=False):
        bias = None if head.bias is None else head.bias.float()
        if bf16_grads:
            return _Fp32LogitsBf16Grads.apply(hidden.float(), head.weight.float(), bias)
        return torch.nn.functional.linear(hidden.float(), head.weight.float(), bias)


def model_inputs(model, batch: dict) -> dict:
    """Keyword arguments of the model call for a batch (segment attention switched on if needed)."""
    kwargs = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        logits_to_keep=logits_to_keep(batch["keep_mask"]),
        use_cache=False,
    )
    custom = batch.get("segments") is not None or (batch["attention_mask"] is not None and batch["attention_mask"].dim() == 4)
    if custom:
        _check_window(model, batch)
    if batch.get("segments") is not None:
        attention.enable(model)
        kwargs["dpolab_segments"] = batch["segments"]
        # an all-ones padding mask: transformers then skips building a T x T mask nobody reads
        kwargs["attention_mask"] = torch.ones_like(batch["input_ids"])
    elif custom:
        kwargs["attention_mask"] = _mask_for(model, kwargs["attention_mask"])
    return kwargs


# transformers >= 5.21 slices hidden states with a 2D boolean `logits_to_keep` (`slice_logits_to_keep`);
# older releases index `hidden_states[:, logits_to_keep, :]` and fail on one ("too many indices").
BOOL_LOGITS_TO_KEEP = hasattr(transformers.modeling_utils, "slice_logits_to_keep")


def logits_to_keep(keep_mask: torch.Tensor) -> torch.Tensor:
    """transformers' `logits_to_keep` for a (N, L) bool mask, logits then (P, V) after a reshape.

    One row (packed batches, the default): its positions (P,), which every transformers release
    dpolab supports takes (logits (1, P, V)). Several rows (padded layouts): the mask itself,
    which transformers flattens to (P, V) since 5.21; before that only positions shared by all
    rows can be given, so `forward_logps` keeps the union and picks the rows' own (`_kept`).
    """
    if keep_mask.shape[0] == 1:
        return keep_mask[0].nonzero().squeeze(1)
    if BOOL_LOGITS_TO_KEEP:
        return keep_mask
    return keep_mask.any(0).nonzero().squeeze(1)


def _kept(logits: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits for `logits_to_keep(keep_mask)` -> (P, V), P = keep_mask.sum(), in row order."""
    if logits.dim() == 3 and keep_mask.shape[0] > 1:  # the union of the rows' positions: pick each row's own
        return logits[keep_mask[:, keep_mask.any(0)]]
    return logits.reshape(-1, logits.shape[-1])


def _check_window(model, batch: dict) -> None:
    """Our masks and segments are full causal: refuse sequences longer than a sliding attention window."""
    window = getattr(model_config(model), "sliding_window", None)
    if window and int(batch["position_ids"].max()) >= window:
        raise ValueError(f"a sequence is longer than the model's sliding attention window ({window} tokens): "
                         "pass --no-prefix-sharing --no-segment-attention")


def _mask_for(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask as the model's attention expects it: SDPA takes bool, eager adds a float mask."""
    impl = getattr(model_config(model), "_attn_implementation", "sdpa")
    if impl not in SUPPORTED:
        raise ValueError(f"prefix sharing needs sdpa or eager attention, the model uses {impl}: pass --no-prefix-sharing")
    if impl == "eager":
        return torch.zeros(mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


def forward_logps(model, batch: dict) -> torch.Tensor:
    """Per-token completion log-probs (K,) fp32, in the order of batch['targets']."""
    before = attention.calls
    if torch.is_autocast_enabled(batch["input_ids"].device.type):
        fp32_head(model)
    out = model(**model_inputs(model, batch))
    if batch.get("segments") is not None and attention.calls == before:
        # a model whose attention layers drop extra keyword arguments would silently attend across the row
        raise ValueError("this model's attention does not take dpolab's segments: pass --no-segment-attention")
    logits = _kept(out.logits, batch["keep_mask"])  # (P, V)
    return token_logps_from_logits(logits, batch["targets"], batch.get("target_rows"))


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

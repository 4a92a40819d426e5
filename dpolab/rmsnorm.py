"""RMSNorm of Llama-family models as one autograd node with a hand-written backward.

transformers' `LlamaRMSNorm` computes `w * x / sqrt(mean(x^2) + eps)` with six elementwise ops,
each its own autograd node: about fifteen passes over the (tokens x hidden) activations forward
and backward. On a CPU these passes are memory-bound; forward + backward of one norm over 600
tokens (hidden 576, fp32, 2 threads, in a loop) took 2.3 ms there against 0.8 ms here; in a
training step, with the activations fresh from memory, the two changes here made a bf16 step
2-3% faster (docs/performance.md, "Memory reuse, RMSNorm, clipping").

`fast_rms_norms(model)` gives every norm of a known Llama-style class this forward through a
subclass of its own class (state dict and checkpoints unchanged); inputs that are not fp32 with an fp32 weight
take the class's own forward. Under bf16 autocast the two norms inside a decoder layer return
bf16: their outputs feed only linear layers (q, k, v; gate, up), which would otherwise cast the
same fp32 tensor to bf16 once each, and the values are the same either way. The model's final
norm keeps fp32 output: it feeds the fp32 LM head (`logprobs.fp32_head`).
"""

from __future__ import annotations

import functools

import torch

from .attention import bf16_autocast

# Classes whose forward is exactly LlamaRMSNorm's (checked in tests/test_rmsnorm.py); Gemma's
# (1 + w) and OLMo2's variants are not among them.
LLAMA_STYLE = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "GraniteRMSNorm",
               "SmolLM3RMSNorm")
LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")  # norms whose outputs feed only linear layers
ENABLED = True  # False: every norm runs its class's own forward (an ablation switch for benchmarks/ab_step.py)
LAYER_BF16_OUT = True  # False: the layer norms return fp32 under bf16 autocast too (ablation)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., H) fp32, weight (H,) fp32 -> w * x / sqrt(mean(x^2) + eps) (..., H), in `out_dtype` (default fp32)."""
    return _RMSNorm.apply(x, weight, eps, out_dtype or x.dtype)


class _RMSNorm(torch.autograd.Function):
    """y = w * xhat, xhat = x * r, r = (mean(x^2) + eps)^-1/2, over the last dim of size H.

    Backward: with g = dy * w, dx = r * (g - xhat * mean(g * xhat)) and dw = sum over tokens of dy * xhat.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, out_dtype):
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        xhat = x * rstd
        ctx.save_for_backward(xhat, weight, rstd)
        return (xhat * weight).to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        xhat, weight, rstd = ctx.saved_tensors
        grad_out = grad_out.float()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g = grad_out * weight
            mean = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(xhat.shape[-1])
            grad_x = torch.addcmul(g, xhat, mean, value=-1).mul_(rstd)
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * xhat).reshape(-1, xhat.shape[-1]).sum(0)
        return grad_x, grad_w, None, None


def fast_rms_norms(model) -> int:
    """Give `model`'s Llama-style RMSNorms `_forward` (idempotent); returns how many it has."""
    count = 0
    for name, module in model.named_modules():
        cls = type(module)
        if not getattr(cls, "_dpolab_fast", False):
            if cls.__name__ not in LLAMA_STYLE or not hasattr(module, "variance_epsilon"):
                continue
            # A subclass, not an instance attribute: transformers (5.25, with the `kernels` package)
            # drops instance forwards of its kernel-capable layers in train() / eval().
            module.__class__ = _fast_class(cls)
        module._dpolab_bf16_out = name.rsplit(".", 1)[-1] in LAYER_NORMS
        count += 1
    return count


@functools.cache
def _fast_class(cls: type) -> type:
    """`cls` with `_forward` (same name, so reprs and state dicts read as before)."""
    return type(cls.__name__, (cls,), {"forward": _forward, "_dpolab_fast": True, "_dpolab_base": cls,
                                       "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _forward(norm, hidden: torch.Tensor) -> torch.Tensor:
    """`fast_rms_norms`' forward of `norm`: hidden (..., H) -> (..., H)."""
    if not ENABLED or hidden.dtype != torch.float32 or norm.weight.dtype != torch.float32:
        return norm._dpolab_base.forward(norm, hidden)
    bf16_out = LAYER_BF16_OUT and norm._dpolab_bf16_out and bf16_autocast(hidden.device.type)
    return rms_norm(hidden, norm.weight, norm.variance_epsilon, torch.bfloat16 if bf16_out else None)

"""dpolab.rmsnorm: the one-node RMSNorm computes what transformers' LlamaRMSNorm computes."""

from __future__ import annotations

import copy
import importlib
import inspect

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from dpolab import rmsnorm
from dpolab.models import load_model
from tests.conftest import build_tiny_model

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("name", rmsnorm.LLAMA_STYLE)
def test_every_listed_class_has_llama_s_forward(name):
    module = importlib.import_module(f"transformers.models.{name[:-len('RMSNorm')].lower()}.modeling_{name[:-len('RMSNorm')].lower()}")
    assert inspect.getsource(getattr(module, name).forward) == inspect.getsource(LlamaRMSNorm.forward)


def test_forward_and_backward_match_autograd_through_llama_rms_norm():
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
    x = (torch.randn(2, 7, 48) * 3).requires_grad_(True)
    grad = torch.randn(2, 7, 48)
    expected = norm(x)
    expected.backward(grad)
    want_x, want_w = x.grad.clone(), norm.weight.grad.clone()
    x.grad, norm.weight.grad = None, None
    got = rmsnorm.rms_norm(x, norm.weight, 1e-5)
    got.backward(grad)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, want_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, want_w, rtol=1e-5, atol=1e-5)


def test_a_loaded_model_s_norms_run_the_fast_forward_with_the_same_logits_and_gradients(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    norms = [m for m in model.modules() if isinstance(m, LlamaRMSNorm)]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1 and all(m._dpolab_fast for m in norms)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))

    def logits_and_grads(enabled: bool):
        model.zero_grad()
        rmsnorm.ENABLED = enabled
        try:
            logits = model(input_ids=ids).logits
        finally:
            rmsnorm.ENABLED = True
        (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = logits_and_grads(True)
    slow, slow_grads = logits_and_grads(False)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_under_bf16_autocast_layer_norms_return_bf16_and_the_final_norm_fp32():
    model = build_tiny_model(97)
    assert rmsnorm.fast_rms_norms(model) == 5
    layer, final = model.model.layers[0].input_layernorm, model.model.norm
    x = torch.randn(1, 6, 32)
    with torch.autocast(**BF16):
        inside, last = layer(x), final(x)
    assert inside.dtype == torch.bfloat16 and last.dtype == torch.float32
    # the values every linear layer would have cast to bf16 itself
    assert torch.equal(inside, LlamaRMSNorm.forward(layer, x).to(torch.bfloat16))
    torch.testing.assert_close(last, LlamaRMSNorm.forward(final, x), rtol=1e-6, atol=1e-6)


def test_other_dtypes_take_the_class_forward_and_a_deep_copy_uses_its_own_weight():
    model = build_tiny_model(97)
    rmsnorm.fast_rms_norms(model)
    norm = model.model.norm
    x = torch.randn(1, 4, 32, dtype=torch.bfloat16)
    assert torch.equal(norm(x), LlamaRMSNorm.forward(norm, x))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.model.norm.weight.mul_(2.0)
    x = torch.randn(1, 4, 32)
    torch.testing.assert_close(twin.model.norm(x), 2.0 * norm(x))


def test_the_fast_forward_survives_train_eval_and_a_reset_of_instance_forwards():
    """transformers 5.25 with the `kernels` package resets the forward of its kernel-capable layers
    (RMSNorm among them) in train() / eval() by dropping instance attributes: ours is the class's."""
    model = build_tiny_model(97)
    rmsnorm.fast_rms_norms(model)
    model.train()
    model.eval()
    norm = model.model.norm
    norm.__dict__.pop("forward", None)  # what the kernels package's fallback does
    x = torch.randn(1, 4, 32)
    calls = []
    real = rmsnorm.rms_norm
    try:
        rmsnorm.rms_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
        norm(x)
    finally:
        rmsnorm.rms_norm = real
    assert calls and isinstance(norm, LlamaRMSNorm) and repr(norm).startswith("LlamaRMSNorm(")
    assert rmsnorm.fast_rms_norms(model) == 5 and type(norm).__mro__[1] is LlamaRMSNorm  # idempotent: one subclass

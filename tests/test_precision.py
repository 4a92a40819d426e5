"""bf16 autocast means what fp32 means: rounded master weights, an fp32 LM head, a loss curve near fp32's."""

from __future__ import annotations

import math

import pytest
import torch

from dpolab.logprobs import fp32_head
from dpolab.models import round_to_bf16
from dpolab.train import train
from tests.conftest import build_tiny_model

BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def at_ties(model):
    """Put every weight exactly halfway between two bf16 values (as 8% of the GGUF-converted default model's)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((p.view(torch.int32) & ~0xFFFF | 0x8000).view(torch.float32))
    return model


def test_round_to_bf16_keeps_the_bf16_forward_and_counts_ties():
    model = at_ties(build_tiny_model(97)).eval()
    fp32_head(model)
    ids = torch.randint(3, 97, (1, 12))
    with torch.no_grad(), torch.autocast(**BF16):
        before = model(input_ids=ids).logits
    assert round_to_bf16(model) == 1.0
    linear = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert linear and all(torch.equal(p, p.to(torch.bfloat16).float()) for p in linear)
    assert not torch.equal(model.lm_head.weight, model.lm_head.weight.to(torch.bfloat16).float())  # fp32 head: kept
    with torch.no_grad(), torch.autocast(**BF16):
        assert torch.equal(model(input_ids=ids).logits, before)  # autocast rounded the same way


def test_ties_amplify_a_tiny_update_unless_rounded():
    """The cause of the issue's bf16 metrics: an update of 1e-7 moves a tie's bf16 copy by half a bf16 step."""
    ids = torch.randint(3, 97, (1, 12))
    changes = {}
    for rounded in (False, True):
        model = at_ties(build_tiny_model(97)).eval()
        fp32_head(model)
        if rounded:
            round_to_bf16(model)
        with torch.no_grad():
            with torch.autocast(**BF16):  # a new autocast region per forward: it caches weight casts
                before = model(input_ids=ids).logits.float()
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m is not model.lm_head:
                    m.weight.add_(1e-7)
            with torch.autocast(**BF16):
                changes[rounded] = float((model(input_ids=ids).logits.float() - before).abs().max())
    assert changes[True] == 0.0  # below half a bf16 step: accumulates in the fp32 master weights first
    assert changes[False] > 1e-3


def test_fp32_head_under_autocast():
    model = build_tiny_model(97).eval()
    ids = torch.randint(3, 97, (1, 12))
    with torch.no_grad():
        exact = model(input_ids=ids).logits
        fp32_head(model)
        assert torch.equal(model(input_ids=ids).logits, exact)  # outside autocast: nn.Linear's fp32 result
        with torch.autocast(**BF16):
            logits = model(input_ids=ids).logits
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, exact, atol=0.05, rtol=0.02)
    assert dict(model.state_dict()).keys() == dict(build_tiny_model(97).state_dict()).keys()


def head_grads(model, hidden, autocast: bool):
    """Logits of a fixed random direction's dot product, backward: (logits, grad of hidden, grad of the head weight)."""
    model.zero_grad(set_to_none=True)
    hidden = hidden.clone().requires_grad_()
    with torch.autocast(**BF16, enabled=autocast):
        logits = model.lm_head(hidden)
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1))
    (logits * direction).sum().backward()
    return logits.detach(), hidden.grad, model.lm_head.weight.grad, direction


def test_fp32_head_backward_runs_in_bf16_under_autocast_only():
    """Under bf16 autocast the head's logits are fp32 and exact; its two backward matmuls are bf16, as
    autocast's linear layers compute theirs (checked by hand); outside autocast everything is fp32."""
    model = build_tiny_model(97)
    fp32_head(model)
    hidden = torch.randn(1, 12, model.config.hidden_size)
    weight = model.lm_head.weight.detach()
    logits, grad_hidden, grad_weight, direction = head_grads(model, hidden, autocast=True)
    assert logits.dtype == torch.float32 and torch.equal(logits, hidden @ weight.T)
    g = direction.to(torch.bfloat16)
    assert torch.equal(grad_hidden, (g @ weight.to(torch.bfloat16)).float())
    assert torch.equal(grad_weight, (g[0].T @ hidden[0].to(torch.bfloat16)).float())
    torch.testing.assert_close(grad_hidden, direction @ weight, rtol=0.02, atol=0.02)  # near the fp32 gradient
    _, grad_hidden, grad_weight, direction = head_grads(model, hidden, autocast=False)
    torch.testing.assert_close(grad_hidden, direction @ weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_weight, direction[0].T @ hidden[0], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_bf16_loss_curve_stays_near_fp32(tiny_model_dir, toy_data, tmp_path):
    """Same data, order and lr: bf16 autocast's per-step losses within 0.02 of fp32's over 8 steps."""
    losses = {}
    for bf16 in ("false", "true"):
        result = train(model=str(tiny_model_dir), data=str(toy_data), output_dir=str(tmp_path / bf16), bf16=bf16,
                       progress=False, lr=1e-3, batch_size=4, max_steps=8, eval_fraction=0.0, warmup_ratio=0.0,
                       precompute_ref=True, final_checkpoint=False)
        losses[bf16] = [r["loss"] for r in result["history"] if r["split"] == "train"]
    assert losses["true"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses["false"][-1] < losses["false"][0] - 0.01, losses  # the run learns: the curves are not both flat
    assert max(abs(a - b) for a, b in zip(losses["true"], losses["false"])) < 0.02, losses


def test_fp32_head_of_a_deep_copy_uses_the_copy_s_weights():
    """A reference deep-copied from a patched policy must compute with its own head, not the policy's."""
    import copy

    policy = build_tiny_model(97).eval()
    fp32_head(policy)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5)  # tied: the policy's embeddings move too
        ids = torch.randint(3, 97, (1, 12))
        with torch.autocast(**BF16):
            got = reference(input_ids=ids).logits
        hidden = reference.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, hidden @ reference.lm_head.weight.T, atol=0.05, rtol=0.02)
    assert not torch.allclose(got, hidden @ policy.lm_head.weight.T, atol=1.0)

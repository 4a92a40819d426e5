"""The FlexAttention kernel of segment attention gives the per-block loop's log-probs.

PyTorch's FlexAttention has no CPU backward, so on CPU only forward-only work (reference,
eval, scoring) can take it and only its forward is compared here; on CUDA, where it is the
default, the training tests run it with gradients.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dpolab import attention
from dpolab.data.collate import Layout, _segments, collate_pairs
from dpolab.logprobs import forward_logps
from tests.test_logprobs import edge_pairs, multi_turn_pairs, tiny


@pytest.fixture(scope="module")
def tokenizer():
    from tests.conftest import build_tokenizer

    return build_tokenizer()


def test_kernel_choice(monkeypatch):
    monkeypatch.delenv("DPOLAB_SEGMENT_KERNEL", raising=False)
    assert attention.kernel(torch.device("cpu"), grad=True) == "unit"
    assert attention.kernel(torch.device("cuda"), grad=True) == "flex"
    monkeypatch.setenv("DPOLAB_SEGMENT_KERNEL", "flex")
    assert attention.kernel(torch.device("cpu"), grad=False) == "flex"
    with pytest.raises(ValueError, match="no CPU backward"):
        attention.kernel(torch.device("cpu"), grad=True)
    monkeypatch.setenv("DPOLAB_SEGMENT_KERNEL", "fast")
    with pytest.raises(ValueError, match="loop, unit, flex"):
        attention.kernel(torch.device("cpu"), grad=False)


def test_block_mask_matches_segments():
    """The dense form of the block mask is exactly the segments' visibility, padding apart."""
    segments = ((0, 5, 0, 0), (5, 3, 0, 2), (8, 4, 0, 0), (12, 2, 8, 1))
    mask = attention.block_mask(segments, 128, torch.device("cpu"))
    q, k = torch.arange(128)[:, None], torch.arange(128)[None]
    dense = mask.mask_mod(0, 0, q, k)
    want = torch.zeros(14, 14, dtype=torch.bool)
    for start, length, ctx_start, ctx_length in segments:
        for i in range(start, start + length):
            want[i, start : i + 1] = True
            want[i, ctx_start : ctx_start + ctx_length] = True
    assert torch.equal(dense[:14, :14], want)
    assert not dense[:14, 14:].any() and dense[14:, 14:].diagonal().all()  # padding sees only padding



def random_segments(rng, units: int) -> tuple:
    """The segments `collate._segments` builds for a row of random units (a prompt of 1-299 tokens, 1-3 completions)."""
    return _segments([{"prompt": int(rng.integers(1, 300)), "completions": [int(n) for n in rng.integers(1, 300, size=int(rng.integers(1, 4)))]}
                      for _ in range(units)])


def test_block_mask_tiles_match_create_block_mask():
    """The tiles counted from the segments' ranges are the ones FlexAttention's own
    `create_block_mask` finds by evaluating the mask at every position: partial and full,
    by query tile and by key tile (the backward's lists)."""
    from torch.nn.attention.flex_attention import create_block_mask

    def tiles(mask, kind):  # per query (or key) tile: the sorted list of tiles it visits
        num, idx = getattr(mask, f"{kind}_num_blocks")[0, 0], getattr(mask, f"{kind}_indices")[0, 0]
        return [sorted(idx[i, : num[i]].tolist()) for i in range(num.shape[0])]

    rng = np.random.default_rng(0)
    for trial in range(25):
        segments = random_segments(rng, int(rng.integers(1, 7)))
        padded = attention.padded_length(segments[-1][0] + segments[-1][1]) + attention.BUCKET * (trial % 2)
        ours = attention.block_mask(segments, padded, torch.device("cpu"))
        want = create_block_mask(ours.mask_mod, None, None, padded, padded, device="cpu")
        for kind in ("kv", "full_kv", "q", "full_q"):
            assert tiles(ours, kind) == tiles(want, kind), (trial, kind, segments)
        assert ours.seq_lengths == (padded, padded)


def test_tile_counts_count_every_visible_pair():
    """Per tile, the count is the number of visible (query, key) pairs, also with a query chunk smaller than the row."""
    segments = random_segments(np.random.default_rng(1), 4)
    padded = attention.padded_length(segments[-1][0] + segments[-1][1])
    block, first, lo, hi = attention.token_ranges(segments, padded)
    q, k = torch.arange(padded)[:, None], torch.arange(padded)[None]
    dense = ((block[q] == block[k]) & (k <= q)) | ((k >= lo[q]) & (k < hi[q]))
    n, b = padded // attention.BUCKET, attention.BUCKET
    want = dense.view(n, b, n, b).sum((1, 3), dtype=torch.int32)
    assert torch.equal(attention.tile_counts(first, lo, hi), want)
    assert torch.equal(attention.tile_counts(first, lo, hi, rows=b), want)
    assert int(want.sum()) == int(dense.sum())
    with pytest.raises(ValueError, match="segment 1: its context"):  # counting assumes the context precedes its block
        attention.token_ranges(((0, 4, 0, 0), (4, 2, 2, 3)), 128)

def test_units_cover_segments_with_their_visibility():
    """Each unit's mask is exactly what its blocks see; units tile the row in order."""
    segments = ((0, 5, 0, 0), (5, 3, 0, 2), (8, 2, 0, 2), (10, 4, 0, 0), (14, 6, 0, 0), (20, 2, 14, 1))
    grouped = attention.units(segments)
    assert [(s, n) for s, n, _ in grouped] == [(0, 10), (10, 4), (14, 8)]
    assert grouped[1][2] is None  # a lone causal block needs no mask
    want = torch.zeros(22, 22, dtype=torch.bool)
    for start, length, ctx_start, ctx_length in segments:
        for i in range(start, start + length):
            want[i, start : i + 1] = True
            want[i, ctx_start : ctx_start + ctx_length] = True
    for start, size, mask in grouped:
        block = want[start : start + size, start : start + size]
        assert torch.equal(mask if mask is not None else torch.ones(size, size, dtype=torch.bool).tril(), block)
        assert not want[start : start + size, :start].any() and not want[start : start + size, start + size :].any()


def kernel_logps_and_grads(monkeypatch, kernel: str, make_model, batch):
    """Log-probs of `batch` under one segment kernel and the gradients of their sum (a fresh model)."""
    monkeypatch.setenv("DPOLAB_SEGMENT_KERNEL", kernel)
    model = make_model().train()
    logps = forward_logps(model, batch)
    logps.sum().backward()
    return logps, {n: p.grad for n, p in model.named_parameters()}


def test_unit_kernel_matches_loop_with_gradients(tokenizer, monkeypatch):
    """One masked SDPA call per unit gives the loop's log-probs and gradients (fp32, CPU)."""
    pairs = multi_turn_pairs(tokenizer, 5, 3, max_length=120, max_prompt_length=64) + edge_pairs()
    batch = collate_pairs(pairs, tokenizer.pad_token_id, Layout(True, True, True))
    loop_logps, loop_grads = kernel_logps_and_grads(monkeypatch, "loop", lambda: tiny(len(tokenizer)), batch)
    unit_logps, unit_grads = kernel_logps_and_grads(monkeypatch, "unit", lambda: tiny(len(tokenizer)), batch)
    torch.testing.assert_close(unit_logps, loop_logps, atol=1e-5, rtol=1e-5)
    for n, g in loop_grads.items():
        torch.testing.assert_close(unit_grads[n], g, atol=1e-5, rtol=1e-4, msg=n)


def test_long_units_take_the_loop_by_default(tokenizer, monkeypatch):
    """Above UNIT_MAX tokens a unit's masked call costs more than the loop: the default falls back."""
    pairs = multi_turn_pairs(tokenizer, 3, 2, max_length=120, max_prompt_length=64)
    batch = collate_pairs(pairs, tokenizer.pad_token_id, Layout(True, True, True))
    model = tiny(len(tokenizer))
    used = []
    inner = attention.unit_segments
    monkeypatch.setattr(attention, "unit_segments", lambda *a, **k: used.append(1) or inner(*a, **k))
    monkeypatch.delenv("DPOLAB_SEGMENT_KERNEL", raising=False)
    with torch.no_grad():
        short = forward_logps(model, batch)
        assert used
        used.clear()
        monkeypatch.setattr(attention, "UNIT_MAX", 4)
        long = forward_logps(model, batch)
    assert not used
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["unit", "loop"])
def test_bf16_on_cpu_computes_attention_in_fp32(monkeypatch, kernel):
    """PyTorch's CPU SDPA backward is slower in bf16: q/k/v reach SDPA in fp32 and the layer gets bf16
    back (and bf16 gradients); forward-only work (reference pass, eval) does the same, so policy and
    reference log-probs come from the same arithmetic."""
    segments = ((0, 6, 0, 0), (6, 3, 0, 4))  # prompt (4) + chosen (2), then rejected (3) seeing the prompt
    module = SimpleNamespace(training=True, num_key_value_groups=2)
    monkeypatch.setenv("DPOLAB_SEGMENT_KERNEL", kernel)
    seen, inner = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or inner(q, k, v, **kw))
    outs = {}
    for grad, switch, want in ((True, True, torch.float32), (False, True, torch.float32), (True, False, torch.bfloat16)):
        monkeypatch.setattr(attention, "CPU_BF16_IN_FP32", switch)
        seen.clear()
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, h, 9, 8, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
        with torch.set_grad_enabled(grad):
            out, _ = attention.segment_attention(module, q, k, v, None, scaling=0.35, dpolab_segments=segments)
        assert set(seen) == {want} and out.dtype == torch.bfloat16 and out.shape == (1, 9, 4, 8), (grad, switch)
        outs[grad, switch] = out.detach()
        if grad:
            out.float().sum().backward()
            assert q.grad.dtype == torch.bfloat16 and k.grad.abs().sum() > 0
    assert torch.equal(outs[True, True], outs[False, True])  # training and forward-only agree exactly


@pytest.mark.parametrize("kernel", ["unit", "loop"])
def test_bf16_autocast_in_a_real_model_reaches_sdpa_in_fp32(tokenizer, monkeypatch, kernel):
    """Under autocast a Llama layer hands over q and k in fp32 (rotary) and v in bf16, and SDPA's autocast
    rule would cast all three to bf16: the kernel must see fp32 with autocast off, and only then."""
    pairs = multi_turn_pairs(tokenizer, 3, 2, max_length=120, max_prompt_length=64)
    batch = collate_pairs(pairs, tokenizer.pad_token_id, Layout(True, True, True))
    model = tiny(len(tokenizer))
    monkeypatch.setenv("DPOLAB_SEGMENT_KERNEL", kernel)
    seen, inner = set(), torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.add((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu"))) or inner(q, k, v, **kw))
    for switch, want in ((True, {(torch.float32,) * 3 + (False,)}), (False, {(torch.float32, torch.float32, torch.bfloat16, True)})):
        monkeypatch.setattr(attention, "CPU_BF16_IN_FP32", switch)
        seen.clear()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = forward_logps(model, batch)
        logps.sum().backward()
        assert seen == want, switch
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow  # compiles FlexAttention (about a minute on 2 cores)
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_flex_forward_matches_loop(tokenizer, monkeypatch, autocast):
    pairs = multi_turn_pairs(tokenizer, 5, 2, max_length=120, max_prompt_length=64) + edge_pairs()
    model = tiny(len(tokenizer))
    batch = collate_pairs(pairs, tokenizer.pad_token_id, Layout(True, True, True))
    got = {}
    for name in ("loop", "flex"):
        monkeypatch.setenv("DPOLAB_SEGMENT_KERNEL", name)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got[name] = forward_logps(model, batch)
    # bf16: both kernels round q, k, v to bf16; they differ in accumulation order only
    tolerance = dict(atol=5e-2, rtol=1e-2) if autocast else dict(atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got["flex"], got["loop"], **tolerance)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward runs on CUDA only (PyTorch has no CPU backward)")
def test_flex_gradients_match_loop_on_cuda(tokenizer, monkeypatch):
    pairs = multi_turn_pairs(tokenizer, 5, 3, max_length=120, max_prompt_length=64)
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v
             for k, v in collate_pairs(pairs, tokenizer.pad_token_id, Layout(True, True, True)).items()}
    loop_logps, loop_grads = kernel_logps_and_grads(monkeypatch, "loop", lambda: tiny(len(tokenizer)).cuda(), batch)
    flex_logps, flex_grads = kernel_logps_and_grads(monkeypatch, "flex", lambda: tiny(len(tokenizer)).cuda(), batch)
    torch.testing.assert_close(flex_logps, loop_logps, atol=1e-4, rtol=1e-4)
    for n, g in loop_grads.items():
        torch.testing.assert_close(flex_grads[n], g, atol=1e-4, rtol=1e-3, msg=n)


@pytest.mark.slow  # compiles FlexAttention twice
def test_flex_compiles_once_per_shape_then_dynamic_not_per_batch():
    """Each batch brings a new mask (a new mask_mod closure over new tensors): the compiled
    kernel is reused for it; a second row length compiles once more with dynamic shapes, and
    no later length compiles again."""
    from torch._dynamo.utils import counters

    def row(prompt, chosen, rejected):
        return ((0, prompt + chosen, 0, 0), (prompt + chosen, rejected, 0, prompt)), prompt + chosen + rejected

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    for segments, length in (row(100, 50, 60), row(90, 70, 40), row(150, 100, 90), row(200, 150, 100), row(300, 200, 250)):
        q, k, v = torch.randn(1, 4, length, 16), torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16)
        attention.flex_segments(q, k, v, segments)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [1, 1, 2, 2, 2]


@pytest.mark.slow  # compiles FlexAttention
def test_flex_matches_loop_on_a_long_row_with_full_tiles():
    """A row of thousands of tokens, where many tiles are full (FlexAttention skips the mask
    there) and many partial: the same attention as one SDPA call per block."""
    segments = random_segments(np.random.default_rng(2), 12)
    length = segments[-1][0] + segments[-1][1]
    padded = attention.padded_length(length)
    assert int(attention.block_mask(segments, padded, torch.device("cpu")).full_kv_num_blocks.sum()) >= 10
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, length, 32), torch.randn(1, 2, length, 32), torch.randn(1, 2, length, 32)
    want = attention.loop_segments(q, k, v, segments, None, 0.0, 2)
    torch.testing.assert_close(attention.flex_segments(q, k, v, segments), want, atol=1e-5, rtol=1e-5)

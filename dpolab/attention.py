"""Segment attention: packed rows without one big masked T x T attention.

A packed row of S sequences of length ~L costs (S L)^2 in one masked attention call, of
which only ~S L^2 is useful: the CPU and GPU SDPA kernels compute masked-out blocks too.
Here each block of the row (a sequence, or a prefix-shared completion with its prompt as
context, see `dpolab.data.collate`) gets its own small attention call; the rest of the
model still runs once over the whole padding-free row.

It plugs into transformers through its public `AttentionInterface`: `enable(model)` switches
the model to the implementation `"dpolab_segments"`, which runs SDPA per block when the
forward call carries `dpolab_segments=` and is exactly transformers' SDPA otherwise (the
mask for that case is built as for SDPA). `_attn_implementation` is not saved with the
model, so checkpoints are unaffected.

Two kernels compute the same attention (`kernel()` picks one, `DPOLAB_SEGMENT_KERNEL=loop|flex`
overrides it):

- "flex": ONE compiled FlexAttention call per layer for the whole packed row, the blocks
  expressed as a block mask built from per-token block ids and context ranges (built once
  per batch, shared by every layer). The row is padded to a multiple of `BUCKET` tokens so
  the compiled kernel is reused across batches. The default on CUDA, where the loop would
  be hundreds of tiny kernel launches per step.
- "unit": one SDPA call per unit (a prompt with its completions, or one packed sequence) with
  a small boolean mask built once per batch. The default on CPU while every unit is at most
  `UNIT_MAX` tokens (fewer, larger calls; no concatenated context keys), the loop beyond.
- "loop": one SDPA call per block (a Python loop). On CPU for long units: PyTorch's
  FlexAttention has no CPU backward, and for forward-only work its compilation (35-100 s on
  2 cores, measured) costs more than the loop saves on eval-sized runs (docs/performance.md).
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

NAME = "dpolab_segments"
SUPPORTED = ("sdpa", "eager", NAME)  # implementations whose math the segment path reproduces
calls = 0  # segment-attention calls so far: lets callers check the segments reached attention
BUCKET = 128  # flex: rows padded to a multiple of this (FlexAttention's block size) to reuse compiled kernels
KERNELS = ("loop", "unit", "flex")
# unit: longest unit (prompt + its completions) one masked call serves; longer rows take the loop.
# Measured on 2 cores (fwd+bwd, one layer's attention, unit/loop CPU time): 290-token units
# 0.74, 600 0.58, 1000 1.29, 2000 1.31 (the masked call computes the chosen x rejected block
# and the upper triangle, twice the loop's FLOPs; below ~600 tokens call overhead dominates).
UNIT_MAX = 768
# bf16 on CPU (bf16 tensors or bf16 autocast) computes attention in fp32: PyTorch's CPU SDPA is
# slower in bf16 than in fp32, most for short units (fwd+bwd of a 43-token unit 1.8 ms against
# 0.45 ms, of 290 tokens 7.2 against 5.4; docs/performance.md). Forward-only work (reference pass,
# eval) does the same, so policy and reference log-probs come from the same arithmetic.
CPU_BF16_IN_FP32 = True


def bf16_autocast(device_type: str) -> bool:
    """Whether a bf16 autocast region is active for `device_type` ("cpu", "cuda")."""
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def kernel(device: torch.device, grad: bool) -> str:
    """The kernel for a forward on `device` (with or without autograd); see the module docstring."""
    forced = os.environ.get("DPOLAB_SEGMENT_KERNEL", "")
    if forced:
        if forced not in KERNELS:
            raise ValueError(f"DPOLAB_SEGMENT_KERNEL must be one of {', '.join(KERNELS)}, got {forced!r}")
        if forced == "flex" and grad and device.type == "cpu":
            raise ValueError("FlexAttention has no CPU backward in PyTorch: use DPOLAB_SEGMENT_KERNEL=loop for CPU training")
        return forced
    return "flex" if device.type == "cuda" else "unit"


def segment_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, dpolab_segments=None, **kwargs):
    """query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D), block by block."""
    if dpolab_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError("segment attention needs a packed batch (one row)")
    global calls
    calls += 1
    chosen = kernel(query.device, torch.is_grad_enabled())
    if chosen == "flex":
        return flex_segments(query, key, value, dpolab_segments, scaling), None
    dropout = dropout if module.training else 0.0
    device = query.device.type
    bf16 = query.dtype == torch.bfloat16 or bf16_autocast(device)
    # Under autocast q and k arrive fp32 (rotary), v bf16, and SDPA would cast all three to bf16:
    # switch autocast off here so the fp32 cast below is what the kernel sees.
    in_fp32 = CPU_BF16_IN_FP32 and bf16 and device == "cpu"
    with torch.autocast(device, enabled=False) if in_fp32 else contextlib.nullcontext():
        if in_fp32:
            query, key, value = query.float(), key.float(), value.float()
        if chosen == "unit" and (os.environ.get("DPOLAB_SEGMENT_KERNEL") or max(n for _, n, _ in units(dpolab_segments)) <= UNIT_MAX):
            out = unit_segments(query, key, value, dpolab_segments, scaling, dropout)
        else:
            out = loop_segments(query, key, value, dpolab_segments, scaling, dropout, getattr(module, "num_key_value_groups", 1))
    return (out.to(torch.bfloat16) if bf16 else out), None


def loop_segments(query, key, value, segments: tuple, scaling, dropout: float, groups: int) -> torch.Tensor:
    """One SDPA call per block: query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D)."""
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # torch.split, not one slice per block: the backward of a slice allocates a zero tensor
    # the size of the whole row, once per block and layer.
    queries = torch.split(query, [length for _, length, _, _ in segments], dim=2)
    cuts = sorted({0, key.shape[2]} | {c for s, n, cs, cn in segments for c in (s, s + n, cs, cs + cn)})
    keys = dict(zip(cuts, torch.split(key, [b - a for a, b in zip(cuts, cuts[1:])], dim=2)))
    values = dict(zip(cuts, torch.split(value, [b - a for a, b in zip(cuts, cuts[1:])], dim=2)))
    outs = []
    for q, (start, length, ctx_start, ctx_length) in zip(queries, segments):
        spans = [(ctx_start, ctx_start + ctx_length)] if ctx_length else []
        pieces = [c for a, b in spans + [(start, start + length)] for c in cuts if a <= c < b]
        k = torch.cat([keys[c] for c in pieces], dim=2) if len(pieces) > 1 else keys[pieces[0]]
        v = torch.cat([values[c] for c in pieces], dim=2) if len(pieces) > 1 else values[pieces[0]]
        if ctx_length == 0:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling)
        else:
            # query i sees the whole context and its own block up to i (bottom-right causal)
            mask = torch.ones(length, ctx_length + length, dtype=torch.bool, device=q.device).tril(ctx_length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        outs.append(out)
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def units(segments: tuple) -> tuple:
    """Group blocks into units `(start, length, mask)`: a plain causal block and the blocks that take it as context.

    `mask` (length, length) bool is the unit's attention pattern (None: plain causal), built once
    per batch (cached) and shared by every layer.
    """
    if segments in _unit_cache:
        return _unit_cache[segments]
    groups: list[list] = []
    for seg in segments:
        start, length, ctx_start, ctx_length = seg
        inside = groups and ctx_length and groups[-1][0][0] <= ctx_start and ctx_start + ctx_length <= start
        if inside:
            groups[-1].append(seg)
        else:
            groups.append([seg])
    out = []
    for group in groups:
        u0 = group[0][0]
        size = group[-1][0] + group[-1][1] - u0
        if len(group) == 1 and group[0][3] == 0:
            out.append((u0, size, None))
            continue
        mask = torch.zeros(size, size, dtype=torch.bool)
        for start, length, ctx_start, ctx_length in group:
            a = start - u0
            mask[a : a + length, a : a + length] = torch.ones(length, length, dtype=torch.bool).tril()
            mask[a : a + length, ctx_start - u0 : ctx_start - u0 + ctx_length] = True
        out.append((u0, size, mask))
    _unit_cache.clear()  # one batch at a time
    _unit_cache[segments] = tuple(out)
    return _unit_cache[segments]


_unit_cache: dict = {}


def unit_segments(query, key, value, segments: tuple, scaling=None, dropout=0.0) -> torch.Tensor:
    """One SDPA call per unit (a prompt with all its completions) with a small boolean mask:
    query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D).

    Fewer, larger calls than the per-block loop and no concatenation of context keys, at the
    price of computing the masked-out (chosen x rejected) block of each unit.
    """
    grouped = units(segments)
    sizes = [size for _, size, _ in grouped]
    gqa = query.shape[1] != key.shape[1]  # SDPA shares kv heads itself: no repeated copies of k and v
    outs = []
    for q, k, v, (_, size, mask) in zip(*(torch.split(x, sizes, dim=2) for x in (query, key, value)), grouped):
        if mask is None:
            outs.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa))
        else:
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.device), dropout_p=dropout, scale=scaling,
                                                       enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def padded_length(length: int) -> int:
    """`length` tokens rounded up to a multiple of BUCKET: the row flex attention runs on."""
    return -(-length // BUCKET) * BUCKET


def flex_segments(query, key, value, segments: tuple, scaling=None) -> torch.Tensor:
    """The segments' attention as one FlexAttention call: (1, H, T, D) x (1, Hkv, T, D) -> (1, T, H, D)."""
    length = query.shape[2]
    padded = padded_length(length)
    device = query.device
    # autocast does not reach FlexAttention: cast as it would for SDPA (rotary embeddings leave q, k fp32)
    dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else value.dtype
    q, k, v = (F.pad(x.to(dtype), (0, 0, 0, padded - length)) for x in (query, key, value))
    out = _compiled_flex()(q, k, v, block_mask=block_mask(segments, padded, device), scale=scaling,
                           enable_gqa=query.shape[1] != key.shape[1])
    return out[:, :, :length].transpose(1, 2).contiguous()


_mask_cache: dict = {}


def block_mask(segments: tuple, padded: int, device: torch.device):
    """FlexAttention block mask of the segments over a row of `padded` tokens (cached: every layer reuses it).

    Query q of block s sees key k when k is in s and k <= q, or k is in s's context range.
    Padding tokens form one extra block of their own, so no row is empty. The tiles a query
    tile needs are counted from these ranges (`tile_counts`): `create_block_mask` would evaluate
    the mask at every one of the padded x padded positions, gigabytes for a 16k-token row.
    """
    key = (segments, padded, str(device))
    if key not in _mask_cache:
        block, first, lo, hi = (x.to(device) for x in token_ranges(segments, padded))
        counts = tile_counts(first, lo, hi)
        full = counts == BUCKET * BUCKET
        partial = (counts > 0) & ~full
        _mask_cache.clear()  # one batch at a time: keep only the current mask
        _mask_cache[key] = BlockMask.from_kv_blocks(*_tile_lists(partial), *_tile_lists(full), BLOCK_SIZE=BUCKET,
                                                    mask_mod=visibility(block, lo, hi), seq_lengths=(padded, padded))
    return _mask_cache[key]


def visibility(block: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """FlexAttention mask_mod of `token_ranges`' block ids and context ranges."""

    def visible(b, h, q, k):
        return ((block[q] == block[k]) & (k <= q)) | ((k >= lo[q]) & (k < hi[q]))

    return visible


def token_ranges(segments: tuple, padded: int) -> tuple:
    """Per token (int32, (padded,)): block id, its block's first token, its context range [lo, hi).

    The padding after the segments is one more block (id len(segments)) with no context.
    """
    block = torch.full((padded,), len(segments), dtype=torch.int32)
    first = torch.full((padded,), sum(n for _, n, _, _ in segments), dtype=torch.int32)
    lo, hi = torch.zeros(padded, dtype=torch.int32), torch.zeros(padded, dtype=torch.int32)
    for i, (start, length, ctx_start, ctx_length) in enumerate(segments):
        if ctx_length and ctx_start + ctx_length > start:
            raise ValueError(f"segment {i}: its context [{ctx_start}, {ctx_start + ctx_length}) must end before it starts ({start})")
        block[start : start + length], first[start : start + length] = i, start
        lo[start : start + length], hi[start : start + length] = ctx_start, ctx_start + ctx_length
    return block, first, lo, hi


def tile_counts(first: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, rows: int = 64 * BUCKET) -> torch.Tensor:
    """Visible (query, key) pairs in each BUCKET x BUCKET tile: (n, n) int32 for n = padded / BUCKET.

    Query q sees the keys [first[q], q] (its own block) and [lo[q], hi[q]) (its context), so
    per query and key tile the count is the sum of two interval overlaps: memory padded x n per
    `rows` queries (a multiple of BUCKET) at a time, not padded x padded.
    """
    padded = first.shape[0]
    n = padded // BUCKET
    a = torch.arange(0, padded, BUCKET, dtype=torch.int32, device=first.device)[None]  # key tile starts

    def overlap(start, stop):  # (queries, 1) ranges [start, stop) -> (queries, n) keys inside each key tile
        return (torch.minimum(stop, a + BUCKET) - torch.maximum(start, a)).clamp_min_(0)

    out = []
    for s in range(0, padded, rows):
        end = torch.arange(s + 1, min(s + rows, padded) + 1, dtype=torch.int32, device=first.device)[:, None]  # q + 1
        f, l, h = first[s : s + rows, None], lo[s : s + rows, None], hi[s : s + rows, None]
        per_query = overlap(f, end) + overlap(l, h)  # disjoint: the context ends before the block starts
        out.append(per_query.view(-1, BUCKET, n).sum(1, dtype=torch.int32))
    return torch.cat(out)


def _tile_lists(tiles: torch.Tensor) -> tuple:
    """(n, n) bool -> BlockMask's per-query-tile count (1, 1, n) and key tile indices, listed first (1, 1, n, n)."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int32), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[None, None], order[None, None]


_flex = None


def _compiled_flex():
    """flex_attention compiled once per process (uncompiled it materialises the full T x T scores)."""
    global _flex
    if _flex is None:
        _flex = torch.compile(flex_attention)
    return _flex


def register() -> None:
    """Make `"dpolab_segments"` known to transformers (idempotent)."""
    AttentionInterface.register(NAME, segment_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)


def enable(model) -> None:
    """Switch `model` (a transformers model, possibly wrapped by PEFT or DDP) to segment attention."""
    config = model_config(model)
    current = getattr(config, "_attn_implementation", None)
    if current == NAME:
        return
    if current not in SUPPORTED:
        raise ValueError(
            f"segment attention and prefix sharing need sdpa or eager attention, the model uses {current}: "
            "pass --no-segment-attention --no-prefix-sharing"
        )
    register()
    config._attn_implementation = NAME


def model_config(model):
    inner = getattr(model, "module", model)  # DDP / FSDP wrapper
    return getattr(inner, "config", None)

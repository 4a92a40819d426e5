"""Where a training step's time goes: torch.profiler over standard-case steps (4 HH pairs,
max length 512, prefix-shared packed row, sigmoid DPO against precomputed reference log-probs,
clip + fused AdamW), fp32 and bf16 autocast, self CPU time grouped into matmul, attention,
LM head + log-softmax, optimizer (+ clipping), elementwise/casts, other.

    python benchmarks/profile_step.py --steps 2 --threads 2 [--modes fp32,bf16]

Attribution: forward ops inside a `record_function` scope (attention, LM head) count for it,
their backward ops are found through the autograd sequence number; everything else is
grouped by op name. Fractions, not absolute times, are the point on a shared machine.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch
from torch.profiler import ProfilerActivity, profile, record_function

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_mkldnn", "mkldnn", "aten::linear_backward")
ELEMENTWISE = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::mul", "aten::add", "aten::sub", "aten::div",
               "aten::silu", "aten::pow", "aten::rsqrt", "aten::mean", "aten::neg", "aten::cat", "aten::sum",
               "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::clone", "aten::cos", "aten::sin",
               "aten::exp", "aten::where", "aten::masked", "aten::contiguous", "aten::transpose", "aten::slice",
               "aten::split", "aten::view", "aten::reshape", "aten::t", "aten::expand", "aten::index", "aten::embedding",
               "aten::sigmoid", "aten::threshold", "aten::_unsafe", "aten::as_strided", "aten::permute",
               "aten::narrow", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::detach", "aten::new_",
               "aten::resize", "aten::empty_like", "aten::ones", "aten::tril", "aten::gather", "aten::scatter",
               "aten::result_type", "aten::_reshape", "aten::add_", "aten::mul_", "aten::lerp", "aten::addcmul", "aten::sqrt")


def patch_scopes():
    """Wrap segment attention and the LM head + log-softmax in profiler scopes."""
    from dpolab import attention, logprobs
    from transformers import AttentionInterface

    inner_attn = attention.segment_attention

    def scoped_attention(*a, **k):
        with record_function("SCOPE::attention"):
            return inner_attn(*a, **k)

    attention.segment_attention = scoped_attention
    AttentionInterface.register(attention.NAME, scoped_attention)
    inner_lse = logprobs.token_logps_from_logits

    def scoped_lse(*a, **k):
        with record_function("SCOPE::lmhead"):
            return inner_lse(*a, **k)

    logprobs.token_logps_from_logits = scoped_lse


def head_scope(model):
    head = model.get_output_embeddings()
    fwd = head.forward

    def forward(x):
        with record_function("SCOPE::lmhead"):
            return fwd(x)

    head.forward = forward


def classify(prof) -> dict:
    events = prof.events()
    scope_of_seq = {}
    # forward ops under a scope: remember their sequence numbers so their backward follows them
    for e in events:
        p, scope = e.cpu_parent, None
        while p is not None:
            if p.name.startswith("SCOPE::"):
                scope = p.name[7:]
            p = p.cpu_parent
        if scope and getattr(e, "sequence_nr", -1) >= 0:
            scope_of_seq[e.sequence_nr] = scope
    groups: dict[str, float] = {}
    for e in events:
        scope, p = None, e
        while p is not None:
            n = p.name
            if n.startswith("SCOPE::"):
                scope = n[7:]
                break
            if n.startswith("Optimizer.") or "clip_grad" in n or n.startswith("OPT::"):
                scope = "optimizer + clip"
                break
            if n.startswith("autograd::engine::evaluate_function"):
                if "ScaledDotProduct" in n:
                    scope = "attention"
                elif getattr(p, "sequence_nr", -1) in scope_of_seq:
                    scope = scope_of_seq[p.sequence_nr]
                break
            p = p.cpu_parent
        name = e.name
        if scope is None:
            if name.startswith(MATMUL):
                scope = "matmul (model linears)"
            elif name.startswith(ELEMENTWISE) or "Backward" in name:
                scope = "elementwise / casts / views"
            else:
                scope = "other"
        if scope in ("attention", "lmhead") and name.startswith(MATMUL):
            scope = scope + " (matmul)"
        groups[scope] = groups.get(scope, 0.0) + e.self_cpu_time_total
    return groups


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="fp32,bf16")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a checkpoint dir")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from bench_precision import HH, first_pairs
    from dpolab import logprobs
    from dpolab.data.collate import Layout, collate_pairs
    from dpolab.models import load_model, load_tokenizer, round_to_bf16

    patch_scopes()
    tok = load_tokenizer(args.model)
    pairs = first_pairs(str(HH), tok, 4 * (args.steps + 1))
    batches = [collate_pairs(pairs[i:i + 4], tok.pad_token_id, Layout(True, True, True)) for i in range(0, len(pairs), 4)]
    out = {}
    for mode in args.modes.split(","):
        model = load_model(args.model).train()
        if mode == "bf16":
            round_to_bf16(model)
            logprobs.fp32_head(model)
        head_scope(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
        ref = [torch.zeros(4), torch.zeros(4)]

        def step(b):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16"):
                ch, rj = logprobs.pair_logps(model, b)
            loss = -torch.nn.functional.logsigmoid(0.1 * ((ch - ref[0]) - (rj - ref[1]))).mean()
            loss.backward()
            with record_function("OPT::clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss)

        step(batches[0])  # warm-up: allocations, kernel selection
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            for b in batches[1:args.steps + 1]:
                step(b)
        groups = classify(prof)
        total = sum(groups.values())
        out[mode] = {k: round(v / total, 3) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
        print(mode, "total self CPU s", round(total / 1e6, 1), json.dumps(out[mode], indent=1), flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
        del model, opt
    print("RESULT", json.dumps(out))


if __name__ == "__main__":
    main()

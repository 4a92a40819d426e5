"""Interleaved A/B of training-step variants in ONE process, on the same batches (standard case:
HH pairs, batch 4, max length 512, prefix-shared packed rows, sigmoid DPO against fixed reference
log-probs, clip 1.0, fused AdamW). Each variant has its own copy of the model and optimizer; the
variants take turns step by step (order alternating), so machine load hits both alike. Reports
the median per-step time ratio B/A and the largest per-step loss difference.

    python benchmarks/ab_step.py --a base --b row --steps 8 [--bf16] [--lr 1e-6] [--model default]

Variants: base (dpolab's training step today), and the changes under test (see VARIANTS).
"""
from __future__ import annotations

import argparse
import copy
import importlib
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import torch

from bench_precision import HH


def load_batches(model: str, n_pairs: int, layout):
    from dpolab.data import load_pairs, read_rows
    from dpolab.data.collate import collate_pairs
    from dpolab.models import load_tokenizer
    import tempfile

    tok = load_tokenizer(model)
    rows = [row for _, row in itertools.islice(read_rows(str(HH), "train"), n_pairs)]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = load_pairs(f.name, tok, max_length=512, max_prompt_length=256)
    os.unlink(f.name)
    return [collate_pairs(pairs[i:i + 4], tok.pad_token_id, layout) for i in range(0, len(pairs), 4)]


def clip_always(model, opt, max_norm):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)


def clip_folded(model, opt, max_norm):
    """The clip coefficient handed to the fused AdamW pass as its gradient divisor (dpolab.train.clip_gradients)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    coefficient = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    opt.grad_scale = 1.0 / coefficient if float(coefficient) < 1.0 else None
    return norm


VARIANTS = {
    # name: (layout kwargs, clip function, env for the attention kernel)
    # base: dpolab's step before these changes (per-block attention loop, clip_grad_norm_)
    "base": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_always, {"DPOLAB_SEGMENT_KERNEL": "loop"}),
    "row": (dict(packing=True, prefix_sharing=True, segment_attention=False), clip_always, {}),
    "clipfold": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {"DPOLAB_SEGMENT_KERNEL": "loop"}),
    "new": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),  # dpolab's defaults now
    "unit": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {"DPOLAB_SEGMENT_KERNEL": "unit"}),
    # bf16 ablations of today's defaults (module switches, see PATCHES): CPU attention in bf16
    # instead of fp32; the LM head's backward in fp32 instead of bf16
    "attn-bf16": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),
    "head-fp32": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),
    # the same step as "new": `--a new --b same` is an A/A run that shows the harness's own bias
    "same": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),
    # with --bf16: no autocast; an fp32 model whose matmuls oneDNN computes from bf16-rounded inputs
    # with fp32 accumulation and fp32 results (torch.backends.mkldnn.matmul.fp32_precision = "bf16")
    "bf32": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),
    # log-probs from the logits through plain autograd (logsumexp, slices, gather) instead of
    # logprobs._TargetLogps's hand-written backward
    "lse-autograd": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),
    # transformers' own RMSNorm forward instead of dpolab.rmsnorm's; dpolab's with fp32 layer-norm outputs under autocast
    "rms-hf": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),
    "rms-fp32-out": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_folded, {}),
    # clipping as its own multiply over every gradient (torch.nn.utils.clip_grad_norm_) before the optimizer step
    "clip-separate": (dict(packing=True, prefix_sharing=True, segment_attention=True), clip_always, {}),
}


def autograd_token_logps(logits, targets, rows=None):
    """dpolab's log-probs from logits before `_TargetLogps`: autograd through chunked logsumexp."""
    lse = torch.cat([logits[s : s + 2048].float().logsumexp(-1) for s in range(0, logits.shape[0], 2048)])
    if rows is None:
        return logits.gather(-1, targets[:, None]).squeeze(-1).float() - lse
    return logits[rows, targets].float() - lse[rows]


# variant: (module, attribute, value) set while the variant's step runs
PATCHES = {"attn-bf16": ("dpolab.attention", "CPU_BF16_IN_FP32", False),
           "head-fp32": ("dpolab.logprobs", "BF16_HEAD_BACKWARD", False),
           "lse-autograd": ("dpolab.logprobs", "token_logps_from_logits", autograd_token_logps),
           "rms-hf": ("dpolab.rmsnorm", "ENABLED", False),
           "rms-fp32-out": ("dpolab.rmsnorm", "LAYER_BF16_OUT", False)}


def make_stepper(name, model, bf16, lr, batches_by_layout):
    from dpolab import logprobs
    from dpolab.data.collate import Layout

    layout, clip, env = VARIANTS[name]
    batches = batches_by_layout(Layout(**layout))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    if bf16:
        logprobs.fp32_head(model)


    def step(i):
        b = batches[i % len(batches)]
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        patch = PATCHES.get(name)
        if patch:
            module = importlib.import_module(patch[0])
            kept = getattr(module, patch[1])
            setattr(module, patch[1], patch[2])
        try:
            t, c = time.perf_counter(), time.process_time()
            bf32 = bf16 and name == "bf32"
            torch.backends.mkldnn.matmul.fp32_precision = "bf16" if bf32 else "none"
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and not bf32):
                ch, rj = logprobs.pair_logps(model, b)
            # fixed reference log-probs: the first-step values of the starting model (set below)
            ref_c, ref_r = step.ref.get(i % len(batches), (ch.detach(), rj.detach()))
            step.ref.setdefault(i % len(batches), (ref_c, ref_r))
            loss = -torch.nn.functional.logsigmoid(0.1 * ((ch - ref_c) - (rj - ref_r))).mean()
            loss.backward()
            norm = clip(model, opt, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t, float(loss.detach()), float(norm), time.process_time() - c
        finally:
            if patch:
                setattr(module, patch[1], kept)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    step.ref = {}
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", default="base")
    ap.add_argument("--b", default="row")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a checkpoint dir")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    from dpolab.models import load_model, round_to_bf16

    cache = {}

    def batches_by_layout(layout):
        if layout not in cache:
            cache[layout] = load_batches(args.model, args.pairs, layout)
        return cache[layout]

    base = load_model(args.model).train()
    if args.bf16:
        round_to_bf16(base)
    steppers = {}
    for name in (args.a, args.b):
        model = base if name == args.a else copy.deepcopy(base)
        steppers[name] = make_stepper(name, model, args.bf16, args.lr, batches_by_layout)
    # shared reference log-probs: variant A's first-epoch values serve both (same starting model)
    steppers[args.b].ref = steppers[args.a].ref
    rows = []
    for i in range(args.steps):
        order = (args.a, args.b) if i % 2 == 0 else (args.b, args.a)
        res = {n: steppers[n](i) for n in order}
        rows.append(res)
        print(i, {n: tuple(round(x, 6) for x in r) for n, r in res.items()},
              "ratio B/A", round(res[args.b][0] / res[args.a][0], 3), "cpu", round(res[args.b][3] / res[args.a][3], 3), "load", os.getloadavg()[0], flush=True)
    ratios = [r[args.b][0] / r[args.a][0] for r in rows[1:]]  # step 0: warm-up
    cpu_ratios = [r[args.b][3] / r[args.a][3] for r in rows[1:]]
    dloss = max(abs(r[args.b][1] - r[args.a][1]) for r in rows)
    print("RESULT", json.dumps({"a": args.a, "b": args.b, "bf16": args.bf16, "median_ratio_b_over_a": round(statistics.median(ratios), 3),
                                "ratios": [round(x, 3) for x in ratios],
                                "median_cpu_ratio_b_over_a": round(statistics.median(cpu_ratios), 3), "cpu_ratios": [round(x, 3) for x in cpu_ratios], "max_loss_diff": dloss}))


if __name__ == "__main__":
    main()

"""fp32 vs bf16 training: per-step DPO metrics against fp32, and the step time of each precision.

    python benchmarks/bench_precision.py                 # 8 HH pairs, batch 4, lr 1e-6, 4 steps
    python benchmarks/bench_precision.py --pairs 32 --steps 8 --lr 5e-6 --out precision.json

The issue's check: at lr 1e-6 the bf16 run's reward margin and accuracy at step 2 must mean
what fp32's mean. Every mode runs the same minimal DPO loop built from dpolab's own pieces
(prefix-shared packed batches, `pair_logps`, the sigmoid loss, fused AdamW at a constant lr),
the reference log-probs computed once before the first step by the same model in the same
precision, each mode in a fresh process. Modes:

- fp32: everything fp32.
- autocast: bf16 autocast with fp32 master weights rounded to bf16 once at the start, the LM
  head in fp32 (dpolab's `--bf16 true`).
- autocast-unrounded: the same without the rounding: 8% of the default model's fp32 weights
  (de-quantised from GGUF) sit exactly halfway between two bf16 values, so the first update of
  any size flips their bf16 copy by half a bf16 step, ~60x the update at lr 1e-6.
- autocast-bf16-head: unrounded with a bf16 LM head (dpolab before this benchmark; TRL's bf16).
- bf16-weights: bf16 weights and activations, fp32 master weights in the optimizer, fp32 LM head.

Reported per mode: the loss, margin and accuracy of every step, their largest difference from
fp32, and the median step time after the first (wall and CPU) with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-2000.jsonl.gz"
MODES = ("fp32", "autocast", "autocast-unrounded", "autocast-bf16-head", "bf16-weights")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--model", default="default")
    p.add_argument("--data", default=str(HH))
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps (the pairs are cycled in order)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    from dpolab.models import bf16_supported
    import torch

    print(f"CPU bf16 units: {cpu_bf16()}; bf16 worth turning on here (`--bf16 true`; the CPU default stays fp32): {bf16_supported(torch.device('cpu'))}")
    results = {}
    for mode in args.modes.split(","):
        spec = {**vars(args), "mode": mode, "worker": ""}
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        load = os.getloadavg()[0]
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env, capture_output=True, text=True)
        lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise SystemExit(f"{mode} failed: {out.stderr[-2000:]}")
        results[mode] = {**json.loads(lines[-1][7:]), "load": [load, os.getloadavg()[0]]}
        print(summary(mode, results[mode], results.get("fp32")), flush=True)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps({"cpu_bf16": cpu_bf16(), "args": vars(args), "results": results}, indent=1))
    return 0


def cpu_bf16() -> str:
    """The CPU's bf16 instructions ("amx_bf16 avx512_bf16", or "none")."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("amx_bf16", "avx512_bf16") if f in flags]
    return " ".join(found) or "none"


def summary(mode: str, r: dict, fp32: dict | None) -> str:
    line = f"{mode:19s} step {r['step_s']:.2f} s (cpu {r['step_cpu_s']:.2f} s)  load {r['load'][0]:.1f}->{r['load'][1]:.1f}"
    for k in ("loss", "margin", "accuracy"):
        line += f"  {k} " + " ".join(f"{v:+.4f}" for v in r[k])
    if fp32 is not None:
        line += "  max |diff| vs fp32: " + ", ".join(f"{k} {max_diff(r[k], fp32[k]):.2e}" for k in ("loss", "margin"))
    return line


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def table(results: dict) -> str:
    fp32 = results.get("fp32")
    lines = ["| mode | step s (wall) | step s (CPU) | loss max diff vs fp32 | margin max diff | accuracy at step 2 | margin at step 2 |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in results.items():
        d = (lambda k: f"{max_diff(r[k], fp32[k]):.2e}") if fp32 else (lambda k: "")
        lines.append(f"| {mode} | {r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {d('loss')} | {d('margin')} | "
                     f"{r['accuracy'][1] if len(r['accuracy']) > 1 else float('nan'):.2f} | "
                     f"{r['margin'][1] if len(r['margin']) > 1 else float('nan'):+.4f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the worker
def worker(spec: dict) -> dict:
    import torch

    from dpolab import logprobs
    from dpolab.data import load_pairs
    from dpolab.data.collate import Layout, collate_pairs
    from dpolab.losses import LossParams, PairLogps, compute_loss
    from dpolab.models import load_model, load_tokenizer, round_to_bf16

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    mode = spec["mode"]
    if mode == "autocast-bf16-head":
        logprobs.fp32_head = lambda model: None  # the ablation: logits stay bf16 under autocast
    tokenizer = load_tokenizer(spec["model"])
    pairs = first_pairs(spec["data"], tokenizer, spec["pairs"])
    model = load_model(spec["model"]).train()
    if mode == "autocast":
        round_to_bf16(model)
    master = None
    if mode == "bf16-weights":
        model.to(torch.bfloat16)
        logprobs.fp32_head(model)
        master = [p.detach().float().clone().requires_grad_(True) for p in model.parameters()]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("autocast"))
    layout = Layout(packing=True, prefix_sharing=True, segment_attention=True)
    b = spec["batch_size"]
    batches = [collate_pairs(pairs[i : i + b], tokenizer.pad_token_id, layout) for i in range(0, len(pairs), b)]
    with torch.no_grad(), autocast:
        reference = [logprobs.pair_logps(model, batch) for batch in batches]
    optimizer = torch.optim.AdamW(master or list(model.parameters()), lr=spec["lr"], weight_decay=0.0, fused=True)
    params = LossParams(spec["beta"])
    out = {k: [] for k in ("loss", "margin", "accuracy", "wall", "cpu")}
    for step in range(spec["steps"]):
        k = step % len(batches)
        batch, (ref_chosen, ref_rejected) = batches[k], reference[k]
        start, cpu = time.perf_counter(), time.process_time()
        with autocast:
            chosen, rejected = logprobs.pair_logps(model, batch)
        n = batch["lengths"].shape[0] // 2
        loss = compute_loss("sigmoid", PairLogps(chosen, rejected, ref_chosen, ref_rejected,
                                                 batch["lengths"][:n].float(), batch["lengths"][n:].float()), params)
        loss.losses.mean().backward()
        if master is not None:
            for m, p in zip(master, model.parameters()):
                m.grad = p.grad.float()
                p.grad = None
        torch.nn.utils.clip_grad_norm_(master or model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if master is not None:
            with torch.no_grad():
                for m, p in zip(master, model.parameters()):
                    p.copy_(m)
        out["wall"].append(time.perf_counter() - start)
        out["cpu"].append(time.process_time() - cpu)
        margin = (loss.chosen_rewards - loss.rejected_rewards).detach()
        out["loss"].append(float(loss.losses.mean()))
        out["margin"].append(float(margin.mean()))
        out["accuracy"].append(float((margin > 0).float().mean()))
    later = slice(1, None) if spec["steps"] > 1 else slice(None)
    out["step_s"] = statistics.median(out["wall"][later])
    out["step_cpu_s"] = statistics.median(out["cpu"][later])
    return out


def first_pairs(path: str, tokenizer, n: int):
    import itertools
    import tempfile

    from dpolab.data import load_pairs, read_rows

    rows = [row for _, row in itertools.islice(read_rows(path, "train"), n)]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    pairs, _ = load_pairs(f.name, tokenizer, max_length=1024, max_prompt_length=512)
    os.unlink(f.name)
    return pairs


if __name__ == "__main__":
    sys.exit(main())

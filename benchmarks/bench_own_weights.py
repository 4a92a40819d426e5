"""The first update of a freshly loaded model: weights still in the checkpoint's memory map vs
copied out first (`dpolab.models.own_weights`). Same process, same model, alternating order.

    python benchmarks/bench_own_weights.py [--model default] [--repeat 3]

transformers maps safetensors files privately, so an in-place write to a loaded weight (the
optimizer's first step) takes a copy-on-write page fault per 4 KiB page. Reported: seconds for
(a) the first in-place write of every weight as loaded, (b) copying them out, then the same
write, and the ratio a / b.
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def first_write(model_name: str, copy_first: bool) -> dict:
    from dpolab.models import load_model, own_weights

    model = load_model(model_name)
    faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    if copy_first:
        own_weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0)  # an in-place update of every weight, as an optimizer step does
    return {"s": time.perf_counter() - start, "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rows = []
    for i in range(args.repeat):
        order = (False, True) if i % 2 == 0 else (True, False)
        rows.append({("copied" if c else "mapped"): first_write(args.model, c) for c in order})
        print(json.dumps(rows[-1]), flush=True)
    mapped = sorted(r["mapped"]["s"] for r in rows)[len(rows) // 2]
    copied = sorted(r["copied"]["s"] for r in rows)[len(rows) // 2]
    print(f"RESULT first update as loaded {mapped:.2f} s, copied out first {copied:.2f} s (median of {len(rows)}): "
          f"{mapped / copied:.1f}x")


if __name__ == "__main__":
    main()

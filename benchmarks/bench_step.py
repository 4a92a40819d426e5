"""One forward+backward (and a no-grad forward) of a standard batch (4 HH pairs, prefix-shared,
packed): fp32 vs bf16 autocast, alternating in one process; wall and CPU seconds per call.

    python benchmarks/bench_step.py [--repeat 3] [--model default]
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

MODES = ("fp32", "bf16", "bf16-fwd-nograd", "fp32-fwd-nograd")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3, help="rounds; each round runs every mode once, alternating batches")
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a checkpoint dir")
    args = ap.parse_args()
    from bench_precision import HH, first_pairs
    from dpolab import logprobs
    from dpolab.data.collate import Layout, collate_pairs
    from dpolab.models import load_model, load_tokenizer, round_to_bf16

    torch.set_flush_denormal(True)
    tok = load_tokenizer(args.model)
    pairs = first_pairs(str(HH), tok, 8)
    model = load_model(args.model).train()
    round_to_bf16(model)  # both modes see the same weights
    batches = [collate_pairs(pairs[i:i + 4], tok.pad_token_id, Layout(True, True, True)) for i in (0, 4)]
    res = {mode: [] for mode in MODES}
    for rep in range(args.repeat):
        for mode in MODES:
            t, c = time.perf_counter(), time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")), \
                    torch.set_grad_enabled("nograd" not in mode):
                ch, rj = logprobs.pair_logps(model, batches[rep % 2])
            if "nograd" not in mode:
                (ch - rj).sum().backward()
                model.zero_grad(set_to_none=True)
            res[mode].append((time.perf_counter() - t, time.process_time() - c))
        print(rep, {k: [round(x, 2) for x in v[-1]] for k, v in res.items()}, "load", os.getloadavg()[0], flush=True)
    print("RESULT", json.dumps(res))


if __name__ == "__main__":
    main()

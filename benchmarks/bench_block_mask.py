"""Building the FlexAttention block mask of a packed, prefix-shared row: dpolab's tile counts
(`attention.block_mask`) against FlexAttention's `create_block_mask`, which evaluates the mask
at every one of the row's padded x padded positions. Each build runs in a fresh process (peak
memory is per process); the rows are the real batches of bench_dpo.py's long case (16 pairs of
6 joined HH conversations, max length 2048: the GPU case, where the mask is built once per batch).

    python benchmarks/bench_block_mask.py [--model default] [--pairs 32] [--batch-size 16]
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
BUILDS = ("dpolab", "create_block_mask")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a checkpoint dir (its tokenizer)")
    ap.add_argument("--pairs", type=int, default=32, help="pairs of the long case; one row per batch")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return print("RESULT " + json.dumps(worker(json.loads(args.worker))))
    print("seconds per build, and MB of peak resident memory the build added to its process")
    print(f"{'row tokens':>10} {'padded':>7} | {'dpolab s':>8} {'MB':>6} | {'create_block_mask s':>19} {'MB':>6} | "
          f"{'time ratio':>10} {'memory ratio':>12} same tiles")
    for segments in rows(args):
        length = segments[-1][0] + segments[-1][1]
        got = {b: run(b, segments) for b in BUILDS}
        ours, theirs = got["dpolab"], got["create_block_mask"]
        print(f"{length:>10} {ours['padded']:>7} | {ours['s']:>8.3f} {ours['mb']:>6.1f} | {theirs['s']:>19.3f} {theirs['mb']:>6.1f} | "
              f"{ours['s'] / theirs['s']:>10.3f} {ours['mb'] / max(theirs['mb'], 1):>12.3f} {theirs['same']}")
        if not theirs["same"]:
            raise SystemExit(f"a {length}-token row: dpolab's tiles differ from create_block_mask's")


def rows(args) -> list:
    """The segments of each batch's packed, prefix-shared row, as training builds them."""
    from bench_dpo import prepare_data
    from dpolab.data import load_pairs
    from dpolab.data.collate import Layout, collate_pairs
    from dpolab.models import load_tokenizer, resolve_model_path

    model = resolve_model_path(args.model)
    with tempfile.TemporaryDirectory() as folder:
        data = prepare_data(model, Path(folder), args.pairs, args.batch_size, args.max_length, seed=42, joined=6)
        tokenizer = load_tokenizer(model)
        pairs, _ = load_pairs(data["dpolab"], tokenizer, max_length=args.max_length, max_prompt_length=args.max_length // 2)
    layout = Layout(packing=True, prefix_sharing=True, segment_attention=True)
    return [collate_pairs(pairs[i : i + args.batch_size], tokenizer.pad_token_id, layout)["segments"]
            for i in range(0, len(pairs), args.batch_size)]


def run(build: str, segments: tuple) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps({"build": build, "segments": segments})],
                         capture_output=True, text=True, check=True)
    return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])


def worker(spec: dict) -> dict:
    """One build on the CPU: seconds and peak resident memory above the process's own before it."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    from dpolab import attention

    segments = tuple(tuple(s) for s in spec["segments"])
    padded = attention.padded_length(segments[-1][0] + segments[-1][1])
    cpu = torch.device("cpu")
    attention.block_mask(((0, 200, 0, 0), (200, 50, 0, 100)), 256, cpu)  # first-call costs (lazy imports) out of the timing
    create_block_mask(lambda b, h, q, k: k <= q, None, None, 256, 256, device="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if spec["build"] == "dpolab":
        attention.block_mask(segments, padded, cpu)
    else:
        block, _, lo, hi = attention.token_ranges(segments, padded)
        mask = create_block_mask(attention.visibility(block, lo, hi), None, None, padded, padded, device="cpu")
    seconds = time.perf_counter() - start
    mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    same = None
    if spec["build"] != "dpolab":  # the same tiles, partial and full, as dpolab's (built after the measurement)
        ours = attention.block_mask(segments, padded, cpu)
        same = all(torch.equal(getattr(ours, f), getattr(mask, f)) for f in ("kv_num_blocks", "full_kv_num_blocks"))
    return {"padded": padded, "s": seconds, "mb": mb, "same": same}


if __name__ == "__main__":
    main()

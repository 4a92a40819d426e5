"""One forward+backward (and a no-grad forward) of a standard batch (4 HH pairs, prefix-shared, packed): fp32 vs bf16 autocast, alternating in one process; wall and CPU seconds.

    python benchmarks/bench_step.py
"""
import sys, time, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from bench_precision import first_pairs, HH
from dpolab import logprobs
from dpolab.data.collate import Layout, collate_pairs
from dpolab.models import load_model, load_tokenizer, round_to_bf16
torch.set_flush_denormal(True)
tok = load_tokenizer("default"); pairs = first_pairs(str(HH), tok, 8)
model = load_model("default").train(); round_to_bf16(model)
batches = [collate_pairs(pairs[i:i+4], tok.pad_token_id, Layout(True, True, True)) for i in (0, 4)]
res = {"fp32": [], "bf16": [], "bf16-fwd-nograd": [], "fp32-fwd-nograd": []}
for rep in range(3):
    for mode in res:
        b = batches[rep % 2]
        t, c = time.perf_counter(), time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.startswith("bf16")), torch.set_grad_enabled("nograd" not in mode):
            ch, rj = logprobs.pair_logps(model, b)
        if "nograd" not in mode:
            (ch - rj).sum().backward(); model.zero_grad(set_to_none=True)
        res[mode].append((time.perf_counter() - t, time.process_time() - c))
    print(rep, {k: [round(x, 2) for x in v[-1]] for k, v in res.items()}, "load", __import__("os").getloadavg()[0], flush=True)
print(json.dumps(res))

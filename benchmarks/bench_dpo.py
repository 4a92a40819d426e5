"""dpolab vs TRL's DPOTrainer, side by side: same model, data, batch size, max length, beta, lr, precision.

    python benchmarks/bench_dpo.py                      # the standard case, the default runs, once
    python benchmarks/bench_dpo.py --cases all --repeat 2 --out bench.json

Each run is a fresh subprocess (peak resident memory is its own); the parent prepares the data,
measures plain matmul peaks in the same invocation and prints one table. Both tools get the same
text (split by dpolab's data layer), the same order of pairs (TRL with a sequential sampler over
dpolab's shuffled order), linear decay without warm-up, one epoch, no checkpoints, the trained
model saved at the end (the job a user runs), and must report a first-step loss of ln 2; the
per-step losses of matching runs are compared. The forward-only (eval path) timing of a dpolab
run happens in a process of its own afterwards, outside its whole-process time.

Timed: the reference pass plus the training loop (model loading and tokenisation excluded for
both). Useful FLOPs = 6 N T (policy) + 2 N T (reference), N = all parameters, T = the real
tokens of the pairs (prompt counted once per completion, no padding), the same for both tools.
TRL is installed with dpolab (its RLOO trainer is the experiment's online-RL baseline).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-2000.jsonl.gz"
# name: (batch size, max length, HH conversations joined into one pair: long-context cases)
CASES = {"standard": (4, 512, 1), "batch8": (8, 512, 1), "len1024": (4, 1024, 1), "long": (16, 2048, 6)}
# name: (tool, precision, precompute reference, gradient checkpointing, flush denormals)
RUNS = {
    "trl-bf16-pre": ("trl", "bf16", True, False, False),   # TRL's best configuration where bf16 is fast
    "trl-fp32-pre": ("trl", "fp32", True, False, False),   # TRL's fastest configuration on CPUs without bf16 units
    "trl-default-fp32": ("trl", "fp32", False, True, False),  # TRL's defaults (gradient checkpointing on), fp32
    # TRL's fastest configuration plus dpolab's flush-to-zero mode, set in the process by the
    # benchmark: what remains of the speed-up when TRL is not slowed by denormal floats
    "trl-fp32-pre-ftz": ("trl", "fp32", True, False, True),
    "dpolab-bf16": ("dpolab", "bf16", True, False, True),
    "dpolab-fp32": ("dpolab", "fp32", True, False, True),
    "dpolab-fp32-noftz": ("dpolab", "fp32", True, False, False),  # ablation: --no-flush-denormal
    "trl-bf16": ("trl", "bf16", False, False, False),  # live reference model, no gradient checkpointing
    "trl-bf16-liger": ("trl", "bf16", True, False, False),  # + use_liger_kernel (GPU; needs liger-kernel)
    "dpolab-bf16-dense": ("dpolab", "bf16", True, False, True),  # ablation: one masked SDPA call per layer
    "dpolab-fp32-dense": ("dpolab", "fp32", True, False, True),
    "dpolab-fp32-loop": ("dpolab", "fp32", True, False, True),  # ablation: the per-block attention loop (CPU default before)
    # ablations of the `dpolab` command's malloc settings (dpolab.cli.MALLOC_TUNABLES): dpolab without
    # them, TRL's fastest configuration with them
    "dpolab-bf16-sysmalloc": ("dpolab", "bf16", True, False, True),
    "trl-bf16-pre-malloc": ("trl", "bf16", True, False, False),
}
DPOLAB_OPTIONS = {"dpolab-bf16-dense": {"segment_attention": False}, "dpolab-fp32-dense": {"segment_attention": False}}
# environment of a dpolab run's process (set before training)
DPOLAB_ENV = {"dpolab-fp32-loop": {"DPOLAB_SEGMENT_KERNEL": "loop"}}
# runs whose process starts with the malloc settings the `dpolab` command gives itself
# (dpolab.cli.entry): every dpolab run as users run it, and one TRL ablation
MALLOC_RUNS = {name for name in RUNS if name.startswith("dpolab") and name != "dpolab-bf16-sysmalloc"} | {"trl-bf16-pre-malloc"}
# TRL 1.16's padding_free is "temporarily unavailable since the DPO refactor" (it warns and pads), so no run uses it
TRL_OPTIONS = {"trl-bf16-liger": {"use_liger_kernel": True}}
DEFAULT_RUNS = "trl-bf16-pre,trl-fp32-pre,trl-default-fp32,dpolab-bf16,dpolab-fp32"


# ----------------------------------------------------------------------------- the parent
def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    if args.table_from:
        return print_saved(args.table_from)
    if args.no_bf16_units:  # before torch loads oneDNN; the workers inherit it
        os.environ["ONEDNN_MAX_CPU_ISA"] = EMULATED_ISA
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)  # the matmul peak is measured with the runs' thread count
    work = Path(tempfile.mkdtemp(prefix="dpolab-bench-"))
    model_path = prepare_model(args.model, work, args.tokenizer)
    if not args.dry_run:
        peaks = matmul_peaks(device)
        print(f"device {device_name(device)}, bf16 units: {cpu_bf16() if device == 'cpu' else 'GPU'}, "
              f"{torch.get_num_threads()} threads; plain matmul: fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s, "
              f"bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s; runs with {args.threads or 'default'} threads", flush=True)
    results = []
    for case in args.cases:
        batch_size, max_length, joined = CASES[case]
        data = prepare_data(model_path, work / case, args.pairs, batch_size, max_length, args.seed, joined, args.data)
        if args.dry_run:  # everything but the runs: the model, each case's data, the plan
            print(f"{case}: {data['pairs']} pairs, {data['real_tokens']} tokens; runs {', '.join(args.runs)} x {args.repeat}")
            continue
        for rep in range(args.repeat):
            for name in args.runs:
                spec = dict(name=name, case=case, rep=rep, model=model_path, device=device, batch_size=batch_size,
                            max_length=max_length, lr=args.lr, beta=args.beta, seed=args.seed, data=data,
                            work=str(work / f"{case}-{name}-{rep}"), params=data["params"], threads=args.threads)
                result = run_worker(spec, args.timeout)
                if spec["name"].startswith("dpolab") and "error" not in result:  # after, in a process of its own
                    timed = run_worker({**spec, "phase": "eval"}, args.timeout)
                    result = {**result, "error": f"eval path: {timed['error']}"} if "error" in timed else {**result, "eval_s": timed["eval_s"]}
                results.append({**result, "peaks": peaks})
                print(row(results[-1], data, peaks), flush=True)
    if not args.dry_run:
        print()
        print(table(results))
        if args.out:
            Path(args.out).write_text(json.dumps({"peaks": peaks, "device": device_name(device), "bf16_units": cpu_bf16(),
                                                  "results": results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)  # the runs' models and caches: gigabytes per invocation
    return 0


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="standard", help="comma list of " + ", ".join(CASES) + ", or all")
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma list of " + ", ".join(RUNS))
    p.add_argument("--pairs", type=int, default=32, help="first N pairs of the HH-RLHF harmless file")
    p.add_argument("--data", default=str(HH), help="the HH-RLHF file (another copy of it, e.g. on a machine without ../shared)")
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a checkpoint dir, random:0.5b / "
                   "random:1b / random:tiny, or random:DIR (DIR's architecture and tokenizer, random weights)")
    p.add_argument("--tokenizer", default="default", help="tokenizer of the random:SIZE models: 'default' or a checkpoint dir")
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeat", type=int, default=1, help="run every configuration this many times")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--threads", type=int, default=0, help="CPU threads per run (0 = torch's default); 1 is steadier on a busy machine")
    p.add_argument("--out", default="", help="also write all results as JSON here")
    p.add_argument("--table-from", nargs="+", default=[], metavar="JSON", help="print the table of saved --out files and exit")
    p.add_argument("--no-bf16-units", action="store_true",
                   help=f"run as on a CPU without AMX/AVX512-BF16: oneDNN (which runs CPU bf16 matmuls) limited to "
                        f"{EMULATED_ISA}, so bf16 matmuls are emulated as on such CPUs; fp32 is unchanged")
    p.add_argument("--dry-run", action="store_true", help="prepare the model and every case's data, print the runs, run none")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.cases = list(CASES) if args.cases == "all" else args.cases.split(",")
    args.runs = args.runs.split(",")
    for flag, names, known in (("--cases", args.cases, CASES), ("--runs", args.runs, RUNS)):
        if unknown := [n for n in names if n not in known]:
            p.error(f"{flag}: unknown {', '.join(map(repr, unknown))} (choose from {', '.join(known)})")
    return args


SIZES = {  # hidden, intermediate, layers, heads, kv heads: roughly Qwen2.5-0.5B / 1B / a tiny one
    "0.5b": (896, 4864, 24, 14, 2), "1b": (1536, 8960, 16, 12, 2), "tiny": (64, 128, 2, 4, 2)}


def prepare_model(name: str, work: Path, tokenizer_name: str = "default") -> str:
    """A plain HF checkpoint dir both tools can load: the converted default, a path, or random weights:
    `random:SIZE` (a Llama of SIZES with `tokenizer_name`'s tokenizer) or `random:DIR` (DIR's config
    and tokenizer, e.g. the default model's without its weights, where they cannot be copied)."""
    if not name.startswith("random:"):
        from dpolab.models import resolve_model_path

        return resolve_model_path(name)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from dpolab.models import load_tokenizer

    spec = name.split(":", 1)[1]
    if spec in SIZES:
        tokenizer = load_tokenizer(tokenizer_name)
        hidden, inter, layers, heads, kv = SIZES[spec]
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
                             tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    elif Path(spec, "config.json").exists():
        tokenizer, config = load_tokenizer(spec), AutoConfig.from_pretrained(spec)
    else:
        raise SystemExit(f"--model {name}: not random:{'/'.join(SIZES)} and {spec} is no directory with a config.json")
    torch.manual_seed(0)
    path = work / f"model-{Path(spec).name}"
    AutoModelForCausalLM.from_config(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def prepare_data(model_path: str, folder: Path, n: int, batch_size: int, max_length: int, seed: int, joined: int = 1,
                 hh: str = str(HH)) -> dict:
    """The first n pairs as text rows for both tools, in the order dpolab trains them, plus token counts.

    joined > 1: pair i's chosen and rejected transcripts are each preceded by the (chosen)
    transcripts of the joined - 1 conversations after it, a shared prompt of several
    conversations: long pairs from real text.
    """
    from dpolab.data import load_pairs, normalise, read_rows, render
    from dpolab.models import load_tokenizer
    from dpolab.train import step_indices

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_path)
    raw = []
    for _, row in read_rows(hh, "train"):
        raw.append(row)
        if len(raw) == n + joined - 1:
            break
    if joined > 1:
        raw = [{k: "".join(r["chosen"] for r in raw[i + 1 : i + joined]) + raw[i][k] for k in ("chosen", "rejected")}
               for i in range(n)]
    source = folder / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in raw))
    pairs, report = load_pairs(str(source), tokenizer, max_length=max_length, max_prompt_length=max_length // 2)
    if report.truncated or len(pairs) != n:
        raise SystemExit(f"{n} pairs: {len(pairs)} kept, {report.truncated} truncated; choose a case without truncation")
    examples, _ = normalise(read_rows(str(source), "train"), str(source))
    steps = n // batch_size
    order = [i for k in range(steps) for i in step_indices(list(range(n)), k, steps, batch_size, seed)]
    texts = [render(examples[i], tokenizer) for i in order]
    trl_rows = folder / "trl.jsonl"
    trl_rows.write_text("".join(json.dumps(dict(zip(("prompt", "chosen", "rejected"), t))) + "\n" for t in texts))
    real = sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    shared = sum(len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
    from transformers import AutoConfig

    params = count_params(model_path, AutoConfig.from_pretrained(model_path))
    return {"dpolab": str(source), "trl": str(trl_rows), "pairs": n, "real_tokens": real, "shared_tokens": shared, "params": params}


def count_params(model_path: str, config) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def run_worker(spec: dict, timeout: int) -> dict:
    env = {**os.environ, "DPOLAB_CACHE": str(Path(spec["work"]) / "cache"), "TQDM_DISABLE": "1",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    if spec["threads"]:
        env.update(OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    if spec["name"] in MALLOC_RUNS:  # glibc reads them at process start, as the `dpolab` command sets them
        from dpolab.cli import malloc_env

        env = malloc_env(env, platform.system(), platform.libc_ver()[0]) or env
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    spec = {**spec, "load_before": os.getloadavg()[0]}  # other work on the machine slows every run
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout} s"}
    spec["process_s"] = time.perf_counter() - start  # the whole process: start-up, loading, compile, training
    spec["load_after"] = os.getloadavg()[0]
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        return {**spec, "error": " | ".join(tail) or f"exit {out.returncode}"}
    return {**spec, **json.loads(lines[-1][len("RESULT "):])}


def matmul_peaks(device: str) -> dict:
    """FLOP/s of a plain square matmul in fp32 and bf16 (best of a few)."""
    import torch

    n = 4096 if device == "cuda" else 2048
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        best = math.inf
        for _ in range(4):
            sync(device)
            start = time.perf_counter()
            for _ in range(3):
                a @ b
            sync(device)
            best = min(best, (time.perf_counter() - start) / 3)
        out[name] = 2 * n**3 / best
    return out


EMULATED_ISA = "AVX512_CORE"  # AVX-512 without VNNI/BF16/AMX: the CI-class Xeon's matmul kernels


def cpu_bf16() -> str:
    """The CPU's bf16 instructions: "amx_bf16 avx512_bf16", one of them, or "none" (bf16 emulated);
    with --no-bf16-units on a CPU that has them, "none (emulated: ...)"."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA") == EMULATED_ISA:
        return f"none (emulated: ONEDNN_MAX_CPU_ISA={EMULATED_ISA})"
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return " ".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "none"


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return f"{model}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------- reporting
def print_saved(paths: list[str]) -> int:
    """One table from earlier runs (e.g. several invocations at different times)."""
    results = []
    for path in paths:
        saved = json.loads(Path(path).read_text())
        if "peaks" not in saved:  # e.g. bench_precision.py's files beside these in benchmarks/results
            print(f"{path}: not a bench_dpo.py --out file, left out")
            continue
        for r in saved["results"]:
            r.setdefault("peaks", saved["peaks"])
            r.update(rates(r, r["data"], saved["peaks"]) if "error" not in r else {})
            r["rep"] = f"{Path(path).stem}:{r['rep']}"
            results.append(r)
        print(f"{path}: {saved['device']}; matmul fp32 {saved['peaks']['fp32'] / 1e9:.0f} GFLOP/s, bf16 {saved['peaks']['bf16'] / 1e9:.0f} GFLOP/s")
    print(table(results))
    return 0


def rates(r: dict, data: dict, peaks: dict) -> dict:
    seconds = r["ref_s"] + r["train_s"]
    flops = 8 * data["params"] * data["real_tokens"]
    cpu = r.get("ref_cpu_s", math.nan) + r.get("train_cpu_s", math.nan)
    out = {"pairs/s": data["pairs"] / seconds, "tokens/s": data["real_tokens"] / seconds, "flop/s": flops / seconds,
           "bf16 frac": flops / seconds / peaks["bf16"], "fp32 frac": flops / seconds / peaks["fp32"],
           "pairs/cpu-s": data["pairs"] / cpu}
    steps = r.get("step_s") or []
    if len(steps) > 1:  # after start-up: the first step (allocation, kernel selection, compilation) left out
        per_pair = sum(steps[1:]) / (r["batch_size"] * (len(steps) - 1))
        out["steady pairs/s"] = 1 / per_pair
        out["steady flop/s"] = flops / data["pairs"] / per_pair
        # forward-only cost per pair as a fraction of a training step's: the reference pass and the eval path
        out["ref/train"] = r["ref_s"] / data["pairs"] / per_pair if r["ref_s"] else math.nan
        out["eval/train"] = r["eval_s"] / data["pairs"] / per_pair if r.get("eval_s") else math.nan
    return out


def row(r: dict, data: dict, peaks: dict) -> str:
    if "error" in r:
        return f"{r['case']:9s} {r['name']:17s} FAILED: {r['error']}"
    x = rates(r, data, peaks)
    r.update(x)
    mem = f"{r['peak_rss_gb']:.2f} GB RSS" + (f", {r['peak_gpu_gb']:.2f} GB GPU" if r.get("peak_gpu_gb") else "")
    line = (f"{r['case']:9s} {r['name']:17s} {x['pairs/s']:6.3f} pairs/s, after start-up {x.get('steady pairs/s', math.nan):6.3f}, "
            f"process {r.get('process_s', math.nan):.0f} s, forward/step {x.get('eval/train', math.nan):.2f} (eval) "
            f"{x.get('ref/train', math.nan):.2f} (ref)  {x['tokens/s']:7.0f} tok/s  {mem}  "
            f"{x['flop/s'] / 1e9:6.1f} GFLOP/s  ref {r['ref_s']:.0f}s train {r['train_s']:.0f}s  first loss {r['losses'][0]:.6f}  "
            f"load {r['load_before']:.1f}->{r['load_after']:.1f}")
    if r.get("trl_real_tokens", data["real_tokens"]) != data["real_tokens"]:
        line += f"  (TRL tokenised {r['trl_real_tokens']} tokens, dpolab {data['real_tokens']})"
    return line


def table(results: list[dict]) -> str:
    """Markdown table; ratios against every TRL run of the same case and repetition."""
    lines = ["| case | run | pairs/s (after start-up) | pairs/s (ref + training) | whole process s | peak RSS GB | "
             "useful GFLOP/s (after start-up) | of bf16 matmul | of fp32 matmul | forward-only / training per pair (eval path, ref pass) | "
             "first loss | load avg |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = math.nan
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['name']} | failed: {r['error'][:80]} | | | | | | | | | |")
            continue
        flops = r.get("steady flop/s", r["flop/s"])
        lines.append(f"| {r['case']} | {r['name']} | {r.get('steady pairs/s', nan):.3f} | {r['pairs/s']:.3f} | "
                     f"{r.get('process_s', nan):.0f} | {r['peak_rss_gb']:.2f} | {flops / 1e9:.1f} | {flops / r['peaks']['bf16']:.1%} | "
                     f"{flops / r['peaks']['fp32']:.1%} | {r.get('eval/train', nan):.2f}, {r.get('ref/train', nan):.2f} | "
                     f"{r['losses'][0]:.6f} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
    lines += ["", "| case | rep | dpolab run | vs TRL run | speed-up (pairs/s after start-up) | speed-up (whole process) | "
              "memory (RSS) | max loss difference per step |", "|---|---|---|---|---|---|---|---|"]
    ok = [r for r in results if "error" not in r]
    for d in (r for r in ok if r["name"].startswith("dpolab")):
        for t in (r for r in ok if r["name"].startswith("trl") and r["case"] == d["case"] and r["rep"] == d["rep"]):
            diff = max(abs(a - b) for a, b in zip(d["losses"], t["losses"])) if len(d["losses"]) == len(t["losses"]) else float("nan")
            speed = d.get("steady pairs/s", nan) / t.get("steady pairs/s", nan)
            whole = t.get("process_s", nan) / d.get("process_s", nan)
            lines.append(f"| {d['case']} | {d['rep']} | {d['name']} | {t['name']} | {speed:.2f}x | {whole:.2f}x | "
                         f"{d['peak_rss_gb'] / t['peak_rss_gb']:.2f}x | {diff:.2e} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the workers
def worker(spec: dict) -> int:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tool, precision, precompute, checkpointing, ftz = RUNS[spec["name"]]
    if spec.get("phase") == "eval":
        print("RESULT " + json.dumps({"eval_s": time_eval_path(spec, precision == "bf16", Path(spec["work"]) / "final")}))
        return 0
    if tool == "trl" and ftz:
        torch.set_flush_denormal(True)
    result = (run_trl if tool == "trl" else run_dpolab)(spec, precision == "bf16", precompute, checkpointing, ftz)
    import resource

    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux
    if spec["device"] == "cuda":
        import torch

        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1024**3
    print("RESULT " + json.dumps(result), flush=True)
    return 0


class Timer:
    """Wall and CPU time spent inside wrapped functions (synchronising the GPU around them).

    CPU time (all threads) varies less than wall time when other work shares the machine.
    """

    def __init__(self, device: str):
        self.device, self.seconds, self.cpu, self.laps = device, 0.0, 0.0, []

    def wrap(self, fn):
        def timed(*args, **kwargs):
            with self:
                return fn(*args, **kwargs)
        return timed

    def __enter__(self):
        sync(self.device)
        self._start, self._cpu = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        sync(self.device)
        self.laps.append(time.perf_counter() - self._start)
        self.seconds += self.laps[-1]
        self.cpu += time.process_time() - self._cpu


def run_dpolab(spec: dict, bf16: bool, precompute: bool, checkpointing: bool, ftz: bool) -> dict:
    """dpolab's own trainer with its defaults (packing, prefix sharing, segment attention)."""
    import dpolab.train as trainer

    os.environ.update(DPOLAB_ENV.get(spec["name"], {}))
    ref_timer, save_timer, fit_timer = Timer(spec["device"]), Timer(spec["device"]), Timer(spec["device"])
    step_timer = Timer(spec["device"])
    trainer.train_step = step_timer.wrap(trainer.train_step)
    trainer.finish_reference = ref_timer.wrap(trainer.finish_reference)
    trainer.save_checkpoint = save_timer.wrap(trainer.save_checkpoint)
    trainer.save_final = save_timer.wrap(trainer.save_final)
    trainer.fit = fit_timer.wrap(trainer.fit)
    result = trainer.train(
        model=spec["model"], data=spec["data"]["dpolab"], output_dir=spec["work"], batch_size=spec["batch_size"],
        eval_batch_size=8, max_length=spec["max_length"], max_prompt_length=spec["max_length"] // 2, lr=spec["lr"],
        beta=spec["beta"], loss="sigmoid", warmup_ratio=0.0, scheduler="linear", epochs=1, eval_fraction=0.0,
        bf16="true" if bf16 else "false", precompute_ref=precompute, gradient_checkpointing=checkpointing,
        seed=spec["seed"], progress=False, device=spec["device"], flush_denormal=ftz,
        **DPOLAB_OPTIONS.get(spec["name"], {}))
    losses = [h["loss"] for h in result["history"] if h.get("split", "train") == "train" and "loss" in h]
    return {"ref_s": ref_timer.seconds, "train_s": fit_timer.seconds - ref_timer.seconds - save_timer.seconds,
            "ref_cpu_s": ref_timer.cpu, "train_cpu_s": fit_timer.cpu - ref_timer.cpu - save_timer.cpu,
            "save_s": save_timer.seconds, "losses": losses, "steps": result["steps"], "step_s": step_timer.laps}


def time_eval_path(spec: dict, bf16: bool, model_dir: Path) -> float:
    """Seconds of `dpolab eval`'s forward-only log-prob path over the pairs (batches of batch_size pairs)."""
    import torch

    from dpolab.data import load_pairs
    from dpolab.models import load_model, load_tokenizer
    from dpolab.pair import ModelPair

    tokenizer = load_tokenizer(str(model_dir))
    pairs, _ = load_pairs(spec["data"]["dpolab"], tokenizer, max_length=spec["max_length"], max_prompt_length=spec["max_length"] // 2)
    model = load_model(str(model_dir)).to(spec["device"]).eval()
    pair = ModelPair(model, model, tokenizer, torch.device(spec["device"]), bf16, ("policy", "policy"))
    timer = Timer(spec["device"])
    with timer:  # the model is its own reference here: one forward pass over every pair
        pair.pair_token_logps(pairs, 2 * spec["batch_size"])
    return timer.seconds


def run_trl(spec: dict, bf16: bool, precompute: bool, checkpointing: bool, ftz: bool) -> dict:
    """TRL's DPOTrainer, configured as documented in trl 1.16's DPOConfig."""
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref_model = None if precompute else AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    dataset = load_dataset("json", data_files=spec["data"]["trl"], split="train")
    args = DPOConfig(
        output_dir=spec["work"], per_device_train_batch_size=spec["batch_size"], num_train_epochs=1,
        learning_rate=spec["lr"], lr_scheduler_type="linear", warmup_steps=0, beta=spec["beta"], loss_type=["sigmoid"],
        max_length=spec["max_length"], bf16=bf16, precompute_ref_log_probs=precompute, precompute_ref_batch_size=8,
        **TRL_OPTIONS.get(spec["name"], {}),
        gradient_checkpointing=checkpointing, train_sampling_strategy="sequential", seed=spec["seed"],
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=spec["device"] == "cpu",
        dataloader_num_workers=0, max_grad_norm=1.0, weight_decay=0.0)
    ref_timer = Timer(spec["device"])
    DPOTrainer._precompute_ref_logps = ref_timer.wrap(DPOTrainer._precompute_ref_logps)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[step_times := StepTimes(spec["device"])])
    tokens = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    train_timer, save_timer = Timer(spec["device"]), Timer(spec["device"])
    with train_timer:
        trainer.train()
    with save_timer:  # like dpolab's final/: the trained model and its tokenizer
        trainer.save_model(str(Path(spec["work"]) / "final"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"ref_s": ref_timer.seconds, "train_s": train_timer.seconds, "ref_cpu_s": ref_timer.cpu,
            "train_cpu_s": train_timer.cpu, "save_s": save_timer.seconds, "losses": losses, "steps": trainer.state.global_step, "trl_real_tokens": tokens,
            "step_s": step_times.laps}


def StepTimes(device: str):
    """A TrainerCallback timing every optimizer step (begin to end, GPU synchronised)."""
    from transformers import TrainerCallback

    class _StepTimes(TrainerCallback):
        laps: list = []

        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.laps.append(time.perf_counter() - self._start)

    return _StepTimes()


if __name__ == "__main__":
    sys.exit(main())

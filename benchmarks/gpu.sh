#!/usr/bin/env bash
# dpolab vs TRL on one CUDA GPU, each run a fresh process, one table at the end (< 8 minutes on
# an H100-class GPU). Two invocations of bench_dpo.py:
#   1. the standard case (SmolLM2-135M-Instruct, 32 HH pairs, batch 4, max length 512);
#   2. "long": a 0.5B Llama with random weights (Qwen2.5-0.5B's shape), batch 16, max length
#      2048, 32 pairs of 6 joined HH conversations (~1-2k tokens each).
# Runs: dpolab's defaults in bf16 (FlexAttention: one kernel per layer), TRL bf16 with a
# precomputed and with a live reference, and TRL + use_liger_kernel (fails cleanly when
# liger-kernel is not installed). TRL 1.16's padding_free is disabled upstream (it warns and
# pads), so no run uses it.
#
#   bash benchmarks/gpu.sh                     # on the GPU machine
#   STD_MODEL=random:tiny BIG_MODEL=random:tiny PAIRS=16 bash benchmarks/gpu.sh   # a CPU smoke run (the long case: batch 16)
#
# On the device tool's GPU machine, whose image lacks TRL and datasets and which gets no ../shared
# and at most 64 MiB of carried files: `bash benchmarks/gpu_kit.sh` here first, then what it prints
# (the standard case then runs SmolLM2-135M's architecture with random weights: same speed, no 514 MB of weights).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
STD_MODEL=${STD_MODEL:-default}
BIG_MODEL=${BIG_MODEL:-random:0.5b}
PAIRS=${PAIRS:-32}
RUNS=${RUNS:-dpolab-bf16,trl-bf16-pre,trl-bf16,trl-bf16-liger}
OUT=${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
TIMEOUT=${TIMEOUT:-240}
SOURCES=(--tokenizer "${TOKENIZER:-default}")  # tokenizer of the random:SIZE models
if [ -n "${DATA:-}" ]; then SOURCES+=(--data "$DATA"); fi  # the HH-RLHF file, where ../shared is missing
mkdir -p "$(dirname "$OUT")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('CUDA:', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none (CPU run)')"
"$PY" benchmarks/bench_dpo.py --model "$STD_MODEL" --cases standard --runs "$RUNS" --pairs "$PAIRS" "${SOURCES[@]}" \
    --timeout "$TIMEOUT" --out "$OUT-standard.json"
"$PY" benchmarks/bench_dpo.py --model "$BIG_MODEL" --cases long --runs "$RUNS" --pairs "$PAIRS" "${SOURCES[@]}" \
    --timeout "$TIMEOUT" --out "$OUT-long.json"
echo
echo "=== one table ==="
"$PY" benchmarks/bench_dpo.py --table-from "$OUT-standard.json" "$OUT-long.json"

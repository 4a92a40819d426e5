#!/usr/bin/env bash
# Prepares, on this machine, what `bash benchmarks/gpu.sh` needs on the device tool's GPU machine
# that its image lacks. That machine has PyTorch, transformers, peft and accelerate but not TRL or
# datasets; it cannot download anything; it gets no ../shared; and each call carries at most 64 MiB.
#   .whl/        wheels for its Python 3.12: TRL, datasets (+ dill, multiprocess) at this venv's
#                versions, and liger-kernel (TRL's use_liger_kernel run);
#   .gpu/model/  the default model's config and tokenizer, without its weights (514 MB, over the
#                limit): the standard case there is SmolLM2-135M's architecture with random
#                weights, the same shapes and tokens, so the same speed;
#   .gpu/hh.jsonl.gz  the HH-RLHF file.
# Both folders are git-ignored. Then, with the device tool: carry .whl and .gpu, and run the
# command this script prints last. KIT=DIR writes them under DIR, WHEELS=0 skips the download,
# MODEL=DIR takes another checkpoint's config and tokenizer (the tests use all three).
#
#   bash benchmarks/gpu_kit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
KIT=${KIT:-.}
LIGER=${LIGER:-0.8.5}
rm -rf "$KIT/.whl" "$KIT/.gpu"
mkdir -p "$KIT/.whl" "$KIT/.gpu"
if [ "${WHEELS:-1}" != 0 ]; then
    pins=$("$PY" -c 'from importlib.metadata import version as v; print(*(f"{p}=={v(p)}" for p in ("trl", "datasets", "dill", "multiprocess")))')
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$KIT/.whl" $pins "liger-kernel==$LIGER"
fi
KIT="$KIT" MODEL="${MODEL:-default}" PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" - <<'EOF'
import os
import shutil
from pathlib import Path

from transformers import AutoConfig

from dpolab.models import load_tokenizer, resolve_model_path

kit = Path(os.environ["KIT"], ".gpu")
path = resolve_model_path(os.environ["MODEL"])  # the default model: converted from its GGUF once, if not done yet
AutoConfig.from_pretrained(path).save_pretrained(kit / "model")
load_tokenizer(path).save_pretrained(kit / "model")
shutil.copy(Path("..", "shared", "data", "hh-rlhf-harmless-2000.jsonl.gz"), kit / "hh.jsonl.gz")
EOF
du -sh "$KIT/.whl" "$KIT/.gpu"
echo "device run: carry [\".whl\", \".gpu\"], command:"
echo "python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site PYTHON=python3" \
     "STD_MODEL=random:.gpu/model TOKENIZER=.gpu/model DATA=.gpu/hh.jsonl.gz bash benchmarks/gpu.sh"

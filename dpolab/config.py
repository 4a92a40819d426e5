"""One typed config per command: dataclasses whose field docs become `--help`.

A config is resolved in three layers, later wins: field defaults, a YAML file
(`--config run.yaml`), then command-line flags. The resolved config is written to
`<output_dir>/config.yaml` so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


def opt(default, help: str, **kw):
    """A dataclass field whose `help` text feeds the generated CLI."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class CommonConfig:
    """Fields shared by every training command (SFT and the DPO family)."""

    model: str = opt("default", "Policy: 'default' (SmolLM2-135M-Instruct, shipped), a local HF checkpoint dir or a hub id.")
    data: str = opt("", "Training data: .jsonl/.json(.gz), .parquet, .csv(.gz), a datasets folder or a hub name.")
    eval_data: str = opt("", "Held-out data; empty = split eval_fraction off the training data.")
    eval_fraction: float = opt(0.05, "Fraction of the training data held out when eval_data is empty (0 = no eval).")
    output_dir: str = opt("runs/dpolab", "Run directory: config, metrics, TensorBoard logs, checkpoints.")
    prompt_column: str = opt("prompt", "Column holding the prompt (explicit format).")
    chosen_column: str = opt("chosen", "Column holding the preferred completion.")
    rejected_column: str = opt("rejected", "Column holding the dispreferred completion.")
    split: str = opt("train", "Split to read from a datasets folder / hub dataset.")
    max_length: int = opt(512, "Max tokens of prompt + completion; longer pairs are truncated.")
    max_prompt_length: int = opt(256, "Prompt tokens kept (from the end) when a pair is too long.")
    batch_size: int = opt(4, "Pairs per micro-batch (per process).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    eval_batch_size: int = opt(8, "Pairs per evaluation batch.")
    lr: float = opt(5e-6, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_ratio: float = opt(0.1, "Fraction of steps with linear warm-up.")
    scheduler: str = opt("linear", "LR decay after warm-up: linear | cosine | constant.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).")
    epochs: float = opt(1.0, "Passes over the training data.")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = from epochs).")
    seed: int = opt(42, "Seed for data order, splits and initialisation.")
    bf16: str = opt("auto", "bf16 autocast with fp32 master weights: auto | true | false (auto = on CUDA GPUs with bf16; fp32 on CPU).")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory (about +1 forward).")
    packing: bool = opt(True, "Padding-free batches: sequences concatenated, positions restart per sequence.")
    prefix_sharing: bool = opt(True, "One row [prompt][chosen][rejected] per pair: the prompt is computed once, not twice.")
    segment_attention: bool = opt(True, "With packing: attention per sequence block instead of one masked attention over the whole row.")
    flush_denormal: bool = opt(True, "CPU: compute denormal floats (below 1.2e-38, e.g. tiny softmax probabilities) as zero, "
                                     "process-wide; x86 CPUs run them up to 100x slower (a whole step 10x).")
    lora: bool = opt(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA scaling alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_targets: str = opt("all-linear", "LoRA target modules: 'all-linear' or comma-separated names.")
    merge_lora: bool = opt(False, "Also save merged full weights at the end of a LoRA run.")
    log_every: int = opt(1, "Log metrics every N optimizer steps.")
    eval_every: int = opt(0, "Evaluate every N steps (0 = only at the end).")
    save_every: int = opt(0, "Checkpoint every N steps (0 = only at the end).")
    keep_last: int = opt(0, "Keep only the last K step checkpoints (0 = keep all).")
    final_checkpoint: bool = opt(True, "Also checkpoint the training state (optimizer, scheduler) at the end, to "
                                       "continue later with more steps; off saves disk (3x the model size).")
    max_bad_steps: int = opt(10, "Non-finite loss/grad steps skipped before the run stops.")
    resume: bool = opt(False, "Continue from the latest checkpoint in output_dir.")
    device: str = opt("auto", "auto | cpu | cuda.")
    trust_remote_code: bool = opt(False, "Allow model repos to run their own Python code (off: safer).")
    progress: bool = opt(True, "Show the live progress bar.")


@dataclass
class TrainConfig(CommonConfig):
    """`dpolab train`: the DPO family on preference pairs."""

    loss: str = opt("sigmoid", "Loss: sigmoid (DPO) | cdpo | robust | ipo | hinge | simpo | orpo | rdpo | nca_pair | bco_pair | apo_zero.")
    beta: float = opt(0.1, "KL strength beta (ORPO: lambda).")
    label_smoothing: float = opt(0.0, "eps for cdpo / robust: assumed label-flip rate.")
    gamma: float = opt(0.5, "SimPO target reward margin.")
    alpha: float = opt(0.01, "R-DPO length penalty per token of length difference.")
    sft_weight: float = opt(0.0, "Weight of an added NLL(chosen) term (RPO); 0 = off.")
    ref_model: str = opt("", "Reference model path; empty = the initial policy (LoRA: the base with adapters off).")
    precompute_ref: bool = opt(False, "Compute reference log-probs once, cache them on disk, free the reference.")
    sft_first: bool = opt(False, "Run an SFT stage on prompt+chosen first and use it as policy and reference.")


@dataclass
class SFTConfig(CommonConfig):
    """`dpolab sft`: supervised fine-tuning on prompt + chosen (the paper's SFT stage / Preferred-FT)."""

    lr: float = opt(2e-5, "Peak learning rate (AdamW).")
    output_dir: str = opt("runs/sft", "Run directory.")


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """Add one `--flag` per dataclass field; defaults are left unset (None) so YAML can sit between."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%")  # argparse formats help
        kind = hints[f.name]
        if f.metadata.get("positional"):  # e.g. `dpolab report RUN_DIR...`: joined with commas
            parser.add_argument(f.name, nargs="*", default=None, help=help_text, metavar=f.name.upper())
        elif kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(name, type=kind, default=None, help=help_text, metavar=f.name.upper())
    parser.add_argument("--config", default=None, help="YAML file with any of the options above; flags override it.")


def load_yaml(path: str, cls) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:  # also refuses python/object tags: safe_load builds no objects
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)} for {cls.__name__}")
    return data


def resolve(cls, args: argparse.Namespace | None = None, **overrides):
    """defaults <- YAML (args.config) <- CLI flags <- keyword overrides (Python API)."""
    values: dict = {}
    config_path = getattr(args, "config", None) if args is not None else overrides.pop("config", None)
    if config_path:
        values.update(load_yaml(config_path, cls))
    if args is not None:
        for k, v in vars(args).items():
            if k in ("config", "command") or v is None or v == []:
                continue
            values[k] = ",".join(v) if isinstance(v, list) else v
    values.update(overrides)
    cfg = cls(**values)
    validate(cfg)
    return cfg


def validate(cfg) -> None:
    """Reject settings that cannot work, with one line each (only fields the config has)."""
    has = lambda *names: all(hasattr(cfg, n) for n in names)  # noqa: E731
    checks = [
        (not has("batch_size") or cfg.batch_size >= 1, "batch_size must be >= 1"),
        (not has("grad_accum") or cfg.grad_accum >= 1, "grad_accum must be >= 1"),
        (not has("max_length", "max_prompt_length") or cfg.max_prompt_length < cfg.max_length,
         "max_prompt_length must be < max_length"),
        (not has("scheduler") or cfg.scheduler in ("linear", "cosine", "constant"), "scheduler must be linear, cosine or constant"),
        (not has("bf16") or cfg.bf16 in ("auto", "true", "false"), "bf16 must be auto, true or false"),
        (not has("eval_fraction") or 0 <= cfg.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def save(cfg, path: Path) -> None:
    """Write the resolved config atomically (a crash never leaves half a file)."""
    import os

    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    os.replace(tmp, path)

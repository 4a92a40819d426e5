"""One typed config per command: dataclasses whose field docs become `--help`.

A config is resolved in three layers, later wins: field defaults, a YAML file
(`--config run.yaml`), then command-line flags. The resolved config is written to
`<output_dir>/config.yaml` so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
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
    max_prompt_length: int = opt(0, "Prompt tokens kept (from the end) when a pair is too long (0 = half of max_length).")
    limit: int = opt(0, "Use only the first N usable pairs of --data (and of --eval-data): a quick trial run; 0 = all.")
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
    keep_last: int = opt(2, "Keep only the last K step checkpoints (0 = keep all; 2 leaves one to fall back on).")
    final_checkpoint: bool = opt(False, "Also checkpoint the training state (optimizer, scheduler) at the end, to "
                                        "continue later with more steps (costs 3x the model size on disk).")
    max_bad_steps: int = opt(10, "Non-finite loss/grad steps skipped before the run stops.")
    resume: bool = opt(False, "Continue from the latest checkpoint in output_dir.")
    device: str = opt("auto", "auto | cpu | cuda.")
    trust_remote_code: bool = opt(False, "Allow model repos to run their own Python code (off: safer).")
    progress: bool = opt(True, "Show the live progress bar (on a terminal; elsewhere one plain line per logged step).")

    def __post_init__(self):  # `train(TrainConfig(...))` is checked like the command line
        validate(self)


@dataclass
class TrainConfig(CommonConfig):
    """`dpolab train`: the DPO family on preference pairs."""

    loss: str = opt("sigmoid", "Loss (sigmoid = DPO; kto: unpaired data; plackett_luce: ranked lists). Comma-separated names "
                               "are summed with loss_weights (MPO: sigmoid,bco_pair,sft with 0.8,0.2,1.0).",
                     names_from="dpolab.losses:ALL_NAMES")
    loss_weights: str = opt("", "Comma-separated weights of a combined loss, one per name (empty = all 1).")
    f_divergence: str = opt("reverse_kl", "f-DPO divergence: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence "
                                          "(losses of the margin only: sigmoid, cdpo, robust, ipo, hinge, exo_pair, discopop).")
    f_alpha: float = opt(0.5, "alpha of alpha_divergence as in the f-DPO paper (0: reverse KL, 1: forward KL; TRL's coefficient is 1 - alpha).")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau.")
    ipo_average_logps: bool = opt(False, "IPO on per-token mean log-ratios (TRL's convention); default: summed, as in the IPO paper.")
    sft_token_weighted: bool = opt(False, "SFT/RPO NLL as one mean over all chosen tokens of the batch (TRL's convention); default: per-pair mean.")
    wpo: bool = opt(False, "WPO: weight each pair's loss by exp(mean token log-prob) of chosen times rejected under the policy (detached).")
    ld_alpha: float = opt(1.0, "LD-DPO: weight of the log-probs of the longer completion's tokens beyond the shorter one's length (1 = off, 0 = ignore the tail).")
    sync_ref_every: int = opt(0, "TR-DPO: every N steps the reference becomes ref_mix_alpha * policy + (1 - ref_mix_alpha) * reference (0 = off).")
    ref_mix_alpha: float = opt(0.6, "TR-DPO mixing weight of the policy when the reference is synchronised (1 = hard copy).")
    desirable_weight: float = opt(1.0, "KTO lambda_D: weight of desirable examples (--loss kto).")
    undesirable_weight: float = opt(1.0, "KTO lambda_U: weight of undesirable examples (--loss kto).")
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


def prompt_limit(cfg) -> int:
    """The prompt-token limit in force: --max-prompt-length, or half of --max-length when 0."""
    return cfg.max_prompt_length or cfg.max_length // 2


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
        help_text = f.metadata.get("help", "")
        if f.metadata.get("names_from"):  # e.g. the losses: listed from the dict that defines them
            help_text += " One of: " + ", ".join(named(f.metadata["names_from"])) + "."
        help_text = f"{help_text} (default: {default!r})".replace("%", "%%")  # argparse formats help
        kind = hints[f.name]
        if f.metadata.get("positional"):  # e.g. `dpolab report RUN_DIR...`: joined with commas
            parser.add_argument(f.name, nargs="*", default=None, help=help_text, metavar=f.name.upper())
        elif kind is bool:
            parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(name, type=kind, default=None, help=help_text, metavar=f.name.upper())
    parser.add_argument("--config", default=None, help="YAML file with any of the options above; flags override it.")


def named(spec: str) -> list[str]:
    """The keys of a dict given as "module:NAME" (imported only when asked: --help, validation)."""
    import importlib

    module, name = spec.split(":")
    return list(getattr(importlib.import_module(module), name))


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
        close = difflib.get_close_matches(str(unknown[0]), sorted(names), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"{path}: unknown option(s) {', '.join(map(str, unknown))}{hint}; the options are the "
                         f"--help names with _ for - (e.g. max_length)")
    return data


def resolve(cls, args: argparse.Namespace | None = None, **overrides):
    """defaults <- YAML (args.config) <- CLI flags <- keyword overrides (Python API)."""
    values: dict = {}
    config_path = getattr(args, "config", None) if args is not None else overrides.pop("config", None)
    given = {k: v for k, v in vars(args or argparse.Namespace()).items() if v is not None and v != []} | overrides
    if not config_path:
        config_path = _run_config(cls, given)
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


def _run_config(cls, given: dict) -> str | None:
    """`--resume` without `--config`: the run's own config.yaml is the base (flags still override),
    so `dpolab train --output-dir runs/x --resume` continues runs/x as it was started."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "resume" not in names or not given.get("resume"):
        return None
    output_dir = given.get("output_dir") or next(f.default for f in dataclasses.fields(cls) if f.name == "output_dir")
    path = Path(output_dir) / "config.yaml"
    return str(path) if path.is_file() else None


def validate(cfg) -> None:
    """Reject settings that cannot work, with one line each (only fields the config has)."""
    has = lambda *names: all(hasattr(cfg, n) for n in names)  # noqa: E731
    checks = [
        (not has("batch_size") or cfg.batch_size >= 1, "batch_size must be >= 1"),
        (not has("grad_accum") or cfg.grad_accum >= 1, "grad_accum must be >= 1"),
        (not has("max_length") or cfg.max_length >= 2, "max_length must be >= 2"),
        (not has("max_length", "max_prompt_length") or 0 <= cfg.max_prompt_length < cfg.max_length,
         f"max_prompt_length must be < max_length ({getattr(cfg, 'max_length', '')}); leave it unset for half of it"),
        (not has("limit") or cfg.limit >= 0, "limit must be >= 0"),
        (not has("keep_last") or cfg.keep_last >= 0, "keep_last must be >= 0 (0 = keep all)"),
        (not has("scheduler") or cfg.scheduler in ("linear", "cosine", "constant"), "scheduler must be linear, cosine or constant"),
        (not has("bf16") or cfg.bf16 in ("auto", "true", "false"), "bf16 must be auto, true or false"),
        (not has("eval_fraction") or 0 <= cfg.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
        (not has("loss_weights") or _floats(cfg.loss_weights) is not None, "loss_weights must be comma-separated numbers"),
        (not has("ld_alpha") or 0 <= cfg.ld_alpha <= 1, "ld_alpha must be in [0, 1]"),
        (not has("ld_alpha") or cfg.ld_alpha == 1 or not cfg.precompute_ref,
         "ld_alpha < 1 needs per-token reference log-probs: drop --precompute-ref"),
        (not has("sync_ref_every") or cfg.sync_ref_every >= 0, "sync_ref_every must be >= 0"),
        (not has("ref_mix_alpha") or 0 < cfg.ref_mix_alpha <= 1, "ref_mix_alpha must be in (0, 1]"),
        (not has("desirable_weight") or (cfg.desirable_weight > 0 and cfg.undesirable_weight > 0),
         "desirable_weight and undesirable_weight must be > 0"),
        (not has("loss", "precompute_ref", "wpo", "ld_alpha") or cfg.loss not in ("kto", "plackett_luce")
         or not (cfg.precompute_ref or cfg.wpo or cfg.ld_alpha != 1),
         "--loss kto / plackett_luce: not with --precompute-ref, --wpo or --ld-alpha (their batches are not pairs)"),
        (not has("sync_ref_every") or not cfg.sync_ref_every or not (cfg.lora or cfg.precompute_ref),
         "sync_ref_every (TR-DPO) needs a separate reference model: not with --lora or --precompute-ref"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for f in dataclasses.fields(cfg):  # fields naming entries of a dict (the loss): known names only
        if f.metadata.get("names_from"):
            names = named(f.metadata["names_from"])
            unknown = [v.strip() for v in str(getattr(cfg, f.name)).split(",") if v.strip() not in names]
            if unknown:
                close = [ALIASES[unknown[0].lower()]] if unknown[0].lower() in ALIASES else \
                    difflib.get_close_matches(unknown[0], list(names), n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"unknown {f.name} {unknown[0]!r}{hint}; choose one of: {', '.join(names)}")


# names people type for an entry under another name here (spelling alone would suggest `rdpo` for `dpo`)
ALIASES = {"dpo": "sigmoid"}


def _floats(text: str) -> tuple[float, ...] | None:
    """'0.8, 0.2,1' -> (0.8, 0.2, 1.0); '' -> (); None when a part is not a number."""
    try:
        return tuple(float(x) for x in str(text).split(",")) if str(text).strip() else ()
    except ValueError:
        return None


def save(cfg, path: Path, notes: dict | None = None) -> None:
    """Write the resolved config atomically (a crash never leaves half a file), readable by
    others like any file the user writes (umask), with `notes` as end-of-line comments."""
    import os

    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    for key, note in (notes or {}).items():
        text = "".join(f"{line.rstrip()}  # {note}\n" if line.startswith(f"{key}:") else line for line in text.splitlines(True))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)

"""Every command's typed config, composed from shared option groups; field docs become `--help`.

An option group (`ModelOptions`, `Lengths`, `Sampling`, `RewardSpec`, ...) is a plain
dataclass of flat fields: each field's default and help are written once, in its group, and a
command's config inherits the groups it takes (dataclass multiple inheritance), so flags and
YAML keys stay flat (`--max-length`, `max_length:`). Where a command needs another default for
a shared field (generate samples K=4 per prompt, eval 1), `like(Group, "field", default)` takes
the group's field with only the default changed. `validate` checks every config at
construction, the command-line path and `TrainConfig(...)` in Python alike.

A config is resolved in three layers, later wins: field defaults, a YAML file
(`--config run.yaml`), then command-line flags. The resolved config is written to
`<output_dir>/config.yaml` so a run can be repeated or resumed exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .perms import atomic_path

BASELINES = ("preferred-ft", "unlikelihood", "ipo", "cdpo")  # trained baselines of `dpolab experiment`
EXPERIMENTS = ("sentiment",)
PAIR_STRATEGIES = ("best-vs-worst", "random", "all")  # pairs per prompt of `dpolab generate`


def opt(default, help: str, **kw):
    """A dataclass field whose `help` text feeds the generated CLI."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


_SAME = object()


def like(group, name: str, default=_SAME, help: str | None = None):
    """Field `name` of option group `group` for a command that needs another default (or, where
    the meaning narrows, another help text); everything else stays as the group defines it."""
    f = group.__dataclass_fields__[name]
    meta = {k: v for k, v in f.metadata.items() if k != "help"}
    return opt(f.default if default is _SAME else default, f.metadata["help"] if help is None else help, **meta)


# ----------------------------------------------------------------------------- option groups
@dataclass
class Options:
    """Base of every config: checked at construction, like the command line."""

    def __post_init__(self):
        validate(self)


@dataclass
class Runtime(Options):
    device: str = opt("auto", "auto | cpu | cuda.")
    bf16: str = opt("auto", "bf16 autocast with fp32 master weights: auto | true | false (auto = on CUDA GPUs with bf16; fp32 on CPU).")
    trust_remote_code: bool = opt(False, "Allow model repos to run their own Python code (off: safer).")


@dataclass
class ModelOptions(Runtime):
    model: str = opt("default", "Policy: 'default' (SmolLM2-135M-Instruct, shipped), a checkpoint or LoRA adapter dir, or a hub id.")


@dataclass
class Reference(Options):
    ref_model: str = opt("", "Reference model; empty = the initial policy: the adapter's base with adapters off (LoRA) or "
                             "the `model` in the run's config.yaml.")


@dataclass
class PromptColumn(Options):
    prompt_column: str = opt("prompt", "Column holding the prompt (text or messages).")


@dataclass
class PairColumns(PromptColumn):
    chosen_column: str = opt("chosen", "Column holding the preferred completion.")
    rejected_column: str = opt("rejected", "Column holding the dispreferred completion.")


@dataclass
class Lengths(Options):
    max_length: int = opt(512, "Max tokens of prompt + completion; longer pairs are truncated.")
    max_prompt_length: int = opt(0, "Prompt tokens kept (from the end) when a pair is too long (0 = half of max_length).")


@dataclass
class RunLengths(Lengths):
    """Lengths of eval, score and rank: by default those the model's run was trained with (`from_run`)."""

    max_length: int = like(Lengths, "max_length", 0, "Max tokens of prompt + completion; longer pairs are truncated "
                                                     "(0 = the max_length the model's run was trained with, from its "
                                                     "config.yaml; 512 for a model of no dpolab run).")
    max_prompt_length: int = like(Lengths, "max_prompt_length", help="Prompt tokens kept (from the end) when a pair is "
                                                                     "too long (0 = the run's own with max_length 0, "
                                                                     "else half of max_length).")


@dataclass
class Limit(Options):
    limit: int = opt(0, "Use only the first N rows / pairs / prompts of the input (0 = all).")


@dataclass
class Packing(Options):
    packing: bool = opt(True, "Padding-free batches: sequences concatenated, positions restart per sequence.")


@dataclass
class Scoring(Packing):
    """Forward passes of eval, score and rank."""

    batch_size: int = opt(8, "Sequences per forward pass / prompts per generation batch.")
    progress: bool = opt(True, "Show the progress of forward passes and sampling (a live bar on a terminal; "
                               "elsewhere a plain line every 10 s).")

    def __post_init__(self):
        # eval / score / rank hand max_prompt_length to the tokeniser as a number: 0 (= half) is made one here
        if getattr(self, "max_prompt_length", None) == 0 and getattr(self, "max_length", 0):  # 0: `from_run` decides
            self.max_prompt_length = prompt_limit(self)
        super().__post_init__()


@dataclass
class Sampling(Options):
    num_samples: int = opt(1, "Samples per prompt (and model).")
    max_new_tokens: int = opt(48, "Tokens sampled per completion at most.")
    temperature: float = opt(1.0, "Sampling temperature (0 = greedy).")
    top_p: float = opt(1.0, "Nucleus sampling threshold (1 = off).")
    seed: int = opt(0, "Sampling seed (the same for every model compared), also of bootstraps and labelling.")


@dataclass
class RewardSpec(Options):
    reward: str = opt("", "Reward: sentiment | length | regex | module:function | a reward-model directory.")
    reward_model: str = opt("", "A Hugging Face sequence-classification model directory used as the reward (wins over --reward).")
    reward_pattern: str = opt("", "regex reward: the pattern (--reward regex --reward-pattern 'thank(s| you)').")
    reward_absent: bool = opt(False, "regex reward: reward the pattern's absence instead.")
    reward_target_length: int = opt(20, "length reward: target number of words.")


@dataclass
class PairSynthesis(Options):
    pair_strategy: str = opt("best-vs-worst", "Pairs per prompt: best-vs-worst | random | all.")
    min_gap: float = opt(0.0, "Drop pairs whose reward gap is below this (equal rewards are always dropped).")
    chat: bool = opt(False, "Wrap plain-text prompts as a user message in the chat template (default: continue the text).")


@dataclass
class Progress(Options):
    progress: bool = opt(True, "Show the live progress bar (on a terminal; elsewhere one plain line per logged step).")


@dataclass
class LoRA(Options):
    lora: bool = opt(False, "Train LoRA adapters instead of all weights.")
    lora_r: int = opt(16, "LoRA rank.")
    lora_alpha: int = opt(32, "LoRA scaling alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.")
    lora_targets: str = opt("all-linear", "LoRA target modules: 'all-linear' or comma-separated names.")
    merge_lora: bool = opt(False, "Also save merged full weights at the end of a LoRA run.")


@dataclass
class Optimizer(Options):
    lr: float = opt(5e-6, "Peak learning rate (AdamW).")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    warmup_ratio: float = opt(0.1, "Fraction of steps with linear warm-up.")
    scheduler: str = opt("linear", "LR decay after warm-up: linear | cosine | constant.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 = off).")


@dataclass
class Checkpointing(Options):
    log_every: int = opt(1, "Log metrics every N optimizer steps.")
    eval_every: int = opt(0, "Evaluate every N steps (0 = only at the end).")
    save_every: int = opt(0, "Checkpoint every N steps (0 = only at the end).")
    keep_last: int = opt(2, "Keep only the last K step checkpoints (0 = keep all; 2 leaves one to fall back on).")
    final_checkpoint: bool = opt(False, "Also checkpoint the training state (optimizer, scheduler) at the end, to "
                                        "continue later with more steps (costs 3x the model size on disk).")
    max_bad_steps: int = opt(10, "Non-finite loss/grad steps skipped before the run stops.")
    resume: bool = opt(False, "Continue from the latest checkpoint in output_dir.")


@dataclass
class Speed(Packing):
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory (about +1 forward).")
    prefix_sharing: bool = opt(True, "One row [prompt][chosen][rejected] per pair: the prompt is computed once, not twice.")
    segment_attention: bool = opt(True, "With packing: attention per sequence block instead of one masked attention over the whole row.")
    flush_denormal: bool = opt(True, "CPU: compute denormal floats (below 1.2e-38, e.g. tiny softmax probabilities) as zero, "
                                     "process-wide; x86 CPUs run them up to 100x slower (a whole step 10x).")


@dataclass
class LossSettings(Options):
    loss: str = opt("sigmoid", "Loss (sigmoid = DPO; kto: unpaired data; plackett_luce: ranked lists). Comma-separated names "
                               "are summed with loss_weights (MPO: sigmoid,bco_pair,sft with 0.8,0.2,1.0).",
                    names_from="dpolab.losses:ALL_NAMES")
    loss_weights: str = opt("", "Comma-separated weights of a combined loss, one per name (empty = all 1).")
    beta: float = opt(0.1, "KL strength beta (ORPO: lambda).")
    label_smoothing: float = opt(0.0, "eps for cdpo / robust: assumed label-flip rate.")
    gamma: float = opt(0.5, "SimPO target reward margin.")
    alpha: float = opt(0.01, "R-DPO length penalty per token of length difference.")
    sft_weight: float = opt(0.0, "Weight of an added NLL(chosen) term (RPO); 0 = off.")
    f_divergence: str = opt("reverse_kl", "f-DPO divergence: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence "
                                          "(losses of the margin only: sigmoid, cdpo, robust, ipo, hinge, exo_pair, discopop).")
    f_alpha: float = opt(0.5, "alpha of alpha_divergence as in the f-DPO paper (0: reverse KL, 1: forward KL; TRL's coefficient is 1 - alpha).")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau.")
    ipo_average_logps: bool = opt(False, "IPO on per-token mean log-ratios (TRL's convention); default: summed, as in the IPO paper.")
    sft_token_weighted: bool = opt(False, "SFT/RPO NLL as one mean over all chosen tokens of the batch (TRL's convention); default: per-pair mean.")
    wpo: bool = opt(False, "WPO: weight each pair's loss by exp(mean token log-prob) of chosen times rejected under the policy (detached).")
    ld_alpha: float = opt(1.0, "LD-DPO: weight of the log-probs of the longer completion's tokens beyond the shorter one's length (1 = off, 0 = ignore the tail).")
    desirable_weight: float = opt(1.0, "KTO lambda_D: weight of desirable examples (--loss kto).")
    undesirable_weight: float = opt(1.0, "KTO lambda_U: weight of undesirable examples (--loss kto).")


@dataclass
class ImplicitReward(Options):
    beta: float = like(LossSettings, "beta", 0.0, "beta of the implicit reward; 0 = the beta the run was trained with "
                                                 "(its config.yaml), else 0.1.")


# ----------------------------------------------------------------------------- the commands
@dataclass
class CommonConfig(Progress, Checkpointing, LoRA, Speed, Optimizer, Lengths, PairColumns, ModelOptions):
    """Fields shared by every training command (SFT and the DPO family)."""

    data: str = opt("", "Training data: .jsonl/.json(.gz), .parquet, .csv(.gz), a datasets folder or a hub name.")
    eval_data: str = opt("", "Held-out data; empty = split eval_fraction off the training data.")
    eval_fraction: float = opt(0.05, "Fraction of the training data held out when eval_data is empty (0 = no eval).")
    output_dir: str = opt("runs/dpolab", "Run directory: config, metrics, TensorBoard logs, checkpoints.")
    split: str = opt("train", "Split to read from a datasets folder / hub dataset.")
    limit: int = like(Limit, "limit", help="Use only the first N usable pairs of --data (and of --eval-data): a quick trial run; 0 = all.")
    batch_size: int = opt(4, "Pairs per micro-batch (per process).")
    grad_accum: int = opt(1, "Micro-batches per optimizer step.")
    eval_batch_size: int = opt(8, "Pairs per evaluation batch.")
    epochs: float = opt(1.0, "Passes over the training data.")
    max_steps: int = opt(0, "Stop after this many optimizer steps (0 = from epochs).")
    seed: int = opt(42, "Seed for data order, splits and initialisation.")


@dataclass
class TrainConfig(LossSettings, CommonConfig):
    """`dpolab train`: the DPO family on preference pairs."""

    ref_model: str = like(Reference, "ref_model")
    precompute_ref: bool = opt(False, "Compute reference log-probs once, cache them on disk, free the reference.")
    sft_first: bool = opt(False, "Run an SFT stage on prompt+chosen first and use it as policy and reference.")
    sync_ref_every: int = opt(0, "TR-DPO: every N steps the reference becomes ref_mix_alpha * policy + (1 - ref_mix_alpha) * reference (0 = off).")
    ref_mix_alpha: float = opt(0.6, "TR-DPO mixing weight of the policy when the reference is synchronised (1 = hard copy).")


@dataclass
class SFTConfig(CommonConfig):
    """`dpolab sft`: supervised fine-tuning on prompt + chosen (the paper's SFT stage / Preferred-FT)."""

    lr: float = like(Optimizer, "lr", 2e-5)  # SFT takes larger steps than DPO
    output_dir: str = opt("runs/sft", "Run directory.")


@dataclass
class ScoreConfig(Scoring, RunLengths, Limit, PromptColumn, ImplicitReward, Reference, ModelOptions):
    """`dpolab score`: implicit reward beta*(log pi - log pi_ref) of responses, ranked per prompt."""

    data: str = opt("", "Rows {prompt, response} or {prompt, response: [candidates...]}, or preference pairs "
                        "(chosen and rejected are scored as two candidates).")
    response_column: str = opt("response", "Column holding a response or a list of candidate responses.")
    output_dir: str = opt("runs/score", "Writes scores.jsonl (+ tokens.jsonl and tokens.html with --per-token).")
    per_token: bool = opt(False, "Also save and show the per-token reward of every response.")
    show: int = opt(3, "Prompts shown in the terminal (all rows are saved).")


@dataclass
class EvalConfig(Scoring, RunLengths, PairColumns, Sampling, RewardSpec, Limit, ImplicitReward, Reference, ModelOptions):
    """`dpolab eval`: preference accuracy on pairs; reward, win rate and KL from samples."""

    data: str = opt("", "Held-out preference pairs for preference accuracy (any format `train` reads).")
    prompts: str = opt("", "Prompt set for generation-based evaluation: a .txt file (one per line), a prompt column, or pairs whose prompts are used.")
    baseline: str = opt("reference", "What the policy's samples are compared with: reference | none | a model path.")
    ci: str = opt("wilson", "95% interval of accuracy and win rate: wilson | bootstrap.")
    n_boot: int = opt(2000, "Bootstrap resamples (with --ci bootstrap).")
    output_dir: str = opt("runs/eval", "Where eval.json is written.")


@dataclass
class RankConfig(Scoring, RunLengths, PairColumns, Sampling, RewardSpec, Limit, Reference, Runtime):
    """`dpolab rank`: several checkpoints on the same pairs or prompts; win matrix and Bradley-Terry ranking."""

    models: str = opt("", "Comma-separated model paths (checkpoints, LoRA adapters, 'default').")
    names: str = opt("", "Comma-separated display names (default: the paths).")
    beta: float = like(ImplicitReward, "beta", help="beta of the implicit reward (pairs mode); 0 = each run's own "
                                                   "(its config.yaml), else 0.1.")
    data: str = opt("", "Preference pairs: rank by correct implicit-reward ordering.")
    prompts: str = opt("", "Prompt set: rank by the judge's reward of each model's samples (needs --reward).")
    n_boot: int = opt(1000, "Bootstrap resamples of the items for the rating intervals.")
    prior: float = opt(0.1, "Pseudo-wins added both ways to every pair of models (keeps ratings finite).")
    output_dir: str = opt("runs/rank", "Where rank.json and win_matrix.png are written.")


@dataclass
class ReportConfig(Options):
    """`dpolab report`: self-contained HTML report (curves, eval tables, ranking, attribution) of run directories."""

    runs: str = opt("", "Run directories (positional, or comma-separated) holding metrics.jsonl, eval.json, rank.json and/or tokens.jsonl.", positional=True)
    output: str = opt("", "HTML file to write (default: report.html in the first run directory).")
    title: str = opt("dpolab report", "Title of the report.")
    examples: int = opt(5, "Per-token attribution examples shown per run.")


@dataclass
class GenerateConfig(Progress, PairSynthesis, Sampling, RewardSpec, Limit, PromptColumn, ModelOptions):
    """`dpolab generate`: sample K completions per prompt, score them with a reward, write preference pairs."""

    prompts: str = opt("", "Prompt file: .txt (one per line), a prompt column, or a CSV/JSON with a `review` column "
                           "(first prefix_words words). Empty = the built-in movie-review openings.")
    prefix_words: int = opt(8, "Words of a `review` column kept as the prompt prefix.")
    output: str = opt("runs/generate/pairs.jsonl", "JSONL file of pairs (appended to when resuming).")
    reward: str = like(RewardSpec, "reward", "sentiment")
    num_samples: int = like(Sampling, "num_samples", 4, "K: completions sampled per prompt.")
    batch_size: int = opt(16, "Sequences per generation batch.")
    flip_rate: float = opt(0.0, "Label noise: fraction of pairs whose chosen/rejected are swapped.")
    bt_temperature: float = opt(0.0, "Label noise: sample labels with P = sigmoid(gap / T) (0 = always the higher score).")
    overwrite: bool = opt(False, "Start the output over instead of resuming it.")


@dataclass
class ExperimentConfig(Progress, PairSynthesis, Sampling, RewardSpec, PromptColumn):
    """`dpolab experiment`: the DPO paper's controlled-sentiment experiment, ending in a reward-vs-KL frontier."""

    name: str = opt("sentiment", "Experiment: sentiment (continue movie-review openings with positive sentiment).")
    model: str = like(ModelOptions, "model", help="Starting model (and reference): 'default', a checkpoint dir or a hub id.")
    device: str = like(ModelOptions, "device")
    bf16: str = like(ModelOptions, "bf16", help="bf16 autocast for training: auto | true | false (auto = on CUDA GPUs with bf16; "
                                                "sampling and KL stay fp32; fp32 on CPU).")
    sft_data: str = opt("", "Optional SFT stage on this data (any format `dpolab sft` reads); its result is the reference.")
    sft_steps: int = opt(0, "Optimizer steps of the SFT stage (0 = one epoch).")
    prompts: str = opt("", "Prompt file (.txt, a prompt column, or a CSV with a `review` column); empty = built-in set.")
    prefix_words: int = opt(8, "Words of a `review` column used as the prompt prefix.")
    train_prompts: int = opt(128, "Prompts used to generate training pairs.")
    eval_prompts: int = opt(32, "Held-out prompts every policy is measured on.")
    reward: str = like(RewardSpec, "reward", "sentiment", "True reward: sentiment | length | regex | module:function | a reward-model directory.")
    num_samples: int = like(Sampling, "num_samples", 4, "K: completions sampled per training prompt.")
    max_new_tokens: int = like(Sampling, "max_new_tokens", 24)
    seed: int = like(Sampling, "seed", help="Seed of sampling, labelling and training.")
    eval_samples: int = opt(2, "Samples per held-out prompt for every policy.")
    best_of: str = opt("4,16", "Best-of-N baselines from the reference with the true reward (comma-separated N; empty = none).")
    betas: str = opt("0.05,0.1,0.5", "DPO beta values (comma-separated): one policy and one frontier point each.")
    baselines: str = opt("preferred-ft,ipo,cdpo", "Trained baselines: preferred-ft, unlikelihood, ipo, cdpo (comma-separated; empty = none).")
    unlikelihood_alpha: float = opt(1.0, "Weight of the Unlikelihood baseline's term on rejected tokens.")
    online_kl_coefs: str = opt("", "Online RL (RLOO, KL-penalised true reward): KL coefficients, one policy each (empty = none).")
    online_steps: int = opt(16, "Optimizer steps of every online RL run.")
    online_prompts_per_step: int = opt(4, "Training prompts per online RL step.")
    online_samples: int = opt(4, "Completions per prompt per online RL step (RLOO's K).")
    online_lr: float = opt(1e-5, "Peak learning rate of the online RL runs.")
    ipo_beta: float = opt(0.1, "beta of the IPO baseline.")
    cdpo_beta: float = opt(0.1, "beta of the cDPO baseline.")
    label_smoothing: float = like(LossSettings, "label_smoothing", 0.1, "cDPO's assumed label-flip rate eps.")
    steps: int = opt(32, "Optimizer steps of every training run.")
    batch_size: int = opt(8, "Pairs per optimizer step.")
    lr: float = like(Optimizer, "lr", 1e-5, "Peak learning rate of the DPO-family runs.")
    sft_lr: float = opt(1e-5, "Peak learning rate of Preferred-FT and the SFT stage.")
    rounds: int = opt(1, "Iterative on-policy DPO: rounds of (sample from the latest policy, relabel, train from it).")
    active: bool = opt(False, "Rounds >= 2: spend the sampling budget on the prompts with the smallest implicit-reward margins.")
    active_fraction: float = opt(0.5, "With --active: fraction of prompts resampled (with K / fraction samples each).")
    gen_batch_size: int = opt(64, "Sequences per generation batch.")
    eval_batch_size: int = opt(16, "Sequences per forward pass when measuring KL and accuracy.")
    output_dir: str = opt("runs/sentiment", "Experiment directory: runs, samples, results.json, frontier.png, report.html.")
    stages_dir: str = opt("", "Cache of generated pairs and reference samples (default <output_dir>/stages).")


@dataclass
class SweepConfig(ExperimentConfig):
    """`dpolab sweep`: the experiment pipeline over a grid of one config field (beta by default) -> frontier + table."""

    field: str = opt("beta", "Field to sweep: beta, or any `dpolab experiment` option (lr, steps, num_samples, ...).")
    values: str = opt("0.02,0.05,0.1,0.2,0.5", "Comma-separated values of the field.")
    betas: str = opt("0.1", "DPO beta when sweeping another field.")
    baselines: str = opt("", "Trained baselines added to the sweep's frontier (preferred-ft, ipo, cdpo).")
    output_dir: str = opt("runs/sweep", "Sweep directory.")


@dataclass
class LabelNoiseConfig(Options):
    """The label-noise study (`python -m dpolab.experiments.label_noise`, see its module docstring)."""

    output_dir: str = opt("runs/label-noise", "Folder for pairs, runs, results.json/.md and label_noise.png.")
    model: str = like(ModelOptions, "model", help="Model that samples the pairs and is trained (and the reference).")
    reward: str = like(RewardSpec, "reward", "sentiment", "Reward that labels the pairs and scores the trained policies' samples.")
    prompts: str = opt("", "Prompt file (empty = the built-in movie-review openings).")
    train_prompts: int = opt(96, "Prompts whose pairs are trained on.")
    eval_prompts: int = opt(32, "Held-out prompts (clean pairs for accuracy; sampled for the reward).")
    num_samples: int = like(Sampling, "num_samples", 4, "Completions sampled per prompt for the pairs.")
    max_new_tokens: int = like(Sampling, "max_new_tokens", 24)
    flip_rates: str = opt("0,0.1,0.2,0.3", "Comma-separated label flip rates.")
    losses: str = opt("sigmoid,cdpo,robust,ipo", "Comma-separated losses compared.")
    beta: float = like(LossSettings, "beta", help="beta of every loss.")
    lr: float = like(Optimizer, "lr", 1e-5, "Learning rate of every run.")
    batch_size: int = opt(8, "Pairs per step.")
    epochs: float = like(CommonConfig, "epochs", help="Passes over the training pairs.")
    eval_samples: int = opt(2, "Samples per held-out prompt for the reward measure.")
    seed: int = like(Sampling, "seed", help="Seed of sampling, flips and training.")
    keep_models: bool = opt(False, "Keep the trained models (off: deleted after measuring).")
    progress: bool = like(Progress, "progress", False)


# ----------------------------------------------------------------------------- the command line
def prompt_limit(cfg) -> int:
    """The prompt-token limit in force: --max-prompt-length, or half of --max-length when 0."""
    return cfg.max_prompt_length or cfg.max_length // 2


def from_run(cfg, recorded: dict):
    """`cfg` (eval, score, rank) with its "0 = the run's own" fields filled from `recorded`, the
    config.yaml of the run the model comes from ({} for a model of no dpolab run, see
    `models.run_config`): beta (else DPO's usual 0.1), max_length (else 512) and, where
    max_length came from the run, the run's prompt limit (else half of max_length). A value the
    user gave is kept. (The implicit reward is DPO's beta * log-ratio sum for every loss; no
    other loss setting changes it.)"""
    def number(key, kind, low):
        value = recorded.get(key)
        return kind(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= low else None

    changes = {}
    if getattr(cfg, "beta", 1) <= 0:
        changes["beta"] = number("beta", float, 1e-12) or 0.1
    if getattr(cfg, "max_length", 1) == 0:
        length = number("max_length", int, 2)
        changes["max_length"] = length or Lengths.__dataclass_fields__["max_length"].default
        if length and cfg.max_prompt_length == 0:
            run_prompt = number("max_prompt_length", int, 0) or 0
            changes["max_prompt_length"] = run_prompt if 0 < run_prompt < length else length // 2
    return dataclasses.replace(cfg, **changes) if changes else cfg


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
        if f.metadata.get("names_from"):  # e.g. the losses: listed from the dict that defines them, when shown
            help_text += " One of: {names}."
        help_text = f"{help_text} (default: {default!r})".replace("%", "%%")  # argparse formats help
        kind = hints[f.name]
        if f.metadata.get("positional"):  # e.g. `dpolab report RUN_DIR...`: joined with commas
            action = parser.add_argument(f.name, nargs="*", default=None, help=help_text, metavar=f.name.upper())
        elif kind is bool:
            action = parser.add_argument(name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            action = parser.add_argument(name, type=kind, default=None, help=help_text, metavar=f.name.upper())
        action.names_from = f.metadata.get("names_from")
    parser.add_argument("--config", default=None, help="YAML file with any of the options above; flags override it.")
    if parser.formatter_class is argparse.HelpFormatter:
        parser.formatter_class = NamesHelp


class NamesHelp(argparse.HelpFormatter):
    """Fills a field's allowed names (the losses) in only when help is printed: they are the keys
    of a dict in a module that imports torch, and parsing `dpolab ...` must not."""

    def _get_help_string(self, action):
        spec = getattr(action, "names_from", None)
        return action.help.replace("{names}", ", ".join(named(spec))) if spec else action.help


def named(spec: str) -> list[str]:
    """The keys of a dict given as "module:NAME" (imported only when asked: --help, validation)."""
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
    """defaults <- YAML (args.config) <- CLI flags <- keyword overrides (Python API); validated."""
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
    return cls(**values)  # validated at construction


def _run_config(cls, given: dict) -> str | None:
    """`--resume` without `--config`: the run's own config.yaml is the base (flags still override),
    so `dpolab train --output-dir runs/x --resume` continues runs/x as it was started."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "resume" not in names or not given.get("resume"):
        return None
    output_dir = given.get("output_dir") or next(f.default for f in dataclasses.fields(cls) if f.name == "output_dir")
    path = Path(output_dir) / "config.yaml"
    return str(path) if path.is_file() else None


# ----------------------------------------------------------------------------- validation
def validate(cfg) -> None:
    """Reject settings that cannot work, with one line each: the checks of the fields the config
    has, then those of its command."""
    checks = field_checks(cfg) + [c for cls, command in COMMAND_CHECKS.items() if isinstance(cfg, cls) for c in command(cfg)]
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


def field_checks(cfg) -> list[tuple[bool, str]]:
    """(ok, message) for every shared field the config has (a group's fields are checked wherever it is used)."""
    has = lambda *names: all(hasattr(cfg, n) for n in names)  # noqa: E731
    return [
        (not has("batch_size") or cfg.batch_size >= 1, "batch_size must be >= 1"),
        (not has("grad_accum") or cfg.grad_accum >= 1, "grad_accum must be >= 1"),
        (not has("max_length") or cfg.max_length >= 2 or (cfg.max_length == 0 and isinstance(cfg, RunLengths)),
         "max_length must be >= 2" + (" (0 = the run's own)" if isinstance(cfg, RunLengths) else "")),
        (not has("max_length", "max_prompt_length")
         or (cfg.max_prompt_length >= 0 and (cfg.max_length == 0 or cfg.max_prompt_length < cfg.max_length)),
         f"max_prompt_length must be < max_length ({getattr(cfg, 'max_length', '')}); leave it unset for half of it"),
        (not has("limit") or cfg.limit >= 0, "limit must be >= 0"),
        (not has("keep_last") or cfg.keep_last >= 0, "keep_last must be >= 0 (0 = keep all)"),
        (not has("scheduler") or cfg.scheduler in ("linear", "cosine", "constant"), "scheduler must be linear, cosine or constant"),
        (not has("bf16") or cfg.bf16 in ("auto", "true", "false"), "bf16 must be auto, true or false"),
        (not has("eval_fraction") or 0 <= cfg.eval_fraction < 1, "eval_fraction must be in [0, 1)"),
        (not has("loss_weights") or _floats(cfg.loss_weights) is not None, "loss_weights must be comma-separated numbers"),
        (not has("ld_alpha") or 0 <= cfg.ld_alpha <= 1, "ld_alpha must be in [0, 1]"),
        (not has("ld_alpha", "precompute_ref") or cfg.ld_alpha == 1 or not cfg.precompute_ref,
         "ld_alpha < 1 needs per-token reference log-probs: drop --precompute-ref"),
        (not has("sync_ref_every") or cfg.sync_ref_every >= 0, "sync_ref_every must be >= 0"),
        (not has("ref_mix_alpha") or 0 < cfg.ref_mix_alpha <= 1, "ref_mix_alpha must be in (0, 1]"),
        (not has("desirable_weight") or (cfg.desirable_weight > 0 and cfg.undesirable_weight > 0),
         "desirable_weight and undesirable_weight must be > 0"),
        (not has("loss", "precompute_ref", "wpo", "ld_alpha") or cfg.loss not in ("kto", "plackett_luce")
         or not (cfg.precompute_ref or cfg.wpo or cfg.ld_alpha != 1),
         "--loss kto / plackett_luce: not with --precompute-ref, --wpo or --ld-alpha (their batches are not pairs)"),
        (not has("sync_ref_every", "lora", "precompute_ref") or not cfg.sync_ref_every or not (cfg.lora or cfg.precompute_ref),
         "sync_ref_every (TR-DPO) needs a separate reference model: not with --lora or --precompute-ref"),
        (not has("num_samples") or cfg.num_samples >= 1, "num_samples must be >= 1"),
        (not has("max_new_tokens") or cfg.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
        (not has("temperature") or cfg.temperature >= 0, "temperature must be >= 0"),
        (not has("top_p") or 0 < cfg.top_p <= 1, "top_p must be in (0, 1]"),
        (not has("pair_strategy") or cfg.pair_strategy in PAIR_STRATEGIES, f"pair_strategy must be one of {', '.join(PAIR_STRATEGIES)}"),
        (not has("min_gap") or cfg.min_gap >= 0, "min_gap must be >= 0"),
    ]


def _eval_checks(cfg: EvalConfig) -> list:
    return [
        (bool(cfg.data or cfg.prompts), "nothing to evaluate: pass --data PAIRS and/or --prompts PROMPTS"),
        (not cfg.prompts or bool(cfg.reward or cfg.reward_model),
         "generation-based evaluation needs --reward (e.g. sentiment, length, module:function)"),
        (cfg.ci in ("wilson", "bootstrap"), f"ci must be wilson or bootstrap, got {cfg.ci!r}"),
    ]


def _score_checks(cfg: ScoreConfig) -> list:
    return [(bool(cfg.data), "nothing to score: pass --data FILE")]


def _rank_checks(cfg: RankConfig) -> list:
    models, names = names_list(cfg.models), names_list(cfg.names) or names_list(cfg.models)
    return [
        (len(models) >= 2, "rank needs at least two models: --models A,B[,C...]"),
        (len(names) == len(models) and len(set(names)) == len(names), f"--names must give {len(models)} distinct names, one per model"),
        (bool(cfg.data) != bool(cfg.prompts), "rank on either --data PAIRS or --prompts PROMPTS (with --reward), not both or neither"),
        (not cfg.prompts or bool(cfg.reward or cfg.reward_model), "ranking on prompts needs a judge: --reward"),
    ]


def _report_checks(cfg: ReportConfig) -> list:
    return [(bool(names_list(cfg.runs)), "report needs at least one run directory: dpolab report RUN_DIR [RUN_DIR...]")]


def _generate_checks(cfg: GenerateConfig) -> list:
    return [
        (cfg.num_samples >= 2, "num_samples must be >= 2 to make pairs"),
        (0 <= cfg.flip_rate <= 1, "flip_rate must be in [0, 1]"),
        (cfg.bt_temperature >= 0, "bt_temperature must be >= 0"),
    ]


def _experiment_checks(cfg: ExperimentConfig) -> list:
    unknown = sorted(set(names_list(cfg.baselines)) - set(BASELINES))
    return [
        (cfg.name in EXPERIMENTS, f"unknown experiment {cfg.name!r}: available: {', '.join(EXPERIMENTS)}"),
        (not unknown, f"unknown baseline(s) {', '.join(unknown)}: use {', '.join(BASELINES)}"),
        (all(b > 0 for b in betas(cfg)), "betas must be positive numbers"),
        (all(b > 0 for b in kl_coefs(cfg)), "online_kl_coefs must be positive numbers"),
        (not kl_coefs(cfg) or cfg.online_samples >= 2, "online_samples must be >= 2 (RLOO's leave-one-out baseline)"),
        (all(n >= 2 for n in best_of(cfg)), "best_of values must be integers >= 2"),
        (cfg.train_prompts >= 1 and cfg.eval_prompts >= 1, "train_prompts and eval_prompts must be >= 1"),
        (cfg.num_samples >= 2, "num_samples must be >= 2 to make pairs"),
        (cfg.eval_samples >= 1 and cfg.steps >= 1 and cfg.rounds >= 1, "eval_samples, steps and rounds must be >= 1"),
        (0 < cfg.active_fraction <= 1, "active_fraction must be in (0, 1]"),
    ]


# the checks of one command beyond its fields' own (dicts of functions: a command adds one entry)
COMMAND_CHECKS = {EvalConfig: _eval_checks, ScoreConfig: _score_checks, RankConfig: _rank_checks,
                  ReportConfig: _report_checks, GenerateConfig: _generate_checks, ExperimentConfig: _experiment_checks}


# ----------------------------------------------------------------------------- comma-separated options
def names_list(text) -> list[str]:
    """'a, b,none' -> ['a', 'b']: a comma-separated option ('none' and blanks dropped); a list is kept."""
    items = text.split(",") if isinstance(text, str) or text is None else list(text)
    return [t.strip() for t in (items if text else []) if t.strip() and t.strip() != "none"]


def betas(cfg) -> list[float]:
    try:
        return [float(b) for b in names_list(cfg.betas)]
    except ValueError:
        raise ValueError(f"betas must be comma-separated numbers, got {cfg.betas!r}") from None


def kl_coefs(cfg) -> list[float]:
    try:
        return [float(b) for b in names_list(getattr(cfg, "online_kl_coefs", ""))]
    except ValueError:
        raise ValueError(f"online_kl_coefs must be comma-separated numbers, got {cfg.online_kl_coefs!r}") from None


def best_of(cfg) -> list[int]:
    try:
        return sorted({int(n) for n in names_list(cfg.best_of)})
    except ValueError:
        raise ValueError(f"best_of must be comma-separated integers, got {cfg.best_of!r}") from None


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
    text = yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
    for key, note in (notes or {}).items():
        text = "".join(f"{line.rstrip()}  # {note}\n" if line.startswith(f"{key}:") else line for line in text.splitlines(True))
    with atomic_path(path) as tmp:
        tmp.write_text(text if text.endswith("\n") else text + "\n", encoding="utf-8")

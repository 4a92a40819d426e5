"""Online RL with a KL-penalised reward: the DPO paper's PPO baseline, run with TRL's RLOO.

The paper's controlled-sentiment baseline is PPO with the true reward ("PPO-GT") and the
KL-penalised objective  max_pi E_{x, y~pi}[ r(x, y) ] - kl_coef * KL(pi || pi_ref),
whose optimum is pi*(y|x) ∝ pi_ref(y|x) exp(r(x, y) / kl_coef) (Rafailov et al. 2023, Eq. 4).

dpolab does not hand-write it: TRL's `RLOOTrainer` (Ahmadian et al. 2024, "Back to Basics:
Revisiting REINFORCE Style Optimization for Learning from Human Feedback") runs on CPU with
our reward callables and optimises exactly that objective: each step samples K completions
per prompt from the current policy, shapes the reward as

    r~(x, y_k) = r(x, y_k) - kl_coef * (log pi(y_k|x) - log pi_ref(y_k|x))     (sequence level)

takes the leave-one-out baseline  A_k = r~_k - mean_{j != k} r~_j  as the advantage, and
updates with PPO's clipped surrogate (one update per batch here, so the ratio is 1 and the
update is REINFORCE with that baseline). PPO proper would add a learned value head; RLOO
replaces it by the K-sample baseline, which Ahmadian et al. found as good or better.

Wiring only lives here: prompts in, a `final/` model out in dpolab's layout (final/,
config.yaml, metrics.jsonl), so the experiment measures it like every other policy.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from datasets import Dataset
from transformers import PrinterCallback, ProgressCallback, TrainerCallback

from .config import ModelOptions, Optimizer, Options, Progress, Runtime, Sampling, like, opt
from .metrics import MetricsLogger, counted
from .models import load_model, load_tokenizer, own_weights, peft_quietly
from .prompts import prompt_text

# TRL's log keys -> dpolab's metrics.jsonl keys (the report draws these curves)
LOG_KEYS = {"loss": "loss", "reward": "reward", "kl": "kl", "entropy": "entropy", "grad_norm": "grad_norm",
            "learning_rate": "lr", "completions/mean_length": "completion_length"}


@dataclass
class OnlineConfig(Options):
    """Online RL (RLOO, KL-penalised true reward) from a model on a list of prompts. Not a command
    of its own (the experiment runs it); shared fields come from config.py's option groups."""

    model: str = like(ModelOptions, "model", help="Policy and reference: 'default', a checkpoint dir or a hub id.")
    output_dir: str = opt("runs/rloo", "Run directory: final/, config.yaml, metrics.jsonl.")
    kl_coef: float = opt(0.1, "KL coefficient (TRL's beta): the reward is r - kl_coef * (log pi - log pi_ref).")
    steps: int = opt(16, "Optimizer steps; each samples prompts_per_step x num_samples fresh completions.")
    prompts_per_step: int = opt(4, "Prompts per optimizer step.")
    num_samples: int = like(Sampling, "num_samples", 4, "K: completions per prompt (the leave-one-out baseline uses "
                                                        "the other K - 1).")
    max_new_tokens: int = like(Sampling, "max_new_tokens", 16)
    temperature: float = like(Sampling, "temperature", help="Sampling temperature.")
    lr: float = like(Optimizer, "lr", 1e-5, "Peak learning rate (AdamW, linear decay).")
    max_grad_norm: float = like(Optimizer, "max_grad_norm")
    seed: int = like(Sampling, "seed", help="Seed of prompt order, sampling and initialisation.")
    device: str = like(Runtime, "device")
    progress: bool = like(Progress, "progress", help="Show a progress bar (on a terminal; plain step lines elsewhere).")


def rloo(cfg: OnlineConfig, prompts: list, reward_fn) -> Path:
    """Train with RLOO and save <output_dir>/final; returns the run directory.

    prompts: text prompts (continued as text) or chat message lists; reward_fn: dpolab's
    `f(prompts, completions) -> list[float]` (dpolab.rewards), given the prompt text.
    """
    from trl import RLOOTrainer  # why: TRL's trainer stack takes ~1.7 s to import; only online RL runs need it

    check(cfg, prompts)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(_yaml(asdict(cfg)), encoding="utf-8")

    def reward(prompts, completions, **_):  # TRL passes extra columns as keywords
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return [float(r) for r in reward_fn([prompt_text(p) for p in prompts], texts)]

    reward.__name__ = "reward"  # TRL names its logged reward column after the function
    use_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    if use_cpu:  # see models.own_weights: the first update would otherwise fault page by page
        own_weights(model)
    trainer = RLOOTrainer(model=model, reward_funcs=reward, args=trl_args(cfg, use_cpu), processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": list(prompts)}))
    # dpolab's own metrics.jsonl, TensorBoard and progress lines instead of TRL's printed dicts
    logger = MetricsLogger(out, cfg.steps, 0, enabled=True, progress=cfg.progress)
    for printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(printer)
    trainer.add_callback(_ToMetrics(logger))
    try:
        with peft_quietly():  # TRL reads the same deprecated transformers attribute as peft
            trainer.train()
    finally:
        logger.close()
    trainer.save_model(str(out / "final"))
    tokenizer.save_pretrained(str(out / "final"))
    logger.summary(f"dpolab rloo: {out}")
    return out


class _ToMetrics(TrainerCallback):
    """TRL's per-step logs, renamed to dpolab's keys, into a MetricsLogger."""

    def __init__(self, logger: MetricsLogger):
        self.logger = logger

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "reward" in logs:  # a training step's log (not the end-of-run summary)
            self.logger.log(state.global_step, metric_values(logs))


def check(cfg: OnlineConfig, prompts: list) -> None:
    checks = [
        (cfg.kl_coef > 0, "kl_coef must be > 0 (0 would drop the reference: no KL constraint)"),
        (cfg.num_samples >= 2, "num_samples must be >= 2 (the leave-one-out baseline needs another sample)"),
        (cfg.temperature > 0, "temperature must be > 0 (RLOO samples from the policy)"),
        (cfg.steps >= 1 and cfg.prompts_per_step >= 1, "steps and prompts_per_step must be >= 1"),
        (len(prompts) >= cfg.prompts_per_step, f"{counted(len(prompts), 'prompt')}, fewer than prompts_per_step {cfg.prompts_per_step}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def trl_args(cfg: OnlineConfig, use_cpu: bool):
    """TRL's config: one generation batch per optimizer step, one update per batch, no extras
    (no advantage normalisation, no reward scaling: the objective stays the paper's). TRL turns
    activation checkpointing on by default; a small model on CPU only pays its extra forward."""
    from trl import RLOOConfig  # why: as in rloo

    fields = {f.name for f in dataclasses.fields(RLOOConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"  # 5.22 and older
    return RLOOConfig(**{checkpointing: False},
        output_dir=str(Path(cfg.output_dir) / "trl"), use_cpu=use_cpu, bf16=False, seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=cfg.prompts_per_step * cfg.num_samples, num_generations=cfg.num_samples,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0, top_k=0,
        max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=cfg.max_grad_norm, beta=cfg.kl_coef, num_iterations=1, normalize_advantages=False,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True,
        log_completions=False, dataloader_num_workers=0)


def metric_values(logs: dict) -> dict:
    """One TRL log entry in dpolab's metric names (`dpolab report` draws them)."""
    return {ours: float(logs[theirs]) for theirs, ours in LOG_KEYS.items() if theirs in logs}


def _yaml(values: dict) -> str:
    return yaml.safe_dump(values, sort_keys=False)

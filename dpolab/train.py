"""The training loop shared by `dpolab train` (DPO family) and `dpolab sft`.

Read top to bottom: `train`/`sft` build the data, the models and an *objective* (a function
`(model, batch) -> (per-example losses, per-example stats)`), then `fit` runs the loop:

    for each optimizer step (data order fixed by seed and step, so resume is exact):
        for each of grad_accum micro-batches:   forward, objective, backward
        clip, skip if non-finite, AdamW step, LR schedule step
        log / evaluate / checkpoint

Distributed runs go through Hugging Face Accelerate (DDP, FSDP, DeepSpeed): each process
takes its own slice of every step's pairs, Accelerate synchronises gradients, and metrics
are reduced as sums and counts across processes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from . import checkpoint
from .config import SFTConfig, TrainConfig, _floats, prompt_limit, resolve, save as save_config
from .conventions import warn_trl_conventions
from .data import load_pairs, split_eval
from .data.listwise import load_listwise
from .data.unpaired import load_unpaired
from .data.collate import Layout, batch_tokens, collate, collate_pairs, to_device
from .losses import LossParams, PairLogps, compute_loss, needs_reference
from .logprobs import forward_logps, sequence_logps
from .metrics import MetricsLogger, counted
from .models import (add_lora, bf16_default, cache_dir, load_model, load_tokenizer, own_weights, resolve_model_path,
                     round_to_bf16, same_tokenizer)
from .ref_sync import ReferenceSync
from . import displacement, distributed, kto, length_desensitize, listwise, reference as ref
from . import safety
from .errors import TrainingError


@dataclass
class Run:
    """What every part of one run needs."""

    cfg: TrainConfig | SFTConfig
    accelerator: object
    output_dir: Path
    tokenizer: object
    bf16: bool
    pair_rows: list | None = None  # source row number of every pair index (names bad batches)

    @property
    def device(self):
        return self.accelerator.device

    def autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------- entry points
def train(cfg: TrainConfig | None = None, **overrides) -> dict:
    """DPO-family training. `train(data="pairs.jsonl", loss="ipo")` or `train(TrainConfig(...))`."""
    cfg = cfg or resolve(TrainConfig, **overrides)
    if cfg.sft_first:
        cfg = _after_sft_stage(cfg)
    run = start_run(cfg)
    pairs, train_idx, eval_idx = load_data(cfg, run)
    policy = build_policy(cfg, run)
    reference = build_reference(cfg, run)
    params = loss_params(cfg)

    def objective(model, batch):
        if cfg.loss == kto.NAME:  # unpaired data: its own objective (dpolab/kto.py)
            return kto.objective((cfg.beta, cfg.desirable_weight, cfg.undesirable_weight), model, reference, batch, run)
        if cfg.loss == listwise.NAME:  # several ranked responses per prompt (dpolab/listwise.py)
            return listwise.objective(cfg.beta, model, reference, batch, run)
        return dpo_objective(cfg.loss, params, model, reference, batch, run)

    sync = None

    def on_prepared(model):  # the policy is wrapped / sharded now, and not yet resumed
        nonlocal reference, sync
        reference = finish_reference(cfg, run, model, reference, pairs)
        sync = reference_sync(cfg, run, reference)

    def make_batch(indices):
        if cfg.loss == kto.NAME:
            batch = kto.collate([pairs[i] for i in indices], run.tokenizer.pad_token_id, Layout.from_config(cfg), cfg.max_length)
        elif cfg.loss == listwise.NAME:
            batch = listwise.collate([pairs[i] for i in indices], run.tokenizer.pad_token_id, Layout.from_config(cfg))
        else:
            batch = collate_pairs([pairs[i] for i in indices], run.tokenizer.pad_token_id, Layout.from_config(cfg))
        batch["index"] = torch.tensor(indices)
        return to_device(batch, run.device)

    def on_step(model, step, resumed=False):  # TR-DPO, when on
        if sync is not None:
            sync(model, step, resumed)

    result = fit(run, policy, train_idx, eval_idx, objective, make_batch, on_prepared, on_step)
    displacement.report_run(result, cfg, run.accelerator)  # chosen log-probs below the reference while the margin rises
    return result


def reference_sync(cfg: TrainConfig, run: Run, reference):
    """TR-DPO's ReferenceSync when --sync-ref-every is set (a separate, unsharded reference model), else None."""
    if not cfg.sync_ref_every:
        return None
    if not isinstance(reference, torch.nn.Module) or distributed.is_sharded(run.accelerator):
        raise TrainingError("--sync-ref-every (TR-DPO) needs a separate reference model on every process: "
                            "not with a reference-free loss, --lora, --precompute-ref, FSDP or DeepSpeed")
    return ReferenceSync(reference, cfg.sync_ref_every, cfg.ref_mix_alpha, run.output_dir, run.accelerator)


def sft(cfg: SFTConfig | None = None, **overrides) -> dict:
    """Supervised fine-tuning on prompt + chosen (the paper's SFT stage / Preferred-FT)."""
    cfg = cfg or resolve(SFTConfig, **overrides)
    run = start_run(cfg)
    pairs, train_idx, eval_idx = load_data(cfg, run)
    policy = build_policy(cfg, run)

    def make_batch(indices):
        chosen = [pairs[i] for i in indices]
        batch = collate([p.prompt_ids for p in chosen], [p.chosen_ids for p in chosen], run.tokenizer.pad_token_id, Layout.from_config(cfg))
        return to_device(batch, run.device)

    return fit(run, policy, train_idx, eval_idx, sft_objective, make_batch)


def _after_sft_stage(cfg: TrainConfig) -> TrainConfig:
    """Run SFT on the same data first; its result becomes the DPO policy and reference."""
    sft_dir = Path(cfg.output_dir) / "sft"
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(SFTConfig) if f.name not in ("lr", "output_dir")}
    if not (sft_dir / "final").exists():
        print(f"dpolab train --sft-first: stage 1/2, SFT on prompt + chosen -> {sft_dir}", file=sys.stderr, flush=True)
        sft(SFTConfig(**{**shared, "output_dir": str(sft_dir), "lora": False}))
    print(f"dpolab train --sft-first: stage 2/2, {cfg.loss} from {sft_dir / 'final'} (also the reference)",
          file=sys.stderr, flush=True)
    return dataclasses.replace(cfg, model=str(sft_dir / "final"), ref_model="", sft_first=False)


# ----------------------------------------------------------------------------- objectives
def loss_params(cfg: TrainConfig) -> LossParams:
    """The loss hyper-parameters of a train config (TRL conventions that differ are warned about once)."""
    warn_trl_conventions(cfg)
    return LossParams(
        cfg.beta, cfg.label_smoothing, cfg.gamma, cfg.alpha, cfg.sft_weight, f_divergence=cfg.f_divergence,
        f_alpha=cfg.f_alpha, discopop_tau=cfg.discopop_tau, loss_weights=_floats(cfg.loss_weights),
        ipo_average_logps=cfg.ipo_average_logps, sft_token_weighted=cfg.sft_token_weighted, wpo=cfg.wpo,
    )


def dpo_objective(loss_name: str, params: LossParams, model, reference, batch: dict, run: Run):
    """Pair batch -> (per-pair losses (B,), stats of shape (B,)) for any loss of the family."""
    half = batch["lengths"].shape[0] // 2
    # Reference first: with "adapter" it is a no-grad forward of the same (possibly FSDP-sharded)
    # module, which must not fall between the policy's forward and its backward.
    pair_fn = length_desensitize.pair_fn(getattr(run.cfg, "ld_alpha", 1.0))  # pair_logps unless LD-DPO
    if reference is None:
        reference_chosen_logps = reference_rejected_logps = None
    else:
        reference_chosen_logps, reference_rejected_logps = ref.reference_logps(model, reference, batch, run.autocast, pair_fn)
    policy_chosen_logps, policy_rejected_logps = pair_fn(model, batch)
    logps = PairLogps(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
        batch["lengths"][:half].float(), batch["lengths"][half:].float(),
    )
    out = compute_loss(loss_name, logps, params)
    stats = {
        "loss": out.losses.detach(),
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        # one definition everywhere (stats.outcomes, dpolab eval): a tie counts half, so an
        # untrained policy (every margin 0) scores 0.5, the level a trained one has to beat
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float()
        + 0.5 * (out.chosen_rewards == out.rejected_rewards).float(),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }
    return out.losses, stats


def sft_objective(model, batch: dict):
    """Per-example mean token NLL of the completion (prompt tokens are not trained on)."""
    logps = sequence_logps(forward_logps(model, batch), batch)
    losses = -logps / batch["lengths"].float()
    return losses, {"loss": losses.detach(), "logps/chosen": logps.detach()}


# ----------------------------------------------------------------------------- set-up
def start_run(cfg) -> Run:
    distributed.check_launch()
    accelerator = Accelerator(cpu=distributed.use_cpu(cfg.device), gradient_accumulation_steps=cfg.grad_accum)
    distributed.check_accumulation(accelerator, cfg.grad_accum)
    if cfg.device == "cuda" and accelerator.device.type != "cuda":
        raise TrainingError("device cuda requested but no CUDA GPU is available")
    set_seed(cfg.seed)
    output_dir = Path(cfg.output_dir)
    # Rank 0 alone looks at the folder and every rank raises its error: a rank failing alone
    # would leave the others waiting at their next collective.
    problem = distributed.main_decides(accelerator, lambda: _claim_output_dir(cfg, output_dir))
    if problem:
        raise TrainingError(problem)
    # A confident softmax over a large vocabulary leaves probabilities below 1.2e-38 (denormal
    # floats) in its backward; x86 cores run every operation on them on a slow path (one HH
    # batch: 80 s instead of 8 s). Flush-to-zero changes values by less than 1.2e-38.
    torch.set_flush_denormal(cfg.flush_denormal)
    bf16 = cfg.bf16 == "true" or (cfg.bf16 == "auto" and bf16_default(accelerator.device))
    with accelerator.local_main_process_first():  # one process per machine converts / caches
        tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    return Run(cfg, accelerator, output_dir, tokenizer, bf16)


def _claim_output_dir(cfg, output_dir: Path) -> str | None:
    """(Rank 0) refuse a folder holding another run, else create it and write config.yaml."""
    if not cfg.resume and (checkpoint.latest(output_dir) or (output_dir / "final").exists()):
        return f"{output_dir} already holds a run: pass --resume to continue it or choose another --output-dir"
    if cfg.resume and (output_dir / "final").exists() and (problem := _finished_run_problem(output_dir)):
        return problem
    try:
        safety.check_writable(output_dir)
    except TrainingError as e:
        return str(e)
    return None  # config.yaml is written once the run really starts (`record_config`)


def _finished_run_problem(output_dir: Path) -> str | None:
    """Why --resume cannot continue a finished run: without this it would silently train again
    over final/, from step 0 or from an older periodic checkpoint."""
    last, done = checkpoint.latest(output_dir), checkpoint.finished_step(output_dir)
    if last is None:
        reason = "no checkpoint to continue from (its final/ holds no optimizer state; --final-checkpoint keeps one)"
    elif done is not None and (step := checkpoint.step_of(last)) < done:
        redo = f"step {done}" if step + 1 == done else f"steps {step + 1}-{done}"
        reason = f"finished at step {done}, but its newest checkpoint is step {step}: resuming would redo {redo}"
    else:
        return None
    return f"{output_dir} is a finished run with {reason}: start a new run from it with --model {output_dir} --output-dir NEW_DIR"


def record_config(run: Run) -> None:
    """(Rank 0) config.yaml with bf16 as it resolved here, so `--config` repeats the same run."""
    if run.accelerator.is_main_process:
        resolved = dataclasses.replace(run.cfg, bf16=str(run.bf16).lower())
        notes = {"bf16": f"requested {run.cfg.bf16}"}
        if hasattr(run.cfg, "max_prompt_length") and not run.cfg.max_prompt_length:
            resolved = dataclasses.replace(resolved, max_prompt_length=prompt_limit(run.cfg))
            notes["max_prompt_length"] = "requested 0 (half of max_length)"
        save_config(resolved, run.output_dir / "config.yaml", notes=notes)


def load_data(cfg, run: Run):
    """Tokenised pairs (train then eval in one list) and the index ranges of each split."""
    kw = dict(
        max_length=cfg.max_length, max_prompt_length=prompt_limit(cfg), prompt_column=cfg.prompt_column,
        chosen_column=cfg.chosen_column, rejected_column=cfg.rejected_column, split=cfg.split,
        cache_dir=str(cache_dir() / "data"),
    )
    if not cfg.data:
        raise TrainingError("no training data: pass --data FILE")
    _check_resumed_paths(cfg, run.output_dir)
    # KTO reads unpaired examples, the Plackett-Luce loss ranked lists; the rest pairs
    load = {kto.NAME: load_unpaired, listwise.NAME: load_listwise}.get(getattr(cfg, "loss", ""), load_pairs)
    with run.accelerator.local_main_process_first():  # one process per machine tokenises, the rest read its cache
        train_pairs, report = load(cfg.data, run.tokenizer, **kw)
    train_pairs = train_pairs[: cfg.limit or None]  # a trial run: fewer pairs to train AND to evaluate on
    if cfg.eval_data:
        with run.accelerator.local_main_process_first():
            eval_pairs, eval_report = load(cfg.eval_data, run.tokenizer, **kw)
        eval_pairs = eval_pairs[: cfg.limit or None]
        if run.accelerator.is_main_process:
            eval_report.write(run.output_dir / "eval_data_report.json")
    else:
        train_pairs, eval_pairs = split_eval(train_pairs, cfg.eval_fraction, cfg.seed)
    if run.accelerator.is_main_process:
        report.write(run.output_dir / "data_report.json")
        run.accelerator.print(data_summary(cfg.data, report, len(train_pairs), len(eval_pairs), cfg.limit))
    if not train_pairs:
        raise TrainingError(f"{cfg.data}: no usable training pairs (see {run.output_dir / 'data_report.json'})")
    pairs = train_pairs + eval_pairs
    run.pair_rows = [p.row for p in pairs]
    return pairs, list(range(len(train_pairs))), list(range(len(train_pairs), len(pairs)))


def _check_resumed_paths(cfg, output_dir: Path) -> None:
    """config.yaml keeps data paths as typed: a relative one is relative to where the run started."""
    for name in ("data", "eval_data"):
        value = getattr(cfg, name, "")
        looks_local = value.startswith(".") or value.count("/") != 1 or bool(Path(value).suffix)  # not a hub name
        if cfg.resume and value and looks_local and not Path(value).is_absolute() and not Path(value).exists():
            raise TrainingError(f"{value}: file not found (--{name.replace('_', '-')} in {output_dir}/config.yaml is "
                                f"relative to the directory the run was started from: --resume from there, or pass "
                                f"--{name.replace('_', '-')} PATH)")


def data_summary(source: str, report, n_train: int, n_eval: int, limit: int = 0) -> str:
    """One line at start: what the data report found, and the split actually used."""
    dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(report.dropped.items())) or "none"
    used = f"first {limit} used: " if limit else ""
    notes = "".join(f", {n} {what}" for what, n in sorted(getattr(report, "notes", {}).items()))
    return (f"data {source}: {counted(report.rows_read, 'row')}, {report.kept} kept, dropped: {dropped}, "
            f"{report.truncated} truncated{notes}; {used}{n_train} train / {counted(n_eval, 'eval pair')}")


def build_policy(cfg, run: Run):
    model = load_model(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora:
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
    # FSDP and DeepSpeed place (and shard) the weights in `prepare`: a full copy on one device
    # first would not fit for the models they are used for.
    if not distributed.is_sharded(run.accelerator):
        model = model.to(run.device)  # a GPU copy leaves the checkpoint file's pages behind
        if run.device.type == "cpu":
            own_weights(model)  # on CPU they would be written in place: see models.own_weights
    if run.bf16:  # fp32 master weights on bf16 values: see models.round_to_bf16 (ties amplify small updates)
        round_to_bf16(model)
    return model.train()


def build_reference(cfg: TrainConfig, run: Run):
    """None (reference-free), "adapter" (LoRA base), "initial" (the policy itself before its
    first step, for --precompute-ref: no second copy is loaded) or a frozen model."""
    if not needs_reference(cfg.loss):
        return None
    if cfg.ref_model:
        return _frozen(cfg.ref_model, cfg, run)
    if cfg.lora:
        return ref.ADAPTER
    return ref.INITIAL if cfg.precompute_ref else _frozen(cfg.model, cfg, run)


def finish_reference(cfg: TrainConfig, run: Run, policy, reference, pairs):
    """Once Accelerate has prepared the policy (and before a resume loads trained weights):
    place a frozen model, and with --precompute-ref turn the reference into the cached (N, 2)
    tensor, each process computing its share with the prepared, possibly sharded, models."""
    acc = run.accelerator
    if isinstance(reference, torch.nn.Module):
        reference = distributed.prepare_frozen(reference, acc)
    if reference is None or not cfg.precompute_ref:
        return reference
    source = policy if ref.kind(reference) == "initial" else reference
    identity = ref.model_identity(resolve_model_path(cfg.ref_model or cfg.model)) + f";bf16={run.bf16};mp={acc.mixed_precision}"
    path = cache_dir() / "reference" / f"{ref.fingerprint(pairs, identity, cfg.packing)}.safetensors"
    compute = lambda: ref.compute_all(  # noqa: E731
        policy, source, pairs, cfg.eval_batch_size, run.tokenizer.pad_token_id, Layout.from_config(cfg), run.device, run.autocast,
        acc.process_index, acc.num_processes,
    )
    policy.eval()
    try:
        return ref.cached(path, compute, acc)  # a frozen reference model is dropped: memory freed
    finally:
        policy.train()


def _frozen(path: str, cfg, run: Run):
    if path != cfg.model and not same_tokenizer(run.tokenizer, load_tokenizer(path, cfg.trust_remote_code)):
        raise TrainingError(f"reference model {path} uses a different tokenizer than the policy {cfg.model}")
    with distributed.full_copy_loading():
        model = load_model(path, trust_remote_code=cfg.trust_remote_code).eval()
    model.requires_grad_(False)
    return model  # placed on its device by `finish_reference`, once the launch is known


# ----------------------------------------------------------------------------- the loop
def fit(run: Run, model, train_idx: list[int], eval_idx: list[int], objective, make_batch, on_prepared=None,
        on_step=None) -> dict:
    cfg, acc = run.cfg, run.accelerator
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    steps_per_epoch = len(train_idx) // per_step
    if steps_per_epoch == 0:
        raise TrainingError(f"{counted(len(train_idx), 'training pair')} is fewer than one step's {per_step} "
                            "(batch_size x grad_accum x processes)")
    total = cfg.max_steps or math.ceil(cfg.epochs * steps_per_epoch)
    optimizer, scheduler = make_optimizer(cfg, model, total)
    safety.prepare_output(run, model, total)
    distributed.configure_deepspeed(acc, cfg.batch_size, cfg.grad_accum, cfg.max_grad_norm)
    model, optimizer = acc.prepare(model, optimizer)
    if on_prepared is not None:
        on_prepared(model)
    counters = {"step": 0, "bad_steps": 0, "global_batch": per_step}
    if cfg.resume and (last := distributed.main_decides(acc, lambda: checkpoint.latest(run.output_dir))):
        counters = resume(last, model, optimizer, scheduler, acc, counters)
        if on_step is not None:  # e.g. TR-DPO restores the reference synchronised before this step
            on_step(model, counters["step"], resumed=True)
    if counters["step"] >= total and (run.output_dir / "final").exists():  # --resume of a finished run
        return _nothing_to_do(run, counters, total)
    record_config(run)
    logger = MetricsLogger(run.output_dir, total, counters["step"], acc.is_main_process, cfg.progress)
    stop = safety.GracefulStop().install()  # SIGINT/SIGTERM: save at the next step boundary
    try:
        if counters.pop("eval_due", None) == counters["step"] and counters["step"] < total:
            logger.log(counters["step"], evaluate(run, model, eval_idx, objective, make_batch), "eval")
        while counters["step"] < total:
            step = counters["step"]
            indices = step_indices(train_idx, step, steps_per_epoch, per_step, cfg.seed)
            start = time.perf_counter()
            stats = train_step(run, model, optimizer, scheduler, indices, objective, make_batch, counters)
            counters["step"] = step + 1
            if on_step is not None:
                on_step(model, counters["step"])
            stats = finish_stats(stats, time.perf_counter() - start, acc)
            if counters["step"] % cfg.log_every == 0 or counters["step"] == total:
                logger.log(counters["step"], stats)
            if eval_idx and cfg.eval_every and counters["step"] % cfg.eval_every == 0 and counters["step"] < total:
                if (result := evaluate(run, model, eval_idx, objective, make_batch, stop)) is not None:
                    logger.log(counters["step"], result, "eval")
                else:  # stopped by a signal: the resumed run evaluates this step first
                    counters["eval_due"] = counters["step"]
            if cfg.save_every and counters["step"] % cfg.save_every == 0 and counters["step"] < total:
                save_checkpoint(run, model, optimizer, scheduler, counters)
            if stop.requested(acc):
                save_checkpoint(run, model, optimizer, scheduler, counters)
                raise stop.interrupted(counters["step"], run.output_dir, acc)
        if eval_idx and (result := evaluate(run, model, eval_idx, objective, make_batch, stop)) is not None:
            logger.log(counters["step"], result, "eval")
        stopped = stop.requested(acc)  # a signal in the final evaluation: save everything, then stop
        if cfg.final_checkpoint or stopped:
            save_checkpoint(run, model, optimizer, scheduler, counters)
        save_final(run, model, counters["step"])
        if stopped:
            raise stop.interrupted(counters["step"], run.output_dir, acc)
    finally:
        stop.restore()
        logger.close()
        torch.set_flush_denormal(False)  # process-wide: a Python caller's own arithmetic after train() is its own
    logger.summary(f"dpolab {type(cfg).__name__.replace('Config', '').lower()}: {run.output_dir}")
    return {"output_dir": str(run.output_dir), "steps": counters["step"], "bad_steps": counters["bad_steps"], "history": logger.history}


def _nothing_to_do(run: Run, counters: dict, total: int) -> dict:
    """A resumed run that already made its steps: say so, and leave config, metrics and final/ as they are."""
    run.accelerator.print(f"{run.output_dir} already finished at step {counters['step']} of {total}: nothing to do "
                          "(raise --max-steps or --epochs to train it further)")
    torch.set_flush_denormal(False)
    return {"output_dir": str(run.output_dir), "steps": counters["step"], "bad_steps": counters["bad_steps"], "history": []}


def step_indices(train_idx: list[int], step: int, steps_per_epoch: int, per_step: int, seed: int) -> list[int]:
    """The pairs of optimizer step `step`: a fixed function of (seed, step), so resume is exact.

    Each epoch is a fresh permutation; the `len % per_step` pairs left over are different
    ones every epoch (reshuffled), as with a drop-last data loader.
    """
    epoch, k = divmod(step, steps_per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(len(train_idx), generator=g)[k * per_step : (k + 1) * per_step]
    return [train_idx[i] for i in perm.tolist()]


def make_optimizer(cfg, model, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel updates every tensor in one pass: on CPU several times faster than the
    # per-tensor loop (seconds per step for 135M parameters), the same update up to rounding.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    warmup = int(cfg.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup"}.get(cfg.scheduler, cfg.scheduler)
    scheduler = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)
    return optimizer, scheduler


def train_step(run: Run, model, optimizer, scheduler, indices, objective, make_batch, counters) -> dict:
    """One optimizer step over grad_accum micro-batches of this process's share of `indices`."""
    cfg, acc = run.cfg, run.accelerator
    collected: dict[str, list] = {}
    tokens = 0
    for micro in range(cfg.grad_accum):
        # micro-batch j of process r: the r-th slice of the j-th (batch_size x processes) block
        base = (micro * acc.num_processes + acc.process_index) * cfg.batch_size
        batch = make_batch(indices[base : base + cfg.batch_size])
        tokens += batch_tokens(batch)
        with acc.accumulate(model):
            with run.autocast():
                losses, stats = objective(model, batch)
            # mean over the micro-batch; Accelerate divides by grad_accum and DDP averages
            # processes, so the gradient is the mean over every pair of the step.
            acc.backward(losses.mean())
            for k, v in stats.items():
                collected.setdefault(k, []).append(v.float())
            if acc.sync_gradients:
                norm = clip_gradients(acc, model, optimizer, cfg.max_grad_norm)
                # DeepSpeed clips inside its engine and may report no norm (None): nothing to check
                grad_norm = torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32)
                bad_loss = float(not all(bool(torch.isfinite(v).all()) for v in collected["loss"]))
                # one decision for all processes: a rank skipping alone would desynchronise the weights
                bad_loss = float(acc.reduce(torch.tensor([bad_loss], device=acc.device), "sum"))
                finite = (norm is None or bool(torch.isfinite(grad_norm))) and bad_loss == 0
                if finite:
                    optimizer.step()
                else:
                    _bad_step(run, counters, indices)
                vars(getattr(optimizer, "optimizer", optimizer)).pop("grad_scale", None)  # this step's clip only
                lr = scheduler.get_last_lr()[0]  # the rate this step used (read before the schedule moves on)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
    out = {k: torch.cat(v) for k, v in collected.items()}
    out["grad_norm"] = grad_norm.detach().float().reshape(1)
    out["_tokens"] = torch.tensor([float(tokens)])
    out["_lr"] = torch.tensor([lr])
    return out


def clip_gradients(acc, model, optimizer, max_norm: float | None):
    """Clip the gradients' total norm to `max_norm` (None or 0: no clipping); returns the norm before
    clipping (None: DeepSpeed's engine clips and reports none).

    In a single-process or DDP run with a fused AdamW the clip factor goes into the optimizer's own
    pass over the gradients, as the divisor `grad_scale` (the hook torch's GradScaler uses), instead
    of a separate multiply over every gradient: 28 ms of a 1.5 s bf16 CPU step on the default model
    (docs/performance.md). The update is the same up to rounding; the caller removes the attribute
    after the step.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    folds = (max_norm and inner.defaults.get("fused") and acc.scaler is None
             and acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU))
    if not folds:
        return acc.clip_grad_norm_(model.parameters(), max_norm or float("inf"))
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    factor = max_norm / (float(norm) + 1e-6)  # as torch.nn.utils.clip_grad_norm_
    if factor < 1.0:  # NaN (a non-finite norm) is not: that step is skipped
        inner.grad_scale = torch.tensor(1.0 / factor, dtype=torch.float32, device=norm.device)
    return norm


def _bad_step(run: Run, counters: dict, indices) -> None:
    counters["bad_steps"] += 1
    # Name the data rows (1-based, as in the data report), which the user can look up in the file.
    rows = f"rows {sorted(run.pair_rows[i] for i in indices)} of {run.cfg.data}" if run.pair_rows else f"pairs {sorted(indices)}"
    if counters["bad_steps"] > run.cfg.max_bad_steps:
        raise TrainingError(
            f"{counted(counters['bad_steps'], 'step')} had a non-finite loss or gradient (limit --max-bad-steps "
            f"{run.cfg.max_bad_steps}); last at step {counters['step'] + 1}, {rows}"
        )
    run.accelerator.print(f"warning: non-finite loss or gradient at step {counters['step'] + 1}; step skipped ({rows})")


def finish_stats(stats: dict, seconds: float, acc) -> dict:
    """Per-example tensors -> means over all processes, plus throughput and the lr the step used."""
    out = reduce_means(stats, acc, skip=("grad_norm", "_tokens", "_lr"))
    out["grad_norm"] = float(acc.reduce(stats["grad_norm"].to(acc.device), "mean"))
    pairs = float(acc.reduce(torch.tensor([float(len(stats["loss"]))], device=acc.device), "sum"))
    tokens = float(acc.reduce(stats["_tokens"].to(acc.device), "sum"))
    out.update({"lr": float(stats["_lr"][0]), "pairs/s": pairs / seconds, "tokens/s": tokens / seconds})
    return out


def reduce_means(stats: dict, acc, skip=()) -> dict:
    """Exact means across processes: sums and counts are reduced, not per-process means."""
    out = {}
    for k, v in stats.items():
        if k in skip:
            continue
        sums = torch.tensor([float(v.sum()), float(v.numel())], dtype=torch.float64, device=acc.device)
        total, count = acc.reduce(sums, "sum").tolist()
        out[k] = total / max(count, 1.0)
    return out


@torch.no_grad()
def evaluate(run: Run, model, eval_idx: list[int], objective, make_batch, stop=None) -> dict | None:
    """Loss and implicit-reward metrics on held-out pairs; each process takes every n-th batch.

    With `stop` (a `safety.GracefulStop`), a SIGINT/SIGTERM ends the evaluation after the batch
    in progress and returns None, so the caller saves the weights within seconds.

    Every process runs the same number of forwards (FSDP / ZeRO-3 gather weights inside
    forward); a padding round's results are dropped but its (empty) keys kept, so every
    process reduces the same metrics.
    """
    acc, size = run.accelerator, run.cfg.eval_batch_size
    model.eval()
    collected: dict[str, list] = {}
    batches = [eval_idx[i : i + size] for i in range(0, len(eval_idx), size)]
    for chunk, keep in distributed.rounds(batches, acc.process_index, acc.num_processes):
        if stop is not None and stop.requested(acc):  # every process checks once per round: no hang
            model.train()
            return None
        with run.autocast():
            _, stats = objective(model, make_batch(chunk))
        for k, v in stats.items():
            collected.setdefault(k, []).append(v.float() if keep else v.float()[:0])
    model.train()
    stats = {k: torch.cat(v) for k, v in collected.items()} or {"loss": torch.zeros(0)}
    return reduce_means(stats, acc)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run, model, optimizer, scheduler, counters: dict) -> None:
    checkpoint.save(run.output_dir, counters["step"], model, run.tokenizer, optimizer, scheduler, dict(counters), run.accelerator)
    if run.accelerator.is_main_process:
        checkpoint.prune(run.output_dir, run.cfg.keep_last)


def resume(path: Path, model, optimizer, scheduler, acc, counters: dict) -> dict:
    """Every process loads the same checkpoint (on several machines output_dir must be shared)."""
    state = checkpoint.load_state(path)
    saved = state["counters"].get("global_batch", counters["global_batch"])
    if saved != counters["global_batch"]:
        raise TrainingError(
            f"{path} was trained with {saved} pairs per step but this launch takes {counters['global_batch']} "
            "(batch_size x grad_accum x processes): relaunch with the same global batch to continue it"
        )
    if bool(state.get("sharded")) != distributed.is_sharded(acc):
        kind = "an FSDP/DeepSpeed" if state.get("sharded") else "a single-process/DDP"
        raise TrainingError(f"{path} was written by {kind} run: resume it with the same kind of launch")
    if state.get("sharded"):
        acc.load_state(str(path / checkpoint.SHARDS))  # each rank's weight and optimizer shards
    else:
        checkpoint.load_weights(acc.unwrap_model(model), path)
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    checkpoint.restore_rng(state)
    acc.print(f"resumed from {path} at step {state['step']}")
    return {**counters, **state["counters"]}


def save_final(run: Run, model, step: int) -> None:
    """The trained model in HF format at <output_dir>/final (and merged weights with --merge-lora)."""
    acc = run.accelerator
    weights = acc.get_state_dict(model)  # consolidated: FSDP / ZeRO shards gathered onto rank 0
    if acc.is_main_process:
        unwrapped = acc.unwrap_model(model)
        checkpoint.save_model(unwrapped, run.tokenizer, run.output_dir / "final", weights, step=step)
        if getattr(run.cfg, "merge_lora", False) and hasattr(unwrapped, "merge_and_unload"):
            checkpoint.save_model(_merged(unwrapped, run), run.tokenizer, run.output_dir / "merged")
    acc.wait_for_everyone()  # other ranks may read final/ next (--sft-first)


def _merged(unwrapped, run: Run):
    """The LoRA policy merged into its base. Sharded weights cannot be merged in place, so a
    sharded run rebuilds the model from the consolidated final/ on CPU."""
    if distributed.is_sharded(run.accelerator):
        return load_model(str(run.output_dir / "final"), trust_remote_code=run.cfg.trust_remote_code).merge_and_unload()
    return copy.deepcopy(unwrapped).merge_and_unload()


class _CallableModule(type(contextlib)):
    """`dpolab.train(...)` is the API function, but importing this module makes the attribute
    `dpolab.train` this module: calling the module calls `train`, so both work in any order."""

    def __call__(self, cfg: TrainConfig | None = None, **overrides) -> dict:
        return train(cfg, **overrides)


import sys as _sys  # noqa: E402

_sys.modules[__name__].__class__ = _CallableModule

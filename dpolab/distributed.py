"""The few places where a multi-process run differs: launch checks, equal shares, rank 0 decides.

dpolab never starts processes itself: `accelerate launch` (DDP, FSDP, DeepSpeed ZeRO, several
machines) or `torchrun` start one process per device, and the trainer in `train.py` runs
unchanged in each. What it needs from this module:

- `check_launch` / `configure_deepspeed`: settings that cannot work fail at start-up with one
  line, not hours later (DeepSpeed chosen but not installed; a DeepSpeed config that disagrees
  with --batch-size / --grad-accum); DeepSpeed's "auto" values are filled from dpolab's flags.
- `rounds`: each process's share of a list of batches, padded so every process runs the SAME
  number of forwards. FSDP and ZeRO-3 all-gather the weights inside forward: a process that
  stopped one batch early would leave the others waiting forever.
- `main_decides`: rank 0 looks at the file system and every rank acts on its answer, so all
  ranks take the same branch even when their views of a shared folder differ for a moment.
- `prepare_frozen`: a separate frozen reference model under ZeRO-3 needs its own engine.

Kept free of heavy imports at module top (torch only), like the rest of the core.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import os

import torch
from accelerate.utils import broadcast_object_list


class LaunchError(ValueError):
    """A launch setting that cannot work (one clear line for the user)."""


def use_cpu(device: str) -> bool:
    """Whether Accelerate must run on CPU. 'auto' without a CUDA GPU means CPU: without the flag,
    `torchrun` on a CPU-only machine would start N independent single-process runs that all
    write to the same output folder, instead of one run over N processes (gloo)."""
    return device == "cpu" or (device == "auto" and not torch.cuda.is_available())


def check_launch() -> None:
    """Fail before Accelerate starts when the launch asks for something that is not installed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and importlib.util.find_spec("deepspeed") is None:
        raise LaunchError(
            "this launch uses DeepSpeed (an accelerate config with distributed_type: DEEPSPEED) but the "
            "deepspeed package is not installed: pip install deepspeed, or launch with the ddp/fsdp config"
        )


def check_accumulation(acc, grad_accum: int) -> None:
    """An accelerate config may set gradient_accumulation_steps, which Accelerate then prefers to
    the value dpolab passes; the loop would run --grad-accum micro-batches per step but
    synchronise on another count. dpolab's flag decides: refuse a different value."""
    if acc.gradient_accumulation_steps != grad_accum:
        raise LaunchError(
            f"the accelerate config sets gradient_accumulation_steps={acc.gradient_accumulation_steps} but "
            f"--grad-accum is {grad_accum}: remove it from the config (dpolab's --grad-accum decides)"
        )


def _kind(acc) -> str:
    return str(getattr(acc.distributed_type, "value", acc.distributed_type))  # e.g. "FSDP"


def is_deepspeed(acc) -> bool:
    return _kind(acc) == "DEEPSPEED"


def is_sharded(acc) -> bool:
    """Weights or optimizer state split across processes (FSDP, DeepSpeed ZeRO): checkpoints then
    also hold Accelerate's per-rank state, and the model is not moved to the device by hand."""
    return _kind(acc) in ("DEEPSPEED", "FSDP")


def configure_deepspeed(acc, batch_size: int, grad_accum: int, max_grad_norm: float) -> None:
    """Fill the DeepSpeed config's "auto" values from dpolab's flags; refuse values that disagree.

    dpolab feeds batches itself (no DataLoader goes through `prepare`), so Accelerate cannot
    infer the micro-batch size and would stop with an error unless it is filled in here.
    """
    if not is_deepspeed(acc):
        return
    conf = acc.state.deepspeed_plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": (batch_size, "--batch-size"),
        "gradient_accumulation_steps": (grad_accum, "--grad-accum"),
        "train_batch_size": (batch_size * grad_accum * acc.num_processes, "--batch-size x --grad-accum x processes"),
    }
    for key, (value, flag) in wanted.items():
        given = conf.get(key, "auto")
        if given == "auto":
            conf[key] = value
        elif int(given) != value:
            raise LaunchError(f"the DeepSpeed config sets {key}={given} but {flag} is {value}: set it to \"auto\" or make them equal")
    if conf.get("gradient_clipping", "auto") == "auto":
        conf["gradient_clipping"] = max_grad_norm
    # Checkpoints always hold consolidated weights; under ZeRO-3 the engine must gather them.
    conf.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def rounds(items: list, rank: int, world: int) -> list[tuple[object, bool]]:
    """This process's share of `items` (every world-th, from rank) as (item, keep) pairs.

    Every process gets ceil(len / world) rounds; a process whose share is shorter repeats
    items[0] with keep=False and must discard that result.

    >>> rounds([10, 11, 12], 1, 2)
    [(11, True), (10, False)]
    """
    mine = items[rank::world]
    total = math.ceil(len(items) / world)
    return [(mine[i], True) if i < len(mine) else (items[0], False) for i in range(total)]


def main_decides(acc, decide):
    """Run `decide()` on rank 0 only and return its (picklable) answer on every rank."""
    answer = [decide() if acc.is_main_process else None]
    if acc.num_processes > 1:
        broadcast_object_list(answer, from_process=0)
    return answer[0]


@contextlib.contextmanager
def full_copy_loading():
    """Load a model fully on every rank even when FSDP's cpu_ram_efficient_loading is on (that
    setting leaves ranks > 0 with empty weights, filled only when FSDP wraps the model; a frozen
    reference is never wrapped)."""
    saved = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
        else:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = saved


def prepare_frozen(model, acc):
    """Place a frozen (never trained) reference model for the current launch.

    Under ZeRO-3 transformers loads its weights already partitioned, so only a DeepSpeed
    engine can run it: one is built from the training config without optimizer or scheduler.
    Everywhere else each process holds a full copy on its device.
    """
    conf = acc.state.deepspeed_plugin.deepspeed_config if is_deepspeed(acc) else {}
    if conf.get("zero_optimization", {}).get("stage") != 3:
        return model.to(acc.device).eval()
    import deepspeed  # why: an optional extra, installed only for DeepSpeed launches

    conf = {k: v for k, v in copy.deepcopy(conf).items() if k not in ("optimizer", "scheduler")}
    engine, *_ = deepspeed.initialize(model=model, config=conf)
    return engine.eval()

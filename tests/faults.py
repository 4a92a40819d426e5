"""Fault injection for the crash tests: run `dpolab` commands in forked children, kill them at
chosen moments, and report how each ended.

    python tests/faults.py PLAN.json RESULT.json

PLAN = {"logs": folder, "scenarios": {name: [run, ...]}}; the runs of a scenario go one after
the other (each resumes what the previous one left). A run is
    {"argv": ["train", ...],                     the `dpolab` command line
     "fault": "POINT:N[:ACTION]" or null,         injected inside the child (below)
     "kill_after": {"metrics": "path", "lines": L, "delay": s} or null}
                                                  SIGKILL from outside, `delay` seconds after the
                                                  run has added L lines to its metrics.jsonl
RESULT = {name: [{"exit": code, "log": path}, ...]}; `exit` is negative for a signal (-9: SIGKILL).

POINT is where the N-th event of this process triggers ACTION (SIGKILL by default, or SIGTERM /
SIGINT, which the child then handles):
    step_before / step_after   the N-th optimizer step, before / after it updates the weights
    weights_written            after the N-th safetensors weights file is written (checkpoint or final)
    state_partial              the N-th training_state.pt: half of its bytes written, then the kill
    rename_before / _after     around the N-th rename that puts a checkpoint or final folder in place
    prune_partial              the N-th deletion of a pruned checkpoint, after one file is deleted

Faults are injected at the boundary the code under test calls (torch's global optimizer hooks,
the safetensors writer transformers uses, torch.save, os.replace, shutil.rmtree), so dpolab's own
code runs unmodified. Children are forked from this process after the heavy imports, which makes
a run cost about a second instead of a fresh interpreter's several; nothing touches torch in the
parent before forking.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

_PLACED = re.compile(r"^(checkpoint-\d+|final)$")


class Trigger:
    def __init__(self, n: int, action: str):
        self.n, self.action, self.count = n, action, 0

    def due(self) -> bool:
        """Whether the next event is the N-th."""
        return self.count + 1 == self.n

    def tick(self) -> bool:
        """Count one event; on the N-th, perform the action (a SIGKILL never returns)."""
        self.count += 1
        if self.count != self.n:
            return False
        if self.action == "SIGKILL":
            sys.stdout.flush()
            sys.stderr.flush()
        os.kill(os.getpid(), getattr(signal, self.action))
        return True


def install(fault: str) -> None:
    point, n, *rest = fault.split(":")
    trigger = Trigger(int(n), rest[0] if rest else "SIGKILL")
    if point in ("step_before", "step_after"):
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        register = register_optimizer_step_pre_hook if point == "step_before" else register_optimizer_step_post_hook
        def hook(*args):
            trigger.tick()  # returns None: the hook leaves the step's arguments alone

        register(hook)
    elif point == "weights_written":
        import transformers.modeling_utils as mu

        real_save_file = mu.safe_save_file

        def save_file(*args, **kwargs):
            real_save_file(*args, **kwargs)
            trigger.tick()

        mu.safe_save_file = save_file
    elif point == "state_partial":
        _install_partial_state(trigger)
    elif point in ("rename_before", "rename_after"):
        _install_rename(trigger, point)
    elif point == "prune_partial":
        _install_prune(trigger)
    else:
        raise ValueError(f"unknown fault point {point}")


def _install_partial_state(trigger: Trigger) -> None:
    import torch

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if Path(str(f)).name == "training_state.pt" and trigger.due():
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            with open(f, "wb") as out:
                out.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            trigger.tick()  # the kill
        if Path(str(f)).name == "training_state.pt":
            trigger.tick()  # an earlier state file: only counted
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def _install_rename(trigger: Trigger, point: str) -> None:
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        placed = bool(_PLACED.match(Path(str(dst)).name))
        if placed and point == "rename_before":
            trigger.tick()
        real_replace(src, dst, *args, **kwargs)
        if placed and point == "rename_after":
            trigger.tick()

    os.replace = replace


def _install_prune(trigger: Trigger) -> None:
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if ".deleting-" in Path(str(path)).name:
            if trigger.due():
                files = sorted(p for p in Path(path).iterdir() if p.is_file())
                files[0].unlink()  # half-way through deleting it
            trigger.tick()
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree


def child(run: dict, log: Path) -> None:
    """Body of a forked child: redirect output, install the fault, run the command, exit."""
    code = 99
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if run.get("fault"):
            install(run["fault"])
        from dpolab.cli import main

        code = main(run["argv"])
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def run_one(run: dict, log: Path) -> int:
    kill = run.get("kill_after")
    metrics = Path(kill["metrics"]) if kill else None
    start_lines = _line_count(metrics) if kill else 0
    pid = os.fork()
    if pid == 0:
        child(run, log)
    if kill:
        while _line_count(metrics) < start_lines + kill["lines"]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.005)
        time.sleep(kill["delay"])
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def main(plan_path: str, result_path: str) -> None:
    # Heavy imports once, before forking: every child then starts in about a second.
    import accelerate  # noqa: F401
    import torch.utils.tensorboard  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import dpolab.cli  # noqa: F401
    import dpolab.train  # noqa: F401

    plan = json.loads(Path(plan_path).read_text())
    logs = Path(plan["logs"])
    logs.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    for name, runs in plan["scenarios"].items():
        results[name] = []
        for i, run in enumerate(runs):
            log = logs / f"{name}-{i}.log"
            results[name].append({"exit": run_one(run, log), "log": str(log)})
    Path(result_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])

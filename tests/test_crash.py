"""Crash safety: `dpolab train` killed at many moments, resumed with --resume, ends bit-identical
to an uninterrupted run; SIGTERM / SIGINT save a checkpoint before exiting.

One driver process (tests/faults.py) imports torch once and forks a child per `dpolab train`
run; faults are injected at library boundaries inside the child (see its docstring) or sent
from outside. One more run is a fresh `python -m dpolab.cli` process stopped by a real SIGTERM.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, write_toy_pairs

pytestmark = pytest.mark.slow  # about a minute of subprocess work on 2 cores; still run by `make test`

STEPS, KEEP = 8, 2
# Each run of the chain resumes what the previous one left; see tests/faults.py for the points.
CHAIN = [
    ("step_before:3", -9),        # killed inside step 3, after backward, before the update
    ("state_partial:2", -9),      # killed half-way through writing a checkpoint's training state
    ("rename_before:1", -9),      # checkpoint folder complete but not yet renamed into place
    ("weights_written:2", -9),    # only the weights of a checkpoint written
    ("step_before:1:SIGINT", 130),  # Ctrl-C during a step: finish it, save, exit
    ("rename_after:2", -9),       # checkpoint renamed into place, before pruning the oldest
    ("prune_partial:1", -9),      # half-way through deleting a pruned checkpoint
    ("weights_written:1", -9),    # the final model half-written (run already at its last step)
    (None, 0),
]


def _args(model: Path, data: Path, out: Path) -> list[str]:
    return [
        "train", "--model", str(model), "--data", str(data), "--output-dir", str(out), "--bf16", "false",
        "--device", "cpu", "--save-every", "1", "--keep-last", str(KEEP), "--max-steps", str(STEPS),
        "--batch-size", "2", "--grad-accum", "2", "--eval-fraction", "0.1", "--eval-every", "4",
        "--lr", "1e-3", "--seed", "3", "--no-progress", "--final-checkpoint",
    ]


def _env(cache: Path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DPOLAB_CACHE": str(cache),
            "PYTHONPATH": str(REPO)}


def _sigterm_fresh_cli(args: list[str], out: Path, env: dict) -> tuple[int, str]:
    """A fresh `python -m dpolab.cli train` process, sent SIGTERM once it has logged a step."""
    proc = subprocess.Popen([sys.executable, "-m", "dpolab.cli", *args], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


@pytest.fixture(scope="module")
def crash(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("crash")
    data = write_toy_pairs(root / "toy.jsonl", 24)
    env = _env(root / "cache")
    dirs = {name: root / name for name in ("reference", "chain", "random", "cli")}
    args = {name: _args(tiny_model_dir, data, d) for name, d in dirs.items()}
    cli_exit, cli_stderr = _sigterm_fresh_cli(args["cli"], dirs["cli"], env)

    # The "random moments" are reproducible, and short: a step of the tiny model takes a few
    # milliseconds, so a longer delay can let the run finish before the kill lands.
    rng = random.Random(1234)
    resume = ["--resume"]
    kill = lambda lines: {"metrics": str(dirs["random"] / "metrics.jsonl"), "lines": lines, "delay": rng.uniform(0, 0.01)}  # noqa: E731
    scenarios = {
        "reference": [{"argv": args["reference"]}],
        "chain": [{"argv": args["chain"] + (resume if i else []), "fault": fault} for i, (fault, _) in enumerate(CHAIN)],
        "random": [
            {"argv": args["random"], "kill_after": kill(1)},
            {"argv": args["random"] + resume, "fault": "step_after:2:SIGTERM"},
            {"argv": args["random"] + resume, "kill_after": kill(1)},
            {"argv": args["random"] + resume, "fault": "step_after:1"},
            {"argv": args["random"] + resume},
        ],
        "cli": [{"argv": args["cli"] + resume}],
    }
    plan = root / "plan.json"
    plan.write_text(json.dumps({"logs": str(root / "logs"), "scenarios": scenarios}))
    subprocess.run([sys.executable, str(REPO / "tests" / "faults.py"), str(plan), str(root / "result.json")],
                   env=env, cwd=REPO, check=True, timeout=600)
    result = json.loads((root / "result.json").read_text())
    return {"dirs": dirs, "result": result, "cli": (cli_exit, cli_stderr)}


def _log(run: dict) -> str:
    return Path(run["log"]).read_text()


def _assert_same_run(out: Path, reference: Path) -> None:
    """Final weights, the last checkpoint's optimizer/scheduler/counters and every step's logged
    loss are bit-identical to the uninterrupted run; no debris; only the last KEEP checkpoints."""
    final, expected = load_file(str(out / "final" / "model.safetensors")), load_file(str(reference / "final" / "model.safetensors"))
    assert final.keys() == expected.keys()
    for name in expected:
        assert torch.equal(final[name], expected[name]), name
    state = torch.load(out / f"checkpoint-{STEPS}" / "training_state.pt", weights_only=True)
    ref_state = torch.load(reference / f"checkpoint-{STEPS}" / "training_state.pt", weights_only=True)
    assert state["counters"] == ref_state["counters"]
    assert (state["counters"]["step"], state["counters"]["bad_steps"]) == (STEPS, 0)
    assert state["scheduler"] == ref_state["scheduler"]
    for key, moments in ref_state["optimizer"]["state"].items():
        for m in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(state["optimizer"]["state"][key][m], moments[m]), (key, m)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "final"))) == [
        f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}", "final"]
    assert _last_logged(out) == _last_logged(reference)


def _last_logged(out: Path) -> dict:
    """(split, step) -> loss and grad norm of the last record (a resumed run logs redone steps again)."""
    last = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        last[(r["split"], r["step"])] = (r["loss"], r.get("grad_norm"))
    return last


def test_reference_run_completes(crash):
    (run,) = crash["result"]["reference"]
    assert run["exit"] == 0, _log(run)[-3000:]
    assert len([k for k in _last_logged(crash["dirs"]["reference"]) if k[0] == "train"]) == STEPS


def test_kill_chain_resumes_bit_identical(crash):
    """Eight kill points (during steps, checkpoint writes, renames, pruning and the final save)
    plus one Ctrl-C, each followed by --resume: the end state equals the uninterrupted run."""
    runs = crash["result"]["chain"]
    for (fault, expected), run in zip(CHAIN, runs):
        assert run["exit"] == expected, (fault, _log(run)[-3000:])
    assert "SIGINT: stopped after step 5; checkpoint saved in" in _log(runs[4])
    _assert_same_run(crash["dirs"]["chain"], crash["dirs"]["reference"])


def test_random_kills_and_sigterm_resume_bit_identical(crash):
    runs = crash["result"]["random"]
    assert [r["exit"] for r in runs] == [-9, 130, -9, -9, 0], [_log(r)[-3000:] for r in runs]
    assert re.search(r"SIGTERM: stopped after step \d+; checkpoint saved in [^\s;]+/checkpoint-\d+;", _log(runs[1]))
    _assert_same_run(crash["dirs"]["random"], crash["dirs"]["reference"])


def test_sigterm_from_outside_saves_then_resume_is_exact(crash):
    code, stderr = crash["cli"]
    assert code == 130, stderr[-3000:]
    m = re.search(r"SIGTERM: stopped after step (\d+); checkpoint saved in ([^\s;]+)", stderr)
    assert m, stderr[-3000:]
    step, path = int(m.group(1)), Path(m.group(2))
    assert 1 <= step < STEPS
    assert path == crash["dirs"]["cli"] / f"checkpoint-{step}"
    (run,) = crash["result"]["cli"]
    assert run["exit"] == 0, _log(run)[-3000:]
    assert f"resumed from {path} at step {step}" in _log(run)
    _assert_same_run(crash["dirs"]["cli"], crash["dirs"]["reference"])

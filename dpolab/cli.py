"""`dpolab` command line: each command = one typed config + one Python API function.

User errors (bad data, bad options, missing models) end with one line on stderr and exit
code 2, never a traceback; `DPOLAB_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys

from .config import (
    EvalConfig,
    ExperimentConfig,
    GenerateConfig,
    RankConfig,
    ReportConfig,
    ScoreConfig,
    SFTConfig,
    SweepConfig,
    TrainConfig,
    add_arguments,
    resolve,
)
from .errors import TrainingError

from .cli_errors import one_line_errors, unknown_options

# The runners import their command's module when called: `dpolab --help` (and every parse)
# stays light, no torch, since configs and their --help come from config.py alone.
def run_train(cfg):
    from .train import train  # why: torch + transformers, only when training

    return train(cfg)


def run_sft(cfg):
    from .train import sft  # why: as run_train

    return sft(cfg)


def run_score(cfg):
    from .score import score  # why: loads models (torch)

    return score(cfg)


def run_eval(cfg):
    from .evaluate import evaluate  # why: loads models (torch)

    return evaluate(cfg)


def run_rank(cfg):
    from .rank import rank  # why: loads models (torch)

    return rank(cfg)


def run_report(cfg):
    from .report import report  # why: matplotlib, only when a report is drawn

    return report(cfg)


def run_generate(cfg):
    from .generate import generate  # why: loads models (torch)

    return generate(cfg)


def run_experiment(cfg):
    from .experiments.sentiment import run  # why: the whole pipeline (torch, trl)

    return run(cfg)


def run_sweep(cfg):
    from .experiments.sentiment import sweep  # why: as run_experiment

    return sweep(cfg)


# command -> (its config class, the runner of its Python API, one-line help)
COMMANDS = {
    "train": (TrainConfig, run_train, "Train with DPO or another loss of the family."),
    "sft": (SFTConfig, run_sft, "Supervised fine-tuning on prompt + chosen."),
    "score": (ScoreConfig, run_score, "Implicit reward of responses, per response and per token."),
    "eval": (EvalConfig, run_eval, "Preference accuracy; win rate, reward and KL from samples."),
    "rank": (RankConfig, run_rank, "Rank several models on the same pairs or prompts."),
    "report": (ReportConfig, run_report, "Self-contained HTML report of one or more runs."),
    "generate": (GenerateConfig, run_generate, "Sample completions, score them, write preference pairs."),
    "experiment": (ExperimentConfig, run_experiment, "The paper's controlled-sentiment experiment."),
    "sweep": (SweepConfig, run_sweep, "The experiment pipeline over a grid of one config field."),
}


def version_line() -> str:
    """dpolab's version and the libraries results depend on, read from package metadata (no torch import)."""
    from importlib import metadata

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "transformers", "peft", "accelerate"))
    return f"dpolab {installed('dpolab')} ({libraries}; Python {sys.version.split()[0]})"


class _PrintVersion(argparse.Action):
    """`--version`: the metadata is read only when asked for (argparse's own action takes the text
    up front, ~35 ms of package-metadata scans added to every command's start)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_line())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpolab", description="Direct Preference Optimization and its family.", allow_abbrev=False)
    parser.add_argument("--version", action=_PrintVersion, nargs=0, help="print the versions of dpolab and its libraries and exit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        # allow_abbrev=False: `--los` must be an error, not silently `--loss`
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip(), allow_abbrev=False)
        add_arguments(p, cls)
    one_line_errors(parser, sub.choices)
    return parser


# What ends as one line and exit code 2: data.DataError and models.ModelError are ValueErrors,
# FileNotFoundError and PermissionError are OSErrors.
USER_ERRORS = (ValueError, TrainingError, OSError)


def quiet_libraries() -> None:
    """Our errors are one line: the hub client's own network warnings would add a second. In a
    log file (not a terminal) the libraries' progress bars are noise between our step lines."""
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub is imported
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as transformers_logging  # why: transformers imports torch

        transformers_logging.disable_progress_bar()


# glibc serves every large block with a fresh mmap and hands it back on free (and trims the heap's
# free top): a training step's large tensors (logits, their gradient, the LM head's copies) were
# faulted in and zeroed by the kernel again every step, ~125 k page faults and 0.2 CPU-s of kernel
# time per standard-case step on CPU. Thresholds above any tensor keep freed memory in the process
# for the next step: 4-8% more training pairs/s at 0.1-0.4 GB more peak RSS (docs/performance.md, "Memory reuse").
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"


def malloc_env(env: dict, system: str, libc: str) -> dict | None:
    """The environment to restart the `dpolab` command in with MALLOC_TUNABLES, or None: not glibc
    Linux, already set (the restarted process), or switched off with DPOLAB_SYSTEM_MALLOC=1."""
    tunables = env.get("GLIBC_TUNABLES", "")
    if system != "Linux" or libc != "glibc" or "glibc.malloc.mmap_threshold" in tunables or env.get("DPOLAB_SYSTEM_MALLOC") == "1":
        return None
    return {**env, "GLIBC_TUNABLES": ":".join(t for t in (tunables, MALLOC_TUNABLES) if t)}


def entry() -> int:
    """The `dpolab` program (and `python -m dpolab`): `main` in a process with MALLOC_TUNABLES.

    glibc reads its tunables only at process start, so the first process replaces itself (same
    pid, arguments, streams) before torch is loaded; `main` itself stays callable in-process.
    """
    env = malloc_env(dict(os.environ), platform.system(), platform.libc_ver()[0])
    if env is not None and sys.executable:  # an embedded interpreter has no executable to restart
        os.execve(sys.executable, [sys.executable, "-m", "dpolab", *sys.argv[1:]], env)
    return main()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # unknown options: one line naming the command (cli_errors)
    if extra:
        unknown_options(parser.commands[args.command], extra)
    cls, runner, _ = COMMANDS[args.command]
    quiet_libraries()
    try:
        runner(resolve(cls, args))
    except KeyboardInterrupt as e:
        if not hasattr(e, "checkpoint_dir"):  # safety.Interrupted already said where its checkpoint is
            print("dpolab: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        if os.environ.get("DPOLAB_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dpolab {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(entry())

"""`dpolab` command line: each command = one typed config + one Python API function.

User errors (bad data, bad options, missing models) end with one line on stderr and exit
code 2, never a traceback; `DPOLAB_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

import importlib

from .cli_errors import one_line_errors, unknown_options
from .config import add_arguments, resolve

# command -> ("module:ConfigClass", "module:function" of the API it runs, one-line help).
# Config modules must import light (no torch at module top): --help imports them all.
COMMANDS = {
    "train": ("dpolab.config:TrainConfig", "dpolab.train:train", "Train with DPO or another loss of the family."),
    "sft": ("dpolab.config:SFTConfig", "dpolab.train:sft", "Supervised fine-tuning on prompt + chosen."),
    "score": ("dpolab.score:ScoreConfig", "dpolab.score:score", "Implicit reward of responses, per response and per token."),
    "eval": ("dpolab.evaluate:EvalConfig", "dpolab.evaluate:evaluate", "Preference accuracy; win rate, reward and KL from samples."),
    "rank": ("dpolab.rank:RankConfig", "dpolab.rank:rank", "Rank several models on the same pairs or prompts."),
    "report": ("dpolab.report:ReportConfig", "dpolab.report:report", "Self-contained HTML report of one or more runs."),
    "generate": ("dpolab.generate:GenerateConfig", "dpolab.generate:generate", "Sample completions, score them, write preference pairs."),
    "experiment": ("dpolab.experiments.sentiment:ExperimentConfig", "dpolab.experiments.sentiment:run", "The paper's controlled-sentiment experiment."),
    "sweep": ("dpolab.experiments.sentiment:SweepConfig", "dpolab.experiments.sentiment:sweep", "The experiment pipeline over a grid of one config field."),
}


def _resolve_name(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def available() -> dict:
    """Commands whose modules exist in this install (later issues add theirs)."""
    out = {}
    for name, (cfg_spec, target, help_text) in COMMANDS.items():
        try:
            out[name] = (_resolve_name(cfg_spec), target, help_text)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("dpolab"):
                raise
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpolab", description="Direct Preference Optimization and its family.", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in available().items():
        # allow_abbrev=False: `--los` must be an error, not silently `--loss`
        p = sub.add_parser(name, help=help_text, description=(cls.__doc__ or help_text).strip(), allow_abbrev=False)
        add_arguments(p, cls)
    one_line_errors(parser, sub.choices)
    return parser


def user_errors() -> tuple[type, ...]:
    from .data.files import DataError
    from .models import ModelError
    from .errors import TrainingError

    return (DataError, ModelError, TrainingError, ValueError, FileNotFoundError, PermissionError, OSError)


def quiet_libraries() -> None:
    """Our errors are one line: the hub client's own network warnings would add a second. In a
    log file (not a terminal) the libraries' progress bars are noise between our step lines."""
    import logging

    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # read when huggingface_hub is imported
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # unknown options: one line naming the command (cli_errors)
    if extra:
        unknown_options(parser.commands[args.command], extra)
    cls, target, _ = available()[args.command]
    quiet_libraries()
    try:
        cfg = resolve(cls, args)
        _resolve_name(target)(cfg)
    except KeyboardInterrupt as e:
        if not hasattr(e, "checkpoint_dir"):  # safety.Interrupted already said where its checkpoint is
            print("dpolab: interrupted", file=sys.stderr)
        return 130
    except user_errors() as e:
        if os.environ.get("DPOLAB_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"dpolab {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

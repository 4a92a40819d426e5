"""dpolab: Direct Preference Optimization and its family, from preference pairs to a report.

Python API (mirrors the CLI; keyword arguments are the CLI options with underscores):

    import dpolab
    dpolab.train(data="pairs.jsonl", loss="sigmoid", beta=0.1, output_dir="runs/dpo")
    dpolab.sft(data="pairs.jsonl", output_dir="runs/sft")
"""

__version__ = "0.1.0"


def train(cfg=None, **overrides):
    """DPO-family training; see `dpolab train --help` for every option."""
    from .train import train as _train  # why: `import dpolab.config` runs this file; it must not import torch

    return _train(cfg, **overrides)


def sft(cfg=None, **overrides):
    """Supervised fine-tuning on prompt + chosen; see `dpolab sft --help`."""
    from .train import sft as _sft  # why: as above

    return _sft(cfg, **overrides)

"""Errors a run reports to the user as one line (the CLI prints them without a traceback).

Their own module so that any part of a run (train.py, safety.py, checkpoint.py) can raise
them without importing the training loop.
"""


class TrainingError(RuntimeError):
    """A run cannot continue (one clear line for the user)."""


class ModelError(ValueError):
    """A user-facing problem with a model path, hub id or tokenizer (one line)."""

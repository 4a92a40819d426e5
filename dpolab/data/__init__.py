"""Data layer: file -> raw rows (files) -> normalised examples + report (formats) -> token ids (tokenize)."""

from .files import DataError, read_rows
from .formats import DataReport, PreferenceExample, normalise
from .tokenize import TokenizedPair, load_pairs, render, split_eval, tokenize_examples

__all__ = ["DataError", "read_rows", "DataReport", "PreferenceExample", "normalise", "TokenizedPair",
           "render", "tokenize_examples", "load_pairs", "split_eval"]

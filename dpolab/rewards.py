"""Reward functions `f(prompts, completions) -> list[float]`, chosen by a spec string.

    load_reward("sentiment")                         VADER compound score of the completion, in [-1, 1]
    load_reward("length", target_length=20)          -|words - target| / target: 0 at the target, lower further away
    load_reward("regex", pattern=r"\\bgreat\\b")       1.0 where the pattern occurs in the completion, else 0.0
    load_reward("regex", pattern="sorry", absent=True)   1.0 where it does not occur
    load_reward("runs/reward-model")                 a Hugging Face sequence-classification model directory
    load_reward("my_rewards:score")                  any callable f(prompts, completions) in an importable
    load_reward("path/to/rewards.py:score")          module or a Python file (imported only when named)

A classifier reward scores `prompt + completion` (`with_prompt=False`: the completion alone).
With one output it is that logit; with several it is the log-odds of the `label` class
(default: the label named positive, else the last one), `logit[label] - logsumexp(other logits)`.

Bad specs and bad options raise one-line `ValueError`s.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from .models import pick_device

RewardFn = Callable[[list[str], list[str]], list[float]]
BUILTIN = ("sentiment", "length", "regex")
OPTIONS = {
    "sentiment": set(),
    "length": {"target_length"},
    "regex": {"pattern", "absent"},
    "model": {"label", "with_prompt", "batch_size", "device", "trust_remote_code", "max_length"},
    "callable": set(),
}


def load_reward(spec: str, **options) -> RewardFn:
    """A reward function from a spec (see the module docstring); options of other kinds are refused."""
    spec = (spec or "").strip()
    options = {k: v for k, v in options.items() if v is not None}
    kind = reward_kind(spec)
    unknown = sorted(set(options) - OPTIONS[kind])
    if unknown:
        raise ValueError(f"reward {spec!r} takes no option(s) {', '.join(unknown)}"
                         + (f" (it takes {', '.join(sorted(OPTIONS[kind]))})" if OPTIONS[kind] else ""))
    if kind == "sentiment":
        return sentiment_reward()
    if kind == "length":
        return length_reward(**options)
    if kind == "regex":
        return regex_reward(**options)
    if kind == "model":
        return classifier_reward(spec, **options)
    return checked(callable_reward(spec), spec)


def reward_from_config(cfg) -> RewardFn:
    """The reward a command's config names, with its options: `reward` (or `reward_model`, which
    wins), `reward_pattern` / `reward_absent` (regex), `reward_target_length` (length). The
    same fields in every config that takes a reward (generate, eval, rank, experiment)."""
    model = getattr(cfg, "reward_model", "")
    spec = model or cfg.reward
    if model and not Path(model).is_dir():
        raise ValueError(f"reward model {model}: directory not found")
    kind = reward_kind(spec)
    options = {"regex": {"pattern": getattr(cfg, "reward_pattern", "") or None, "absent": getattr(cfg, "reward_absent", False)},
               "length": {"target_length": getattr(cfg, "reward_target_length", None)}}.get(kind, {})
    return load_reward(spec, **options)


def reward_kind(spec: str) -> str:
    """sentiment | length | regex | model (a directory) | callable (module:function)."""
    if not spec:
        raise ValueError("no reward given: use sentiment, length, regex, a reward-model directory or module:function")
    if spec in BUILTIN:
        return spec
    if Path(spec).is_dir():
        return "model"
    if ":" in spec:
        return "callable"
    if "/" in spec or spec.startswith("."):
        raise ValueError(f"reward model directory {spec} not found")
    raise ValueError(f"unknown reward {spec!r}: use sentiment, length, regex, a reward-model directory "
                     "or module:function")


# ----------------------------------------------------------------------------- built-in rewards
def sentiment_reward() -> RewardFn:
    """VADER (a rule-based lexicon analyser) compound score of each completion, in [-1, 1]."""
    analyser = SentimentIntensityAnalyzer()

    def sentiment(prompts: list[str], completions: list[str]) -> list[float]:
        return [float(analyser.polarity_scores(c)["compound"]) for c in completions]

    return sentiment


def length_reward(target_length: int = 20) -> RewardFn:
    """-|number of words - target| / target: 0 exactly at the target length."""
    if not isinstance(target_length, int) or isinstance(target_length, bool) or target_length < 1:
        raise ValueError(f"length reward: target_length must be a positive integer, got {target_length!r}")

    def length(prompts: list[str], completions: list[str]) -> list[float]:
        return [-abs(len(c.split()) - target_length) / target_length for c in completions]

    return length


def regex_reward(pattern: str | None = None, absent: bool = False) -> RewardFn:
    """1.0 where `pattern` is found in the completion (or, with absent=True, where it is not)."""
    if not pattern:
        raise ValueError("regex reward needs a pattern (option pattern=..., CLI --reward-pattern)")
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"regex reward: bad pattern {pattern!r}: {e}") from None
    hit, miss = (0.0, 1.0) if absent else (1.0, 0.0)

    def regex(prompts: list[str], completions: list[str]) -> list[float]:
        return [hit if compiled.search(c) else miss for c in completions]

    return regex


# ----------------------------------------------------------------------------- user callables
def callable_reward(spec: str) -> RewardFn:
    """Import `module:function` or `file.py:function` (only now, because the user named it)."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"reward {spec!r}: expected module:function or path/to/file.py:function")
    module = _import(module_name, spec)
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {spec!r}: {module_name} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {spec!r}: {attr} is not callable")
    return fn


def _import(name: str, spec: str):
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise ValueError(f"reward {spec!r}: file {name} not found")
        module_spec = importlib.util.spec_from_file_location(f"dpolab_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:  # the user's file: show what went wrong, in one line
            raise ValueError(f"reward {spec!r}: importing {name} failed: {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import module {name!r} ({e}); "
                         "is it on PYTHONPATH, or give path/to/file.py:function") from None


def checked(fn: RewardFn, spec: str) -> RewardFn:
    """Wrap a user callable so a wrong result fails with one clear line, not deep in the pipeline."""

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        out = fn(list(prompts), list(completions))
        try:
            values = [float(v) for v in out]
        except (TypeError, ValueError):
            raise ValueError(f"reward {spec!r} must return a list of numbers, got {type(out).__name__}") from None
        if len(values) != len(completions):
            raise ValueError(f"reward {spec!r} returned {len(values)} scores for {len(completions)} completions")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"reward {spec!r} returned a non-finite score")
        return values

    reward.__name__ = getattr(fn, "__name__", "reward")
    return reward


# ----------------------------------------------------------------------------- classifier reward models
def classifier_reward(path: str, label: str | int | None = None, with_prompt: bool = True, batch_size: int = 16,
                      device: str = "auto", trust_remote_code: bool = False, max_length: int = 512) -> RewardFn:
    """A Hugging Face sequence-classification model (safetensors weights) as a reward."""
    if not any(Path(path).glob("*.safetensors")):
        raise ValueError(f"reward model {path}: no .safetensors weights (pickled checkpoints are refused)")
    dev = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, use_safetensors=True, trust_remote_code=trust_remote_code).to(dev).eval()
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"reward model {path}: cannot load a sequence-classification model ({str(e).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    index = _label_index(model.config, label, path)

    @torch.inference_mode()
    def reward_model(prompts: list[str], completions: list[str]) -> list[float]:
        texts = [p + c for p, c in zip(prompts, completions)] if with_prompt else list(completions)
        out: list[float] = []
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                            truncation=True, max_length=max_length).to(dev)
            logits = model(**enc).logits.float()
            out += _score(logits, index).tolist()
        return out

    return reward_model


def _label_index(config, label, path: str) -> int | None:
    """Which output is the reward: None for a single-logit model, else a class index."""
    if config.num_labels == 1:
        return None
    names = {str(v).lower(): int(k) for k, v in config.id2label.items()}
    if label is None:
        return names.get("positive", names.get("pos", config.num_labels - 1))
    if isinstance(label, int) or str(label).isdigit():
        index = int(label)
        if not 0 <= index < config.num_labels:
            raise ValueError(f"reward model {path}: label {index} out of range (it has {config.num_labels} classes)")
        return index
    if str(label).lower() not in names:
        raise ValueError(f"reward model {path}: no label {label!r} (labels: {', '.join(map(str, config.id2label.values()))})")
    return names[str(label).lower()]


def _score(logits, index):
    """logits (B, C) -> reward (B,): the logit (C = 1) or the class log-odds."""
    if index is None:
        return logits[:, 0]
    others = torch.cat([logits[:, :index], logits[:, index + 1 :]], dim=1)
    return logits[:, index] - others.logsumexp(dim=1)


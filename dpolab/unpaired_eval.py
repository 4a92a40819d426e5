"""`dpolab eval` on unpaired (KTO) data: how well the implicit reward separates the labels.

For each (prompt, completion, label) the implicit reward r = beta (log pi - log pi_ref) is
computed. Two measures, ties counted half:

- label accuracy: the share of examples whose reward has the label's sign (r > 0 desirable,
  r < 0 undesirable), with its 95% interval (Wilson or bootstrap);
- pairwise accuracy (AUC): the share of (desirable, undesirable) combinations where the
  desirable one has the higher reward: the preference accuracy the same data would give if
  every desirable answer were paired with every undesirable one.
"""

from __future__ import annotations

import numpy as np

from .data.files import read_rows
from .data.unpaired import is_unpaired, load_unpaired
from .models import cache_dir
from .stats import proportion_interval


def is_unpaired_source(source: str, split: str = "train") -> bool:
    first = next(read_rows(source, split), None)
    return first is not None and is_unpaired(first[1])


def label_summary(rewards, labels, ci: str = "wilson", n_boot: int = 2000, seed: int = 0) -> dict:
    """Label accuracy (with interval), pairwise accuracy and mean reward per label of (N,) rewards / bool labels."""
    rewards, labels = np.asarray(rewards, dtype=np.float64), np.asarray(labels, dtype=bool)
    signed = np.where(labels, rewards, -rewards)
    correct = (signed > 0) + 0.5 * (signed == 0)
    lo, hi = proportion_interval(correct, ci, n_boot, seed)
    good, bad = rewards[labels], rewards[~labels]
    out = {"n": int(rewards.size), "desirable": int(good.size), "undesirable": int(bad.size),
           "label_accuracy": float(correct.mean()), "ci": [lo, hi], "ci_method": ci}
    if good.size and bad.size:
        diff = good[:, None] - bad[None, :]
        out["pairwise_accuracy"] = float(((diff > 0) + 0.5 * (diff == 0)).mean())
    out["mean_desirable_reward"] = float(good.mean()) if good.size else None
    out["mean_undesirable_reward"] = float(bad.mean()) if bad.size else None
    return out


def unpaired_eval(pair, cfg) -> dict:
    """The `preference` section of eval.json for unpaired data."""
    examples, report = load_unpaired(cfg.data, pair.tokenizer, max_length=cfg.max_length,
                                     max_prompt_length=cfg.max_prompt_length, prompt_column=cfg.prompt_column,
                                     cache_dir=str(cache_dir() / "data"))
    examples = examples[: cfg.limit] if cfg.limit else examples
    if not examples:
        raise ValueError(f"{cfg.data}: no usable examples ({report.dropped or 'empty'})")
    items = [(e.prompt_ids, e.completion_ids) for e in examples]
    policy, reference = pair.token_logps(items, cfg.batch_size, cfg.packing, "eval" if cfg.progress else "")
    rewards = [cfg.beta * float(p.double().sum() - r.double().sum()) for p, r in zip(policy, reference)]
    return {"data": cfg.data, "format": report.format,
            **label_summary(rewards, [e.label for e in examples], cfg.ci, cfg.n_boot, cfg.seed)}


def label_rows(pref: dict) -> list[tuple[str, str]]:
    """(metric, value) rows of the unpaired `preference` section for the eval table / report."""
    rows = [
        ("examples", f"{pref['n']}  ({pref['desirable']} desirable, {pref['undesirable']} undesirable)"),
        ("label accuracy (reward sign)", f"{pref['label_accuracy']:.3f}  [{pref['ci'][0]:.3f}, {pref['ci'][1]:.3f}] 95% {pref['ci_method']}"),
    ]
    if "pairwise_accuracy" in pref:
        rows.append(("pairwise accuracy (AUC)", f"{pref['pairwise_accuracy']:.3f}"))
    fmt = lambda v: "n/a" if v is None else f"{v:+.4f}"  # noqa: E731
    rows.append(("mean desirable / undesirable reward", f"{fmt(pref['mean_desirable_reward'])} / {fmt(pref['mean_undesirable_reward'])}"))
    return rows

"""Measuring policies on held-out prompts: one point of the reward-vs-KL frontier each.

Every policy is sampled on the same held-out prompts with the same seed (common random
numbers: sample j of prompt i uses the same noise for every policy, so a policy equal to the
reference gives identical samples) and scored with the true reward. A point holds:

- reward: mean true reward of its samples, with its standard error;
- KL: the sequence-level estimate E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] from the same samples
  (dpolab.sampling.sequence_kl), with its SE; for best-of-N the analytic bound log N - (N-1)/N;
- win rate vs the reference: sample j against the reference's sample j of the same prompt, ties half;
- preference accuracy: held-out pairs (best vs worst of the reference's best-of-N samples, labelled
  by the true reward) ordered correctly by the implicit reward beta*(log pi - log pi_ref), ties half.

The reference draws `eval_samples + max(N)` samples per prompt: the first `eval_samples` are its
own point and the partners of every policy's samples; the rest form disjoint best-of-N groups,
so best-of-N is compared with reference samples it was not chosen from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..evaluate import accuracy_summary, pair_rewards
from ..generate import as_messages, as_reply, make_pairs
from ..metrics import ItemProgress
from ..pair import ModelPair
from ..prompts import prompt_text
from ..sampling import draw as draw_samples, sequence_kl as samples_kl
from ..stats import mean_se, win_rate


def draw(model, ref: ModelPair, prompts: list, n: int, cfg, reward_fn) -> dict:
    """n samples per prompt from `model` (the reference's tokenizer, seed cfg.seed + 1) and their true rewards.

    Returns {"samples": [[str]], "rewards": [[float]], "ids": [[(prompt_ids, completion_ids)]]}:
    the ids are exactly the sampled tokens (stop token excluded), for the KL estimate.
    """
    with ItemProgress("samples", len(prompts) * n, "sample", cfg.progress, transient=False) as bar:
        drawn = draw_samples(model, ref.tokenizer, prompts, num_samples=n, max_new_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed + 1,
                             batch_size=cfg.gen_batch_size, chat=cfg.chat, on_batch=bar.advance)
    rewards = reward_fn([prompt_text(p) for p in prompts for _ in range(n)], drawn.texts)
    return {"samples": drawn.by_prompt(drawn.texts), "rewards": drawn.by_prompt([float(r) for r in rewards]),
            "ids": drawn.by_prompt(list(zip(drawn.prompt_ids, drawn.completion_ids)))}


def point(name: str, kind: str, rewards: list[float], **extra) -> dict:
    mean, se = mean_se(rewards)
    return {"name": name, "kind": kind, "reward": mean, "reward_se": se, "kl": 0.0, "kl_se": 0.0,
            "kl_from": "definition", "win_rate": None, "accuracy": None, "beta": None, "round": 0, **extra}


# ----------------------------------------------------------------------------- the reference and best-of-N
def reference_point(ref_draw: dict, eval_samples: int) -> dict:
    """The reference itself: KL 0 and win rate 1/2 by definition; reward over all its samples."""
    flat = [r for row in ref_draw["rewards"] for r in row]
    return point("reference", "reference", flat, win_rate=0.5, accuracy=0.5,
                 examples=[row[0] for row in ref_draw["samples"]], example_rewards=[row[0] for row in ref_draw["rewards"]])


def best_of_n_points(ref_draw: dict, ns: list[int], eval_samples: int) -> list[dict]:
    """Best-of-N by the true reward from disjoint groups of the reference's extra samples.

    KL of best-of-N to the reference is at most log N - (N-1)/N (the analytic bound that the
    DPO paper's Figure 2 and later work plot); it is shown at that bound.
    """
    points = []
    for n in ns:
        best, wins = [], []
        for rewards in ref_draw["rewards"]:
            pool = rewards[eval_samples:]
            for g in range(len(pool) // n):
                top = max(pool[g * n : (g + 1) * n])
                best.append(top)
                wins += [1.0 if top > r else 0.5 if top == r else 0.0 for r in rewards[:eval_samples]]
        if not best:
            continue
        bound = math.log(n) - (n - 1) / n
        points.append(point(f"best-of-{n}", "best-of-n", best, kl=bound, kl_se=0.0, kl_from="bound",
                            win_rate=sum(wins) / len(wins), n=n))
    return points


def held_out_pairs(prompts: list, ref_draw: dict, eval_samples: int, path: Path, chat: bool) -> Path:
    """Best-vs-worst pairs of the reference's best-of-N samples, labelled by the true reward."""
    rows = []
    for i, (p, samples, rewards) in enumerate(zip(prompts, ref_draw["samples"], ref_draw["rewards"])):
        pool, scores = samples[eval_samples:], rewards[eval_samples:]
        for w, l in make_pairs(scores, "best-vs-worst")[0] if len(pool) >= 2 else []:
            if pool[w] != pool[l]:
                prompt = as_messages(p) if chat or not isinstance(p, str) else p
                rows.append({"prompt": prompt, "chosen": as_reply(pool[w], p, chat), "rejected": as_reply(pool[l], p, chat),
                             "chosen_score": scores[w], "rejected_score": scores[l], "prompt_index": i})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- trained policies
def measure_policy(name: str, kind: str, policy, ref: ModelPair, prompts: list, ref_draw: dict, reward_fn, cfg,
                   beta: float | None, eval_pairs, **extra) -> dict:
    """Sample the policy on the held-out prompts and turn it into a frontier point."""
    n = cfg.eval_samples
    drawn = draw(policy, ref, prompts, n, cfg, reward_fn)
    flat_rewards = [r for row in drawn["rewards"] for r in row]
    pair = model_pair(policy, ref, name)
    kl_mean, kl_se = sequence_kl(pair, drawn["ids"], cfg.eval_batch_size)
    paired_ref = [r for row in ref_draw["rewards"] for r in row[:n]]
    wins = win_rate(flat_rewards, paired_ref)
    accuracy = preference_accuracy(pair, eval_pairs, beta or 1.0, cfg.eval_batch_size) if eval_pairs else {}
    return point(name, kind, flat_rewards, kl=kl_mean, kl_se=kl_se, kl_from="samples", beta=beta,
                 win_rate=wins["win_rate"], wins=wins, accuracy=accuracy.get("accuracy"),
                 accuracy_ci=accuracy.get("ci"), examples=[row[0] for row in drawn["samples"]],
                 example_rewards=[row[0] for row in drawn["rewards"]], **extra)


def model_pair(policy, ref: ModelPair, name: str) -> ModelPair:
    """`policy` measured against the experiment's reference (fp32)."""
    return ref.with_policy(policy, name)


def sequence_kl(pair, ids: list[list[tuple]], batch_size: int) -> tuple[float, float]:
    """Mean and SE of log pi(y|x) - log pi_ref(y|x) over the policy's own samples (fp32, sampled token ids)."""
    flat = [item for row in ids for item in row]
    out = samples_kl(pair, [p for p, _ in flat], [c for _, c in flat], batch_size)
    return out["mean"], out["se"]


def preference_accuracy(pair, tokenized_pairs, beta: float, batch_size: int) -> dict:
    chosen, rejected = pair_rewards(pair, tokenized_pairs, beta, batch_size)
    return accuracy_summary(chosen, rejected)


def prompt_margins(pair, tokenized_pairs, prompt_index: list[int], beta: float, batch_size: int) -> dict[int, float]:
    """Smallest implicit-reward margin beta*h per prompt over its pairs (for active sampling)."""
    chosen, rejected = pair_rewards(pair, tokenized_pairs, beta, batch_size)
    margins: dict[int, float] = {}
    for i, m in zip(prompt_index, (chosen - rejected).tolist()):
        margins[i] = min(m, margins.get(i, math.inf))
    return margins

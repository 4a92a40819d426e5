"""`dpolab eval`: measure a trained policy against its reference.

Two evaluations, either or both:

- Preference accuracy on held-out pairs (`--data`): the fraction of pairs whose implicit
  reward beta*(log pi - log pi_ref) puts chosen above rejected, ties counted half (so a policy
  equal to its reference scores exactly 0.5), with a 95% interval (Wilson or bootstrap) and the
  mean reward margin with its standard error.
- Generation on a prompt set (`--prompts`, `--reward`): samples from the policy and from a
  baseline (the reference by default) with the same seed and settings, scored by a reward
  function; mean reward, win rate of policy over baseline per sample (ties half) with a 95%
  interval, and the sequence KL estimate E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] with its SE.
  The KL uses the log-probs of exactly the sampled token ids (the stop token excluded).

Everything goes to `<output_dir>/eval.json` and a table on the terminal.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import numpy as np

from .config import EvalConfig, from_run, resolve
from .data import load_pairs
from .metrics import ItemProgress, counted, print_table
from .models import cache_dir, load_tokenizer, run_config
from .pair import load_frozen, load_model_pair
from .prompts import load_prompts, prompt_text, read_prompts  # noqa: F401 (load_prompts re-exported)
from .reference import fingerprint
from .rewards import reward_from_config
from .sampling import autocast_factory, draw, sequence_kl, settings
from .stats import mean_se, outcomes, proportion_interval, win_rate
from .unpaired_eval import is_unpaired_source, label_rows, unpaired_eval


def evaluate(cfg: EvalConfig | None = None, **overrides) -> dict:
    """Run the evaluations the config asks for; returns (and writes) the eval.json content."""
    cfg = cfg or resolve(EvalConfig, **overrides)  # checked at construction (config._eval_checks)
    cfg = from_run(cfg, run_config(cfg.model))  # beta and lengths: the run's unless given
    prompts = read_prompts(cfg.prompts, cfg.prompt_column, cfg.limit) if cfg.prompts else None
    pair = load_model_pair(cfg.model, cfg.ref_model, device=cfg.device, bf16=cfg.bf16,
                           trust_remote_code=cfg.trust_remote_code)
    start = time.perf_counter()
    result = {"model": cfg.model, "reference": pair.names[1], "beta": cfg.beta, "max_length": cfg.max_length,
              "max_prompt_length": cfg.max_prompt_length}
    if cfg.data:
        result["preference"] = preference_eval(pair, cfg)
    if prompts is not None:
        result["generation"] = generation_eval(pair, prompts, cfg)
    result["seconds"] = round(time.perf_counter() - start, 2)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    print_result(result, out / "eval.json")
    return result


# ----------------------------------------------------------------------------- preference accuracy
def pair_rewards(pair, pairs, beta: float, batch_size: int, packing: bool = True, label: str = "",
                 reference_cache: dict | None = None):
    """Implicit rewards of TokenizedPairs: (chosen_rewards (B,), rejected_rewards (B,)) float64 numpy.
    `label`: show the forward passes' progress under this name ("" = none). `reference_cache`: a
    dict kept across model pairs (rank), so a reference shared by several policies, on the same
    token ids, batch size and precision, runs once."""
    key = None
    if reference_cache is not None:
        key = fingerprint(pairs, f"{pair.names[1]};bf16={pair.bf16};batch={batch_size}", packing)
    policy_token_logps, reference_token_logps = pair.pair_token_logps(
        pairs, batch_size, packing, label, reference_cache.get(key) if key else None)
    if key:
        reference_cache[key] = reference_token_logps
    policy_logps = np.array([float(t.double().sum()) for t in policy_token_logps])
    reference_logps = np.array([float(t.double().sum()) for t in reference_token_logps])
    rewards = beta * (policy_logps - reference_logps)
    return rewards[: len(pairs)], rewards[len(pairs):]


def accuracy_summary(chosen_rewards, rejected_rewards, ci: str = "wilson", n_boot: int = 2000, seed: int = 0) -> dict:
    """Preference accuracy (ties half) with its 95% interval, and the mean margin with its SE."""
    correct = outcomes(chosen_rewards, rejected_rewards)
    if correct.size == 0:
        raise ValueError("no preference pairs to evaluate")
    lo, hi = proportion_interval(correct, ci, n_boot, seed)
    margin, margin_se = mean_se(chosen_rewards - rejected_rewards)
    return {
        "n": int(correct.size), "accuracy": float(correct.mean()), "ci": [lo, hi], "ci_method": ci,
        "correct": int((correct == 1).sum()), "ties": int((correct == 0.5).sum()), "wrong": int((correct == 0).sum()),
        "mean_margin": margin, "margin_se": margin_se,
        "mean_chosen_reward": float(chosen_rewards.mean()), "mean_rejected_reward": float(rejected_rewards.mean()),
    }


def load_eval_pairs(source: str, tokenizer, cfg) -> list:
    pairs, report = load_pairs(source, tokenizer, max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                               prompt_column=cfg.prompt_column, chosen_column=cfg.chosen_column,
                               rejected_column=cfg.rejected_column, cache_dir=str(cache_dir() / "data"))
    pairs = pairs[: cfg.limit] if cfg.limit else pairs
    if not pairs:
        raise ValueError(f"{source}: no usable preference pairs ({report.dropped or 'empty'})")
    return pairs


def preference_eval(pair, cfg: EvalConfig) -> dict:
    if is_unpaired_source(cfg.data):  # KTO data: label accuracy instead of pair accuracy
        return unpaired_eval(pair, cfg)
    pairs = load_eval_pairs(cfg.data, pair.tokenizer, cfg)
    chosen_rewards, rejected_rewards = pair_rewards(pair, pairs, cfg.beta, cfg.batch_size, cfg.packing, progress_label(cfg, "eval"))
    return {"data": cfg.data, **accuracy_summary(chosen_rewards, rejected_rewards, cfg.ci, cfg.n_boot, cfg.seed)}


# ----------------------------------------------------------------------------- generation
@contextlib.contextmanager
def baseline_model(pair, spec: str, cfg: EvalConfig):
    """(model, tokenizer) of the baseline: the reference, or another model (any tokenizer)."""
    if spec == "reference":
        with pair.reference_model() as model:
            yield model, pair.tokenizer
        return
    tokenizer = load_tokenizer(spec, cfg.trust_remote_code)
    yield load_frozen(spec, pair.device, cfg.trust_remote_code), tokenizer


def judge_texts(prompts: list, num_samples: int) -> list[str]:
    """The prompt text the reward function sees for every flattened sample."""
    return [prompt_text(p) for p in prompts for _ in range(num_samples)]


def generation_eval(pair, prompts: list, cfg: EvalConfig) -> dict:
    reward_fn = reward_from_config(cfg)
    texts = judge_texts(prompts, cfg.num_samples)
    autocast = autocast_factory(pair.device, pair.bf16)
    with sampling_progress(cfg, "eval samples (policy)", len(prompts)) as bar:
        policy = draw(pair.policy, pair.tokenizer, prompts, **settings(cfg), autocast=autocast, on_batch=bar.advance)
    policy_rewards = [float(r) for r in reward_fn(texts, policy.texts)]
    mean, se = mean_se(policy_rewards)
    out = {"prompts": len(prompts), "num_samples": cfg.num_samples, "reward_fn": cfg.reward,
           "sampling": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p, "seed": cfg.seed},
           "policy_reward": {"mean": mean, "se": se},
           "kl": sequence_kl(pair, policy.prompt_ids, policy.completion_ids, cfg.batch_size, cfg.packing,
                             progress_label(cfg, "eval KL"))}
    shown = [i * cfg.num_samples for i in range(min(5, len(prompts)))]  # the first sample of 5 prompts
    examples = [{"prompt": texts[i], "policy": policy.texts[i], "policy_reward": policy_rewards[i]} for i in shown]
    if cfg.baseline != "none":
        with baseline_model(pair, cfg.baseline, cfg) as (model, tokenizer), \
                sampling_progress(cfg, "eval samples (baseline)", len(prompts)) as bar:
            baseline = draw(model, tokenizer, prompts, **settings(cfg), autocast=autocast, on_batch=bar.advance)
        baseline_rewards = [float(r) for r in reward_fn(texts, baseline.texts)]
        out.update(compare(policy_rewards, baseline_rewards, cfg))
        for e, i in zip(examples, shown):
            e.update({"baseline": baseline.texts[i], "baseline_reward": baseline_rewards[i]})
    out["examples"] = examples
    return out


def progress_label(cfg, label: str) -> str:
    """`label` when the command shows progress (`--progress`), else "" (the forward passes stay quiet)."""
    return label if cfg.progress else ""


def sampling_progress(cfg, label: str, prompts: int) -> ItemProgress:
    """Progress of sampling `cfg.num_samples` completions of `prompts` prompts (eval, rank)."""
    return ItemProgress(label, prompts * cfg.num_samples, "sample", cfg.progress)


def compare(policy_rewards: list[float], baseline_rewards: list[float], cfg: EvalConfig) -> dict:
    """Baseline mean reward and the win rate of policy over baseline, sample by sample, ties half."""
    b_mean, b_se = mean_se(baseline_rewards)
    wins = win_rate(policy_rewards, baseline_rewards)
    lo, hi = proportion_interval(outcomes(policy_rewards, baseline_rewards), cfg.ci, cfg.n_boot, cfg.seed)
    return {"baseline": cfg.baseline, "baseline_reward": {"mean": b_mean, "se": b_se},
            "win_rate": {**wins, "ci": [lo, hi], "ci_method": cfg.ci}}


# ----------------------------------------------------------------------------- display
def result_rows(result: dict) -> list[tuple[str, str]]:
    """(metric, value) rows of an eval.json, shared by the terminal table and the HTML report."""
    rows = [("model", str(result.get("model"))), ("reference", str(result.get("reference"))), ("beta", f"{result.get('beta')}")]
    if "max_length" in result:  # eval.json files of older versions have no lengths
        rows.append(("max length (prompt)", f"{result['max_length']} ({result['max_prompt_length']})"))
    pref = result.get("preference")
    if pref and "label_accuracy" in pref:  # unpaired (KTO) data
        rows += label_rows(pref)
    elif pref:
        rows += [
            ("pairs", f"{pref['n']}  ({pref['correct']} right, {counted(pref['ties'], 'tie')}, {pref['wrong']} wrong)"),
            ("preference accuracy", f"{pref['accuracy']:.3f}  [{pref['ci'][0]:.3f}, {pref['ci'][1]:.3f}] 95% {pref['ci_method']}"),
            ("mean reward margin", f"{pref['mean_margin']:+.4f} +/- {pref['margin_se']:.4f} (SE)"),
            ("mean chosen / rejected reward", f"{pref['mean_chosen_reward']:+.4f} / {pref['mean_rejected_reward']:+.4f}"),
        ]
    gen = result.get("generation")
    if gen:
        rows += [
            ("prompts x samples", f"{gen['prompts']} x {gen['num_samples']}  (reward: {gen['reward_fn']})"),
            ("policy mean reward", f"{gen['policy_reward']['mean']:.4f} +/- {gen['policy_reward']['se']:.4f} (SE)"),
            ("sequence KL(pi || pi_ref)", f"{gen['kl']['mean']:.4f} +/- {gen['kl']['se']:.4f} (SE) nats"),
        ]
        if "win_rate" in gen:
            w = gen["win_rate"]
            rows += [
                (f"baseline ({gen['baseline']}) mean reward", f"{gen['baseline_reward']['mean']:.4f} +/- {gen['baseline_reward']['se']:.4f} (SE)"),
                ("win rate vs baseline", f"{w['win_rate']:.3f}  [{w['ci'][0]:.3f}, {w['ci'][1]:.3f}] 95% {w['ci_method']}  "
                                         f"({w['wins']} W / {w['ties']} T / {w['losses']} L)"),
            ]
    return rows


def print_result(result: dict, path: Path) -> None:
    print_table(f"dpolab eval ({result.get('seconds', 0)} s) -> {path}", ["metric", "value"], result_rows(result))

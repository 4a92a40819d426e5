"""The label-noise study: how DPO, cDPO, robust DPO and IPO hold up when preference labels are flipped.

    python -m dpolab.experiments.label_noise --output-dir runs/label-noise [--model default ...]

1. `dpolab generate` samples K completions per prompt from the model and labels best-vs-worst
   pairs with the reward (default: the VADER sentiment score), once, without noise.
2. Prompts are split: the pairs of the first `eval_prompts` prompts are held out with their
   CLEAN labels; the rest is training data.
3. For each flip rate r, the SAME seeded random r-fraction of training pairs has chosen and
   rejected swapped (nested sets: the pairs flipped at 0.1 are also flipped at 0.2; the same
   swap as `generate --flip-rate`, applied afterwards so every rate shares the same completions).
4. Each loss is trained on each noisy set from the same model with the same settings. cDPO and
   robust DPO are given the true flip rate as label_smoothing (their oracle setting; at r = 0
   both are DPO).
5. Each trained policy is measured on the held-out prompts: preference accuracy of its implicit
   reward against the clean labels (with a 95% Wilson interval), and the mean reward (the same
   reward as in step 1) of samples it draws, with its standard error.

Writes `results.json`, `results.md` (one table), `label_noise.png` (one plot: both measures
against the flip rate, one line per loss) and the time each stage took. Trained models are
deleted after measuring unless --keep-models (16 copies of a model fill a disk quickly).
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path

from ..config import LabelNoiseConfig, add_arguments, resolve
from ..data import load_pairs
from ..data.files import json_lines
from ..evaluate import accuracy_summary, pair_rewards
from ..generate import generate
from ..models import cache_dir
from ..pair import load_model_pair
from ..prompts import prompt_text
from ..report import pyplot
from ..rewards import load_reward
from ..sampling import sample
from ..stats import mean_se
from ..train import train


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def run(cfg: LabelNoiseConfig | None = None, **overrides) -> dict:
    """The whole study; returns (and writes) the results."""
    cfg = cfg or resolve(LabelNoiseConfig, **overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    start = time.perf_counter()
    train_rows, eval_rows = make_pairs(cfg, out)
    times["generate pairs"] = time.perf_counter() - start
    eval_file = write_jsonl(out / "eval_clean.jsonl", eval_rows)
    points = []
    for rate in floats(cfg.flip_rates):
        data = write_jsonl(out / f"train_flip{rate:g}.jsonl", flip(train_rows, rate, cfg.seed))
        for loss in [n.strip() for n in cfg.losses.split(",")]:
            t0 = time.perf_counter()
            point = train_and_measure(cfg, out, loss, rate, data, eval_file, eval_rows)
            point["seconds"] = round(time.perf_counter() - t0, 1)
            points.append(point)
            print(f"label-noise: flip {rate:g} {loss}: accuracy {point['accuracy']:.3f}, reward {point['reward']:+.3f} "
                  f"({point['seconds']} s)", flush=True)
    times["train + measure"] = sum(p["seconds"] for p in points)
    times["total"] = time.perf_counter() - start
    result = {"config": asdict(cfg), "train_pairs": len(train_rows), "eval_pairs": len(eval_rows),
              "points": points, "seconds": {k: round(v, 1) for k, v in times.items()}}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "results.md").write_text(table(result) + "\n")
    (out / "label_noise.png").write_bytes(plot(points))
    print(table(result))
    return result


def make_pairs(cfg: LabelNoiseConfig, out: Path) -> tuple[list[dict], list[dict]]:
    """Clean best-vs-worst pairs from `generate`, split by prompt into (train, held-out)."""
    pairs_file = out / "pairs_clean.jsonl"
    generate(model=cfg.model, prompts=cfg.prompts, limit=cfg.train_prompts + cfg.eval_prompts, output=str(pairs_file),
             reward=cfg.reward, num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
             pair_strategy="best-vs-worst", flip_rate=0.0, progress=cfg.progress)
    rows = [json.loads(line) for line in json_lines(pairs_file)]
    held = [r for r in rows if r["prompt_index"] < cfg.eval_prompts]
    return [r for r in rows if r["prompt_index"] >= cfg.eval_prompts], held


def flip(rows: list[dict], rate: float, seed: int) -> list[dict]:
    """A copy with round(rate * n) pairs swapped: the first of one seeded permutation (nested across rates)."""
    order = list(range(len(rows)))
    random.Random(f"flip:{seed}").shuffle(order)
    flipped = set(order[: round(rate * len(rows))])
    out = []
    for i, r in enumerate(rows):
        r = dict(r)
        if i in flipped:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
            r["chosen_score"], r["rejected_score"] = r["rejected_score"], r["chosen_score"]
            r["flipped"] = not r.get("flipped", False)
        out.append(r)
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_and_measure(cfg, out: Path, loss: str, rate: float, data: Path, eval_file: Path, eval_rows) -> dict:
    """Train one (loss, flip rate) policy, measure it, and (unless keep_models) delete its weights."""
    run_dir = out / "runs" / f"{loss}-flip{rate:g}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun starts over: a half-written run is not resumed with new settings
    eps = rate if loss in ("cdpo", "robust") else 0.0
    result = train(model=cfg.model, data=str(data), output_dir=str(run_dir), loss=loss, beta=cfg.beta, lr=cfg.lr,
                   label_smoothing=eps, batch_size=cfg.batch_size, epochs=cfg.epochs, eval_fraction=0.0, seed=cfg.seed,
                   final_checkpoint=False, precompute_ref=True, progress=cfg.progress, warmup_ratio=0.1)
    point = {"loss": loss, "flip_rate": rate, "label_smoothing": eps, "steps": result["steps"],
             "final_train_loss": result["history"][-1]["loss"], **measure(cfg, run_dir / "final", eval_file, eval_rows)}
    if not cfg.keep_models:
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    return point


def measure(cfg, policy_dir: Path, eval_file: Path, eval_rows: list[dict]) -> dict:
    """Preference accuracy vs clean labels and the mean true reward of the policy's samples."""
    pair = load_model_pair(str(policy_dir), cfg.model, device="cpu")
    tokenized, _ = load_pairs(str(eval_file), pair.tokenizer, max_length=512, max_prompt_length=256,
                              cache_dir=str(cache_dir() / "data"))
    acc = accuracy_summary(*pair_rewards(pair, tokenized, cfg.beta, 8))
    prompts = list({r["prompt_index"]: r["prompt"] for r in eval_rows}.values())
    samples = sample(pair.policy, pair.tokenizer, prompts, num_samples=cfg.eval_samples, max_new_tokens=cfg.max_new_tokens,
                     seed=cfg.seed + 1, batch_size=16)
    reward_fn = load_reward(cfg.reward)
    rewards = reward_fn([prompt_text(p) for p in prompts for _ in range(cfg.eval_samples)], [c for row in samples for c in row])
    mean, se = mean_se([float(r) for r in rewards])
    return {"accuracy": acc["accuracy"], "accuracy_ci": acc["ci"], "eval_pairs": acc["n"], "reward": mean, "reward_se": se}


def table(result: dict) -> str:
    """One markdown table: rows = losses, columns = flip rates, cells = accuracy / reward."""
    points = result["points"]
    rates = sorted({p["flip_rate"] for p in points})
    losses = list(dict.fromkeys(p["loss"] for p in points))
    cell = {(p["loss"], p["flip_rate"]): p for p in points}
    head = "| loss | " + " | ".join(f"flip {r:g}: accuracy / reward" for r in rates) + " |"
    lines = [head, "|---|" + "---|" * len(rates)]
    for loss in losses:
        cells = [f"{cell[loss, r]['accuracy']:.3f} / {cell[loss, r]['reward']:+.3f} ± {cell[loss, r]['reward_se']:.3f}"
                 if (loss, r) in cell else "-" for r in rates]
        lines.append(f"| {loss} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(points: list[dict]) -> bytes:
    """Accuracy (left) and held-out reward (right) against the flip rate, one line per loss."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for loss in dict.fromkeys(p["loss"] for p in points):
        mine = sorted((p for p in points if p["loss"] == loss), key=lambda p: p["flip_rate"])
        x = [p["flip_rate"] for p in mine]
        axes[0].plot(x, [p["accuracy"] for p in mine], marker="o", label=loss)
        axes[1].errorbar(x, [p["reward"] for p in mine], yerr=[p["reward_se"] for p in mine], marker="o", capsize=3, label=loss)
    axes[0].set(xlabel="label flip rate", ylabel="held-out preference accuracy (clean labels)")
    axes[1].set(xlabel="label flip rate", ylabel="held-out mean reward of samples")
    axes[0].legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dpolab.experiments.label_noise", description=LabelNoiseConfig.__doc__)
    add_arguments(parser, LabelNoiseConfig)
    run(resolve(LabelNoiseConfig, parser.parse_args(argv)))


if __name__ == "__main__":
    main()

"""`dpolab rank`: several models on the same items, a win matrix and a Bradley-Terry ranking.

Every model gets one score per item, and model i beats model j on an item when its score is
higher (a tie is half a win each):

- pairs (`--data`): the item is a preference pair and the score is whether the model's
  implicit reward orders it correctly (1 right, 0.5 tie, 0 wrong). So i beats j on the pairs
  where i is right and j is not.
- prompts (`--prompts --reward`): the item is a (prompt, sample index) and the score is the
  judge's reward of the model's sample; all models sample with the same seed and settings.

The win counts are fitted with a Bradley-Terry model (shown on the Elo scale) with bootstrap
intervals from resampling items. Outputs: rank.json, win_matrix.png and a ranked table.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from .config import RankConfig, from_run, names_list, resolve
from .evaluate import judge_texts, load_eval_pairs, pair_rewards, progress_label, sampling_progress
from .metrics import print_table
from .models import load_tokenizer, pick_device, run_config
from .pair import load_frozen, load_model_pair
from .prompts import read_prompts
from .rewards import reward_from_config
from .sampling import draw, settings
from .stats import bradley_terry_bootstrap, elo, outcomes, win_matrix


def rank(cfg: RankConfig | None = None, **overrides) -> dict:
    """Score every model on the same items, fit Bradley-Terry, write rank.json + heat map."""
    cfg = cfg or resolve(RankConfig, **overrides)
    models = names_list(cfg.models)  # checked with the config (config._rank_checks)
    names = names_list(cfg.names) or models
    runs = [from_run(cfg, run_config(m)) for m in models] if cfg.data else None  # each run's beta and lengths unless given
    scores, measure = pair_scores(models, runs, names) if cfg.data else prompt_scores(models, cfg, names)
    result = ranking(scores, names, cfg.n_boot, cfg.seed, cfg.prior)
    for m, run in zip(result["models"], runs or []):
        m.update(beta=run.beta, max_length=run.max_length, max_prompt_length=run.max_prompt_length)
    result.update({"mode": "pairs" if cfg.data else "prompts", "source": cfg.data or cfg.prompts,
                   "measure": measure, "paths": models, "reward": cfg.reward or None})
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "win_matrix.png").write_bytes(win_matrix_png(result))
    print_ranking(result, out)
    return result


def ranking(scores, names: list[str], n_boot: int = 1000, seed: int = 0, prior: float = 0.1) -> dict:
    """scores (K, M) -> the rank.json content: BT ratings with intervals, win matrix, ordering."""
    scores = np.asarray(scores, dtype=np.float64)
    theta, lower, upper = bradley_terry_bootstrap(scores, n_boot=n_boot, seed=seed, prior=prior)
    wins = win_matrix(scores)
    games = wins + wins.T
    fraction = np.divide(wins, games, out=np.full_like(wins, np.nan), where=games > 0)
    order = [int(i) for i in np.argsort(-theta, kind="stable")]
    models = [{"name": names[i], "rank": order.index(i) + 1, "theta": float(theta[i]), "elo": float(elo(theta[i])),
               "elo_ci": [float(elo(lower[i])), float(elo(upper[i]))], "mean_score": float(scores[i].mean()),
               "win_rate_vs_field": float(np.nanmean(np.delete(fraction[i], i)))} for i in range(len(names))]
    return {"items": int(scores.shape[1]), "names": list(names), "order": [names[i] for i in order], "models": models,
            "wins": wins.tolist(), "win_fraction": [[None if np.isnan(v) else float(v) for v in row] for row in fraction]}


# ----------------------------------------------------------------------------- scores per model
def pair_scores(models: list[str], runs: list[RankConfig], names: list[str]):
    """(K, M) correctness of each model's implicit-reward ordering on the pairs all models kept.

    runs[i]: the config for model i, its beta and lengths `--beta` / `--max-length` if given, else
    those its run was trained with (its config.yaml, as eval and score do; `config.from_run`).
    (A tie needs equal rewards, so the beta changes which pairs count as ties only through
    rounding; it is recorded in rank.json with the lengths.)"""
    per_model, reference_cache = [], {}  # runs of one base share its reference pass
    for path, cfg, name in zip(models, runs, names):
        pair = load_model_pair(path, cfg.ref_model, device=cfg.device, bf16=cfg.bf16, trust_remote_code=cfg.trust_remote_code)
        pairs = load_eval_pairs(cfg.data, pair.tokenizer, cfg)
        chosen, rejected = pair_rewards(pair, pairs, cfg.beta, cfg.batch_size, cfg.packing, progress_label(cfg, f"rank {name}"),
                                        reference_cache)
        per_model.append(dict(zip([p.row for p in pairs], outcomes(chosen, rejected))))
        del pair
    rows = sorted(set.intersection(*(set(m) for m in per_model)))  # tokenizers may drop different rows
    if not rows:
        raise ValueError(f"{runs[0].data}: no pair is usable by every model")
    return np.array([[m[r] for r in rows] for m in per_model]), "preference accuracy"


def prompt_scores(models: list[str], cfg: RankConfig, names: list[str]):
    """(K, prompts x num_samples) judge rewards of each model's samples, same seed for all."""
    prompts = read_prompts(cfg.prompts, cfg.prompt_column, cfg.limit)
    judge = reward_from_config(cfg)
    texts = judge_texts(prompts, cfg.num_samples)
    device = pick_device(cfg.device)
    scores = []
    for path, name in zip(models, names):
        tokenizer = load_tokenizer(path, cfg.trust_remote_code)
        model = load_frozen(path, device, cfg.trust_remote_code)
        with sampling_progress(cfg, f"rank {name} samples", len(prompts)) as bar:
            drawn = draw(model, tokenizer, prompts, **settings(cfg), on_batch=bar.advance)
        scores.append([float(r) for r in judge(texts, drawn.texts)])
        del model
    return np.array(scores), f"mean reward ({cfg.reward})"


# ----------------------------------------------------------------------------- outputs
def win_matrix_png(result: dict) -> bytes:
    """Heat map of the win fraction of row model over column model, models in rank order."""
    import matplotlib  # why: heavy, and only this function draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # why: ~0.5 s to import; only the heat map needs it

    names = result["order"]
    index = [result["names"].index(n) for n in names]
    frac = np.array([[np.nan if v is None else v for v in row] for row in result["win_fraction"]], dtype=float)
    frac = frac[np.ix_(index, index)]
    size = 1.2 + 0.9 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(frac, cmap="RdBu", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(frac[i, j]):
                dark = abs(frac[i, j] - 0.5) > 0.3  # white text on the saturated ends of the colour map
                ax.text(j, i, f"{frac[i, j]:.2f}", ha="center", va="center", fontsize=9, color="white" if dark else "black")
    ax.set_title(f"win rate of row over column ({result['items']} items)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def ranking_rows(result: dict) -> list[list[str]]:
    """Rows of the ranked table (rank, name, Elo [95% CI], mean score, win rate vs field)."""
    rows = []
    for m in sorted(result["models"], key=lambda m: m["rank"]):
        rows.append([str(m["rank"]), m["name"], f"{m['elo']:.0f} [{m['elo_ci'][0]:.0f}, {m['elo_ci'][1]:.0f}]",
                     f"{m['mean_score']:.3f}", f"{m['win_rate_vs_field']:.3f}"])
    return rows


RANK_COLUMNS = ["rank", "model", "Bradley-Terry Elo [95% CI]", "mean score", "win rate vs others"]


def print_ranking(result: dict, out: Path) -> None:
    print_table(f"dpolab rank: {result['mode']} ({result['items']} items, score = {result['measure']})", RANK_COLUMNS,
                ranking_rows(result), footer=f"-> {out / 'rank.json'}, {out / 'win_matrix.png'}", left="model")

"""The statistics behind `dpolab eval` and `dpolab rank`: pure numpy, no models.

- `wilson_interval`: 95% interval of a proportion (accuracy, win rate); valid near 0 and 1
  where the normal approximation is not, and it accepts fractional successes (ties = 1/2).
- `bootstrap_interval`: percentile bootstrap of any statistic of a sample.
- `outcomes`/`win_rate`: paired comparison of two score lists, ties counted half.
- `mean_se`, `kl_estimate`: Monte-Carlo mean with its standard error; the sequence-level KL
  estimate E_{y~pi}[log pi(y|x) - log pi_ref(y|x)] is such a mean over samples y ~ pi.
- `win_matrix`, `bradley_terry`, `bradley_terry_bootstrap`: ranking K models that were all
  scored on the same M items.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n`.

    >>> [round(v, 4) for v in wilson_interval(8, 10)]
    [0.4902, 0.9433]
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n >= 1")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: Sequence[float], statistic: Callable = np.mean, n_boot: int = 2000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(values)`, resampling values with replacement."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(n_boot, x.size))
    stats = np.array([statistic(x[row]) for row in idx]) if statistic is not np.mean else x[idx].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(stats, tail)), float(np.quantile(stats, 1 - tail))


def proportion_interval(outcome: Sequence[float], method: str = "wilson", n_boot: int = 2000,
                        seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean of 0 / 0.5 / 1 outcomes by `wilson` or `bootstrap`."""
    x = np.asarray(outcome, dtype=np.float64)
    if method == "wilson":
        return wilson_interval(float(x.sum()), x.size)
    if method == "bootstrap":
        return bootstrap_interval(x, n_boot=n_boot, seed=seed)
    raise ValueError(f"ci must be wilson or bootstrap, got {method!r}")


def outcomes(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    """Per-item result of a versus b: 1 where a > b, 0.5 where equal, 0 where a < b."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal lengths, got {a.shape} and {b.shape}")
    return (a > b) + 0.5 * (a == b)


def win_rate(a: Sequence[float], b: Sequence[float]) -> dict:
    """Win rate of a over b on the same items, ties counted half, plus the counts."""
    o = outcomes(a, b)
    if o.size == 0:
        raise ValueError("win_rate needs at least one paired item")
    return {"win_rate": float(o.mean()), "wins": int((o == 1).sum()), "ties": int((o == 0.5).sum()),
            "losses": int((o == 0).sum()), "n": int(o.size)}


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Sample mean and its standard error std(ddof=1)/sqrt(n) (SE is 0 for a single value)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_se needs at least one value")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def kl_estimate(policy_logps: Sequence[float], reference_logps: Sequence[float]) -> tuple[float, float]:
    """Sequence KL(pi || pi_ref) estimate and its SE from samples y ~ pi.

    policy_logps, reference_logps: (S,) log pi(y_s|x_s) and log pi_ref(y_s|x_s) of the same samples.
    Unbiased for the KL because the samples come from pi; single estimates can be negative.
    """
    p, r = np.asarray(policy_logps, dtype=np.float64), np.asarray(reference_logps, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError("policy and reference log-probs must be paired")
    return mean_se(p - r)


def pair_outcomes(scores: np.ndarray) -> np.ndarray:
    """scores (K, M) of K models on the same M items -> O (K, K, M): outcome of i versus j per item."""
    s = np.asarray(scores, dtype=np.float64)
    o = (s[:, None, :] > s[None, :, :]) + 0.5 * (s[:, None, :] == s[None, :, :])
    idx = np.arange(s.shape[0])
    o[idx, idx, :] = 0.0
    return o


def win_matrix(scores: np.ndarray) -> np.ndarray:
    """scores (K, M) -> W (K, K): W[i, j] = wins of model i over model j across the M items.

    A tie on an item gives each side half a win; the diagonal is 0. W + W.T = M off the diagonal.
    """
    return pair_outcomes(scores).sum(-1)


def bradley_terry(wins: np.ndarray, prior: float = 0.1, iters: int = 1000, tol: float = 1e-10) -> np.ndarray:
    """Bradley-Terry log-strengths theta (K,), mean 0, from a win-count matrix (K, K).

    Model: P(i beats j) = exp(theta_i) / (exp(theta_i) + exp(theta_j)). Fitted by Hunter's
    MM algorithm (2004). `prior` pseudo-wins are added in both directions of every pair so a
    model that never wins keeps a finite strength.
    """
    w = np.asarray(wins, dtype=np.float64) + prior
    np.fill_diagonal(w, 0.0)
    games = w + w.T
    total_wins = w.sum(1)
    p = np.ones(w.shape[0])
    for _ in range(iters):
        denom = (games / (p[:, None] + p[None, :])).sum(1)
        new = total_wins / np.maximum(denom, 1e-300)
        new = new / np.exp(np.log(np.maximum(new, 1e-300)).mean())
        done = np.max(np.abs(np.log(np.maximum(new, 1e-300)) - np.log(p))) < tol
        p = new
        if done:
            break
    theta = np.log(np.maximum(p, 1e-300))
    return theta - theta.mean()


def bradley_terry_bootstrap(scores: np.ndarray, n_boot: int = 1000, seed: int = 0, prior: float = 0.1,
                            level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BT fit on scores (K, M) plus percentile intervals from resampling the M items.

    Returns (theta (K,), lower (K,), upper (K,)).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] == 0 or s.shape[0] < 2:
        raise ValueError("ranking needs scores of at least 2 models on at least 1 item")
    o = pair_outcomes(s)
    theta = bradley_terry(o.sum(-1), prior)
    rng = np.random.default_rng(seed)
    m = s.shape[1]
    draws = []
    for _ in range(n_boot):
        counts = np.bincount(rng.integers(0, m, m), minlength=m).astype(np.float64)
        draws.append(bradley_terry(o @ counts, prior, iters=300))  # resampled items' win counts
    draws = np.array(draws)
    tail = (1 - level) / 2
    return theta, np.quantile(draws, tail, axis=0), np.quantile(draws, 1 - tail, axis=0)


def elo(theta: np.ndarray, base: float = 1000.0) -> np.ndarray:
    """BT log-strengths on the Elo scale: 400 points = 10x the odds of winning."""
    return base + 400.0 / math.log(10.0) * np.asarray(theta)

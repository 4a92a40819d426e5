"""dpolab.stats on constructed cases whose answers are known independently of the code."""

import math

import numpy as np
import pytest

from dpolab.stats import (
    bootstrap_interval,
    bradley_terry,
    bradley_terry_bootstrap,
    elo,
    kl_estimate,
    mean_se,
    outcomes,
    proportion_interval,
    win_matrix,
    win_rate,
    wilson_interval,
)


@pytest.mark.parametrize("x, n, lo, hi", [
    (8, 10, 0.4901625, 0.9433178),   # R: prop.test(8, 10, correct=FALSE)$conf.int
    (0, 10, 0.0, 0.2775328),         # upper = z^2 / (n + z^2)
    (10, 10, 0.7224672, 1.0),
    (50, 100, 0.4038315, 0.5961685),
])
def test_wilson_known_values(x, n, lo, hi):
    got = wilson_interval(x, n)
    assert got == pytest.approx((lo, hi), abs=1e-6)


def test_wilson_accepts_half_successes_and_rejects_empty():
    # 5 ties out of 10 pairs = 5 successes: the same interval as 5/10
    assert wilson_interval(2.5 * 2, 10) == wilson_interval(5, 10)
    lo, hi = wilson_interval(5, 10)
    assert lo < 0.5 < hi and 0.5 - lo == pytest.approx(hi - 0.5)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_bootstrap_interval_of_a_mean_matches_the_normal_theory():
    x = np.random.default_rng(1).normal(3.0, 2.0, size=400)
    lo, hi = bootstrap_interval(x, n_boot=4000, seed=0)
    se = x.std(ddof=1) / math.sqrt(x.size)
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.25 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.25 * se)
    assert bootstrap_interval([0.7] * 20) == pytest.approx((0.7, 0.7))
    # a custom statistic goes through the generic path
    assert bootstrap_interval([1.0, 1.0, 1.0], statistic=np.median) == (1.0, 1.0)


def test_proportion_interval_methods():
    o = [1.0] * 30 + [0.5] * 10 + [0.0] * 10  # 35 successes of 50
    assert proportion_interval(o, "wilson") == wilson_interval(35, 50)
    lo, hi = proportion_interval(o, "bootstrap", n_boot=3000)
    assert lo < 0.7 < hi and hi - lo < 0.3
    with pytest.raises(ValueError, match="wilson or bootstrap"):
        proportion_interval(o, "exact")


def test_win_rate_counts_ties_half():
    a, b = [3, 1, 2, 2], [1, 3, 2, 0]  # win, loss, tie, win
    assert outcomes(a, b).tolist() == [1.0, 0.0, 0.5, 1.0]
    assert win_rate(a, b) == {"win_rate": 2.5 / 4, "wins": 2, "ties": 1, "losses": 1, "n": 4}
    assert win_rate([1, 1, 1], [1, 1, 1])["win_rate"] == 0.5  # identical samples: exactly a coin flip
    assert win_rate([5, 6], [1, 2])["win_rate"] == 1.0
    with pytest.raises(ValueError):
        win_rate([1, 2], [1])


def test_mean_se_by_hand():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)  # sample sd sqrt(5/3), n = 4
    assert mean_se([7.0]) == (7.0, 0.0)


def test_kl_estimate_constant_ratio_is_exact():
    mean, se = kl_estimate([-3.0, -5.0, -1.0], [-3.3, -5.3, -1.3])
    assert mean == pytest.approx(0.3) and se == pytest.approx(0.0, abs=1e-12)


def test_kl_estimate_recovers_a_known_categorical_kl():
    p = np.array([0.6, 0.3, 0.1])
    q = np.array([0.2, 0.5, 0.3])
    exact = float((p * np.log(p / q)).sum())  # 0.3961...
    y = np.random.default_rng(0).choice(3, size=20000, p=p)  # y ~ pi
    mean, se = kl_estimate(np.log(p[y]), np.log(q[y]))
    assert abs(mean - exact) < 4 * se
    true_sd = math.sqrt(float((p * np.log(p / q) ** 2).sum()) - exact**2)
    assert se == pytest.approx(true_sd / math.sqrt(y.size), rel=0.05)


def test_win_matrix_counts():
    scores = np.array([[1, 2, 3],
                       [1, 0, 5],
                       [0, 0, 0]])
    w = win_matrix(scores)
    # model 0 vs 1: tie, win, loss -> 1.5 each way; 0 vs 2: 3 wins; 1 vs 2: win, tie, win -> 2.5 and 0.5
    assert w.tolist() == [[0, 1.5, 3], [1.5, 0, 2.5], [0, 0.5, 0]]


def test_bradley_terry_two_players_closed_form():
    # P(0 beats 1) = p0 / (p0 + p1) estimated as 3/4  ->  theta0 - theta1 = ln 3
    theta = bradley_terry(np.array([[0, 30], [10, 0]]), prior=0.0)
    assert theta[0] - theta[1] == pytest.approx(math.log(3), abs=1e-8)
    assert theta.sum() == pytest.approx(0.0, abs=1e-12)


def test_bradley_terry_is_exact_on_expected_counts():
    true = np.array([1.2, 0.3, -0.4, -1.1])
    p = 1 / (1 + np.exp(-(true[:, None] - true[None, :])))
    wins = 100 * p
    np.fill_diagonal(wins, 0)
    theta = bradley_terry(wins, prior=0.0)
    assert theta == pytest.approx(true - true.mean(), abs=1e-6)


def test_bradley_terry_keeps_a_never_winning_model_finite():
    theta = bradley_terry(np.array([[0, 5], [0, 0]]), prior=0.1)
    assert np.isfinite(theta).all() and theta[0] > theta[1]


def test_bradley_terry_bootstrap_recovers_three_models():
    # Score = strength + Gumbel noise: the difference of two Gumbels is logistic, so
    # P(i beats j on an item) = sigmoid(s_i - s_j), exactly the Bradley-Terry model.
    strengths = np.array([-0.8, 0.9, 0.1])  # true order: 1, 2, 0
    rng = np.random.default_rng(3)
    scores = strengths[:, None] + rng.gumbel(size=(3, 1500))
    theta, lo, hi = bradley_terry_bootstrap(scores, n_boot=300, seed=0)
    assert list(np.argsort(-theta)) == [1, 2, 0]
    assert theta == pytest.approx(strengths - strengths.mean(), abs=0.15)
    assert (lo <= theta).all() and (theta <= hi).all()
    centred = strengths - strengths.mean()
    assert ((lo <= centred) & (centred <= hi)).all()
    with pytest.raises(ValueError):
        bradley_terry_bootstrap(scores[:1])


def test_elo_scale():
    assert elo(np.array([0.0, math.log(10)])).tolist() == pytest.approx([1000, 1400])

"""The paper's claims read off frontier points: interpolation, intervals and verdicts by hand."""

from __future__ import annotations

import math

import pytest

from dpolab.experiments.claims import above_at_equal_kl, curve_at, paper_claims, trade_off
from dpolab.stats import Z95


def pt(name, kind, kl, reward, reward_se=0.01, kl_se=0.01, beta=None):
    return {"name": name, "kind": kind, "kl": kl, "reward": reward, "reward_se": reward_se, "kl_se": kl_se,
            "beta": beta}


DPO = [pt("DPO β=1", "dpo", 1.0, 0.30, beta=1.0), pt("DPO β=0.1", "dpo", 3.0, 0.70, beta=0.1)]


def test_curve_interpolates_reward_and_se_between_points():
    at = curve_at([pt("a", "dpo", 1.0, 0.3, 0.02), pt("b", "dpo", 3.0, 0.7, 0.04)], 2.5)
    assert at["reward"] == pytest.approx(0.3 + 0.75 * 0.4) and at["reward_se"] == pytest.approx(0.035)
    assert at["how"] == "interpolated between a and b"


def test_dpo_above_at_equal_kl_with_interval():
    rloo = pt("RLOO", "rloo", 2.0, 0.40, reward_se=0.02)
    out = above_at_equal_kl(DPO, rloo)
    se = math.sqrt(0.01 ** 2 + 0.02 ** 2)
    assert out["difference"] == pytest.approx(0.10)
    assert out["ci"] == pytest.approx([0.10 - Z95 * se, 0.10 + Z95 * se])
    assert out["verdict"] == "held"
    assert above_at_equal_kl(DPO, pt("RLOO", "rloo", 2.0, 0.51))["verdict"] == "inconclusive"  # 0.50 vs 0.51
    assert above_at_equal_kl(DPO, pt("RLOO", "rloo", 2.0, 0.60))["verdict"] == "did not hold"


def test_outside_the_dpo_range_only_one_sided_evidence_counts():
    # RLOO further out than every DPO point, with less reward: DPO's point has less KL and more reward -> held
    assert above_at_equal_kl(DPO, pt("far", "rloo", 5.0, 0.40))["verdict"] == "held"
    # RLOO closer to the reference than every DPO point, with less reward: DPO spent more KL -> no overlap
    assert above_at_equal_kl(DPO, pt("near", "rloo", 0.2, 0.10))["verdict"] == "no overlap"
    # ... and with more reward than DPO's nearest point although at less KL: DPO lost
    assert above_at_equal_kl(DPO, pt("near", "rloo", 0.2, 0.50))["verdict"] == "did not hold"


def test_beta_trade_off():
    out = trade_off(DPO, "DPO beta")
    assert out["verdict"] == "held"  # beta 0.1: KL 3 > 1 and reward 0.7 > 0.3, both far outside the SEs
    flat = [pt("DPO β=1", "dpo", 1.0, 0.30, beta=1.0), pt("DPO β=0.1", "dpo", 1.01, 0.31, beta=0.1)]
    assert trade_off(flat, "DPO beta")["verdict"] == "inconclusive"


def test_claims_need_their_policies():
    points = DPO + [pt("RLOO kl=0.1", "rloo", 2.0, 0.4, beta=0.1), pt("Preferred-FT", "preferred-ft", 2.0, 0.2)]
    claims = paper_claims(points)
    assert [c["claim"] for c in claims] == [
        "DPO reaches more reward than online RL (RLOO) at equal KL",
        "DPO beta: a smaller coefficient gives more KL and more reward",
        "DPO reaches more reward than Preferred-FT at equal KL",
    ]
    assert all(c["verdict"] == "held" for c in claims)
    assert paper_claims([pt("Preferred-FT", "preferred-ft", 2.0, 0.2)]) == []

"""Which of the DPO paper's sentiment-experiment claims held on this run, read off the points.

Rafailov et al. 2023, Sec. 6.1 / Figure 2 (left) make three claims checked here:

1. DPO's reward-vs-KL frontier lies above PPO's: at equal KL to the reference, DPO reaches
   more reward (our online RL baseline is RLOO, dpolab.online);
2. beta trades reward for KL: a smaller beta moves further from the reference (more KL) and
   reaches more reward;
3. DPO lies above Preferred-FT (and the Unlikelihood baseline) at equal KL.

"At equal KL": the DPO curve is interpolated linearly between its points (sorted by KL), its
SE likewise, at the other policy's KL. Outside the DPO curve's KL range the nearest DPO point
is used, and the comparison only counts where it is one-sided evidence: a DPO point with less
KL and more reward beats it, one with more KL and less reward loses, otherwise "no overlap".

Every difference comes with a 95% normal interval, d ± 1.96 sqrt(se_a^2 + se_b^2) (the two
points' SEs treated as independent; KL taken at its estimate, its SE is in the table).
A claim "held" when every interval lies above 0, "did not hold" when every one lies below 0 or
contradicts it, else "inconclusive". The thresholds and the comparisons are fixed here, before
any run, and do not depend on the numbers.
"""

from __future__ import annotations

import math

from ..stats import Z95


def verdict(low: float, high: float) -> str:
    return "held" if low > 0 else "did not hold" if high < 0 else "inconclusive"


def difference(a: float, a_se: float, b: float, b_se: float) -> dict:
    """a - b with its 95% interval (independent SEs)."""
    d, se = a - b, math.sqrt(a_se ** 2 + b_se ** 2)
    return {"difference": d, "ci": [d - Z95 * se, d + Z95 * se], "verdict": verdict(d - Z95 * se, d + Z95 * se)}


def curve_at(curve: list[dict], kl: float) -> dict:
    """The curve's reward and SE at `kl`: linear interpolation, or the nearest end point outside."""
    pts = sorted(curve, key=lambda p: p["kl"])
    if kl <= pts[0]["kl"] or kl >= pts[-1]["kl"]:
        end = pts[0] if kl <= pts[0]["kl"] else pts[-1]
        inside = math.isclose(kl, end["kl"])
        return {"reward": end["reward"], "reward_se": end["reward_se"], "kl": end["kl"],
                "how": "at a point" if inside else f"nearest point ({end['name']})"}
    for lo, hi in zip(pts, pts[1:]):
        if lo["kl"] <= kl <= hi["kl"]:
            w = (kl - lo["kl"]) / (hi["kl"] - lo["kl"]) if hi["kl"] > lo["kl"] else 0.0
            return {"reward": (1 - w) * lo["reward"] + w * hi["reward"],
                    "reward_se": (1 - w) * lo["reward_se"] + w * hi["reward_se"], "kl": kl,
                    "how": f"interpolated between {lo['name']} and {hi['name']}"}
    raise AssertionError("unreachable: kl inside the curve's range")


def above_at_equal_kl(curve: list[dict], other: dict) -> dict:
    """Does `curve` (DPO) reach more reward than `other` at `other`'s KL?"""
    at = curve_at(curve, other["kl"])
    out = {"against": other["name"], "kl": other["kl"], "how": at["how"],
           **difference(at["reward"], at["reward_se"], other["reward"], other["reward_se"])}
    if at["how"].startswith("nearest"):  # one-sided evidence only, see the module docstring
        less_kl = at["kl"] < other["kl"]
        if (out["verdict"] == "held" and not less_kl) or (out["verdict"] == "did not hold" and less_kl):
            out["verdict"] = "no overlap"
    return out


def trade_off(curve: list[dict], label: str) -> dict:
    """Smallest vs largest coefficient: more KL and more reward for the smaller one?"""
    pts = sorted(curve, key=lambda p: p["beta"])
    small, large = pts[0], pts[-1]
    kl = difference(small["kl"], small["kl_se"], large["kl"], large["kl_se"])
    reward = difference(small["reward"], small["reward_se"], large["reward"], large["reward_se"])
    both = [kl["verdict"], reward["verdict"]]
    overall = "held" if both == ["held", "held"] else "did not hold" if "did not hold" in both else "inconclusive"
    return {"claim": f"{label}: a smaller coefficient gives more KL and more reward", "verdict": overall,
            "comparisons": [{"against": f"{small['name']} vs {large['name']}: KL", **kl},
                            {"against": f"{small['name']} vs {large['name']}: reward", **reward}]}


def overall(comparisons: list[dict]) -> str:
    kinds = {c["verdict"] for c in comparisons}
    if kinds == {"held"}:
        return "held"
    if "did not hold" in kinds and "held" not in kinds:
        return "did not hold"
    return "inconclusive"


def paper_claims(points: list[dict]) -> list[dict]:
    """The claims that this run's points can speak to (a claim needs its policies in the run)."""
    by_kind: dict[str, list[dict]] = {}
    for p in points:
        by_kind.setdefault(p["kind"], []).append(p)
    dpo, rloo = by_kind.get("dpo", []), by_kind.get("rloo", [])
    claims = []
    if dpo and rloo:
        comparisons = [above_at_equal_kl(dpo, p) for p in sorted(rloo, key=lambda p: p["kl"])]
        claims.append({"claim": "DPO reaches more reward than online RL (RLOO) at equal KL",
                       "verdict": overall(comparisons), "comparisons": comparisons})
    if len(dpo) >= 2:
        claims.append(trade_off(dpo, "DPO beta"))
    if len(rloo) >= 2:
        claims.append(trade_off(rloo, "RLOO KL coefficient"))
    for kind, name in (("preferred-ft", "Preferred-FT"), ("unlikelihood", "Unlikelihood")):
        if dpo and by_kind.get(kind):
            comparisons = [above_at_equal_kl(dpo, p) for p in by_kind[kind]]
            claims.append({"claim": f"DPO reaches more reward than {name} at equal KL",
                           "verdict": overall(comparisons), "comparisons": comparisons})
    return claims


def claim_rows(claims: list[dict]) -> list[list[str]]:
    rows = []
    for c in claims:
        for i, comp in enumerate(c["comparisons"]):
            low, high = comp["ci"]
            rows.append([c["claim"] if i == 0 else "", c["verdict"] if i == 0 else "", comp["against"],
                         f"{comp['difference']:+.3f} [{low:+.3f}, {high:+.3f}]", comp["verdict"], comp.get("how", "")])
    return rows


CLAIM_COLUMNS = ["paper's claim", "on this run", "comparison", "difference [95% CI]", "this comparison", "DPO read"]

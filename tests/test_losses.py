"""Tests for dpolab.losses. Expected values are computed by hand with the math module on
scalars, never by calling the code under test."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dpolab.losses import (
    LOSSES,
    REFERENCE_FREE,
    LossParams,
    PairLogps,
    compute_loss,
)

LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def _subnormals_on():
    # dpolab.train sets flush-to-zero process-wide (flush_denormal); hypothesis refuses to draw
    # floats while subnormals cannot be represented, so a training test earlier in the same
    # process would make these tests error. Restore IEEE behaviour for them.
    torch.set_flush_denormal(False)
    yield
REFERENCE_BASED = sorted(set(LOSSES) - REFERENCE_FREE)


def nls(z: float) -> float:
    """-log sigmoid(z) = log(1 + e^-z), by hand."""
    return math.log1p(math.exp(-z))


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def pair(pc, pr, rc, rr, lw=5, ll=8, dtype=torch.float64) -> PairLogps:
    t = lambda v: None if v is None else torch.tensor([v], dtype=dtype)  # noqa: E731
    return PairLogps(t(pc), t(pr), t(rc), t(rr), torch.tensor([lw]), torch.tensor([ll]))


# The worked example: dc = 1.5, dr = -0.5, h = 2; |y_w| = 5, |y_l| = 8.
PC, PR, RC, RR = -10.5, -15.5, -12.0, -15.0
MW, ML = PC / 5, PR / 8  # mean token log-probs -2.1, -1.9375


def lo(m: float) -> float:
    """log odds of a mean token log-prob m, by hand."""
    return m - math.log(1 - math.exp(m))


# name -> (params, expected loss, expected chosen reward, expected rejected reward)
KNOWN = {
    "sigmoid": (LossParams(beta=0.5), math.log(1 + math.exp(-1)), 0.75, -0.25),
    "cdpo": (LossParams(beta=0.5, label_smoothing=0.1), 0.9 * nls(1) + 0.1 * nls(-1), 0.75, -0.25),
    "robust": (
        LossParams(beta=0.5, label_smoothing=0.1),
        (0.9 * nls(1) - 0.1 * nls(-1)) / 0.8,  # + eps log s(-z) = - eps * nls(-z)
        0.75,
        -0.25,
    ),
    "ipo": (LossParams(beta=0.5), (2 - 1) ** 2, 0.75, -0.25),
    "hinge": (LossParams(beta=0.25), 1 - 0.25 * 2, 0.375, -0.125),
    "rdpo": (LossParams(beta=0.5, alpha=0.01), nls(1 - 0.01 * (5 - 8)), 0.75, -0.25),
    "nca_pair": (LossParams(beta=0.5), nls(0.75) + 0.5 * nls(-0.75) + 0.5 * nls(0.25), 0.75, -0.25),
    "bco_pair": (LossParams(beta=0.5), nls(0.75) + nls(0.25), 0.75, -0.25),
    "apo_zero": (LossParams(beta=0.5), 1 - sig(0.75) + sig(-0.25), 0.75, -0.25),
    "simpo": (LossParams(beta=0.5, gamma=0.5), nls(0.5 * (MW - ML) - 0.5), 0.5 * MW, 0.5 * ML),
    "orpo": (LossParams(beta=0.5), -MW + 0.5 * nls(lo(MW) - lo(ML)), 0.5 * MW, 0.5 * ML),
    "apo_down": (LossParams(beta=0.5), sig(0.75) + 1 - sig(1), 0.75, -0.25),
    "exo_pair": (
        LossParams(beta=0.5, label_smoothing=0.1),
        sig(1) * (math.log(sig(1)) - math.log(0.9)) + sig(-1) * (math.log(sig(-1)) - math.log(0.1)),
        0.75,
        -0.25,
    ),
    "sppo_hard": (LossParams(beta=0.5), (1.5 - 1) ** 2 + (-0.5 + 1) ** 2, 0.75, -0.25),
    "discopop": (
        LossParams(beta=0.5, discopop_tau=0.05),
        (1 - sig(20)) * nls(1) + sig(20) * math.exp(-1),
        0.75,
        -0.25,
    ),
    # one pair: the sorted batch is the pair itself, so AOT is cDPO on h = 2
    "aot": (LossParams(beta=0.5, label_smoothing=0.1), 0.9 * nls(1) + 0.1 * nls(-1), 0.75, -0.25),
    "aot_unpaired": (LossParams(beta=0.5, label_smoothing=0.1), 0.9 * nls(1) + 0.1 * nls(-1), 0.75, -0.25),
    "sft": (LossParams(beta=0.5), -MW, 0.5 * MW, 0.5 * ML),
}


def test_every_loss_has_a_known_value():
    assert set(KNOWN) == set(LOSSES)
    assert REFERENCE_FREE == frozenset({"simpo", "orpo", "sft"})


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_margin_gives_known_loss_and_rewards(name):
    params, loss, rw, rl = KNOWN[name]
    free = name in REFERENCE_FREE
    logps = pair(PC, PR, None if free else RC, None if free else RR)
    out = compute_loss(name, logps, params)
    assert out.losses.shape == (1,)
    assert out.losses.item() == pytest.approx(loss, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(rw, rel=1e-12)
    assert out.rejected_rewards.item() == pytest.approx(rl, rel=1e-12)
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_sigmoid_h2_beta05_is_log_1_plus_e_minus_1():
    out = compute_loss("sigmoid", pair(-3.0, -5.0, -4.0, -4.0), LossParams(beta=0.5))
    assert out.losses.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-12)


@pytest.mark.parametrize(
    "name,params,expected",
    [
        ("sigmoid", LossParams(beta=0.1), LN2),
        ("cdpo", LossParams(label_smoothing=0.2), LN2),
        ("robust", LossParams(label_smoothing=0.0), LN2),
        ("robust", LossParams(label_smoothing=0.1), LN2),
        ("robust", LossParams(label_smoothing=0.49), LN2),
        ("rdpo", LossParams(alpha=0.0), LN2),
        ("nca_pair", LossParams(), 2 * LN2),  # ln2 + 0.5 ln2 + 0.5 ln2
        ("bco_pair", LossParams(), 2 * LN2),
        ("apo_zero", LossParams(), 1.0),
        ("ipo", LossParams(beta=0.1), 25.0),  # (0 - 1/0.2)^2
        ("hinge", LossParams(), 1.0),
        ("apo_down", LossParams(), 1.0),  # s(0) + 1 - s(0)
        ("sppo_hard", LossParams(beta=0.1), 50.0),  # (0 - 5)^2 + (0 + 5)^2
        ("discopop", LossParams(), 0.5 * LN2 + 0.5),  # m = s(0) = 1/2 of ln 2 and of e^0
        ("exo_pair", LossParams(label_smoothing=0.1), 0.5 * (math.log(0.5 / 0.9) + math.log(0.5 / 0.1))),
        ("aot", LossParams(), LN2),
        ("aot_unpaired", LossParams(label_smoothing=0.3), LN2),
    ],
)
def test_policy_equal_reference(name, params, expected):
    lp = torch.tensor([-7.0, -30.0, -1.5], dtype=torch.float64)
    lr = torch.tensor([-9.0, -2.0, -44.0], dtype=torch.float64)
    n = torch.tensor([4, 9, 20])
    out = compute_loss(name, PairLogps(lp, lr, lp.clone(), lr.clone(), n, n), params)
    assert out.losses.shape == (3,)
    torch.testing.assert_close(out.losses, torch.full((3,), expected, dtype=torch.float64))
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_sft_term_adds_weighted_nll(name):
    params, loss, _, _ = KNOWN[name]
    w = 0.3
    free = name in REFERENCE_FREE
    logps = pair(PC, PR, None if free else RC, None if free else RR)
    with_sft = dataclasses.replace(params, sft_weight=w)
    out = compute_loss(name, logps, with_sft)
    assert out.losses.item() == pytest.approx(loss + w * (10.5 / 5), rel=1e-12)


def test_sft_nll_accepts_float_lengths():
    lp = PairLogps(
        torch.tensor([-6.0]), torch.tensor([-6.0]), torch.tensor([-6.0]), torch.tensor([-6.0]),
        torch.tensor([4.0]), torch.tensor([3.0]),
    )
    out = compute_loss("sigmoid", lp, LossParams(sft_weight=2.0))
    assert out.losses.item() == pytest.approx(LN2 + 2.0 * 6.0 / 4.0, rel=1e-6)


@pytest.mark.parametrize("name", sorted(REFERENCE_FREE))
def test_reference_free_losses_ignore_reference(name):
    params = KNOWN[name][0]
    without = compute_loss(name, pair(PC, PR, None, None), params)
    with_ref = compute_loss(name, pair(PC, PR, -123.0, 45.0), params)
    assert torch.equal(without.losses, with_ref.losses)
    assert torch.equal(without.chosen_rewards, with_ref.chosen_rewards)


@pytest.mark.parametrize("name", REFERENCE_BASED)
def test_reference_based_losses_need_reference(name):
    with pytest.raises(ValueError, match="reference"):
        compute_loss(name, pair(PC, PR, None, None), LossParams())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        compute_loss("dpo++", pair(PC, PR, RC, RR), LossParams())
    for name in LOSSES:
        assert name in str(info.value)


@pytest.mark.parametrize("eps", [0.5, 0.7, -0.1])
def test_robust_rejects_eps_outside_range(eps):
    logps = pair(PC, PR, RC, RR)
    with pytest.raises(ValueError, match="label_smoothing"):
        compute_loss("robust", logps, LossParams(label_smoothing=eps))
    with pytest.raises(ValueError):
        LOSSES["robust"](logps, LossParams(label_smoothing=eps))


def test_params_reject_nonpositive_beta():
    with pytest.raises(ValueError, match="beta"):
        LossParams(beta=0.0)


def test_zero_length_completion_does_not_give_nan():
    z = torch.zeros(1)
    lp = PairLogps(z, torch.tensor([-3.0]), None, None, torch.tensor([0]), torch.tensor([2]))
    for name in REFERENCE_FREE:
        assert torch.isfinite(compute_loss(name, lp, LossParams(sft_weight=1.0)).losses).all()


def test_orpo_certain_completion_has_finite_gradient():
    # m == 0 means p == 1: infinite odds; the gradient must stay finite, not NaN.
    pc = torch.tensor([0.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    n = torch.tensor([3])
    out = compute_loss("orpo", PairLogps(pc, pr, None, None, n, n), LossParams())
    out.losses.sum().backward()
    assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradients_match_finite_differences(name):
    # Two pairs, away from the hinge kink; policy log-probs negative as real ones are.
    pc = torch.tensor([-10.5, -3.2], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-15.5, -2.1], dtype=torch.float64, requires_grad=True)
    rc = torch.tensor([-12.0, -2.0], dtype=torch.float64, requires_grad=True)
    rr = torch.tensor([-15.0, -3.7], dtype=torch.float64, requires_grad=True)
    lw, ll = torch.tensor([5, 3]), torch.tensor([8, 2])
    params = LossParams(beta=0.25, label_smoothing=0.1, sft_weight=0.2)
    free = name in REFERENCE_FREE

    def f(pc, pr, rc, rr):
        return compute_loss(name, PairLogps(pc, pr, rc, rr, lw, ll), params).losses

    if free:
        assert torch.autograd.gradcheck(lambda a, b: f(a, b, None, None), (pc, pr))
    else:
        assert torch.autograd.gradcheck(f, (pc, pr, rc, rr))


@settings(max_examples=40, deadline=None)
@given(
    h=st.floats(-50, 50),
    beta=st.floats(0.01, 2.0),
    dr=st.floats(-20, 20),
)
def test_cdpo_with_zero_eps_equals_sigmoid(h, beta, dr):
    lp = pair(-30.0 + dr + h, -30.0 + dr, -30.0, -30.0)
    a = compute_loss("cdpo", lp, LossParams(beta=beta, label_smoothing=0.0))
    b = compute_loss("sigmoid", lp, LossParams(beta=beta))
    torch.testing.assert_close(a.losses, b.losses)


@settings(max_examples=30, deadline=None)
@given(h=st.one_of(st.sampled_from([1e4, -1e4]), st.floats(-1e4, 1e4)))
def test_losses_and_gradients_finite_for_large_margins(h):
    # float32, as in training; policy log-probs stay <= 0 so ORPO's log-odds are defined.
    pc_v, pr_v = (-1.0, -1.0 - h) if h >= 0 else (-1.0 + h, -1.0)
    params = LossParams(beta=1.0, label_smoothing=0.2, sft_weight=0.1)
    for name in LOSSES:
        pc = torch.tensor([pc_v], requires_grad=True)
        pr = torch.tensor([pr_v], requires_grad=True)
        ref = None if name in REFERENCE_FREE else torch.zeros(1)
        lp = PairLogps(pc, pr, ref, ref, torch.tensor([3]), torch.tensor([3]))
        out = compute_loss(name, lp, params)
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all(), name
        assert torch.isfinite(pc.grad).all(), name
        assert (name == "sft" and pr.grad is None) or torch.isfinite(pr.grad).all(), name


# ------------------------------------------------------------------ issue 15: the rest of the family


def batch(pc, pr, rc, rr, lw=None, ll=None) -> PairLogps:
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    n = len(pc)
    lw = torch.tensor(lw or [4] * n)
    ll = torch.tensor(ll or [4] * n)
    return PairLogps(t(pc), t(pr), t(rc), t(rr), lw, ll)


def test_aot_sorts_policy_and_reference_margins_separately():
    # pc - pr = [3, -1, 0.5] sorts to [-1, 0.5, 3]; rc - rr = [0, 2, -1] sorts to [-1, 0, 2]
    x = batch([3.0, -1.0, 0.5], [0.0, 0.0, 0.0], [0.0, 2.0, -1.0], [0.0, 0.0, 0.0])
    out = compute_loss("aot", x, LossParams(beta=1.0))
    expected = [nls(0.0), nls(0.5), nls(1.0)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)
    # rewards stay per pair, in pair order: beta * dc
    assert out.chosen_rewards.tolist() == pytest.approx([3.0, -3.0, 1.5])


def test_aot_unpaired_sorts_chosen_and_rejected_log_ratios_separately():
    # dc = [1, -2, 0.3] -> [-2, 0.3, 1]; dr = [0.5, 0.5, -1] -> [-1, 0.5, 0.5]
    x = batch([1.0, -2.0, 0.3], [0.5, 0.5, -1.0], [0.0] * 3, [0.0] * 3)
    out = compute_loss("aot_unpaired", x, LossParams(beta=2.0, label_smoothing=0.1))
    expected = [0.9 * nls(2 * d) + 0.1 * nls(-2 * d) for d in (-1.0, -0.2, 0.5)]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_aot_matches_trl_on_a_batch():
    # TRL 1.16 (loss_type="aot"): sort(chosen_logps - rejected_logps) - sort(ref margins), then
    # -(1-eps) log s(beta delta) - eps log s(-beta delta); written out here on scalars.
    pc, pr, rc, rr = [-4.0, -9.0, -2.5, -7.0], [-6.0, -3.0, -2.0, -7.5], [-5.0, -8.0, -2.0, -6.0], [-5.5, -4.0, -3.0, -6.0]
    beta, eps = 0.3, 0.05
    pol = sorted(a - b for a, b in zip(pc, pr))
    ref = sorted(a - b for a, b in zip(rc, rr))
    expected = [(1 - eps) * nls(beta * (a - b)) + eps * nls(-beta * (a - b)) for a, b in zip(pol, ref)]
    out = compute_loss("aot", batch(pc, pr, rc, rr), LossParams(beta=beta, label_smoothing=eps))
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-12)


def test_exo_pair_needs_positive_label_smoothing():
    with pytest.raises(ValueError, match="1e-3"):
        compute_loss("exo_pair", pair(PC, PR, RC, RR), LossParams())


def test_discopop_stays_finite_where_exp_minus_z_overflows():
    x = pair(-1.0, -1.0, 0.0, -5000.0, dtype=torch.float32)  # h = -5000, e^{+2500} overflows
    out = compute_loss("discopop", x, LossParams(beta=0.5))
    assert torch.isfinite(out.losses).all()
    assert out.losses.item() == pytest.approx(2500.0, rel=1e-6)  # -log s(-2500) = 2500, m ~ 0


# f-divergences at the worked example: dc = 1.5, dr = -0.5, beta = 0.5
def fdiv(kind: str, **kw) -> float:
    return compute_loss("sigmoid", pair(PC, PR, RC, RR), LossParams(beta=0.5, f_divergence=kind, **kw)).losses.item()


def test_reverse_kl_is_dpo():
    assert fdiv("reverse_kl") == pytest.approx(nls(1.0), rel=1e-12)


def test_forward_kl_uses_minus_inverse_ratio():
    # f'(u) = -1/u (+ a constant that cancels): scores -e^{-dc}, -e^{-dr}
    assert fdiv("forward_kl") == pytest.approx(nls(0.5 * (-math.exp(-1.5) + math.exp(0.5))), rel=1e-12)


def test_js_divergence_uses_log_2u_over_1_plus_u():
    u_w, u_l = math.exp(1.5), math.exp(-0.5)
    z = 0.5 * (math.log(2 * u_w / (1 + u_w)) - math.log(2 * u_l / (1 + u_l)))
    assert fdiv("js_divergence") == pytest.approx(nls(z), rel=1e-12)


def test_alpha_divergence_paper_form_and_limits():
    a = 0.3
    u_w, u_l = math.exp(1.5), math.exp(-0.5)
    z = 0.5 * ((1 - u_w ** -a) / a - (1 - u_l ** -a) / a)
    assert fdiv("alpha_divergence", f_alpha=a) == pytest.approx(nls(z), rel=1e-12)
    # alpha = 1 is forward KL, alpha -> 0 reverse KL (the f-DPO paper, Table 1)
    assert fdiv("alpha_divergence", f_alpha=1.0) == pytest.approx(fdiv("forward_kl"), rel=1e-12)
    assert fdiv("alpha_divergence", f_alpha=1e-9) == pytest.approx(fdiv("reverse_kl"), rel=1e-6)


def test_alpha_divergence_matches_trl_with_coefficient_one_minus_alpha():
    # TRL 1.16: scores = (u^(c-1) - 1)/(c-1) with c = f_alpha_divergence_coef; ours use alpha = 1 - c.
    c = 0.8
    u_w, u_l = math.exp(1.5), math.exp(-0.5)
    trl = lambda u: (u ** (c - 1) - 1) / (c - 1)  # noqa: E731
    assert fdiv("alpha_divergence", f_alpha=1 - c) == pytest.approx(nls(0.5 * (trl(u_w) - trl(u_l))), rel=1e-12)


def test_f_divergence_refused_for_losses_on_single_log_ratios():
    with pytest.raises(ValueError, match="reverse_kl"):
        compute_loss("bco_pair", pair(PC, PR, RC, RR), LossParams(f_divergence="forward_kl"))
    with pytest.raises(ValueError, match="f_divergence"):
        LossParams(f_divergence="chi2")


@pytest.mark.parametrize("name", ["sigmoid", "cdpo", "robust", "ipo", "hinge", "exo_pair", "discopop"])
def test_f_divergence_losses_finite_for_large_margins(name):
    for kind in ("forward_kl", "alpha_divergence", "js_divergence"):
        pc = torch.tensor([-1.0, -5000.0], requires_grad=True)
        pr = torch.tensor([-5000.0, -1.0], requires_grad=True)
        z = torch.zeros(2)
        out = compute_loss(name, PairLogps(pc, pr, z, z, torch.tensor([3, 3]), torch.tensor([3, 3])),
                           LossParams(f_divergence=kind, label_smoothing=0.1))
        out.losses.sum().backward()
        assert torch.isfinite(out.losses).all() and torch.isfinite(pc.grad).all(), (name, kind)


def test_ipo_average_logps_is_trls_per_token_mean():
    # dc/|y_w| = 1.5/5 = 0.3, dr/|y_l| = -0.5/8 = -0.0625, beta 0.5 -> (0.3625 - 1)^2
    out = compute_loss("ipo", pair(PC, PR, RC, RR), LossParams(beta=0.5, ipo_average_logps=True))
    assert out.losses.item() == pytest.approx((0.3625 - 1) ** 2, rel=1e-12)
    summed = compute_loss("ipo", pair(PC, PR, RC, RR), LossParams(beta=0.5))
    assert summed.losses.item() == pytest.approx((2 - 1) ** 2, rel=1e-12)


def test_sft_token_weighted_is_one_mean_over_the_batch_tokens():
    # pc = [-10, -3], |y_w| = [5, 1]: per pair mean(2, 3) = 2.5; per token 13 / 6
    x = batch([-10.0, -3.0], [-1.0, -1.0], [-10.0, -3.0], [-1.0, -1.0], lw=[5, 1])
    pair_w = compute_loss("sft", x, LossParams()).losses.mean().item()
    token_w = compute_loss("sft", x, LossParams(sft_token_weighted=True)).losses.mean().item()
    assert pair_w == pytest.approx(2.5, rel=1e-12)
    assert token_w == pytest.approx(13 / 6, rel=1e-12)
    rpo = compute_loss("sigmoid", x, LossParams(sft_weight=1.0, sft_token_weighted=True)).losses.mean().item()
    assert rpo == pytest.approx(LN2 + 13 / 6, rel=1e-12)


def test_mpo_is_a_weighted_sum_of_sigmoid_bco_and_sft():
    params = LossParams(beta=0.5, loss_weights=(0.8, 0.2, 1.0))
    out = compute_loss("sigmoid,bco_pair,sft", pair(PC, PR, RC, RR), params)
    expected = 0.8 * nls(1) + 0.2 * (nls(0.75) + nls(0.25)) + 1.0 * 2.1
    assert out.losses.item() == pytest.approx(expected, rel=1e-12)
    assert out.chosen_rewards.item() == pytest.approx(0.75)  # the first component's rewards
    unweighted = compute_loss("sigmoid, sft", pair(PC, PR, RC, RR), LossParams(beta=0.5))
    assert unweighted.losses.item() == pytest.approx(nls(1) + 2.1, rel=1e-12)


def test_combined_loss_checks_weights_names_and_reference():
    with pytest.raises(ValueError, match="2 loss_weights for 3"):
        compute_loss("sigmoid,bco_pair,sft", pair(PC, PR, RC, RR), LossParams(loss_weights=(1.0, 2.0)))
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        compute_loss("sigmoid,nope", pair(PC, PR, RC, RR), LossParams())
    with pytest.raises(ValueError, match="reference"):
        compute_loss("simpo,sigmoid", pair(PC, PR, None, None), LossParams())
    assert compute_loss("simpo,sft", pair(PC, PR, None, None), LossParams()).losses.shape == (1,)


def test_wpo_weights_pairs_by_mean_token_probability():
    # mean token log-probs -2.1 and -1.9375: weight e^{-4.0375}
    params = LossParams(beta=0.5, wpo=True)
    out = compute_loss("sigmoid", pair(PC, PR, RC, RR), params)
    assert out.losses.item() == pytest.approx(nls(1) * math.exp(-2.1 - 1.9375), rel=1e-12)
    # the weight is a constant: the gradient is the weighted DPO gradient
    pc = torch.tensor([PC], dtype=torch.float64, requires_grad=True)
    x = PairLogps(pc, torch.tensor([PR], dtype=torch.float64), torch.tensor([RC], dtype=torch.float64),
                  torch.tensor([RR], dtype=torch.float64), torch.tensor([5]), torch.tensor([8]))
    compute_loss("sigmoid", x, params).losses.sum().backward()
    assert pc.grad.item() == pytest.approx(-0.5 * sig(-1) * math.exp(-4.0375), rel=1e-12)
    with pytest.raises(ValueError, match="quantiles"):
        compute_loss("aot", pair(PC, PR, RC, RR), params)

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
}


def test_every_loss_has_a_known_value():
    assert set(KNOWN) == set(LOSSES)
    assert REFERENCE_FREE == frozenset({"simpo", "orpo"})


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
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all(), name

"""Per-pair preference losses: pure functions of sequence log-probs.

Notation (all tensors have shape ``(B,)``, one entry per preference pair):
``pc, pr`` are the policy log-probs of the chosen (y_w) and rejected (y_l) completion,
``rc, rr`` the same under the frozen reference, each the SUM of the per-token log-probs of
the completion tokens only; ``dc = pc - rc``, ``dr = pr - rr``, ``h = dc - dr``; ``s`` is the
logistic sigmoid; ``|y|`` is the completion length in tokens.

========  ===========================================================  ===========================
name      per-pair loss                                                source
========  ===========================================================  ===========================
sigmoid   -log s(beta h)                                               Rafailov et al. 2023, Eq. 7
cdpo      -(1-eps) log s(beta h) - eps log s(-beta h)                  label smoothing (cDPO)
robust    [-(1-eps) log s(beta h) + eps log s(-beta h)] / (1-2eps)     Chowdhury et al. 2024
ipo       (h - 1/(2 beta))^2                                           Azar et al. 2023
hinge     max(0, 1 - beta h)                                           SLiC, Zhao et al. 2023
simpo     -log s(beta (pc/|y_w| - pr/|y_l|) - gamma)                   Meng et al. 2024 (ref-free)
orpo      NLL(y_w) - beta log s(logodds_w - logodds_l)                 Hong et al. 2024 (ref-free)
rdpo      -log s(beta h - alpha (|y_w| - |y_l|))                       Park et al. 2024
nca_pair  -log s(beta dc) - 0.5 log s(-beta dc) - 0.5 log s(-beta dr)  Chen et al. 2024
bco_pair  -log s(beta dc) - log s(-beta dr)                            Jung et al. 2024
apo_zero  1 - s(beta dc) + s(beta dr)                                  D'Oosterlinck et al. 2024
========  ===========================================================  ===========================

``NLL(y_w) = -pc / |y_w|`` is the per-token mean negative log-likelihood of the chosen
completion. :func:`compute_loss` adds ``sft_weight * NLL(y_w)`` to any loss (the RPO term,
which anchors the chosen log-probs that plain DPO lets fall).

Every function returns per-pair values; reduction (mean over pairs, accumulation) belongs to
the trainer. Rewards are detached: reference-based losses report the implicit DPO reward
``beta * dc`` / ``beta * dr``; SimPO and ORPO, which have no reference, report
``beta * (mean token log-prob)``.

Example::

    out = compute_loss("sigmoid", PairLogps(pc, pr, rc, rr, len_w, len_l), LossParams(beta=0.1))
    out.losses.mean().backward()
"""

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairLogps(NamedTuple):
    """All shapes (B,) float tensors; B = number of pairs."""

    # sum of per-token log-probs of the chosen completion under the policy
    policy_chosen_logps: Tensor
    policy_rejected_logps: Tensor
    reference_chosen_logps: Tensor | None  # None for reference-free losses
    reference_rejected_logps: Tensor | None
    chosen_lengths: Tensor  # number of completion tokens (float or int), (B,)
    rejected_lengths: Tensor


@dataclass(frozen=True)
class LossParams:
    """Hyper-parameters shared by the loss family; each loss reads only the ones it needs."""

    beta: float = 0.1  # KL strength (DPO family); ORPO's lambda; SimPO's reward scale
    label_smoothing: float = 0.0  # eps for cdpo / robust: assumed rate of flipped labels
    gamma: float = 0.5  # SimPO target margin
    alpha: float = 0.01  # R-DPO length penalty
    sft_weight: float = 0.0  # RPO: + w * NLL(y_w) added to any loss

    def __post_init__(self) -> None:
        # beta divides in IPO and scales every reward; zero or negative beta is never meant.
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")


class LossOutput(NamedTuple):
    losses: Tensor  # (B,) per-pair loss (SFT term included)
    chosen_rewards: Tensor  # (B,) detached
    rejected_rewards: Tensor  # (B,) detached


# ---------------------------------------------------------------------------------- helpers


def _margins(x: PairLogps) -> tuple[Tensor, Tensor]:
    """(dc, dr), each (B,): policy minus reference log-probs of chosen and rejected."""
    return (
        x.policy_chosen_logps - x.reference_chosen_logps,
        x.policy_rejected_logps - x.reference_rejected_logps,
    )


def _reference_rewards(x: PairLogps, p: LossParams) -> tuple[Tensor, Tensor]:
    """Implicit DPO rewards beta*dc, beta*dr, each (B,), detached (they are for logging)."""
    dc, dr = _margins(x)
    return (p.beta * dc).detach(), (p.beta * dr).detach()


def _mean_logps(logps: Tensor, lengths: Tensor) -> Tensor:
    """Per-token mean log-prob logp/|y|, (B,).

    Lengths are clamped to 1 because a completion truncated to nothing has logp = 0 and would
    otherwise give 0/0 = NaN, which poisons the whole batch's gradient.
    """
    return logps / lengths.to(logps.dtype).clamp(min=1)


def _log1mexp(m: Tensor) -> Tensor:
    """log(1 - exp(m)) for m < 0, (B,), accurate over the whole range (Maechler 2012).

    log(-expm1(m)) is exact near 0, log1p(-exp(m)) for very negative m; the switch is at -ln 2.
    The log1p branch is evaluated on min(m, -ln 2) so that the branch torch.where discards
    cannot produce inf whose gradient (0 * inf) would turn into NaN.
    """
    switch = -0.6931471805599453
    near_zero = torch.log(-torch.expm1(m))
    far = torch.log1p(-torch.exp(torch.clamp(m, max=switch)))
    return torch.where(m > switch, near_zero, far)


def _sft_nll(x: PairLogps) -> Tensor:
    """NLL(y_w) = -pc/|y_w|, (B,): per-token mean negative log-likelihood of y_w."""
    return -_mean_logps(x.policy_chosen_logps, x.chosen_lengths)


# ----------------------------------------------------------------------- reference-based losses


def sigmoid_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """DPO: -log s(beta h), (B,). Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7."""
    dc, dr = _margins(x)
    losses = -F.logsigmoid(p.beta * (dc - dr))
    return LossOutput(losses, *_reference_rewards(x, p))


def cdpo_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """Conservative DPO: -(1-eps) log s(beta h) - eps log s(-beta h), (B,).

    Label smoothing with eps = params.label_smoothing: the target preference is 1-eps instead
    of 1, so the loss has a finite minimum instead of pushing h to infinity (Mitchell 2023,
    "A note on DPO with noisy preferences"). eps = 0 is plain DPO.
    """
    dc, dr = _margins(x)
    z = p.beta * (dc - dr)
    eps = p.label_smoothing
    losses = -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)
    return LossOutput(losses, *_reference_rewards(x, p))


def robust_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """Robust DPO: [-(1-eps) log s(beta h) + eps log s(-beta h)] / (1-2eps), (B,).

    Chowdhury et al. 2024, "Provably Robust DPO": an unbiased estimate of the clean DPO loss when
    labels are flipped with known rate eps = params.label_smoothing. It needs 0 <= eps < 0.5
    (at 0.5 the labels carry no information and the denominator vanishes). Unlike cDPO the
    per-pair value can be negative.
    """
    eps = p.label_smoothing
    if not 0 <= eps < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {eps}")
    dc, dr = _margins(x)
    z = p.beta * (dc - dr)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, *_reference_rewards(x, p))


def ipo_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """IPO: (h - 1/(2 beta))^2, (B,). Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences".

    Regresses the margin to a finite target instead of pushing it to infinity. As in the paper,
    h is built from SUMMED log-probs. TRL (loss_type="ipo") uses per-token MEAN log-probs here,
    so its h, and the beta that suits it, differ from ours by the completion lengths; to
    reproduce TRL, pass logps already divided by the lengths.
    """
    dc, dr = _margins(x)
    losses = (dc - dr - 1 / (2 * p.beta)) ** 2
    return LossOutput(losses, *_reference_rewards(x, p))


def hinge_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """SLiC hinge: max(0, 1 - beta h), (B,). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback" (calibration loss with the reference log-ratio margin)."""
    dc, dr = _margins(x)
    losses = F.relu(1 - p.beta * (dc - dr))
    return LossOutput(losses, *_reference_rewards(x, p))


def rdpo_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """R-DPO: -log s(beta h - alpha (|y_w| - |y_l|)), (B,). Park et al. 2024, "Disentangling
    Length from Quality in Direct Preference Optimization".

    The length term removes the reward the policy would otherwise earn just by making chosen
    answers longer than rejected ones.
    """
    dc, dr = _margins(x)
    dtype = dc.dtype
    length_gap = x.chosen_lengths.to(dtype) - x.rejected_lengths.to(dtype)
    losses = -F.logsigmoid(p.beta * (dc - dr) - p.alpha * length_gap)
    return LossOutput(losses, *_reference_rewards(x, p))


def nca_pair_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """NCA (pairwise): -log s(beta dc) - 0.5 log s(-beta dc) - 0.5 log s(-beta dr), (B,).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards".
    Scores each response's own reward rather than only the difference, so the chosen
    likelihood is not allowed to fall along with the rejected one.
    """
    dc, dr = _margins(x)
    zc, zr = p.beta * dc, p.beta * dr
    losses = -F.logsigmoid(zc) - 0.5 * F.logsigmoid(-zc) - 0.5 * F.logsigmoid(-zr)
    return LossOutput(losses, *_reference_rewards(x, p))


def bco_pair_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """BCO (pairwise): -log s(beta dc) - log s(-beta dr), (B,). Jung et al. 2024, "Binary
    Classifier Optimization for Large Language Model Alignment" (without the reward shift delta):
    chosen classified as good, rejected as bad, each on its own reward."""
    dc, dr = _margins(x)
    losses = -F.logsigmoid(p.beta * dc) - F.logsigmoid(-p.beta * dr)
    return LossOutput(losses, *_reference_rewards(x, p))


def apo_zero_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """APO-zero: 1 - s(beta dc) + s(beta dr), (B,). D'Oosterlinck et al. 2024, "Anchored
    Preference Optimization and Contrastive Revisions": raises the chosen likelihood and lowers
    the rejected one, for data whose chosen answers beat the current model."""
    dc, dr = _margins(x)
    losses = 1 - torch.sigmoid(p.beta * dc) + torch.sigmoid(p.beta * dr)
    return LossOutput(losses, *_reference_rewards(x, p))


# ------------------------------------------------------------------------ reference-free losses


def simpo_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """SimPO: -log s(beta (pc/|y_w| - pr/|y_l|) - gamma), (B,). Meng et al. 2024, "SimPO: Simple
    Preference Optimization with a Reference-Free Reward".

    Reference-free: the reward is the length-normalised policy log-prob beta * logp/|y|, which
    the rewards report (detached). gamma = params.gamma is the target reward margin.
    """
    reward_w = p.beta * _mean_logps(x.policy_chosen_logps, x.chosen_lengths)
    reward_l = p.beta * _mean_logps(x.policy_rejected_logps, x.rejected_lengths)
    losses = -F.logsigmoid(reward_w - reward_l - p.gamma)
    return LossOutput(losses, reward_w.detach(), reward_l.detach())


def orpo_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """ORPO: NLL(y_w) + lambda * -log s(logodds_w - logodds_l), (B,), lambda = params.beta.
    Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model".

    With m = logp/|y| the mean token log-prob, odds = e^m / (1 - e^m), so
    logodds = m - log(1 - e^m). The NLL is part of ORPO itself (it needs no SFT stage); an
    extra RPO term from compute_loss is added on top. Rewards: beta * m (detached).
    """
    m_w = _mean_logps(x.policy_chosen_logps, x.chosen_lengths)
    m_l = _mean_logps(x.policy_rejected_logps, x.rejected_lengths)
    # A completion the policy is certain of (m == 0 in floating point) has infinite odds and a
    # NaN gradient; capping m just below 0 caps its log-odds at about -log(eps) instead.
    cap = -torch.finfo(m_w.dtype).eps
    mw_c, ml_c = m_w.clamp(max=cap), m_l.clamp(max=cap)
    log_odds = (mw_c - _log1mexp(mw_c)) - (ml_c - _log1mexp(ml_c))
    losses = -m_w - p.beta * F.logsigmoid(log_odds)
    return LossOutput(losses, (p.beta * m_w).detach(), (p.beta * m_l).detach())


# ---------------------------------------------------------------------------------- the table

LOSSES: dict[str, Callable[[PairLogps, LossParams], LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "cdpo": cdpo_loss,
    "robust": robust_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "rdpo": rdpo_loss,
    "nca_pair": nca_pair_loss,
    "bco_pair": bco_pair_loss,
    "apo_zero": apo_zero_loss,
}

REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo"})


def compute_loss(name: str, logps: PairLogps, params: LossParams) -> LossOutput:
    """Per-pair loss ``name`` on ``logps`` (all (B,)), plus ``params.sft_weight * NLL(y_w)``.

    Returns (B,) losses and detached (B,) rewards; the caller reduces. Raises ValueError for an
    unknown name (listing the valid ones) and for a reference-based loss given no reference
    log-probs. Reference-free losses ignore the reference fields, which may be None.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    if name not in REFERENCE_FREE and (
        logps.reference_chosen_logps is None or logps.reference_rejected_logps is None
    ):
        raise ValueError(
            f"loss {name!r} needs reference log-probs; reference-free losses: "
            f"{', '.join(sorted(REFERENCE_FREE))}"
        )
    out = LOSSES[name](logps, params)
    if params.sft_weight > 0:
        out = out._replace(losses=out.losses + params.sft_weight * _sft_nll(logps))
    return out

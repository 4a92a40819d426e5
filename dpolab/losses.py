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
apo_down  s(beta dc) + 1 - s(beta h)                                   D'Oosterlinck et al. 2024
exo_pair  s(z)[log s(z) - log(1-eps)] + s(-z)[log s(-z) - log eps]    Ji et al. 2024 (z = beta h)
sppo_hard (dc - 1/(2 beta))^2 + (dr + 1/(2 beta))^2                    Wu et al. 2024
discopop  (1-s(z/tau)) (-log s(z)) + s(z/tau) e^-z                     Lu et al. 2024 (z = beta h)
aot       cDPO on sort(pc - pr) - sort(rc - rr) over the batch         Melnyk et al. 2024
aot_unp.  cDPO on sort(dc) - sort(dr) over the batch                   Melnyk et al. 2024
sft       NLL(y_w)                                                     (ref-free; RPO / MPO term)
========  ===========================================================  ===========================

f-divergences (``params.f_divergence``, Wang et al. 2023): losses of h alone may replace the log
ratios dc, dr by f'(u) of the density ratio u (reverse KL = DPO, forward KL, Jensen-Shannon,
alpha-divergence); see :func:`_scores`. A comma-separated name ("sigmoid,bco_pair,sft") is the
weighted sum of its parts (``params.loss_weights``), TRL's list of loss types / MPO.

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

import math
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
    f_divergence: str = "reverse_kl"  # f-DPO: reverse_kl (DPO) | forward_kl | js_divergence | alpha_divergence
    f_alpha: float = 0.5  # alpha of the alpha-divergence, the f-DPO paper's (TRL's coefficient is 1 - this)
    discopop_tau: float = 0.05  # DiscoPOP temperature of the logistic/exponential mix
    loss_weights: tuple[float, ...] = ()  # weights of a combined loss "a,b,c" (empty = all 1)
    ipo_average_logps: bool = False  # IPO on per-token mean log-ratios (TRL's convention) instead of sums
    sft_token_weighted: bool = False  # SFT/RPO NLL averaged over the batch's tokens (TRL) instead of per pair
    wpo: bool = False  # WPO: weight each pair's loss by its (detached) probability under the policy

    def __post_init__(self) -> None:
        # beta divides in IPO and scales every reward; zero or negative beta is never meant.
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight}")
        if self.f_divergence not in F_DIVERGENCES:
            raise ValueError(f"f_divergence must be one of {', '.join(F_DIVERGENCES)}, got {self.f_divergence!r}")
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be > 0, got {self.discopop_tau}")


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


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


def _sft_nll(x: PairLogps, p: LossParams | None = None) -> Tensor:
    """NLL(y_w), (B,): by default -pc/|y_w|, the per-token mean NLL of each pair's y_w.

    With ``p.sft_token_weighted`` (TRL's convention: one mean over all chosen tokens of the
    batch) pair i gets -pc_i * B / sum_j |y_w,j|, whose mean over the batch is exactly
    -sum(pc) / sum(|y_w|): long answers then weigh more than short ones.
    """
    if p is not None and p.sft_token_weighted:
        total = x.chosen_lengths.to(x.policy_chosen_logps.dtype).sum().clamp(min=1)
        return -x.policy_chosen_logps * (x.policy_chosen_logps.shape[0] / total)
    return -_mean_logps(x.policy_chosen_logps, x.chosen_lengths)


# Exponents of the f-DPO scores are capped here: e^40 squared (IPO) still fits float32 (e^88),
# and a log-ratio beyond 40 nats is far outside any useful training state.
_EXP_CAP = 40.0


def _scores(x: PairLogps, p: LossParams) -> tuple[Tensor, Tensor]:
    """f-DPO scores (sc, sr), each (B,): f'(u) of the density ratio u = pi/pi_ref of y_w and y_l.

    Wang et al. 2023, "Beyond Reverse KL: Generalizing Direct Preference Optimization with
    Diverse Divergence Constraints", Table 1 (constants dropped: they cancel in sc - sr):
    reverse_kl  log u                     (DPO)
    forward_kl  -1/u  = -exp(-d)
    js_divergence  log(2u/(1+u)) = log 2 + log s(d)
    alpha_divergence  (1 - u^-alpha)/alpha  (alpha -> 0: reverse KL; alpha = 1: forward KL)
    with d = log u = dc or dr. TRL's f_alpha_divergence_coef is 1 - alpha (its (u^(a-1) - 1)/(a-1)).
    """
    dc, dr = _margins(x)
    kind = p.f_divergence
    if kind == "reverse_kl" or (kind == "alpha_divergence" and abs(p.f_alpha) < 1e-6):
        return dc, dr
    if kind == "forward_kl":
        return tuple(-torch.exp((-d).clamp(max=_EXP_CAP)) for d in (dc, dr))
    if kind == "js_divergence":
        return tuple(math.log(2.0) + F.logsigmoid(d) for d in (dc, dr))
    a = p.f_alpha
    return tuple((1 - torch.exp((-a * d).clamp(max=_EXP_CAP))) / a for d in (dc, dr))


def _score_margin(x: PairLogps, p: LossParams) -> Tensor:
    """beta (sc - sr), (B,): the DPO logit under the chosen f-divergence."""
    sc, sr = _scores(x, p)
    return p.beta * (sc - sr)


# ----------------------------------------------------------------------- reference-based losses


def sigmoid_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """DPO: -log s(beta h), (B,). Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7."""
    losses = -F.logsigmoid(_score_margin(x, p))
    return LossOutput(losses, *_reference_rewards(x, p))


def cdpo_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """Conservative DPO: -(1-eps) log s(beta h) - eps log s(-beta h), (B,).

    Label smoothing with eps = params.label_smoothing: the target preference is 1-eps instead
    of 1, so the loss has a finite minimum instead of pushing h to infinity (Mitchell 2023,
    "A note on DPO with noisy preferences"). eps = 0 is plain DPO.
    """
    z = _score_margin(x, p)
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
    z = _score_margin(x, p)
    losses = (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
    return LossOutput(losses, *_reference_rewards(x, p))


def ipo_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """IPO: (h - 1/(2 beta))^2, (B,). Azar et al. 2023, "A General Theoretical Paradigm to
    Understand Learning from Human Preferences".

    Regresses the margin to a finite target instead of pushing it to infinity. As in the paper,
    h is built from SUMMED log-probs by default. TRL (loss_type="ipo") uses per-token MEAN
    log-ratios, h = sc/|y_w| - sr/|y_l|, and so does this loss with
    ``params.ipo_average_logps``: the same beta then means something else (the target
    1/(2 beta) is per token, not per sequence).
    """
    sc, sr = _scores(x, p)
    if p.ipo_average_logps:
        sc, sr = _mean_logps(sc, x.chosen_lengths), _mean_logps(sr, x.rejected_lengths)
    losses = (sc - sr - 1 / (2 * p.beta)) ** 2
    return LossOutput(losses, *_reference_rewards(x, p))


def hinge_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """SLiC hinge: max(0, 1 - beta h), (B,). Zhao et al. 2023, "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback" (calibration loss with the reference log-ratio margin)."""
    losses = F.relu(1 - _score_margin(x, p))
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


def apo_down_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """APO-down: s(beta dc) + 1 - s(beta (dc - dr)), (B,). D'Oosterlinck et al. 2024, "Anchored
    Preference Optimization and Contrastive Revisions", Eq. 8: lowers the chosen likelihood and
    the rejected one more, for data whose chosen answers are worse than the current model's."""
    dc, dr = _margins(x)
    losses = torch.sigmoid(p.beta * dc) + 1 - torch.sigmoid(p.beta * (dc - dr))
    return LossOutput(losses, *_reference_rewards(x, p))


def exo_pair_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """EXO (pairwise): KL(q || p_eps) with q = (s(z), s(-z)), z = beta h, p_eps = (1-eps, eps), (B,):
    s(z) [log s(z) - log(1-eps)] + s(-z) [log s(-z) - log eps].

    Ji et al. 2024, "Towards Efficient Exact Optimization of Language Model Alignment", Eq. 16
    (K = 2): the reverse KL from the model's preference to the smoothed label, mode-seeking
    where DPO's forward KL is mean-covering. Needs 0 < eps = params.label_smoothing < 1 (the
    paper uses 1e-3); at eps = 0 the loss is infinite.
    """
    eps = p.label_smoothing
    if not 0 < eps < 1:
        raise ValueError(f"exo_pair needs 0 < label_smoothing < 1 (the paper uses 1e-3), got {eps}")
    z = _score_margin(x, p)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    losses = log_qw.exp() * (log_qw - math.log1p(-eps)) + log_ql.exp() * (log_ql - math.log(eps))
    return LossOutput(losses, *_reference_rewards(x, p))


def sppo_hard_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """SPPO (hard labels): (dc - 1/(2 beta))^2 + (dr + 1/(2 beta))^2, (B,).

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment", Eq. 4.7
    with the win probability set to 1 for y_w and 0 for y_l (eta = 1/beta): each response's
    own log-ratio is regressed to +-1/(2 beta), not only their difference.
    """
    dc, dr = _margins(x)
    target = 1 / (2 * p.beta)
    losses = (dc - target) ** 2 + (dr + target) ** 2
    return LossOutput(losses, *_reference_rewards(x, p))


def discopop_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): (1 - m) [-log s(z)] + m e^-z, m = s(z/tau), z = beta h, (B,).

    Chris Lu et al. 2024, "Discovering Preference Optimization Algorithms with and for Large
    Language Models", Eq. 5; tau = params.discopop_tau (paper: 0.05). m e^-z is computed as
    exp(log s(z/tau) - z), which stays finite for very negative z where e^-z alone overflows.
    """
    z = _score_margin(x, p)
    tau = p.discopop_tau
    modulation = torch.sigmoid(z / tau)
    losses = -(1 - modulation) * F.logsigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
    return LossOutput(losses, *_reference_rewards(x, p))


def _smoothed_logistic(delta: Tensor, p: LossParams) -> Tensor:
    """-(1-eps) log s(beta delta) - eps log s(-beta delta), (B,) (the cDPO form AOT uses)."""
    eps = p.label_smoothing
    return -(1 - eps) * F.logsigmoid(p.beta * delta) - eps * F.logsigmoid(-p.beta * delta)


def aot_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """AOT (paired): cDPO loss on sort(pc - pr) - sort(rc - rr), sorted over the batch, (B,).

    Melnyk et al. 2024, "Distributional Preference Alignment of LLMs via Optimal Transport":
    first-order stochastic dominance of the policy's chosen-minus-rejected log-ratio over the
    reference's, the 1-D optimal transport plan being the sorted matching. The i-th loss
    belongs to the i-th quantile, not to pair i; the sort runs within each micro-batch, so
    larger micro-batches give a finer match. TRL's loss_type="aot". Rewards are per pair.
    """
    policy_sorted = torch.sort(x.policy_chosen_logps - x.policy_rejected_logps).values
    reference_sorted = torch.sort(x.reference_chosen_logps - x.reference_rejected_logps).values
    losses = _smoothed_logistic(policy_sorted - reference_sorted, p)
    return LossOutput(losses, *_reference_rewards(x, p))


def aot_unpaired_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """AOT (unpaired): cDPO loss on sort(dc) - sort(dr), sorted over the batch, (B,).

    Melnyk et al. 2024 (as :func:`aot_loss`): the distribution of chosen log-ratios should
    dominate that of rejected ones, without using which rejected answer goes with which chosen
    one. TRL's loss_type="aot_unpaired".
    """
    dc, dr = _margins(x)
    losses = _smoothed_logistic(torch.sort(dc).values - torch.sort(dr).values, p)
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


def sft_loss(x: PairLogps, p: LossParams) -> LossOutput:
    """SFT: NLL(y_w) = -pc/|y_w| per pair (token-weighted over the batch with
    params.sft_token_weighted), (B,). Reference-free; the NLL term of RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization") and MPO (Wang et al. 2024), used inside a
    combined loss such as "sigmoid,bco_pair,sft". Rewards: beta * mean token log-prob."""
    losses = _sft_nll(x, p)
    reward_w = p.beta * _mean_logps(x.policy_chosen_logps, x.chosen_lengths)
    reward_l = p.beta * _mean_logps(x.policy_rejected_logps, x.rejected_lengths)
    return LossOutput(losses, reward_w.detach(), reward_l.detach())


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
    "apo_down": apo_down_loss,
    "exo_pair": exo_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "discopop": discopop_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "sft": sft_loss,
}

# Every name `--loss` takes: the pair losses above plus the two with their own batches and
# objectives (unpaired KTO in dpolab/kto.py, ranked lists in dpolab/listwise.py).
ALL_NAMES: tuple[str, ...] = (*LOSSES, "kto", "plackett_luce")

REFERENCE_FREE: frozenset[str] = frozenset({"simpo", "orpo", "sft"})

# Losses of beta (sc - sr) alone, where the f-DPO substitution of log u by f'(u) is valid: the
# log-partition term cancels only in the chosen-minus-rejected difference (Wang et al. 2023).
F_DIVERGENCE_LOSSES: frozenset[str] = frozenset({"sigmoid", "cdpo", "robust", "ipo", "hinge", "exo_pair", "discopop", "sft"})


def loss_names(name: str) -> list[str]:
    """The component names of a loss spec: "sigmoid" -> ["sigmoid"]; "sigmoid,bco_pair,sft" -> 3."""
    return [n.strip() for n in name.split(",")]


def needs_reference(name: str) -> bool:
    """Whether loss spec ``name`` (one name or a comma-separated combination) uses pi_ref."""
    return any(n not in REFERENCE_FREE for n in loss_names(name))


def wpo_weights(x: PairLogps) -> Tensor:
    """WPO pair weights exp(pc/|y_w|) * exp(pr/|y_l|), (B,), detached.

    Zhou et al. 2024, "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2-3 with
    the length-normalised sequence probability: pairs the current policy would itself produce
    weigh more, which turns off-policy preference data into an estimate of on-policy learning.
    Not the paper's "weight alignment" variant (token probabilities divided by sum_v p_v^2),
    which TRL's use_weighting computes from the full softmax.
    """
    mean_w = _mean_logps(x.policy_chosen_logps, x.chosen_lengths)
    mean_l = _mean_logps(x.policy_rejected_logps, x.rejected_lengths)
    return torch.exp(mean_w + mean_l).detach()


def _check_spec(names: list[str], logps: PairLogps, params: LossParams) -> None:
    for name in names:
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
        if params.f_divergence != "reverse_kl" and name not in F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence {params.f_divergence!r} works only with "
                             f"{', '.join(sorted(F_DIVERGENCE_LOSSES))}; loss {name!r} needs reverse_kl")
    if params.wpo and {"aot", "aot_unpaired"} & set(names):
        raise ValueError("wpo weights pairs, but aot / aot_unpaired losses belong to sorted quantiles, not pairs")
    if params.loss_weights and len(params.loss_weights) != len(names):
        raise ValueError(f"{len(params.loss_weights)} loss_weights for {len(names)} losses ({', '.join(names)})")
    if needs_reference(",".join(names)) and (
        logps.reference_chosen_logps is None or logps.reference_rejected_logps is None
    ):
        raise ValueError(
            f"loss {','.join(names)!r} needs reference log-probs; reference-free losses: "
            f"{', '.join(sorted(REFERENCE_FREE))}"
        )


def compute_loss(name: str, logps: PairLogps, params: LossParams) -> LossOutput:
    """Per-pair loss ``name`` on ``logps`` (all (B,)), plus ``params.sft_weight * NLL(y_w)``.

    ``name`` may combine several losses, "sigmoid,bco_pair,sft", summed with
    ``params.loss_weights`` (default all 1): TRL's list of loss types with weights; MPO
    (Wang et al. 2024, "Enhancing the Reasoning Ability of Multimodal Large Language Models
    via Mixed Preference Optimization") is "sigmoid,bco_pair,sft" with weights 0.8, 0.2, 1.0.
    The rewards are those of the first component. With ``params.wpo`` the (combined) loss of
    each pair is multiplied by :func:`wpo_weights`; the ``sft_weight`` term is not weighted.

    Returns (B,) losses and detached (B,) rewards; the caller reduces. Raises ValueError for an
    unknown name (listing the valid ones), for weights that do not match, for an f-divergence
    a loss does not support and for a reference-based loss given no reference log-probs.
    Reference-free losses ignore the reference fields, which may be None.
    """
    names = loss_names(name)
    _check_spec(names, logps, params)
    weights = params.loss_weights or (1.0,) * len(names)
    out = None
    for component, weight in zip(names, weights):
        part = LOSSES[component](logps, params)
        losses = weight * part.losses if params.loss_weights else part.losses
        out = part._replace(losses=losses) if out is None else out._replace(losses=out.losses + losses)
    if params.wpo:
        out = out._replace(losses=out.losses * wpo_weights(logps))
    if params.sft_weight > 0:
        out = out._replace(losses=out.losses + params.sft_weight * _sft_nll(logps, params))
    return out

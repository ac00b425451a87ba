"""Logit-distillation attacks: the token-level losses a student trains with.

Every attack is ``(1−α)·SFT + α·D(teacher ‖ student)`` over teacher-forced
rows (α = 0.5, as in the seed paper), with ``D`` one of the divergences
below, each computed per row from log-probabilities (``p`` teacher, ``q``
student) in fp32 and averaged over rows whose label is not ``-100``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cmiguard.kernels.reference import IGNORE_INDEX

Divergence = Callable[[Tensor, Tensor], Tensor]


def _xlogy_ratio(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``Σ a (log a − log b)`` per row, with ``0·log 0 = 0``."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), torch.zeros_like(a)).sum(-1)


def forward_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Hinton KD: ``KL(p ‖ q)``."""
    return _xlogy_ratio(log_p, log_q)


def reverse_kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """MiniLLM-style ``KL(q ‖ p)``: mode seeking."""
    return _xlogy_ratio(log_q, log_p)


def amari_alpha(log_p: Tensor, log_q: Tensor, alpha: float) -> Tensor:
    """Amari's α-divergence ``(Σ p^α q^{1−α} − 1) / (α(α−1))`` (α ∉ {0, 1})."""
    mixed = torch.logsumexp(alpha * log_p + (1 - alpha) * log_q, dim=-1).exp()
    return (mixed - 1) / (alpha * (alpha - 1))


def alphanet(alpha: float = 0.1, beta: float = 0.9) -> Divergence:
    """AlphaNet: the larger of two α-divergences, one leaning to each side."""

    def divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
        return torch.maximum(amari_alpha(log_p, log_q, alpha), amari_alpha(log_p, log_q, beta))

    return divergence


def alpha_beta(alpha: float = 0.1, beta: float = 0.8) -> Divergence:
    """ABKD's α-β divergence:
    ``−1/(αβ) Σ (p^α q^β − α/(α+β) p^{α+β} − β/(α+β) q^{α+β})``."""
    s = alpha + beta

    def divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
        terms = (
            (alpha * log_p + beta * log_q).exp()
            - alpha / s * (s * log_p).exp()
            - beta / s * (s * log_q).exp()
        )
        return -terms.sum(-1) / (alpha * beta)

    return divergence


def _log_mix(log_a: Tensor, log_b: Tensor, weight: float) -> Tensor:
    """``log(w·a + (1−w)·b)``."""
    return torch.logaddexp(
        log_a + torch.log(torch.tensor(weight)), log_b + torch.log1p(torch.tensor(-weight))
    )


def skew_kl(lam: float = 0.1) -> Divergence:
    """DistiLLM's skew KL: ``KL(p ‖ λp + (1−λ)q)``."""
    return lambda log_p, log_q: _xlogy_ratio(log_p, _log_mix(log_p, log_q, lam))


def skew_reverse_kl(lam: float = 0.1) -> Divergence:
    """``KL(q ‖ λq + (1−λ)p)``."""
    return lambda log_p, log_q: _xlogy_ratio(log_q, _log_mix(log_q, log_p, lam))


def generalized_jsd(beta: float = 0.5) -> Divergence:
    """``β·KL(p ‖ m) + (1−β)·KL(q ‖ m)`` with ``m = βp + (1−β)q``."""

    def divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _xlogy_ratio(log_p, log_m) + (1 - beta) * _xlogy_ratio(log_q, log_m)

    return divergence


def total_variation(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``½ Σ |p − q|``."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "alphanet": alphanet(0.1, 0.9),
    "abkd": alpha_beta(0.1, 0.8),
    "skew_kl": skew_kl(0.1),
    "skew_reverse_kl": skew_reverse_kl(0.1),
    "gjsd": generalized_jsd(0.5),
    "total_variation": total_variation,
}


def top_k_view(teacher_logprobs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """What a logprobs API returns: the top-k log-probs (and ids), renormalised."""
    values, ids = teacher_logprobs.topk(k, dim=-1)
    return values - values.logsumexp(-1, keepdim=True), ids


def distillation_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    attack: str = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> Tensor:
    """``(1−α)·CE(student, y) + α·D(teacher ‖ student)``, averaged over labelled rows.

    ``temperature`` rescales both sides before ``D`` (Hinton's ``T``, with the
    ``T²`` factor). With ``top_k`` the attacker sees only the teacher's top-k
    log-probs, renormalised, and compares the student on those ids (its
    probabilities renormalised over them too).
    """
    if attack not in DIVERGENCES:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(DIVERGENCES)}")
    student = student_logits.float()
    sft = F.cross_entropy(student, labels, ignore_index=IGNORE_INDEX)
    log_p = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    s = student / temperature
    if top_k is not None:
        log_p, ids = top_k_view(log_p, top_k)
        s = s.gather(1, ids)
    log_q = torch.log_softmax(s, dim=-1)
    # a weighted mean instead of boolean indexing keeps shapes static for torch.compile
    valid = (labels != IGNORE_INDEX).float()
    kd = (DIVERGENCES[attack](log_p, log_q) * valid).sum() / valid.sum() * temperature**2
    return (1 - alpha) * sft + alpha * kd


def retemper(logprobs: Tensor, temperature: float) -> Tensor:
    """The adaptive attacker's first move: undo a guessed serving temperature
    (``softmax(τ·log p)`` recovers ``softmax(z)`` exactly when ``p = softmax(z/τ)``)."""
    return torch.log_softmax(logprobs.float() * temperature, dim=-1)


def floor_truncated(logprobs: Tensor, mass: float = 1e-4) -> Tensor:
    """What an attacker does with a truncated output (``-inf`` outside the
    tokens shown): spread ``mass`` evenly over the hidden tokens so that every
    divergence, reverse KL included, stays finite. Rows with nothing hidden
    are returned as they are."""
    hidden = torch.isneginf(logprobs)
    count = hidden.sum(-1, keepdim=True)
    if not bool(count.any()):
        return logprobs
    share = torch.log(mass / count.clamp(min=1))
    shown = logprobs + torch.where(count > 0, torch.log1p(torch.tensor(-mass)), 0.0)
    return torch.where(hidden, share.expand_as(logprobs), shown)


def fit_temperature(logprobs: Tensor, labels: Tensor) -> float:
    """The blind re-tempering attacker: the τ for which ``softmax(τ·log p)`` best
    predicts the ground truth (lowest NLL over labelled rows whose label has a
    finite log-prob), searched on a log grid then refined. It needs no knowledge
    of the defense: a served temperature shows up as miscalibration."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    rows = rows[torch.isfinite(logprobs[rows, labels[rows]])]
    if rows.numel() == 0:
        raise ValueError("fit_temperature needs rows whose label has a finite log-prob")
    lp, y = logprobs[rows].float(), labels[rows]

    def nll(tau: float) -> float:
        return float(F.cross_entropy(lp * tau, y))

    grid = torch.logspace(-1.5, 1.5, 31).tolist()
    best = min(grid, key=nll)
    fine = (best * torch.logspace(-0.05, 0.05, 11)).tolist()
    return min(fine, key=nll)


def _centered(logprobs: Tensor) -> Tensor:
    """Rows floored (see ``floor_truncated``) and centred over the vocabulary:
    logits are defined up to a row constant."""
    x = floor_truncated(logprobs.float())
    return x - x.mean(-1, keepdim=True)


def fit_linear_inverse(
    seen: Tensor, raw: Tensor, ridge: float = 1e-3
) -> Callable[[Tensor], Tensor]:
    """The adaptive attacker that knows the transform is linear in the logits:
    from ``n`` oracle pairs (defended log-probs ``seen``, raw logits ``raw``,
    both ``[n, V]``) it fits ``M = a·I + Xᵀ(XXᵀ + λI)⁻¹(Y − aX)`` (a scale plus
    kernel ridge regression on the centred rows, ``λ = ridge·mean diag XXᵀ``)
    and returns the map from defended log-probs to recovered log-probs.
    With ``n ≥ V`` and ``λ → 0`` it is the exact least-squares inverse."""
    if seen.shape != raw.shape or seen.dim() != 2:
        raise ValueError(
            f"pairs must be two [n, V] tensors, got {tuple(seen.shape)}, {tuple(raw.shape)}"
        )
    x, y = _centered(seen).double(), _centered(raw).double()  # float64: XXᵀ is ill-conditioned
    a = float((x * y).sum() / (x * x).sum())
    gram = x @ x.T
    lam = ridge * float(gram.diagonal().mean())
    weights = torch.linalg.solve(gram + lam * torch.eye(len(x), dtype=x.dtype), y - a * x)
    x, weights = x.float(), weights.float()

    def invert(logprobs: Tensor) -> Tensor:
        new = _centered(logprobs)
        return torch.log_softmax(a * new + (new @ x.T) @ weights, dim=-1)

    return invert

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


# a log-prob whose exp is exactly 0 in fp32 but keeps every difference finite
_ZERO_LOG = -1e4


def bucket_hidden(log_p: Tensor, student_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Teacher and student over the shown tokens plus one bucket for the
    hidden ones (``-inf`` in ``log_p``, whose shown tokens sum to ``1 − m``;
    :func:`cmiguard.attack.adaptive.with_hidden_mass`): ``[N, V + 1]`` each,
    the teacher's bucket ``m`` and the student's its summed probability over
    the hidden tokens. A divergence on these constrains how much the student
    puts on what it was not shown, not how it spreads it (the ground truth's
    CE does that). Rows that hide nothing keep an empty bucket."""
    hidden = torch.isneginf(log_p)
    some = hidden.any(-1, keepdim=True)
    log_q = torch.log_softmax(student_logits, dim=-1)
    shown_mass = torch.logsumexp(log_p, dim=-1, keepdim=True).clamp(max=0.0)
    log_m = torch.where(some, torch.log(-torch.expm1(shown_mass)), _ZERO_LOG)
    # every row's logsumexp over a finite set, so no NaN reaches the gradient
    in_bucket = torch.logsumexp(torch.where(hidden | ~some, log_q, _ZERO_LOG), -1, keepdim=True)
    q_m = torch.where(some, in_bucket, _ZERO_LOG)
    return (
        torch.cat([log_p.masked_fill(hidden, _ZERO_LOG), log_m.clamp(min=_ZERO_LOG)], -1),
        torch.cat([log_q.masked_fill(hidden, _ZERO_LOG), q_m], -1),
    )


def distillation_loss(
    student_logits: Tensor,
    teacher_logprobs: Tensor,
    labels: Tensor,
    attack: str = "forward_kl",
    alpha: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    bucket: bool = False,
) -> Tensor:
    """``(1−α)·CE(student, y) + α·D(teacher ‖ student)``, averaged over labelled rows.

    ``temperature`` rescales both sides before ``D`` (Hinton's ``T``, with the
    ``T²`` factor). With ``top_k`` the attacker sees only the teacher's top-k
    log-probs, renormalised, and compares the student on those ids (its
    probabilities renormalised over them too). With ``bucket`` the teacher's
    log-probs may hide tokens (``-inf``) and ``D`` compares the hidden ones as
    one bucket (:func:`bucket_hidden`; temperature 1, no ``top_k``).
    """
    if attack not in DIVERGENCES:
        raise ValueError(f"unknown attack {attack!r}; choose one of {', '.join(DIVERGENCES)}")
    if bucket and (temperature != 1.0 or top_k is not None):
        raise ValueError("bucket compares the served tokens as served: no temperature or top_k")
    student = student_logits.float()
    sft = F.cross_entropy(student, labels, ignore_index=IGNORE_INDEX)
    if bucket:
        log_p, log_q = bucket_hidden(teacher_logprobs.float(), student)
    else:
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

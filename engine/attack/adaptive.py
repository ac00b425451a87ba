"""Adaptive attackers: what a distiller does to a defended output before
learning from it — undo a served temperature, fill in what a truncated output
hides, or fit an inverse of a linear transform."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cmiguard.kernels.reference import IGNORE_INDEX


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

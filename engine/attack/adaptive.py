"""Adaptive attackers: what a distiller does to a defended output before
learning from it — undo a served temperature, fill in what a truncated output
hides, or fit an inverse of a linear transform."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cmiguard.kernels.reference import IGNORE_INDEX
from cmiguard.tempering import fit_temperature


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


def fit_hidden_mass(logprobs: Tensor, labels: Tensor) -> float:
    """The mass an attacker gives what a truncated output hides, fitted on its
    own labelled rows: the share of rows that hide something whose label is
    hidden (the likelihood's maximiser, add-one smoothed so it is never 0 or 1).
    ``floor_truncated``'s fixed 1e-4 makes a top-k student overconfident; this
    is what the ground truth says the hidden tokens are worth."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    rows = rows[torch.isneginf(logprobs[rows]).any(-1)]
    hidden = int(torch.isneginf(logprobs[rows, labels[rows]]).sum())
    return (hidden + 1) / (rows.numel() + 2)


def with_hidden_mass(logprobs: Tensor, mass: float) -> Tensor:
    """Truncated rows (``-inf`` outside the tokens shown) with the shown tokens
    scaled to ``1 − mass`` and the hidden ones left at ``-inf``: the target of
    a bucketed divergence (:func:`cmiguard.attack.losses.bucket_hidden`), which
    gives the hidden tokens ``mass`` together and no shape of their own."""
    some = torch.isneginf(logprobs).any(-1, keepdim=True)
    return logprobs + torch.where(some, math.log1p(-mass), 0.0)


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


@dataclass
class BlindInverse:
    """``M(x) = s·x + (x A) Bᵀ`` on centred served log-probs ``x``: the map the
    blind inverse attacker distils through (:func:`fit_blind_inverse`)."""

    scale: float
    a: Tensor  # [V, r]
    b: Tensor  # [V, r]

    def __call__(self, logprobs: Tensor) -> Tensor:
        x = _centered(logprobs)
        return torch.log_softmax(self.scale * x + (x @ self.a) @ self.b.T, dim=-1)


def fit_blind_inverse(
    seen: Tensor,
    labels: Tensor,
    rank: int = 32,
    steps: int = 100,
    lr: float = 1e-3,
    holdout: float = 0.2,
    seed: int = 0,
) -> BlindInverse:
    """The attacker who knows the defense is a low-rank affine map of the
    logits but not its parameters, and never sees raw logits: on its own
    queries (served log-probs ``seen`` ``[n, V]`` and their ground-truth
    ``labels``) it fits :class:`BlindInverse` by ground-truth NLL. First the
    scale alone (:func:`fit_temperature`, so it is never weaker than the
    re-temperer), then from there and the identity (``B = 0``,
    ``A ~ N(0, 1/V)``) full-batch Adam on all three, keeping the step with the
    lowest NLL on a ``holdout`` share of its rows (a rank-``r`` map over 49k
    tokens fits a thousand rows easily)."""
    rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    rows = rows[torch.isfinite(seen[rows, labels[rows]])]
    if rows.numel() < 2:
        raise ValueError("fit_blind_inverse needs two labelled rows with a finite log-prob")
    gen = torch.Generator().manual_seed(seed)
    rows = rows[torch.randperm(rows.numel(), generator=gen)]
    cut = max(1, int(rows.numel() * holdout))
    held, fit = rows[:cut], rows[cut:]
    x = _centered(seen)
    v = x.shape[1]
    log_s = torch.tensor(math.log(fit_temperature(seen[fit], labels[fit])), requires_grad=True)
    a = (torch.randn(v, rank, generator=gen) / v**0.5).requires_grad_(True)
    b = torch.zeros(v, rank, requires_grad=True)
    optimizer = torch.optim.Adam([log_s, a, b], lr=lr)

    def nll(idx: Tensor) -> Tensor:
        xi = x[idx]
        return F.cross_entropy(log_s.exp() * xi + (xi @ a) @ b.T, labels[idx])

    best = (float("inf"), 1.0, a.detach().clone(), b.detach().clone())
    for _ in range(steps + 1):
        with torch.no_grad():
            score = float(nll(held))
            if score < best[0]:
                best = (score, float(log_s.exp()), a.detach().clone(), b.detach().clone())
        optimizer.zero_grad(set_to_none=True)
        nll(fit).backward()
        optimizer.step()
    return BlindInverse(best[1], best[2], best[3])

"""Reading a served temperature off its miscalibration, and undoing it.

A temperature never moves an argmax, and the CMI estimate falls as it rises,
so a defense's CMI means something only next to the CMI of its outputs
re-tempered by the τ that best predicts the ground truth: what the blind
re-tempering attacker distils from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cmiguard.kernels.reference import IGNORE_INDEX


def retemper(logprobs: Tensor, temperature: float) -> Tensor:
    """The adaptive attacker's first move: undo a guessed serving temperature
    (``softmax(τ·log p)`` recovers ``softmax(z)`` exactly when ``p = softmax(z/τ)``)."""
    return torch.log_softmax(logprobs.float() * temperature, dim=-1)


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

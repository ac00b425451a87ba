"""Learned affine transforms of the logits, all identity at initialisation.

Being affine in ``z = h Eᵀ + c`` they can be folded into the LM head
(:meth:`LogitTransform.fold`), which makes purified serving free.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cmiguard.kernels.reference import affine_logits

FAMILIES = ("lowrank", "diag_lowrank", "dense")


class LogitTransform(nn.Module):
    """Base class: ``forward(logits) -> logits`` over the last dimension."""

    family: str = ""

    def __init__(self, vocab_size: int, rank: int = 0, temperature: float = 1.0) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.rank = int(rank)
        self.temperature = float(temperature)

    def kernel_params(self) -> dict[str, Tensor | None]:
        """The tensors :func:`cmiguard.kernels.reference.affine_logits` takes."""
        raise NotImplementedError

    def forward(self, logits: Tensor) -> Tensor:
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"logits have {logits.shape[-1]} entries in the last dimension, "
                f"the transform expects vocab_size={self.vocab_size}"
            )
        flat = logits.reshape(-1, self.vocab_size)
        out = affine_logits(flat, **self.kernel_params())
        return out.reshape(logits.shape).to(logits.dtype)

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """LM-head ``(E', c')`` such that ``h E'ᵀ + c' = T(h Eᵀ + c)``."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, rank={self.rank}, temperature={self.temperature}"


class LowRankTransform(LogitTransform):
    """``T(z) = z + (z A) Bᵀ (+ b)``: the seed paper's ``M = I + A B``.

    ``A ~ N(0, 1)`` and ``B = 0`` so that ``T`` starts as the identity while
    ``B``'s gradient is not zero.
    """

    family = "lowrank"

    def __init__(
        self, vocab_size: int, rank: int = 32, bias: bool = False, temperature: float = 1.0
    ) -> None:
        super().__init__(vocab_size, rank, temperature)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.a = nn.Parameter(torch.randn(vocab_size, rank))
        self.b = nn.Parameter(torch.zeros(vocab_size, rank))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def kernel_params(self) -> dict[str, Tensor | None]:
        return {"a": self.a, "b": self.b, "bias": self.bias}

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        w = weight.float()
        new_w = w + self.b.float() @ (self.a.float().t() @ w)
        new_b = _fold_bias(self, bias)
        return new_w.to(weight.dtype), new_b


class DiagLowRankTransform(LogitTransform):
    """``T(z) = z ⊙ d + (z A) Bᵀ + b``: a per-token scale on top of the low rank."""

    family = "diag_lowrank"

    def __init__(self, vocab_size: int, rank: int = 32, temperature: float = 1.0) -> None:
        super().__init__(vocab_size, rank, temperature)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.scale = nn.Parameter(torch.ones(vocab_size))
        self.a = nn.Parameter(torch.randn(vocab_size, rank))
        self.b = nn.Parameter(torch.zeros(vocab_size, rank))
        self.bias = nn.Parameter(torch.zeros(vocab_size))

    def kernel_params(self) -> dict[str, Tensor | None]:
        return {"scale": self.scale, "a": self.a, "b": self.b, "bias": self.bias}

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        w = weight.float()
        new_w = self.scale.float().unsqueeze(1) * w + self.b.float() @ (self.a.float().t() @ w)
        return new_w.to(weight.dtype), _fold_bias(self, bias)


class DenseTransform(LogitTransform):
    """``T(z) = z Wᵀ + b`` with ``W = I``: only for small vocabularies (V² parameters)."""

    family = "dense"

    def __init__(self, vocab_size: int, bias: bool = True, temperature: float = 1.0) -> None:
        super().__init__(vocab_size, 0, temperature)
        self.weight = nn.Parameter(torch.eye(vocab_size))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def kernel_params(self) -> dict[str, Tensor | None]:
        return {"weight": self.weight, "bias": self.bias}

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        new_w = self.weight.float() @ weight.float()
        return new_w.to(weight.dtype), _fold_bias(self, bias)


def _fold_bias(transform: LogitTransform, bias: Tensor | None) -> Tensor | None:
    """``T(c)``: the head's own bias pushed through the transform (with its bias)."""
    if bias is None and getattr(transform, "bias", None) is None:
        return None
    device = next(transform.parameters()).device
    c = (
        bias.float().to(device)
        if bias is not None
        else torch.zeros(transform.vocab_size, device=device)
    )
    folded = affine_logits(c.unsqueeze(0), **transform.kernel_params()).squeeze(0).detach()
    return folded.to(bias.dtype) if bias is not None else folded


def make_transform(family: str, vocab_size: int, rank: int = 32, **kwargs) -> LogitTransform:
    """Build a transform by family name (``lowrank``, ``diag_lowrank``, ``dense``)."""
    if family == "lowrank":
        return LowRankTransform(vocab_size, rank, **kwargs)
    if family == "diag_lowrank":
        return DiagLowRankTransform(vocab_size, rank, **kwargs)
    if family == "dense":
        return DenseTransform(vocab_size, **kwargs)
    raise ValueError(f"unknown transform family {family!r}; choose one of {', '.join(FAMILIES)}")

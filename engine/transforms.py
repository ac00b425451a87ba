"""Learned affine transforms of the logits, all identity at initialisation.

Being affine in ``z = h Eᵀ + c`` they can be folded into the LM head
(:meth:`LogitTransform.fold`), which makes purified serving free. An
optional argmax guard (``guard_margin``) puts each row's raw answer back on
top after the map; it is not affine, so a guarded transform is applied
where the raw logits are (purify, the serving processors), never folded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cmiguard.kernels.reference import affine_logits, argmax_guard
from cmiguard.validation import check_temperature

FAMILIES = ("lowrank", "diag_lowrank", "dense")
# which factor of the low-rank part starts at zero: "lora" (A random, B = 0:
# the zero factor writes) or "seed" (the seed paper's (I + AB)z read
# literally: A = 0 reads z, B random writes)
INITS = ("lora", "seed")
# what the kernels read the low-rank factors as: fp32 (None) or bf16, which
# halves the factor tiles' traffic; the parameters stay fp32 (the training
# masters) and every path (twin, kernels, fold) uses the same rounded values
FACTOR_DTYPES = {None: None, "bfloat16": torch.bfloat16}


class LogitTransform(nn.Module):
    """Base class: ``forward(logits) -> logits`` over the last dimension."""

    family: str = ""

    def __init__(
        self,
        vocab_size: int,
        rank: int = 0,
        temperature: float = 1.0,
        guard_margin: float | None = None,
    ) -> None:
        super().__init__()
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        check_temperature(temperature)
        if guard_margin is not None and not (math.isfinite(guard_margin) and guard_margin >= 0):
            raise ValueError(f"guard_margin must be finite and >= 0 (or None), got {guard_margin}")
        self.vocab_size = int(vocab_size)
        self.rank = int(rank)
        self.temperature = float(temperature)
        self.guard_margin = None if guard_margin is None else float(guard_margin)
        self._served: tuple[list, dict[str, Tensor | bool | None]] | None = None

    @property
    def shift_invariant(self) -> bool:
        """Whether ``T(z + c·1) = T(z) + c·1``: then logits and log-probs (``z``
        less its log-sum-exp) purify to the same distribution."""
        return False

    def kernel_params(self) -> dict[str, Tensor | bool | None]:
        """What :func:`cmiguard.kernels.reference.affine_logits` takes: the
        tensors, and ``centered: True`` for a centred map."""
        raise NotImplementedError

    def served_params(self) -> dict[str, Tensor | bool | None]:
        """:meth:`kernel_params` detached, for serving: the same tensors on every
        call while the parameters keep their storage and see no in-place update
        (an optimizer step, ``load_state_dict``), so factors rounded to
        ``factor_dtype`` are not rounded afresh per call, and a decode graph,
        keyed by the addresses it reads, is captured once, not per step.
        (A write through ``p.data`` bumps no version: rounded factors miss it.)"""
        tensors = list(self.parameters())
        # inference tensors keep no version counter: theirs are made afresh
        key = (
            None
            if any(p.is_inference() for p in tensors)
            else [(p.data_ptr(), p._version) for p in tensors]
        )
        served = getattr(self, "_served", None)  # (a module pickled before it existed)
        if key is None or served is None or served[0] != key:
            with torch.no_grad():
                params = self.kernel_params()
            params = {k: v.detach() if isinstance(v, Tensor) else v for k, v in params.items()}
            self._served = None if key is None else (key, params)
            return params
        return served[1]

    def forward(self, logits: Tensor) -> Tensor:
        if logits.shape[-1] != self.vocab_size:
            raise ValueError(
                f"logits have {logits.shape[-1]} entries in the last dimension, "
                f"the transform expects vocab_size={self.vocab_size}"
            )
        out = self.apply_fp32(logits.reshape(-1, self.vocab_size))
        return out.reshape(logits.shape).to(logits.dtype)

    def apply_fp32(self, rows: Tensor) -> Tensor:
        """``T(z)`` of ``[N, V]`` rows in fp32 (guarded when ``guard_margin`` is
        set), with the graph to the parameters."""
        out = affine_logits(rows, **self.kernel_params())
        if self.guard_margin is not None:
            out = argmax_guard(out, rows, self.guard_margin)
        return out

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """LM-head ``(E', c')`` such that ``h E'ᵀ + c' = T(h Eᵀ + c)``."""
        raise NotImplementedError

    def save_pretrained(self, directory: str, vocab_fingerprint: str = "") -> None:
        """A Hub-style directory (``config.json`` + ``transform.safetensors``)."""
        from cmiguard.checkpoint import save_pretrained

        save_pretrained(self, directory, vocab_fingerprint)

    @classmethod
    def from_pretrained(
        cls,
        directory: str,
        vocab_size: int | None = None,
        vocab_fingerprint: str | None = None,
        device: str | torch.device = "cpu",
    ) -> LogitTransform:
        """Load a directory written by :meth:`save_pretrained`, refusing another
        vocabulary (``vocab_size`` / ``vocab_fingerprint``) or another family."""
        from cmiguard.checkpoint import from_pretrained

        transform = from_pretrained(directory, vocab_size, vocab_fingerprint, device)
        if not isinstance(transform, cls):
            raise TypeError(f"{directory} holds a {type(transform).__name__}, not a {cls.__name__}")
        return transform

    @torch.no_grad()
    def distance_from_identity(self) -> float:
        """``‖M − I‖_F`` of the linear part plus ``‖b‖`` of the bias: how far
        training has moved the map (without forming a ``V × V`` matrix)."""
        params = self.kernel_params()
        if params.get("weight") is not None:
            eye = torch.eye(self.vocab_size, device=params["weight"].device)
            sq = float(((params["weight"] - eye) ** 2).sum())
        else:
            a, b = self.linear_factors()
            sq = float(((a.T @ a) * (b.T @ b)).sum())  # ‖A Bᵀ‖² = tr((AᵀA)(BᵀB))
            if params.get("scale") is not None:
                d = params["scale"].double() - 1
                sq += float((d**2).sum()) + 2 * float((d * (a * b).sum(1)).sum())
        if params.get("bias") is not None:
            sq += float((params["bias"].double() ** 2).sum())
        return sq**0.5

    def extra_repr(self) -> str:
        guard = "" if self.guard_margin is None else f", guard_margin={self.guard_margin}"
        centered = ", centered=True" if getattr(self, "centered", False) else ""
        return (
            f"vocab_size={self.vocab_size}, rank={self.rank}, temperature={self.temperature}"
            f"{guard}{centered}"
        )


def check_transform(transform: object) -> None:
    """A public function's ``transform`` must be a built transform, not a path to one."""
    if not isinstance(transform, LogitTransform):
        hint = " (read a file with cmiguard.load_transform)" if isinstance(transform, str) else ""
        raise TypeError(
            f"transform must be a cmiguard LogitTransform, got {type(transform).__name__}{hint}"
        )


def check_centered(family: str) -> None:
    """``centered`` makes only the low-rank map shift-invariant."""
    if family != "lowrank":
        raise ValueError(
            f"centered is for the lowrank family, not {family} (its scale d or dense W "
            "would still move with a shift of the logits)"
        )


class _LowRank(LogitTransform):
    """The low-rank part shared by the low-rank families: ``A``, ``B`` and the
    dtype the kernels read them in."""

    a: nn.Parameter
    b: nn.Parameter
    factor_dtype: str | None = None
    centered: bool = False

    def _set_factor_dtype(self, factor_dtype: str | None) -> None:
        if factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype must be None or 'bfloat16', got {factor_dtype!r}")
        self.factor_dtype = factor_dtype

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` as the kernels and the twin read them (``A``'s columns
        centred when ``centered``, which keeps the kernels' mean term small,
        then rounded to ``factor_dtype`` when set; differentiable to the fp32
        parameters)."""
        a = self.a - self.a.mean(0, keepdim=True) if self.centered else self.a
        dtype = FACTOR_DTYPES[self.factor_dtype]
        return (a, self.b) if dtype is None else (a.to(dtype), self.b.to(dtype))

    def linear_factors(self) -> tuple[Tensor, Tensor]:
        """``(A, B)`` in float64 such that the map of unmasked rows is
        ``z + (z A) Bᵀ (+ b)``: the read factors, ``A``'s columns centred
        again after rounding for a centred map (its mean term, see
        :func:`~cmiguard.kernels.reference.mean_term`, is ``z (1 1ᵀ/V) A``)."""
        a, b = (f.detach().double() for f in self.factors())
        return (a - a.mean(0, keepdim=True) if self.centered else a), b


def _low_rank_factors(
    vocab_size: int, rank: int, init: str, init_scale: float
) -> tuple[nn.Parameter, nn.Parameter]:
    """``(A, B)`` of ``z + (zA)Bᵀ``: one factor ~ N(0, 1), the other
    ``init_scale``·N(0, 1) (zero by default: the identity, where the seed's
    cosine has no gradient; a small scale starts just off it)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if not init_scale >= 0:
        raise ValueError(f"init_scale must be >= 0, got {init_scale}")
    random = torch.randn(vocab_size, rank)
    small = torch.randn(vocab_size, rank) * init_scale if init_scale else torch.zeros_like(random)
    a, b = (random, small) if init == "lora" else (small, random)
    return nn.Parameter(a), nn.Parameter(b)


class LowRankTransform(_LowRank):
    """``T(z) = z + (z A) Bᵀ (+ b)``: the seed paper's ``M = I + A B``.

    ``init="lora"``: ``A ~ N(0, 1)`` and ``B = 0``, so that ``T`` starts as the
    identity while ``B``'s gradient is not zero; ``init="seed"``: ``A = 0``,
    ``B ~ N(0, 1)`` (see :data:`INITS`). ``centered=True`` reads each row
    through its deviations from the mean of its unmasked entries, so ``T`` is
    shift-invariant (masks and bf16 factors included) and purifies stored
    log-probs as it does logits.
    """

    family = "lowrank"

    def __init__(
        self,
        vocab_size: int,
        rank: int = 32,
        bias: bool = False,
        temperature: float = 1.0,
        init: str = "lora",
        init_scale: float = 0.0,
        guard_margin: float | None = None,
        factor_dtype: str | None = None,
        centered: bool = False,
    ) -> None:
        super().__init__(vocab_size, rank, temperature, guard_margin)
        self.a, self.b = _low_rank_factors(vocab_size, rank, init, init_scale)
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None
        self._set_factor_dtype(factor_dtype)
        if centered:
            check_centered(self.family)
        self.centered = bool(centered)

    @property
    def shift_invariant(self) -> bool:
        return self.centered

    def kernel_params(self) -> dict[str, Tensor | bool | None]:
        a, b = self.factors()
        params: dict[str, Tensor | bool | None] = {"a": a, "b": b, "bias": self.bias}
        if self.centered:
            params["centered"] = True
        return params

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        w = weight.float()
        a, b = (f.float() for f in self.linear_factors())
        new_w = w + b @ (a.t() @ w)
        new_b = _fold_bias(self, bias)
        return new_w.to(weight.dtype), new_b


class DiagLowRankTransform(_LowRank):
    """``T(z) = z ⊙ d + (z A) Bᵀ + b``: a per-token scale on top of the low rank."""

    family = "diag_lowrank"

    def __init__(
        self,
        vocab_size: int,
        rank: int = 32,
        temperature: float = 1.0,
        init: str = "lora",
        init_scale: float = 0.0,
        guard_margin: float | None = None,
        factor_dtype: str | None = None,
    ) -> None:
        super().__init__(vocab_size, rank, temperature, guard_margin)
        self.scale = nn.Parameter(torch.ones(vocab_size))
        self.a, self.b = _low_rank_factors(vocab_size, rank, init, init_scale)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self._set_factor_dtype(factor_dtype)

    def kernel_params(self) -> dict[str, Tensor | bool | None]:
        a, b = self.factors()
        return {"scale": self.scale, "a": a, "b": b, "bias": self.bias}

    def fold(self, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        w = weight.float()
        a, b = (f.float() for f in self.linear_factors())
        new_w = self.scale.float().unsqueeze(1) * w + b @ (a.t() @ w)
        return new_w.to(weight.dtype), _fold_bias(self, bias)


# V² fp32 weights: 1 GiB at this size (and AdamW keeps two more copies)
DENSE_MAX_VOCAB = 16_384


def check_dense(vocab_size: int) -> None:
    """Refuse a dense transform too large to hold, before anything is spent on it."""
    if vocab_size > DENSE_MAX_VOCAB:
        gib = vocab_size**2 * 4 / 2**30
        raise ValueError(
            f"a dense transform of a {vocab_size:,}-token vocabulary has {vocab_size:,}² "
            f"weights ({gib:.1f} GiB in fp32); it is for vocabularies up to "
            f"{DENSE_MAX_VOCAB:,}: use lowrank or diag_lowrank"
        )


class DenseTransform(LogitTransform):
    """``T(z) = z Wᵀ + b`` with ``W = I``: only for small vocabularies (V² parameters)."""

    family = "dense"

    def __init__(
        self,
        vocab_size: int,
        bias: bool = True,
        temperature: float = 1.0,
        guard_margin: float | None = None,
    ) -> None:
        check_dense(vocab_size)
        super().__init__(vocab_size, 0, temperature, guard_margin)
        self.weight = nn.Parameter(torch.eye(vocab_size))
        self.bias = nn.Parameter(torch.zeros(vocab_size)) if bias else None

    def kernel_params(self) -> dict[str, Tensor | bool | None]:
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

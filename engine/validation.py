"""Input checks that fail early with a message naming the problem."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_logits(
    logits: Tensor, vocab_size: int | None = None, name: str = "logits", scan: bool = True
) -> bool:
    """Logits must be a float tensor ``[..., V]`` with no NaN, no ``+inf`` and
    at least one finite entry per row (``-inf`` marks a masked token).

    Returns whether any entry is masked. One reduction pass (``aminmax``
    propagates NaN) in the common all-finite case; ``scan=False`` checks type
    and shape only, for a kernel that checks the values as it reads them
    (and returns False).
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape [..., vocab], got {tuple(logits.shape)}")
    if vocab_size is not None and logits.shape[-1] != vocab_size:
        raise ValueError(
            f"{name} have {logits.shape[-1]} entries in the last dimension but the transform "
            f"was built for vocab_size={vocab_size}"
        )
    if logits.numel() == 0:
        raise ValueError(f"{name} are empty (shape {tuple(logits.shape)})")
    if not scan:
        return False
    lo, hi = (float(x) for x in torch.aminmax(logits.detach()))
    if math.isnan(lo) or math.isnan(hi):
        raise ValueError(f"{name} contain NaN")
    if hi == math.inf:
        raise ValueError(f"{name} contain +inf")
    if lo != -math.inf:
        return False
    if (logits.amax(dim=-1) == -math.inf).any():
        raise ValueError(f"{name} have a row that is entirely -inf (every token masked)")
    return True


def are_log_probs(rows: Tensor) -> bool:
    """Whether every row's logsumexp is at most 0 (to the rows' rounding):
    log-probs, whole (0) or truncated to a stored top-k with the rest masked
    (below 0), or edited by a masking processor; not logits (the teacher's
    logit rows have a logsumexp of 14 to 38 nats)."""
    lse = torch.logsumexp(rows.detach().float(), dim=-1)
    tol = 1e-3 if rows.dtype == torch.float32 else 3e-2  # 16-bit rows round their sum
    return bool(lse.numel()) and bool((lse <= tol).all())


def check_not_log_probs(rows: Tensor, fix: str) -> None:
    """Refuse rows that are already log-probabilities (:func:`are_log_probs`).

    A transform maps a model's logits and is not shift-invariant
    (``T(z + c) ≠ T(z) + c``): on log-probs it applies another map than the one
    trained and judged. Stored outputs are often log-probs, hence the check.
    """
    if are_log_probs(rows):
        raise ValueError(
            "every row's logsumexp is at most 0: these are log-probabilities (whole, or "
            "truncated with the rest masked), not logits. A transform maps a model's logits "
            "and is not shift-invariant (T(z + c) is not T(z) + c), so on log-probs it "
            f"applies another map than the one trained and evaluated. Purify the model's "
            f"logits, or {fix} to purify these anyway (a centered transform, cmiguard "
            "train --centered, maps both alike)"
        )


def check_temperature(value: float) -> float:
    """A temperature divides logits: finite and > 0 (0 and inf give NaN or uniform rows)."""
    tau = float(value)
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"temperature must be finite and > 0, got {value}")
    return tau


def check_cmi_options(estimator: str, temperature: float, min_count: int) -> float:
    """What ``cmi`` and the objective take besides the rows; returns the temperature.
    Rows whose label occurs fewer than ``min_count`` times are left out of CMI."""
    if estimator not in ("exact", "streaming"):
        raise ValueError(f"estimator must be 'exact' or 'streaming', got {estimator!r}")
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    return check_temperature(temperature)


def check_top_k(top_k: int | None, vocab_size: int) -> None:
    """``top_k`` (None: the whole vocabulary) must be in ``[1, vocab_size]``."""
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise ValueError(f"top_k must be in [1, {vocab_size}], got {top_k}")


def check_labels(
    labels: Tensor, rows: tuple[int, ...], vocab_size: int, ignore_index: int = -100
) -> Tensor:
    """Labels are integer token ids, one per logits row: shaped like the logits
    less their last dimension (``[B, T]`` for ``[B, T, V]``) or flat ``[N]``, each
    in ``[0, V)`` or ``ignore_index``. Returns them flat, as int64."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be integer token ids, got {labels.dtype}")
    n_rows = math.prod(rows)
    if tuple(labels.shape) not in (tuple(rows), (n_rows,)):
        shapes = f"{list(rows)} or [{n_rows}]" if len(rows) > 1 else f"[{n_rows}]"
        raise ValueError(
            f"labels must have shape {shapes} (one per logits row), got {tuple(labels.shape)}"
        )
    flat = labels.reshape(-1).long()
    bad = (flat != ignore_index) & ((flat < 0) | (flat >= vocab_size))
    if bad.any():
        value = int(flat[bad][0])
        raise ValueError(
            f"label {value} is out of range for vocab_size={vocab_size} "
            f"(use {ignore_index} to ignore a row)"
        )
    return flat


def check_device(logits: Tensor, module: torch.nn.Module, name: str = "transform") -> None:
    """The module's parameters must sit on the logits' device (a kernel cannot mix them)."""
    param = next(module.parameters(), None)
    if param is not None and param.device != logits.device:
        raise ValueError(
            f"logits are on {logits.device} but the {name} is on {param.device}: "
            f"move it with .to({str(logits.device)!r})"
        )

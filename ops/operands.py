"""The operand tuple every transform-recomputing kernel takes, from a dict of
``x``, ``u``, ``b``, ``scale`` and ``bias`` (what is absent gets a dummy and a
false flag, so one kernel source serves every transform family)."""

from __future__ import annotations

import torch


def kernel_operands(ops: dict[str, object]) -> tuple:
    """``(x, u, b, scale, bias)`` for a launch, a 1-element dummy for what is absent."""
    x = ops["x"]
    dummy = torch.empty(1, dtype=torch.float32, device=x.device)
    return (
        x,
        *(ops.get(k) if ops.get(k) is not None else dummy for k in ("u", "b", "scale", "bias")),
    )


def kernel_flags(ops: dict[str, object]) -> tuple:
    """``(R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS)``."""
    u = ops.get("u")
    return (
        u.shape[1] if u is not None else 0,
        u is not None,
        ops.get("scale") is not None,
        ops.get("bias") is not None,
    )

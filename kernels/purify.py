"""Fused purify: transform + temperature + (log-)softmax, one row block per program.

``output="logits"`` reads the logits once and writes ``T(z)/τ``;
``"logprobs"`` reads them twice (running log-sum-exp, then the write).
The low-rank product ``u = z A`` is one more read, done by
:func:`project`. No ``[N, V]`` temporary is made; top-k goes through a
bounded chunk of rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cmiguard.kernels.config import launch_config
from cmiguard.kernels.reference import affine_logits, row_chunks
from cmiguard.kernels.tile import finish_lse, next_pow2, online_lse, project_kernel, transform_tile


@triton.jit
def purify_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    N,
    V,
    stride_x,
    stride_out,
    inv_tau,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOGPROBS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_out
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        t = transform_tile(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R)  # fmt: skip
        t = t * inv_tau
        if LOGPROBS:
            m, s = online_lse(m, s, t)
        else:
            ok = row_ok[:, None] & (cols[None, :] < V)
            tl.store(out_rows + cols[None, :], t.to(out_ptr.dtype.element_ty), mask=ok)
    if LOGPROBS:
        lse = finish_lse(m, s)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            t = transform_tile(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R)  # fmt: skip
            t = t * inv_tau - lse[:, None]
            ok = row_ok[:, None] & (cols[None, :] < V)
            tl.store(out_rows + cols[None, :], t.to(out_ptr.dtype.element_ty), mask=ok)


def project(z: Tensor, a: Tensor) -> Tensor:
    """``u = z A`` in fp32, ``-inf`` logits read as 0: ``[N, R]``."""
    n, v = z.shape
    r = a.shape[1]
    u = torch.empty(n, r, dtype=torch.float32, device=z.device)
    cfg = launch_config(n, v, r)
    r_pad = max(16, next_pow2(r))
    grid = (triton.cdiv(n, cfg.block_n),)
    project_kernel[grid](
        z, a.float().contiguous(), u, n, v, z.stride(0), r, r_pad, cfg.block_n, cfg.block_v
    )
    return u


def transform_operands(z: Tensor, params: dict[str, Tensor | None]) -> dict[str, object]:
    """What the kernels take for a transform: ``x`` (z, or the dense product),
    ``u = z A`` and the per-column tensors, all contiguous fp32 except ``x``."""
    if params.get("weight") is not None:
        return {"x": affine_logits(z, weight=params["weight"], bias=params.get("bias"))}
    ops: dict[str, object] = {"x": z}
    if params.get("a") is not None:
        ops["u"] = project(z, params["a"])
        ops["b"] = params["b"].float().contiguous()
    for key in ("scale", "bias"):
        if params.get(key) is not None:
            ops[key] = params[key].float().contiguous()
    return ops


def launch_purify(
    ops: dict[str, object], out: Tensor, temperature: float, logprobs: bool
) -> Tensor:
    """Run :func:`purify_kernel` over all rows of ``ops["x"]`` into ``out``; returns the lse."""
    x = ops["x"]
    n, v = x.shape
    u, b = ops.get("u"), ops.get("b")
    r = u.shape[1] if u is not None else 0
    cfg = launch_config(n, v, r)
    lse = torch.empty(n, dtype=torch.float32, device=x.device)
    dummy = lse
    purify_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        u if u is not None else dummy,
        b if b is not None else dummy,
        ops.get("scale", dummy),
        ops.get("bias", dummy),
        out,
        lse,
        n,
        v,
        x.stride(0),
        out.stride(0),
        1.0 / temperature,
        r,
        u is not None,
        "scale" in ops,
        "bias" in ops,
        logprobs,
        cfg.block_n,
        cfg.block_v,
        cfg.block_r,
    )
    return lse


def purify_triton(
    z: Tensor,
    params: dict[str, Tensor | None],
    temperature: float = 1.0,
    output: str = "logits",
    top_k: int | None = None,
    chunk_rows: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton twin of :func:`cmiguard.kernels.reference.purify_reference` (``z``: ``[N, V]``)."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    logprobs = output == "logprobs"
    if top_k is None:
        out = torch.empty_like(z)
        launch_purify(transform_operands(z, params), out, temperature, logprobs)
        return out
    n, v = z.shape
    values = torch.empty(n, top_k, dtype=z.dtype, device=z.device)
    ids = torch.empty(n, top_k, dtype=torch.long, device=z.device)
    for rows in row_chunks(n, v, chunk_rows):
        block = torch.empty(rows.stop - rows.start, v, dtype=torch.float32, device=z.device)
        launch_purify(transform_operands(z[rows], params), block, temperature, logprobs)
        top_values, top_ids = block.topk(top_k, dim=-1)
        values[rows], ids[rows] = top_values.to(z.dtype), top_ids
    return values, ids

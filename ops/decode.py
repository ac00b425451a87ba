"""Purify for decode batches: ``T(z)`` recomputed once, then a fix-up.

At a few rows the logits are small and the factor tiles are the traffic (B
is ``V × r`` fp32: 39 MB at V = 151,936, r = 64, against 0.6 MB of logits a
row), so the general path's lse pass, which recomputes ``T(z)`` through B a
second time, costs more than it saves. Here the write pass stores ``T(z)/τ``
and each chunk's log-sum-exp (and the guard's statistics) on the one
recompute, and :func:`fixup_kernel` subtracts the row's log-sum-exp (and
lifts the guarded column) from what was written. With the projection
(:func:`~cmiguard.kernels.tile.project_kernel`, which also checks the input
and finds the guard's column) that is three launches, no torch op between
them and no host sync until the input check raises.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cmiguard.kernels.config import launch_config, vocab_split
from cmiguard.kernels.operands import kernel_flags, kernel_operands
from cmiguard.kernels.tile import (
    chunk_lse,
    combine_lse,
    guard_lift,
    guard_start,
    guard_step,
    guard_store,
    online_lse,
    transform_tile,
)

# rows up to which purify takes this path (a decode batch; the general path's
# extra read of the logits is cheaper than the extra read of B past it)
DECODE_MAX_ROWS = 64


@triton.jit
def decode_write_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,
    j_ptr,
    guard_ptr,
    N,
    V,
    v_chunk,
    stride_x,
    stride_out,
    inv_tau,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    GUARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """``T(z)/τ`` over one chunk into ``out``, and from the same tiles the
    chunk's log-sum-exp of it (``part[split, row]``) and, with ``GUARD``, the
    guard's statistics around ``j[row]`` (``guard[split, row, 0..2]``, as
    :func:`~cmiguard.kernels.tile.lse_kernel` takes them)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    split = tl.program_id(1)
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_out
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if GUARD:
        jj, g_off, g_on, m_off, s_off = guard_start(rows, row_ok, j_ptr)
    v_lo = split * v_chunk
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols[None, :] < V)
        t = transform_tile(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
        scaled = t * inv_tau
        m, s = online_lse(m, s, scaled)
        if GUARD:
            g_off, g_on, m_off, s_off = guard_step(jj, g_off, g_on, m_off, s_off, t, scaled, cols)
        tl.store(out_rows + cols[None, :], scaled.to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(part_ptr + split * N + rows, chunk_lse(m, s), mask=row_ok)
    if GUARD:
        guard_store(guard_ptr, split, N, rows, row_ok, g_off, g_on, m_off, s_off)


@triton.jit
def fixup_kernel(
    written_ptr,
    out_ptr,
    part_ptr,
    j_ptr,
    guard_ptr,
    N,
    V,
    v_chunk,
    splits,
    stride_written,
    stride_out,
    inv_tau,
    margin,
    LOGPROBS: tl.constexpr,
    GUARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Log-probs: ``out = written − lse`` over one chunk, the row's log-sum-exp
    combined here from the write pass's chunks (the guard's, with ``GUARD``,
    and column ``j`` set to its lifted value). Logits (``GUARD`` only, one
    program per row block): column ``j`` of ``out`` set to its lifted value."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    if GUARD:
        jj = tl.load(j_ptr + rows, mask=row_ok, other=0)
        lift, lse = guard_lift(guard_ptr, rows, row_ok, N, splits, margin, inv_tau)
    else:
        lse = combine_lse(part_ptr, rows, row_ok, N, splits, 1)
    if LOGPROBS:
        written_rows = written_ptr + rows[:, None].to(tl.int64) * stride_written
        out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_out
        v_lo = tl.program_id(1) * v_chunk
        for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            ok = row_ok[:, None] & (cols[None, :] < V)
            y = tl.load(written_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if GUARD:
                y = tl.where(cols[None, :] == jj[:, None], lift[:, None] * inv_tau, y)
            y = y - lse[:, None]
            tl.store(out_rows + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)
    elif GUARD:
        at = out_ptr + rows.to(tl.int64) * stride_out + jj
        tl.store(at, (lift * inv_tau).to(out_ptr.dtype.element_ty), mask=row_ok)


def launch_decode(
    ops: dict[str, object],
    out: Tensor,
    temperature: float,
    logprobs: bool,
    guard: float | None = None,
) -> None:
    """Purify ``ops["x"]`` (a decode batch, already projected and checked) into
    ``out``: the write pass, then the fix-up. Log-probs are written in fp32
    first (into ``out`` itself when it is fp32), so a half-precision output is
    rounded once, as on the general path."""
    x = ops["x"]
    n, v = x.shape
    cfg = launch_config(n, v, ops["u"].shape[1])
    splits, chunk = vocab_split(n, v, cfg, x.device)
    written = out
    if logprobs and out.dtype != torch.float32:
        written = torch.empty(n, v, dtype=torch.float32, device=x.device)
    part = torch.empty(splits, n, dtype=torch.float32, device=x.device)
    g_part = (
        torch.empty(splits, n, 3, dtype=torch.float32, device=x.device)
        if guard is not None
        else part
    )
    cols = ops["argmax"] if guard is not None else part
    row_blocks = triton.cdiv(n, cfg.block_n)
    decode_write_kernel[(row_blocks, splits)](
        *kernel_operands(ops),
        written,
        part,
        cols,
        g_part,
        n,
        v,
        chunk,
        x.stride(0),
        written.stride(0),
        1.0 / temperature,
        *kernel_flags(ops),
        guard is not None,
        *cfg.constexprs,
        **cfg.options,
    )
    fixup_kernel[(row_blocks, splits if logprobs else 1)](
        written,
        out,
        part,
        cols,
        g_part,
        n,
        v,
        chunk,
        splits,
        written.stride(0),
        out.stride(0),
        1.0 / temperature,
        guard or 0.0,
        logprobs,
        guard is not None,
        cfg.block_n,
        cfg.block_v,
        **cfg.options,
    )

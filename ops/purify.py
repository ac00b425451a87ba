"""Fused purify: transform + temperature + (log-)softmax, no ``[N, V]`` temporary.

Each launch runs one program per (row block, vocabulary chunk), so that a
single decode row still spreads over the chip (:func:`vocab_split`). The
low-rank product ``u = z A`` is one read (:func:`project`, which also finds
the guard's column). ``output="logits"`` then reads the logits once more and
writes ``T(z)/τ``; ``"logprobs"`` (and the argmax guard) first take per-chunk
log-sum-exps (:func:`lse_kernel`), which the write pass combines itself: no
torch op between launches. Decode batches take :mod:`cmiguard.kernels.decode`
instead, on CUDA replayed from a graph (:mod:`cmiguard.kernels.decode_graph`). Top-k goes through a bounded chunk of rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from cmiguard.kernels.config import LaunchConfig, launch_config, vocab_split
from cmiguard.kernels.decode import DECODE_MAX_ROWS, launch_decode
from cmiguard.kernels.operands import kernel_flags, kernel_operands
from cmiguard.kernels.reference import affine_logits, row_chunks
from cmiguard.kernels.tile import (
    combine_lse,
    guard_lift,
    lse_kernel,
    project_kernel,
    transform_tile_and_x,
)


@triton.jit
def purify_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    out_ptr,
    lse_ptr,
    j_ptr,
    guard_ptr,
    flags_ptr,
    N,
    V,
    v_chunk,
    stride_x,
    stride_out,
    inv_tau,
    margin,
    lse_splits,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    LOGPROBS: tl.constexpr,
    GUARD: tl.constexpr,
    CHECK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """``T(z)/τ`` (minus the row's log-sum-exp for log-probs) over one chunk;
    with ``GUARD`` column ``j[row]`` holds its lifted value (:func:`guard_lift`).

    The row's log-sum-exp (and the guard's lift) are combined here from the
    lse pass's per-chunk parts (:func:`lse_kernel`: ``lse[split, row, 0]``,
    ``guard[split, row, 0..2]``), so no torch op sits between the passes.
    With ``CHECK`` the input tiles are checked on the way: per (chunk, row),
    the counts of NaN, of ``+inf`` and of finite entries go to ``flags``, so
    no separate validation pass reads the logits."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_out
    if GUARD:
        jj = tl.load(j_ptr + rows, mask=row_ok, other=-1)
        lift, lse = guard_lift(guard_ptr, rows, row_ok, N, lse_splits, margin, inv_tau)
    elif LOGPROBS:
        lse = combine_lse(lse_ptr, rows, row_ok, N, lse_splits, 3)
    if CHECK:
        nans = tl.zeros((BLOCK_N,), dtype=tl.int32)
        infs = tl.zeros((BLOCK_N,), dtype=tl.int32)
        finite = tl.zeros((BLOCK_N,), dtype=tl.int32)
    v_lo = tl.program_id(1) * v_chunk
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols[None, :] < V)
        t, x = transform_tile_and_x(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
        if CHECK:
            nans += tl.sum(tl.where(ok & (x != x), 1, 0), axis=1)
            infs += tl.sum(tl.where(ok & (x == float("inf")), 1, 0), axis=1)
            finite += tl.sum(tl.where(ok & (x == x) & (tl.abs(x) < float("inf")), 1, 0), axis=1)
        if GUARD:
            t = tl.where(cols[None, :] == jj[:, None], lift[:, None], t)
        t = t * inv_tau
        if LOGPROBS:
            t = t - lse[:, None]
        tl.store(out_rows + cols[None, :], t.to(out_ptr.dtype.element_ty), mask=ok)
    if CHECK:
        f = flags_ptr + (tl.program_id(1) * N + rows).to(tl.int64) * 3
        tl.store(f, nans, mask=row_ok)
        tl.store(f + 1, infs, mask=row_ok)
        tl.store(f + 2, finite, mask=row_ok)


class Projection(NamedTuple):
    """:func:`project`'s result: ``u`` ``[N, R]`` (fp32); with ``argmax`` each
    row's raw argmax ``[N]`` (int64); with ``centered`` each row's mean over
    its unmasked entries ``[N]`` (fp32), which the backward reads."""

    u: Tensor
    argmax: Tensor | None = None
    mean: Tensor | None = None


def project(
    z: Tensor, a: Tensor, check: bool = False, argmax: bool = False, centered: bool = False
) -> Projection:
    """``u = z A`` in fp32, ``-inf`` logits read as 0 (``centered``: less the
    mean term, :func:`cmiguard.kernels.reference.mean_term`), one launch
    (:func:`launch_project`). With ``check`` the same read checks the logits
    (:func:`raise_on_bad_input`); with ``argmax`` it also finds each row's raw
    argmax, the argmax guard's column."""
    n, v = z.shape
    with tickets(z.device, ticket_count(n, v, a.shape[1], z.device)) as count:
        u, j, mean, counts = launch_project(z, a, count, check, argmax, centered)
    if check:
        raise_on_bad_input(counts)
    return Projection(u, j, mean)


def project_grid(n: int, v: int, r: int, device) -> tuple[int, int, int]:
    """:func:`project_kernel`'s grid: (row blocks, vocabulary splits, rank blocks)."""
    cfg = launch_config(n, v, r)
    splits, _ = vocab_split(n, v, cfg, device)
    return triton.cdiv(n, cfg.block_n), splits, triton.cdiv(r, cfg.block_r)


def ticket_count(n: int, v: int, r: int, device) -> int:
    """How many tickets :func:`launch_project` takes: one per (row block, rank block)."""
    blocks, _, rank_blocks = project_grid(n, v, r, device)
    return blocks * rank_blocks


def launch_project(
    z: Tensor, a: Tensor, count: Tensor, check: bool, argmax: bool, centered: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """``(u, j, mean, counts)`` with no host sync, so a CUDA graph can hold it:
    :func:`project_kernel` (a split-K product whose last program per block
    sums the parts in split order, so the result does not depend on the order
    programs finish in), taking its tickets from ``count`` (zeroed, at least
    :func:`ticket_count` of them; the kernel leaves them zero). ``j``: each
    row's raw argmax with ``argmax``; ``mean``: each row's unmasked mean with
    ``centered`` (then ``u`` is centred); ``counts``: per row the NaN, ``+inf``
    and finite inputs ``[N, 3]`` with ``check``, for :func:`raise_on_bad_input`."""
    n, v = z.shape
    r = a.shape[1]
    cfg = launch_config(n, v, r)
    splits, chunk = vocab_split(n, v, cfg, z.device)
    grid = project_grid(n, v, r, z.device)
    part = torch.empty(splits, n, r, dtype=torch.float32, device=z.device)
    u = torch.empty(n, r, dtype=torch.float32, device=z.device)
    flags = torch.empty((splits, n, 3), dtype=torch.int32, device=z.device) if check else part
    am_val = torch.empty(splits, n, dtype=torch.float32, device=z.device) if argmax else part
    am_idx = torch.empty(splits, n, dtype=torch.long, device=z.device) if argmax else part
    j = torch.empty(n, dtype=torch.long, device=z.device) if argmax else part
    m_part = torch.empty_like(part) if centered else part
    sums = torch.empty(splits, grid[2], n, 2, device=z.device) if centered else part
    mean = torch.empty(n, dtype=torch.float32, device=z.device) if centered else part
    project_kernel[grid](
        z,
        a.contiguous(),  # fp32 or bf16 (factor_dtype): the kernel reads it in fp32
        part,
        u,
        flags,
        am_val,
        am_idx,
        j,
        m_part,
        sums,
        mean,
        count,
        n,
        v,
        chunk,
        splits,
        z.stride(0),
        r,
        check,
        argmax,
        centered,
        *cfg.constexprs,
        **cfg.options,
    )
    return (
        u,
        j if argmax else None,
        mean if centered else None,
        flags.sum(0) if check else None,
    )


_TICKETS: dict[tuple, Tensor] = {}


@contextmanager
def tickets(device: torch.device, count: int) -> Iterator[Tensor]:
    """``count`` zeroed int32 counters for :func:`project_kernel`'s last-program
    reduction, kept per (device, stream) between calls: the kernel leaves them
    zero, so no memset launch. A launch that raised may have left them dirty:
    the set is only put back after a launch returns (a concurrent caller on the
    same stream gets fresh ones)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    have = _TICKETS.pop(key, None)
    if have is None or have.numel() < count:
        have = torch.zeros(max(count, 256), dtype=torch.int32, device=device)
    yield have
    _TICKETS[key] = have


def row_lse(
    ops: dict[str, object],
    z: Tensor,
    temperature: float,
    cfg: LaunchConfig,
    need_t: bool = False,
    need_z: bool = False,
) -> Tensor:
    """``[N, 3]`` fp32: the log-sum-exps of ``T(z)/τ``, ``T(z)`` (if ``need_t``)
    and ``z`` (if ``need_z``); 0 for an all-masked row (its outputs stay ``-inf``)."""
    part, _ = row_lse_parts(ops, z, temperature, cfg, need_t, need_z)
    return torch.logsumexp(part, 0).nan_to_num(neginf=0.0)


def row_lse_parts(
    ops: dict[str, object],
    z: Tensor,
    temperature: float,
    cfg: LaunchConfig,
    need_t: bool = False,
    need_z: bool = False,
    guard_cols: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The lse pass's per-chunk results, uncombined: ``[splits, N, 3]`` and, with
    ``guard_cols`` (``[N]`` int64), the guard's ``[splits, N, 3]`` (``[1, N, 3]``
    unused without)."""
    x = ops["x"]
    n, v = x.shape
    splits, chunk = vocab_split(n, v, cfg, x.device)
    # -inf where a column is not asked for: row_lse combines all three
    part = torch.full((splits, n, 3), float("-inf"), dtype=torch.float32, device=x.device)
    guard = guard_cols is not None
    g_part = torch.empty((splits if guard else 1, n, 3), dtype=torch.float32, device=x.device)
    lse_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        *kernel_operands(ops),
        z,
        part,
        guard_cols if guard else part,
        g_part,
        n,
        v,
        chunk,
        x.stride(0),
        z.stride(0),
        1.0 / temperature,
        *kernel_flags(ops),
        need_t,
        need_z,
        guard,
        *cfg.constexprs,
        **cfg.options,
    )
    return part, g_part


def transform_operands(
    z: Tensor, params: dict[str, Tensor | bool | None], check: bool = False, argmax: bool = False
) -> dict[str, object]:
    """What the kernels take for a transform: ``x`` (z, or the dense product),
    ``u = z A`` and the per-column tensors, all contiguous fp32 except ``x``;
    with ``argmax`` also each row's raw argmax (``"argmax"``, taken on the
    projection's read when there is one). ``check`` checks ``z`` on the
    projection's read (it is the caller's job when there is none)."""
    if params.get("weight") is not None:
        ops: dict[str, object] = {
            "x": affine_logits(z, weight=params["weight"], bias=params.get("bias"))
        }
    else:
        ops = {"x": z, **column_operands(params)}
        if params.get("a") is not None:
            centered = params.get("centered", False)
            ops["u"], ops["argmax"], _ = project(z, params["a"], check, argmax, centered)
    if argmax and ops.get("argmax") is None:
        ops["argmax"] = z.argmax(-1).contiguous()
    return ops


def column_operands(params: dict[str, Tensor | bool | None]) -> dict[str, Tensor]:
    """A low-rank family's per-column operands: ``b`` (fp32 or bf16, read in
    fp32), ``scale`` and ``bias`` (fp32), each contiguous, where present."""
    ops = {}
    if params.get("b") is not None and params.get("a") is not None:
        ops["b"] = params["b"].contiguous()
    for key in ("scale", "bias"):
        if params.get(key) is not None:
            ops[key] = params[key].float().contiguous()
    return ops


def takes_decode_path(
    n_rows: int, params: dict[str, Tensor | bool | None], logprobs: bool, guard: float | None
) -> bool:
    """Decode batches of a low-rank transform whose output needs row statistics
    (log-probs or the guard): written once from a single recompute of ``T(z)``
    and fixed up (:mod:`cmiguard.kernels.decode`), because there the factor
    tiles, not the logits, are the traffic."""
    return (
        n_rows <= DECODE_MAX_ROWS
        and params.get("weight") is None
        and params.get("a") is not None
        and (logprobs or guard is not None)
    )


def launch_purify(
    ops: dict[str, object],
    out: Tensor,
    temperature: float,
    logprobs: bool,
    guard: float | None = None,
    check: bool = True,
) -> None:
    """Purify all rows of ``ops["x"]`` into ``out``: the lse pass first for
    log-probs and the guard (it takes the guard's statistics too), then the
    write pass, which combines them itself and, with ``check``, counts NaN,
    ``+inf`` and finite inputs; then one sync to raise on bad input with
    :func:`cmiguard.validation.check_logits`' messages."""
    x = ops["x"]
    n, v = x.shape
    u = ops.get("u")
    cfg = launch_config(n, v, u.shape[1] if u is not None else 0)
    part = g_part = None
    if logprobs or guard is not None:
        cols = ops["argmax"] if guard is not None else None
        part, g_part = row_lse_parts(ops, x, temperature, cfg, guard_cols=cols)
    splits, chunk = vocab_split(n, v, cfg, x.device)
    flags = torch.empty((splits, n, 3), dtype=torch.int32, device=x.device) if check else out
    purify_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        *kernel_operands(ops),
        out,
        part if part is not None else out,
        ops["argmax"] if guard is not None else out,
        g_part if g_part is not None else out,
        flags,
        n,
        v,
        chunk,
        x.stride(0),
        out.stride(0),
        1.0 / temperature,
        guard or 0.0,
        part.shape[0] if part is not None else 1,
        *kernel_flags(ops),
        logprobs,
        guard is not None,
        check,
        *cfg.constexprs,
        **cfg.options,
    )
    if check:
        raise_on_bad_input(flags.sum(0))


def raise_on_bad_input(counts: Tensor, name: str = "logits") -> None:
    """``counts``: per row, NaN, ``+inf`` and finite entries. One host sync."""
    nan, inf, empty = torch.stack(
        [counts[:, 0].any(), counts[:, 1].any(), (counts[:, 2] == 0).any()]
    ).tolist()
    if nan:
        raise ValueError(f"{name} contain NaN")
    if inf:
        raise ValueError(f"{name} contain +inf")
    if empty:
        raise ValueError(f"{name} have a row that is entirely -inf (every token masked)")


def purify_triton(
    z: Tensor,
    params: dict[str, Tensor | bool | None],
    temperature: float = 1.0,
    output: str = "logits",
    top_k: int | None = None,
    chunk_rows: int | None = None,
    guard: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton twin of :func:`cmiguard.kernels.reference.purify_reference` (``z``: ``[N, V]``)."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    logprobs = output == "logprobs"

    def run(rows: Tensor, out: Tensor) -> None:
        decode = takes_decode_path(rows.shape[0], params, logprobs, guard)
        if decode and rows.is_cuda:
            from cmiguard.kernels.decode_graph import purify_decode_graphed, takes_graph

            if takes_graph(rows):
                purify_decode_graphed(rows, params, out, temperature, logprobs, guard)
                return
        ops = transform_operands(rows, params, check=decode, argmax=guard is not None)
        if decode:
            launch_decode(ops, out, temperature, logprobs, guard)
        else:
            launch_purify(ops, out, temperature, logprobs, guard)

    if top_k is None:
        out = torch.empty_like(z)
        run(z, out)
        return out
    n, v = z.shape
    values = torch.empty(n, top_k, dtype=z.dtype, device=z.device)
    ids = torch.empty(n, top_k, dtype=torch.long, device=z.device)
    for rows in row_chunks(n, v, chunk_rows):
        block = torch.empty(rows.stop - rows.start, v, dtype=torch.float32, device=z.device)
        run(z[rows], block)
        top_values, top_ids = block.topk(top_k, dim=-1)
        values[rows], ids[rows] = top_values.to(z.dtype), top_ids
    return values, ids

"""Fused purify: transform + temperature + (log-)softmax, no ``[N, V]`` temporary.

Each launch runs one program per (row block, vocabulary chunk), so that a
single decode row still spreads over the chip (:func:`vocab_split`).
``output="logits"`` reads the logits once and writes ``T(z)/τ``;
``"logprobs"`` first takes per-chunk log-sum-exps (:func:`lse_kernel`,
combined in torch: ``[N, splits]`` is small), then writes. The low-rank
product ``u = z A`` is one more read (:func:`project`). Top-k goes through
a bounded chunk of rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cmiguard.kernels.config import LaunchConfig, launch_config, vocab_split
from cmiguard.kernels.reference import affine_logits, row_chunks
from cmiguard.kernels.tile import lse_kernel, project_kernel, transform_tile_and_x


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
    lift_ptr,
    flags_ptr,
    N,
    V,
    v_chunk,
    stride_x,
    stride_out,
    inv_tau,
    lse_splits,
    lse_stride,
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
    with ``GUARD`` column ``j[row]`` holds ``lift[row]`` instead of ``T(z)``.

    The row log-sum-exp is combined here from the lse pass's per-chunk parts
    (``lse[split, row]`` at ``lse_ptr + (split·N + row)·lse_stride``). With
    ``CHECK`` the input tiles are checked on the way: per (chunk, row), the
    counts of NaN, of ``+inf`` and of finite entries go to ``flags``, so no
    separate validation pass reads the logits."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    out_rows = out_ptr + rows[:, None].to(tl.int64) * stride_out
    if LOGPROBS:
        m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sp in range(0, lse_splits):
            part = tl.load(
                lse_ptr + (sp * N + rows).to(tl.int64) * lse_stride,
                mask=row_ok,
                other=float("-inf"),
            )
            m_new = tl.maximum(m, part)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp(m - m_safe) + tl.exp(part - m_safe)
            m = m_new
        lse = tl.where(m == float("-inf"), 0.0, m + tl.log(tl.maximum(total, 1e-30)))
    if GUARD:
        jj = tl.load(j_ptr + rows, mask=row_ok, other=-1)
        lift = tl.load(lift_ptr + rows, mask=row_ok, other=0.0)
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


def project(z: Tensor, a: Tensor, check: bool = False) -> Tensor:
    """``u = z A`` in fp32, ``-inf`` logits read as 0: ``[N, R]`` (per-chunk partial
    products summed in torch, so the result does not depend on the order
    programs finish in). With ``check`` the same read checks the logits
    (:func:`raise_on_bad_input`): no separate validation pass."""
    n, v = z.shape
    r = a.shape[1]
    cfg = launch_config(n, v, r)
    splits, chunk = vocab_split(n, v, cfg, z.device)
    part = torch.empty(splits, n, r, dtype=torch.float32, device=z.device)
    flags = torch.empty((splits, n, 3), dtype=torch.int32, device=z.device) if check else part
    grid = (triton.cdiv(n, cfg.block_n), splits, triton.cdiv(r, cfg.block_r))
    project_kernel[grid](
        z,
        a.contiguous(),  # fp32 or bf16 (factor_dtype): the kernel reads it in fp32
        part,
        flags,
        n,
        v,
        chunk,
        z.stride(0),
        r,
        check,
        *cfg.constexprs,
        **cfg.options,
    )
    if check:
        raise_on_bad_input(flags.sum(0))
    return part.sum(0)


def row_lse(
    ops: dict[str, object],
    z: Tensor,
    temperature: float,
    cfg: LaunchConfig,
    need_t: bool = False,
    need_z: bool = False,
    guard_cols: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``[N, 3]`` fp32: the log-sum-exps of ``T(z)/τ``, ``T(z)`` (if ``need_t``)
    and ``z`` (if ``need_z``); 0 for an all-masked row (its outputs stay ``-inf``).
    With ``guard_cols`` (``[N]`` int64) also ``[N, 2]``: per row the largest
    ``T(z)`` off that column and ``T(z)`` on it."""
    part, g_part = row_lse_parts(ops, z, temperature, cfg, need_t, need_z, guard_cols)
    lse = torch.logsumexp(part, 0).nan_to_num(neginf=0.0)
    return (lse, g_part.amax(0)) if guard_cols is not None else lse


def row_lse_parts(
    ops: dict[str, object],
    z: Tensor,
    temperature: float,
    cfg: LaunchConfig,
    need_t: bool = False,
    need_z: bool = False,
    guard_cols: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The lse pass's per-chunk results, uncombined: ``[splits, N, 3]`` and the
    guard's ``[splits, N, 2]`` (``[1, N, 2]`` unused without ``guard_cols``)."""
    x = ops["x"]
    n, v = x.shape
    splits, chunk = vocab_split(n, v, cfg, x.device)
    part = torch.full((splits, n, 3), float("-inf"), dtype=torch.float32, device=x.device)
    guard = guard_cols is not None
    g_part = torch.full((splits if guard else 1, n, 2), float("-inf"), device=x.device)
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


def transform_operands(z: Tensor, params: dict[str, Tensor | None]) -> dict[str, object]:
    """What the kernels take for a transform: ``x`` (z, or the dense product),
    ``u = z A`` and the per-column tensors, all contiguous fp32 except ``x``."""
    if params.get("weight") is not None:
        return {"x": affine_logits(z, weight=params["weight"], bias=params.get("bias"))}
    ops: dict[str, object] = {"x": z}
    if params.get("a") is not None:
        ops["u"] = project(z, params["a"])
        ops["b"] = params["b"].contiguous()  # fp32 or bf16, read in fp32
    for key in ("scale", "bias"):
        if params.get(key) is not None:
            ops[key] = params[key].float().contiguous()
    return ops


def guard_lift(
    lse: Tensor, off_on: Tensor, margin: float, temperature: float
) -> tuple[Tensor, Tensor]:
    """The argmax guard from :func:`row_lse`'s guard columns: each row's lifted
    ``T(z)_j`` and the log-sum-exp of ``T(z)/τ`` with it in place of the old value
    (changed only where the guard lifts, so no cancellation elsewhere)."""
    runner_up, t_j = off_on.unbind(1)
    lift = torch.maximum(t_j, runner_up + margin)
    lifted = lift > t_j
    # log(Σ_{k≠j} e^{t_k/τ}): where lifted, t_j < runner_up + margin bounds the cancellation
    rest = lse + torch.log1p(-torch.exp(t_j / temperature - lse).clamp(max=1.0))
    new = torch.where(lifted, torch.logaddexp(rest, lift / temperature), lse)
    return lift.contiguous(), new.contiguous()


def launch_purify(
    ops: dict[str, object],
    out: Tensor,
    temperature: float,
    logprobs: bool,
    guard: float | None = None,
    check: bool = True,
) -> None:
    """Purify all rows of ``ops["x"]`` into ``out``: the lse pass first for
    log-probs (and for the guard, whose statistics it also takes), then the
    write pass, which combines the row log-sum-exps itself and, with
    ``check``, counts NaN, ``+inf`` and finite inputs; then one sync to raise
    on bad input with :func:`cmiguard.validation.check_logits`' messages."""
    x = ops["x"]
    n, v = x.shape
    u = ops.get("u")
    cfg = launch_config(n, v, u.shape[1] if u is not None else 0)
    lse = cols = lift = None
    lse_splits, lse_stride = 1, 1
    if guard is not None:
        cols = ops["argmax"]
        combined, off_on = row_lse(ops, x, temperature, cfg, guard_cols=cols)
        lift, lse = guard_lift(combined[:, 0], off_on, guard, temperature)
    elif logprobs:
        part, _ = row_lse_parts(ops, x, temperature, cfg)
        lse, lse_splits, lse_stride = part, part.shape[0], 3  # column 0 of [splits, N, 3]
    splits, chunk = vocab_split(n, v, cfg, x.device)
    flags = torch.empty((splits, n, 3), dtype=torch.int32, device=x.device) if check else out
    purify_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        *kernel_operands(ops),
        out,
        lse if lse is not None else out,
        cols if cols is not None else out,
        lift if lift is not None else out,
        flags,
        n,
        v,
        chunk,
        x.stride(0),
        out.stride(0),
        1.0 / temperature,
        lse_splits,
        lse_stride,
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
    params: dict[str, Tensor | None],
    temperature: float = 1.0,
    output: str = "logits",
    top_k: int | None = None,
    chunk_rows: int | None = None,
    guard: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton twin of :func:`cmiguard.kernels.reference.purify_reference` (``z``: ``[N, V]``)."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    logprobs = output == "logprobs"

    def operands(rows: Tensor) -> dict[str, object]:
        ops = transform_operands(rows, params)
        if guard is not None:  # one more read of z for now; the project pass could take it
            ops["argmax"] = rows.argmax(-1).contiguous()
        return ops

    if top_k is None:
        out = torch.empty_like(z)
        launch_purify(operands(z), out, temperature, logprobs, guard)
        return out
    n, v = z.shape
    values = torch.empty(n, top_k, dtype=z.dtype, device=z.device)
    ids = torch.empty(n, top_k, dtype=torch.long, device=z.device)
    for rows in row_chunks(n, v, chunk_rows):
        block = torch.empty(rows.stop - rows.start, v, dtype=torch.float32, device=z.device)
        launch_purify(operands(z[rows]), block, temperature, logprobs, guard)
        top_values, top_ids = block.topk(top_k, dim=-1)
        values[rows], ids[rows] = top_values.to(z.dtype), top_ids
    return values, ids

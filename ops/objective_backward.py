"""The low-rank training step's backward in two passes over the logits, with
no ``[N, V]`` gradient ever written and no GEMM library call.

The gradient of the objective with respect to ``t = z ⊙ d + (zA)Bᵀ + b`` is
``G`` (:func:`~cmiguard.kernels.tile.objective_grad`, recomputed from the
forward's row statistics). What the parameters need of it:

* ``∂L/∂u = G B`` (``u = zA``): a reduction over the vocabulary.
  :func:`grad_u_kernel`, one program per (row block, vocabulary chunk),
  keeps its ``[BLOCK_N, R]`` share in registers; the chunks' shares are
  summed in a fixed order.
* ``∂L/∂B = Gᵀ u``, ``∂L/∂A = z₀ᵀ (G B)``, ``∂L/∂d = Σ z₀ ⊙ G``,
  ``∂L/∂b = Σ G`` (``z₀``: the logits as the projection reads them, masked
  as 0, less each row's mean for a centred map): reductions over the rows.
  :func:`grad_factors_kernel`, one program per (vocabulary chunk, row
  split), walks its column tiles and, for each, every row block of its
  split, accumulating the four in registers; the row splits' shares are
  summed in a fixed order.

Both passes recompute ``T(z)`` from the same tiling as the forward, so the
backward is deterministic and reads the logits twice: with the forward's
three or four reads, a training step is five or six passes (docs/KERNELS.md).
The rank must fit one ``BLOCK_R`` tile (r ≤ 128); a larger one, or logits
that need their own gradient, take :class:`~cmiguard.kernels.cmi_loss.TritonObjectiveFunction`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cmiguard.kernels.cmi_loss import objective_forward
from cmiguard.kernels.config import PROGRAMS_PER_SM, interpreting, launch_config, vocab_split
from cmiguard.kernels.operands import kernel_flags, kernel_operands
from cmiguard.kernels.purify import project
from cmiguard.kernels.tile import objective_grad, row_terms, transform_tile_and_x

MAX_FUSED_RANK = 128


@triton.jit
def grad_u_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    labels_ptr,
    group_ptr,
    logq_ptr,
    stats_ptr,
    weights_ptr,
    gu_ptr,
    N,
    V,
    v_chunk,
    stride_x,
    inv_tau,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_KL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """``G B`` over one vocabulary chunk for one row block: ``gu[split, row, r]``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    split = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl = row_terms(rows, row_ok, labels_ptr, group_ptr, stats_ptr, weights_ptr, inv_tau)  # fmt: skip
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    v_lo = split * v_chunk
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ok = row_ok[:, None] & col_ok[None, :]
        t, x = transform_tile_and_x(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
        grad = objective_grad(t, x, cols, ok, y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl, logq_ptr, V, inv_tau, NEED_KL)  # fmt: skip
        b = tl.load(
            b_ptr + cols[:, None].to(tl.int64) * R + rr[None, :],
            mask=col_ok[:, None] & (rr[None, :] < R),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(grad, b, input_precision=DOT)
    out = gu_ptr + (split * N + rows)[:, None].to(tl.int64) * R + rr[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & (rr[None, :] < R))


@triton.jit
def grad_factors_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    labels_ptr,
    group_ptr,
    logq_ptr,
    stats_ptr,
    weights_ptr,
    gu_ptr,
    ga_ptr,
    gb_ptr,
    gs_ptr,
    gbias_ptr,
    mean_ptr,
    N,
    V,
    v_chunk,
    n_chunk,
    stride_x,
    inv_tau,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_KL: tl.constexpr,
    CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """For each column tile of one vocabulary chunk, over the rows of one row
    split: ``Gᵀu``, ``z₀ᵀ gu``, ``Σ z₀ ⊙ G`` and ``Σ G``, at ``[split, col, ...]``
    (``CENTERED``: ``z₀ᵀ gu`` with each row less ``mean[row]``)."""
    v_lo = tl.program_id(0) * v_chunk
    split = tl.program_id(1)
    n_lo = split * n_chunk
    n_hi = tl.minimum(n_lo + n_chunk, N)
    rr = tl.arange(0, BLOCK_R)
    r_ok = rr < R
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        acc_a = tl.zeros((BLOCK_V, BLOCK_R), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK_V, BLOCK_R), dtype=tl.float32)
        acc_s = tl.zeros((BLOCK_V,), dtype=tl.float32)
        acc_bias = tl.zeros((BLOCK_V,), dtype=tl.float32)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            rows = n0 + tl.arange(0, BLOCK_N)
            row_ok = rows < n_hi
            ok = row_ok[:, None] & col_ok[None, :]
            y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl = row_terms(rows, row_ok, labels_ptr, group_ptr, stats_ptr, weights_ptr, inv_tau)  # fmt: skip
            t, x = transform_tile_and_x(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
            grad = objective_grad(t, x, cols, ok, y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl, logq_ptr, V, inv_tau, NEED_KL)  # fmt: skip
            kept = ok & (x != float("-inf"))
            x0 = tl.where(kept, x, 0.0)
            row_r = rows[:, None].to(tl.int64) * R + rr[None, :]
            rows_r_ok = row_ok[:, None] & r_ok[None, :]
            u = tl.load(u_ptr + row_r, mask=rows_r_ok, other=0.0)
            gu = tl.load(gu_ptr + row_r, mask=rows_r_ok, other=0.0)
            acc_b += tl.dot(tl.trans(grad), u, input_precision=DOT)
            if CENTERED:
                mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
                acc_a += tl.dot(tl.trans(tl.where(kept, x - mean[:, None], 0.0)), gu, input_precision=DOT)  # fmt: skip
            else:
                acc_a += tl.dot(tl.trans(x0), gu, input_precision=DOT)
            if HAS_SCALE:
                acc_s += tl.sum(x0 * grad, axis=0)
            if HAS_BIAS:
                acc_bias += tl.sum(grad, axis=0)
        col_r = (split * V + cols)[:, None].to(tl.int64) * R + rr[None, :]
        cols_r_ok = col_ok[:, None] & r_ok[None, :]
        tl.store(ga_ptr + col_r, acc_a, mask=cols_r_ok)
        tl.store(gb_ptr + col_r, acc_b, mask=cols_r_ok)
        if HAS_SCALE:
            tl.store(gs_ptr + split * V + cols, acc_s, mask=col_ok)
        if HAS_BIAS:
            tl.store(gbias_ptr + split * V + cols, acc_bias, mask=col_ok)


def row_split(n: int, v: int, cfg, device) -> tuple[int, int]:
    """``(splits, rows per split)`` of the factor pass: enough programs to fill
    the device over (vocabulary chunk, row split), each split whole row blocks."""
    blocks = triton.cdiv(max(n, 1), cfg.block_n)
    if interpreting():
        wanted = 2
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        tiles = triton.cdiv(max(v, 1), cfg.block_v)
        wanted = triton.cdiv(PROGRAMS_PER_SM * sms, tiles)
    per = triton.cdiv(blocks, max(1, min(wanted, blocks)))
    return triton.cdiv(blocks, per), per * cfg.block_n


class FusedLowRankObjective(torch.autograd.Function):
    """The low-rank objective taking ``A``, ``B``, ``d`` and ``b`` themselves
    (``z`` needs no gradient): the forward of :func:`objective_forward`, the
    backward in the two passes above. Returns ``(loss, [cmi, ce, kl])``."""

    @staticmethod
    def forward(
        ctx,
        z,
        a,
        b,
        scale,
        bias,
        labels,
        log_centroids,
        lam_cmi,
        lam_ce,
        lam_kl,
        temperature,
        min_count,
        centered,
    ):
        # the input check rides on the first read
        u, _, mean = project(z, a, check=True, centered=centered)
        ops = {"x": z, "u": u, "b": b.contiguous(), "scale": scale, "bias": bias}
        lams = (lam_cmi, lam_ce, lam_kl, temperature, min_count)
        loss, out_stats, saved = objective_forward(ops, z, labels, log_centroids, *lams)
        group_of_row, log_q, stats, weights, config = saved
        ctx.save_for_backward(z, a, ops["b"], u, scale, bias, labels, group_of_row, log_q, mean)
        ctx.saved_stats = (stats, weights)
        ctx.config = config
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        z, a, b, u, scale, bias, labels, group_of_row, log_q, mean = ctx.saved_tensors
        stats, weights = ctx.saved_stats
        temperature, need_kl, _, _, _ = ctx.config
        n, v = z.shape
        r = u.shape[1]
        weights = weights * grad_loss.float()
        ops = {"x": z, "u": u, "b": b, "scale": scale, "bias": bias}
        cfg = launch_config(n, v, r)
        block_r = max(16, triton.next_power_of_2(r))
        constexprs = (cfg.block_n, cfg.block_v, block_r, cfg.dot)
        common = (labels, group_of_row, log_q, stats, weights)
        splits, chunk = vocab_split(n, v, cfg, z.device)
        gu_part = torch.empty(splits, n, r, dtype=torch.float32, device=z.device)
        grad_u_kernel[(triton.cdiv(n, cfg.block_n), splits)](
            *kernel_operands(ops), *common, gu_part, n, v, chunk, z.stride(0),
            1.0 / temperature, *kernel_flags(ops), need_kl, *constexprs, **cfg.options,
        )  # fmt: skip
        gu = gu_part.sum(0)
        row_splits, n_chunk = row_split(n, v, cfg, z.device)
        v_splits, v_chunk = vocab_split(1, v, cfg, z.device)
        shape = (row_splits, v)
        ga = torch.empty(*shape, r, dtype=torch.float32, device=z.device)
        gb = torch.empty(*shape, r, dtype=torch.float32, device=z.device)
        gs = torch.zeros(shape, dtype=torch.float32, device=z.device)
        gbias = torch.zeros(shape, dtype=torch.float32, device=z.device)
        grad_factors_kernel[(v_splits, row_splits)](
            *kernel_operands(ops), *common, gu, ga, gb, gs, gbias,
            mean if mean is not None else gs, n, v, v_chunk, n_chunk, z.stride(0),
            1.0 / temperature, *kernel_flags(ops), need_kl, mean is not None, *constexprs,
            **cfg.options,
        )  # fmt: skip
        grad_a = ga.sum(0).to(a.dtype)
        grad_b = gb.sum(0).to(b.dtype)
        grad_scale = gs.sum(0) if scale is not None else None
        grad_bias = gbias.sum(0) if bias is not None else None
        return None, grad_a, grad_b, grad_scale, grad_bias, *([None] * 8)


def fusable(z: Tensor, params: dict[str, Tensor | bool | None]) -> bool:
    """Whether the fused step applies: a low-rank transform of rank ≤ 128 on
    logits that need no gradient (a frozen teacher's)."""
    a = params.get("a")
    return a is not None and a.shape[1] <= MAX_FUSED_RANK and not z.requires_grad


def fused_objective(
    z: Tensor,
    params: dict[str, Tensor | bool | None],
    labels: Tensor,
    log_q: Tensor | None,
    lams: tuple,
) -> tuple[Tensor, Tensor] | None:
    """The fused step (it checks the logits' values itself), or None where it
    does not apply (:func:`fusable`)."""
    if not fusable(z, params):
        return None
    return FusedLowRankObjective.apply(
        z, params["a"], params["b"], params.get("scale"), params.get("bias"), labels, log_q,
        *lams, params.get("centered", False),
    )  # fmt: skip

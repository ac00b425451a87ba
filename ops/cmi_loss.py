"""Fused training objective: transform + softmax + per-label CMI statistics.

Forward, one program per (row block, vocabulary chunk): pass 1
(:func:`~cmiguard.kernels.tile.lse_kernel`) takes the log-sum-exps of
``t/τ``, ``t`` and ``z``; pass 2 (:func:`stats_kernel`) recomputes ``p``,
scatters it into the label centroids (atomics), and sums ``Σ p log p``,
``Σ p log Q`` (against given centroids: the streaming estimator's one pass),
the label logit and ``KL(softmax(z) ‖ softmax(t))``. The exact estimator
runs pass 2 once more against the finished centroids. Per-chunk results are
combined in torch; only the ``[N, 7]`` row statistics are saved, never
``[N, V]`` probabilities.

Backward (:func:`grad_kernel`): ``∂L/∂t`` from the closed form in docs/DESIGN.md
(``g = log p − log Q``, then the softmax backward), recomputing ``p`` from
the saved log-sum-exps; the per-column gradients (scale, bias) are reduced
in the kernel, the low-rank ones are two thin GEMMs on ``∂L/∂t``. This is
the general backward: the low-rank training step takes the two-pass one of
:mod:`cmiguard.kernels.objective_backward` (no ``[N, V]`` write) whenever
the rank fits a tile and the logits need no gradient of their own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from cmiguard.kernels.config import LaunchConfig, launch_config, vocab_split
from cmiguard.kernels.operands import kernel_flags, kernel_operands
from cmiguard.kernels.purify import project, row_lse
from cmiguard.kernels.reference import IGNORE_INDEX, _log_mean, label_groups, row_chunks
from cmiguard.kernels.tile import load_tile, objective_grad, row_terms, transform_tile

# columns of the [N, 7] row statistics: row_lse's three, then stats_kernel's four
LSE_TAU, LSE_T, LSE_Z, NEG_ENTROPY, CROSS, LABEL_LOGIT, KL = range(7)


@triton.jit
def stats_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    z_ptr,
    labels_ptr,
    group_ptr,
    lse_ptr,
    sums_ptr,
    logq_ptr,
    part_ptr,
    N,
    V,
    v_chunk,
    stride_x,
    stride_z,
    inv_tau,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FIRST: tl.constexpr,
    SCATTER: tl.constexpr,
    CROSS: tl.constexpr,
    NEED_KL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """One vocabulary chunk's share of the row sums, ``part[split, row, 0..3]``:
    ``Σ p log p``, ``Σ p log Q``, the label logit and ``KL(softmax(z) ‖ softmax(t))``."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    g = tl.load(group_ptr + rows, mask=row_ok, other=-1)
    in_cmi = row_ok & (g >= 0)
    lse_tau = tl.load(lse_ptr + rows * 3 + 0, mask=row_ok, other=0.0)
    lse_t = tl.load(lse_ptr + rows * 3 + 1, mask=row_ok, other=0.0)
    lse_z = tl.load(lse_ptr + rows * 3 + 2, mask=row_ok, other=0.0)
    neg_entropy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cross = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kl = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = tl.program_id(1) * v_chunk
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols[None, :] < V)
        t = transform_tile(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
        logp = t * inv_tau - lse_tau[:, None]
        p = tl.exp(logp)
        live = p > 0
        if FIRST:
            neg_entropy += tl.sum(tl.where(live, p * logp, 0.0), axis=1)
            label_logit += tl.sum(tl.where(cols[None, :] == y[:, None], t, 0.0), axis=1)
            if NEED_KL:
                zt = load_tile(z_ptr, rows, cols, N, V, stride_z, float("-inf"))
                log_q = zt - lse_z[:, None]
                q = tl.exp(log_q)
                kl += tl.sum(tl.where(q > 0, q * (log_q - (t - lse_t[:, None])), 0.0), axis=1)
            if SCATTER:
                cmi_ok = ok & in_cmi[:, None]
                target = sums_ptr + g[:, None].to(tl.int64) * V + cols[None, :]
                tl.atomic_add(target, p, mask=cmi_ok)
        if CROSS:
            cmi_ok = ok & in_cmi[:, None]
            log_c = tl.load(
                logq_ptr + g[:, None].to(tl.int64) * V + cols[None, :], mask=cmi_ok, other=0.0
            )
            cross += tl.sum(tl.where(live & cmi_ok, p * log_c, 0.0), axis=1)
    out = part_ptr + (tl.program_id(1) * N + rows).to(tl.int64) * 4
    if FIRST:
        tl.store(out + 0, neg_entropy, mask=row_ok)
        tl.store(out + 2, label_logit, mask=row_ok)
        tl.store(out + 3, kl, mask=row_ok)
    if CROSS:
        tl.store(out + 1, cross, mask=row_ok)


@triton.jit
def grad_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    z_ptr,
    labels_ptr,
    group_ptr,
    logq_ptr,
    stats_ptr,
    weights_ptr,
    grad_ptr,
    grad_scale_ptr,
    grad_bias_ptr,
    N,
    V,
    v_chunk,
    stride_x,
    stride_z,
    inv_tau,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NEED_KL: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """``∂L/∂t`` for one (row block, vocabulary chunk): written to ``grad_ptr``
    with ``WRITE_GRAD`` (for the GEMMs of the low-rank and dense parts), its
    column sums reduced into the scale and bias gradients by atomics."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl = row_terms(rows, row_ok, labels_ptr, group_ptr, stats_ptr, weights_ptr, inv_tau)  # fmt: skip
    v_lo = tl.program_id(1) * v_chunk
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        ok = row_ok[:, None] & col_ok[None, :]
        t = transform_tile(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
        zt = t
        if NEED_KL:
            zt = load_tile(z_ptr, rows, cols, N, V, stride_z, float("-inf"))
        grad = objective_grad(t, zt, cols, ok, y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl, logq_ptr, V, inv_tau, NEED_KL)  # fmt: skip
        if WRITE_GRAD:
            tl.store(grad_ptr + rows[:, None].to(tl.int64) * V + cols[None, :], grad, mask=ok)
        if HAS_SCALE:
            x = load_tile(x_ptr, rows, cols, N, V, stride_x, 0.0)
            x = tl.where(x == float("-inf"), 0.0, x)
            tl.atomic_add(grad_scale_ptr + cols, tl.sum(x * grad, axis=0), mask=col_ok)
        if HAS_BIAS:
            tl.atomic_add(grad_bias_ptr + cols, tl.sum(grad, axis=0), mask=col_ok)


def _ops(x: Tensor, u, b, scale, bias) -> dict[str, object]:
    """The operand dict of :mod:`cmiguard.kernels.purify` for these tensors."""
    return {"x": x, "u": u, "b": b, "scale": scale, "bias": bias}


class ProjectFunction(torch.autograd.Function):
    """``u = z A`` (``-inf`` read as 0; ``centered``: less the mean term) with
    its gradients: for ``A``, ``z₀ᵀ ∂u`` (``z₀``: the rows read as the
    projection reads them, centred for a centred map), and for ``z``,
    ``∂u Aᵀ`` on the unmasked entries (centred over them)."""

    @staticmethod
    def forward(ctx, z: Tensor, a: Tensor, centered: bool = False) -> Tensor:
        projection = project(z, a, centered=centered)
        ctx.save_for_backward(z, a, projection.mean)
        return projection.u

    @staticmethod
    def backward(ctx, grad_u: Tensor):
        z, a, mean = ctx.saved_tensors
        grad_a = torch.zeros(z.shape[1], grad_u.shape[1], dtype=torch.float32, device=z.device)
        for rows in row_chunks(z.shape[0], z.shape[1]):
            zc = z[rows].float()
            if mean is not None:
                zc = zc - mean[rows, None]
            grad_a.addmm_(zc.masked_fill(torch.isneginf(zc), 0.0).t(), grad_u[rows])
        grad_z = None
        if ctx.needs_input_grad[0]:
            masked = torch.isneginf(z)
            h = grad_u @ a.float().t()
            if mean is not None:
                kept = (~masked).sum(1, keepdim=True).clamp_min(1)
                h = h - h.masked_fill(masked, 0.0).sum(1, keepdim=True) / kept
            grad_z = h.masked_fill(masked, 0.0).to(z.dtype)
        return grad_z, grad_a.to(a.dtype), None


def stats_pass(
    ops: dict[str, object],
    z: Tensor,
    labels: Tensor,
    group_of_row: Tensor,
    lse: Tensor,
    sums: Tensor,
    log_q: Tensor,
    part: Tensor,
    temperature: float,
    cfg: LaunchConfig,
    flags: tuple[bool, bool, bool, bool],
) -> None:
    """One :func:`stats_kernel` pass over every row; ``flags`` are its
    ``(FIRST, SCATTER, CROSS, NEED_KL)``."""
    x = ops["x"]
    n, v = x.shape
    splits, chunk = vocab_split(n, v, cfg, x.device)
    stats_kernel[(triton.cdiv(n, cfg.block_n), splits)](
        *kernel_operands(ops),
        z,
        labels,
        group_of_row,
        lse,
        sums,
        log_q,
        part,
        n,
        v,
        chunk,
        x.stride(0),
        z.stride(0),
        1.0 / temperature,
        *kernel_flags(ops),
        *flags,
        *cfg.constexprs,
        **cfg.options,
    )


def label_centroid_sums(
    ops: dict[str, object], z: Tensor, labels: Tensor, temperature: float, min_count: int
) -> tuple[Tensor, Tensor, Tensor]:
    """This batch's ``Σ softmax(T(z)/τ)`` per label group from kernel operands
    (the streaming estimator's update): the lse pass and one scatter pass, no
    ``T(z)`` in memory. Returns ``(sums [G, V], group_labels [G], counts [G])``."""
    x = ops["x"]
    n, v = x.shape
    rows, group, group_labels, counts = label_groups(labels, min_count)
    sums = torch.zeros(counts.numel(), v, dtype=torch.float32, device=x.device)
    if counts.numel() == 0:
        return sums, group_labels, counts
    group_of_row = torch.full((n,), -1, dtype=torch.long, device=x.device)
    group_of_row[rows] = group
    u = ops.get("u")
    cfg = launch_config(n, v, u.shape[1] if u is not None else 0)
    lse = row_lse(ops, z, temperature, cfg)
    splits, _ = vocab_split(n, v, cfg, x.device)
    part = torch.empty(splits, n, 4, dtype=torch.float32, device=x.device)
    # FIRST: the scatter rides on the first pass's p; no cross term (lse: an unread
    # log Q), no KL
    flags = (True, True, False, False)
    stats_pass(ops, z, labels, group_of_row, lse, sums, lse, part, temperature, cfg, flags)
    return sums, group_labels, counts


def objective_forward(
    ops: dict[str, object],
    z: Tensor,
    labels: Tensor,
    log_centroids: Tensor | None,
    lam_cmi: float,
    lam_ce: float,
    lam_kl: float,
    temperature: float,
    min_count: int,
) -> tuple[Tensor, Tensor, tuple]:
    """The fused forward on kernel operands: ``(loss, [cmi, ce, kl], saved)``
    with ``saved = (group_of_row, log_centroids, stats, weights, config)``,
    what any backward of it needs (only ``[N, 7]`` row statistics)."""
    x = ops["x"]
    u = ops.get("u")
    n, v = x.shape
    rows, group, _, counts = label_groups(labels, min_count)
    group_of_row = torch.full((n,), -1, dtype=torch.long, device=x.device)
    group_of_row[rows] = group
    valid = labels != IGNORE_INDEX
    need_kl = bool(lam_kl)
    cfg = launch_config(n, v, u.shape[1] if u is not None else 0)
    lse = row_lse(ops, z, temperature, cfg, need_t=True, need_z=need_kl)
    splits, chunk = vocab_split(n, v, cfg, x.device)
    part = torch.zeros(splits, n, 4, dtype=torch.float32, device=x.device)
    dummy = lse

    def pass_over_rows(sums, log_q, first, scatter, cross):
        flags = (first, scatter, cross, need_kl)
        stats_pass(ops, z, labels, group_of_row, lse, sums, log_q, part, temperature, cfg, flags)

    n_groups = int(counts.numel())
    if log_centroids is None and n_groups > 0:
        # exact: scatter the centroids, then the cross term against the finished ones
        sums = torch.zeros(n_groups, v, dtype=torch.float32, device=x.device)
        pass_over_rows(sums, dummy, True, True, False)
        log_centroids = _log_mean(sums, counts)
        pass_over_rows(dummy, log_centroids, False, False, True)
    else:
        has_q = log_centroids is not None and n_groups > 0
        log_centroids = log_centroids.contiguous() if has_q else dummy
        pass_over_rows(dummy, log_centroids, True, False, has_q)
    stats = torch.cat([lse, part.sum(0)], dim=1)
    kept = max(rows.numel(), 1)
    n_valid = max(int(valid.sum()), 1)
    cmi = (stats[rows, NEG_ENTROPY] - stats[rows, CROSS]).double().sum() / kept
    ce = (stats[valid, LSE_T] - stats[valid, LABEL_LOGIT]).double().sum() / n_valid
    kl = stats[valid, KL].double().sum() / n_valid
    weights = torch.zeros(n, 3, dtype=torch.float32, device=x.device)
    weights[rows, 0] = lam_cmi / kept
    weights[valid, 1] = lam_ce / n_valid
    weights[valid, 2] = lam_kl / n_valid
    loss = (lam_cmi * cmi + lam_ce * ce + lam_kl * kl).float()
    out_stats = torch.stack([cmi, ce, kl]).float()
    config = (temperature, need_kl, cfg, splits, chunk)
    return loss, out_stats, (group_of_row, log_centroids, stats, weights, config)


class TritonObjectiveFunction(torch.autograd.Function):
    """Triton twin of :class:`cmiguard.kernels.reference.ObjectiveFunction`.

    Takes the transform as kernel operands ``(x, u, b, scale, bias)`` (see
    :mod:`cmiguard.kernels.tile`) and the raw logits ``z``; returns
    ``(loss, [cmi, ce, kl])``.
    """

    @staticmethod
    def forward(
        ctx,
        x,
        u,
        b,
        scale,
        bias,
        z,
        labels,
        log_centroids,
        lam_cmi,
        lam_ce,
        lam_kl,
        temperature,
        min_count,
    ):
        ops = _ops(x, u, b, scale, bias)
        lams = (lam_cmi, lam_ce, lam_kl, temperature, min_count)
        loss, out_stats, saved = objective_forward(ops, z, labels, log_centroids, *lams)
        group_of_row, log_centroids, stats, weights, config = saved
        ctx.save_for_backward(
            x, u, b, scale, bias, z, labels, group_of_row, log_centroids, stats, weights
        )
        ctx.config = config
        ctx.mark_non_differentiable(out_stats)
        return loss, out_stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        x, u, b, scale, bias, z, labels, group_of_row, log_q, stats, weights = ctx.saved_tensors
        temperature, need_kl, cfg, splits, chunk = ctx.config
        n, v = x.shape
        weights = weights * grad_loss.float()
        ops = _ops(x, u, b, scale, bias)
        need_t = u is not None or ctx.needs_input_grad[0]
        dummy = weights
        grad_t = torch.empty(n, v, dtype=torch.float32, device=x.device) if need_t else dummy
        grad_scale = (
            torch.zeros(v, dtype=torch.float32, device=x.device) if scale is not None else dummy
        )
        grad_bias = (
            torch.zeros(v, dtype=torch.float32, device=x.device) if bias is not None else dummy
        )
        grad_kernel[(triton.cdiv(n, cfg.block_n), splits)](
            *kernel_operands(ops),
            z,
            labels,
            group_of_row,
            log_q,
            stats,
            weights,
            grad_t,
            grad_scale,
            grad_bias,
            n,
            v,
            chunk,
            x.stride(0),
            z.stride(0),
            1.0 / temperature,
            *kernel_flags(ops),
            need_kl,
            need_t,
            *cfg.constexprs,
            **cfg.options,
        )
        grad_x = grad_u = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_t * scale if scale is not None else grad_t
            grad_x = grad_x.to(x.dtype)
        if u is not None:
            grad_u = grad_t @ b.float()
            grad_b = grad_t.t() @ u
        return (
            grad_x,
            grad_u,
            grad_b,
            grad_scale if scale is not None else None,
            grad_bias if bias is not None else None,
            *([None] * 8),
        )

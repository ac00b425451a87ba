"""The transformed-logits tile every kernel recomputes instead of storing
(:func:`transform_tile`; :func:`transform_tile_and_x` also returns the input
tile, for the purify pass that checks it).

``t = x ⊙ scale + u Bᵀ + bias`` for ``BLOCK_N`` rows × ``BLOCK_V`` columns,
``-inf`` where ``x`` is ``-inf`` (masked tokens) or out of range. For the
low-rank families ``x = z`` and ``u = z A`` (:func:`project_kernel`, once per
call); for ``dense`` the caller passes ``x = z Wᵀ + b`` and no low-rank part.
Also here: the per-chunk log-sum-exp pass that purify and the objective share.
Row offsets are 64-bit: ``N·V`` can pass 2³¹ (N = 16k, V = 152k does).
"""

import triton
import triton.language as tl


@triton.jit
def transform_tile(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    rows,
    cols,
    N,
    V,
    stride_x,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    t, _ = transform_tile_and_x(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
    return t


@triton.jit
def transform_tile_and_x(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    rows,
    cols,
    N,
    V,
    stride_x,
    R: tl.constexpr,
    HAS_LOWRANK: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    row_ok = rows < N
    col_ok = cols < V
    x = load_tile(x_ptr, rows, cols, N, V, stride_x, float("-inf"))
    masked = x == float("-inf")
    t = tl.where(masked, 0.0, x)
    if HAS_SCALE:
        t = t * tl.load(scale_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :]
    if HAS_LOWRANK:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            u = tl.load(
                u_ptr + rows[:, None].to(tl.int64) * R + rr[None, :],
                mask=row_ok[:, None] & (rr[None, :] < R),
                other=0.0,
            )
            bt = tl.load(
                b_ptr + cols[None, :].to(tl.int64) * R + rr[:, None],
                mask=col_ok[None, :] & (rr[:, None] < R),
                other=0.0,
            ).to(tl.float32)
            t += tl.dot(u, bt, input_precision=DOT)
    if HAS_BIAS:
        t = t + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(masked, float("-inf"), t), x


@triton.jit
def load_tile(ptr, rows, cols, N, V, stride, other):
    """A ``[rows, cols]`` tile of a row-major ``[N, V]`` tensor as fp32 (64-bit offsets)."""
    ok = (rows[:, None] < N) & (cols[None, :] < V)
    tile = tl.load(ptr + rows[:, None].to(tl.int64) * stride + cols[None, :], mask=ok, other=other)
    return tile.to(tl.float32)


@triton.jit
def online_lse(m, s, t):
    """One step of a running log-sum-exp over tiles; safe for all -inf rows."""
    m_new = tl.maximum(m, tl.max(t, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(t - m_safe[:, None]), axis=1)
    return m_new, s


@triton.jit
def chunk_lse(m, s):
    """The finished log-sum-exp of one chunk: ``-inf`` where the chunk is all masked."""
    return tl.where(m == float("-inf"), float("-inf"), m + tl.log(tl.maximum(s, 1e-30)))


@triton.jit
def guard_start(rows, row_ok, j_ptr):
    """The argmax guard's per-chunk statistics before the first tile: its
    column ``j[row]``, the largest ``T(z)`` off it, ``T(z)`` on it and the
    running log-sum-exp of ``T(z)/τ`` off it (max, sum)."""
    jj = tl.load(j_ptr + rows, mask=row_ok, other=-1)
    none = tl.full(rows.shape, float("-inf"), dtype=tl.float32)
    return jj, none, none, none, tl.zeros(rows.shape, dtype=tl.float32)


@triton.jit
def guard_step(jj, g_off, g_on, m_off, s_off, t, scaled, cols):
    """One tile (``t = T(z)``, ``scaled = t/τ``) into :func:`guard_start`'s statistics."""
    on_j = cols[None, :] == jj[:, None]
    g_off = tl.maximum(g_off, tl.max(tl.where(on_j, float("-inf"), t), axis=1))
    g_on = tl.maximum(g_on, tl.max(tl.where(on_j, t, float("-inf")), axis=1))
    m_off, s_off = online_lse(m_off, s_off, tl.where(on_j, float("-inf"), scaled))
    return g_off, g_on, m_off, s_off


@triton.jit
def guard_store(guard_ptr, split, N, rows, row_ok, g_off, g_on, m_off, s_off):
    """A chunk's guard statistics to ``guard[split, row, 0..2]`` (:func:`guard_lift` reads them)."""
    g = guard_ptr + (split * N + rows).to(tl.int64) * 3
    tl.store(g, g_off, mask=row_ok)
    tl.store(g + 1, g_on, mask=row_ok)
    tl.store(g + 2, chunk_lse(m_off, s_off), mask=row_ok)


@triton.jit
def lse_kernel(
    x_ptr,
    u_ptr,
    b_ptr,
    scale_ptr,
    bias_ptr,
    z_ptr,
    part_ptr,
    j_ptr,
    guard_ptr,
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
    NEED_T: tl.constexpr,
    NEED_Z: tl.constexpr,
    GUARD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """Per vocabulary chunk, the log-sum-exps of ``T(z)/τ`` and, when asked, of
    ``T(z)`` and of the raw ``z``: ``part[split, row, 0..2]``. With ``GUARD``
    also, for the argmax guard around column ``j[row]``, the largest ``T(z)``
    off that column, ``T(z)`` on it and the log-sum-exp of ``T(z)/τ`` off it:
    ``guard[split, row, 0..2]`` (what the write pass needs to lift ``j``)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    if GUARD:
        jj, g_off, g_on, m_off, s_off = guard_start(rows, rows < N, j_ptr)
    m1 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m2 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    m3 = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_lo = split * v_chunk
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        t = transform_tile(x_ptr, u_ptr, b_ptr, scale_ptr, bias_ptr, rows, cols, N, V, stride_x, R, HAS_LOWRANK, HAS_SCALE, HAS_BIAS, BLOCK_R, DOT)  # fmt: skip
        scaled = t * inv_tau
        m1, s1 = online_lse(m1, s1, scaled)
        if GUARD:
            g_off, g_on, m_off, s_off = guard_step(jj, g_off, g_on, m_off, s_off, t, scaled, cols)
        if NEED_T:
            m2, s2 = online_lse(m2, s2, t)
        if NEED_Z:
            m3, s3 = online_lse(m3, s3, load_tile(z_ptr, rows, cols, N, V, stride_z, float("-inf")))
    out = part_ptr + (split * N + rows).to(tl.int64) * 3
    row_ok = rows < N
    tl.store(out, chunk_lse(m1, s1), mask=row_ok)
    if NEED_T:
        tl.store(out + 1, chunk_lse(m2, s2), mask=row_ok)
    if NEED_Z:
        tl.store(out + 2, chunk_lse(m3, s3), mask=row_ok)
    if GUARD:
        guard_store(guard_ptr, split, N, rows, row_ok, g_off, g_on, m_off, s_off)


@triton.jit
def combine_lse(part_ptr, rows, row_ok, N, splits, stride):
    """A row's log-sum-exp from per-chunk ones at ``part_ptr + (split·N + row)·stride``,
    in split order; 0 for an all-masked row."""
    m = tl.full(rows.shape, float("-inf"), dtype=tl.float32)
    total = tl.zeros(rows.shape, dtype=tl.float32)
    for sp in range(0, splits):
        part = tl.load(part_ptr + (sp * N + rows).to(tl.int64) * stride, mask=row_ok, other=float("-inf"))  # fmt: skip
        m_new = tl.maximum(m, part)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        total = total * tl.exp(m - m_safe) + tl.exp(part - m_safe)
        m = m_new
    return tl.where(m == float("-inf"), 0.0, m + tl.log(tl.maximum(total, 1e-30)))


@triton.jit
def guard_lift(guard_ptr, rows, row_ok, N, splits, margin, inv_tau):
    """The argmax guard from per-chunk guard statistics ``[split, row, 0..2]``
    (:func:`lse_kernel`): each row's lifted ``T(z)_j = max(T(z)_j, runner-up +
    margin)`` and the log-sum-exp of ``T(z)/τ`` with it in place, as the off-``j``
    log-sum-exp plus the lifted term (no cancellation)."""
    runner_up = tl.full(rows.shape, float("-inf"), dtype=tl.float32)
    t_j = tl.full(rows.shape, float("-inf"), dtype=tl.float32)
    for sp in range(0, splits):
        g = guard_ptr + (sp * N + rows).to(tl.int64) * 3
        runner_up = tl.maximum(runner_up, tl.load(g, mask=row_ok, other=float("-inf")))
        t_j = tl.maximum(t_j, tl.load(g + 1, mask=row_ok, other=float("-inf")))
    lift = tl.maximum(t_j, runner_up + margin)
    off = combine_lse(guard_ptr + 2, rows, row_ok, N, splits, 3)
    off = tl.where(runner_up == float("-inf"), float("-inf"), off)  # j is the row's only entry
    hi = tl.maximum(off, lift * inv_tau)
    lo = tl.minimum(off, lift * inv_tau)
    lse = tl.where(hi == float("-inf"), 0.0, hi + tl.log(1.0 + tl.exp(lo - hi)))
    return lift, lse


@triton.jit
def project_kernel(
    z_ptr,
    a_ptr,
    part_ptr,
    u_ptr,
    flags_ptr,
    am_val_ptr,
    am_idx_ptr,
    j_ptr,
    mpart_ptr,
    spart_ptr,
    mean_ptr,
    count_ptr,
    N,
    V,
    v_chunk,
    splits,
    stride_z,
    R: tl.constexpr,
    CHECK: tl.constexpr,
    ARGMAX: tl.constexpr,
    CENTERED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_R: tl.constexpr,
    DOT: tl.constexpr,
):
    """``u = z A`` as a split-K product, masked (``-inf``) logits read as 0.

    Each program multiplies one vocabulary chunk by ``BLOCK_R`` of A's columns
    into ``part[split, row, r]``; the last program of a (row block, column
    block) to finish (a self-resetting ticket in ``count``) sums the parts in
    split order into ``u[row, r]``, so the result is deterministic and no
    second launch combines them. With ``CHECK`` the first column block also
    counts NaN, ``+inf`` and finite inputs per (chunk, row) into ``flags``;
    with ``ARGMAX`` it finds each row's first largest raw logit ``j[row]``
    (the argmax guard's column) on the same read. With ``CENTERED`` it also
    takes ``m A`` (``m``: the unmasked entries), the rows' sums and their
    unmasked counts, into ``mpart[split, row, r]`` and ``spart[split, rank
    block, row, 0..1]``, and the last program takes off the mean term
    ``z̄ ⊗ (m A)`` (:func:`cmiguard.kernels.reference.mean_term`) and writes
    ``z̄`` to ``mean[row]`` for the backward."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    split = tl.program_id(1)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc_m = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    kept_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_block = tl.program_id(2) == 0
    check = CHECK and first_block
    nans = tl.zeros((BLOCK_N,), dtype=tl.int32)
    infs = tl.zeros((BLOCK_N,), dtype=tl.int32)
    finite = tl.zeros((BLOCK_N,), dtype=tl.int32)
    best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    best_at = tl.zeros((BLOCK_N,), dtype=tl.int64)
    v_lo = split * v_chunk
    for v0 in range(v_lo, tl.minimum(v_lo + v_chunk, V), BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols[None, :] < V)
        z = load_tile(z_ptr, rows, cols, N, V, stride_z, 0.0)
        if check:
            nans += tl.sum(tl.where(ok & (z != z), 1, 0), axis=1)
            infs += tl.sum(tl.where(ok & (z == float("inf")), 1, 0), axis=1)
            finite += tl.sum(tl.where(ok & (z == z) & (tl.abs(z) < float("inf")), 1, 0), axis=1)
        if ARGMAX and first_block:
            zm = tl.where(ok, z, float("-inf"))
            top = tl.max(zm, axis=1)
            at = v0 + tl.argmax(zm, axis=1, tie_break_left=True).to(tl.int64)
            better = top > best  # strict: the earlier column wins a tie, as in torch
            best_at = tl.where(better, at, best_at)
            best = tl.where(better, top, best)
        if CENTERED:
            kept = tl.where(ok & (z != float("-inf")), 1.0, 0.0)
        z = tl.where(z == float("-inf"), 0.0, z)
        a = tl.load(
            a_ptr + cols[:, None].to(tl.int64) * R + rr[None, :],
            mask=(cols[:, None] < V) & (rr[None, :] < R),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(z, a, input_precision=DOT)
        if CENTERED:
            acc_m += tl.dot(kept, a, input_precision=DOT)
            row_sum += tl.sum(z, axis=1)
            kept_n += tl.sum(kept, axis=1)
    out_ok = row_ok[:, None] & (rr[None, :] < R)
    at_r = (split * N + rows)[:, None].to(tl.int64) * R + rr[None, :]
    tl.store(part_ptr + at_r, acc, mask=out_ok)
    if CENTERED:
        tl.store(mpart_ptr + at_r, acc_m, mask=out_ok)
        sums = spart_ptr + ((split * tl.num_programs(2) + tl.program_id(2)) * N + rows).to(tl.int64) * 2  # fmt: skip
        tl.store(sums, row_sum, mask=row_ok)
        tl.store(sums + 1, kept_n, mask=row_ok)
    if check:
        f = flags_ptr + (split * N + rows).to(tl.int64) * 3
        tl.store(f, nans, mask=row_ok)
        tl.store(f + 1, infs, mask=row_ok)
        tl.store(f + 2, finite, mask=row_ok)
    if ARGMAX and first_block:
        tl.store(am_val_ptr + split * N + rows, best, mask=row_ok)
        tl.store(am_idx_ptr + split * N + rows, best_at, mask=row_ok)
    # every thread's stores are issued before the ticket is taken (release);
    # the last taker reads the others' parts past its L1 (volatile)
    tl.debug_barrier()
    ticket = count_ptr + tl.program_id(0) * tl.num_programs(2) + tl.program_id(2)
    if tl.atomic_add(ticket, 1) == splits - 1:
        u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        m_a = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
        row_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        kept_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for sp in range(0, splits):
            at_sp = (sp * N + rows)[:, None].to(tl.int64) * R + rr[None, :]
            u += tl.load(part_ptr + at_sp, mask=out_ok, other=0.0, volatile=True)
            if CENTERED:
                m_a += tl.load(mpart_ptr + at_sp, mask=out_ok, other=0.0, volatile=True)
                sums = spart_ptr + ((sp * tl.num_programs(2) + tl.program_id(2)) * N + rows).to(tl.int64) * 2  # fmt: skip
                row_sum += tl.load(sums, mask=row_ok, other=0.0, volatile=True)
                kept_n += tl.load(sums + 1, mask=row_ok, other=0.0, volatile=True)
        if CENTERED:
            mean = row_sum / tl.maximum(kept_n, 1.0)
            u -= mean[:, None] * m_a
            if first_block:
                tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(u_ptr + rows[:, None].to(tl.int64) * R + rr[None, :], u, mask=out_ok)
        if ARGMAX and first_block:
            best = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
            best_at = tl.zeros((BLOCK_N,), dtype=tl.int64)
            for sp in range(0, splits):
                top = tl.load(am_val_ptr + sp * N + rows, mask=row_ok, other=0.0, volatile=True)
                at = tl.load(am_idx_ptr + sp * N + rows, mask=row_ok, other=0, volatile=True)
                better = (top > best) | ((sp == 0) & (top == best))  # split 0 seeds the row
                best_at = tl.where(better, at, best_at)
                best = tl.where(better, top, best)
            tl.store(j_ptr + rows, best_at, mask=row_ok)
        tl.atomic_xchg(ticket, 0)  # ready for the next launch (and a graph replay)


@triton.jit
def row_terms(rows, row_ok, labels_ptr, group_ptr, stats_ptr, weights_ptr, inv_tau):
    """Per row of the objective's backward: its label, CMI group, the saved
    log-sum-exps (of ``t/τ``, ``t``, ``z``), ``⟨p, g⟩`` and the loss weights."""
    srow = stats_ptr + rows.to(tl.int64) * 7
    y = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    g = tl.load(group_ptr + rows, mask=row_ok, other=-1)
    lse_tau = tl.load(srow + 0, mask=row_ok, other=0.0)
    lse_t = tl.load(srow + 1, mask=row_ok, other=0.0)
    lse_z = tl.load(srow + 2, mask=row_ok, other=0.0)
    dot = tl.load(srow + 3, mask=row_ok, other=0.0) - tl.load(srow + 4, mask=row_ok, other=0.0)
    w_cmi = tl.load(weights_ptr + rows * 3 + 0, mask=row_ok, other=0.0) * inv_tau
    w_ce = tl.load(weights_ptr + rows * 3 + 1, mask=row_ok, other=0.0)
    w_kl = tl.load(weights_ptr + rows * 3 + 2, mask=row_ok, other=0.0)
    return y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl


@triton.jit
def objective_grad(t, zt, cols, ok, y, g, lse_tau, lse_t, lse_z, dot, w_cmi, w_ce, w_kl, logq_ptr, V, inv_tau, NEED_KL: tl.constexpr):  # fmt: skip
    """``∂L/∂t`` of one tile in closed form (docs/DESIGN.md): the CMI term's
    ``p ⊙ (g − ⟨p, g⟩)/τ`` with ``g = log p − log Q``, CE's ``softmax(t) − e_y``
    and KL's ``softmax(t) − softmax(z)``, each times its row weight."""
    logp = t * inv_tau - lse_tau[:, None]
    p = tl.exp(logp)
    cmi_ok = ok & (g[:, None] >= 0)
    log_c = tl.load(logq_ptr + g[:, None].to(tl.int64) * V + cols[None, :], mask=cmi_ok, other=0.0)
    gp = tl.where(p > 0, logp - log_c, 0.0)
    grad = w_cmi[:, None] * p * (gp - dot[:, None])
    grad += (w_ce + w_kl)[:, None] * tl.exp(t - lse_t[:, None])
    grad -= tl.where(cols[None, :] == y[:, None], w_ce[:, None], 0.0)
    if NEED_KL:
        grad -= w_kl[:, None] * tl.exp(zt - lse_z[:, None])
    return tl.where(ok, grad, 0.0)

"""The transformed-logits tile every kernel recomputes instead of storing.

``t = x ⊙ scale + u Bᵀ + bias`` for ``BLOCK_N`` rows × ``BLOCK_V`` columns,
``-inf`` where ``x`` is ``-inf`` (masked tokens) or out of range. For the
low-rank families ``x = z`` and ``u = z A`` (computed once per row block);
for ``dense`` the caller passes ``x = z Wᵀ + b`` and no low-rank part.
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
):
    row_ok = rows < N
    col_ok = cols < V
    x = load_tile(x_ptr, rows, cols, N, V, stride_x, float("-inf"))
    masked = x == float("-inf")
    t = tl.where(masked, 0.0, x)
    if HAS_SCALE:
        t = t * tl.load(scale_ptr + cols, mask=col_ok, other=1.0).to(tl.float32)[None, :]
    if HAS_LOWRANK:
        for r0 in tl.static_range(0, R, BLOCK_R):
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
            )
            t += tl.dot(u, bt, input_precision="ieee")
    if HAS_BIAS:
        t = t + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(masked, float("-inf"), t)


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
def finish_lse(m, s):
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.maximum(s, 1e-30))  # s >= 1 on real rows; padding rows stay finite


@triton.jit
def project_kernel(
    z_ptr,
    a_ptr,
    u_ptr,
    N,
    V,
    stride_z,
    R: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """``u = z A`` with masked (``-inf``) logits read as 0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok = (rows[:, None] < N) & (cols[None, :] < V)
        z = tl.load(
            z_ptr + rows[:, None].to(tl.int64) * stride_z + cols[None, :], mask=ok, other=0.0
        ).to(tl.float32)
        z = tl.where(z == float("-inf"), 0.0, z)
        a = tl.load(
            a_ptr + cols[:, None].to(tl.int64) * R + rr[None, :],
            mask=(cols[:, None] < V) & (rr[None, :] < R),
            other=0.0,
        ).to(tl.float32)
        acc += tl.dot(z, a, input_precision="ieee")
    tl.store(
        u_ptr + rows[:, None].to(tl.int64) * R + rr[None, :],
        acc,
        mask=(rows[:, None] < N) & (rr[None, :] < R),
    )


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))

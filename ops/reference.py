"""Pure-torch twins of the fused kernels: the oracle in tests and the CPU path.

Every function computes in fp32 whatever the input dtype and walks the rows in
chunks, so that no ``[N, V]`` fp32 temporary is made beyond the output (the
transformed chunk is at most ``CHUNK_BYTES``). ``-inf`` logits are masked
entries: they enter the transform as 0 and leave it as ``-inf``. A centred
transform (``centered``) reads each row through its deviations from the mean
of its unmasked entries, so that shifting those entries (logits → log-probs)
moves ``T(z)`` by the same constant, masks and rounded factors included.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

CHUNK_BYTES = 32 << 20
IGNORE_INDEX = -100


def row_chunks(n_rows: int, vocab: int, chunk_rows: int | None = None) -> Iterator[slice]:
    """Slices of rows whose fp32 ``[rows, V]`` block fits in ``CHUNK_BYTES``."""
    step = chunk_rows or max(1, CHUNK_BYTES // (4 * max(vocab, 1)))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


def affine_logits(
    z: Tensor,
    *,
    weight: Tensor | None = None,
    scale: Tensor | None = None,
    a: Tensor | None = None,
    b: Tensor | None = None,
    bias: Tensor | None = None,
    centered: bool = False,
) -> Tensor:
    """``T(z)`` in fp32 for the three families.

    dense: ``z Wᵀ + bias``; lowrank: ``z + (z A) Bᵀ``; diag_lowrank:
    ``z ⊙ scale + (z A) Bᵀ + bias``. Masked (``-inf``) entries stay masked.
    ``centered``: ``z A`` less :func:`mean_term` (the low-rank families).
    """
    z = z.float()
    masked = torch.isneginf(z)
    has_mask = bool(masked.any())
    if has_mask:
        z = z.masked_fill(masked, 0.0)
    if weight is not None:
        t = z @ weight.t()
    else:
        t = z * scale if scale is not None else z
        if a is not None:
            a = a.float()  # bf16 factors: rounded, in fp32
            u = z @ a
            if centered:
                u = u - mean_term(z, masked if has_mask else None, a)
            t = torch.addmm(t, u, b.float().t())
    if bias is not None:
        t = t + bias
    if has_mask:
        t = t.masked_fill(masked, float("-inf"))
    return t


def argmax_guard(t: Tensor, z: Tensor, margin: float, out: Tensor | None = None) -> Tensor:
    """Put each row's raw answer back on top: ``t_j ← max(t_j, max_{k≠j} t_k + margin)``
    with ``j = argmax z``. Differentiable (autograd flows through the runner-up
    where the guard lifts ``t_j``). With ``out`` (``t`` itself, no autograd)
    the row is changed in place. A row with one finite entry is left alone.
    """
    j = z.argmax(-1, keepdim=True)
    t_j = t.gather(-1, j)
    runner_up = t.scatter(-1, j, float("-inf")).amax(-1, keepdim=True)
    lifted = torch.maximum(t_j, runner_up + margin)
    if out is not None:
        return out.scatter_(-1, j, lifted)
    return t.scatter(-1, j, lifted)


def mean_term(z0: Tensor, masked: Tensor | None, a: Tensor) -> Tensor:
    """``z̄ ⊗ (m A)``: what a centred transform takes off ``u = z₀ A`` (``z₀``:
    the rows, masked entries as 0; ``m``: the unmasked indicator; ``z̄``: the
    mean of a row's unmasked entries, 0 for an all-masked row). Then ``u`` is
    ``Σ_unmasked (z − z̄) A``, which no shift of the unmasked entries moves,
    whatever ``A``'s column sums (bf16 rounding leaves them off zero)."""
    a = a.float()
    if masked is None:
        return z0.mean(1, keepdim=True) * a.sum(0)
    kept = (~masked).float()
    return z0.sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp_min(1) * (kept @ a)


def project_rows(z: Tensor, a: Tensor, has_mask: bool, centered: bool = False) -> Tensor:
    """``u = z A`` in fp32 for all rows at once (``[N, r]`` is small); masked
    read as 0; ``centered``: less :func:`mean_term`."""
    a = a.float()  # once, not per chunk (bf16 factors)
    if z.dtype == torch.float32 and not has_mask and not centered:
        return z @ a
    u = torch.empty(z.shape[0], a.shape[1], dtype=torch.float32, device=z.device)
    for rows in row_chunks(*z.shape):
        zc = z[rows].float()
        masked = torch.isneginf(zc) if has_mask else None
        if masked is not None:
            zc = zc.masked_fill(masked, 0.0)
        u[rows] = zc @ a
        if centered:
            u[rows] -= mean_term(zc, masked, a)
    return u


def _affine_into(
    zc: Tensor,
    params: dict[str, Tensor | bool | None],
    u: Tensor | None,
    has_mask: bool,
    out: Tensor | None,
) -> Tensor:
    """``T(z)`` for one chunk without autograd, written into ``out`` when given."""
    zf = zc.float()
    masked = torch.isneginf(zf) if has_mask else None
    if masked is not None:
        zf = zf.masked_fill(masked, 0.0)
    if params.get("weight") is not None:
        t = torch.matmul(zf, params["weight"].float().t(), out=out)
    else:
        base = zf * params["scale"] if params.get("scale") is not None else zf
        if u is not None:
            t = torch.addmm(base, u, params["b"].float().t(), out=out)
        elif out is not None:
            t = out.copy_(base)
        else:
            t = base.clone() if base is zc else base
    if params.get("bias") is not None:
        t.add_(params["bias"])
    if masked is not None:
        t.masked_fill_(masked, float("-inf"))
    return t


def purify_reference(
    z: Tensor,
    params: dict[str, Tensor | bool | None],
    temperature: float = 1.0,
    output: str = "logits",
    top_k: int | None = None,
    chunk_rows: int | None = None,
    has_mask: bool | None = None,
    guard: float | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``T(z)/τ`` (``output="logits"``) or its log-softmax (``"logprobs"``).

    ``params`` are a transform's ``kernel_params()``; ``guard`` its
    ``guard_margin`` (:func:`argmax_guard` after ``T``). With ``top_k`` only the
    k largest values (and their ids) are written. ``z`` is ``[N, V]``; the
    output keeps its dtype. fp32 results are computed straight into the
    output, one chunk of rows at a time, so the only extra memory is ``z A``
    (``[N, r]``) and, for other dtypes, one fp32 chunk.
    """
    n, v = z.shape
    params = {k: (p.detach() if isinstance(p, Tensor) else p) for k, p in params.items()}
    if has_mask is None:
        has_mask = bool(torch.isneginf(z).any())
    u = None
    if params.get("a") is not None:
        u = project_rows(z, params["a"], has_mask, params.get("centered", False))
    direct = top_k is None and z.dtype == torch.float32
    if top_k is not None:
        values = torch.empty(n, top_k, dtype=z.dtype, device=z.device)
        ids = torch.empty(n, top_k, dtype=torch.long, device=z.device)
    else:
        out = torch.empty(n, v, dtype=z.dtype, device=z.device)
    with torch.no_grad():
        for rows in row_chunks(n, v, chunk_rows):
            t = _affine_into(
                z[rows], params, u[rows] if u is not None else None, has_mask,
                out[rows] if direct else None,
            )  # fmt: skip
            if guard is not None:
                argmax_guard(t, z[rows], guard, out=t)
            if temperature != 1.0:
                t.div_(temperature)
            if output == "logprobs":
                # in place, one fused op (2x faster than subtracting a logsumexp on CPU)
                torch._log_softmax(t, -1, False, out=t)
            if top_k is not None:
                top_values, top_ids = t.topk(top_k, dim=-1)
                values[rows] = top_values.to(z.dtype)
                ids[rows] = top_ids
            elif not direct:
                out[rows] = t.to(z.dtype)
    return (values, ids) if top_k is not None else out


def label_groups(labels: Tensor, min_count: int = 2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rows that enter the CMI estimate and their label group.

    Returns ``(rows, group, group_labels, group_counts)``: the row indices whose
    label is not ``IGNORE_INDEX`` and appears at least ``min_count`` times (a
    label seen once has zero CMI by construction, so it would only dilute the
    mean), the compact group id of each, and per group its label and count.
    """
    valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    uniq, inv, counts = labels[valid].unique(return_inverse=True, return_counts=True)
    keep_group = counts >= min_count
    keep_row = keep_group[inv]
    remap = torch.cumsum(keep_group.long(), 0) - 1
    return valid[keep_row], remap[inv[keep_row]], uniq[keep_group], counts[keep_group]


def centroid_sums(
    logits: Tensor, rows: Tensor, group: Tensor, n_groups: int, temperature: float = 1.0
) -> Tensor:
    """``Σ_{i in group} softmax(logits_i/τ)`` per group, ``[G, V]`` fp32."""
    v = logits.shape[-1]
    sums = torch.zeros(n_groups, v, dtype=torch.float32, device=logits.device)
    for sl in row_chunks(rows.numel(), v):
        p = torch.softmax(logits[rows[sl]].float() / temperature, dim=-1)
        sums.index_add_(0, group[sl], p)
    return sums


def _log_mean(sums: Tensor, counts: Tensor) -> Tensor:
    """``log Q`` from centroid sums; underflowed entries are floored at the smallest
    normal float (their rows' mass there is below it too, so KL is unaffected)."""
    mean = sums / counts.unsqueeze(1).float()
    return mean.clamp_min(torch.finfo(torch.float32).tiny).log()


def _kl_to(logp: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise ``KL(p ‖ q)`` from log-probabilities, with ``0·log 0 = 0``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - log_q), torch.zeros_like(p)).sum(-1)


def cmi_reference(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    min_count: int = 2,
    log_centroids: Tensor | None = None,
) -> Tensor:
    """``mean_i KL(p_i ‖ Q_{y_i})`` with in-batch centroids (two passes).

    ``log_centroids`` (``[G, V]``, one per group of :func:`label_groups`)
    replaces the in-batch centroids: the streaming estimator's one pass.
    """
    rows, group, _, counts = label_groups(labels, min_count)
    if rows.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=logits.device)
    if log_centroids is None:
        sums = centroid_sums(logits, rows, group, counts.numel(), temperature)
        log_centroids = _log_mean(sums, counts)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for sl in row_chunks(rows.numel(), logits.shape[-1]):
        logp = torch.log_softmax(logits[rows[sl]].float() / temperature, dim=-1)
        total += _kl_to(logp, log_centroids[group[sl]]).sum().double()
    return (total / rows.numel()).float()


class ObjectiveFunction(torch.autograd.Function):
    """``λ_cmi·CMI(softmax(t/τ)) + λ_ce·CE(t, y) + λ_kl·KL(softmax(z) ‖ softmax(t))``.

    ``t`` are transformed logits ``[N, V]`` (they carry the graph to the
    transform), ``z`` the raw ones. The backward is the closed form of
    docs/DESIGN.md (``g = log p − log Q``, then the softmax backward), computed
    chunk by chunk from saved log-sum-exps instead of saved probabilities.
    Returns ``(loss, stats)``, ``stats = [cmi, ce, kl]`` without gradient.
    """

    @staticmethod
    def forward(ctx, t, z, labels, log_centroids, lam_cmi, lam_ce, lam_kl, temperature, min_count):
        rows, group, _, counts = label_groups(labels, min_count)
        valid = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        with torch.no_grad():
            if log_centroids is None and rows.numel() > 0:
                sums = centroid_sums(t, rows, group, counts.numel(), temperature)
                log_centroids = _log_mean(sums, counts)
            cmi = t.new_zeros((), dtype=torch.float64)
            ce = t.new_zeros((), dtype=torch.float64)
            kl = t.new_zeros((), dtype=torch.float64)
            if rows.numel() > 0:
                for sl in row_chunks(rows.numel(), t.shape[-1]):
                    logp = torch.log_softmax(t[rows[sl]].float() / temperature, dim=-1)
                    cmi += _kl_to(logp, log_centroids[group[sl]]).sum().double()
                cmi /= rows.numel()
            n_valid = max(valid.numel(), 1)
            for sl in row_chunks(valid.numel(), t.shape[-1]):
                r = valid[sl]
                log_s = torch.log_softmax(t[r].float(), dim=-1)
                ce -= log_s.gather(1, labels[r].unsqueeze(1)).sum().double()
                if lam_kl:
                    kl += _kl_to(torch.log_softmax(z[r].float(), dim=-1), log_s).sum().double()
            ce /= n_valid
            kl /= n_valid
        ctx.save_for_backward(t, z, labels, rows, group, valid, log_centroids)
        ctx.lams = (lam_cmi, lam_ce, lam_kl, temperature)
        loss = (lam_cmi * cmi + lam_ce * ce + lam_kl * kl).float()
        stats = torch.stack([cmi, ce, kl]).float()
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        t, z, labels, rows, group, valid, log_centroids = ctx.saved_tensors
        lam_cmi, lam_ce, lam_kl, temperature = ctx.lams
        grad = torch.zeros_like(t, dtype=torch.float32)
        v = t.shape[-1]
        if lam_cmi and rows.numel() > 0:
            scale = lam_cmi / rows.numel() / temperature
            for sl in row_chunks(rows.numel(), v):
                r = rows[sl]
                logp = torch.log_softmax(t[r].float() / temperature, dim=-1)
                p = logp.exp()
                g = torch.where(p > 0, logp - log_centroids[group[sl]], torch.zeros_like(p))
                dot = (p * g).sum(-1, keepdim=True)
                grad.index_add_(0, r, scale * p * (g - dot))
        if (lam_ce or lam_kl) and valid.numel() > 0:
            n_valid = valid.numel()
            for sl in row_chunks(n_valid, v):
                r = valid[sl]
                s = torch.softmax(t[r].float(), dim=-1)
                d = (lam_ce + lam_kl) * s
                if lam_ce:
                    d[torch.arange(r.numel()), labels[r]] -= lam_ce
                if lam_kl:
                    d -= lam_kl * torch.softmax(z[r].float(), dim=-1)
                grad.index_add_(0, r, d / n_valid)
        grad.mul_(grad_loss)
        return grad.to(t.dtype), None, None, None, None, None, None, None, None

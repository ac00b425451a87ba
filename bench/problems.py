"""Benchmark problems and the three implementations compared side by side.

``ours``: cmiguard's public API (Triton kernels on CUDA, the chunked torch
twins on CPU). ``eager``: the naive torch composition a user would write.
``compile``: that composition under ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

import cmiguard


@dataclass(frozen=True)
class Case:
    op: str  # "purify" or "train"
    n: int
    v: int
    rank: int

    @property
    def label(self) -> str:
        return f"{self.op} N={self.n} V={self.v} r={self.rank}"


def make_inputs(case: Case, device: str, dtype: torch.dtype = torch.float32):
    """Teacher-like logits, repeating labels and a trained-looking low-rank transform."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    z = (torch.randn(case.n, case.v, generator=gen) * 3).to(device=device, dtype=dtype)
    labels = torch.randint(0, max(1, case.n // 8), (case.n,), generator=gen).to(device)
    t = cmiguard.LowRankTransform(case.v, case.rank).to(device)
    with torch.no_grad():
        t.b.normal_(0, 1e-4)
    return z, labels, t


def naive_purify(z: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return (z + (z @ a) @ b.t()).log_softmax(-1)


def naive_objective(z: Tensor, labels: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``CMI + CE`` through plain autograd (in-batch centroids)."""
    t = z + (z @ a) @ b.t()
    logp = t.log_softmax(-1)
    p = logp.exp()
    uniq, inv, counts = labels.unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(uniq.numel(), z.shape[1], device=z.device, dtype=p.dtype).index_add(
        0, inv, p
    )
    log_q = (sums / counts[:, None]).clamp_min(1e-38).log()
    cmi = (p * (logp - log_q[inv])).sum(-1).mean()
    ce = torch.nn.functional.nll_loss(logp, labels)
    return cmi + ce


def implementations(case: Case, z, labels, t) -> dict[str, Callable[[], object]]:
    """Zero-argument callables, one per implementation, doing one purify or one step."""
    a, b = t.a, t.b
    if case.op == "purify":
        compiled = torch.compile(naive_purify, dynamic=True)

        def ours():
            return cmiguard.purify(z, t, output="logprobs")

        def eager():
            with torch.no_grad():
                return naive_purify(z, a, b)

        def comp():
            with torch.no_grad():
                return compiled(z, a, b)

        return {"ours": ours, "eager": eager, "compile": comp}

    compiled = torch.compile(naive_objective, dynamic=True)

    def ours():
        loss = cmiguard.anti_distillation_loss(z, labels, t)
        loss.backward()

    def eager():
        naive_objective(z, labels, a, b).backward()

    def comp():
        compiled(z, labels, a, b).backward()

    return {"ours": ours, "eager": eager, "compile": comp}


def min_bytes(case: Case, elem: int = 4) -> int:
    """Traffic no implementation can avoid, plus A and B: purify reads the logits
    and writes the output; a training step reads them in the forward and again
    in the backward (it keeps no [N, V] state in between)."""
    return 2 * case.n * case.v * elem + 2 * case.v * case.rank * 4


@dataclass(frozen=True)
class Traffic:
    """Full passes over ``[N, V]`` (reads, writes) and kernel launches of one op."""

    reads: int
    writes: int
    launches: int

    @property
    def passes(self) -> int:
        return self.reads + self.writes


# what each kernel reads and writes of [N, V] (tests/test_traffic.py counts the
# launches an op really makes and checks them against TRAFFIC)
KERNEL_PASSES = {
    "project_kernel": (1, 0),
    "lse_kernel": (1, 0),
    "purify_kernel": (1, 1),
    "decode_write_kernel": (1, 1),
    "fixup_kernel": (1, 1),
    "stats_kernel": (1, 0),
    "grad_u_kernel": (1, 0),
    "grad_factors_kernel": (1, 0),
}
# ours, low-rank family, on the Triton path; no torch op between the launches
# (project_kernel sums its split-K parts itself). The argmax guard adds no
# pass or launch: its column comes from the project pass, its statistics from
# the lse (decode: write) pass, its lift is applied where the output is written.
TRAFFIC = {
    "purify_logprobs": Traffic(3, 1, 3),  # project, lse, write
    "purify_logits": Traffic(2, 1, 2),  # project, write
    # N <= DECODE_MAX_ROWS: project, write T(z)/τ and chunk lse, fix-up. One more
    # small [N, V] write instead of a second read of B, the traffic at decode sizes
    "purify_decode_logprobs": Traffic(3, 2, 3),
    # kernel launches only: project, lse, scatter, cross | grad_u, grad_factors (the
    # streaming estimator adds project, lse and scatter for its centroid update)
    "train_exact": Traffic(6, 0, 6),
}
# the floors of docs/DESIGN.md: u = zA needs a whole read before any output exists
FLOOR = {
    "purify_logprobs": Traffic(3, 1, 3),
    "purify_logits": Traffic(2, 1, 2),
    "purify_decode_logprobs": Traffic(3, 1, 3),
    "train_exact": Traffic(5, 0, 4),
}


def traffic_key(case: Case) -> str:
    return "purify_logprobs" if case.op == "purify" else "train_exact"


def moved_bytes(case: Case, elem: int = 4, block_n: int = 32, factor_bytes: int = 4) -> int:
    """Bytes our op moves by the model: its passes over ``[N, V]``, plus the factor
    tiles each pass that recomputes ``T(z)`` loads (``B`` per row block:
    ``r·bytes_f/BLOCK_N`` per logit, as docs/DESIGN.md counts them; caches may
    serve part of it)."""
    t = TRAFFIC[traffic_key(case)]
    logits = case.n * case.v
    factor_passes = t.reads  # every read recomputes T(z) or projects through A
    return t.passes * logits * elem + factor_passes * logits * case.rank * factor_bytes // block_n

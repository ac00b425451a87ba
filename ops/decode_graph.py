"""Decode batches replayed from a CUDA graph, one per row bucket.

At a few rows the three launches of the decode path (project, write, fix-up:
:mod:`cmiguard.kernels.decode`) cost more in launch overhead than in traffic,
so on CUDA each (row bucket, transform, settings) captures them once into a
``torch.cuda.CUDAGraph`` over static buffers and replays it. A batch of ``n``
rows is copied into its bucket's input (the next power of two up to
:data:`GRAPH_MAX_ROWS`), replayed, copied out and checked (one host sync,
the same messages as the other paths); a graph is out of the cache while a
caller uses it, so concurrent callers never share its buffers. Rows past
``n`` keep whatever an earlier batch left: every row is computed on its own,
and only the first ``n`` are checked and copied. The graph reads the transform's
parameters where they lie, so an in-place update (an optimizer step) is seen
and a new tensor is another graph; the cache holds its parameters alive, at
most :data:`MAX_GRAPHS` entries, least recently used out first.
``CMIGUARD_CUDA_GRAPHS=0`` turns it off. On CPU tensors (the interpreter in
tests) the same buffers run without a capture.
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import triton
from torch import Tensor

from cmiguard.kernels.decode import launch_decode
from cmiguard.kernels.purify import (
    column_operands,
    launch_project,
    raise_on_bad_input,
    ticket_count,
)

# captured graphs kept (each holds its bucket's input, output and scratch)
MAX_GRAPHS = 16
# rows up to which a decode batch is replayed from a graph. The copies in and
# out add two reads and two writes of [N, V]: at N = 64, V = 151,936 (bf16 in,
# fp32 out) about 117 MB, ≈ 40 µs at H100 bandwidth, about what the three
# launches cost; at 16 rows a quarter of it. Not yet measured:
# bench/crossover.py times both (kernels_nograph_s) for a GPU session to set it.
GRAPH_MAX_ROWS = 16


def graphs_enabled() -> bool:
    """``CMIGUARD_CUDA_GRAPHS=0`` turns replay off (to compare, or to debug a launch)."""
    return os.environ.get("CMIGUARD_CUDA_GRAPHS", "1") != "0"


def takes_graph(rows: Tensor) -> bool:
    """Whether purify replays ``rows`` (a decode batch) from a graph."""
    return rows.is_cuda and rows.shape[0] <= GRAPH_MAX_ROWS and graphs_enabled()


def bucket_rows(n: int) -> int:
    """The static row count a batch of ``n`` rows runs at (``1 ≤ n ≤ GRAPH_MAX_ROWS``)."""
    if not 1 <= n <= GRAPH_MAX_ROWS:
        raise ValueError(f"a graphed decode batch has 1 to {GRAPH_MAX_ROWS} rows, got {n}")
    return triton.next_power_of_2(n)


class DecodeGraph:
    """One bucket's static buffers and, on CUDA, its captured launches."""

    def __init__(
        self,
        like: Tensor,
        params: dict[str, Tensor | bool | None],
        temperature: float,
        logprobs: bool,
        guard: float | None,
        out_dtype: torch.dtype,
        rows: int,
    ) -> None:
        v = like.shape[1]
        self.params = params  # held: the graph reads them where they lie
        self.settings = (temperature, logprobs, guard, out_dtype)
        self.z = torch.zeros(rows, v, dtype=like.dtype, device=like.device)
        r = params["a"].shape[1]
        self.tickets = torch.zeros(
            max(256, ticket_count(rows, v, r, like.device)), dtype=torch.int32, device=like.device
        )
        # the first run compiles the kernels, which must not happen under capture
        self.out, self.counts = self._launch()
        self.graph = None
        if like.is_cuda:
            torch.cuda.synchronize(like.device)
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: a server's other threads may use CUDA during the capture
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.out, self.counts = self._launch()

    def _launch(self) -> tuple[Tensor, Tensor]:
        """Project (with the input check), write and fix up ``self.z``: no host sync."""
        temperature, logprobs, guard, out_dtype = self.settings
        centered = self.params.get("centered", False)
        u, j, _, counts = launch_project(
            self.z, self.params["a"], self.tickets, True, guard is not None, centered
        )
        ops = {"x": self.z, "u": u, "argmax": j, **column_operands(self.params)}
        out = torch.empty(self.z.shape, dtype=out_dtype, device=self.z.device)
        launch_decode(ops, out, temperature, logprobs, guard)
        return out, counts

    def __call__(self, rows: Tensor, out: Tensor) -> Tensor:
        """Copy in, replay, copy out: no host sync. Returns the rows' input
        counts (a copy) for :func:`raise_on_bad_input`; once this returns, the
        buffers may take the next batch on this stream."""
        n = rows.shape[0]
        self.z[:n].copy_(rows)
        self._run()
        out.copy_(self.out[:n])
        return self.counts[:n].clone()

    def _run(self) -> None:
        """The launches on ``self.z``: replayed on CUDA, run afresh on CPU."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self.out, self.counts = self._launch()


_GRAPHS: OrderedDict[tuple, DecodeGraph] = OrderedDict()


def purify_decode_graphed(
    rows: Tensor,
    params: dict[str, Tensor | bool | None],
    out: Tensor,
    temperature: float,
    logprobs: bool,
    guard: float | None = None,
) -> None:
    """Purify a decode batch ``rows`` (``[n, V]``, a low-rank family) into
    ``out`` through its bucket's :class:`DecodeGraph`, made on first use."""
    bucket = bucket_rows(rows.shape[0])
    tensors = tuple(
        (name, p.data_ptr(), tuple(p.shape), p.dtype) if isinstance(p, Tensor) else (name, p)
        for name, p in sorted(params.items())
        if p is not None
    )
    settings = (temperature, logprobs, guard, out.dtype)
    stream = torch.cuda.current_stream(rows.device).cuda_stream if rows.is_cuda else 0
    key = (rows.device, stream, bucket, rows.shape[1], rows.dtype, settings, tensors)
    # out of the cache while in use: another thread may run between these
    # launches (the GIL switches) and must not put its batch through these
    # buffers before this one's output is copied out; it makes its own graph
    graph = _GRAPHS.pop(key, None)
    if graph is None:
        graph = DecodeGraph(rows, params, temperature, logprobs, guard, out.dtype, bucket)
    counts = graph(rows, out)
    while len(_GRAPHS) >= MAX_GRAPHS:
        _GRAPHS.popitem(last=False)
    _GRAPHS[key] = graph
    raise_on_bad_input(counts)

"""Block sizes for the kernels, and whether the Triton interpreter is on.

Compiled (GPU): small tiles that keep a ``[BLOCK_N, BLOCK_V]`` fp32 tile in
registers, and the vocabulary split across programs (:func:`vocab_split`)
so that a few rows still fill the chip. Interpreter (CPU tests): each tile
step costs ~ms whatever its size, so use the biggest tiles and fewest steps,
and still split in three so that the tests cover the combining of splits.
:func:`forced` pins one configuration (``bench/tune_blocks.py`` sweeps them).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import triton


def interpreting() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (the tests in CI),
    where small tiles make it slow: :func:`launch_config` then takes wide ones."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_v: int
    block_r: int
    num_warps: int = 4
    # tl.dot precision of the low-rank product: "ieee" (fp32 FMA) or "tf32x3"
    # (three TF32 tensor-core products, fp32-level error)
    dot: str = "ieee"

    @property
    def constexprs(self) -> tuple[int, int, int, str]:
        """``(BLOCK_N, BLOCK_V, BLOCK_R, DOT)``: every kernel's last four arguments."""
        return (self.block_n, self.block_v, self.block_r, self.dot)

    @property
    def options(self) -> dict[str, object]:
        """Launch options. The kernels recompute ``T(z)`` in every pass, and each
        pass must round it the same way: no FMA contraction, which fuses a
        product into one pass's subtraction and rounds it in another's max."""
        return {"num_warps": self.num_warps, "enable_fp_fusion": False}


_forced: LaunchConfig | None = None


@contextmanager
def forced(config: LaunchConfig) -> Iterator[None]:
    """Launch every kernel with ``config`` inside the block (for tuning sweeps)."""
    global _forced
    previous, _forced = _forced, config
    try:
        yield
    finally:
        _forced = previous


def launch_config(n_rows: int, vocab: int, rank: int) -> LaunchConfig:
    """The tile for a call: the forced one (:func:`forced`, for the tests and
    the sweep), else 16 or 32 rows × 128 columns, the rank up to 64 at a time,
    tf32x3 dots (the IEEE dot ran 10x slower on an H100, bench/RESULTS.md)."""
    if _forced is not None:
        return _forced
    block_r = min(64, max(16, triton.next_power_of_2(max(rank, 1))))
    if interpreting():
        block_v = min(4096, max(16, triton.next_power_of_2(triton.cdiv(vocab, 2))))
        return LaunchConfig(16, block_v, max(16, min(256, triton.next_power_of_2(max(rank, 1)))))
    block_n = 16 if n_rows <= 256 else 32
    return LaunchConfig(block_n, 128, block_r, 4, "tf32x3")


# programs a split aims for per multiprocessor, and the fewest tiles a split walks
PROGRAMS_PER_SM = 4
MIN_TILES = 4


def vocab_split(n_rows: int, vocab: int, config: LaunchConfig, device) -> tuple[int, int]:
    """``(splits, chunk)``: the vocabulary cut into ``splits`` chunks of ``chunk``
    columns (a multiple of ``BLOCK_V``), one program per (row block, chunk)."""
    tiles = triton.cdiv(max(vocab, 1), config.block_v)
    if interpreting():
        wanted = 3
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        row_blocks = triton.cdiv(max(n_rows, 1), config.block_n)
        wanted = max(1, min(triton.cdiv(PROGRAMS_PER_SM * sms, row_blocks), tiles // MIN_TILES))
    per_split = triton.cdiv(tiles, min(wanted, tiles))
    return triton.cdiv(tiles, per_split), per_split * config.block_v

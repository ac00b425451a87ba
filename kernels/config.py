"""Block sizes for the kernels, and whether the Triton interpreter is on.

Compiled (GPU): small tiles that keep a ``[BLOCK_N, BLOCK_V]`` fp32 tile in
registers. Interpreter (CPU tests): each tile step costs ~ms whatever its
size, so use the biggest tiles and fewest steps.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import triton


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class LaunchConfig:
    block_n: int
    block_v: int
    block_r: int


def launch_config(n_rows: int, vocab: int, rank: int) -> LaunchConfig:
    block_r = min(64, max(16, triton.next_power_of_2(max(rank, 1))))
    if interpreting():
        block_v = min(4096, max(16, triton.next_power_of_2(vocab)))
        return LaunchConfig(16, block_v, max(16, min(256, triton.next_power_of_2(max(rank, 1)))))
    block_n = 16 if n_rows <= 256 else 32
    return LaunchConfig(block_n, 128, block_r)

"""Registers, spills and shared memory of the kernels per tile, compiled for sm_90 without a GPU.

    python bench/register_pressure.py [--block-r 64] [--out bench/register_pressure.json]
    python bench/register_pressure.py --centered --out bench/register_pressure_centered.json

The ``BLOCK_N ≥ 2r`` tiling (issue 20) trades the factor tiles' traffic
(``r / BLOCK_N`` of a B tile per z tile) against registers: a
``[BLOCK_N, BLOCK_V]`` fp32 tile and a ``[BLOCK_N, BLOCK_R]`` accumulator live
in registers. A tile that spills to local memory is out before any GPU time
is spent on it, and so is one whose shared memory passes the H100's
227 KB a block (Triton refuses to launch it). This compiles each hot kernel
at rank 64 for every tile in ``TILES`` (the way ``tests/aot_compile.py``
does) and reads the registers per thread and the stack frame (spills) from
the cubin with ``cuobjdump``, and the shared memory from Triton's metadata.
The result depends on the Triton (and its ptxas) that compiles: the JSON
records the version. It says nothing about speed: only
``bench/tune_blocks.py`` on a GPU does. ``--centered`` compiles the two
kernels a centred transform changes (the projection's second product ``mA``
and its row sums, the backward's rows less their mean) in place of all six.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from aot_compile import compile_kernel  # noqa: E402

from cmiguard.kernels.cmi_loss import stats_kernel  # noqa: E402
from cmiguard.kernels.objective_backward import grad_factors_kernel, grad_u_kernel  # noqa: E402
from cmiguard.kernels.purify import purify_kernel  # noqa: E402
from cmiguard.kernels.tile import lse_kernel, project_kernel  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
RANK = 64
# the most dynamic shared memory one block may take on an H100 (sm_90)
H100_SHARED = 232_448
# (BLOCK_N, BLOCK_V, num_warps): today's defaults (16/32 × 128, 4 warps) first, then
# every other tile bench/tune_blocks.py sweeps
TILES = [
    (16, 128, 4),
    (32, 128, 4),
    (16, 64, 4),
    (32, 128, 8),
    (64, 64, 4),
    (64, 64, 8),
    (64, 128, 8),
    (128, 32, 8),
    (128, 64, 8),
    (128, 128, 8),
    (32, 256, 8),
]
FLAGS = {"R": RANK, "HAS_LOWRANK": True, "HAS_SCALE": True, "HAS_BIAS": True}
BF16_IO = {"x_ptr": "*bf16", "out_ptr": "*bf16", "z_ptr": "*bf16", "flags_ptr": "*i32"}
LABELS = {"labels_ptr": "*i64", "group_ptr": "*i64"}
# (name, kernel, constexprs beyond the tile, pointer types): the low-rank fp32-factor path
KERNELS = [
    (
        "project (u = zA)",
        project_kernel,
        {"R": RANK, "CHECK": True, "ARGMAX": False, "CENTERED": False},
        BF16_IO,
    ),
    ("lse", lse_kernel, {**FLAGS, "NEED_T": True, "NEED_Z": True, "GUARD": False}, BF16_IO),
    (
        "purify write",
        purify_kernel,
        {**FLAGS, "LOGPROBS": True, "CHECK": True, "GUARD": False},
        BF16_IO,
    ),
    (
        "train stats",
        stats_kernel,
        {**FLAGS, "FIRST": True, "SCATTER": True, "CROSS": False, "NEED_KL": True},
        LABELS,
    ),
    ("train grad_u", grad_u_kernel, {**FLAGS, "NEED_KL": True}, {**LABELS, "x_ptr": "*bf16"}),
    (
        "train grad_factors",
        grad_factors_kernel,
        {**FLAGS, "NEED_KL": True, "CENTERED": False},
        {**LABELS, "x_ptr": "*bf16"},
    ),
]


def kernels(centered: bool = False) -> list[tuple]:
    """``KERNELS``, or with ``centered`` the entries that take ``CENTERED``, set."""
    if not centered:
        return KERNELS
    return [
        (f"{name}, centred", fn, {**consts, "CENTERED": True}, pointers)
        for name, fn, consts, pointers in KERNELS
        if "CENTERED" in consts
    ]


def resources(cubin: bytes) -> tuple[int, int]:
    """``(registers per thread, stack bytes)`` of the cubin's one function."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(CUOBJDUMP), "--dump-resource-usage", f.name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{out}")
    return int(found[1]), int(found[2])


def usage(
    kernel: tuple, block_n: int, block_v: int, warps: int, block_r: int = RANK
) -> tuple[int, int, int]:
    """``(registers per thread, stack bytes, shared bytes)`` of one entry of
    ``KERNELS`` at one tile."""
    _, fn, consts, pointers = kernel
    tile = {"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_R": block_r, "DOT": "tf32x3"}
    compiled = compile_kernel(fn, {**consts, **tile}, pointers, num_warps=warps)
    return (*resources(compiled.asm["cubin"]), compiled.metadata.shared)


def measure(block_r: int = RANK, centered: bool = False) -> list[dict]:
    """Every kernel at every tile, the rank-64 product taken ``block_r`` columns at a time."""
    rows = []
    jobs = [(k, t) for k in kernels(centered) for t in TILES]
    for kernel, (bn, bv, warps) in tqdm(jobs, desc="compile sm_90"):
        regs, stack, shared = usage(kernel, bn, bv, warps, block_r)
        rows.append(
            {"kernel": kernel[0], "block_n": bn, "block_v": bv, "num_warps": warps}
            | {"registers": regs, "stack_bytes": stack, "shared_bytes": shared}
            | {"b_per_z_tile": RANK / bn}
        )
    return rows


def table(rows: list[dict]) -> str:
    """One line per tile: each kernel's registers per thread and stack frame, if any."""
    names = list(dict.fromkeys(r["kernel"] for r in rows))
    by_key = {(r["kernel"], r["block_n"], r["block_v"], r["num_warps"]): r for r in rows}
    lines = [
        "| BLOCK_N × BLOCK_V, warps | r / BLOCK_N | " + " | ".join(names) + " |",
        "|---" * (len(names) + 2) + "|",
    ]
    for bn, bv, warps in TILES:
        cells = []
        for name in names:
            row = by_key[(name, bn, bv, warps)]
            stack = f", **{row['stack_bytes']} B stack**" if row["stack_bytes"] else ""
            too_big = row["shared_bytes"] > H100_SHARED
            shared = f", **{row['shared_bytes'] // 1024} KB shared: no launch**" if too_big else ""
            cells.append(f"{row['registers']}{stack}{shared}")
        lines.append(f"| {bn} × {bv}, {warps} | {RANK / bn:.2g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-r", type=int, default=RANK, choices=[16, 32, 64])
    parser.add_argument("--centered", action="store_true", help="the centred variants only")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "register_pressure.json")
    args = parser.parse_args()
    rows = measure(args.block_r, args.centered)
    result = {
        "rank": RANK,
        "block_r": args.block_r,
        "centered": args.centered,
        "target": "sm_90",
        "triton": triton.__version__,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()

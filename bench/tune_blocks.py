"""Sweep the kernels' launch configurations on a GPU: block sizes, warps, dot precision.

    python bench/tune_blocks.py [--out results.json]     # CUDA (gpu.sh allows 100 s)
    python bench/tune_blocks.py --smoke                 # CPU wiring check (interpreter)

For each shape, times purify (fp32 log-probs) and one training step
(``anti_distillation_loss`` forward + backward) under every configuration in
``CONFIGS``, side by side in one run, plus purify with a transform that has
no low-rank part (what the passes cost in memory traffic alone). Prints a
table with each time, its ratio to the current default and the fraction of
the measured copy bandwidth; writes the rows as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.problems import Case, implementations, make_inputs, min_bytes  # noqa: E402
from bench.report import copy_bandwidth, sweep_clock, time_or_none  # noqa: E402

# the targets' shapes first (issue 20: N = 8192 and N = 1): a lease's time limit may
# cut the sweep (the 2026-11-25 one never reached N = 8192)
SHAPES = [(8192, 151_936, 64), (1, 151_936, 64), (1024, 49_152, 64)]
# (block_n, block_v, block_r, num_warps, dot); 64 × 64 and 128 × 32 at 8 warps spill
# little at compile time, less still with the rank taken 16 at a time, and 16 × 64 at
# 4 warps and BLOCK_R 16 not at all; 64 × 128 and 32 × 256 at BLOCK_R 64 cannot launch
# a training step (shared memory); the default large-N tile at BLOCK_R 32 escapes the
# 32-register build triton 3.6 makes of its write kernel: bench/register_pressure.py,
# bench/RESULTS.md
CONFIGS = [
    (16, 128, 64, 4, "tf32x3"),
    (32, 128, 64, 4, "tf32x3"),
    (32, 128, 32, 4, "tf32x3"),
    (32, 128, 64, 8, "tf32x3"),
    (32, 128, 16, 8, "tf32x3"),
    (64, 128, 64, 8, "tf32x3"),
    (64, 64, 64, 8, "tf32x3"),
    (128, 32, 64, 8, "tf32x3"),
    (128, 32, 16, 8, "tf32x3"),
    (32, 256, 64, 8, "tf32x3"),
    (16, 64, 64, 4, "tf32x3"),
    (16, 64, 16, 4, "tf32x3"),
]


def sweep(case: Case, bandwidth: float, device: str = "cuda") -> list[dict]:
    """Every configuration on one shape (plus the no-low-rank purify)."""
    from cmiguard.kernels.config import LaunchConfig, forced, launch_config
    from cmiguard.kernels.purify import purify_triton

    clock = sweep_clock(device)
    z, labels, t = make_inputs(case, device)
    variants = [("default", launch_config(case.n, case.v, case.rank))]
    variants += [
        (f"{bn}x{bv}{'' if br == 64 else f' r{br}'} w{w} {d}", LaunchConfig(bn, bv, br, w, d))
        for bn, bv, br, w, d in CONFIGS
    ]
    ours = implementations(case, z, labels, t)["ours"]
    timings = []
    for name, cfg in variants:
        with forced(cfg):
            label = f"{case.op} N={case.n} V={case.v} {name}"
            timings.append((name, case.rank, time_or_none(clock, ours, label)))
    if case.op == "purify":
        scale = {"scale": torch.ones(case.v, device=device)}
        timings.append(("no low-rank", 0, clock(lambda: purify_triton(z, scale, 1.0, "logprobs"))))
    base = timings[0][2]
    return [
        {
            "op": case.op,
            "n": case.n,
            "v": case.v,
            "rank": rank,
            "config": name,
            "s": seconds,  # None: it did not run
            "default_over_this": base / seconds if base and seconds else None,
            "of_copy_bandwidth": min_bytes(Case(case.op, case.n, case.v, rank))
            / seconds
            / bandwidth
            if seconds
            else None,
        }
        for name, rank, seconds in timings
    ]


def main() -> None:
    # the sweep is of the kernels: no small-batch routing to the twin
    os.environ["CMIGUARD_BACKEND"] = "triton"
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("tune_blocks.json"))
    parser.add_argument("--smoke", action="store_true", help="one tiny shape on CPU")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        device, shapes = "cpu", [(17, 1000, 64)]
        name = "CPU (interpreter: a wiring check, not a timing)"
    elif torch.cuda.is_available():
        device, shapes = "cuda", SHAPES
        name = torch.cuda.get_device_name()
    else:
        raise SystemExit("needs a CUDA device (or --smoke for a CPU wiring check)")
    bandwidth = copy_bandwidth(device)
    rows: list[dict] = []
    work = [Case(op, n, v, r) for n, v, r in shapes for op in ("purify", "train")]
    for case in tqdm(work, desc="shapes"):
        rows += sweep(case, bandwidth, device)
        args.out.write_text(json.dumps({"copy_gbps": bandwidth / 1e9, "rows": rows}, indent=1))
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\n{name}: copy {bandwidth / 1e9:,.0f} GB/s (read + write)\n")
    print("| op | N | V | config | ms | default/this | of copy bandwidth |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["s"] is None:
            print(f"| {r['op']} | {r['n']} | {r['v']} | {r['config']} | did not run | – | – |")
            continue
        ratio = f"{r['default_over_this']:.2f}x" if r["default_over_this"] else "–"
        print(
            f"| {r['op']} | {r['n']} | {r['v']} | {r['config']} | {r['s'] * 1e3:.3f} "
            f"| {ratio} | {r['of_copy_bandwidth']:.0%} |"
        )


if __name__ == "__main__":
    main()

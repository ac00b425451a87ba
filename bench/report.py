"""Speed and memory of purify and of a training step: ours vs eager vs torch.compile.

    python bench/report.py            # every N and V at rank 64, every rank at one shape
    python bench/report.py --full     # every (V, N, rank) the machine has memory for
    python bench/report.py --quick    # three shapes, for a smoke run

Prints a markdown table, writes bench/results_<device>.md and a PNG plot.
Ratios are measured side by side in one run. On CPU peak memory is the
resident high-water mark of a fresh process per measurement (minus the
inputs); on CUDA ``torch.cuda.max_memory_allocated`` above the inputs, and
the achieved GB/s is given as a fraction of the device's bandwidth.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.problems import (  # noqa: E402
    FLOOR,
    TRAFFIC,
    Case,
    implementations,
    make_inputs,
    min_bytes,
    moved_bytes,
    traffic_key,
)

HERE = Path(__file__).resolve().parent
VOCABS = (32_000, 49_152, 151_936)
ROWS = (1, 64, 1024, 8192)
RANKS = (16, 64, 256)
# HBM bandwidth in GB/s by device name (dense, as the vendors give it)
BANDWIDTH = {"H100 80GB HBM3": 3350, "H100": 3350, "H200": 4800, "A100": 2039}


def cases(full: bool, quick: bool, cuda: bool) -> list[Case]:
    if quick:
        shapes = [(64, 32_000, 16), (1024, 49_152, 64), (1, 151_936, 16)]
    elif full:
        shapes = list(itertools.product(ROWS, VOCABS, RANKS))
    else:
        # default: every N and V at rank 64, every rank at N=1024, V=49,152;
        # on CPU N=8192 only where eager torch's [N, V] temporaries fit in 24 GB.
        shapes = [(n, v, 64) for n in ROWS for v in VOCABS]
        shapes += [(1024, 49_152, r) for r in RANKS if r != 64]
    # CPU: eager torch's [N, V] temporaries must fit in 24 GB (several for a training step)
    limit = {"purify": 8192 * 49_152, "train": 1024 * 151_936}
    return [
        Case(op, n, v, r)
        for op in ("purify", "train")
        for n, v, r in shapes
        if cuda or n * v <= limit[op]
    ]


def time_cpu(fn, repeats: int, min_seconds: float = 0.5) -> float:
    """Median of at least ``repeats`` calls and at least ``min_seconds`` of them."""
    fn()  # warm-up (and compile)
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str = "cuda") -> float:
    """Measured ceiling: a device-to-device copy (2 GiB on CUDA; 16 MiB on the CPU,
    for the sweeps' smoke runs), bytes read + written per second."""
    src = torch.randn(2**29 if device == "cuda" else 2**22, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        import triton.testing

        seconds = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200) / 1e3
    else:
        seconds = time_cpu(lambda: dst.copy_(src), repeats=3)
    return 2 * src.numel() * 4 / seconds


def time_cuda(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3


def sweep_clock(device: str):
    """How a sweep times a call: ``do_bench`` on CUDA; on the CPU (the smoke runs,
    which check the wiring, not the speed) one call after a warm-up."""
    return time_cuda if device == "cuda" else lambda fn: time_cpu(fn, repeats=1, min_seconds=0)


def time_or_none(timer, fn, label: str) -> float | None:
    """``timer(fn)``, or None (printed with ``label`` and the error) if it
    raises: in a sweep that a lease may not allow to be run again, a failure
    (a tile past the shared memory, say) is a finding, not the end."""
    try:
        return timer(fn)
    except Exception as error:  # triton's OutOfResources and kin
        print(f"{label}: {type(error).__name__}: {error}")
        return None


def peak_cpu(case: Case, impl: str) -> float:
    """Peak resident bytes above the inputs, in a fresh process (see peak_memory.py)."""
    cmd = [sys.executable, "-m", "bench.peak_memory", case.op, str(case.n), str(case.v)]
    cmd += [str(case.rank), impl]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=HERE.parent)
    return int(out.stdout.strip().splitlines()[-1])


def measure(case: Case, device: str, repeats: int, with_memory: bool) -> dict:
    z, labels, t = make_inputs(case, device)
    row = {"op": case.op, "n": case.n, "v": case.v, "rank": case.rank}
    for name, fn in implementations(case, z, labels, t).items():
        try:
            if device == "cuda":
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                fn()
                torch.cuda.synchronize()
                row[f"{name}_peak"] = torch.cuda.max_memory_allocated() - base
                row[f"{name}_s"] = time_cuda(fn)
            else:
                row[f"{name}_s"] = time_cpu(fn, repeats)
                if with_memory and name != "compile":
                    row[f"{name}_peak"] = peak_cpu(case, name)
        except Exception as exc:  # report, do not hide: a failed impl shows as an error cell
            row[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:120]
        if t.a.grad is not None:
            t.zero_grad(set_to_none=True)
    row["output_bytes"] = case.n * case.v * 4
    row["tokens_per_s"] = case.n / row["ours_s"] if "ours_s" in row else None
    key = traffic_key(case)
    row["passes"], row["floor_passes"] = TRAFFIC[key].passes, FLOOR[key].passes
    row["launches"], row["moved_bytes"] = TRAFFIC[key].launches, moved_bytes(case)
    if device == "cuda" and "ours_s" in row:
        name = torch.cuda.get_device_name()
        peak = next((bw for key, bw in BANDWIDTH.items() if key in name), None)
        row["gbps"] = min_bytes(case) / row["ours_s"] / 1e9
        row["roofline"] = row["gbps"] / peak if peak else None
        # the time the floor's passes take at the device's bandwidth, over ours
        floor_s = FLOOR[key].passes * case.n * case.v * 4 / (peak * 1e9) if peak else None
        row["of_floor"] = floor_s / row["ours_s"] if floor_s else None
    return row


def fmt_bytes(b) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}"


def table(rows: list[dict], device: str) -> str:
    gpu = device == "cuda"
    head = "| op | N | V | r | ours ms | eager ms | compile ms | eager/ours | compile/ours |"
    head += " tokens/s | peak MiB ours | peak MiB eager | output MiB |"
    head += " passes ours / floor | launches | MiB moved (model) |"
    head += " GB/s | roofline | of pass floor |" if gpu else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = {k: r.get(f"{k}_s") for k in ("ours", "eager", "compile")}
        cells = [r["op"], str(r["n"]), str(r["v"]), str(r["rank"])]
        cells += [f"{ms[k] * 1e3:.2f}" if ms[k] else r.get(f"{k}_error", "–")[:40] for k in ms]
        for k in ("eager", "compile"):
            cells.append(f"{ms[k] / ms['ours']:.2f}x" if ms[k] and ms["ours"] else "–")
        cells.append(f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "–")
        cells += [
            fmt_bytes(r.get("ours_peak")),
            fmt_bytes(r.get("eager_peak")),
            fmt_bytes(r["output_bytes"]),
            f"{r['passes']} / {r['floor_passes']}",
            str(r["launches"]),
            fmt_bytes(r["moved_bytes"]),
        ]
        if gpu:
            cells += [f"{r['gbps']:.0f}" if r.get("gbps") else "–"]
            cells += [f"{r['roofline']:.0%}" if r.get("roofline") else "–"]
            cells += [f"{r['of_floor']:.0%}" if r.get("of_floor") else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, op in zip(axes, ("purify", "train"), strict=True):
        sel = [r for r in rows if r["op"] == op]
        labels = [f"N={r['n']}\nV={r['v'] // 1000}k\nr={r['rank']}" for r in sel]
        x = range(len(sel))
        for i, impl in enumerate(("ours", "eager", "compile")):
            speed = [r["n"] / r[f"{impl}_s"] if r.get(f"{impl}_s") else 0 for r in sel]
            ax.bar([xi + (i - 1) * 0.27 for xi in x], speed, width=0.27, label=impl)
        ax.set_yscale("log")
        ax.set_xticks(list(x), labels, fontsize=6)
        ax.set_ylabel("rows per second (log)")
        ax.set_title(op)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip CPU peak-memory processes")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.cpu_count()} cores"
    if device == "cuda":
        name += f"; device-to-device copy {copy_bandwidth() / 1e9:,.0f} GB/s (read + write)"
    tag = "gpu" if device == "cuda" else "cpu"
    rows = []
    for case in tqdm(cases(args.full, args.quick, device == "cuda"), desc="bench"):
        rows.append(measure(case, device, args.repeats, not args.no_memory))
        # written after every case: a run cut short keeps what it measured
        text = f"Device: {name}; torch {torch.__version__}\n\n{table(rows, device)}\n"
        (HERE / f"results_{tag}.md").write_text(text)
        info = {"device": name, "rows": rows}
        (HERE / f"results_{tag}.json").write_text(json.dumps(info, indent=1))
    print(text)
    plot(rows, HERE / f"results_{tag}.png")


if __name__ == "__main__":
    main()

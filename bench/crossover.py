"""Where the kernels start beating the torch twin on a GPU: the routing threshold.

    python bench/crossover.py [--out crossover.json]    # CUDA (not yet run; gpu.sh allows 90 s)
    python bench/crossover.py --smoke                   # CPU wiring check (interpreter)

``cmiguard.kernels.TWIN_MAX_LOGITS`` sends CUDA inputs of at most that many
logits to the torch twin, the rest to the Triton kernels. For purify (fp32
log-probs) and a training step at rank 64, V = 49,152 and 151,936 and N from
1 to 4,096, this times the kernels (``CMIGUARD_BACKEND=triton``), the twin
(``=torch``) and eager torch side by side, and prints per op and V the
smallest N·V where the kernels win, next to the threshold in force. Decode
batches are also timed with their CUDA graphs off (``kernels_nograph_s``,
up to 64 rows), for ``GRAPH_MAX_ROWS``, and purify is timed on the kernels
with the same factors centred (``kernels_centred_s``): the projection then
takes a second product, ``mA``, which compiled for sm_90 spills more
(bench/RESULTS.md), at a speed no GPU has measured.
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
import cmiguard  # noqa: E402
from bench.problems import Case, implementations, make_inputs  # noqa: E402
from bench.report import sweep_clock, time_or_none  # noqa: E402

# decode batches (DECODE_MAX_ROWS): timed with their graphs on and off
DECODE_ROWS = 64
ROWS = (1, 16, 64, 128, 256, 512, 1024, 2048, 4096)  # at 8192 the kernels win (RESULTS.md)
VOCABS = (49_152, 151_936)


def measure(case: Case, device: str) -> dict:
    """One shape's times; a backend that fails is printed and timed as None
    (a lease may not allow the sweep to be run again)."""
    z, labels, t = make_inputs(case, device)
    impls = implementations(case, z, labels, t)
    clock = sweep_clock(device)

    def timer(fn) -> float | None:
        backend = os.environ.get("CMIGUARD_BACKEND")
        return time_or_none(clock, fn, f"{case.op} N={case.n} V={case.v} {backend}")

    row = {"op": case.op, "n": case.n, "v": case.v}
    for name, backend in (("kernels", "triton"), ("twin", "torch")):
        os.environ["CMIGUARD_BACKEND"] = backend
        row[f"{name}_s"] = timer(impls["ours"])
    if case.op == "purify":
        os.environ["CMIGUARD_BACKEND"] = "triton"
        if case.n <= DECODE_ROWS:
            os.environ["CMIGUARD_CUDA_GRAPHS"] = "0"
            row["kernels_nograph_s"] = timer(impls["ours"])
            del os.environ["CMIGUARD_CUDA_GRAPHS"]
        centred = cmiguard.LowRankTransform(case.v, case.rank, centered=True).to(device)
        centred.load_state_dict(t.state_dict())
        row["kernels_centred_s"] = timer(implementations(case, z, labels, centred)["ours"])
    row["eager_s"] = timer(impls["eager"])
    return row


def crossovers(rows: list[dict]) -> list[dict]:
    """Per (op, V): the smallest N from which the kernels beat the twin at every larger N."""
    out = []
    for op in dict.fromkeys(r["op"] for r in rows):
        for v in dict.fromkeys(r["v"] for r in rows):
            sel = sorted((r for r in rows if (r["op"], r["v"]) == (op, v)), key=lambda r: r["n"])
            wins = [
                bool(r["kernels_s"] and r["twin_s"] and r["kernels_s"] < r["twin_s"]) for r in sel
            ]
            first = next((i for i in range(len(sel)) if all(wins[i:])), None)
            n = sel[first]["n"] if first is not None else None
            out.append({"op": op, "v": v, "n": n, "logits": n * v if n else None})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("crossover.json"))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
        device, ns, vocabs = "cpu", (1, 17), (1000,)
    elif torch.cuda.is_available():
        device, ns, vocabs = "cuda", ROWS, VOCABS
    else:
        raise SystemExit("needs a CUDA device (or --smoke for a CPU wiring check)")
    from cmiguard.kernels import TWIN_MAX_LOGITS

    work = [Case(op, n, v, 64) for op in ("purify", "train") for v in vocabs for n in ns]
    rows = []
    for case in tqdm(work, desc="shapes"):
        rows.append(measure(case, device))
        args.out.write_text(json.dumps({"rows": rows}, indent=1))
    found = crossovers(rows)
    args.out.write_text(json.dumps({"rows": rows, "crossovers": found}, indent=1))
    head = "| op | N | V | kernels ms | twin ms | eager ms | twin/kernels | kernels, no graph ms |"
    print(head + " kernels, centred ms |")
    print("|---" * 9 + "|")
    for r in rows:
        ms = [r[f"{k}_s"] * 1e3 if r[f"{k}_s"] else None for k in ("kernels", "twin", "eager")]
        cells = [r["op"], str(r["n"]), str(r["v"]), *(f"{m:.3f}" if m else "failed" for m in ms)]
        ratio = f"{ms[1] / ms[0]:.2f}x" if ms[0] and ms[1] else "—"
        extra = [
            f"{r[k] * 1e3:.3f}" if r.get(k) else "—"
            for k in ("kernels_nograph_s", "kernels_centred_s")
        ]
        print("| " + " | ".join([*cells, ratio, *extra]) + " |")
    print(f"\nthreshold in force: TWIN_MAX_LOGITS = {TWIN_MAX_LOGITS:,} logits")
    for c in found:
        where = f"N >= {c['n']} ({c['logits']:,} logits)" if c["n"] else "nowhere measured"
        print(f"{c['op']} V={c['v']}: kernels beat the twin from {where}")


if __name__ == "__main__":
    main()

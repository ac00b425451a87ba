"""What purifying a ``datasets.Dataset`` of stored logits costs over the
transform itself, side by side in one run.

    python bench/purify_dataset.py [--rows 2048] [--vocab 49152] [--rank 64]

Three ways over the same float32 rows (median of ``--repeats`` after a
warm-up, ``bench/report.py``'s ``time_cpu``): ``purify`` on
one tensor (the floor: no dataset), ``purify_dataset`` (NumPy blocks), and a
``dataset.map`` that goes through Python lists (``torch.tensor(rows)``, then
``.tolist()``: what ``purify_dataset`` did before 2026-12-07). Writes
``bench/results_purify_dataset.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import time_cpu  # noqa: E402
from cmiguard import LowRankTransform, purify, purify_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default=str(Path(__file__).with_name("results_purify_dataset.json"))
    )
    args = parser.parse_args()
    datasets.disable_progress_bars()
    gen = torch.Generator().manual_seed(0)
    transform = LowRankTransform(args.vocab, args.rank)
    with torch.no_grad():
        transform.b.normal_(0, 0.01, generator=gen)
    logits = torch.randn(args.rows, args.vocab, generator=gen) * 3
    table = datasets.Dataset.from_dict({"logits": logits.numpy()})

    def through_lists(batch: dict) -> dict:
        rows = torch.tensor(batch["logits"], dtype=torch.float32)
        return {"logits": purify(rows, transform, output="logprobs").tolist()}

    ways = {
        "purify (one tensor)": lambda: purify(logits, transform, output="logprobs"),
        "purify_dataset": lambda: purify_dataset(
            table, transform, batch_size=args.batch_size, progress=False
        ),
        "map through Python lists": lambda: table.map(
            through_lists, batched=True, batch_size=args.batch_size
        ),
    }
    seconds = {way: time_cpu(fn, args.repeats, min_seconds=0) for way, fn in ways.items()}
    floor = seconds["purify (one tensor)"]
    rows = [
        {"way": way, "s": s, "rows_per_s": args.rows / s, "over_floor": s / floor}
        for way, s in seconds.items()
    ]
    result = {
        "device": f"CPU, {torch.get_num_threads()} threads ({platform.machine()})",
        "torch": torch.__version__,
        "datasets": datasets.__version__,
        "rows": args.rows,
        "vocab": args.vocab,
        "rank": args.rank,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "timing": "median of the repeats, after a warm-up call",
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("| way | s | rows/s | x the floor |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['s']:.2f} | {r['rows_per_s']:,.0f} | {r['over_floor']:.1f} |")


if __name__ == "__main__":
    main()

"""Seed spread of the evaluation.

    python experiments/evaluation_seeds.py runs/full runs/seed1 runs/seed2

Each folder is a ``cmiguard evaluate --seed S --out FOLDER`` run; prints the
gap closed per seed with its mean ± sd (markdown) for what all runs share.
"""

import argparse
import json
from pathlib import Path

from cmiguard.attack.report import seed_table

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, help="cmiguard evaluate --out folders")
    args = parser.parse_args()
    missing = [str(p) for p in args.runs if not (p / "evaluation.json").is_file()]
    if missing:
        parser.error(f"no evaluation.json in {', '.join(missing)}")
    print(seed_table([json.loads((p / "evaluation.json").read_text()) for p in args.runs]))

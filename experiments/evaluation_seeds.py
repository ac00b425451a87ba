"""Seed spread of the evaluation.

    python experiments/evaluation_seeds.py runs/full runs/seed1 runs/seed2


Each folder is a ``cmiguard evaluate --seed S --out FOLDER`` run; prints the
gap closed per seed with its mean ± sd (markdown) for what all runs share.
"""

import json
import sys
from pathlib import Path

from cmiguard.attack.report import seed_table

if __name__ == "__main__":
    runs = [json.loads((Path(p) / "evaluation.json").read_text()) for p in sys.argv[1:]]
    print(seed_table(runs))

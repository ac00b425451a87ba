"""Every defense on the plane where users and attackers meet.

    python experiments/frontier.py --seeds 0,1 --out experiments/results/frontier \\
        --cmiguard LABEL=runs/.../transform.safetensors ...

Each baseline family over its knob (temperature τ ∈ {1.5, 2, 3.24, 10}, top-k
k ∈ {1, 5, 20}, noise σ ∈ {0.25, 0.5, 1, 2, 4}) and each learned transform given
(``cmiguard@LABEL``), against forward KL, reverse KL, the blind re-temperer
(with forward and with reverse KL) and the blind inverse (``--attacks``), at
four times the default student budget (384 calibration articles, 128
held-out, 240 steps), students in bf16 autocast.
x = users' log-likelihood accuracy on the held-out capital questions, y =
gap closed under the strongest attacker against the SFT floor and the top-1
student. Writes ``OUT/seed<S>/evaluation.*`` after every student (a rerun
resumes, and may add points or seeds) and ``OUT/frontier.{md,json,png}`` after
every seed; ``--report`` rewrites the frontier from the students so far (a
stopped run's whole columns). The learned transforms run first, then the
baselines nearest them in users' accuracy.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from cmiguard.attack.evaluation import ATTACKS, EvalConfig
from cmiguard.attack.frontier import FRONTIER_ATTACKS, report_frontier, run_frontier
from cmiguard.checkpoint import load_transform, vocab_fingerprint
from cmiguard.train.data import capital_choices, choice_questions, text_examples, wiki_summaries
from cmiguard.train.models import load_teacher

# around the learned points' users' accuracy first (measured 0.77-0.90), so
# that a stopped run has the comparisons that decide the verdict
BASELINES = (
    "top_k@20",
    "soften@1.5",
    "noise@1",
    "noise@0.5",
    "noise@0.25",
    "top_k@5",
    "soften@2",
    "top_k@1",
    "soften@3.24",
    "soften@10",
    # the noise curve down past cmi30's users' accuracy (0.766; noise@1 stops at 0.84)
    "noise@2",
    "noise@4",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--out", type=Path, default=Path("experiments/results/frontier"))
    parser.add_argument("--cmiguard", action="append", default=[], metavar="LABEL=PATH")
    parser.add_argument("--baselines", default=",".join(BASELINES))
    parser.add_argument("--articles", type=int, default=384)
    parser.add_argument("--heldout-articles", type=int, default=128)
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument(
        "--attacks",
        default=",".join(FRONTIER_ATTACKS),
        help="the attacks y is the strongest of (a point needs every one on every seed)",
    )
    parser.add_argument("--report", action="store_true", help="rewrite frontier.* only")
    parser.add_argument(
        "--report-to", type=Path, help="with --report: write frontier.* here (default --out)"
    )
    args = parser.parse_args()
    if args.report_to is not None and not args.report:
        parser.error("--report-to only applies with --report")
    # the command that makes the students; a subset's report names itself
    keep = args.report_to is not None
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv if keep or a != "--report")
    seeds = [int(s) for s in args.seeds.split(",")]
    attacks = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        parser.error(
            f"--attacks: unknown {unknown or 'none given'}; choose from {', '.join(ATTACKS)}"
        )
    if args.report:
        report_frontier(args.out, seeds, command, args.report_to, attacks)
        print(((args.report_to or args.out) / "frontier.md").read_text())
        return 0
    teacher, tokenizer = load_teacher()
    transforms = {}
    for item in args.cmiguard:
        label, _, path = item.partition("=")
        transforms[f"cmiguard@{label}"] = load_transform(
            path, teacher.config.vocab_size, vocab_fingerprint(tokenizer)
        )
    baselines = [b for b in args.baselines.split(",") if b]
    calibration = text_examples(tokenizer, wiki_summaries("calibration", args.articles), 64)
    heldout = text_examples(tokenizer, wiki_summaries("heldout", args.heldout_articles), 64)
    run_frontier(
        teacher,
        transforms,
        calibration,
        heldout,
        tokenizer.pad_token_id,
        EvalConfig(steps=args.steps, autocast=True),
        seeds,
        [*transforms, *baselines],
        args.out,
        choice_questions(tokenizer, capital_choices("heldout")),
        command,
        attacks,
    )
    print((args.out / "frontier.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``cmiguard evaluate``: students distilled from the raw and the defended teacher."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from cmiguard.cli.options import DATA_HELP, at_least_one, existing, folder, model_args


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cmiguard.attack.defenses import parse
    from cmiguard.attack.evaluation import ATTACKS, QUICK_ATTACKS, EvalConfig, evaluate
    from cmiguard.checkpoint import load_transform, read_metadata, vocab_fingerprint
    from cmiguard.train.corpus import load_examples
    from cmiguard.train.data import capital_choices, choice_questions, text_examples, wiki_summaries
    from cmiguard.train.demo import DemoConfig, run_demo
    from cmiguard.train.models import context_window, load_model

    # every name and file is checked before the model loads and a demo transform trains
    out = Path(args.out)
    labelled = _labelled(args.cmiguard)  # label -> path: further learned defenses
    for path in [*([args.transform] if args.transform else []), *labelled.values()]:
        read_metadata(path)
    articles, held, steps = (
        (24, 8, 20) if args.quick else (args.articles, args.heldout_articles, args.steps)
    )
    config = EvalConfig(steps=steps, seed=args.seed, autocast=args.autocast, progress=not args.json)
    if args.quick:  # a smoke run inside 10 minutes on 2 cores, not a finding
        config.attacks, config.defenses = QUICK_ATTACKS, ("no_defense", "cmiguard", "sharpen@0.5")
        config.batch_size = 4
    if args.attacks:
        config.attacks = tuple(_known(args.attacks, ATTACKS, "attack"))
    if args.defenses:
        config.defenses = tuple(d.strip() for d in args.defenses.split(",") if d.strip())
    config.defenses = tuple(dict.fromkeys([*config.defenses, *(f"cmiguard@{k}" for k in labelled)]))
    for name in config.defenses:
        family, knob = parse(name)
        if family == "cmiguard" and knob is not None and knob not in labelled:
            raise ValueError(f"defense {name!r} needs --cmiguard {knob}=PATH")

    teacher, tokenizer = load_model(args.model, args.dtype)
    choices = []
    if args.data:  # a provider's rows, read before a demo transform trains: students learn on
        # one share and are scored on the other
        calibration, heldout = load_examples(
            args.data, tokenizer, 64, context=context_window(teacher)
        )  # train's split
        if not heldout:
            raise ValueError(f"{args.data}: no held-out rows to score students on")
    else:
        calibration = text_examples(tokenizer, wiki_summaries("calibration", articles), 64)
        heldout = text_examples(tokenizer, wiki_summaries("heldout", held), 64)
        choices = choice_questions(tokenizer, capital_choices("heldout"))
    if args.transform is None:
        args.transform = out / "transform.safetensors"
        if not args.transform.exists():  # a resumed run keeps the transform it started with
            run_demo(DemoConfig(), out_dir=out, progress=not args.json, model=(teacher, tokenizer))
    fingerprint = vocab_fingerprint(tokenizer)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    transforms = {"cmiguard": load_transform(args.transform, vocab, fingerprint)}
    for label, path in labelled.items():
        transforms[f"cmiguard@{label}"] = load_transform(path, vocab, fingerprint)
    results = evaluate(
        teacher, transforms, calibration, heldout, tokenizer.pad_token_id, config, out, choices
    )
    if args.json:
        print(json.dumps(results))
    else:
        print((out / "evaluation.md").read_text())
    return 0


def _labelled(items: Sequence[str]) -> dict[str, str]:
    """``--cmiguard LABEL=PATH`` items as ``{label: path}``."""
    labelled: dict[str, str] = {}
    for item in items:
        label, _, path = item.partition("=")
        if not (label and path):
            raise ValueError(f"--cmiguard takes LABEL=PATH, got {item!r}")
        # --defenses splits on ',' and '@': such a label could never be named there
        if "," in label or "@" in label:
            raise ValueError(f"--cmiguard label {label!r} may not hold ',' or '@'")
        if labelled.get(label, path) != path:
            raise ValueError(f"--cmiguard {label} is given twice: {labelled[label]} and {path}")
        labelled[label] = path
    return labelled


def _known(names: str, known: Sequence[str], what: str) -> list[str]:
    """The comma-separated ``names``, each one of ``known``."""
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


def register(sub: argparse._SubParsersAction) -> None:
    """evaluate and its options."""
    p = sub.add_parser("evaluate", help="distil students with each attack, raw vs defended")
    model_args(p)
    p.add_argument("--data", type=existing, default=None, help=DATA_HELP)
    p.add_argument("--transform", default=None, help="default: train one as the demo does")
    p.add_argument("--quick", action="store_true", help="3 attacks x 3 defenses, small data")
    # 96 articles seen 5 times: the regime where KD measurably beats SFT (a
    # query-limited attacker); with 192 seen 2.5 times SFT matched forward KL
    p.add_argument(
        "--articles",
        type=at_least_one,
        default=96,
        help="Wikipedia summaries the students learn on",
    )
    p.add_argument(
        "--heldout-articles",
        type=at_least_one,
        default=32,
        help="held-out summaries they are scored on",
    )
    p.add_argument("--steps", type=at_least_one, default=60, help="training steps per student")
    p.add_argument("--seed", type=int, default=0, help="the students' initialisation and row order")
    p.add_argument("--attacks", default=None, help="comma-separated subset (default: all)")
    p.add_argument(
        "--defenses",
        default=None,
        help="comma-separated family[@knob] (default: no_defense, cmiguard and one point of "
        "each baseline); families: no_defense, cmiguard, soften, sharpen, top_k, noise",
    )
    p.add_argument(
        "--cmiguard",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="a further learned transform, evaluated as defense cmiguard@LABEL (repeatable)",
    )
    p.add_argument(
        "--autocast", action="store_true", help="students in bf16 autocast (faster on CPUs with it)"
    )
    p.add_argument(
        "--out", type=folder, default="runs/evaluate", help="a rerun into the same folder resumes"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

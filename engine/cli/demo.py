"""``cmiguard demo``: train on the real teacher and print the held-out table."""

from __future__ import annotations

import argparse
import json

from cmiguard.cli.options import at_least_one, bundled_data_args, folder, model_args


def cmd_demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cmiguard.train.demo import DemoConfig, default_train_config, run_demo
    from cmiguard.train.models import load_model

    train = default_train_config()
    config = DemoConfig(
        calibration_articles=args.articles,
        heldout_articles=args.heldout_articles,
        questions=args.questions,
        surrogate_steps=args.surrogate_steps,
        train=replace(train, epochs=args.epochs or train.epochs),
    )
    model = load_model(args.model, args.dtype)
    metrics = run_demo(config, out_dir=args.out, progress=not args.json, model=model)
    if args.json:
        print(json.dumps(metrics))
    else:
        print_table(metrics)
    return 0


def print_table(metrics: dict[str, float]) -> None:
    rows = [
        ("multiple-choice accuracy", "teacher_accuracy_raw", "teacher_accuracy_purified"),
        ("next-token accuracy", "next_token_accuracy_raw", "next_token_accuracy_purified"),
        ("CMI, all rows (nats)", "cmi_raw", "cmi_purified"),
        ("CMI re-tempered (nats)", "cmi_raw_retempered", "cmi_purified_retempered"),
    ]
    print(f"| {'held-out metric':<26} | {'raw':>8} | {'purified':>8} |")
    print(f"|{'-' * 28}|{'-' * 10}|{'-' * 10}|")
    for name, raw, pur in rows:
        print(f"| {name:<26} | {metrics[raw]:>8.4f} | {metrics[pur]:>8.4f} |")
    print(f"\ntop-1 agreement purified vs raw: {metrics['top1_agreement']:.4f}")
    print(f"the seed's cosine on held-out rows: {metrics['misalignment_cos_heldout']:.4f}")
    print(f"served at temperature {metrics['temperature']:g}, guard {metrics['guard_margin']}")
    print(f"selected step {metrics['selected_step']} of {metrics['steps']}")
    print(f"purify throughput: {metrics['purify_tokens_per_s']:.0f} rows/s (CPU path)")
    print(f"total time: {metrics['seconds']:.1f} s")


def register(sub: argparse._SubParsersAction) -> None:
    """demo and its options."""
    p = sub.add_parser("demo", help="train on the real teacher and print held-out metrics")
    model_args(p)
    bundled_data_args(p)
    p.add_argument("--heldout-articles", type=at_least_one, default=32, help="held-out summaries")
    p.add_argument("--epochs", type=at_least_one, default=None, help="default: the measured best's")
    p.add_argument(
        "--surrogate-steps",
        type=at_least_one,
        default=60,
        help="the surrogate student's distillation steps",
    )
    p.add_argument("--out", type=folder, default=None, help="also save the transform here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)

"""``cmiguard train``: a transform for a model, on the bundled rows or a provider's."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from cmiguard.cli.options import (
    DATA_HELP,
    DEVICE_HELP,
    at_least,
    at_least_one,
    bundled_data_args,
    existing,
    folder,
    model_args,
    resolve_device,
)
from cmiguard.train.objectives import UTILITIES
from cmiguard.train.trainer import OBJECTIVES, TrainConfig
from cmiguard.transforms import FAMILIES, INITS


def _train_args(p: argparse.ArgumentParser) -> None:
    """Every :class:`TrainConfig` field, defaulting to the demo's measured best."""
    from cmiguard.train.demo import default_train_config

    d = default_train_config()
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default=d.objective,
        help="paper: the utility plus lam x the gradient cosine against a surrogate student "
        "(the seed's); cmi: the direct CMI + CE (+ KL) objective",
    )
    p.add_argument(
        "--family",
        choices=FAMILIES,
        default=d.family,
        help="lowrank: z + (zA)B^T; diag_lowrank: z*d + (zA)B^T + b; dense: zW^T + b (small "
        "vocabularies only)",
    )
    p.add_argument("--rank", type=int, default=d.rank, help="columns of the factors A and B")
    # None: the low-rank families start as the demo does; dense has no factors to start
    p.add_argument(
        "--init",
        choices=INITS,
        default=None,
        help="which low-rank factor starts at zero: lora (B) or seed (A: the seed's (I + AB)z) "
        f"(default: {d.init})",
    )
    p.add_argument(
        "--init-scale",
        type=float,
        default=None,
        help=f"random start of the zero factor (default: {d.init_scale:g})",
    )
    p.add_argument(
        "--guard-margin",
        type=float,
        default=d.guard_margin,
        help="keep each row's raw argmax on top by this margin",
    )
    p.add_argument(
        "--no-guard",
        dest="guard_margin",
        action="store_const",
        const=None,
        help="no argmax guard (a guarded transform cannot be folded into an LM head)",
    )
    p.add_argument(
        "--utility",
        choices=UTILITIES,
        default=d.utility,
        help="paper: what keeps the answers: ce (the labels), ce_correct (the labels where "
        "the teacher is right), teacher_ce (the teacher's argmax), kl (the raw distribution)",
    )
    p.add_argument(
        "--factor-dtype",
        choices=("bfloat16",),
        default=d.factor_dtype,
        help="the kernels read the low-rank factors in bf16 (fp32 masters are trained)",
    )
    p.add_argument(
        "--centered",
        action="store_true",
        help="lowrank: read each row less the mean of its unmasked entries, so the map "
        "is shift-invariant and purifies stored log-probs as it does logits",
    )
    p.add_argument(
        "--epochs", type=at_least_one, default=d.epochs, help="passes over the training rows"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument(
        "--lr", type=float, default=d.lr, help="AdamW's peak rate (warm-up, then cosine to 0)"
    )
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW's")
    p.add_argument("--warmup", type=float, default=d.warmup, help="share of steps in lr warm-up")
    p.add_argument(
        "--cos-warmup", type=int, default=d.cos_warmup, help="first steps on the utility alone"
    )
    p.add_argument("--lam", type=float, default=d.lam, help="paper: weight of the cosine")
    p.add_argument("--lambda-cmi", type=float, default=d.lambda_cmi, help="cmi: CMI weight")
    p.add_argument("--lambda-ce", type=float, default=d.lambda_ce, help="cmi: utility weight")
    p.add_argument(
        "--lambda-kl", type=float, default=d.lambda_kl, help="cmi: weight of KL(raw || purified)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help="the transform serves softmax(T(z)/temperature); 1 keeps the teacher's confidence",
    )
    p.add_argument(
        "--estimator",
        choices=("exact", "streaming"),
        default=d.estimator,
        help="cmi: per-label centroids of the batch (exact) or a moving average (streaming)",
    )
    p.add_argument(
        "--select-every",
        type=int,
        default=d.select_every,
        help="score on the validation rows every this many steps (0: each epoch's end) and "
        "keep the best admissible transform",
    )
    p.add_argument(
        "--seed", type=int, default=d.seed, help="the initial transform, row order and data split"
    )


def _config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` fields the command line sets (same names)."""
    from cmiguard.train.demo import default_train_config

    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    start = default_train_config()
    for name in ("init", "init_scale"):  # not given: the demo's start, or dense's none
        if values.get(name) is None:
            values.pop(name, None)
            if values["family"] != "dense":
                values[name] = getattr(start, name)
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from cmiguard.checkpoint import vocab_fingerprint
    from cmiguard.train.corpus import load_examples, split_validation
    from cmiguard.train.demo import DemoConfig, demo_data
    from cmiguard.train.models import context_window, load_model
    from cmiguard.train.surrogate import make_surrogate
    from cmiguard.train.trainer import train

    device = resolve_device(args.device)  # a bad one fails before the teacher loads
    config = _config(args)
    held = (Path(args.out) / "checkpoint.pt").exists()
    if held and not args.resume:
        raise ValueError(
            f"{args.out} holds a training run (checkpoint.pt): --resume continues it; to start "
            "over, choose another --out or delete it"
        )
    if args.resume and not held:  # a mistyped --out would otherwise start over unsaid
        print(f"no checkpoint in {args.out}: starting a new run", file=sys.stderr)
    teacher, tokenizer = load_model(args.model, args.dtype, device)
    if args.data:  # a provider's rows: the held-out ones stay unseen (evaluate scores on them;
        # their split is the same for every --seed, so train's and evaluate's agree)
        calibration, _ = load_examples(
            args.data, tokenizer, args.max_tokens, context=context_window(teacher)
        )
        examples, validation = split_validation(calibration, seed=args.seed)
    else:
        data = DemoConfig(
            calibration_articles=args.articles,
            validation_articles=args.validation_articles,
            max_tokens=args.max_tokens,
            questions=args.questions,
        )
        examples, validation = demo_data(tokenizer, data)
    surrogate = None
    if config.objective == "paper":
        surrogate = make_surrogate(
            teacher, examples, tokenizer.pad_token_id, args.surrogate_layers, args.surrogate_steps
        )
    result = train(
        config,
        teacher,
        examples,
        tokenizer.pad_token_id,
        surrogate=surrogate,
        out_dir=args.out,
        resume=args.resume,
        stop_after=args.stop_after,
        validation=validation,
        fingerprint=vocab_fingerprint(tokenizer),
    )
    last = result.history[-1] if result.history else {}
    summary = {"steps": len(result.history), "selected_step": result.selected_step, "last": last}
    summary["examples"] = {"train": len(examples), "validation": len(validation)}
    print(json.dumps(summary))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """train and every TrainConfig field as an option."""
    p = sub.add_parser("train", help="train a transform for a model (default: the bundled teacher)")
    model_args(p)
    p.add_argument("--data", type=existing, default=None, help=DATA_HELP)
    _train_args(p)
    bundled_data_args(p)
    p.add_argument(
        "--validation-articles",
        type=at_least(0),
        default=16,
        help="later calibration summaries held out for the selection rule (with a fifth of "
        "the calibration questions)",
    )
    p.add_argument(
        "--max-tokens", type=at_least_one, default=64, help="tokens per row (longer ones are cut)"
    )
    p.add_argument(
        "--surrogate-layers", type=at_least_one, default=4, help="the surrogate student's blocks"
    )
    p.add_argument(
        "--surrogate-steps", type=at_least_one, default=60, help="its distillation steps"
    )
    p.add_argument(
        "--out",
        type=folder,
        required=True,
        help="folder for checkpoint.pt and transform.safetensors",
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--stop-after", type=at_least_one, default=None, help="stop after this many steps"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_train)

"""``cmiguard fold`` (a transform into a model's LM head) and ``export-teacher``."""

from __future__ import annotations

import argparse
from pathlib import Path

from cmiguard.cli.options import folder, model_args


def cmd_fold(args: argparse.Namespace) -> int:
    from cmiguard.checkpoint import (
        atomic_directory,
        load_transform,
        read_metadata,
        vocab_fingerprint,
    )
    from cmiguard.fold import fold_into_lm_head
    from cmiguard.train.models import load_model

    read_metadata(args.transform)  # a wrong path or a corrupt file fails before the model loads
    if Path(args.out).resolve() == Path(args.model).resolve():
        raise ValueError(f"--out {args.out} is the model's own directory: choose another folder")
    model, tokenizer = load_model(args.model, args.dtype, need_tokenizer=False)
    rows = model.get_output_embeddings().weight.shape[0]
    # without a tokenizer only the vocabulary size can be checked
    fingerprint = vocab_fingerprint(tokenizer) if tokenizer is not None else None
    transform = load_transform(args.transform, vocab_size=rows, vocab_fingerprint=fingerprint)
    fold_into_lm_head(model, transform)
    # written whole or not at all: a folded checkpoint half on disk would serve raw logits
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    print(f"folded model written to {args.out}")
    return 0


def cmd_export_teacher(args: argparse.Namespace) -> int:
    from cmiguard.checkpoint import atomic_directory
    from cmiguard.train.models import load_teacher

    model, tokenizer = load_teacher()
    with atomic_directory(args.out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"SmolLM2-135M-Instruct written to {args.out} (a plain Hugging Face directory)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """fold and export-teacher, and their options."""
    p = sub.add_parser("fold", help="fold a transform into a model's LM head and save it")
    model_args(p)
    p.add_argument(
        "--transform", required=True, help="a transform file written by train (without a guard)"
    )
    p.add_argument("--out", type=folder, required=True, help="the folded model's directory")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser(
        "export-teacher", help="write the bundled teacher as a plain Hugging Face model directory"
    )
    p.add_argument("out", type=folder, help="the directory to write")
    p.set_defaults(func=cmd_export_teacher)

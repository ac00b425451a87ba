"""The cmiguard command line: train a transform, purify stored logits, fold a
transform into a model, serve purified logprobs, evaluate a defense against
distillation attacks, and run the demo."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from cmiguard.train.objectives import UTILITIES
from cmiguard.train.trainer import OBJECTIVES, TrainConfig
from cmiguard.transforms import FAMILIES, INITS

if TYPE_CHECKING:
    import torch


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
    p.add_argument(
        "--init",
        choices=INITS,
        default=d.init,
        help="which low-rank factor starts at zero: lora (B) or seed (A: the seed's (I + AB)z)",
    )
    p.add_argument(
        "--init-scale", type=float, default=d.init_scale, help="random start of the zero factor"
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
        "--epochs", type=_at_least_one, default=d.epochs, help="passes over the training rows"
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
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from cmiguard.checkpoint import vocab_fingerprint
    from cmiguard.train.corpus import load_examples, split_validation
    from cmiguard.train.demo import DemoConfig, demo_data
    from cmiguard.train.models import load_model
    from cmiguard.train.surrogate import make_surrogate
    from cmiguard.train.trainer import train

    device = _device(args.device)  # a bad one fails before the teacher loads
    config = _config(args)
    if not args.resume and (Path(args.out) / "checkpoint.pt").exists():
        raise ValueError(
            f"{args.out} holds a training run (checkpoint.pt): --resume continues it; to start "
            "over, choose another --out or delete it"
        )
    teacher, tokenizer = load_model(args.model, args.dtype, device)
    if args.data:  # a provider's rows: the held-out ones stay unseen (evaluate scores on them;
        # their split is the same for every --seed, so train's and evaluate's agree)
        calibration, _ = load_examples(args.data, tokenizer, args.max_tokens)
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


def _device(name: str) -> torch.device:
    """``auto``: the GPU when there is one (where the fused kernels run), else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device


def cmd_purify(args: argparse.Namespace) -> int:
    import torch

    from cmiguard.checkpoint import load_transform
    from cmiguard.purify import purify
    from cmiguard.shards import LogitsShard, write_streamed

    device = _device(args.device)
    transform = load_transform(args.transform).to(device)

    def purified(block: torch.Tensor, top_k: int | None = None):
        out = purify(block.to(device), transform, args.temperature, args.output, top_k)
        return tuple(t.cpu() for t in out) if top_k else out.cpu()

    out_dir = Path(args.out)
    shards = [LogitsShard(p, args.key) for p in args.inputs]
    # every shard checked before any is written: a bad one late in the list costs nothing
    names = [s.path.name for s in shards]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"inputs share file names {twice}: their outputs in {out_dir} would clash")
    for shard in shards:
        if (out_dir / shard.path.name).resolve() == shard.path.resolve():
            raise ValueError(f"--out {out_dir} would overwrite the input {shard.path}")
        if shard.shape[1] != transform.vocab_size:
            raise ValueError(
                f"{shard.path} has vocab {shard.shape[1]}, the transform vocab_size="
                f"{transform.vocab_size}"
            )
    total = sum(s.shape[0] for s in shards)
    bar = tqdm(total=total, unit="row", desc="purify")
    for shard in shards:
        target = out_dir / shard.path.name
        if args.top_k is not None:
            # values and ids are [N, k]: small, so both are written once the shard is done
            pairs = [purified(block, args.top_k) for block in shard.blocks(args.block_rows)]
            values = torch.cat([v for v, _ in pairs])
            ids = torch.cat([i for _, i in pairs])
            write_streamed(
                target,
                tuple(values.shape),
                values.dtype,
                iter([values]),
                extra={"ids": ids},
                on_block=bar.update,
                name="values",
            )
        else:
            blocks = (purified(b) for b in shard.blocks(args.block_rows))
            write_streamed(target, shard.shape, shard.dtype, blocks, on_block=bar.update)
    bar.close()
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(serve_app(args), host=args.host, port=args.port)
    return 0


def serve_app(args: argparse.Namespace) -> Any:
    """The app ``cmiguard serve`` runs, from its arguments."""
    import math
    import os

    from cmiguard.checkpoint import load_transform, read_metadata, vocab_fingerprint
    from cmiguard.serve.server import ServerConfig, create_app
    from cmiguard.train.models import load_model

    device = _device(args.device)
    if args.temperature is not None and not (
        args.transform and math.isfinite(args.temperature) and args.temperature >= 1e-3
    ):
        raise ValueError("--temperature needs --transform and a finite value >= 0.001")
    # built (and so checked) before the model loads: a bad limit fails at once
    config = ServerConfig(
        model_name=args.name,
        api_key=args.api_key or os.environ.get("CMIGUARD_API_KEY") or None,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
        echo=args.echo,
    )
    if bool(args.transform) == args.unprotected:
        raise ValueError(
            "--unprotected serves raw logits and --transform purifies them: pass one (a folded "
            "checkpoint is served with --unprotected)"
        )
    if args.transform:
        read_metadata(args.transform)
    template = _read_template(args.chat_template) if args.chat_template else None
    model, tokenizer = load_model(args.model, args.dtype, device)
    if template is not None:
        _set_chat_template(tokenizer, template, args.chat_template)
    transform = None
    if args.transform:
        rows = model.get_output_embeddings().weight.shape[0]
        transform = load_transform(
            args.transform, vocab_size=rows, vocab_fingerprint=vocab_fingerprint(tokenizer)
        ).to(device)
        if args.temperature is not None:
            transform.temperature = args.temperature
    return create_app(model, tokenizer, transform, config)


def _read_template(path: str) -> str:
    """A chat template file's text (read before the model loads)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--chat-template {path}: no such file")
    return Path(path).read_text(encoding="utf-8")


def _set_chat_template(tokenizer: Any, template: str, path: str) -> None:
    """Use ``template`` for chat, after rendering one message with it."""
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja raises its own types for a broken template
        raise ValueError(f"--chat-template {path} does not render a message: {exc}") from exc


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cmiguard.attack.defenses import parse
    from cmiguard.attack.evaluation import ATTACKS, QUICK_ATTACKS, EvalConfig, evaluate
    from cmiguard.checkpoint import load_transform, vocab_fingerprint
    from cmiguard.train.corpus import load_examples
    from cmiguard.train.data import capital_choices, choice_questions, text_examples, wiki_summaries
    from cmiguard.train.demo import DemoConfig, run_demo
    from cmiguard.train.models import load_model

    out = Path(args.out)
    teacher, tokenizer = load_model(args.model, args.dtype)
    if args.transform is None:
        args.transform = out / "transform.safetensors"
        if not args.transform.exists():  # a resumed run keeps the transform it started with
            run_demo(DemoConfig(), out_dir=out, progress=not args.json, model=(teacher, tokenizer))
    fingerprint = vocab_fingerprint(tokenizer)
    vocab = teacher.get_output_embeddings().weight.shape[0]
    transforms = {"cmiguard": load_transform(args.transform, vocab, fingerprint)}
    for item in args.cmiguard:  # label=path: a further learned defense, cmiguard@label
        label, _, path = item.partition("=")
        if not (label and path):
            raise ValueError(f"--cmiguard takes LABEL=PATH, got {item!r}")
        transforms[f"cmiguard@{label}"] = load_transform(path, vocab, fingerprint)
    articles, held, steps = (
        (24, 8, 20) if args.quick else (args.articles, args.heldout_articles, args.steps)
    )
    choices = []
    if args.data:  # a provider's rows: students learn on one share and are scored on the other
        calibration, heldout = load_examples(args.data, tokenizer, 64)  # train's split
        if not heldout:
            raise ValueError(f"{args.data}: no held-out rows to score students on")
    else:
        calibration = text_examples(tokenizer, wiki_summaries("calibration", articles), 64)
        heldout = text_examples(tokenizer, wiki_summaries("heldout", held), 64)
        choices = choice_questions(tokenizer, capital_choices("heldout"))
    config = EvalConfig(steps=steps, seed=args.seed, autocast=args.autocast, progress=not args.json)
    if args.quick:  # a smoke run inside 10 minutes on 2 cores, not a finding
        config.attacks, config.defenses = QUICK_ATTACKS, ("no_defense", "cmiguard", "sharpen@0.5")
        config.batch_size = 4
    if args.attacks:
        config.attacks = tuple(_known(args.attacks, ATTACKS, "attack"))
    if args.defenses:
        config.defenses = tuple(d.strip() for d in args.defenses.split(",") if d.strip())
    config.defenses = tuple(dict.fromkeys([*config.defenses, *transforms.keys() - {"cmiguard"}]))
    for name in config.defenses:
        parse(name)  # a bad name fails before any student trains
    results = evaluate(
        teacher, transforms, calibration, heldout, tokenizer.pad_token_id, config, out, choices
    )
    if args.json:
        print(json.dumps(results))
    else:
        print((out / "evaluation.md").read_text())
    return 0


def _known(names: str, known: Sequence[str], what: str) -> list[str]:
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise SystemExit(f"unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    return chosen


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


def _at_least_one(text: str) -> int:
    """An argparse type: a count that must be >= 1 (0 would mean 'off' by accident)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive(text: str) -> float:
    """An argparse type: a finite number > 0 (a temperature)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


DEVICE_HELP = "where to run: auto (cuda when there is a GPU, else cpu), cpu, cuda, cuda:1"
DATA_HELP = (
    "your rows instead of the bundled Wikipedia/geography ones: .jsonl, .json, .parquet, "
    ".csv or a saved datasets directory, with a 'text' column (next-token rows) or "
    "'prompt' and 'answer' columns (the answer teacher-forced); an optional 'split' column "
    "('heldout', 'test', 'validation' or 'eval' rows are held out, else a fixed hashed fifth); "
    "train never sees the held-out rows and selects on a --seed'ed fifth of the others"
)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default="teacher",
        help="a local Hugging Face causal-LM directory (safetensors or one .gguf), or "
        "'teacher' (the bundled SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the model's weights (bfloat16 halves the memory)",
    )


class _Help(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cmiguard", description=__doc__)
    with_defaults = partial(argparse.ArgumentParser, formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=with_defaults)

    p = sub.add_parser("train", help="train a transform for a model (default: the bundled teacher)")
    _model_args(p)
    p.add_argument("--data", default=None, help=DATA_HELP)
    _train_args(p)
    p.add_argument(
        "--articles", type=_at_least_one, default=96, help="calibration Wikipedia summaries"
    )
    p.add_argument(
        "--validation-articles",
        type=int,
        default=16,
        help="later calibration summaries held out for the selection rule (with a fifth of "
        "the calibration questions)",
    )
    p.add_argument(
        "--questions", type=int, default=None, help="calibration capital questions (default: all)"
    )
    p.add_argument(
        "--max-tokens", type=_at_least_one, default=64, help="tokens per row (longer ones are cut)"
    )
    p.add_argument(
        "--surrogate-layers", type=_at_least_one, default=4, help="the surrogate student's blocks"
    )
    p.add_argument(
        "--surrogate-steps", type=_at_least_one, default=60, help="its distillation steps"
    )
    p.add_argument(
        "--out", required=True, help="folder for checkpoint.pt and transform.safetensors"
    )
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--stop-after", type=_at_least_one, default=None, help="stop after this many steps"
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("purify", help="purify logits shards (.safetensors or .npy), streaming")
    p.add_argument("inputs", nargs="+", help="logits shards [rows, vocab]")
    p.add_argument("--transform", required=True, help="a transform file written by train")
    p.add_argument("--out", required=True, help="output folder (same file names)")
    p.add_argument("--key", default=None, help="tensor name in safetensors inputs")
    p.add_argument(
        "--output",
        choices=("logits", "logprobs"),
        default="logits",
        help="purified logits T(z)/temperature, or their log-softmax",
    )
    p.add_argument(
        "--top-k",
        type=_at_least_one,
        default=None,
        help="keep each row's k largest values ('values') and their token ids ('ids')",
    )
    p.add_argument(
        "--temperature", type=_positive, default=None, help="in place of the transform's own"
    )
    p.add_argument(
        "--block-rows",
        type=_at_least_one,
        default=1024,
        help="rows read, purified and written at a time",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_purify)

    p = sub.add_parser("fold", help="fold a transform into a model's LM head and save it")
    _model_args(p)
    p.add_argument(
        "--transform", required=True, help="a transform file written by train (without a guard)"
    )
    p.add_argument("--out", required=True, help="the folded model's directory")
    p.set_defaults(func=cmd_fold)

    p = sub.add_parser(
        "export-teacher", help="write the bundled teacher as a plain Hugging Face model directory"
    )
    p.add_argument("out", help="the directory to write")
    p.set_defaults(func=cmd_export_teacher)

    p = sub.add_parser("serve", help="OpenAI-compatible server with purified logprobs")
    _model_args(p)
    p.add_argument("--transform", default=None, help="transform applied to every step's logits")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="serve at this temperature instead of the transform's own (see docs/EVALUATION.md)",
    )
    p.add_argument(
        "--unprotected",
        action="store_true",
        help="serve without a transform (for a folded checkpoint, or to measure overhead)",
    )
    p.add_argument("--name", default="smollm2-135m-cmiguard", help="the model id clients ask for")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (or set CMIGUARD_API_KEY: not visible in ps)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting; past it a 429 (queue_full)"
    )
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts get a 400")
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="the largest max_tokens a request may ask"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--no-echo",
        dest="echo",
        action="store_false",
        help="refuse echo=true (with logprobs it scores any text teacher-forced)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions, in place of the tokenizer's "
        "(a base model has none)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("evaluate", help="distil students with each attack, raw vs defended")
    _model_args(p)
    p.add_argument("--data", default=None, help=DATA_HELP)
    p.add_argument("--transform", default=None, help="default: train one as the demo does")
    p.add_argument("--quick", action="store_true", help="3 attacks x 3 defenses, small data")
    # 96 articles seen 5 times: the regime where KD measurably beats SFT (a
    # query-limited attacker); with 192 seen 2.5 times SFT matched forward KL
    p.add_argument(
        "--articles",
        type=_at_least_one,
        default=96,
        help="Wikipedia summaries the students learn on",
    )
    p.add_argument(
        "--heldout-articles",
        type=_at_least_one,
        default=32,
        help="held-out summaries they are scored on",
    )
    p.add_argument("--steps", type=_at_least_one, default=60, help="training steps per student")
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
    p.add_argument("--out", default="runs/evaluate", help="a rerun into the same folder resumes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="train on the real teacher and print held-out metrics")
    _model_args(p)
    p.add_argument(
        "--articles", type=_at_least_one, default=96, help="calibration Wikipedia summaries"
    )
    p.add_argument("--heldout-articles", type=_at_least_one, default=32, help="held-out summaries")
    p.add_argument(
        "--epochs", type=_at_least_one, default=None, help="default: the measured best's"
    )
    p.add_argument(
        "--questions", type=int, default=None, help="calibration capital questions (default: all)"
    )
    p.add_argument(
        "--surrogate-steps",
        type=_at_least_one,
        default=60,
        help="the surrogate student's distillation steps",
    )
    p.add_argument("--out", default=None, help="also save the transform here")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"cmiguard {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

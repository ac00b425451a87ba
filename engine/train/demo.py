"""The embedded default run: train a transform on the real teacher and report
held-out utility, argmax agreement and CMI, raw vs purified."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cmiguard.checkpoint import save_transform, vocab_fingerprint
from cmiguard.purify import cmi
from cmiguard.train.data import (
    Example,
    capital_questions,
    label_counts,
    mc_examples,
    text_examples,
    wiki_summaries,
)
from cmiguard.train.metrics import RowSet, compare, mc_choice, teacher_rows
from cmiguard.train.models import load_teacher
from cmiguard.train.surrogate import make_surrogate
from cmiguard.train.trainer import TrainConfig, train
from cmiguard.transforms import LogitTransform


@dataclass
class DemoConfig:
    calibration_articles: int = 96
    heldout_articles: int = 32
    max_tokens: int = 64
    surrogate_layers: int = 2
    surrogate_steps: int = 20
    cmi_target: float = 0.25  # purified CMI / raw CMI on calibration rows
    train: TrainConfig | None = None


def calibrate_temperature(
    rows: RowSet, transform: LogitTransform, target: float, iters: int = 12
) -> float:
    """Smallest serving temperature whose CMI on ``rows`` is ``target`` × the raw CMI.

    Temperature never moves the argmax, so this costs no accuracy; it is the
    part of the reduction an attacker who guesses τ can undo (see the note in
    the README), the learned low-rank part is the part he cannot.
    """
    with torch.no_grad():
        t = transform(rows.logits)
    goal = target * float(cmi(rows.logits, rows.labels))
    lo, hi = 1.0, 2.0
    while float(cmi(t, rows.labels, temperature=hi)) > goal and hi < 1e3:
        lo, hi = hi, hi * 2
    for _ in range(iters):
        mid = (lo + hi) / 2
        if float(cmi(t, rows.labels, temperature=mid)) > goal:
            lo = mid
        else:
            hi = mid
    return hi


def shrink_to_constraints(
    rows: RowSet, transform: LogitTransform, min_top1: float = 0.995, margin: float = 0.5
) -> float:
    """Scale the learned correction ``B`` by the largest ``s`` in [0, 1] that keeps
    top-1 agreement >= ``min_top1`` on ``rows`` (calibration data) and changes
    no multiple-choice answer there, times ``margin`` (a safety factor for
    unseen rows: at the largest feasible scale held-out answers still flipped).

    The seed paper keeps the checkpoint that keeps teacher accuracy; shrinking
    toward the identity enforces the same constraint continuously.
    """
    b = transform.b.detach().clone()

    def ok(s: float) -> bool:
        with torch.no_grad():
            transform.b.copy_(s * b)
            t = transform(rows.logits)
        top1 = float((t.argmax(1) == rows.logits.argmax(1)).float().mean())
        return top1 >= min_top1 and bool((mc_choice(rows, t) == mc_choice(rows, rows.logits)).all())

    lo, hi = 0.0, 1.0
    if not ok(hi):
        for _ in range(8):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        hi = lo
    with torch.no_grad():
        transform.b.copy_(margin * hi * b)
    return margin * hi


def split_examples(tokenizer: Any, split: str, articles: int, max_tokens: int) -> list[Example]:
    """One split's rows: Wikipedia next-token text, then the capital questions."""
    texts = text_examples(tokenizer, wiki_summaries(split, articles), max_tokens)
    return texts + mc_examples(tokenizer, capital_questions(split))


def run_demo(
    config: DemoConfig | None = None, out_dir: str | Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train (paper objective, rank 32), calibrate τ, evaluate on held-out rows."""
    config = config or DemoConfig()
    train_cfg = config.train or TrainConfig(objective="paper", rank=32, lr=2e-7, epochs=1)
    start = time.perf_counter()
    teacher, tokenizer = load_teacher()
    pad = tokenizer.pad_token_id
    calibration = split_examples(
        tokenizer, "calibration", config.calibration_articles, config.max_tokens
    )
    heldout = split_examples(tokenizer, "heldout", config.heldout_articles, config.max_tokens)
    surrogate = make_surrogate(
        teacher,
        calibration,
        pad,
        config.surrogate_layers,
        config.surrogate_steps,
        progress=progress,
    )
    result = train(train_cfg, teacher, calibration, pad, surrogate=surrogate, progress=progress)
    transform = result.transform
    cal_rows = teacher_rows(
        teacher, calibration[::3], pad, progress=progress, desc="calibration rows"
    )
    shrink = shrink_to_constraints(cal_rows, transform)
    transform.temperature = calibrate_temperature(cal_rows, transform, config.cmi_target)
    del cal_rows
    rows = teacher_rows(teacher, heldout, pad, progress=progress, desc="held-out rows")
    metrics = compare(rows, transform)
    if out_dir is not None:
        save_transform(
            transform, Path(out_dir) / "transform.safetensors", vocab_fingerprint(tokenizer)
        )
    counts = label_counts(heldout)
    return {
        "teacher_accuracy_raw": metrics["mc_accuracy_raw"],
        "teacher_accuracy_purified": metrics["mc_accuracy_purified"],
        "next_token_accuracy_raw": metrics["next_token_accuracy_raw"],
        "next_token_accuracy_purified": metrics["next_token_accuracy_purified"],
        "top1_agreement": metrics["top1_agreement"],
        "cmi_raw": metrics["cmi_raw"],
        "cmi_purified": metrics["cmi_purified"],
        "cmi_text_raw": metrics["cmi_text_raw"],
        "cmi_text_purified": metrics["cmi_text_purified"],
        "temperature": transform.temperature,
        "correction_scale": shrink,
        "misalignment_cos_last": result.history[-1].get("cos", float("nan")),
        "purify_tokens_per_s": metrics["purify_tokens_per_s"],
        "heldout_rows": counts["rows"],
        "heldout_distinct_labels": counts["distinct_labels"],
        "heldout_singleton_labels": counts["singleton_labels"],
        "seconds": time.perf_counter() - start,
    }

"""Held-out metrics of a transform: accuracy kept, argmax kept, CMI removed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmiguard.purify import cmi, purify
from cmiguard.train.data import Example, batches
from cmiguard.train.models import logits_rows
from cmiguard.transforms import LogitTransform


@dataclass
class RowSet:
    """Teacher logits for labelled rows, with what scoring needs."""

    logits: Tensor  # [N, V] fp32
    labels: Tensor  # [N]
    is_mc: Tensor  # [N] bool
    options: Tensor  # [N, 4] answer-letter ids (-1 on text rows)


def teacher_rows(
    teacher: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "teacher logits",
) -> RowSet:
    """Run the teacher once over ``examples`` and keep the labelled rows' logits."""
    parts = []
    total = (len(examples) + batch_size - 1) // batch_size
    with torch.no_grad():
        for batch in tqdm(
            batches(examples, batch_size, pad_id), total=total, desc=desc, disable=not progress
        ):
            z = logits_rows(teacher, batch.input_ids, batch.attention_mask, batch.rows)
            is_mc = torch.tensor([k == "mc" for k in batch.kinds])
            parts.append((z, batch.labels, is_mc, batch.options))
    return RowSet(*(torch.cat(items) for items in zip(*parts, strict=True)))


def mc_choice(rows: RowSet, logits: Tensor) -> Tensor:
    """The option token each multiple-choice row picks (argmax over its 4 options)."""
    options = rows.options[rows.is_mc]
    letter_logits = logits[rows.is_mc].gather(1, options)
    return options.gather(1, letter_logits.argmax(1, keepdim=True)).squeeze(1)


def scores(rows: RowSet, logits: Tensor, with_cmi: bool = True) -> dict[str, float]:
    """Multiple-choice accuracy (argmax over the 4 letters), next-token accuracy
    (argmax over the vocabulary) and CMI in nats (exact estimator)."""
    out: dict[str, float] = {}
    if rows.is_mc.any():
        pick = mc_choice(rows, logits)
        out["mc_accuracy"] = float((pick == rows.labels[rows.is_mc]).float().mean())
    text = ~rows.is_mc
    if text.any():
        out["next_token_accuracy"] = float(
            (logits[text].argmax(1) == rows.labels[text]).float().mean()
        )
    if not with_cmi:
        return out
    out["cmi"] = float(cmi(logits, rows.labels))
    if text.any():
        out["cmi_text"] = float(cmi(logits[text], rows.labels[text]))
    if rows.is_mc.any():
        out["cmi_mc"] = float(cmi(logits[rows.is_mc], rows.labels[rows.is_mc]))
    return out


def compare(rows: RowSet, transform: LogitTransform) -> dict[str, float]:
    """Raw vs purified scores on the same rows, top-1 agreement and purify speed."""
    start = time.perf_counter()
    purified = purify(rows.logits, transform)
    seconds = time.perf_counter() - start
    raw, pur = scores(rows, rows.logits), scores(rows, purified)
    result = {f"{k}_raw": v for k, v in raw.items()} | {f"{k}_purified": v for k, v in pur.items()}
    result["top1_agreement"] = float((purified.argmax(1) == rows.logits.argmax(1)).float().mean())
    result["purify_tokens_per_s"] = rows.logits.shape[0] / max(seconds, 1e-9)
    return result

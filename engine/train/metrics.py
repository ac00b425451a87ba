"""Held-out metrics of a transform: accuracy kept, argmax kept, CMI removed."""

from __future__ import annotations

import time

from torch import Tensor

from cmiguard.purify import cmi, purify
from cmiguard.train.rows import RowSet
from cmiguard.transforms import LogitTransform


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

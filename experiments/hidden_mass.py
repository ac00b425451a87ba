"""How much of what top-k truncation hides can an attacker read off its own labels?

    python experiments/hidden_mass.py        # ~5 min on 2 CPU cores

A top-k defense serves the k most likely tokens renormalised, so the mass
the teacher put on every other token is gone. The frontier's attackers
floor the hidden tokens at a fixed 1e-4 (``floor_truncated``), which
makes a top-k student overconfident. The bucketing attacker
(``adaptive_bucket``) instead fits the hidden mass ``m`` on the rows it
labelled itself (``fit_hidden_mass``: the frontier's first two batches of
each seed). This prints, per k and seed, the fitted ``m``, the share of
held-out labels that are hidden, and the ground truth's held-out NLL
(nats a token) under the served output with the hidden mass spread evenly
at 1e-4, at the fitted scalar ``m``, and at a per-row ``m`` (a logistic fit
on the shown tokens' top log-prob and entropy, which an attacker could also
do), next to the raw teacher's NLL. It writes
``experiments/results/hidden_mass/hidden_mass.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cmiguard.attack.adaptive import fit_hidden_mass
from cmiguard.attack.defenses import keep_top
from cmiguard.attack.evaluation import EvalConfig, batch_order
from cmiguard.kernels.reference import IGNORE_INDEX
from cmiguard.train.data import batches, text_examples, wiki_summaries
from cmiguard.train.models import load_teacher, logits_rows

KS = (20, 5, 1)
SEEDS = (0, 1)
OUT = Path("experiments/results/hidden_mass")


def teacher_logits(teacher: torch.nn.Module, b) -> Tensor:
    """Rounded to bf16 as the evaluation caches them, so top-k ties break the same way."""
    return logits_rows(teacher, b.input_ids, b.attention_mask, b.rows).bfloat16().float()


def features(served: Tensor) -> Tensor:
    """Per row: 1, the top shown log-prob, the shown tokens' entropy."""
    top = served.max(-1).values
    entropy = -(served.exp() * served.nan_to_num(neginf=0.0)).sum(-1)
    return torch.stack([torch.ones_like(top), top, entropy], -1)


def fit_logistic(served: Tensor, labels: Tensor) -> Tensor:
    """Weights of ``m(row) = σ(w · features)``, by the likelihood of which labels are hidden."""
    rows = labels != IGNORE_INDEX
    x, y = features(served[rows]), served[rows, labels[rows]].isneginf().float()
    w = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=200)

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach()


def label_nll(served: Tensor, labels: Tensor, mass: Tensor) -> Tensor:
    """Summed NLL of the labels under ``served`` with ``mass`` (per row) spread
    evenly over the hidden tokens and the shown ones scaled to ``1 − mass``."""
    rows = labels != IGNORE_INDEX
    served, labels, mass = served[rows], labels[rows], mass[rows]
    picked = served.gather(1, labels[:, None]).squeeze(1)
    count = served.isneginf().sum(-1)
    hidden = torch.log(mass / count.clamp(min=1))
    return torch.where(picked.isneginf(), hidden, torch.log1p(-mass) + picked).sum()


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    teacher, tokenizer = load_teacher()
    pad = tokenizer.pad_token_id
    calibration = text_examples(tokenizer, wiki_summaries("calibration", 384), 64)
    heldout = text_examples(tokenizer, wiki_summaries("heldout", 128), 64)
    config = EvalConfig()
    fits = {}
    with torch.no_grad():
        for seed in SEEDS:
            # the attacker's own rows: the first batches of the frontier's order for this seed
            z, labels = [], []
            order = batch_order(len(calibration), seed)
            for b in batches(calibration, config.batch_size, pad, order):
                z.append(teacher_logits(teacher, b))
                labels.append(b.labels)
                if len(z) == config.oracle_batches:
                    break
            z, labels = torch.cat(z), torch.cat(labels)
            for k in KS:
                served = keep_top(z, k).log_softmax(-1)
                fits[seed, k] = (fit_hidden_mass(served, labels), fit_logistic(served, labels))
        floor = {k: 0.0 for k in KS}  # summed NLL with 1e-4 on the hidden tokens
        hidden = {k: 0 for k in KS}  # held-out labels top-k hides
        fitted = {key: [0.0, 0.0] for key in fits}  # summed NLL with the fitted m, per-row m
        raw = tokens = 0.0
        for b in batches(heldout, config.batch_size, pad):
            z = teacher_logits(teacher, b)
            rows = b.labels != IGNORE_INDEX
            raw += float(F.cross_entropy(z, b.labels, reduction="sum"))
            tokens += int(rows.sum())
            for k in KS:
                served = keep_top(z, k).log_softmax(-1)
                hidden[k] += int(served[rows, b.labels[rows]].isneginf().sum())
                floor[k] -= float(label_nll(served, b.labels, torch.full_like(z[:, 0], 1e-4)))
                for seed in SEEDS:
                    m, w = fits[seed, k]
                    s = fitted[seed, k]
                    s[0] -= float(label_nll(served, b.labels, torch.full_like(z[:, 0], m)))
                    per_row = torch.sigmoid(features(served) @ w)
                    s[1] -= float(label_nll(served, b.labels, per_row))
    result = {
        "heldout_tokens": int(tokens),
        "raw_teacher_nll": raw / tokens,
        "cells": [
            {
                "k": k,
                "seed": seed,
                "fitted_mass": fits[seed, k][0],
                "heldout_hidden_share": hidden[k] / tokens,
                "nll_floor_1e-4": floor[k] / tokens,
                "nll_fitted_mass": fitted[seed, k][0] / tokens,
                "nll_per_row_mass": fitted[seed, k][1] / tokens,
            }
            for k in KS
            for seed in SEEDS
        ],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "hidden_mass.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        "```bash",
        "python experiments/hidden_mass.py",
        "```",
        "",
        f"Held-out tokens: {result['heldout_tokens']}; the raw teacher's NLL "
        f"{result['raw_teacher_nll']:.3f} nats a token. NLL of the ground truth under the "
        "served top-k output, the hidden mass spread evenly.",
        "",
        "| k | seed | fitted m | held-out labels hidden | NLL, floor 1e-4 | NLL, fitted m "
        "| NLL, per-row m |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        lines.append(
            f"| {c['k']} | {c['seed']} | {c['fitted_mass']:.3f} | "
            f"{c['heldout_hidden_share']:.3f} | {c['nll_floor_1e-4']:.3f} | "
            f"{c['nll_fitted_mass']:.3f} | {c['nll_per_row_mass']:.3f} |"
        )
    (OUT / "hidden_mass.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Can a defense withhold the argmax where the teacher is unsure, within 1 point?

    python experiments/withhold_uncertain.py        # ~9 min on 2 CPU cores

Every argmax-keeping defense hands the hard-label attacker the raw teacher's
student (docs/EVALUATION.md). Teacher accuracy may fall by 1 point and a
defense does not see the label, so the argmaxes it can afford to change are
on the rows where the teacher is least often right: its least confident.
This defense serves, on rows whose top-1 probability is below θ, one fixed
"don't know" distribution (the mean of the teacher's distributions over the
calibration rows), θ the largest that costs at most 1 point of accuracy on
the calibration rows. It prints the share of rows withheld, teacher accuracy
and CMI, then distils forward-KL and hard-label students from the raw and
the withheld teacher exactly as ``cmiguard evaluate`` does (same data,
seed, steps), next to the SFT floor, with the gap closed.
"""

from __future__ import annotations

import argparse

import torch

from cmiguard import cmi
from cmiguard.attack.evaluation import (
    ATTACKS,
    EvalConfig,
    attacker_view,
    cache_teacher,
    score,
    train_student,
)
from cmiguard.attack.report import gap_closed
from cmiguard.kernels.reference import IGNORE_INDEX
from cmiguard.train.data import batches, text_examples, wiki_summaries
from cmiguard.train.models import load_teacher, logits_rows, truncated_copy

BUDGET = 0.01  # teacher accuracy the defense may lose


def gate(z: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """θ: the largest top-1 probability below which withholding (serving a
    wrong argmax) costs at most ``BUDGET`` of accuracy on these rows; and the
    fixed log-distribution served there (the rows' mean distribution)."""
    p = z.softmax(-1)
    conf, top = p.max(-1)
    right = (top == labels).float()
    order = conf.argsort()
    lost = right[order].cumsum(0) / len(right)
    k = int((lost <= BUDGET).sum())
    theta = float(conf[order][k]) if k < len(conf) else 1.0
    return theta, p.mean(0).log()


def main() -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args()
    config = EvalConfig()
    teacher, tokenizer = load_teacher()
    pad = tokenizer.pad_token_id
    calibration = text_examples(tokenizer, wiki_summaries("calibration", 96), 64)
    heldout = text_examples(tokenizer, wiki_summaries("heldout", 32), 64)
    cached = cache_teacher(teacher, calibration, pad, config)
    z = torch.cat([b.teacher_logits.float() for b in cached])
    labels = torch.cat([b.labels for b in cached])
    keep = labels != IGNORE_INDEX
    theta, dont_know = gate(z[keep], labels[keep])

    def withheld(z: torch.Tensor) -> torch.Tensor:
        logp = z.float().log_softmax(-1)
        unsure = logp.exp().amax(-1) < theta
        return torch.where(unsure[:, None], dont_know, logp)

    def raw(z: torch.Tensor) -> torch.Tensor:
        return z.float().log_softmax(-1)

    correct = {"raw": 0, "withheld": 0}
    unsure = total = 0
    with torch.no_grad():
        for b in batches(heldout, 8, pad):
            zh = logits_rows(teacher, b.input_ids, b.attention_mask, b.rows)
            correct["raw"] += int((zh.argmax(-1) == b.labels).sum())
            correct["withheld"] += int((withheld(zh).argmax(-1) == b.labels).sum())
            unsure += int((zh.softmax(-1).amax(-1) < theta).sum())
            total += b.labels.numel()
    sample = cached[:8]
    sample_labels = torch.cat([b.labels for b in sample])
    served = {
        name: float(cmi(torch.cat([fn(b.teacher_logits.float()) for b in sample]), sample_labels))
        for name, fn in (("raw", raw), ("withheld", withheld))
    }
    print(f"\nθ = {theta:.3f}: withholds {unsure / total:.1%} of {total} held-out rows")
    for name in correct:
        print(f"{name}: teacher accuracy {correct[name] / total:.4f}, CMI {served[name]:.3f} nats")

    template = truncated_copy(teacher, config.student_layers)
    floor = score(train_student(template, cached, None, {}, config, desc="SFT floor"), heldout, pad)
    print(f"\nSFT floor {floor['accuracy']:.4f}\n")
    print("| attack | raw student | withheld student | gap closed |")
    print("|---|---|---|---|")
    for attack in ("forward_kl", "hard_label"):
        acc = {}
        for name, defend in (("raw", raw), ("withheld", withheld)):
            view, _ = attacker_view(defend, ATTACKS[attack], cached, config)
            student = train_student(template, cached, view, ATTACKS[attack], config, desc=name)
            acc[name] = score(student, heldout, pad)["accuracy"]
        closed = gap_closed(acc["raw"], acc["withheld"], floor["accuracy"])
        print(f"| {attack} | {acc['raw']:.4f} | {acc['withheld']:.4f} | {closed:.2f} |")


if __name__ == "__main__":
    main()

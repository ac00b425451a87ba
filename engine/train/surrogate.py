"""Making the surrogate student: a layer-dropped teacher, briefly distilled."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cmiguard.train.data import Example, batches
from cmiguard.train.models import logits_rows, truncated_copy
from cmiguard.train.objectives import student_loss


def make_surrogate(
    teacher: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    n_layers: int = 2,
    steps: int = 20,
    batch_size: int = 8,
    lr: float = 3e-4,
    alpha: float = 0.5,
    seed: int = 0,
    progress: bool = True,
) -> nn.Module:
    """The teacher's first ``n_layers`` blocks (+ final norm and LM head),
    fine-tuned for ``steps`` with ``(1−α)·SFT + α·KD`` from the teacher: a
    student of the kind the attacker trains, for the paper objective."""
    student = truncated_copy(teacher, n_layers).train().requires_grad_(True)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    bar = tqdm(total=steps, desc="surrogate", disable=not progress)
    done = 0
    while done < steps:
        for batch in batches(examples, batch_size, pad_id, order):
            with torch.no_grad():
                teacher_p = torch.softmax(
                    logits_rows(teacher, batch.input_ids, batch.attention_mask, batch.rows), -1
                )
            student_z = logits_rows(student, batch.input_ids, batch.attention_mask, batch.rows)
            loss = student_loss(student_z, teacher_p, batch.labels, alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if done >= steps:
                break
    bar.close()
    return student.eval().requires_grad_(False)

"""Making the surrogate student: a layer-dropped teacher distilled the way the
evaluation's students are (4 blocks, AdamW at 5e-4, 8 sequences a step,
``(1−α)·SFT + α·KD`` from the raw teacher), so that the seed's cosine is
measured on a real student, not a barely trained copy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from cmiguard.train.data import Example, collate
from cmiguard.train.models import logits_rows, truncated_copy
from cmiguard.train.objectives import student_loss
from cmiguard.train.rows import RowSet


def make_surrogate(
    teacher: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    n_layers: int = 4,
    steps: int = 60,
    batch_size: int = 8,
    lr: float = 5e-4,
    alpha: float = 0.5,
    seed: int = 0,
    progress: bool = True,
    rows: RowSet | None = None,
) -> nn.Module:
    """The teacher's first ``n_layers`` blocks (+ final norm and LM head),
    trained for ``steps`` with ``(1−α)·SFT + α·KD`` from the teacher. With
    ``rows`` (the examples' teacher rows) the teacher's logits are read from
    them instead of computed again."""
    student = truncated_copy(teacher, n_layers).train().requires_grad_(True)
    device = next(student.parameters()).device
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    bar = tqdm(total=steps, desc="surrogate", disable=not progress)
    for step in range(steps):
        lo = (step * batch_size) % len(order)
        picked = order[lo : lo + batch_size]
        b = collate([examples[i] for i in picked], pad_id).to(device)
        with torch.no_grad():
            if rows is not None:
                z = rows.select(picked).logits.to(device)
            else:
                z = logits_rows(teacher, b.input_ids, b.attention_mask, b.rows)
        student_z = logits_rows(student, b.input_ids, b.attention_mask, b.rows)
        loss = student_loss(student_z, torch.softmax(z, -1), b.labels, alpha)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    return student.eval().requires_grad_(False)

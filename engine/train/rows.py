"""Teacher rows computed once: the logits of every labelled row of a dataset
(and, for the seed's objective, the surrogate's input to its last MLP), with
where each example's rows are, so that training epochs, the surrogate and
the held-out metrics need no further teacher pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmiguard.train.data import Example, batches
from cmiguard.train.models import logits_rows, surrogate_residual


@dataclass
class RowSet:
    """Teacher logits for labelled rows, with what scoring and training need."""

    logits: Tensor  # [N, V] fp32
    labels: Tensor  # [N]
    is_mc: Tensor  # [N] bool
    options: Tensor  # [N, 4] answer-letter ids (-1 on text rows)
    offsets: Tensor  # [E + 1]: example i's rows are offsets[i]:offsets[i + 1]
    residual: Tensor | None = None  # [N, d]: the surrogate's input to its last MLP

    def select(self, examples: Sequence[int]) -> RowSet:
        """The rows of these examples, in this order."""
        rows = torch.cat(
            [torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in examples]
        )
        sizes = (self.offsets[1:] - self.offsets[:-1])[list(examples)]
        return RowSet(
            self.logits[rows],
            self.labels[rows],
            self.is_mc[rows],
            self.options[rows],
            torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)]),
            None if self.residual is None else self.residual[rows],
        )

    def to(self, device: torch.device | str) -> RowSet:
        return replace(
            self,
            logits=self.logits.to(device),
            labels=self.labels.to(device),
            residual=None if self.residual is None else self.residual.to(device),
        )

    @property
    def examples(self) -> int:
        return self.offsets.numel() - 1


def teacher_rows(
    teacher: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
    progress: bool = True,
    desc: str = "teacher logits",
    surrogate: nn.Module | None = None,
) -> RowSet:
    """Run the teacher once over ``examples`` and keep the labelled rows' logits
    (on the CPU), and with ``surrogate`` also its residuals (:func:`with_residuals`)."""
    parts = []
    total = (len(examples) + batch_size - 1) // batch_size
    device = next(teacher.parameters()).device
    with torch.no_grad():
        for batch in tqdm(
            batches(examples, batch_size, pad_id), total=total, desc=desc, disable=not progress
        ):
            b = batch.to(device)
            z = logits_rows(teacher, b.input_ids, b.attention_mask, b.rows).cpu()
            is_mc = torch.tensor([k == "mc" for k in batch.kinds])
            parts.append((z, batch.labels, is_mc, batch.options))
    sizes = torch.tensor([len(e.positions) for e in examples])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
    rows = RowSet(*(torch.cat(items) for items in zip(*parts, strict=True)), offsets)
    return rows if surrogate is None else with_residuals(rows, surrogate, examples, pad_id)


def with_residuals(
    rows: RowSet,
    surrogate: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    batch_size: int = 8,
) -> RowSet:
    """``rows`` with the surrogate's residuals at each row: the seed's
    objective then needs only the surrogate's last MLP and head per step."""
    device = next(surrogate.parameters()).device
    parts = [
        surrogate_residual(surrogate, b.input_ids, b.attention_mask, b.rows).cpu()
        for b in (batch.to(device) for batch in batches(examples, batch_size, pad_id))
    ]
    return replace(rows, residual=torch.cat(parts))

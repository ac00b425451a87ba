"""Purifying a ``datasets.Dataset`` of stored logits, batch by batch, with a
progress bar: what a provider does to a table of logits it has already
computed (``cmiguard purify`` does the same for safetensors/.npy shards).

A stored top-k view cannot be purified: the transform reads every logit of
a row (``T(z) = z + (zA)Bᵀ``), so only full-vocabulary rows are accepted.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm.auto import tqdm

from cmiguard.purify import OUTPUTS, purify
from cmiguard.transforms import LogitTransform


def purify_dataset(
    dataset: Any,
    transform: LogitTransform,
    column: str = "logits",
    output: str = "logprobs",
    top_k: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> Any:
    """``dataset`` with ``column``'s rows of full-vocabulary logits replaced by
    purified ones (``output``: ``logits`` or ``logprobs``), or with ``top_k``
    by two columns ``{column}_top_values`` and ``{column}_top_ids``."""
    if column not in dataset.column_names:
        raise ValueError(f"the dataset has no {column!r} column (it has {dataset.column_names})")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    device = next(transform.parameters()).device
    bar = tqdm(total=len(dataset), unit="row", desc="purify", disable=not progress)

    def one_batch(batch: dict[str, list]) -> dict[str, list]:
        rows = batch[column]
        widths = {len(r) for r in rows}
        if widths != {transform.vocab_size}:
            raise ValueError(
                f"{column!r} rows have {sorted(widths)} entries, the transform "
                f"vocab_size={transform.vocab_size}: only full-vocabulary logits can be "
                "purified (a stored top-k view cannot: the transform reads every logit)"
            )
        logits = torch.tensor(rows, dtype=torch.float32, device=device)
        bar.update(len(rows))
        if top_k is None:
            return {column: purify(logits, transform, output=output).cpu().tolist()}
        values, ids = purify(logits, transform, output=output, top_k=top_k)
        return {
            f"{column}_top_values": values.cpu().tolist(),
            f"{column}_top_ids": ids.cpu().tolist(),
        }

    drop = [column] if top_k is not None else None
    out = dataset.map(one_batch, batched=True, batch_size=batch_size, remove_columns=drop)
    bar.close()
    return out

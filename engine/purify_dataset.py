"""Purifying a ``datasets.Dataset`` of stored logits, batch by batch, with a
progress bar: what a provider does to a table of logits it has already
computed (``cmiguard purify`` does the same for safetensors/.npy shards).

A stored top-k view cannot be purified: the transform reads every logit of
a row (``T(z) = z + (zA)Bᵀ``), so only full-vocabulary rows are accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from cmiguard.purify import OUTPUTS, purify
from cmiguard.transforms import LogitTransform, check_transform
from cmiguard.validation import check_not_log_probs, check_top_k


def purify_dataset(
    dataset: Any,
    transform: LogitTransform,
    column: str = "logits",
    output: str = "logprobs",
    top_k: int | None = None,
    batch_size: int = 256,
    progress: bool = True,
    allow_log_probs: bool = False,
) -> Any:
    """``dataset`` with ``column``'s rows of full-vocabulary logits replaced by
    purified ones (``output``: ``logits`` or ``logprobs``, float32), or with
    ``top_k`` by two columns ``{column}_top_values`` and ``{column}_top_ids``.

    Batches reach the transform as NumPy blocks, not Python lists (whose
    conversion costs many times the transform itself); the result keeps the
    dataset's format. A ``DatasetDict`` is purified split by split; an
    ``IterableDataset`` (``streaming=True``) lazily, as it is read (NumPy rows
    unless it has a format). Rows that are log-probs, not logits, are refused
    unless ``allow_log_probs`` or the transform is shift-invariant
    (``centered``; checked on the first batch)."""
    check_transform(transform)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    # checked here, not as every batch's error; datasets reads batch_size <= 0 as
    # the whole table in one batch, which this streaming function exists to avoid
    check_top_k(top_k, transform.vocab_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    options = (transform, column, output, top_k, batch_size, progress, allow_log_probs)
    if isinstance(dataset, dict):  # a DatasetDict or IterableDatasetDict: split by split
        for name, split in dataset.items():  # every split before the first is purified
            _check_table(split, name, column)
        splits = {name: _purify_split(split, name, *options) for name, split in dataset.items()}
        return type(dataset)(splits)
    _check_table(dataset, "", column)
    return _purify_split(dataset, "", *options)


def _check_table(dataset: Any, name: str, column: str) -> None:
    """A table that has ``column`` (a stream that does not know its columns yet
    is checked as it is read)."""
    if not hasattr(dataset, "column_names") or not hasattr(dataset, "map"):
        raise TypeError(f"dataset must be a datasets.Dataset, got {type(dataset).__name__}")
    if dataset.column_names is not None and column not in dataset.column_names:
        split = f"split {name!r}: " if name else ""
        raise ValueError(
            f"{split}the dataset has no {column!r} column (it has {dataset.column_names})"
        )


def _purify_split(
    dataset: Any,
    name: str,
    transform: LogitTransform,
    column: str,
    output: str,
    top_k: int | None,
    batch_size: int,
    progress: bool,
    allow_log_probs: bool,
) -> Any:
    """One table (``name``: its split, for messages and the bar)."""
    split = f"split {name!r}: " if name else ""
    device = next(transform.parameters()).device
    lazy = not hasattr(dataset, "__len__")  # an IterableDataset: purified as it is read
    bar = tqdm(
        total=None if lazy else len(dataset),
        unit="row",
        desc=f"purify {name}".strip(),
        disable=not progress or lazy,
    )
    unchecked = not (allow_log_probs or transform.shift_invariant)

    def one_batch(batch: dict[str, Any], indices: list[int]) -> dict[str, np.ndarray]:
        try:
            return purified(batch)
        except ValueError as exc:  # which rows: a table can hold millions
            raise ValueError(f"{split}rows {indices[0]}-{indices[-1]}: {exc}") from exc

    def purified(batch: dict[str, Any]) -> dict[str, np.ndarray]:
        if column not in batch:
            raise ValueError(f"the dataset has no {column!r} column (it has {list(batch)})")
        rows = batch[column]  # [B, V] when every row has V entries, else one array per row
        widths = {len(r) for r in rows} if getattr(rows, "ndim", 1) != 2 else {rows.shape[1]}
        if widths != {transform.vocab_size}:
            raise ValueError(
                f"{column!r} rows have {sorted(widths)} entries, the transform "
                f"vocab_size={transform.vocab_size}: only full-vocabulary logits can be "
                "purified (a stored top-k view cannot: the transform reads every logit)"
            )
        logits = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(device)
        nonlocal unchecked
        if unchecked:
            check_not_log_probs(logits, "pass allow_log_probs=True")
            unchecked = False
        bar.update(len(rows))
        if top_k is None:
            return {column: purify(logits, transform, output=output).cpu().numpy()}
        values, ids = purify(logits, transform, output=output, top_k=top_k)
        return {
            f"{column}_top_values": values.cpu().numpy(),
            f"{column}_top_ids": ids.cpu().numpy(),
        }

    drop = [column] if top_k is not None else None
    if lazy:
        formatting = getattr(dataset, "_formatting", None)  # IterableDataset has no .format
        out = dataset.with_format("numpy").map(
            one_batch, batched=True, batch_size=batch_size, remove_columns=drop, with_indices=True
        )
        # an unformatted stream's rows come as NumPy arrays: lists would cost the
        # conversion the NumPy blocks avoid
        return out.with_format(formatting.format_type if formatting else "numpy")
    blocks = dataset.with_format("numpy", columns=[column], output_all_columns=True)
    out = blocks.map(
        one_batch, batched=True, batch_size=batch_size, remove_columns=drop, with_indices=True
    )
    bar.close()
    fmt = dataset.format
    chosen = fmt["columns"] is not None and set(fmt["columns"]) != set(dataset.column_names)
    kept = [c for c in fmt["columns"] if c in out.column_names] if chosen else None
    return out.with_format(
        fmt["type"], kept, output_all_columns=fmt["output_all_columns"], **fmt["format_kwargs"]
    )

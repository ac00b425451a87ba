"""A provider's own data as labelled rows: JSONL, JSON, Parquet or CSV files,
or a Hugging Face dataset saved to disk, read through the ``datasets``
library (``pip install 'cmiguard[data]'``).

Two shapes are understood. A ``text`` column: language-model rows, each
position labelled with the next token (as the bundled Wikipedia rows). Or
``prompt`` and ``answer`` columns: the answer teacher-forced after the
prompt (through the tokenizer's chat template when it has one), each answer
token a labelled row. The split into calibration and held-out rows is by a
seeded hash of the row index, or by a ``split`` column: ``heldout``, ``test``,
``validation``, ``dev`` or ``eval`` rows (and their usual spellings) are held
out; ``train`` or ``calibration`` rows, and rows without one, are not.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cmiguard.train.data import Example, label_counts

# a split column's values (case and spaces aside); anything else is refused
HELDOUT_VALUES = ("heldout", "held-out", "holdout", "test", "validation", "val", "dev", "eval")
CALIBRATION_VALUES = ("train", "training", "calibration", "")
SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def read_table(path: str | Path) -> Any:
    """A ``datasets.Dataset`` from a file or a saved dataset directory."""
    if importlib.util.find_spec("datasets") is None:
        raise ImportError("reading --data needs the datasets library: pip install 'cmiguard[data]'")
    import datasets

    path = Path(path)
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise ValueError(f"{path} is not a dataset saved with save_to_disk ({exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if len(loaded) != 1:
                raise ValueError(
                    f"{path} holds splits {sorted(loaded)}: save one, or give the split as a "
                    "'split' column"
                )
            loaded = next(iter(loaded.values()))
        return loaded
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: no such file or directory")
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(
            f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet, .csv or "
            "a directory written by Dataset.save_to_disk"
        )
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty")
    try:
        return datasets.load_dataset(kind, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises many types for a malformed file
        # its own error says only that generating failed: the cause names the row
        why = exc.__cause__ if exc.__cause__ is not None and str(exc.__cause__) else exc
        raise ValueError(f"{path} could not be read as {kind}: {why}") from exc


def _held_out(index: int, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def _split(value: Any, index: int, path: Path) -> bool:
    """Whether a row's ``split`` value holds it out; an unknown value is refused,
    since a misspelt held-out row would otherwise be trained on."""
    name = "" if value is None else str(value).strip().lower()
    if name in HELDOUT_VALUES:
        return True
    if name in CALIBRATION_VALUES:
        return False
    raise ValueError(
        f"{path}: row {index} has split {value!r}; held-out rows say one of "
        f"{', '.join(HELDOUT_VALUES)}, the others {', '.join(CALIBRATION_VALUES[:-1])} or nothing"
    )


def _text(row: dict, column: str, index: int, path: Path) -> str:
    value = row[column]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}: row {index} has an empty or non-text {column!r}")
    return value


def load_examples(
    path: str | Path,
    tokenizer: Any,
    max_tokens: int = 64,
    heldout: float = 0.2,
    seed: int = 0,
    limit: int | None = None,
    context: int | None = None,
) -> tuple[list[Example], list[Example]]:
    """``(calibration, held-out)`` examples from a provider's file (see the module
    docstring). Errors name the file, the row and the column; a row longer than
    ``context`` (the model's positions) and a dataset whose calibration rows
    repeat no label are refused (the CMI estimate needs them)."""
    path = Path(path)
    table = read_table(path)
    columns = set(table.column_names)
    if "text" in columns:
        kind = "text"
    elif {"prompt", "answer"} <= columns:
        kind = "answer"
    else:
        raise ValueError(
            f"{path}: needs a 'text' column, or 'prompt' and 'answer' columns; it has "
            f"{sorted(columns) or 'none'}"
        )
    if len(table) == 0:
        raise ValueError(f"{path} has no rows")
    split = "split" in columns
    calibration: list[Example] = []
    held: list[Example] = []
    for index, row in enumerate(table):
        if limit is not None and index >= limit:
            break
        if kind == "text":
            example = text_example(tokenizer, _text(row, "text", index, path), max_tokens)
        else:
            prompt, answer = _text(row, "prompt", index, path), _text(row, "answer", index, path)
            try:
                example = answer_example(tokenizer, prompt, answer, max_tokens)
            except ValueError as exc:
                raise ValueError(f"{path}: row {index}: {exc}") from exc
        if example is None:
            continue
        if context is not None and len(example.input_ids) > context:
            raise ValueError(_too_long(path, index, example, max_tokens, context))
        out = _split(row["split"], index, path) if split else _held_out(index, heldout, seed)
        (held if out else calibration).append(example)
    if not calibration:
        raise ValueError(f"{path}: no calibration rows with at least two tokens")
    if label_counts(calibration)["rows_in_repeated_labels"] == 0:
        raise ValueError(
            f"{path}: no label occurs twice among the calibration rows, so the CMI estimate "
            "is zero by construction; give more (or longer) rows"
        )
    return calibration, held


def _too_long(path: Path, index: int, example: Example, max_tokens: int, context: int) -> str:
    """Why a row cannot go through the model: learned position embeddings fail
    past ``context`` and rotary ones degrade, so it is refused, not cut."""
    n = len(example.input_ids)
    if example.kind == "text":  # text rows are cut at max_tokens: only that can pass context
        return (
            f"{path}: row {index} is cut at {max_tokens} tokens, past the model's {context} "
            f"positions: cut rows at {context} tokens or fewer (--max-tokens)"
        )
    answer = len(example.labels)
    fix = (
        f"shorten its prompt to {context - answer} tokens or fewer"
        if answer < context
        else f"cut answers at {context - 1} tokens or fewer (--max-tokens)"
    )
    return (
        f"{path}: row {index} is {n} tokens (prompt {n - answer}, answer {answer} cut at "
        f"{max_tokens}), past the model's {context} positions: {fix}"
    )


def text_example(tokenizer: Any, text: str, max_tokens: int) -> Example | None:
    """Next-token rows of one text (None if it has fewer than two tokens)."""
    ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
    if len(ids) < 2:
        return None
    return Example(ids, list(range(len(ids) - 1)), ids[1:], "text")


def answer_example(tokenizer: Any, prompt: str, answer: str, max_tokens: int) -> Example | None:
    """The answer's tokens after the prompt, each a labelled row (the chat
    template wraps the prompt when the tokenizer has one)."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2.exceptions import TemplateError

        try:
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        except TemplateError as exc:  # a template that wants a system turn, say
            raise ValueError(f"the tokenizer's chat template refused the prompt: {exc}") from exc
    context = tokenizer.encode(prompt, add_special_tokens=False)
    target = tokenizer.encode(answer, add_special_tokens=False)[:max_tokens]
    if not context or not target:
        return None
    ids = context + target
    return Example(ids, list(range(len(context) - 1, len(ids) - 1)), target, "answer")


def split_validation(
    examples: Sequence[Example], fraction: float = 0.2, seed: int = 0
) -> tuple[list[Example], list[Example]]:
    """Calibration examples split again: rows to train on and rows for the
    selection rule (at least one of each when there are two)."""
    train = [e for i, e in enumerate(examples) if not _held_out(i, fraction, seed + 1)]
    validation = [e for i, e in enumerate(examples) if _held_out(i, fraction, seed + 1)]
    if not validation and len(train) > 1:
        validation = [train.pop()]
    return train, validation

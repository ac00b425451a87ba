"""What the commands share: argument types, help texts, the model and device options."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a count that must be >= ``minimum``."""

    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return count


# most counts: 0 would mean 'off' by accident
at_least_one = at_least(1)


def positive(text: str) -> float:
    """An argparse type: a finite number > 0 (a temperature)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def existing(text: str) -> str:
    """An argparse type: a path that exists (checked before any model loads)."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or directory: {text}")
    return text


def folder(text: str) -> str:
    """An argparse type: a folder to write into, refused before any model loads
    or step runs when it (or a folder above it) is an existing file."""
    for path in (Path(text), *Path(text).parents):
        if path.exists():
            if not path.is_dir():
                raise argparse.ArgumentTypeError(f"{path} exists and is not a directory")
            break
    return text


DEVICE_HELP = "where to run: auto (cuda when there is a GPU, else cpu), cpu, cuda, cuda:1"

DATA_HELP = (
    "your rows instead of the bundled Wikipedia/geography ones: .jsonl, .json, .parquet, "
    ".csv or a saved datasets directory, with a 'text' column (next-token rows) or "
    "'prompt' and 'answer' columns (the answer teacher-forced); an optional 'split' column "
    "('heldout', 'test', 'validation', 'dev' or 'eval' rows are held out, 'train' rows and "
    "rows without one are not; else a fixed hashed fifth); "
    "train never sees the held-out rows and selects on a --seed'ed fifth of the others"
)


def bundled_data_args(p: argparse.ArgumentParser) -> None:
    """How much of the bundled calibration data ``train`` and ``demo`` use."""
    p.add_argument(
        "--articles", type=at_least_one, default=96, help="calibration Wikipedia summaries"
    )
    p.add_argument(
        "--questions",
        type=at_least(2),  # a fifth of them, at least one, are the selection rule's
        default=None,
        help="calibration capital questions (default: all)",
    )


def model_args(p: argparse.ArgumentParser) -> None:
    """--model and --dtype."""
    p.add_argument(
        "--model",
        default="teacher",
        help="a local Hugging Face causal-LM directory (safetensors or one .gguf), or "
        "'teacher' (the bundled SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="the model's weights (bfloat16 halves the memory)",
    )


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one (where the fused kernels run), else the CPU."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name!r} is not a device: {exc}") from exc
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu: no path here runs there
        raise ValueError(f"--device {name}: cmiguard runs on cpu or cuda (a GPU)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


class Help(argparse.HelpFormatter):
    """Each option's help ends with its default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        flag = action.nargs == 0  # --no-echo's default (True) would read as "on by default"
        worth = action.default not in (None, False, argparse.SUPPRESS) and not flag
        if worth and "default" not in text:
            text += " (default: %(default)s)"
        return text

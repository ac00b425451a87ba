"""Transform files (safetensors + metadata, or a Hub-style directory) and
atomic training checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cmiguard.transforms import FAMILIES, LogitTransform, check_transform, make_transform

FORMAT = "cmiguard-transform"
FORMAT_VERSION = "1"
# a Hub-style transform directory: the metadata as JSON, the tensors beside it
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "transform.safetensors"


def vocab_fingerprint(tokenizer: Any) -> str:
    """A short hash of the token→id table: a transform is tied to one vocabulary."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves half a file."""
    path = Path(path)
    if path.is_dir():  # os.replace's error would name the temporary file
        raise IsADirectoryError(f"{path} is a directory, not a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary directory beside ``path`` that replaces it when the block
    ends without error (and is removed when it does not): no half-written
    directory is ever at ``path``. An existing ``path`` is replaced only if
    the new directory rewrites every file in it: a folder holding anything
    else (a model, someone's notes) is refused and left as it was."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            lost = sorted(_files(path) - _files(tmp))
            if lost:
                raise ValueError(
                    f"{path} holds files the new directory would not have ({', '.join(lost[:3])}"
                    f"{', ...' if len(lost) > 3 else ''}): nothing was written; choose a new or "
                    "empty folder"
                )
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _files(directory: Path) -> set[str]:
    return {str(f.relative_to(directory)) for f in directory.rglob("*") if not f.is_dir()}


def _metadata(transform: LogitTransform, vocab_fingerprint: str) -> dict[str, str]:
    check_transform(transform)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "family": transform.family,
        "vocab_size": str(transform.vocab_size),
        "rank": str(transform.rank),
        "temperature": repr(transform.temperature),
        "bias": str(getattr(transform, "bias", None) is not None),
        "vocab_fingerprint": vocab_fingerprint,
        # empty: no argmax guard (files written before the guard existed have none)
        "guard_margin": "" if transform.guard_margin is None else repr(transform.guard_margin),
        "factor_dtype": getattr(transform, "factor_dtype", None) or "",
        # empty: A read as stored (files before centering existed have none)
        "centered": "True" if getattr(transform, "centered", False) else "",
    }


def _tensors(transform: LogitTransform) -> dict[str, Any]:
    return {k: v.detach().float().contiguous().cpu() for k, v in transform.state_dict().items()}


def save_transform(
    transform: LogitTransform,
    path: str | os.PathLike,
    vocab_fingerprint: str = "",
) -> None:
    """Write ``transform`` as safetensors with the metadata :func:`load_transform` checks."""
    metadata = _metadata(transform, vocab_fingerprint)
    atomic_write(path, lambda tmp: save_file(_tensors(transform), tmp, metadata=metadata))


def save_pretrained(
    transform: LogitTransform, directory: str | os.PathLike, vocab_fingerprint: str = ""
) -> None:
    """A Hub-style transform directory: ``config.json`` (family, sizes,
    temperature, guard, the vocabulary fingerprint) and ``transform.safetensors``,
    written atomically. :func:`load_transform` reads it (and single files)."""
    metadata = _metadata(transform, vocab_fingerprint)
    with atomic_directory(directory) as tmp:
        save_file(_tensors(transform), str(tmp / WEIGHTS_NAME), metadata=metadata)
        (tmp / CONFIG_NAME).write_text(json.dumps(metadata, indent=1) + "\n")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a transform file or directory, or a clear error for anything else."""
    path = _weights(Path(path))
    if not path.is_file():
        raise FileNotFoundError(f"transform file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(
            f"{path} is not a readable transform file (truncated or corrupt?): {exc}"
        ) from exc
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a cmiguard transform file (no '{FORMAT}' metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has transform format version {metadata.get('format_version')!r}; "
            f"this cmiguard reads version {FORMAT_VERSION}"
        )
    if metadata.get("family") not in FAMILIES:
        raise ValueError(f"{path} has unknown transform family {metadata.get('family')!r}")
    return metadata


def _weights(path: Path) -> Path:
    """The safetensors file of a transform given as a file or a directory; a
    directory's config.json must agree with the file it holds."""
    if not path.is_dir():
        return path
    weights, config = path / WEIGHTS_NAME, path / CONFIG_NAME
    if not (weights.is_file() and config.is_file()):
        raise FileNotFoundError(f"{path} is not a transform directory: needs {CONFIG_NAME} and "
                                f"{WEIGHTS_NAME}")  # fmt: skip
    try:
        declared = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not valid JSON ({exc})") from exc
    with safe_open(str(weights), framework="pt") as f:
        stored = f.metadata() or {}
    if declared != stored:
        raise ValueError(f"{config} does not describe {weights} (was one of them replaced?)")
    return weights


def from_pretrained(
    directory: str | os.PathLike,
    vocab_size: int | None = None,
    vocab_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
) -> LogitTransform:
    """Load a directory written by :func:`save_pretrained` (the same checks)."""
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"transform directory not found: {directory}")
    return load_transform(directory, vocab_size, vocab_fingerprint, device)


def _number(path: str | os.PathLike, metadata: dict[str, str], key: str, kind: type) -> Any:
    """A metadata field read as ``int`` or ``float``, or an error naming the file and field."""
    try:
        return kind(metadata[key])
    except (KeyError, ValueError):
        what = "an integer" if kind is int else "a number"
        raise ValueError(f"{path}: metadata {key!r} is {metadata.get(key)!r}, not {what}") from None


def load_transform(
    path: str | os.PathLike,
    vocab_size: int | None = None,
    vocab_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
) -> LogitTransform:
    """Load a transform, refusing one made for another vocabulary.

    ``vocab_size`` / ``vocab_fingerprint``, when given, must match the file's.
    """
    metadata = read_metadata(path)
    file_vocab = _number(path, metadata, "vocab_size", int)
    if vocab_size is not None and file_vocab != vocab_size:
        raise ValueError(
            f"{path} was trained for vocab_size={file_vocab}, but the model has vocab_size="
            f"{vocab_size}: a transform only fits the vocabulary it was trained on"
        )
    file_fp = metadata.get("vocab_fingerprint", "")
    if vocab_fingerprint and file_fp and file_fp != vocab_fingerprint:
        raise ValueError(
            f"{path} was trained for another tokenizer (vocabulary fingerprint {file_fp}, "
            f"this model's is {vocab_fingerprint})"
        )
    family = metadata["family"]
    kwargs: dict[str, Any] = {"temperature": _number(path, metadata, "temperature", float)}
    if metadata.get("guard_margin"):
        kwargs["guard_margin"] = _number(path, metadata, "guard_margin", float)
    if metadata.get("factor_dtype"):
        kwargs["factor_dtype"] = metadata["factor_dtype"]
    if metadata.get("centered") not in (None, "", "True"):
        raise ValueError(f"{path}: metadata 'centered' is {metadata['centered']!r}, not True")
    if metadata.get("centered") == "True":
        if family != "lowrank":
            raise ValueError(f"{path}: metadata 'centered' is for lowrank, not {family}")
        kwargs["centered"] = True
    if family in ("lowrank", "dense"):  # diag_lowrank always has its bias
        if metadata.get("bias", "False") not in ("True", "False"):
            raise ValueError(f"{path}: metadata 'bias' is {metadata['bias']!r}, not True or False")
        kwargs["bias"] = metadata.get("bias") == "True"
    rank = _number(path, metadata, "rank", int)
    try:
        transform = make_transform(family, file_vocab, rank, **kwargs)
    except ValueError as exc:
        raise ValueError(f"{path}: its metadata makes no transform ({exc})") from exc
    try:
        with safe_open(str(_weights(Path(path))), framework="pt", device="cpu") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        not_float = [k for k, v in state.items() if not v.is_floating_point()]
        if not_float:
            raise TypeError(f"tensor {not_float[0]!r} is {state[not_float[0]].dtype}, not float")
        transform.load_state_dict(state)
    except Exception as exc:
        raise ValueError(f"{path}: tensors do not match its metadata ({exc})") from exc
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(
            f"{path}: tensor {bad[0]!r} contains NaN or inf (a diverged training run?)"
        )
    return transform.to(device)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Atomically write a training checkpoint (torch pickle of tensors and plain values)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint written by :func:`save_checkpoint` (tensors and
    plain values only: ``weights_only`` runs no pickled code from the file)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable training checkpoint: {exc}") from exc


def changed_settings(saved: dict[str, Any], given: dict[str, Any]) -> str:
    """``lr=1e-05 (given 0.001), seed=0 (given 3)``: what a resumed run would
    change, so a refusal names it rather than printing both configurations."""
    return ", ".join(
        f"{k}={saved.get(k)!r} (given {given.get(k)!r})"
        for k in sorted(saved.keys() | given.keys())
        if saved.get(k) != given.get(k)
    )

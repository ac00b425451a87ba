"""Streaming logits shards in and out (safetensors or .npy), block of rows by block."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor

from cmiguard.checkpoint import atomic_write

ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


class LogitsShard:
    """A 2-D logits tensor on disk, read in row blocks without loading it whole."""

    def __init__(self, path: str | Path, key: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"logits shard not found: {self.path}")
        if self.path.suffix == ".npy":
            try:
                self._array = np.load(self.path, mmap_mode="r")
            except Exception as exc:
                raise ValueError(f"{self.path} is not a readable .npy file: {exc}") from exc
            self.shape = tuple(self._array.shape)
            # big-endian arrays (">f4") are read in the machine's byte order
            self._native = self._array.dtype.newbyteorder("=")
            try:
                self.dtype = torch.from_numpy(np.empty(0, dtype=self._native)).dtype
            except TypeError as exc:
                raise ValueError(
                    f"{self.path} holds {self._array.dtype} values, not logits: {exc}"
                ) from exc
        elif self.path.suffix == ".safetensors":
            try:
                self._file = safe_open(str(self.path), framework="pt")
            except Exception as exc:
                raise ValueError(
                    f"{self.path} is not a readable safetensors file (truncated?): {exc}"
                ) from exc
            keys = list(self._file.keys())  # noqa: SIM118
            self.key = key or ("logits" if "logits" in keys else (keys[0] if keys else None))
            if self.key not in keys:
                raise ValueError(f"{self.path} has no tensor {self.key!r} (it has {keys})")
            self._slice = self._file.get_slice(self.key)
            self.shape = tuple(self._slice.get_shape())
            self.dtype = _st_dtype(self._slice.get_dtype())
        else:
            raise ValueError(f"{self.path}: logits shards must be .safetensors or .npy")
        if len(self.shape) != 2:
            raise ValueError(
                f"{self.path}: logits must be 2-D [rows, vocab], got shape {self.shape}"
            )

    def blocks(self, rows: int) -> Iterator[Tensor]:
        for start in range(0, self.shape[0], rows):
            stop = min(start + rows, self.shape[0])
            if self.path.suffix == ".npy":
                yield torch.from_numpy(np.array(self._array[start:stop], dtype=self._native))
            else:
                yield self._slice[start:stop]


def _st_dtype(name: str) -> torch.dtype:
    for dtype, short in ST_DTYPES.items():
        if short == name:
            return dtype
    raise ValueError(f"unsupported logits dtype {name} (use F32, F16 or BF16)")


def write_streamed(
    path: str | Path,
    shape: tuple[int, int],
    dtype: torch.dtype,
    blocks: Iterator[Tensor],
    extra: dict[str, Tensor] | None = None,
    on_block: Callable[[int], None] | None = None,
    name: str = "logits",
) -> None:
    """Write ``blocks`` (row blocks of one ``[N, V]`` tensor) as ``.npy`` or
    ``.safetensors`` without holding the whole tensor; ``extra`` small tensors
    (safetensors only) follow it. The file appears atomically."""
    path = Path(path)
    extra = extra or {}

    def write(tmp: str) -> None:
        if path.suffix == ".npy":
            if extra or dtype == torch.bfloat16:
                raise ValueError(
                    f"{path}: .npy cannot hold top-k pairs or bfloat16; use .safetensors"
                )
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np_dtype, shape=shape)
            row = 0
            for block in blocks:
                out[row : row + block.shape[0]] = block.numpy()
                row += block.shape[0]
                if on_block:
                    on_block(block.shape[0])
            out.flush()
            del out
            return
        header, offset = {}, 0
        tensors = [(name, shape, dtype)] + [(k, tuple(v.shape), v.dtype) for k, v in extra.items()]
        for key, shp, dt in tensors:
            size = int(np.prod(shp)) * torch.empty(0, dtype=dt).element_size()
            header[key] = {
                "dtype": ST_DTYPES[dt],
                "shape": list(shp),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for block in blocks:
                f.write(_bytes(block.contiguous()))
                if on_block:
                    on_block(block.shape[0])
            for value in extra.values():
                f.write(_bytes(value.contiguous()))

    atomic_write(path, write)


def _bytes(t: Tensor) -> bytes:
    return (
        t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
    )

"""Writing a safetensors file one tensor, or one piece of a tensor, at a time (kt_sft.export).

safetensors' own `save_file` takes a dict of whole tensors, so a shard written with it is held in memory at once.
The format is simple enough to stream: an 8-byte little-endian header length, the JSON header (each tensor's dtype,
shape and [begin, end) byte offsets into the data that follows, contiguous, plus `__metadata__`), padded with
spaces to a multiple of 8, then the raw little-endian bytes. When every tensor's dtype and shape is known before
the first byte (the export plans them from the base checkpoint's headers), the header goes first and each tensor's
bytes follow as they are produced, e.g. a fused [E, ...] expert tensor one expert at a time.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterable

import torch

from .checkpoint_files import _DTYPES

DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class Entry:
    """One tensor of a file being written: its name, dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def header_bytes(entries: Iterable[Entry], metadata: dict) -> bytes:
    """The length prefix and JSON header of a safetensors file holding `entries` in this order."""
    header, offset = {}, 0
    for e in entries:
        if e.dtype not in DTYPE_NAMES:
            raise ValueError(f"{e.name}: safetensors has no dtype for {e.dtype}")
        header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes `entries` to `path` in their order: `write(name, pieces)` once per entry, where the pieces' bytes
    (row-major, the entry's dtype) make up the tensor; `close()` checks that every entry was written and syncs the
    file to disk."""

    def __init__(self, path: str | os.PathLike, entries: Iterable[Entry], metadata: dict | None = None):
        self.path, self.entries, self._next = path, list(entries), 0
        self._file = open(path, "wb")
        self._file.write(header_bytes(self.entries, {"format": "pt"} if metadata is None else metadata))

    def write(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        if self._next >= len(self.entries) or self.entries[self._next].name != name:
            expected = self.entries[self._next].name if self._next < len(self.entries) else "nothing more"
            raise RuntimeError(f"{self.path}: writing {name}, but the header says {expected} comes next")
        entry, written = self.entries[self._next], 0
        for piece in pieces:
            if piece.dtype != entry.dtype:
                raise RuntimeError(f"{name}: a {piece.dtype} piece for a {entry.dtype} tensor")
            data = piece.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
            self._file.write(data)
            written += data.nbytes
        if written != entry.nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, the header says {list(entry.shape)} = {entry.nbytes}")
        self._next += 1

    def close(self) -> None:
        try:
            if self._next != len(self.entries):
                raise RuntimeError(f"{self.path}: {len(self.entries) - self._next} tensors never written (first: "
                                   f"{self.entries[self._next].name})")
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()

    def abort(self) -> None:
        """Close the file without checks (the export failed; its temp directory goes)."""
        self._file.close()

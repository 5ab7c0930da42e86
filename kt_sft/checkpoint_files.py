"""A checkpoint directory's safetensors files: which shard holds which tensor, each tensor's dtype and shape, and
reading tensors by key.

`scan(path, expert_path)` reads the files' headers only (safetensors keeps them at the start of each file), so the
loader can check the whole checkpoint (kt_sft.checkpoint_formats.check_stored) and size it before it reads any
weight. Where a tensor lives comes from the headers themselves, not only from model.safetensors.index.json: a
checkpoint without an index, or with a scale in another shard than its weight, reads the same. `TensorReader`
then reads tensors by key while the loader streams the shards one by one.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from .checkpoint_formats import CheckpointFormatError

# safetensors' dtype names (header "dtype" field) -> torch dtypes.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
           "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def shard_files(path: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files and, when an index exists, its key -> file map."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a safetensors index (no valid weight_map: {err!r}); restore it from "
                             "the original checkpoint") from None
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if not files or missing:
            lack = f"{len(missing)} of the {len(files)} shards it lists are missing (first: {missing[0]})" if \
                missing else "it lists no shards"
            raise FileNotFoundError(f"{index}: {lack}; copy the complete checkpoint (every shard the index lists) "
                                    f"into {path}")
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (kt-sft loads safetensors checkpoints only)")
    return files, {}


TRUNCATED_ADVICE = "a copy or save was cut short (killed, or the disk was full)"


def open_safetensors(file: Path, what: str, advice: str):
    """safe_open of `file`, whose header safetensors checks against the file's size (a truncated file fails here,
    before any tensor is read); its own error (not a ValueError, and without the path) becomes a ValueError naming
    `what` and the file, then `advice`."""
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError: truncated or corrupt header / data
        raise ValueError(f"{what} {file} is truncated or corrupt ({err}): {TRUNCATED_ADVICE}; {advice}") from None


def open_shard(shard: Path):
    if not shard.is_file():
        raise FileNotFoundError(f"checkpoint shard {shard} listed in the index does not exist")
    return open_safetensors(shard, "checkpoint shard", "copy that file again from the original checkpoint")


@dataclass
class CheckpointFiles:
    """What the headers of a checkpoint's shards say (`scan`)."""

    sources: dict[Path, str]      # shard -> which of its tensors to load: "all", "dense" or "experts" (expert_path)
    keys: dict[Path, list[str]]   # shard -> its tensor keys, in file order
    headers: dict[str, tuple]     # key -> (torch dtype or the header's name for others, shape); expert_path wins
    where: dict[str, Path]        # key -> the shard it is read from (the same precedence)
    index: dict[str, str]         # the index files' key -> file maps, merged (for error messages)

    @property
    def largest_shard(self) -> int:
        return max(s.stat().st_size for s in self.sources)

    def shard_of(self, key: str) -> str:
        return self.where[key].name if key in self.where else "no shard"


def scan(path: Path, expert_path=None) -> CheckpointFiles:
    """The headers of every shard of `path` and, when given, of `expert_path` (whose safetensors hold the routed
    experts: expert keys are then read only from there, everything else only from `path`)."""
    shards, index = shard_files(path)
    sources = {shard: "all" for shard in shards}
    if expert_path is not None and Path(expert_path).resolve() != path.resolve():
        expert_shards, expert_index = shard_files(Path(expert_path))
        sources = {shard: "dense" for shard in shards}
        sources.update({shard: "experts" for shard in expert_shards})
        index = {**index, **expert_index}
    files = CheckpointFiles(sources, {}, {}, {}, index)
    for shard in sources:
        f = open_shard(shard)
        files.keys[shard] = list(f.keys())
        for key in files.keys[shard]:
            meta = f.get_slice(key)
            files.headers[key] = (_DTYPES.get(meta.get_dtype(), meta.get_dtype()), tuple(meta.get_shape()))
            files.where[key] = shard
    return files


class TensorReader:
    """Reads tensors by key: from the shard being streamed when it holds the key, else from the shard the headers
    name (a quantized weight's scale may sit in another shard). Moving to the next shard closes the others: a
    read shard's pages stop counting in the process's RSS, which stays near the packed experts plus one shard."""

    KEEP_OPEN = 2  # the shard being streamed + the last other one a scale came from

    def __init__(self, files: CheckpointFiles):
        self.files = files
        self.current: Optional[Path] = None
        self._current_keys: set = set()
        self._open: OrderedDict = OrderedDict()

    def use(self, shard: Path) -> None:
        """Stream `shard` next: its own keys are read from it."""
        self.current, self._current_keys = shard, set(self.files.keys[shard])
        self._open.clear()
        self._handle(shard)

    def get(self, key: str) -> torch.Tensor:
        return self._handle(self._shard_of(key)).get_tensor(key)

    def get_slice(self, key: str):
        """safetensors' lazy slice of `key` (`[e]` reads one row of the leading dimension, e.g. one expert)."""
        return self._handle(self._shard_of(key)).get_slice(key)

    def _shard_of(self, key: str) -> Path:
        shard = self.current if key in self._current_keys else self.files.where.get(key)
        if shard is None:
            raise CheckpointFormatError(f"{key} is missing: no shard holds it")
        return shard

    def _handle(self, shard: Path):
        if shard not in self._open:
            self._open[shard] = open_shard(shard)
            while len(self._open) > self.KEEP_OPEN:
                self._open.popitem(last=False)
        self._open.move_to_end(shard)
        return self._open[shard]

"""`SharedExpertStore`: the packed experts of every layer of a model in one shared-memory file, packed by one
process of a host and mapped read-only by the others, so the host's RAM holds them once.

The file (csrc/shared_segment.h) lives in a memory file system, `/dev/shm` unless `KT_SFT_SHM_DIR` names another;
each `ExpertLayer` adopts one page-aligned piece of it (`ExpertLayer.use_storage`; the pieces in layer order).
`create` makes the file and points the layers at it before anything is packed (the loader then packs into it as
into private memory); `open` maps it read-only in another process, the layers complete as they are. `unlink`
removes the name once every process has mapped it: the memory goes with the last process, however it ends.
A process killed before that (while packing) leaves its file behind; `remove_stale` deletes the files whose
creating process is gone (their names end in its pid), which `create` runs first.
Who packs and when the others may map is kt_sft.distributed's business; this module knows no process group.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional, Sequence

from .. import _engine

DEFAULT_DIR = "/dev/shm"
PREFIX = "kt-sft-experts-"
_STALE = re.compile(re.escape(PREFIX) + r".*-pid(\d+)$")


def store_dir() -> Path:
    """Where shared stores are made: KT_SFT_SHM_DIR, else /dev/shm."""
    return Path(os.environ.get("KT_SFT_SHM_DIR") or DEFAULT_DIR)


def store_path(tag: str, pid: Optional[int] = None) -> Path:
    """The store file of the process `pid` (default: this one) for `tag` (what tells the stores of one host apart)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", tag)
    return store_dir() / f"{PREFIX}{safe}-pid{os.getpid() if pid is None else pid}"


def offsets(layers: Sequence) -> tuple[list[int], int]:
    """Each layer's offset in the store and the store's size (pieces in the given order, page-aligned each)."""
    at, out = 0, []
    for layer in layers:
        out.append(at)
        at += layer.storage_bytes
    return out, at


def free_bytes(directory: Path) -> int:
    """Bytes a new file in `directory` may still take (tmpfs: its size limit less what it holds)."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def remove_stale(directory: Optional[Path] = None) -> list[str]:
    """Delete store files whose creating process no longer exists (it died before unlinking); their names."""
    directory = directory or store_dir()
    removed = []
    for path in directory.glob(PREFIX + "*"):
        m = _STALE.match(path.name)
        if m and not Path(f"/proc/{m[1]}").exists():
            try:
                path.unlink()
                removed.append(path.name)
            except OSError:  # another user's file, or removed meanwhile
                pass
    return removed


class SharedExpertStore:
    """One shared store file mapped in this process, and the layers that live in it."""

    def __init__(self, segment, layers: Sequence) -> None:
        self.segment, self.layers = segment, list(layers)

    @property
    def path(self) -> str:
        return self.segment.path

    @property
    def nbytes(self) -> int:
        return self.segment.bytes

    @classmethod
    def create(cls, path: os.PathLike, layers: Sequence) -> "SharedExpertStore":
        """A new store at `path` sized for `layers`, which from now on pack into it (before any weight is loaded)."""
        places, total = offsets(layers)
        remove_stale(Path(path).parent)
        free = free_bytes(Path(path).parent)
        if total > free:
            raise MemoryError(f"the host's shared expert store needs {total / 1e9:.2f} GB in {Path(path).parent}, "
                              f"which has {free / 1e9:.2f} GB free: enlarge it (Docker: --shm-size; mount -o "
                              "remount,size=... /dev/shm) or point KT_SFT_SHM_DIR at a larger memory file system")
        segment = _engine.SharedSegment(str(path), total, True)
        try:
            for layer, at in zip(layers, places):
                layer.use_storage(segment, at, packed=False)
        except BaseException:
            segment.unlink()
            raise
        return cls(segment, layers)

    @classmethod
    def open(cls, path: os.PathLike, layers: Sequence) -> "SharedExpertStore":
        """The store another process packed for layers of these shapes, mapped read-only; the layers are complete."""
        places, total = offsets(layers)
        segment = _engine.SharedSegment(str(path), total, False)
        for layer, at in zip(layers, places):
            layer.use_storage(segment, at, packed=True)
        return cls(segment, layers)

    def unlink(self) -> bool:
        """Remove the file's name (the mappings stay valid); True when this call removed it."""
        return self.segment.unlink()

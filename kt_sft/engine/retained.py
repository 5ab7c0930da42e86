"""The forwards an `ExpertLayer` keeps for a later backward, so that a checkpoint recompute does not run the
experts again.

Gradient checkpointing runs a layer's forward again before its backward with bit-identical inputs. A forward that
saved activations is kept as a `RetainedForward`; a later forward whose inputs and key equal one's returns its y
and handle instead of computing. The key says what else must match: the LoRA factors (tensor identity, storage,
in-place version and scales, so an optimizer step in between is never missed) and the GPU share (it changes which
side computes what; `split` holds the experts the share computed, which the recompute reuses). The engine layer's
saved-forward slots bound the cache (oldest dropped, in step with the
engine's own LRU slots, `grow_saved` raises both); backward drops the record it used.
"""
from __future__ import annotations

import ctypes
from typing import Hashable, NamedTuple, Optional, Union

import torch

_libc = ctypes.CDLL(None)
_libc.memcmp.restype = ctypes.c_int
_libc.memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical host tensors (dtype, shape, bytes). A memcmp for contiguous ones: 1.6 ms for a 16 MB x on one
    core of the 2-core box, where torch.equal took 27 ms on one thread (its parallel version leaves OpenMP workers
    spinning on the engine's cores, kt_sft.engine.autograd)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not (a.is_contiguous() and b.is_contiguous() and a.device.type == b.device.type == "cpu"):
        return torch.equal(a, b)
    return _libc.memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0


class HostCopy:
    """A device tensor's copy into page-locked host memory, queued on the current stream without waiting for it:
    the host goes on queueing the next layer's GPU work, and only a later reader (a checkpoint recompute, long
    after) waits for the copy."""

    def __init__(self, t: torch.Tensor) -> None:
        if t.device.type != "cuda":  # a copy even on the CPU: the caller goes on to use t
            self.host, self.done = t.to("cpu", copy=True), None
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.host.copy_(t, non_blocking=True)
        self.done = torch.cuda.Event()
        self.done.record(torch.cuda.current_stream(t.device))

    def value(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
            self.done = None
        return self.host


class RetainedForward(NamedTuple):
    """One kept forward: its host inputs (copies), its host output and the engine handle of its saved state."""

    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    y: Union[torch.Tensor, HostCopy]  # a HostCopy while the copy of a GPU-side result may still run
    handle: int
    key: Hashable
    split: tuple = ()  # the experts a GPU share computed in this forward (empty: all on the engine)

    def matches(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, key: Hashable) -> bool:
        return (self.key == key and same_bits(self.topk_ids, topk_ids)
                and same_bits(self.topk_weights, topk_weights) and same_bits(self.x, x))

    def host_y(self) -> torch.Tensor:
        """y on the host, waiting for its copy if one is still running."""
        return self.y.value() if isinstance(self.y, HostCopy) else self.y

    @property
    def nbytes(self) -> int:
        y = self.y.host if isinstance(self.y, HostCopy) else self.y
        return sum(t.numel() * t.element_size() for t in (self.x, self.topk_ids, self.topk_weights, y))


class RetainedForwards:
    """A layer's kept forwards, at most as many as `slots.max_saved` (the engine layer's saved-forward slots)."""

    def __init__(self, slots) -> None:
        self._slots = slots
        self.entries: list[RetainedForward] = []

    def find(self, x, topk_ids, topk_weights, key: Hashable) -> Optional[RetainedForward]:
        return next((e for e in self.entries if e.matches(x, topk_ids, topk_weights, key)), None)

    def add(self, x, topk_ids, topk_weights, y, handle: int, key: Hashable, split: tuple = (),
            keep_x: bool = False) -> None:
        """Keep a forward; the inputs are copied (the caller's staging buffers are reused by the next call), x only
        without `keep_x` (the caller hands over a tensor of its own)."""
        self.entries.append(RetainedForward(x if keep_x else x.clone(), topk_ids.clone(), topk_weights.clone(), y,
                                            handle, key, tuple(split)))
        del self.entries[: max(0, len(self.entries) - self._slots.max_saved)]

    def drop(self, handle: int) -> None:
        self.entries = [e for e in self.entries if e.handle != handle]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

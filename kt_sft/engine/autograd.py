"""Autograd glue: `moe_experts(x, topk_ids, topk_weights, layer)` runs the routed experts on the CPU engine
and lets `loss.backward()` flow into `x` and `topk_weights` (the experts themselves are frozen).

Inputs may live on a GPU: they are copied through pinned host buffers (reused, grow-only) and results go
back non-blocking; an event guards each pinned buffer so it is not overwritten while a copy still reads it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .layer import ExpertLayer


class PinnedStaging:
    """Grow-only pinned host buffers keyed by name, each guarded by the CUDA event of its last async copy."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._events: dict[str, torch.cuda.Event] = {}

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        numel = 1
        for s in shape:
            numel *= s
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            self.wait(name)
            buf = torch.empty(max(numel, 1), dtype=dtype, pin_memory=True)
            self._buffers[name] = buf
        else:
            self.wait(name)
        return buf[:numel].view(shape)

    def wait(self, name: str) -> None:
        ev = self._events.pop(name, None)
        if ev is not None:
            ev.synchronize()

    def to_host(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Device tensor -> pinned host tensor (dtype converted on the device first), ready to read."""
        src = t.to(dtype).contiguous()
        host = self.buffer(name, tuple(src.shape), dtype)
        host.copy_(src, non_blocking=True)
        torch.cuda.current_stream(t.device).synchronize()
        return host

    def to_device(self, name: str, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Host tensor -> device via a pinned buffer; the copy runs asynchronously on the current stream."""
        pinned = self.buffer(name, tuple(host.shape), host.dtype)
        pinned.copy_(host)
        out = torch.empty(host.shape, dtype=host.dtype, device=device)
        out.copy_(pinned, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(device))
        self._events[name] = ev
        return out


_staging: Optional[PinnedStaging] = None


def _staging_buffers() -> PinnedStaging:
    global _staging
    if _staging is None:
        _staging = PinnedStaging()
    return _staging


def _to_engine(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.device.type == "cuda":
        return _staging_buffers().to_host(name, t, dtype)
    return t.to(dtype).contiguous()


def _from_engine(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "cuda":
        return _staging_buffers().to_device(name, t, device).to(dtype)
    return t.to(device=device, dtype=dtype)


class MoEExpertsFunction(torch.autograd.Function):
    """y = experts(x) weighted by topk_weights; gradients for x and topk_weights, none for the frozen weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer):
        if x.dim() != 2:
            raise ValueError(f"x: expected [tokens, hidden], got shape {list(x.shape)}")
        save = ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        x_host = _to_engine("x", x, layer.dtype)
        ids_host = _to_engine("ids", topk_ids, torch.int64)
        w_host = _to_engine("w", topk_weights, torch.float32)
        y, handle = layer.forward(x_host, ids_host, w_host, save_for_backward=save)
        ctx.layer, ctx.handle = layer, handle
        ctx.x_meta = (x.device, x.dtype)
        ctx.w_meta = (topk_weights.device, topk_weights.dtype)
        return _from_engine("y", y, x.device, x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        layer: ExpertLayer = ctx.layer
        dx, dw = layer.backward(ctx.handle, _to_engine("dy", dy, layer.dtype))
        dx = _from_engine("dx", dx, *ctx.x_meta) if ctx.needs_input_grad[0] else None
        dw = _from_engine("dw", dw, *ctx.w_meta) if ctx.needs_input_grad[2] else None
        return dx, None, dw, None


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer) -> torch.Tensor:
    """Differentiable routed-experts call: x [T, H], topk_ids [T, k], topk_weights [T, k] -> y [T, H]."""
    return MoEExpertsFunction.apply(x, topk_ids, topk_weights, layer)

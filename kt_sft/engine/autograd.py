"""Autograd glue: `moe_experts(x, topk_ids, topk_weights, layer)` runs the routed experts on the CPU engine
and lets `loss.backward()` flow into `x` and `topk_weights` (the experts themselves are frozen), and, with
`lora=ExpertLoRA(...)`, into the four LoRA factor tensors (their `.grad`, like any parameter).

Inputs may live on a GPU: they are copied through pinned host buffers (reused, grow-only) and results go
back non-blocking; an event guards each pinned buffer so it is not overwritten while a copy still reads it.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

from .gpu_share import engine_thread
from .layer import ExpertLayer
from .lora import ExpertLoRA
from .runtime import set_worker_spin_us

# Idle engine workers spin this long between calls (csrc/thread_pool.h). Training with the rest of the model on
# a GPU calls the engine every few ms while the CPU has nothing else to do: a long spin keeps the cores awake
# (V2-Lite end to end, bench_e2e.py, alternating runs on the device: 894 / 804 tokens/s with 100 us against
# 1,064 / 965 with this; with 100 us every call paid the cores' wake-up and the GEMMs ran 20-35 % slower than
# in bench_moe). Inference, and CPU-only training, where torch needs the cores between calls, keep the short
# default.
GPU_TRAINING_SPIN_US, DEFAULT_SPIN_US = 20000, 100
# Handles of forwards whose experts all ran on the GPU share (no engine call): negative, never seen by the engine.
_share_only_handles = itertools.count(1)


def _set_spin(training_on_gpu: bool) -> None:
    set_worker_spin_us(GPU_TRAINING_SPIN_US if training_on_gpu else DEFAULT_SPIN_US)


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
        """Host tensor -> device via a pinned buffer; the copy runs asynchronously on the current stream.
        `host` may already be that buffer (the engine wrote into it): then nothing is copied on the host."""
        pinned = self._buffers.get(name)
        if host.is_pinned():
            # The staging buffer itself, or an engine output from the caching pinned allocator (layer.py): copied
            # as it is. That allocator records the copy's event, so the block is not reused before the copy ends.
            pinned = host
        elif pinned is None or host.data_ptr() != pinned.data_ptr():
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


class _HostCopy:
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


def _host_value(y):
    return y.value() if isinstance(y, _HostCopy) else y


class RetainedForwards:
    """What one layer's forwards kept for a later backward, so a checkpoint recompute does not re-run the experts.

    Gradient checkpointing runs a layer's forward again before its backward with bit-identical inputs. An entry
    holds (x, topk_ids, topk_weights, y, handle, lora_key) of a forward that saved activations; a forward whose
    inputs equal an entry's returns that entry's y and handle instead of computing. lora_key identifies the LoRA
    factors (tensor identity, storage and in-place version, scales; None without LoRA), so an optimizer step
    in between is never missed. Bounded by the layer's
    `max_saved` (oldest dropped, in step with the engine's own LRU slots); backward drops the entry it used.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple] = []

    def find(self, x, ids, w, lora_key=None):
        for entry in self.entries:
            ex, eids, ew = entry[:3]
            if ex.shape == x.shape and eids.shape == ids.shape and entry[5] == lora_key and torch.equal(eids, ids) \
                    and torch.equal(ew, w) and torch.equal(ex, x):
                return entry
        return None

    def add(self, x, ids, w, y, handle, lora_key=None) -> None:
        self.entries.append((x.clone(), ids.clone(), w.clone(), y, handle, lora_key))
        del self.entries[: max(0, len(self.entries) - self.capacity)]

    def drop(self, handle) -> None:
        self.entries = [e for e in self.entries if e[4] != handle]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for e in self.entries
                   for t in (e[0], e[1], e[2], e[3].host if isinstance(e[3], _HostCopy) else e[3]))


def retained_forwards(layer: ExpertLayer) -> RetainedForwards:
    cache = getattr(layer, "_retained", None)
    if cache is None:
        cache = layer._retained = RetainedForwards(layer.max_saved)
    return cache


def _lora_key(factors, scales):
    if scales is None:
        return None
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in factors) + tuple(scales)


def _active_share(layer: ExpertLayer, x: torch.Tensor):
    share = getattr(layer, "gpu_share", None)
    return share if share is not None and share.applies(x) else None


def _share_lora(share, factors, scales) -> Optional[ExpertLoRA]:
    """The factors as GpuShare takes them (fp32 on its device); None without LoRA."""
    if scales is None:
        return None
    return ExpertLoRA(*(None if t is None else t.detach().to(device=share.device, dtype=torch.float32)
                        for t in factors), *scales)


def _factor_to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # CPU fp32 contiguous factors (the usual case) are passed as they are, without a copy.
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float32).contiguous()


class MoEExpertsFunction(torch.autograd.Function):
    """y = experts(x) weighted by topk_weights; gradients for x, topk_weights and the optional LoRA factors
    (A_gu, B_gu, A_d, B_d, PEFT layout), none for the frozen weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer,
                save: bool, lora_scales=None, A_gu=None, B_gu=None, A_d=None, B_d=None):
        if x.dim() != 2:
            raise ValueError(f"x: expected [tokens, hidden], got shape {list(x.shape)}")
        factors = (A_gu, B_gu, A_d, B_d)
        lora = None if lora_scales is None else ExpertLoRA(*(_factor_to_host(t) for t in factors), *lora_scales)
        lora_key = _lora_key(factors, lora_scales)
        share = _active_share(layer, x)
        if share is not None:
            # Its first weight copies run while the host waits for the router below. A checkpoint recompute
            # (retained, no share call) leaves them to the backward that follows it at once, which streams the
            # same chunks first.
            share.prefetch()
        x_host = _to_engine("x", x, layer.dtype)
        ids_host = _to_engine("ids", topk_ids, torch.int64)
        w_host = _to_engine("w", topk_weights, torch.float32)
        _set_spin(save and x.device.type == "cuda")
        # The share changes which side computes what: a retained forward counts only under the same share.
        key = (lora_key, None if share is None else (id(share), share.first))
        retained = retained_forwards(layer) if save else None
        hit = retained.find(x_host, ids_host, w_host, key) if retained is not None else None
        ctx.share, ctx.share_plan = None, None
        kept = None  # a host y that the retained cache holds
        if hit is not None:
            kept, handle = _host_value(hit[3]), hit[4]
            if share is not None:
                ctx.share, ctx.share_plan = share, share.split(ids_host)[1]
            out = _from_engine("y", kept, x.device, x.dtype)
        elif share is not None:
            # Part of the experts on the GPU: the engine runs the rest from a helper thread meanwhile.
            ids_engine, plan = share.split(ids_host)
            job = None
            if share.first > 0:
                job = engine_thread().submit(layer.forward, x_host, ids_engine, w_host, save_for_backward=save,
                                             lora=lora)
            y_share = share.forward(x.detach(), topk_weights.detach(), plan, _share_lora(share, factors, lora_scales))
            share.join(y_share)
            if job is None:  # every expert on the GPU: the engine has nothing to do
                out, handle = y_share.to(x.dtype), (-next(_share_only_handles) if save else 0)
            else:
                y_cpu, handle = job.result()
                out = (_from_engine("y", y_cpu, x.device, torch.float32) + y_share).to(x.dtype)
            if save:
                retained.add(x_host, ids_host, w_host, _HostCopy(out.to(layer.dtype)), handle, key)
                ctx.share, ctx.share_plan = share, plan
        else:
            # Inference (decode) on a GPU: the engine writes straight into the pinned buffer the result is copied
            # from, so a step costs no host allocation and no extra host copy.
            buf = _staging_buffers().buffer("y", (x.shape[0], layer.hidden_size), layer.dtype) \
                if x.device.type == "cuda" and not save else None
            y, handle = layer.forward(x_host, ids_host, w_host, save_for_backward=save, out=buf, lora=lora)
            if save:
                retained.add(x_host, ids_host, w_host, y, handle, key)
                kept = y
            out = _from_engine("y", y, x.device, x.dtype)
        if kept is not None and out.data_ptr() == kept.data_ptr():
            out = out.clone()  # the retained y must stay intact
        ctx.layer, ctx.handle = layer, handle
        ctx.x_meta = (x.device, x.dtype)
        ctx.w_meta = (topk_weights.device, topk_weights.dtype)
        ctx.lora_scales = lora_scales
        if ctx.share is not None:
            ctx.share_inputs = (x.detach(), topk_weights.detach())
        if lora_scales is not None:
            # Saved so that autograd refuses a backward after an in-place update of a factor (the engine's saved
            # u = x.B_gu and q = h.B_d belong to the values of this forward).
            ctx.save_for_backward(*factors)
        return out

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        layer: ExpertLayer = ctx.layer
        if not ctx.handle:
            raise RuntimeError("this experts forward saved nothing for backward (it ran without inputs requiring grad)")
        retained_forwards(layer).drop(ctx.handle)
        factors = ctx.saved_tensors if ctx.lora_scales is not None else (None,) * 4
        lora = None if ctx.lora_scales is None else ExpertLoRA(*(_factor_to_host(t) for t in factors),
                                                               *ctx.lora_scales)
        share, engine_part = ctx.share, ctx.handle > 0  # handle < 0: every expert ran on the GPU share
        job = res = None
        if engine_part:
            _set_spin(dy.device.type == "cuda")
            dy_host = _to_engine("dy", dy, layer.dtype)
            if share is None:
                res = layer.backward(ctx.handle, dy_host, lora=lora)
            else:
                job = engine_thread().submit(layer.backward, ctx.handle, dy_host, lora=lora)
        if share is not None:
            s_dx, s_dw, s_grads = share.backward(*ctx.share_inputs, dy, ctx.share_plan,
                                                 _share_lora(share, factors, ctx.lora_scales))
            share.join(s_dx, s_dw, *(s_grads or ()))
            if job is not None:
                res = job.result()

        def total(needed, name, meta, engine_grad, share_grad):
            """An input gradient: the engine's (host, or None) plus the share's (fp32 on the device, or None)."""
            if not needed:
                return None
            if share_grad is None:
                return _from_engine(name, engine_grad, *meta)
            if engine_grad is None:
                return share_grad.to(meta[1])
            return (_from_engine(name, engine_grad, meta[0], torch.float32) + share_grad).to(meta[1])

        dx = total(ctx.needs_input_grad[0], "dx", ctx.x_meta, None if res is None else res[0],
                   None if share is None else s_dx)
        dw = total(ctx.needs_input_grad[2], "dw", ctx.w_meta, None if res is None else res[1],
                   None if share is None else s_dw)
        factor_grads = (None,) * 4
        if lora is not None:
            grads = res[2] if res is not None else (None,) * 4
            if share is not None:
                grads = tuple(sg if g is None else g if sg is None else g + sg.to(g.device)
                              for g, sg in zip(grads, s_grads or (None,) * 4))
            factor_grads = tuple(
                g.to(device=t.device, dtype=t.dtype) if g is not None and t is not None and ctx.needs_input_grad[6 + i]
                else None for i, (g, t) in enumerate(zip(grads, factors)))
        return ((dx, None, dw, None, None, None) + factor_grads)[: len(ctx.needs_input_grad)]


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer,
                retain: bool = False, lora: Optional[ExpertLoRA] = None) -> torch.Tensor:
    """Differentiable routed-experts call: x [T, H], topk_ids [T, k], topk_weights [T, k] -> y [T, H].

    Activations are saved when a gradient can flow to x, topk_weights or a LoRA factor, or when `retain` asks
    for it: a training-mode forward under no_grad is the first pass of reentrant gradient checkpointing, and
    keeping its result lets the recompute pass skip the CPU experts (see RetainedForwards).

    `lora`: per-expert LoRA on the routed experts (`ExpertLoRA`, PEFT's flat layout, one rank per projection).
    The factors may be parameters on any device (GPU ones are copied to the host for each call, their gradients
    back); their gradients arrive through autograd, so accumulation, clipping and optimizers work as usual.
    """
    factors = (None,) * 4 if lora is None else lora.factors()
    save = retain or (torch.is_grad_enabled() and (x.requires_grad or topk_weights.requires_grad or any(
        t is not None and t.requires_grad for t in factors)))
    if lora is None:
        return MoEExpertsFunction.apply(x, topk_ids, topk_weights, layer, save)
    scales = (float(lora.scale_gu), float(lora.scale_d))
    return MoEExpertsFunction.apply(x, topk_ids, topk_weights, layer, save, scales, *factors)

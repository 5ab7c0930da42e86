"""Autograd glue: `moe_experts(x, topk_ids, topk_weights, layer)` runs the routed experts on the CPU engine
and lets `loss.backward()` flow into `x` and `topk_weights` (the experts themselves are frozen), and, with
`lora=ExpertLoRA(...)`, into the four LoRA factor tensors (their `.grad`, like any parameter).

Inputs may live on a GPU: they are copied through pinned host buffers (reused, grow-only) and results go
back non-blocking; an event guards each pinned buffer so it is not overwritten while a copy still reads it.

With `share=` (a `GpuShare` of the layer, kt_sft.engine.gpu_share) large calls compute part of the experts on the
GPU; this module only calls the share's methods and never imports it, so the engine core does not depend on it.
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from .layer import ExpertLayer
from .lora import ExpertLoRA
from .retained import HostCopy
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
_engine_worker_thread: Optional[ThreadPoolExecutor] = None


def _staging_buffers() -> PinnedStaging:
    global _staging
    if _staging is None:
        _staging = PinnedStaging()
    return _staging


def _engine_worker() -> ThreadPoolExecutor:
    """One helper thread that makes the (GIL-releasing) engine calls while the caller launches the share's GPU work."""
    global _engine_worker_thread
    if _engine_worker_thread is None:
        _engine_worker_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kt-sft-engine")
    return _engine_worker_thread


def _to_engine(name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if t.device.type == "cuda":
        return _staging_buffers().to_host(name, t, dtype)
    return t.to(dtype).contiguous()


def _from_engine(name: str, t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if device.type == "cuda":
        return _staging_buffers().to_device(name, t, device).to(dtype)
    return t.to(device=device, dtype=dtype)


def _lora_key(factors, scales):
    if scales is None:
        return None
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version) for t in factors) + tuple(scales)


def _active_share(share, layer: ExpertLayer, x: torch.Tensor):
    """The share when it computes this call (a large enough call on its device), else None."""
    if share is None:
        return None
    if share.layer is not layer:
        raise ValueError("share: a GpuShare of another ExpertLayer (create it with GpuShare(layer, ...))")
    return share if share.applies(x) else None


def _share_lora(share, factors, scales) -> Optional[ExpertLoRA]:
    """The factors as GpuShare takes them (fp32 on its device); None without LoRA."""
    if scales is None:
        return None
    return ExpertLoRA(*(None if t is None else t.detach().to(device=share.device, dtype=torch.float32)
                        for t in factors), *scales)


def _factor_to_host(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # CPU fp32 contiguous factors (the usual case) are passed as they are, without a copy.
    return None if t is None else t.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _forward_with_share(layer: ExpertLayer, share, x, topk_weights, x_host, ids_host, w_host, save: bool,
                        lora: Optional[ExpertLoRA], share_lora: Optional[ExpertLoRA]):
    """Part of the experts on the GPU share while the engine runs the rest from a helper thread:
    (y on x's device, engine handle, the share's plan)."""
    ids_engine, plan = share.split(ids_host)
    job = None
    if share.first > 0:
        job = _engine_worker().submit(layer.forward, x_host, ids_engine, w_host, save_for_backward=save, lora=lora)
    y_share = share.forward(x.detach(), topk_weights.detach(), plan, share_lora)
    share.join(y_share)
    if job is None:  # every expert on the GPU: the engine has nothing to do
        return y_share.to(x.dtype), (-next(_share_only_handles) if save else 0), plan
    y_cpu, handle = job.result()
    return (_from_engine("y", y_cpu, x.device, torch.float32) + y_share).to(x.dtype), handle, plan


def _input_grad(needed: bool, name: str, meta, engine_grad, share_grad):
    """An input gradient: the engine's (host, or None) plus the share's (fp32 on the device, or None)."""
    if not needed:
        return None
    if share_grad is None:
        return _from_engine(name, engine_grad, *meta)
    if engine_grad is None:
        return share_grad.to(meta[1])
    return (_from_engine(name, engine_grad, meta[0], torch.float32) + share_grad).to(meta[1])


def _factor_grads(engine_grads, share_grads, factors, needed) -> tuple:
    """The LoRA factors' gradients (engine's plus share's), each on its factor's device and dtype."""
    grads = engine_grads if engine_grads is not None else (None,) * 4
    if share_grads is not None:
        grads = tuple(sg if g is None else g if sg is None else g + sg.to(g.device)
                      for g, sg in zip(grads, share_grads))
    return tuple(g.to(device=t.device, dtype=t.dtype) if g is not None and t is not None and need else None
                 for g, t, need in zip(grads, factors, needed))


class MoEExpertsFunction(torch.autograd.Function):
    """y = experts(x) weighted by topk_weights; gradients for x, topk_weights and the optional LoRA factors
    (A_gu, B_gu, A_d, B_d, PEFT layout), none for the frozen weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer,
                save: bool, share=None, lora_scales=None, A_gu=None, B_gu=None, A_d=None, B_d=None):
        if x.dim() != 2:
            raise ValueError(f"x: expected [tokens, hidden], got shape {list(x.shape)}")
        factors = (A_gu, B_gu, A_d, B_d)
        lora = None if lora_scales is None else ExpertLoRA(*(_factor_to_host(t) for t in factors), *lora_scales)
        share = _active_share(share, layer, x)
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
        key = (_lora_key(factors, lora_scales), None if share is None else (id(share), share.first))
        hit = layer.retained.find(x_host, ids_host, w_host, key) if save else None
        kept, plan = None, None  # kept: a host y that layer.retained holds
        if hit is not None:
            kept, handle = hit.host_y(), hit.handle
            plan = None if share is None else share.split(ids_host)[1]
            out = _from_engine("y", kept, x.device, x.dtype)
        elif share is not None:
            out, handle, plan = _forward_with_share(layer, share, x, topk_weights, x_host, ids_host, w_host, save,
                                                    lora, _share_lora(share, factors, lora_scales))
            if save:
                layer.retained.add(x_host, ids_host, w_host, HostCopy(out.to(layer.dtype)), handle, key)
        else:
            # Inference (decode) on a GPU: the engine writes straight into the pinned buffer the result is copied
            # from, so a step costs no host allocation and no extra host copy.
            buf = _staging_buffers().buffer("y", (x.shape[0], layer.hidden_size), layer.dtype) \
                if x.device.type == "cuda" and not save else None
            y, handle = layer.forward(x_host, ids_host, w_host, save_for_backward=save, out=buf, lora=lora)
            if save:
                layer.retained.add(x_host, ids_host, w_host, y, handle, key)
                kept = y
            out = _from_engine("y", y, x.device, x.dtype)
        if kept is not None and out.data_ptr() == kept.data_ptr():
            out = out.clone()  # the retained y must stay intact
        ctx.layer, ctx.handle, ctx.lora_scales = layer, handle, lora_scales
        ctx.x_meta, ctx.w_meta = (x.device, x.dtype), (topk_weights.device, topk_weights.dtype)
        ctx.share, ctx.share_plan = (share, plan) if save and share is not None else (None, None)
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
        layer.retained.drop(ctx.handle)
        factors = ctx.saved_tensors if ctx.lora_scales is not None else (None,) * 4
        lora = None if ctx.lora_scales is None else ExpertLoRA(*(_factor_to_host(t) for t in factors),
                                                               *ctx.lora_scales)
        share = ctx.share
        job = res = None
        if ctx.handle > 0:  # handle < 0: every expert ran on the GPU share
            _set_spin(dy.device.type == "cuda")
            dy_host = _to_engine("dy", dy, layer.dtype)
            if share is None:
                res = layer.backward(ctx.handle, dy_host, lora=lora)
            else:
                job = _engine_worker().submit(layer.backward, ctx.handle, dy_host, lora=lora)
        s_dx = s_dw = s_grads = None
        if share is not None:
            s_dx, s_dw, s_grads = share.backward(*ctx.share_inputs, dy, ctx.share_plan,
                                                 _share_lora(share, factors, ctx.lora_scales))
            share.join(s_dx, s_dw, *(s_grads or ()))
            if job is not None:
                res = job.result()
        needed = ctx.needs_input_grad
        dx = _input_grad(needed[0], "dx", ctx.x_meta, None if res is None else res[0], s_dx)
        dw = _input_grad(needed[2], "dw", ctx.w_meta, None if res is None else res[1], s_dw)
        factor_grads = (None,) * 4
        if lora is not None:
            factor_grads = _factor_grads(res[2] if res is not None else None, s_grads, factors, needed[7:11])
        return ((dx, None, dw, None, None, None, None) + factor_grads)[: len(needed)]


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer,
                retain: bool = False, lora: Optional[ExpertLoRA] = None, share=None) -> torch.Tensor:
    """Differentiable routed-experts call: x [T, H], topk_ids [T, k], topk_weights [T, k] -> y [T, H].

    Activations are saved when a gradient can flow to x, topk_weights or a LoRA factor, or when `retain` asks
    for it: a training-mode forward under no_grad is the first pass of reentrant gradient checkpointing, and
    keeping its result lets the recompute pass skip the CPU experts (`layer.retained`, kt_sft.engine.retained).

    `lora`: per-expert LoRA on the routed experts (`ExpertLoRA`, PEFT's flat layout, one rank per projection).
    The factors may be parameters on any device (GPU ones are copied to the host for each call, their gradients
    back); their gradients arrive through autograd, so accumulation, clipping and optimizers work as usual.

    `share`: a `GpuShare` of `layer` (kt_sft.engine.gpu_share) that computes its experts on the GPU for the calls
    it applies to (inputs on its device, at least its `min_tokens` tokens); None: every expert on the engine.
    """
    factors = (None,) * 4 if lora is None else lora.factors()
    save = retain or (torch.is_grad_enabled() and (x.requires_grad or topk_weights.requires_grad or any(
        t is not None and t.requires_grad for t in factors)))
    if lora is None:
        return MoEExpertsFunction.apply(x, topk_ids, topk_weights, layer, save, share)
    scales = (float(lora.scale_gu), float(lora.scale_d))
    return MoEExpertsFunction.apply(x, topk_ids, topk_weights, layer, save, share, scales, *factors)

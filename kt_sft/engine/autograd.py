"""Autograd glue: `moe_experts(x, topk_ids, topk_weights, layer)` runs the routed experts on the CPU engine
and lets `loss.backward()` flow into `x` and `topk_weights` (the experts themselves are frozen), and, with
`lora=ExpertLoRA(...)`, into the four LoRA factor tensors (their `.grad`, like any parameter).

Inputs may live on a GPU: they are copied through pinned host buffers (reused, grow-only) and results go
back non-blocking; an event guards each pinned buffer so it is not overwritten while a copy still reads it.

With `share=` (a `GpuShare` of the layer, kt_sft.engine.gpu_share) large calls compute part of the experts on the
GPU; this module only calls the share's methods and never imports it, so the engine core does not depend on it.
The share's call runs as: the engine's call first (from a helper thread, the GIL released in C++), then the share's
plan and GPU launches, then the joins; each engine call's rows and wall seconds go to the share (`record`), whose
"auto" split balances on them.

Host work of the glue on GPU runs stays on its own thread (`_serial_host_ops`): torch's OpenMP workers spin ~6 ms
after each parallel region (libgomp's default wait policy) on the cores the engine's pool is about to use; a short
engine forward right after a parallel 32 MB clone ran 2.1x slower than after a one-thread clone (2-core box, same
process, /tmp/omp_vs_engine.py of the hybrid branch: 17.1 / 8.2 ms and 19.4 / 9.1 ms), the slowdown issue 25 saw
on the split's short engine calls. For the same reason a saved forward keeps its fresh pinned x instead of cloning
the staging buffer (16 MB per V2-Lite layer at 4096 tokens).
"""
from __future__ import annotations

import contextlib
import itertools
import time
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

    def to_host(self, name: str, t: torch.Tensor, dtype: torch.dtype, fresh: bool = False,
                sync: bool = True) -> torch.Tensor:
        """Device tensor -> pinned host tensor (dtype converted on the device first), ready to read once the
        stream is synchronized (`sync`: here). `fresh`: a new pinned tensor (from torch's caching pinned
        allocator) that the caller may keep, instead of the reused buffer `name`."""
        src = t.to(dtype).contiguous()
        if fresh:
            host = torch.empty(src.shape, dtype=dtype, pin_memory=True)
        else:
            host = self.buffer(name, tuple(src.shape), dtype)
        host.copy_(src, non_blocking=True)
        if sync:
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


def _to_engine_later(name: str, t: torch.Tensor, dtype: torch.dtype):
    """(host tensor, the event after which it holds t, None off CUDA): the copy queued, nobody waiting yet. For
    the engine's helper thread to wait on, so that the caller's stream does not drain before the share's launches
    (a host wait leaves the GPU idle until the host queues its next work)."""
    if t.device.type != "cuda":
        return t.to(dtype).contiguous(), None
    host = _staging_buffers().to_host(name, t, dtype, sync=False)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(t.device))
    return host, ready


def _timed_after(ready, fn, *args, **kwargs):
    """_timed(fn, ...) once the event `ready` (None: at once) completed; the wait is not timed."""
    if ready is not None:
        ready.synchronize()
    return _timed(fn, *args, **kwargs)


def _inputs_to_engine(layer: ExpertLayer, x, topk_ids, topk_weights, keep_x: bool):
    """(x, topk_ids, topk_weights) on the host for the engine, with one wait for the GPU. keep_x: x may be kept
    by `layer.retained` as it is (a fresh pinned tensor, or a copy of a host x); else it is a reused buffer or
    the caller's own tensor."""
    if x.device.type != "cuda":
        x_host = x.to(layer.dtype).contiguous()
        if keep_x and x_host.data_ptr() == x.data_ptr():
            x_host = x_host.clone()  # the caller's tensor: they may change it in place
        return x_host, _to_engine("ids", topk_ids, torch.int64), _to_engine("w", topk_weights, torch.float32)
    staging = _staging_buffers()
    x_host = staging.to_host("x", x, layer.dtype, fresh=keep_x, sync=False)
    ids_host = staging.to_host("ids", topk_ids, torch.int64, sync=False)
    return x_host, ids_host, staging.to_host("w", topk_weights, torch.float32)


@contextlib.contextmanager
def _serial_host_ops(on_gpu: bool):
    """Torch's host ops in the block run on this thread alone when the model is on a GPU (see the module's note)."""
    threads = torch.get_num_threads()
    if not on_gpu or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _timed(fn, *args, **kwargs):
    """(fn's result, its wall seconds): an engine call measured where it runs."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


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


def _forward_with_share(layer: ExpertLayer, share, experts: tuple, counts: list, x, topk_ids, topk_weights, x_host,
                        ids_host, w_host, save: bool, lora: Optional[ExpertLoRA], share_lora: Optional[ExpertLoRA]):
    """`experts` on the GPU share while the engine runs the rest from a helper thread, its call issued before the
    share's plan and launches: (y on x's device, engine handle, the share's plan)."""
    job = None
    if sum(counts) > sum(counts[e] for e in experts):  # the engine has rows
        job = _engine_worker().submit(_timed, layer.forward, x_host, share.engine_ids(ids_host, experts), w_host,
                                      save_for_backward=save, lora=lora)
    plan = share.plan(topk_ids, experts, counts)
    y_share = share.forward(x.detach(), topk_weights.detach(), plan, share_lora)
    share.join(y_share)
    if job is None:  # every routed slot on the GPU: the engine has nothing to do
        share.record("forward", 0, 0.0, shared=True)
        return y_share.to(x.dtype), (-next(_share_only_handles) if save else 0), plan
    (y_cpu, handle), seconds = job.result()
    share.record("forward", plan["engine_rows"], seconds, shared=True)
    return (_from_engine("y", y_cpu, x.device, torch.float32) + y_share).to(x.dtype), handle, plan


def _engine_forward(layer: ExpertLayer, share, x, x_host, ids_host, w_host, save: bool, lora):
    """Every expert on the engine (in this thread): (y on x's device, the host y to retain, handle). `share`: the
    call's GpuShare that chose no expert, told the engine's rows and seconds."""
    # Inference (decode) on a GPU: the engine writes straight into the pinned buffer the result is copied from, so a
    # step costs no host allocation and no extra host copy.
    buf = _staging_buffers().buffer("y", (x.shape[0], layer.hidden_size), layer.dtype) \
        if x.device.type == "cuda" and not save else None
    (y, handle), seconds = _timed(layer.forward, x_host, ids_host, w_host, save_for_backward=save, out=buf, lora=lora)
    if share is not None:
        share.record("forward", int((ids_host >= 0).sum()), seconds, shared=False)
    return _from_engine("y", y, x.device, x.dtype), y, handle


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


def _experts_forward(layer: ExpertLayer, share, x, topk_ids, topk_weights, save: bool, factors, lora_scales):
    """The forward's work: (y on x's device, engine handle, the share's plan or None, the engine's routed rows)."""
    lora = None if lora_scales is None else ExpertLoRA(*(_factor_to_host(t) for t in factors), *lora_scales)
    if share is not None:
        # Its first weight copies run while the host waits for the router below. A checkpoint recompute
        # (retained, no share call) leaves them to the backward that follows it at once, which streams the
        # same chunks first.
        share.prefetch()
    x_host, ids_host, w_host = _inputs_to_engine(layer, x, topk_ids, topk_weights, keep_x=save)
    _set_spin(save and x.device.type == "cuda")
    # Which side computed what is the retained record's own (split): the recompute reuses it whatever the share
    # would choose now.
    key = (_lora_key(factors, lora_scales), None if share is None else id(share))
    hit = layer.retained.find(x_host, ids_host, w_host, key) if save else None
    counts = share.routed_counts(ids_host) if share is not None else None
    if hit is not None:
        plan = share.plan(topk_ids, hit.split, counts) if hit.split else None
        kept = hit.host_y()
        out = _from_engine("y", kept, x.device, x.dtype)
        out = out.clone() if out.data_ptr() == kept.data_ptr() else out  # the retained y must stay intact
        return out, hit.handle, plan, _engine_rows(ids_host, plan)
    experts = share.choose(counts, backward=save) if share is not None else ()
    if experts:
        out, handle, plan = _forward_with_share(layer, share, experts, counts, x, topk_ids, topk_weights, x_host,
                                                ids_host, w_host, save, lora, _share_lora(share, factors, lora_scales))
        if save:
            layer.retained.add(x_host, ids_host, w_host, HostCopy(out.to(layer.dtype)), handle, key, split=experts,
                               keep_x=True)
        return out, handle, plan, plan["engine_rows"]
    out, y, handle = _engine_forward(layer, share, x, x_host, ids_host, w_host, save, lora)
    if save:
        layer.retained.add(x_host, ids_host, w_host, y, handle, key, keep_x=True)
        out = out.clone() if out.data_ptr() == y.data_ptr() else out  # the retained y must stay intact
    return out, handle, None, _engine_rows(ids_host, None)


def _engine_rows(ids_host: torch.Tensor, plan) -> int:
    return plan["engine_rows"] if plan is not None else int((ids_host >= 0).sum())


class MoEExpertsFunction(torch.autograd.Function):
    """y = experts(x) weighted by topk_weights; gradients for x, topk_weights and the optional LoRA factors
    (A_gu, B_gu, A_d, B_d, PEFT layout), none for the frozen weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer,
                save: bool, share=None, lora_scales=None, A_gu=None, B_gu=None, A_d=None, B_d=None):
        if x.dim() != 2:
            raise ValueError(f"x: expected [tokens, hidden], got shape {list(x.shape)}")
        factors = (A_gu, B_gu, A_d, B_d)
        share = _active_share(share, layer, x)
        with _serial_host_ops(x.device.type == "cuda"):
            out, handle, plan, engine_rows = _experts_forward(layer, share, x, topk_ids, topk_weights, save, factors,
                                                              lora_scales)
        ctx.layer, ctx.handle, ctx.lora_scales = layer, handle, lora_scales
        ctx.x_meta, ctx.w_meta = (x.device, x.dtype), (topk_weights.device, topk_weights.dtype)
        # share: the GpuShare that computes part of this call's backward; rated: the one told the engine's time
        ctx.share, ctx.share_plan = (share, plan) if save and plan is not None else (None, None)
        ctx.rated, ctx.engine_rows = (share if save else None), engine_rows
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
        needed = ctx.needs_input_grad
        with _serial_host_ops(dy.device.type == "cuda"):  # the expert LoRA gradients' sums too
            res, (s_dx, s_dw, s_grads) = _experts_backward(ctx, layer, dy, factors)
            dx = _input_grad(needed[0], "dx", ctx.x_meta, None if res is None else res[0], s_dx)
            dw = _input_grad(needed[2], "dw", ctx.w_meta, None if res is None else res[1], s_dw)
            factor_grads = (None,) * 4
            if ctx.lora_scales is not None:
                factor_grads = _factor_grads(res[2] if res is not None else None, s_grads, factors, needed[7:11])
        return ((dx, None, dw, None, None, None, None) + factor_grads)[: len(needed)]


def _experts_backward(ctx, layer: ExpertLayer, dy, factors):
    """(the engine's (dx, dw[, factor grads]) or None, the share's (dx, dw, factor grads) or Nones): the engine's
    call first (from the helper thread when a share computes too), then the share's launches."""
    lora = None if ctx.lora_scales is None else ExpertLoRA(*(_factor_to_host(t) for t in factors), *ctx.lora_scales)
    share = ctx.share
    job = res = None
    seconds = 0.0
    if ctx.handle > 0:  # handle < 0: every expert ran on the GPU share
        _set_spin(dy.device.type == "cuda")
        if share is None:
            res, seconds = _timed(layer.backward, ctx.handle, _to_engine("dy", dy, layer.dtype), lora=lora)
        else:  # the helper thread waits for dy's copy; this one goes on to queue the share's work
            dy_host, ready = _to_engine_later("dy", dy, layer.dtype)
            job = _engine_worker().submit(_timed_after, ready, layer.backward, ctx.handle, dy_host, lora=lora)
    s_out = (None, None, None)
    if share is not None:
        s_out = share.backward(*ctx.share_inputs, dy, ctx.share_plan, _share_lora(share, factors, ctx.lora_scales))
        share.join(s_out[0], s_out[1], *(s_out[2] or ()))
        if job is not None:
            res, seconds = job.result()
    if ctx.rated is not None:
        ctx.rated.record("backward", ctx.engine_rows if ctx.handle > 0 else 0, seconds, shared=share is not None)
    return res, s_out


def moe_experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, layer: ExpertLayer,
                retain: bool = False, lora: Optional[ExpertLoRA] = None, share=None) -> torch.Tensor:
    """Differentiable routed-experts call: x [T, H], topk_ids [T, k], topk_weights [T, k] -> y [T, H].

    Activations are saved when a gradient can flow to x, topk_weights or a LoRA factor, or when `retain` asks
    for it: the experts module asks in the first pass of reentrant gradient checkpointing (no_grad inside a
    checkpoint entered with grad, kt_sft.models.experts), and keeping its result lets the recompute pass skip the
    CPU experts (`layer.retained`, kt_sft.engine.retained). Any other no_grad call saves nothing.

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

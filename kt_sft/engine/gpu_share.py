"""GPU share of the routed experts: on large calls some experts of a layer run on the GPU, their frozen weights
streamed per call from the engine's own host panels, while the CPU engine computes the other experts. Which ones:
a fixed set (`kt_gpu_experts` F: the last F x E experts) or, with "auto", per call the experts with the most rows,
as many as make both sides finish together by the rates measured so far (share_plan.py).

Why: the CPU engine is bound near 10 TFLOPS by AMX tile loads (BENCHMARKS.md, "AMX GEMM ceiling"), so training
through it left the GPU idle 94 % of a step (V2-Lite, ~1,000 tokens/s; with every expert on the share:
1,921-2,263 tokens/s, GPU idle 21-37 %, 4.86 GB of GPU memory; BENCHMARKS.md, "GPU share"). Streaming one
V2-Lite layer's experts over PCIe (53 GB/s measured on the device, 1.1 GB bf16) takes about 21 ms per pass, while
the CPU needs about 130 ms for a 4096-token forward and backward: for batches of that size moving a share of the
experts to the GPU beats computing them on the CPU, and both sides run at the same time. Decode-size calls (below
`min_tokens`) stay on the CPU, where a token costs microseconds and the stream would cost milliseconds.

Layout: nothing is copied in RAM (the engine's panels, `ExpertLayer.panels()`, are read in place and page-locked
at the first copy, `ExpertLayer.pin_panels()`) and nothing stays on the GPU between calls: a call's experts travel in
chunks of `chunk` experts (one copy per run of consecutive ids) through a ring of staging slots on a copy stream
(one ring per GPU, shared by all layers, filled in FIFO order; RING_BYTES of slots), and the glue's prefetch
before each call copies as many of its chunks as the ring holds while the GPU still runs the work before the
call (the link's overlap with attention and the checkpoint recompute; plan_split counts it). They are
unpacked from the panel layout (csrc/common.h) into [N][K] matrices, int8 ones dequantized to bf16(q * s) exactly
as the CPU kernels do, and computed on a compute stream. The autograd glue (`moe_experts(..., share=...)`) calls
the CPU engine with those slots' ids set to -1 (csrc/moe_layer.h, kNotHere) from a helper thread (it releases the
GIL), so the launches here overlap its work. Backward streams the share again and recomputes its forward chunk
by chunk under autograd (frozen weights, so nothing else is needed), which also yields the LoRA factor gradients.
CUDA events around each chunk's copy and compute, and around each call's share, feed the rates of "auto" and the
benchmarks' totals (share_plan.RateBook); they are read once complete, never waited for.
Numerics: the share computes like stock PyTorch bf16 experts (bf16 GEMM outputs), the engine like its kernels;
both are checked against the fp32 reference in tests/test_gpu_share.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import warnings
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import share_plan
from .formats import ExpertFormat
from .lora import ExpertLoRA
from .runtime import current_isa, num_threads
from .share_plan import BACKWARD, FORWARD, plan_split, streaming_order

_PANEL = 16


def panels_to_matrix(raw: torch.Tensor, experts: int, layout: dict, fmt: ExpertFormat,
                     scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Engine panels of `experts` experts (raw bytes) -> W [experts][Np][Kp] in the format's compute dtype.

    `layout`: the projection's entry of the engine's `MoELayer.layout()` (csrc/packing.h, ProjectionLayout, the
    writer's own description): padded sizes, panels of `panel_width` columns whose elements come in groups of
    `panel_group` along k ("f32" panel[k][n], "pairs" panel[k/2][n][k%2], "quads" panel[k/4][n][k%4]) of
    `elem_bits` each (4: two per byte, the even k in the low nibble) and the scale grid. A quantized format gives
    bf16(fl32(value * s)) with `scales` [experts][grid rows][grid cols], the engine's own dequantization (value: the
    int8 or e4m3 number, or an int4 code - 8; the GPU computes such a layer with bf16 activations).

    Always a new tensor (the caller refills the panels' ring slot once this is queued). The quantized case is one
    multiply that reads the panels in place through the permuted view, computes in fp32 and rounds on the store:
    against float() / * s / to(bf16) after a permuting copy, 1 kernel instead of 4 and ~1/7 of the memory traffic
    per int8 chunk (V2-Lite: 0.2 instead of 1.4 GB per 8-expert chunk)."""
    Np, Kp, g, width = layout["padded_rows"], layout["padded_cols"], layout["panel_group"], layout["panel_width"]
    p = _panel_values(raw, fmt, layout).view(experts, Np // width, Kp // g, width, g).permute(0, 1, 3, 2, 4)
    if scales is None:
        w = p.reshape(experts, Np, Kp)  # a copy, except for degenerate panel shapes where it is a view
        return w.clone() if w.untyped_storage().data_ptr() == raw.untyped_storage().data_ptr() else w
    if p.dtype.itemsize == 1 and p.is_floating_point():  # fp8: torch does not promote it; exact in bf16
        p = p.to(torch.bfloat16)
    w = torch.empty(experts, Np, Kp, dtype=fmt.compute_dtype, device=raw.device)
    grid = _scale_grid_to_matrix(scales, layout)  # [experts][Np][Kp or 1], shaped like p below
    grid = grid.reshape(experts, Np // width, width, *((Kp // g, g) if grid.shape[2] > 1 else (1, 1)))
    torch.mul(p, grid, out=w.view(experts, Np // width, width, Kp // g, g))
    return w


def _panel_values(raw: torch.Tensor, fmt: ExpertFormat, layout: dict) -> torch.Tensor:
    """The panels' elements in storage order: raw bytes as the format's element type, int4 nibbles (low first) as
    their values code - 8 (int8)."""
    if layout["elem_bits"] != 4:
        return raw.view(fmt.weight_dtype)
    return (torch.stack([raw & 0xF, raw >> 4], dim=-1).view(torch.int8) - 8).flatten()


def _scale_grid_to_matrix(scales: torch.Tensor, layout: dict) -> torch.Tensor:
    """[experts][grid rows][grid cols] scales, one per block of scale_block elements, broadcastable to [.][Np][Kp]
    (per channel: [.][Np][1] as it is)."""
    (bn, bk), Np, Kp = layout["scale_block"], layout["padded_rows"], layout["padded_cols"]
    if bn > 1:
        scales = scales.repeat_interleave(bn, dim=1)[:, :Np]
    if scales.shape[2] > 1:
        scales = scales.repeat_interleave(bk, dim=2)[:, :, :Kp]
    return scales


def _expert_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int], offs: Optional[torch.Tensor],
               transposed: bool = True) -> torch.Tensor:
    """Rows of x grouped by expert (counts[e] rows each, in order) times w[e]^T ([rows][N] from w [e][N][K]), or
    with transposed=False times w[e] ([rows][K] from w [e][N][K]: the backward's)."""
    if offs is not None:
        return torch._grouped_mm(x, w.transpose(1, 2) if transposed else w, offs=offs)
    parts, start = [], 0
    for e, c in enumerate(counts):
        parts.append(x[start:start + c] @ (w[e].t() if transposed else w[e]))
        start += c
    return torch.cat(parts) if parts else x.new_zeros(0, w.shape[1] if transposed else w.shape[2])


def _lora_rows(x: torch.Tensor, counts: list[int], experts: Sequence[int], A, B, E: int, scale: float) -> torch.Tensor:
    """scale * (x_e @ B_e) @ A_e for each expert's rows (experts[j] has counts[j] rows, in order; PEFT flat layout:
    A rows e*r.., B columns e::E)."""
    r = B.shape[1] // E
    parts, start = [], 0
    for e, c in zip(experts, counts):
        if c:
            parts.append((x[start:start + c].float() @ B[:, e::E]) @ A[e * r:(e + 1) * r])
        start += c
    return scale * torch.cat(parts) if parts else x.new_zeros(0, A.shape[1], dtype=torch.float32)


_DIRECTIONS = {"forward": FORWARD, "backward": BACKWARD}
# A quantized layer's scales up to this size stay on the GPU whole (per-channel int8 and block-FP8 grids: 1.5 MB
# a V2-Lite layer, ~3 MB a DeepSeek-V3 one); larger grids (int4 groups) stream with their experts.
RESIDENT_SCALES_BYTES = 16 << 20

# Unpacked weight bytes per streamed chunk (~8 DeepSeek-V2-Lite experts in bf16). Each chunk costs ~20 kernel
# launches and, in backward, as many autograd nodes: with 4 such experts per chunk the host's launches left the
# GPU idle 36 % of a V2-Lite step, with 8 18 % (BENCHMARKS.md, GPU share).
CHUNK_BYTES = 140_000_000
# Staging ring per GPU: as many chunk slots as fit (at least 2, at most RING_SLOTS_MAX). The copy engine streams a
# layer's first chunks into them while the GPU still runs the work before its call (the previous layer's share,
# attention, in backward the attention backward and the next checkpoint recompute): with 2 slots (280 MB, ~5 ms of
# PCIe Gen5) the link idled 231 of a 764 ms V2-Lite step with every expert streamed (14 layers, bf16: copies 533
# ms; BENCHMARKS.md, GPU share), ~10-12 ms of GPU work per backward layer against 5 ms of prefetch. 560 MB: 4
# bf16 / 8 int8 V2-Lite chunks, ~10 ms of the link.
RING_BYTES = 560 << 20
RING_SLOTS_MAX = 16


def ring_slots(slot_bytes: int) -> int:
    """How many chunk slots of slot_bytes (per projection; a slot holds 3) the ring gets."""
    return max(2, min(RING_SLOTS_MAX, RING_BYTES // max(1, 3 * slot_bytes)))


@dataclasses.dataclass
class _Chunk:
    """One chunk in a ring slot: its experts, [gate, up, down] raw bytes, their scales [c][grid] or None, the
    copy's event (None off CUDA) and the slot it is in with the issue number of its contents there."""

    ids: tuple
    raw: list
    scales: Optional[list]
    copied: Optional["torch.cuda.Event"]
    slot: int
    gen: int


class _Ring:
    """Per device: the chunk slots every layer's share copies its weights into, filled in FIFO order (layers run
    one after another), each slot with the event after which its last reader is done and the issue number of
    what it holds (a chunk is still there while they match); on CUDA the copy and compute streams. Off CUDA the
    same bookkeeping with plain copies (the tests' path)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.cuda = device, device.type == "cuda"
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device)
            self.compute_stream = torch.cuda.Stream(device)
        self.slots: Optional[torch.Tensor] = None  # [slots][3][bytes per projection]
        self.freed: list = []  # per slot: the event after its last reader (CUDA), or None
        self.gen: list[int] = []  # per slot: the issue number of its contents
        self.issued = 0  # chunks issued so far; the next goes to slot issued % slots
        self.prefetched = None  # (share, its chunks, the copy stream's mark before them) until its next call

    @property
    def size(self) -> int:
        return len(self.gen)

    def reserve(self, nbytes: int) -> None:
        """Slots of at least nbytes per projection (a bigger layer's first call reallocates them: every chunk in the
        old slots is dropped)."""
        if self.slots is not None and self.slots.shape[2] >= nbytes:
            return
        for ev in self.freed:  # the old slots may still be read
            if ev is not None:
                ev.synchronize()
        if self.cuda:
            self.copy_stream.synchronize()
        count = ring_slots(nbytes)
        self.slots = None
        self.slots = torch.empty(count, 3, nbytes, dtype=torch.uint8, device=self.device)
        self.freed, self.gen, self.prefetched = [None] * count, [-1] * count, None

    def take(self) -> tuple[int, int]:
        """The next slot in FIFO order and the issue number its new contents get."""
        slot, gen = self.issued % self.size, self.issued
        self.gen[slot], self.issued = gen, self.issued + 1
        return slot, gen

    def holds(self, chunk: _Chunk) -> bool:
        return self.gen[chunk.slot] == chunk.gen

    def next_is_one_of(self, chunks) -> bool:
        """The next slot to fill holds one of these chunks (not read yet: filling it would overwrite it)."""
        nxt = self.issued % self.size
        return any(c.slot == nxt and self.holds(c) for c in chunks)

    def release(self, chunk: _Chunk) -> None:
        """Its reader is queued (on CUDA: the current stream): the slot may be refilled after it."""
        if self.cuda:
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
            self.freed[chunk.slot] = ev


_rings: dict[torch.device, _Ring] = {}


def _ring(device: torch.device) -> _Ring:
    if device not in _rings:
        _rings[device] = _Ring(device)
    return _rings[device]


def _fixed_experts(experts, E: int) -> Optional[tuple]:
    """The experts of a fixed share (an int n: the last n; a sequence: those ids), None for "auto"."""
    if isinstance(experts, str):
        if experts != "auto":
            raise ValueError(f"gpu share: experts must be a count, a list of expert ids or 'auto', got {experts!r}")
        return None
    if isinstance(experts, int) and not isinstance(experts, bool):
        if not 0 < experts <= E:
            raise ValueError(f"gpu share: experts must be in [1, {E}], got {experts}")
        return tuple(range(E - experts, E))
    ids = tuple(int(e) for e in experts)
    if not ids or len(set(ids)) != len(ids) or not all(0 <= e < E for e in ids):
        raise ValueError(f"gpu share: expert ids must be distinct and in [0, {E}), got {list(ids)}")
    return ids


def _runs(ids: Sequence[int]) -> list[tuple[int, int]]:
    """(first id, length) of each run of consecutive ids, in order: one copy each."""
    runs: list[list[int]] = []
    for e in ids:
        if runs and runs[-1][0] + runs[-1][1] == e:
            runs[-1][1] += 1
        else:
            runs.append([e, 1])
    return [(e, m) for e, m in runs]


def _timed_event(stream) -> "torch.cuda.Event":
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


def _rate_book(layer, fmt: ExpertFormat, device: torch.device) -> share_plan.RateBook:
    """The rates of this layer shape and format on this device (shared by the layers of that shape)."""
    E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
    prior = share_plan.prior_rates(H, I, current_isa(), num_threads(), fmt.name in ("int8-gemm", "int4-gemm"))
    return share_plan.rate_book((E, H, I, fmt.label, str(device)), f"{E}x{H}x{I} {fmt.label}", prior)


class GpuShare:
    """Routed experts of an ExpertLayer computed on `device` for calls of at least `min_tokens` tokens.

    experts: an int n (the last n experts, every call), a sequence of expert ids (those, every call), or "auto":
    per call, the experts `share_plan.plan_split` picks from the call's routing counts and the rates measured on the
    calls so far (engine rows/s, host->device GB/s, GPU rows/s; share_plan.py), so that both sides finish together.
    """

    def __init__(self, layer, experts, device, min_tokens: int = 1024, chunk: Optional[int] = None) -> None:
        E = layer.num_experts
        self.fixed = _fixed_experts(experts, E)  # None: "auto"
        if chunk is not None and chunk < 1:
            raise ValueError(f"gpu share: chunk must be >= 1, got {chunk}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # inputs always carry an index: compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        self.layer, self.device, self.E = layer, device, E
        panels = layer.panels()
        self.layout = [p.layout for p in panels.projections]  # the engine's own description of its panels
        self.H, self.I = layer.hidden_size, layer.intermediate_size
        self.Hp, self.Ip = panels.padded_hidden, panels.padded_intermediate
        if chunk is None:  # CHUNK_BYTES of unpacked weights per chunk
            unpacked = 3 * self.Ip * self.Hp * layer.dtype.itemsize
            chunk = max(1, round(CHUNK_BYTES / unpacked))
        self.min_tokens, self.chunk = int(min_tokens), int(chunk)
        self.format = panels.format
        self.activation = layer.activation  # what the experts compute between the projections (activations.py)
        self.stored = [w for w in range(3) if self.layout[w]["stored"]]  # the projections the layer has
        self.expert_bytes = self.layout[2]["expert_bytes"]  # the same for gate, up and down
        self.panels = [p.raw for p in panels.projections]
        self.scales = None if not self.format.quantized else [p.scales for p in panels.projections]
        biases = layer.biases()  # small ([E][2I + H] fp32): on the device whole
        self.biases = None if biases is None else [None if b is None else b.to(device) for b in biases.values()]
        # backward's hand-written gradients (_rows_grads) are those of the plain SiLU GLU without biases
        self.plain_silu_glu = self.activation.name == "silu_glu" and self.biases is None
        self._stream_scales(layer)
        self.cuda = self.device.type == "cuda"
        self._pinned = False
        self.ring = _ring(self.device)
        self._prefetch_mark = None  # the copy stream's mark before the prefetch the current call uses, if any
        self.book = _rate_book(layer, self.format, self.device)
        self._last = self.fixed or ()  # the experts of the previous call, in order: what prefetch() copies
        self._span: Optional[tuple] = None  # the last forward / backward's (start, end) on the GPU
        # grouped_mm takes bf16 rows whose strides are multiples of 16 bytes
        self.grouped = (hasattr(torch, "_grouped_mm") and layer.dtype == torch.bfloat16 and self.H % 8 == 0
                        and self.I % 8 == 0)

    def _stream_scales(self, layer) -> None:
        """A quantized format's scales: small grids (per channel, FP8 blocks: ~1.5 MB a V2-Lite layer) stay on the
        device whole (`resident`); large ones (int4 groups: a quarter of the panel bytes, 1.4 GB a DeepSeek-V3
        layer) travel with their experts' panels, each expert's grid bytes (stored by grid column) after the
        chunk's panels in the ring slot (`scale_bytes`: per expert, of each projection)."""
        self.resident, self.scale_bytes, self.scale_raw = None, [0, 0, 0], None
        if self.scales is None:
            return
        if sum(g.numel() * 4 for g in self.scales if g is not None) <= RESIDENT_SCALES_BYTES:
            self.resident = [None if g is None else g.to(self.device) for g in self.scales]
            return
        self.scale_bytes = [0 if g is None else g[0].numel() * 4 for g in self.scales]
        self.scale_raw = [None if g is None else g.transpose(1, 2).reshape(-1).view(torch.uint8)  # [E][cols][rows]
                          for g in self.scales]

    def applies(self, x: torch.Tensor) -> bool:
        return x.device == self.device and x.shape[0] >= self.min_tokens

    # ---------------------------------------------------------------- routing
    def routed_counts(self, ids_host: torch.Tensor) -> list[int]:
        """Routed rows per expert of a call (ids outside [0, E) count nowhere)."""
        flat = ids_host.flatten()
        return torch.bincount(flat[(flat >= 0) & (flat < self.E)], minlength=self.E).tolist()

    def choose(self, counts: list[int], backward: bool) -> tuple[int, ...]:
        """The experts this call computes here, in streaming order (may be empty: all on the engine), from its
        routed_counts. `backward`: a backward will follow, so its costs count in the split."""
        if self.cuda:
            self.book.harvest()
        if self.fixed is not None:
            experts = self.fixed
        else:
            r, streamed = self.book.rates, len(self.stored) * self.expert_bytes + sum(self.scale_bytes)  # per expert
            lead = self._prefetched_experts()
            experts = tuple(streaming_order(plan_split(counts, r.engine, r.stream, r.gpu, streamed, backward,
                                                       lead=lead, engine_call_s=r.engine_call, hidden_s=r.hidden,
                                                       ring_experts=self.ring_experts), lead))
        self.book.split(len(experts), sum(counts[e] for e in experts), sum(counts), self.E, log=self.fixed is None)
        if experts:
            self._last = experts
        return experts

    def engine_ids(self, ids_host: torch.Tensor, experts: tuple) -> torch.Tensor:
        """The call's ids for the engine: this call's share slots at -1 (ids outside [0, E) stay: the engine
        refuses them by name)."""
        on_share = torch.zeros(self.E + 1, dtype=torch.bool)
        on_share[list(experts)] = True
        return ids_host.masked_fill(on_share[torch.where((ids_host < 0) | (ids_host >= self.E), self.E, ids_host)],
                                    -1)

    def plan(self, ids: torch.Tensor, experts: tuple, counts: list[int]) -> dict:
        """What forward / backward need for `experts` of a call with topk_ids `ids` (on the share's device; the
        host's routed_counts `counts`): the share's slots grouped by expert (pos, tok: sorted where the ids are,
        no host wait), rows per expert (counts, bounds) and grouped_mm's offsets per chunk."""
        n, k = len(experts), ids.shape[1]
        share_counts = [counts[e] for e in experts]
        rank_of = torch.full((self.E + 1,), n, dtype=torch.int64)  # n: not on the share (sorts last)
        rank_of[list(experts)] = torch.arange(n)
        flat = ids.to(self.device, non_blocking=True).flatten()
        key = self._upload(rank_of)[torch.where((flat < 0) | (flat >= self.E), self.E, flat)]
        pos = torch.argsort(key, stable=True)[:sum(share_counts)]
        rank = key[pos]  # each sorted row's position in `experts`
        # bounds[j]: first row of share expert j in the expert-sorted rows
        bounds = [0] + list(itertools.accumulate(share_counts))
        # grouped_mm's offsets of every chunk (row ends of its experts, relative to the chunk) and the expert ids
        # cross in one page-locked copy each: no host wait on the GPU inside the chunk loop
        chunks = -(-n // self.chunk)
        offs = torch.zeros(chunks, self.chunk, dtype=torch.int32)
        for j in range(chunks):
            a, c = self._span_of(j, n)
            offs[j, :c] = torch.tensor(list(itertools.accumulate(share_counts[a:a + c])), dtype=torch.int32)
        return dict(experts=tuple(experts), ids=self._upload(torch.tensor(experts, dtype=torch.int64)),
                    pos=pos, tok=pos // k, rank=rank, offs=self._upload(offs), counts=share_counts, bounds=bounds, k=k,
                    chunks=chunks, engine_rows=sum(counts) - bounds[-1])

    def split(self, ids: torch.Tensor, backward: bool = True):
        """(ids for the engine with the share's slots at -1, plan) of a call: routed_counts, choose, engine_ids
        and plan in one."""
        ids_host = ids.cpu()
        counts = self.routed_counts(ids_host)
        experts = self.choose(counts, backward)
        return self.engine_ids(ids_host, experts), self.plan(ids, experts, counts)

    def _span_of(self, j: int, n: int) -> tuple[int, int]:
        """Chunk j of n experts: its first position in the call's expert order and how many experts it holds."""
        a = j * self.chunk
        return a, min(self.chunk, n - a)

    def _upload(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t
        return t.pin_memory().to(self.device, non_blocking=True)

    # ---------------------------------------------------------------- streaming
    @property
    def slot_bytes(self) -> int:
        """Ring slot bytes per projection for one chunk: its panels, then (streamed scales) their scale bytes."""
        return self.chunk * (self.expert_bytes + max(self.scale_bytes))

    @property
    def ring_experts(self) -> int:
        """Experts the ring holds at once at this share's chunk size (what a prefetch can copy ahead)."""
        ring = self.ring
        slots = ring.size if ring.slots is not None and ring.slots.shape[2] >= self.slot_bytes else \
            ring_slots(self.slot_bytes)
        return slots * self.chunk

    def _issue(self, j: int, experts: tuple) -> _Chunk:
        """Queue chunk j of `experts` into the ring's next slot (on CUDA on the copy stream, after that slot's last
        reader): one copy per run of consecutive experts and projection, the panels then their scale bytes."""
        eb, sb = self.expert_bytes, self.scale_bytes
        a, c = self._span_of(j, len(experts))
        ids = tuple(experts[a:a + c])
        ring = self.ring
        ring.reserve(self.slot_bytes)
        slot, gen = ring.take()
        dst, base = ring.slots[slot], self.chunk * eb  # panels, then scales from `base`
        with torch.cuda.stream(ring.copy_stream) if self.cuda else contextlib.nullcontext():
            if self.cuda:
                self._pin()
                if ring.freed[slot] is not None:
                    ring.copy_stream.wait_event(ring.freed[slot])  # its last reader (any layer) is done
                start = _timed_event(ring.copy_stream)
            for w in self.stored:
                at = 0
                for e, m in _runs(ids):
                    dst[w, at * eb:(at + m) * eb].copy_(self.panels[w][e * eb:(e + m) * eb], non_blocking=True)
                    n = sb[w]
                    if n:
                        dst[w, base + at * n:base + (at + m) * n].copy_(self.scale_raw[w][e * n:(e + m) * n],
                                                                        non_blocking=True)
                    at += m
            done = _timed_event(ring.copy_stream) if self.cuda else None
        if self.cuda:
            self.book.later("copy", 0, start, done, c * (len(self.stored) * eb + sum(sb)))
        scales = None if not any(sb) else [self._scales_of(dst[w, base:base + c * sb[w]], c, w) if sb[w] else None
                                            for w in range(3)]
        return _Chunk(ids, [dst[w, :c * eb] if w in self.stored else None for w in range(3)], scales, done, slot, gen)

    def _scales_of(self, raw: torch.Tensor, c: int, w: int) -> torch.Tensor:
        """c experts' scale bytes (stored by grid column) as [c][grid rows][grid cols]."""
        rows, cols = self.scales[w].shape[1:]
        return raw.view(torch.float32).view(c, cols, rows).transpose(1, 2)

    def _pin(self) -> None:
        """Page-lock the layer's panels at the first copy (a run that never streams never locks them)."""
        if not self._pinned:
            self._pinned = True
            if not self.layer.pin_panels():
                warnings.warn("kt-sft gpu share: could not page-lock the expert panels; streaming them runs at "
                              "pageable-copy speed", stacklevel=3)

    def prefetch(self) -> None:
        """Start copying the experts of this share's previous call (a fixed share's every call), as many chunks as
        the ring holds, now, before the call: the autograd glue calls this before it waits for the router's
        output, so the copy engine works while the GPU finishes what comes before the call (and in backward, the
        checkpoint recompute's call prefetches for the backward right after it). The next call uses the chunks
        still in the ring ("auto" puts these experts first while they have rows); the copy stream's mark before
        them times how long the link had for them before the call (the rates' `hidden`)."""
        if not self._last or self._prefetched_experts():
            return
        ring = self.ring
        ring.reserve(self.slot_bytes)
        mark = _timed_event(ring.copy_stream) if self.cuda else None
        count = min(ring.size, -(-len(self._last) // self.chunk))
        ring.prefetched = (self, [self._issue(j, self._last) for j in range(count)], mark)

    def _prefetched_experts(self) -> tuple:
        """The experts of this share's prefetched chunks still in the ring, in order (a prefix of the prefetch)."""
        pre = self.ring.prefetched
        if pre is None or pre[0] is not self:
            return ()
        out = []
        for chunk in pre[1]:
            if not self.ring.holds(chunk):
                break
            out.extend(chunk.ids)
        return tuple(out)

    def _take_prefetched(self, experts: tuple) -> tuple[list, object]:
        """The prefetched chunks that hold this call's first chunks (a prefix of them, still in the ring), as
        _issue returns them, and the prefetch's mark (None when none is used)."""
        pre = self.ring.prefetched
        if pre is None or pre[0] is not self:
            return [], None
        self.ring.prefetched = None
        usable, eb = [], self.expert_bytes
        for j, chunk in enumerate(pre[1]):
            a, c = self._span_of(j, len(experts))
            if c <= 0 or not self.ring.holds(chunk) or tuple(experts[a:a + c]) != chunk.ids[:c]:
                break
            usable.append(dataclasses.replace(
                chunk, ids=chunk.ids[:c], raw=[None if r is None else r[:c * eb] for r in chunk.raw],
                scales=None if chunk.scales is None else [None if g is None else g[:c] for g in chunk.scales]))
        return usable, (pre[2] if usable else None)

    def _chunks(self, plan, direction: int):
        """Yields (first position of the chunk in the call's experts, experts, gate, up, down matrices [c][N][K]);
        times each chunk's compute (from its unpacking to the consumer's next request) for the GPU rate. Keeps the
        ring full: a chunk is issued whenever the next slot holds none of this call's unread chunks."""
        experts, n, total = plan["experts"], len(plan["experts"]), plan["chunks"]
        self.ring.reserve(self.slot_bytes)
        pending, mark = self._take_prefetched(experts)
        self._prefetch_mark = mark
        issued = len(pending)

        def fill():
            nonlocal issued
            while issued < total and not self.ring.next_is_one_of(pending):
                pending.append(self._issue(issued, experts))
                issued += 1

        fill()
        for j in range(total):
            a, c = self._span_of(j, n)
            chunk = pending.pop(0)
            if self.cuda:
                torch.cuda.current_stream(self.device).wait_event(chunk.copied)
            start = self._mark()
            scales = chunk.scales
            if self.resident is not None:
                scales = [None if g is None else g[plan["ids"][a:a + c]] for g in self.resident]
            mats = [panels_to_matrix(chunk.raw[w], c, self.layout[w], self.format,
                                     None if scales is None else scales[w]) if w in self.stored else None
                    for w in range(3)]
            self.ring.release(chunk)  # unpacking copied the slot out: it may be refilled
            fill()
            gate, up, down = mats
            yield (a, c, None if gate is None else gate[:, :self.I, :self.H], up[:, :self.I, :self.H],
                   down[:, :self.H, :self.I])
            self._sample("compute", direction, start, plan["bounds"][a + c] - plan["bounds"][a])

    def _mark(self):
        """Now, on the compute stream (a timing event) or, off CUDA, on the host clock."""
        return _timed_event(torch.cuda.current_stream(self.device)) if self.cuda else time.perf_counter()

    def _sample(self, kind: str, direction: int, start, amount) -> None:
        """A duration from `start` (_mark) to now for the rate book: read once its events complete on CUDA."""
        end = self._mark()
        if self.cuda:
            self.book.later(kind, direction, start, end, amount)
        else:
            self.book.gpu(direction, amount, end - start)

    def _sample_hidden(self, direction: int, start) -> None:
        """How long the link had for this call's prefetched chunks before the call's GPU work began (the copy
        stream's mark before them to the call's start; CUDA only, read once complete)."""
        if self.cuda and self._prefetch_mark is not None:
            self.book.later("hidden", direction, self._prefetch_mark, start, 0)
        self._prefetch_mark = None

    def record(self, direction: str, engine_rows: int, engine_seconds: float, shared: bool) -> None:
        """A finished call ("forward" / "backward"): the engine's rows and seconds (its rate), and with `shared`,
        the GPU span of the share's forward / backward against them (the benchmarks' totals)."""
        direction = _DIRECTIONS[direction]
        self.book.engine(direction, engine_rows, engine_seconds)
        if shared and self._span is not None:
            start, end = self._span
            if self.cuda:
                self.book.later("span", direction, start, end, engine_seconds)
            else:
                self.book.span(end - start, engine_seconds)
        self._span = None

    # ---------------------------------------------------------------- compute
    def _mm(self, x, w, counts, offs, transposed: bool = True):
        """_expert_mm through grouped_mm on a GPU (offs: the chunk's row ends, on the device); one GEMM per expert
        where grouped_mm is missing or refuses this GPU (sm90+ in some builds)."""
        if self.grouped and x.is_cuda:
            try:
                return _expert_mm(x, w.contiguous(), counts, offs, transposed)
            except RuntimeError as err:  # said once: the fallback is several times slower
                warnings.warn(f"kt-sft gpu share: torch._grouped_mm failed ({str(err).splitlines()[0]}); "
                              "computing one GEMM per expert instead", stacklevel=2)
                self.grouped = False
        return _expert_mm(x, w.contiguous(), counts, None, transposed)

    def _rows(self, xs, ws, a, plan, gate, up, down, lora: Optional[ExpertLoRA], row_experts):
        """Routing-weighted outputs [rows][H] (fp32) of one chunk's rows (grouped by expert, in order; row_experts:
        each row's expert id, on the device, for the biases)."""
        c = up.shape[0]
        counts, offs = plan["counts"][a:a + c], plan["offs"][a // self.chunk, :c]
        g = None if gate is None else self._mm(xs, gate, counts, offs).float()
        u = self._mm(xs, up, counts, offs).float()
        experts = plan["experts"][a:a + c]
        if lora is not None and lora.A_gu is not None:
            d = _lora_rows(xs, counts, experts, lora.A_gu, lora.B_gu, self.E, lora.scale_gu)
            g, u = (None, u + d) if g is None else (g + d[:, :self.I], u + d[:, self.I:])
        if self.biases is not None:
            b_gate, b_up, _ = self.biases
            g, u = None if g is None else g + b_gate[row_experts], u + b_up[row_experts]
        h = self.activation(g, u).to(xs.dtype)
        o = self._mm(h, down, counts, offs).float()
        if lora is not None and lora.A_d is not None:
            o = o + _lora_rows(h, counts, experts, lora.A_d, lora.B_d, self.E, lora.scale_d)
        if self.biases is not None:
            o = o + self.biases[2][row_experts]
        return o * ws[:, None]

    def _rows_grads(self, xs, ws, dyr, a, plan, gate, up, down):
        """(d xs [rows][H] in xs's dtype, d ws [rows] fp32) of one chunk's rows of _rows without LoRA, given the
        gradient dyr [rows][H] (fp32) of its outputs: what autograd computes through _rows, op for op (bf16 GEMM
        outputs, fp32 elementwise), without building the graph: ~40 instead of ~90 dispatched ops per chunk, the
        host's launches being what bounds a chunk whose copy is short (int8: 1.3 ms per V2-Lite chunk). Only for
        the plain SiLU GLU without biases (`plain_silu_glu`)."""
        c = gate.shape[0]
        counts, offs = plan["counts"][a:a + c], plan["offs"][a // self.chunk, :c]
        gate, up, down = gate.contiguous(), up.contiguous(), down.contiguous()
        gf, uf = self._mm(xs, gate, counts, offs).float(), self._mm(xs, up, counts, offs).float()
        sg = F.silu(gf)
        h = (sg * uf).to(xs.dtype)
        dws = (self._mm(h, down, counts, offs).float() * dyr).sum(1)
        dh = self._mm((dyr * ws[:, None]).to(xs.dtype), down, counts, offs, transposed=False).float()
        dg, du = torch.ops.aten.silu_backward(dh * uf, gf).to(xs.dtype), (dh * sg).to(xs.dtype)
        return self._mm(dg, gate, counts, offs, transposed=False) + \
            self._mm(du, up, counts, offs, transposed=False), dws

    @staticmethod
    def _row_experts(plan, lo: int, hi: int):
        """The expert id of each of the share's sorted rows [lo, hi) (on its device)."""
        return plan["ids"][plan["rank"][lo:hi]]

    @staticmethod
    def _chunk_rows(plan, a, c):
        return plan["bounds"][a], plan["bounds"][a + c]

    def forward(self, x: torch.Tensor, w: torch.Tensor, plan, lora: Optional[ExpertLoRA] = None) -> torch.Tensor:
        """This share's part of y [T][H] (fp32), queued on the compute stream (see join). lora: factors on this
        share's device. x in any float dtype: computed in the layer's (as the engine does)."""
        with self._on_streams():
            start = self._mark()
            y = torch.zeros(x.shape[0], self.H, dtype=torch.float32, device=self.device)
            xs_all = x[plan["tok"]].to(self.layer.dtype)
            ws_all = w.flatten()[plan["pos"]].float()
            with torch.no_grad():
                for a, c, gate, up, down in self._chunks(plan, FORWARD):
                    lo, hi = self._chunk_rows(plan, a, c)
                    if hi > lo:
                        o = self._rows(xs_all[lo:hi], ws_all[lo:hi], a, plan, gate, up, down, lora,
                                       self._row_experts(plan, lo, hi))
                        y.index_add_(0, plan["tok"][lo:hi], o)
            self._span = (start, self._mark())
            self._sample_hidden(FORWARD, start)
        return y

    def backward(self, x, w, dy, plan, lora: Optional[ExpertLoRA] = None):
        """(dx [T][H] fp32, dw [T][k] fp32, factor grads or None) of this share, recomputing its forward."""
        T, k = x.shape[0], plan["k"]
        with self._on_streams(), torch.enable_grad():
            start = self._mark()
            dx = torch.zeros(T, self.H, dtype=torch.float32, device=self.device)
            dw = torch.zeros(T * k, dtype=torch.float32, device=self.device)
            factors = None
            if lora is not None:
                factors = [None if f is None else f.detach().requires_grad_() for f in lora.factors()]
                lora = dataclasses.replace(lora, **dict(zip(("A_gu", "B_gu", "A_d", "B_d"), factors)))
            for a, c, gate, up, down in self._chunks(plan, BACKWARD):
                lo, hi = self._chunk_rows(plan, a, c)
                if hi == lo:
                    continue
                tok, pos = plan["tok"][lo:hi], plan["pos"][lo:hi]
                xs = x.detach()[tok].to(self.layer.dtype)
                ws = w.detach().flatten()[pos].float()
                if lora is None and self.plain_silu_glu:
                    dxs, dws = self._rows_grads(xs, ws, dy[tok].float(), a, plan, gate, up, down)
                else:  # LoRA factors' gradients, other activations, biases: through autograd
                    xs, ws = xs.requires_grad_(), ws.requires_grad_()
                    o = self._rows(xs, ws, a, plan, gate, up, down, lora, self._row_experts(plan, lo, hi))
                    torch.autograd.backward(o, dy[tok].float())
                    dxs, dws = xs.grad, ws.grad
                dx.index_add_(0, tok, dxs.float())
                dw[pos] = dws
            grads = None if factors is None else [None if f is None else f.grad for f in factors]
            self._span = (start, self._mark())
            self._sample_hidden(BACKWARD, start)
        return dx, dw.view(T, k), grads

    @contextlib.contextmanager
    def _on_streams(self):
        """Queue the block's work on the compute stream, after what the caller's stream has queued (the inputs)."""
        if not self.cuda:
            yield
            return
        self.ring.compute_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.ring.compute_stream):
            yield

    def join(self, *tensors: torch.Tensor) -> None:
        """Make the caller's stream wait for the share's queued work and own its results."""
        if not self.cuda:
            return
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.ring.compute_stream)
        for t in tensors:
            if t is not None:
                t.record_stream(main)

"""`kt_gpu_experts: auto`: which routed experts of a call go to the GPU share, from the call's routing counts and
rates measured online, so that the CPU engine and the GPU finish together.

Cost model, per direction d (forward; backward, which streams the same experts again): the engine's time is its
routed rows over its rate, rows_cpu / engine[d]; the share's is bounded by its host->device stream and by its GPU
compute, which overlap (copy stream and compute stream): max(n x expert_bytes / stream, rows_gpu / gpu[d]). Both
directions use the split the forward chose (the engine saved that forward), so `plan_split` minimizes the sum over
directions of max(CPU, GPU), plus a fixed cost per direction whenever the engine gets rows (ENGINE_CALL_S: what
involving the engine costs the step outside the overlap, measured on the device). On the device's H200 with PCIe
Gen5 that cost makes V2-Lite's calls stream every expert; slower links, or experts with more work per byte
(DeepSeek-V3), leave the engine its share. A streamed expert costs the same bytes whatever its rows, while the
engine's cost is per row: the experts with the most rows are the cheapest to stream per row, so the candidates are taken in order
of decreasing count (experts with no row are never streamed), after any `lead` experts (those whose copies a
prefetch already started), and the best prefix length wins.

Overlap with the work around the call: the glue's prefetch copies a call's first chunks into the staging ring while
the GPU still runs what comes before the call (the previous layer's share, attention; in backward the attention
backward and the checkpoint recompute, whose call prefetches this split for the backward), so those bytes do not
count in the call: as many of the first experts as the ring holds (forward: the prefetched `lead`), up to what the
link moves in the measured `hidden` seconds. What that leaves of the stream is the call's GPU side. Where the
streaming hides this way, little is left for the engine to hide behind: the engine is worth its fixed cost only
where the call's remaining stream (or the share's compute) outlasts it, e.g. slower links or bigger experts.

Rates (`RateBook`, one per layer shape, format and device, shared by the layers of that shape): exponential moving
averages of what the calls measure: the engine's rows per wall second of each call (from its helper thread), the
GPU's rows per second of compute (CUDA events around each chunk's compute, read once complete: no host wait) and
the host->device bytes per second of each chunk's copy (events on the copy stream), and the hidden link time
(the prefetch's mark on the copy stream to the call's first GPU work). Until the first samples arrive the priors
below stand in (they only have to be within a few times of the truth: every split call measures both sides; the
hidden time starts at 0, the model without overlap). A log line says the split and the rates, at most once a
minute and only when the mean split moved.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Optional, Sequence

logger = logging.getLogger("kt_sft.gpu_share")

FORWARD, BACKWARD = 0, 1
# Sample weight of the moving averages: engine and GPU compute get one sample per call (a layer shape sees tens per
# step), copies one per chunk (several per call).
CALL_EMA, CHUNK_EMA = 0.2, 0.05
LOG_INTERVAL_S = 60.0
# Priors. Engine: FLOP/s per thread of the frozen-expert GEMMs (forward 6HI per row, backward as much: the input
# gradient only), from the device runs (16 AMX cores: bf16 8.5 TFLOPS, int8 GEMMs 16 TFLOPS for V2-Lite training,
# BENCHMARKS.md) and a guess for the other paths. GPU: an effective 100 TFLOP/s for the share's bf16 GEMMs (its
# backward recomputes the forward: twice the forward's work). Stream: 20 GB/s (PCIe 4 x16 after overheads).
ENGINE_FLOPS_PER_THREAD = {"amx": 0.5e12, "avx512": 0.1e12, "avx2": 0.04e12, "scalar": 0.005e12}
INT8_GEMM_SPEEDUP = 1.9  # int8-gemm / int4-gemm on AMX against bf16 (same device runs)
GPU_FLOPS, STREAM_BYTES_PER_S = 100e12, 20e9
# What an engine call costs the step outside its overlap with the share, per direction: the host waits for the
# engine instead of queueing the next GPU work (after it the GPU starts from an empty queue), the backward stages
# dy to the host (a wait for the GPU an all-GPU call does not have), y / dx cross back and are added. Measured on
# the device (b2446da, 14 V2-Lite layers, 2 x 2048 tokens): auto's splits saved 32 ms per step inside the calls
# against all experts streamed, and the step still took 114 ms (bf16) / 78 ms (int8 GEMMs) longer, over 26 calls:
# 5.6 / 3.0 ms a call. With this cost a split must beat streaming everything by more than it.
ENGINE_CALL_S = 4e-3


@dataclasses.dataclass
class Rates:
    """engine, gpu: (forward, backward) routed rows per second; stream: host->device bytes per second;
    engine_call: plan_split's engine_call_s; hidden: (forward, backward) seconds the link had for a call's
    prefetched chunks before the call's GPU work began (plan_split's hidden_s; 0 until measured)."""

    engine: list
    gpu: list
    stream: float
    engine_call: float = ENGINE_CALL_S  # seconds per direction an engine call costs beyond the overlap
    hidden: list = dataclasses.field(default_factory=lambda: [0.0, 0.0])


def prior_rates(hidden: int, intermediate: int, isa: str, threads: int, int8_gemm: bool) -> Rates:
    flops_per_row = 6.0 * hidden * intermediate
    cpu = ENGINE_FLOPS_PER_THREAD.get(isa, 0.04e12) * max(1, threads)
    if int8_gemm and isa == "amx":
        cpu *= INT8_GEMM_SPEEDUP
    engine = cpu / flops_per_row
    gpu = GPU_FLOPS / flops_per_row
    return Rates([engine, engine], [gpu, gpu / 2], STREAM_BYTES_PER_S)


def plan_split(counts: Sequence[int], engine_rate: Sequence[float], stream_rate: float, gpu_rate: Sequence[float],
               expert_bytes: int, backward: bool = True, lead: Sequence[int] = (),
               engine_call_s: float = 0.0, hidden_s: Sequence[float] = (0.0, 0.0),
               ring_experts: int = 0) -> list[int]:
    """The experts (ids, in streaming order) whose rows the GPU share computes for a call with counts[e] routed
    rows per expert; the rest stay on the CPU engine. engine_rate, gpu_rate: (forward, backward) rows per second;
    stream_rate: host->device bytes per second; expert_bytes: what one expert streams per pass; backward: a
    backward will follow (its costs count too); lead: experts to take first when any are taken (their copies are
    under way), as far as each has rows; engine_call_s: what a direction costs the step beyond max(CPU, GPU) when
    the engine gets rows at all (ENGINE_CALL_S). Minimizes sum over directions of max(CPU time, GPU time), plus
    engine_call_s per direction with engine rows; ties go to fewer streamed experts.

    The overlap with the work before the call: the first experts of the order were copied ahead, into the ring,
    while the GPU ran what comes before the call (forward: the lead, the prefetch of the previous call's experts;
    backward: the first ring_experts, which the checkpoint recompute prefetches from this call's split), as much
    of them as the link moves in hidden_s[direction] seconds; only the rest of the stream counts in the call."""
    lead = list(lead)
    for i, e in enumerate(lead):
        if counts[e] <= 0:
            lead = lead[:i]
            break
    taken = set(lead)
    rest = sorted((e for e, c in enumerate(counts) if c > 0 and e not in taken), key=lambda e: (-counts[e], e))
    order = lead + rest
    total = sum(counts[e] for e in order)
    directions = (FORWARD, BACKWARD) if backward else (FORWARD,)
    ahead_cap = {FORWARD: len(lead), BACKWARD: ring_experts}
    best_n, best_cost, on_gpu = 0, None, 0
    for n in range(len(order) + 1):
        if n:
            on_gpu += counts[order[n - 1]]
        cpu_rows, cost = total - on_gpu, 0.0
        for d in directions:
            early = min(min(n, ahead_cap[d]) * expert_bytes, hidden_s[d] * stream_rate)  # bytes in before the call
            stream_s = (n * expert_bytes - early) / stream_rate
            cost += max(cpu_rows / engine_rate[d], max(stream_s, on_gpu / gpu_rate[d]))
        cost += len(directions) * engine_call_s if cpu_rows else 0.0
        if best_cost is None or cost < best_cost * (1 - 1e-9):
            best_n, best_cost = n, cost
    return order[:best_n]


def streaming_order(chosen: Sequence[int], lead: Sequence[int] = ()) -> list[int]:
    """plan_split's experts in the order the share streams them: the lead's first (their copies are under way, in
    that order), then the rest by id, so that runs of consecutive ids go in one copy each and the next call's
    prefetch (the first chunks of this order) finds them again. In plan_split's own order (busiest first) a split
    of every expert streamed each chunk in up to `chunk` copies and prefetched the wrong experts: `auto` choosing
    all 64 V2-Lite experts ran 780 ms steps against 501 for the fixed share of the same experts (int8 GEMMs, 14
    layers, H100 host, 2026-12-06)."""
    chosen = set(chosen)
    head = [e for e in lead if e in chosen]
    return head + sorted(chosen.difference(head))


class RateBook:
    """The measured rates of one layer shape / format / device (moving averages over the priors), the samples that
    still wait for their CUDA events, the per-step totals the benchmarks read (`take_totals`) and the split log."""

    def __init__(self, label: str, prior: Rates) -> None:
        self.label, self.rates = label, prior
        self.pending: list[tuple] = []  # (kind, direction, start event, end event, amount)
        self.totals = _zero_totals()
        self._window = [0, 0, 0, 0]  # calls, GPU experts, GPU rows, rows since the last log line
        self._logged: Optional[float] = None  # mean GPU experts of the last line
        self._log_at = time.monotonic() + 5.0  # the first line once the first calls settled the rates

    # ------------------------------------------------------------ samples
    def engine(self, direction: int, rows: int, seconds: float) -> None:
        if rows > 0 and seconds > 0:
            self.rates.engine[direction] = _ema(self.rates.engine[direction], rows / seconds, CALL_EMA)
        self.totals["engine_s"] += seconds

    def gpu(self, direction: int, rows: int, seconds: float) -> None:
        if rows > 0 and seconds > 0:
            self.rates.gpu[direction] = _ema(self.rates.gpu[direction], rows / seconds, CALL_EMA)

    def stream(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.rates.stream = _ema(self.rates.stream, nbytes / seconds, CHUNK_EMA)

    def later(self, kind: str, direction: int, start, end, amount) -> None:
        """A sample whose duration CUDA events will tell (read by `harvest` once complete)."""
        self.pending.append((kind, direction, start, end, amount))
        del self.pending[:-4096]  # never read (events that do not complete): keep the newest only

    def harvest(self) -> None:
        """Turn the completed event samples into rates (no wait: incomplete ones stay pending, in order)."""
        done = 0
        for kind, direction, start, end, amount in self.pending:
            if not end.query():
                break
            seconds = start.elapsed_time(end) / 1e3
            if kind == "copy":
                self.stream(amount, seconds)
            elif kind == "compute":
                self.gpu(direction, amount, seconds)
            elif kind == "hidden":
                self.rates.hidden[direction] = _ema(self.rates.hidden[direction], max(0.0, seconds), CALL_EMA)
            else:  # "span": one call's share on the GPU, amount = the engine's seconds of that call
                self.span(seconds, amount)
            done += 1
        del self.pending[:done]

    def span(self, gpu_seconds: float, engine_seconds: float) -> None:
        """One call's share on the GPU (first chunk's compute start to last end) against its engine call."""
        t = self.totals
        t["gpu_s"] += gpu_seconds
        t["cpu_waits_s"] += max(0.0, gpu_seconds - engine_seconds)
        t["gpu_waits_s"] += max(0.0, engine_seconds - gpu_seconds)

    # ------------------------------------------------------------ splits
    def split(self, experts: int, gpu_rows: int, rows: int, num_experts: int, log: bool = True) -> None:
        """A call's chosen split (for the totals and, with `log` (an "auto" split), the log line)."""
        self.totals["calls"] += 1
        self.totals["gpu_experts"] += experts
        w = self._window
        w[0], w[1], w[2], w[3] = w[0] + 1, w[1] + experts, w[2] + gpu_rows, w[3] + rows
        now = time.monotonic()
        if log and now >= self._log_at:
            self._log(num_experts)
            self._log_at = now + LOG_INTERVAL_S

    def _log(self, num_experts: int) -> None:
        calls, experts, gpu_rows, rows = self._window
        self._window = [0, 0, 0, 0]
        mean = experts / max(1, calls)
        if self._logged is not None and abs(mean - self._logged) < 1.0:
            return
        self._logged = mean
        r = self.rates
        logger.info("kt-sft gpu share auto (%s): %.1f of %d experts on the GPU (%.0f %% of the rows) over the last "
                    "%d calls; engine %.0f / %.0f k rows/s (forward / backward), stream %.1f GB/s, GPU %.0f / %.0f k "
                    "rows/s, link ahead of the calls %.1f / %.1f ms", self.label, mean, num_experts,
                    100.0 * gpu_rows / max(1, rows), calls, r.engine[0] / 1e3, r.engine[1] / 1e3, r.stream / 1e9,
                    r.gpu[0] / 1e3, r.gpu[1] / 1e3, r.hidden[0] * 1e3, r.hidden[1] * 1e3)

    def take_totals(self) -> dict:
        self.harvest()
        out, self.totals = self.totals, _zero_totals()
        return out


def _zero_totals() -> dict:
    return dict(calls=0, gpu_experts=0, engine_s=0.0, gpu_s=0.0, cpu_waits_s=0.0, gpu_waits_s=0.0)


def _ema(old: float, sample: float, weight: float) -> float:
    return (1.0 - weight) * old + weight * sample


_books: dict = {}


def rate_book(key: tuple, label: str, prior: Rates) -> RateBook:
    """The RateBook of a layer shape / format / device (one per key, shared by the layers that have it)."""
    if key not in _books:
        _books[key] = RateBook(label, prior)
    return _books[key]


def take_totals() -> dict:
    """Every RateBook's totals since the last call, summed (benchmarks: call after a CUDA synchronize, so that
    every event is complete): calls, GPU experts, engine seconds, GPU share seconds, and the seconds each side
    waited for the other (the CPU for the GPU's share, the GPU's share for the engine) within the split calls."""
    out = _zero_totals()
    for book in _books.values():
        for k, v in book.take_totals().items():
            out[k] += v
    return out

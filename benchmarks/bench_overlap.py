"""Why the engine's part of a split MoE layer runs slower than alone (issue 25): one DeepSeek-V2-Lite MoE layer
(64 experts, 2048 x 1408, top-6 of --tokens tokens), the engine's forward + backward for the experts a fixed GPU
share leaves it (its slots only), timed in one process under each interference in turn, alone first:

  alone              nothing else running
  DMA                while the copy engine streams page-locked host memory to the GPU (host DRAM shared with
                     DMA; the achieved GB/s is printed too)
  launcher           while a Python thread launches small CUDA kernels in a loop (a core and the GIL taken, as the
                     share's launches take them)
  launcher, N-1      the same with the engine's pool one thread smaller (kt_sft.loader.LAUNCH_CORES)
  after torch op     right after a parallel torch op on the host (its OpenMP workers spin ~ms on the engine's cores;
                     the autograd glue now runs its host ops on one thread)
  split call         moe_experts with the GpuShare of the other experts, forward + backward: the engine's seconds as
                     the share records them, with the pool at N and at N-1 threads; and the call's wall against
                     the larger of its two sides alone (overlap = max(engine alone, GPU share alone) / wall)

    python3 benchmarks/bench_overlap.py                         # device: ~1 min for bf16 and int8-gemm
    python3 benchmarks/bench_overlap.py --tiny                  # CPU smoke run (the rows that need no GPU)
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kt_sft.engine as ke  # noqa: E402
from kt_sft.loader import LAUNCH_CORES  # noqa: E402


def make_layer(E: int, H: int, I: int, fmt: str, gen: torch.Generator) -> ke.ExpertLayer:
    layer = ke.ExpertLayer(E, H, I, fmt)
    for e in range(0, E, 8):  # in slices: a V2-Lite layer's fp32 weights would take 2.2 GB at once
        n = min(8, E - e)
        gate_up = (torch.randn(n, 2 * I, H, generator=gen) * H ** -0.5).bfloat16()
        layer.load_fused(gate_up, (torch.randn(n, H, I, generator=gen) * I ** -0.5).bfloat16(), e)
    return layer


def routing(T: int, E: int, k: int, gen: torch.Generator):
    scores = torch.randn(T, E, generator=gen)
    w, ids = torch.softmax(scores, -1).topk(k, dim=-1)
    return ids, (w / w.sum(-1, keepdim=True)).float()


def engine_pass(layer, x, ids, w, dy) -> float:
    """One forward + backward of the engine (seconds)."""
    start = time.perf_counter()
    _, handle = layer.forward(x, ids, w, save_for_backward=True)
    layer.backward(handle, dy)
    return time.perf_counter() - start


def median_of(reps: int, fn, before=lambda: None) -> float:
    times = []
    for _ in range(reps):
        before()
        times.append(fn())
    return statistics.median(times)


@contextlib.contextmanager
def dma(device, nbytes: int):
    """Keeps the copy engine streaming a page-locked buffer to the GPU; yields a function giving the GB/s so far."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    stream, stop, copied = torch.cuda.Stream(device), threading.Event(), [0]
    start = torch.cuda.Event(enable_timing=True)
    start.record(stream)

    def feed():
        with torch.cuda.stream(stream):
            while not stop.is_set():
                dev.copy_(host, non_blocking=True)
                copied[0] += nbytes
                ev = torch.cuda.Event()
                ev.record(stream)
                while not ev.query() and not stop.is_set():  # at most one copy queued ahead
                    time.sleep(0.0005)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()

    def rate() -> float:
        end = torch.cuda.Event(enable_timing=True)
        end.record(stream)
        end.synchronize()
        return copied[0] / (start.elapsed_time(end) / 1e3) / 1e9

    try:
        yield rate
    finally:
        stop.set()
        feeder.join()
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def launcher(device):
    """A Python thread launching tiny kernels back to back (holds the GIL between launches, takes a core)."""
    small, stop = torch.zeros(16, device=device), threading.Event()

    def loop():
        while not stop.is_set():
            for _ in range(64):
                small.add_(1)
            torch.cuda.current_stream(device).synchronize()  # keep the queue short, as the share's host does

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def pool_threads(n: int):
    before = ke.num_threads()
    ke.set_num_threads(n)
    try:
        yield
    finally:
        ke.set_num_threads(before)


def split_call(layer, share, x, ids, w, dy) -> tuple[float, float]:
    """moe_experts forward + backward with `share`: (the engine's seconds as the share recorded them, wall)."""
    from kt_sft.engine import share_plan

    xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.cuda.synchronize()
    share_plan.take_totals()
    start = time.perf_counter()
    ke.moe_experts(xs, ids, ws, layer, share=share).backward(dy)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return share_plan.take_totals()["engine_s"], wall


def share_alone(share, x, w, dy, ids_host) -> float:
    """The share's forward + backward with no engine call (seconds, synchronized)."""
    plan = share.plan(ids_host, share.fixed, share.routed_counts(ids_host))
    torch.cuda.synchronize()
    start = time.perf_counter()
    share.forward(x, w, plan)
    share.backward(x, w, dy, plan)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_format(fmt: str, args) -> list[tuple[str, float, str]]:
    """(row, engine ms, note) for one expert format."""
    gen = torch.Generator().manual_seed(0)
    E, H, I, T, k = args.experts, args.hidden, args.intermediate, args.tokens, args.topk
    layer = make_layer(E, H, I, fmt, gen)
    ids, w = routing(T, E, k, gen)
    x, dy = (torch.randn(T, H, generator=gen) * 0.5).bfloat16(), (torch.randn(T, H, generator=gen) * 0.01).bfloat16()
    n_share = max(1, round(args.share * E))
    ids_engine = ids.masked_fill(ids >= E - n_share, -1)  # the engine's part of the split
    once = lambda: engine_pass(layer, x, ids_engine, w, dy)  # noqa: E731
    once()  # warm-up: scratch buffers, page faults
    rows = [("alone", median_of(args.reps, once), f"{ke.num_threads()} threads, {E - n_share} of {E} experts")]
    threads = ke.num_threads()
    big = torch.randn(args.omp_mb << 18)
    torch_threads = torch.get_num_threads()
    rows.append(("after torch op", median_of(args.reps, once, lambda: big.clone()),
                 f"a {args.omp_mb} MB clone on {torch_threads} torch threads just before"))
    if not torch.cuda.is_available():
        return rows
    device = torch.device("cuda")
    with dma(device, 256 << 20) as rate:
        ms = median_of(args.reps, once)
        rows.append(("DMA", ms, f"host->device copies meanwhile at {rate():.1f} GB/s"))
    with launcher(device):
        rows.append(("launcher", median_of(args.reps, once), f"{threads} threads"))
        with pool_threads(max(1, threads - LAUNCH_CORES)):
            rows.append(("launcher, N-1", median_of(args.reps, once), f"{ke.num_threads()} threads"))
    xd, wd, dyd, idsd = x.to(device), w.to(device), dy.to(device), ids.to(device)
    share = ke.GpuShare(layer, n_share, device, min_tokens=1)
    alone_gpu = median_of(args.reps, lambda: share_alone(share, xd, wd, dyd, ids))
    engine_alone = rows[0][1]
    for n in (threads, max(1, threads - LAUNCH_CORES)):
        with pool_threads(n):
            split_call(layer, share, xd, idsd, wd, dyd)
            got = [split_call(layer, share, xd, idsd, wd, dyd) for _ in range(args.reps)]
        engine_s, wall = statistics.median(g[0] for g in got), statistics.median(g[1] for g in got)
        rows.append((f"split call, {n} threads", engine_s,
                     f"call wall {wall * 1e3:.1f} ms; GPU share alone {alone_gpu * 1e3:.1f} ms; overlap "
                     f"{max(engine_alone, alone_gpu) / wall:.2f}"))
    return rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--formats", nargs="+", default=["bf16", "int8-gemm"], choices=list(ke.FORMATS))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--share", type=float, default=0.7, help="fraction of the experts on the GPU share (the last)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--omp-mb", type=int, default=32, help="size of the torch op before the 'after torch op' row")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 8 experts of 64 x 48, 64 tokens, top-2")
    args = p.parse_args()
    args.experts, args.hidden, args.intermediate, args.topk = 64, 2048, 1408, 6
    if args.tiny:
        args.experts, args.hidden, args.intermediate, args.topk, args.tokens, args.reps = 8, 64, 48, 2, 64, 3
        args.omp_mb = 8
    return args


def main() -> None:
    args = parse_args()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"engine {ke.current_isa()}, {ke.num_threads()} threads; {gpu}; layer {args.experts} x {args.hidden} x "
          f"{args.intermediate}, {args.tokens} tokens top-{args.topk}, GPU share of the last {args.share:g}; "
          f"medians of {args.reps}")
    for fmt in args.formats:
        rows = measure_format(fmt, args)
        alone = rows[0][1]
        print(f"\n{fmt}: engine forward + backward of its part of the layer")
        for name, seconds, note in rows:
            print(f"  {name:<24} {seconds * 1e3:8.1f} ms  {seconds / alone:5.2f}x alone   {note}")


if __name__ == "__main__":
    main()

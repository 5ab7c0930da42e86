"""Decode-size calls of one V2-Lite MoE layer (E=64, k=6, H=2048, I=1408, bf16): where the time of a step goes.

For T in (1, 8, 32) tokens it times, per call: the engine alone on host tensors, and the whole `moe_experts`
path from CUDA tensors (device->host copy and sync, engine, host->device copy) when a GPU is present. The
bandwidth column counts the bytes of the distinct experts the call reads (a decode call is bandwidth-bound:
the weights are read once, the arithmetic is tiny).

    python benchmarks/bench_decode_layer.py [--iters 200]

--json prints one JSON row per T on stdout (the table goes to stderr); --record appends them to
benchmarks/results/bench_decode_layer.csv (or --results-dir).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import kt_sft.engine as ke
from kt_sft.engine import ExpertLayer, moe_experts

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (benchmarks/results.py: the rows every benchmark records)


def per_call_seconds(fn, iters: int, sync=lambda: None) -> float:
    for _ in range(10):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - start) / iters


def run(a: argparse.Namespace) -> list[dict]:
    """The table printed, one results row per T returned."""
    E, k, H, I = 64, 6, 2048, 1408
    run_info = {**results.provenance(ke.current_isa(), ke.num_threads()), "experts": E, "topk": k, "hidden": H,
                "intermediate": I, "iters": a.iters}
    rows = []
    g = torch.Generator().manual_seed(0)
    layer = ExpertLayer.from_fused(torch.randn(E, 2 * I, H, generator=g, dtype=torch.bfloat16) * 0.02,
                                   torch.randn(E, H, I, generator=g, dtype=torch.bfloat16) * 0.02)
    expert_bytes = 3 * H * I * 2
    cuda = torch.cuda.is_available()
    print(f"engine: {ke.current_isa()}, {ke.num_threads()} threads")
    print(f"{'T':>4} {'experts':>8} {'engine us':>10} {'GB/s':>7} {'from cuda us':>13} {'overhead us':>12}")
    for T in a.tokens:
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        w = torch.softmax(torch.randn(T, k, generator=g), -1)
        x = torch.randn(T, H, generator=g).to(torch.bfloat16)
        touched = ids.unique().numel()
        engine_s = per_call_seconds(lambda: layer.forward(x, ids, w), a.iters)
        line = f"{T:>4} {touched:>8} {engine_s * 1e6:>10.0f} {touched * expert_bytes / engine_s / 1e9:>7.1f}"
        rows.append({**run_info, "variant": "ours bf16", "tokens": T, "experts_read": touched,
                     "engine_us": engine_s * 1e6, "gb_per_s": touched * expert_bytes / engine_s / 1e9})
        if cuda:
            xc, idc, wc = x.cuda(), ids.cuda(), w.cuda()
            with torch.no_grad():
                full_s = per_call_seconds(lambda: moe_experts(xc, idc, wc, layer), a.iters, torch.cuda.synchronize)
            line += f" {full_s * 1e6:>13.0f} {(full_s - engine_s) * 1e6:>12.0f}"
            rows[-1]["from_cuda_us"] = full_s * 1e6
        print(line, flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32])
    results.add_arguments(p)
    a = p.parse_args()
    with results.human_output(a):
        rows = run(a)
    results.emit("bench_decode_layer", rows, a)


if __name__ == "__main__":
    main()

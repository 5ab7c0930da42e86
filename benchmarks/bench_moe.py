"""One MoE layer, forward + backward (input and routing-weight grads, frozen experts): kt-sft engine vs a
naive PyTorch per-expert loop, in the same run.

Default shape: DeepSeek-V2-Lite (E=64, k=6, H=2048, I=1408), 4096 tokens.
    python benchmarks/bench_moe.py                     # full V2-Lite layer (needs ~3 GB RAM)
    python benchmarks/bench_moe.py --small             # seconds-long version (`make demo` before the training demo)
    python benchmarks/bench_moe.py --tokens 1024 --threads 16 --isa amx
    python benchmarks/bench_moe.py --tokens 1024 --lora-rank 8 --no-baseline   # + LoRA on the routed experts
    python benchmarks/bench_moe.py --tokens 1024 --int8 --no-baseline          # + int8 weights (INT8 and AMXINT8)
Reported per layer: fwd ms, bwd ms, TFLOPS (fwd and bwd each do 6*T*k*H*I flops), tokens/s; ratio last.
--lora-rank R (> 0) adds a row for the engine with per-expert LoRA of rank R on gate_up and down (PEFT layout,
fp32 factors, factor gradients included in bwd) and the LoRA overhead (frozen-only tokens/s / with-LoRA tokens/s).
--int8 adds two rows for the same layer with int8 weights (per-channel scales) and their weight memory: GEMMs in bf16
(kt_backend INT8) and GEMMs in int8 with per-row activation quantization (kt_backend AMXINT8), each with its error
against the bf16 layer.
--profile prints the engine's per-phase wall times (kt_sft.engine.phase_profile) under each engine row.
--against DIR adds a row for the engine of another kt-sft checkout (built in place, e.g. a `git worktree` of the
previous commit), loaded under another package name and interleaved with ours: an A/B of two builds in one
process, where the host's drift (±15 % between processes on the device) cannot masquerade as a kernel change.
For the device, whose copy of the tree has no .git: `git archive REV | tar -x -C .dev/base` here, carry .dev,
and there `(cd .dev/base && python3 setup.py build_ext --inplace -q)` before `--against .dev/base`.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib.util
import pathlib
import shutil
import sys
import tempfile
import statistics
import time

import torch
import torch.nn.functional as F

import kt_sft.engine as ke


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="0 = KT_SFT_THREADS or physical cores")
    p.add_argument("--isa", default=None, help="scalar|avx2|avx512|amx (default: best available)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skewed", action="store_true", help="route most tokens to a few experts")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive torch loop")
    p.add_argument("--small", action="store_true", help="E=8 k=2 H=256 I=192 T=256: a quick run")
    p.add_argument("--int8", action="store_true", help="also time the layer with int8 weights (kt_backend AMXINT8)")
    p.add_argument("--profile", action="store_true", help="per-phase engine times (ms per call) after each row")
    p.add_argument("--against", metavar="DIR", action="append", default=[],
                   help="kt-sft checkout (built in place) whose engine runs interleaved with ours (repeatable)")
    p.add_argument("--evict-mb", type=int, default=0,
                   help="rewrite this many MB of other memory before every timed pair: the layer then starts cold, "
                        "as in a model whose other layers ran in between (0 = off)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="also time the engine with expert LoRA of this rank on gate_up and down (0 = off)")
    args = p.parse_args()
    if args.small:
        args.experts, args.topk, args.hidden, args.intermediate, args.tokens = 8, 2, 256, 192, 256
    return args


def make_inputs(a: argparse.Namespace):
    gen = torch.Generator().manual_seed(0)
    E, H, I, T, k = a.experts, a.hidden, a.intermediate, a.tokens, a.topk
    gate_up = (torch.randn(E, 2 * I, H, generator=gen) * H ** -0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=gen) * I ** -0.5).bfloat16()
    scores = torch.randn(T, E, generator=gen)
    if a.skewed:
        scores[:, : max(1, E // 16)] += 3.0
    ids = scores.topk(k, dim=-1).indices.contiguous()
    w = torch.softmax(torch.randn(T, k, generator=gen), -1).contiguous()
    x = torch.randn(T, H, generator=gen).bfloat16()
    dy = torch.randn(T, H, generator=gen).bfloat16()
    return gate_up, down, ids, w, x, dy


def naive_forward(x, ids, w, gate_up, down):
    """The baseline: a Python loop over experts with torch matmuls (bf16), autograd for backward."""
    I = down.shape[2]
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        gu = x[tok] @ gate_up[e].T
        out = (F.silu(gu[:, :I]) * gu[:, I:]) @ down[e].T
        y = y.index_add(0, tok, out * w[tok, slot, None].to(out.dtype))
    return y


def timed(fn, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_lora(a: argparse.Namespace, rank: int) -> ke.ExpertLoRA:
    """PEFT-layout factors of rank `rank` on both projections, lora_alpha = 2r; B random (a trained adapter)."""
    gen = torch.Generator().manual_seed(1)
    E, H, I, r = a.experts, a.hidden, a.intermediate, rank
    A_gu = (torch.rand(r * E, 2 * I, generator=gen) * 2 - 1) * (2 * I) ** -0.5
    B_gu = torch.randn(H, r * E, generator=gen) * 1e-2
    A_d = (torch.rand(r * E, H, generator=gen) * 2 - 1) * H ** -0.5
    B_d = torch.randn(I, r * E, generator=gen) * 1e-2
    return ke.ExpertLoRA(A_gu, B_gu, A_d, B_d, scale_gu=2.0, scale_d=2.0)


class EngineVariant:
    """One engine configuration (layer + optional LoRA) timed in forward/backward pairs."""

    def __init__(self, name: str, layer: ke.ExpertLayer, lora=None, engine=ke, against=None) -> None:
        # against: our variant that an --against row is compared with (same weights and GEMM dtype)
        self.name, self.layer, self.lora, self.engine, self.against = name, layer, lora, engine, against
        self.fwd, self.bwd, self.phases, self.state = [], [], {}, {}

    def warm(self, x, ids, w, dy) -> None:
        # First use of every saved slot (page faults on ~140 MB of activations each) stays out of the timings:
        # a forward-backward pair alone would touch only one slot, since backward frees it.
        handles = [self.layer.forward(x, ids, w, save_for_backward=True, lora=self.lora)[1]
                   for _ in range(self.layer.max_saved)]
        for h in handles:
            self.layer.release(h)
        self.pair(x, ids, w, dy, record=False)

    def pair(self, x, ids, w, dy, record: bool = True, profile: bool = False, evict=None) -> None:
        if evict is not None:
            evict.add_(1)  # outside the timed region: only the caches it leaves behind count
        with self.engine.phase_profile() if profile else contextlib.nullcontext({}) as phases:
            t0 = time.perf_counter()
            y, handle = self.layer.forward(x, ids, w, save_for_backward=True, lora=self.lora)
            t1 = time.perf_counter()
            out = self.layer.backward(handle, dy, lora=self.lora)
            t2 = time.perf_counter()
        self.state.update(y=y, dx=out[0], dw=out[1])
        if record:
            self.fwd.append(t1 - t0)
            self.bwd.append(t2 - t1)
            for name, (calls, seconds) in phases.items():
                c, t = self.phases.get(name, (0, 0.0))
                self.phases[name] = (c + calls, t + seconds)

    def medians(self) -> tuple[float, float]:
        return statistics.median(self.fwd), statistics.median(self.bwd)


def load_other_engine(checkout: str, name: str):
    """kt_sft.engine of another checkout, imported as package `name` from a private copy of its kt_sft/ (own
    extension module file, so its own thread pool and ISA choice, even for this very checkout: the same .so
    file would load only once), so several builds live in this process."""
    src = pathlib.Path(checkout, "kt_sft")
    if not (src / "__init__.py").is_file() or not list(src.glob("_engine*.so")):
        raise SystemExit(f"--against {checkout}: no built kt-sft checkout there (kt_sft/__init__.py and "
                         "kt_sft/_engine*.so; run `python setup.py build_ext --inplace` in it)")
    dst = pathlib.Path(tempfile.mkdtemp(prefix="kt_sft_against_")) / name
    atexit.register(shutil.rmtree, dst.parent, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
    spec = importlib.util.spec_from_file_location(name, dst / "__init__.py", submodule_search_locations=[str(dst)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[name] = pkg
    spec.loader.exec_module(pkg)
    return importlib.import_module(f"{name}.engine")


def other_layer(other, gate_up, down, fmt: str):
    """A layer of another checkout's engine: one with the format table (kt_sft.engine.formats) takes the format
    name; an older one took (dtype, weights, int8_compute)."""
    if hasattr(other, "get_format"):
        return other.ExpertLayer.from_fused(gate_up, down, fmt)
    old = {"bf16": {}, "int8": {"weights": "int8"}, "int8-gemm": {"weights": "int8", "int8_compute": True}}[fmt]
    return other.ExpertLayer.from_fused(gate_up, down, dtype=torch.bfloat16, **old)


def bench_engines(a, variants: list[EngineVariant], ids, w, x, dy) -> None:
    """Every variant's forward/backward pairs interleaved round by round, so slow drifts of the machine (clock,
    neighbours) hit all variants alike and their ratios stay fair; medians over `iters` rounds."""
    for v in variants:
        v.warm(x, ids, w, dy)
    for _ in range(a.warmup):
        for v in variants:
            v.pair(x, ids, w, dy, record=False)
    evict = torch.zeros(a.evict_mb * 2**20 // 4) if a.evict_mb > 0 else None
    for _ in range(a.iters):
        for v in variants:
            v.pair(x, ids, w, dy, profile=a.profile, evict=evict)


def print_phases(v: EngineVariant) -> None:
    for name, (calls, seconds) in v.phases.items():
        print(f"    {name:<42} {seconds / max(1, calls) * 1e3:8.1f} ms/call")


def bench_naive(a, gate_up, down, ids, w, x, dy):
    state = {}

    def fwd():
        xr = x.detach().requires_grad_(True)
        wr = w.detach().requires_grad_(True)
        state.update(x=xr, w=wr, y=naive_forward(xr, ids, wr, gate_up, down))

    def bwd():
        state["dx"], state["dw"] = torch.autograd.grad(state["y"], (state["x"], state["w"]), dy)

    fwd()
    bwd()
    t_fwd = timed(fwd, a.iters, a.warmup)
    times = []
    for _ in range(a.iters):
        fwd()
        t0 = time.perf_counter()
        bwd()
        times.append(time.perf_counter() - t0)
    return t_fwd, statistics.median(times), state


def row(name: str, t_fwd: float, t_bwd: float, flops: float, tokens: int) -> str:
    return (f"{name:<22} {t_fwd * 1e3:9.1f} {t_bwd * 1e3:9.1f} {flops / t_fwd / 1e12:8.2f} "
            f"{flops / t_bwd / 1e12:8.2f} {tokens / (t_fwd + t_bwd):11.0f}")


def main() -> None:
    a = parse_args()
    if a.isa:
        ke.select_isa(a.isa)
    ke.set_num_threads(a.threads)
    threads = ke.num_threads()
    torch.set_num_threads(threads)
    E, H, I, T, k = a.experts, a.hidden, a.intermediate, a.tokens, a.topk
    info = ke.cpu_info()
    print(f"cpu: {info['model']} | engine isa={ke.current_isa()} threads={threads} | torch {torch.__version__} "
          f"threads={torch.get_num_threads()}")
    print(f"shape: E={E} k={k} H={H} I={I} T={T}{' skewed' if a.skewed else ''} | iters={a.iters} rounds (median)"
          f"{f' | {a.evict_mb} MB rewritten before each pair' if a.evict_mb else ''}")
    inputs = make_inputs(a)
    flops = 6.0 * T * k * H * I
    header = f"{'':<22} {'fwd ms':>9} {'bwd ms':>9} {'fwd TF/s':>8} {'bwd TF/s':>8} {'tokens/s':>11}"
    gate_up, down, ids, w, x, dy = inputs
    frozen = EngineVariant(f"kt-sft ({ke.current_isa()})", ke.ExpertLayer.from_fused(gate_up, down, "bf16"))
    variants = [frozen]
    ours_int8 = None
    if a.int8:
        ours_int8 = EngineVariant("kt-sft int8 GEMMs", ke.ExpertLayer.from_fused(gate_up, down, "int8-gemm"))
    for i, checkout in enumerate(a.against):
        other = load_other_engine(checkout, f"kt_sft_against{i}")
        if a.isa:
            other.select_isa(a.isa)
        other.set_num_threads(threads)
        label = pathlib.Path(checkout).resolve().name[:12]
        variants.append(EngineVariant(f"{label} ({other.current_isa()})", other_layer(other, gate_up, down, "bf16"), engine=other, against=frozen))
        if a.int8:
            variants.append(EngineVariant(f"{label} int8 GEMMs", other_layer(
                other, gate_up, down, "int8-gemm"), engine=other,
                against=ours_int8))
    if a.lora_rank > 0:
        variants.append(EngineVariant(f"kt-sft + LoRA r={a.lora_rank}", frozen.layer, make_lora(a, a.lora_rank)))
    if a.int8:
        variants.append(EngineVariant("kt-sft int8 weights", ke.ExpertLayer.from_fused(gate_up, down, "int8")))
        variants.append(ours_int8)
    bench_engines(a, variants, ids, w, x, dy)
    print(header)
    for v in variants:
        print(row(v.name, *v.medians(), flops, T))
        print_phases(v)
    f_fwd, f_bwd = frozen.medians()
    for v in variants[1:]:
        v_fwd, v_bwd = v.medians()
        if v.against is not None:
            o_fwd, o_bwd = v.against.medians()
            print(f"{v.against.name} / {v.name} tokens/s: {(v_fwd + v_bwd) / (o_fwd + o_bwd):.3f}x "
                  f"(fwd {v_fwd / o_fwd:.3f}x, bwd {v_bwd / o_bwd:.3f}x)")
        elif v.lora is not None:
            print(f"LoRA overhead (frozen-only tokens/s / with-LoRA tokens/s): {(v_fwd + v_bwd) / (f_fwd + f_bwd):.3f}x "
                  f"(fwd {v_fwd / f_fwd:.3f}x, bwd {v_bwd / f_bwd:.3f}x); TF/s columns count the frozen flops only")
        else:
            err = {k: ((v.state[k].float() - frozen.state[k].float()).norm() / frozen.state[k].float().norm()).item()
                   for k in ("y", "dx")}
            print(f"{v.name[7:]} / bf16 weights: tokens/s {(f_fwd + f_bwd) / (v_fwd + v_bwd):.3f}x "
                  f"(fwd {f_fwd / v_fwd:.3f}x, bwd {f_bwd / v_bwd:.3f}x); weight memory "
                  f"{v.layer.packed_bytes / 2**30:.2f} GiB vs {frozen.layer.packed_bytes / 2**30:.2f} GiB; "
                  f"rel diff to bf16 y {err['y']:.2e}, dx {err['dx']:.2e}")
    if a.no_baseline:
        return
    base = bench_naive(a, *inputs)
    print(row("naive torch loop", base[0], base[1], flops, T))
    ours_y, ours_dx = frozen.state["y"].float(), frozen.state["dx"].float()
    diff = (ours_y - base[2]["y"].float()).norm() / base[2]["y"].float().norm()
    ddx = (ours_dx - base[2]["dx"].float()).norm() / base[2]["dx"].float().norm()
    print(f"agreement with the naive loop: rel diff y {diff:.2e}, dx {ddx:.2e}")
    print(f"ratio (ours / naive tokens/s): {(base[0] + base[1]) / (f_fwd + f_bwd):.2f}x "
          f"(fwd {base[0] / f_fwd:.2f}x, bwd {base[1] / f_bwd:.2f}x)")


if __name__ == "__main__":
    main()

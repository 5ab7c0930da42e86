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
--json prints one JSON row per variant on stdout (the report above goes to stderr); --record appends the rows to
benchmarks/results/bench_moe.csv (or --results-dir), whose rows BENCHMARKS.md's tables are generated from
(benchmarks/results.py, benchmarks/report.py).
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
import subprocess
import time

import torch
import torch.nn.functional as F

import kt_sft.engine as ke

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import results  # noqa: E402  (benchmarks/results.py: the rows every benchmark records)


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
    p.add_argument("--formats", nargs="+", default=[], choices=[f for f in ke.FORMATS if f != "bf16"],
                   help="also time the layer in these expert formats (kt_sft/engine/formats.py), each against bf16")
    p.add_argument("--profile", action="store_true", help="per-phase engine times (ms per call) after each row")
    p.add_argument("--against", metavar="DIR", action="append", default=[],
                   help="kt-sft checkout (built in place) whose engine runs interleaved with ours (repeatable)")
    p.add_argument("--evict-mb", type=int, default=0,
                   help="rewrite this many MB of other memory before every timed pair: the layer then starts cold, "
                        "as in a model whose other layers ran in between (0 = off)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="also time the engine with expert LoRA of this rank on gate_up and down (0 = off)")
    results.add_arguments(p)
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
    """One engine configuration (layer + optional LoRA) timed in forward/backward pairs. `name` labels its line in
    the human report, `variant` its row in the results ("ours bf16", "against <build> int8-gemm", ...)."""

    def __init__(self, name: str, variant: str, layer: ke.ExpertLayer, lora=None, engine=ke, against=None) -> None:
        # against: our variant that an --against row is compared with (same weights and GEMM dtype)
        self.name, self.variant, self.layer, self.lora = name, variant, layer, lora
        self.engine, self.against = engine, against
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

    def row(self, tokens: int) -> dict:
        """Its results row: median forward and backward, tokens/s of the median and extreme rounds, phases."""
        fwd, bwd = self.medians()
        pairs = [f + b for f, b in zip(self.fwd, self.bwd)]
        phases = {name: round(seconds / max(1, calls) * 1e3, 3) for name, (calls, seconds) in self.phases.items()}
        return {"variant": self.variant, "fwd_ms": fwd * 1e3, "bwd_ms": bwd * 1e3, **results.spread(tokens, pairs),
                "tokens_per_s": tokens / (fwd + bwd), "phases_ms": phases or None}


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
    """Median forward and backward seconds of the naive loop, its results row and its outputs."""
    state = {}

    def fwd():
        xr = x.detach().requires_grad_(True)
        wr = w.detach().requires_grad_(True)
        state.update(x=xr, w=wr, y=naive_forward(xr, ids, wr, gate_up, down))

    def bwd():
        state["dx"], state["dw"] = torch.autograd.grad(state["y"], (state["x"], state["w"]), dy)

    for _ in range(1 + a.warmup):
        fwd()
        bwd()
    fwds, bwds = [], []
    for _ in range(a.iters):
        t0 = time.perf_counter()
        fwd()
        t1 = time.perf_counter()
        bwd()
        fwds.append(t1 - t0)
        bwds.append(time.perf_counter() - t1)
    t_fwd, t_bwd = statistics.median(fwds), statistics.median(bwds)
    row = {"variant": "naive", "fwd_ms": t_fwd * 1e3, "bwd_ms": t_bwd * 1e3,
           **results.spread(a.tokens, [f + b for f, b in zip(fwds, bwds)]), "tokens_per_s": a.tokens / (t_fwd + t_bwd)}
    return t_fwd, t_bwd, row, state


def table_line(name: str, t_fwd: float, t_bwd: float, flops: float, tokens: int) -> str:
    return (f"{name:<22} {t_fwd * 1e3:9.1f} {t_bwd * 1e3:9.1f} {flops / t_fwd / 1e12:8.2f} "
            f"{flops / t_bwd / 1e12:8.2f} {tokens / (t_fwd + t_bwd):11.0f}")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def against_label(checkout: str) -> str:
    """The other build's commit when its checkout is a git tree (a worktree of an older commit), else its
    directory's name (the device's copy of `git archive REV`, e.g. .dev/base)."""
    path = pathlib.Path(checkout).resolve()
    try:
        top, head = subprocess.run(["git", "-C", str(path), "rev-parse", "--show-toplevel", "--short", "HEAD"],
                                   capture_output=True, text=True, timeout=10, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError, ValueError):
        return path.name[:12]
    return head if pathlib.Path(top).resolve() == path else path.name[:12]  # not the tree of a parent checkout


def build_variants(a, gate_up, down, threads: int) -> list[EngineVariant]:
    """Ours bf16 first, then the --against builds, ours + LoRA, ours int8 weights, ours int8 GEMMs."""
    layer = lambda fmt: ke.ExpertLayer.from_fused(gate_up, down, fmt)  # noqa: E731
    frozen = EngineVariant(f"kt-sft ({ke.current_isa()})", "ours bf16", layer("bf16"))
    variants = [frozen]
    ours_int8 = None
    if a.int8:
        ours_int8 = EngineVariant("kt-sft int8 GEMMs", "ours int8-gemm", layer("int8-gemm"))
    for i, checkout in enumerate(a.against):
        other = load_other_engine(checkout, f"kt_sft_against{i}")
        if a.isa:
            other.select_isa(a.isa)
        other.set_num_threads(threads)
        name, label = pathlib.Path(checkout).resolve().name[:12], against_label(checkout)
        variants.append(EngineVariant(f"{name} ({other.current_isa()})", f"against {label} bf16",
                                      other_layer(other, gate_up, down, "bf16"), engine=other, against=frozen))
        if a.int8:
            variants.append(EngineVariant(f"{name} int8 GEMMs", f"against {label} int8-gemm",
                                          other_layer(other, gate_up, down, "int8-gemm"), engine=other,
                                          against=ours_int8))
    if a.lora_rank > 0:
        variants.append(EngineVariant(f"kt-sft + LoRA r={a.lora_rank}", f"ours bf16 + LoRA r={a.lora_rank}",
                                      frozen.layer, make_lora(a, a.lora_rank)))
    if a.int8:
        variants.append(EngineVariant("kt-sft int8 weights", "ours int8", layer("int8")))
        variants.append(ours_int8)
    for name in a.formats:  # quantized at load with the row's default scale grid
        if not (a.int8 and name in ("int8", "int8-gemm")):
            variants.append(EngineVariant(f"kt-sft {name}", f"ours {name}", layer(name)))
    return variants


def compare(v: EngineVariant, frozen: EngineVariant) -> tuple[str, dict]:
    """The ratio line of a variant against its reference (ours of the same format for an --against build, the
    frozen bf16 layer otherwise) and the same ratio as results fields."""
    v_fwd, v_bwd = v.medians()
    f_fwd, f_bwd = frozen.medians()
    if v.against is not None:
        o_fwd, o_bwd = v.against.medians()
        ratio = (v_fwd + v_bwd) / (o_fwd + o_bwd)
        label = v.variant.removesuffix(" bf16").replace("against ", "ours/")
        return (f"{v.against.name} / {v.name} tokens/s: {ratio:.3f}x "
                f"(fwd {v_fwd / o_fwd:.3f}x, bwd {v_bwd / o_bwd:.3f}x)", {"ratio": round(ratio, 3), "ratio_of": label})
    if v.lora is not None:
        ratio = (v_fwd + v_bwd) / (f_fwd + f_bwd)
        return (f"LoRA overhead (frozen-only tokens/s / with-LoRA tokens/s): {ratio:.3f}x "
                f"(fwd {v_fwd / f_fwd:.3f}x, bwd {v_bwd / f_bwd:.3f}x); TF/s columns count the frozen flops only",
                {"ratio": round(ratio, 3), "ratio_of": "LoRA overhead"})
    err = {k: rel_diff(v.state[k], frozen.state[k]) for k in ("y", "dx")}
    ratio = (f_fwd + f_bwd) / (v_fwd + v_bwd)
    gib = v.layer.packed_bytes / 2**30
    return (f"{v.name[7:]} / bf16 weights: tokens/s {ratio:.3f}x (fwd {f_fwd / v_fwd:.3f}x, bwd {f_bwd / v_bwd:.3f}x); "
            f"weight memory {gib:.2f} GiB vs {frozen.layer.packed_bytes / 2**30:.2f} GiB; "
            f"rel diff to bf16 y {err['y']:.2e}, dx {err['dx']:.2e}",
            {"ratio": round(ratio, 3), "ratio_of": f"{v.variant.removeprefix('ours ')}/bf16", "err_y": err["y"],
             "err_dx": err["dx"], "weight_gib": gib})


def baseline(a, inputs, frozen: EngineVariant, flops: float) -> tuple[dict, dict]:
    """The naive loop's line, its agreement with ours and the ratio (printed last); its row and ours' fields."""
    t_fwd, t_bwd, row, state = bench_naive(a, *inputs)
    print(table_line("naive torch loop", t_fwd, t_bwd, flops, a.tokens))
    f_fwd, f_bwd = frozen.medians()
    diff, ddx = rel_diff(frozen.state["y"], state["y"]), rel_diff(frozen.state["dx"], state["dx"])
    print(f"agreement with the naive loop: rel diff y {diff:.2e}, dx {ddx:.2e}")
    ratio = (t_fwd + t_bwd) / (f_fwd + f_bwd)
    print(f"ratio (ours / naive tokens/s): {ratio:.2f}x (fwd {t_fwd / f_fwd:.2f}x, bwd {t_bwd / f_bwd:.2f}x)")
    return row, {"ratio": round(ratio, 3), "ratio_of": "ours/naive", "err_y": diff, "err_dx": ddx}


def run(a: argparse.Namespace) -> list[dict]:
    """Every variant timed, the human report printed (ratios last); the results rows returned."""
    if a.isa:
        ke.select_isa(a.isa)
    ke.set_num_threads(a.threads)
    threads = ke.num_threads()
    torch.set_num_threads(threads)
    E, H, I, T, k = a.experts, a.hidden, a.intermediate, a.tokens, a.topk
    print(f"cpu: {ke.cpu_info()['model']} | engine isa={ke.current_isa()} threads={threads} | "
          f"torch {torch.__version__} threads={torch.get_num_threads()}")
    print(f"shape: E={E} k={k} H={H} I={I} T={T}{' skewed' if a.skewed else ''} | iters={a.iters} rounds (median)"
          f"{f' | {a.evict_mb} MB rewritten before each pair' if a.evict_mb else ''}")
    run_info = {**results.provenance(ke.current_isa(), threads), "experts": E, "topk": k, "hidden": H,
                "intermediate": I, "tokens": T, "routing": "skewed" if a.skewed else "uniform",
                "evict_mb": a.evict_mb, "iters": a.iters}
    inputs = make_inputs(a)
    flops = 6.0 * T * k * H * I
    gate_up, down, ids, w, x, dy = inputs
    variants = build_variants(a, gate_up, down, threads)
    bench_engines(a, variants, ids, w, x, dy)
    print(f"{'':<22} {'fwd ms':>9} {'bwd ms':>9} {'fwd TF/s':>8} {'bwd TF/s':>8} {'tokens/s':>11}")
    for v in variants:
        print(table_line(v.name, *v.medians(), flops, T))
        print_phases(v)
    rows = {v.variant: {**run_info, **v.row(T)} for v in variants}
    for v in variants[1:]:
        line, fields = compare(v, variants[0])
        print(line)
        rows[v.variant].update(fields)
    if not a.no_baseline:
        naive, ours = baseline(a, inputs, variants[0], flops)
        rows["naive"] = {**run_info, **naive}
        rows["ours bf16"].update(ours)
    return list(rows.values())


def main() -> None:
    a = parse_args()
    with results.human_output(a):
        rows = run(a)
    results.emit("bench_moe", rows, a)


if __name__ == "__main__":
    main()

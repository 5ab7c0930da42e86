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
--against DIR adds rows for the engine of another kt-sft checkout (built in place, e.g. a `git worktree` of the
previous commit), loaded under another package name and interleaved with ours: an A/B of two builds in one
process, where the host's drift (±15 % between processes on the device) cannot masquerade as a kernel change. It
gets a row, and a ratio against ours, for every format timed: bf16, --int8's two and each of --formats; each ratio
line also says whether the two builds' outputs (y, dx, dw) are bitwise equal.
For the device, whose copy of the tree has no .git: `git archive REV | tar -x -C .dev/base` here, carry .dev,
and there `(cd .dev/base && python3 setup.py build_ext --inplace -q)` before `--against .dev/base`.
--kchunk N [N ...] adds rows for our bf16 layer (and int8 GEMMs with --int8) with the task GEMMs' K chunk forced to
N (kt_sft.engine.use_kchunk; 1048576: every task in one pass), each against ours with the tasks' own choice, in the
same rounds.
--json prints one JSON row per variant on stdout (the report above goes to stderr); --record appends the rows to
benchmarks/results/bench_moe.csv (or --results-dir), whose rows BENCHMARKS.md's tables are generated from
(benchmarks/results.py, benchmarks/report.py).

The shape table (rows in benchmarks/results/bench_moe_shapes.csv):
    python benchmarks/bench_moe.py --shapes                                   # every shape, T = 1 8 32 1024 4096 16384
    python benchmarks/bench_moe.py --shapes DeepSeek-V3 Kimi-K2 --tokens 4096 --formats int8-gemm fp8
    python benchmarks/bench_moe.py --smoke                                    # 2 small shapes, 8 experts, T = 64 and 1
--shapes [NAME ...] times one layer of each named shape (benchmarks/moe_shapes.py: the real (experts, top-k,
hidden, moe intermediate) of DeepSeek-V2-Lite ... Kimi-K2, Mixtral; all when no name is given) at each --tokens:
forward + backward, or forward only for decode calls (T <= 32, a new routing each round), in bf16 and the --formats
(default int8-gemm), with kt-kernel's layer beside ours where its wheel is installed (--no-kt-kernel: not). First
it measures this host's ceilings (benchmarks/host_ceiling.py: the bf16 / int8 GEMM loops with their operands in
L1, the DRAM read bandwidth; same threads, same process); each row then prints tokens/s, TF/s and its time
against the floor max(FLOPs / compute ceiling, bytes / bandwidth) (bytes: the routed experts' packed weights once
+ the pass's input and output), naming the ceiling that binds. A shape whose layers do not fit in RAM runs a
subset of its experts with the full layer's rows per expert, and the row says so. Each (shape, T) repeats its
interleaved rounds for about --row-seconds (at least --iters rounds).
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import importlib.util
import math
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
import host_ceiling  # noqa: E402  (benchmarks/host_ceiling.py: this host's compute and bandwidth ceilings)
import moe_shapes  # noqa: E402  (benchmarks/moe_shapes.py: the models' MoE shapes, subsets, floors)
import results  # noqa: E402  (benchmarks/results.py: the rows every benchmark records)

SHAPE_TOKENS = (1, 8, 32, 1024, 4096, 16384)  # --shapes' default calls: decode steps, then training sequences
SMOKE_SHAPES = ("DeepSeek-V2-Lite", "Qwen3-30B-A3B")  # the two smallest: --smoke runs 8 of their experts
MAX_ROUNDS = 50  # per (shape, T): decode calls take milliseconds, --row-seconds would ask for thousands
DECODE_ROUTINGS = 8  # decode rounds cycle through this many routings: each call reads other experts' weights
POOL_BYTES = 256 * 2**20  # random bf16 weights made once per shape (<= 4 experts) and packed into every expert


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--tokens", type=int, nargs="+", default=None,
                   help="tokens per call (default 4096; with --shapes a list, default: "
                        + " ".join(map(str, SHAPE_TOKENS)) + ")")
    p.add_argument("--threads", type=int, default=0, help="0 = KT_SFT_THREADS or physical cores")
    p.add_argument("--isa", default=None, help="scalar|avx2|avx512|amx (default: best available)")
    p.add_argument("--numa", default=None, help="auto|off|N: our engine's NUMA nodes (kt_sft.engine.set_numa; default: "
                   "KT_SFT_NUMA, else auto); an --against build keeps its own (main: one node, unpinned)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--skewed", action="store_true", help="route most tokens to a few experts")
    p.add_argument("--no-baseline", action="store_true", help="skip the naive torch loop")
    p.add_argument("--small", action="store_true", help="E=8 k=2 H=256 I=192 T=256: a quick run")
    p.add_argument("--int8", action="store_true", help="also time the layer with int8 weights (kt_backend AMXINT8)")
    p.add_argument("--formats", nargs="*", default=None, choices=[f for f in ke.FORMATS if f != "bf16"],
                   help="also time the layer in these expert formats (kt_sft/engine/formats.py), each against bf16 "
                        "(--shapes: default int8-gemm)")
    p.add_argument("--profile", action="store_true", help="per-phase engine times (ms per call) after each row")
    p.add_argument("--against", metavar="DIR", action="append", default=[],
                   help="kt-sft checkout (built in place) whose engine runs interleaved with ours (repeatable)")
    p.add_argument("--kchunk", type=int, nargs="+", default=[], metavar="N",
                   help="also time ours with the K chunk forced to N (1048576: one pass), against the tasks' choice")
    p.add_argument("--evict-mb", type=int, default=0,
                   help="rewrite this many MB of other memory before every timed pair: the layer then starts cold, "
                        "as in a model whose other layers ran in between (0 = off)")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="also time the engine with expert LoRA of this rank on gate_up and down (0 = off)")
    g = p.add_argument_group("shape table")
    g.add_argument("--shapes", nargs="*", metavar="NAME", default=None,
                   help="time these MoE shapes (all without a name): " + ", ".join(moe_shapes.SHAPES))
    g.add_argument("--smoke", action="store_true",
                   help=f"the shape table in seconds: {' and '.join(SMOKE_SHAPES)}, 8 experts, T = 64 and 1")
    g.add_argument("--max-experts", type=int, default=0, help="at most this many experts per shape (0: all that fit)")
    g.add_argument("--row-seconds", type=float, default=3.0,
                   help="repeat each (shape, T)'s rounds for about this long (at least --iters rounds)")
    g.add_argument("--read-mb", type=int, default=0,
                   help="bandwidth probe buffer in MiB (0: 4x the last-level cache, at least 1 GiB)")
    g.add_argument("--no-kt-kernel", action="store_true", help="leave out kt-kernel's layer even where installed")
    results.add_arguments(p)
    args = p.parse_args()
    if args.small:
        args.experts, args.topk, args.hidden, args.intermediate, args.tokens = 8, 2, 256, 192, [256]
    if args.smoke:
        args.shapes = args.shapes or list(SMOKE_SHAPES)
        args.tokens, args.max_experts = args.tokens or [64, 1], args.max_experts or 8
        args.iters, args.row_seconds, args.read_mb = 1, 0.0, args.read_mb or 64
    return check_mode(p, args)


def check_mode(p: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    """One layer (--tokens: one value) or the shape table (--tokens: a list; no --against / --lora-rank)."""
    if args.shapes is None:
        if args.tokens is not None and len(args.tokens) != 1:
            p.error("--tokens takes one value without --shapes")
        args.tokens = (args.tokens or [4096])[0]
        args.formats = args.formats or []
        return args
    if args.against or args.kchunk or args.lora_rank or args.skewed or args.evict_mb:
        p.error("--shapes times frozen layers with uniform routing: no --against, --kchunk, --lora-rank, --skewed, "
                "--evict-mb")
    args.shapes = [moe_shapes.find(name) for name in (args.shapes or moe_shapes.SHAPES)]
    args.tokens = args.tokens or list(SHAPE_TOKENS)
    if min(args.tokens) < 1:
        p.error("--tokens: at least 1")
    args.formats = ["int8-gemm"] if args.formats is None else args.formats
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
    """One engine configuration (layer + optional LoRA) timed in forward/backward pairs, or in forwards alone
    (`train=False`: decode calls, nothing saved; backward times 0). `name` labels its line in the human report,
    `variant` its row in the results ("ours bf16", "against <build> int8-gemm", ...)."""

    def __init__(self, name: str, variant: str, layer: ke.ExpertLayer, lora=None, engine=ke, against=None,
                 train: bool = True, kchunk: int | None = None) -> None:
        # against: our variant that an --against or --kchunk row is compared with (same weights and GEMM dtype)
        self.name, self.variant, self.layer, self.lora = name, variant, layer, lora
        self.engine, self.against, self.train, self.kchunk = engine, against, train, kchunk
        self.fwd, self.bwd, self.phases, self.state = [], [], {}, {}

    def warm(self, x, ids, w, dy) -> None:
        # First use of every saved slot (page faults on ~140 MB of activations each) stays out of the timings:
        # a forward-backward pair alone would touch only one slot, since backward frees it.
        handles = [self.layer.forward(x, ids, w, save_for_backward=True, lora=self.lora)[1]
                   for _ in range(self.layer.max_saved if self.train else 0)]
        for h in handles:
            self.layer.release(h)
        self.pair(x, ids, w, dy, record=False)

    def pair(self, x, ids, w, dy, record: bool = True, profile: bool = False, evict=None) -> None:
        if evict is not None:
            evict.add_(1)  # outside the timed region: only the caches it leaves behind count
        chunk = self.engine.use_kchunk(self.kchunk) if self.kchunk is not None else contextlib.nullcontext()
        with chunk, self.engine.phase_profile() if profile else contextlib.nullcontext({}) as phases:
            t0 = time.perf_counter()
            y, handle = self.layer.forward(x, ids, w, save_for_backward=self.train, lora=self.lora)
            t1 = time.perf_counter()
            out = self.layer.backward(handle, dy, lora=self.lora) if self.train else (None, None)
            t2 = time.perf_counter() if self.train else t1
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
    name; an older one took (dtype, weights, int8_compute). None where that build has no such format."""
    if hasattr(other, "get_format"):
        return other.ExpertLayer.from_fused(gate_up, down, fmt) if fmt in other.FORMATS else None
    old = {"bf16": {}, "int8": {"weights": "int8"}, "int8-gemm": {"weights": "int8", "int8_compute": True}}
    return other.ExpertLayer.from_fused(gate_up, down, dtype=torch.bfloat16, **old[fmt]) if fmt in old else None


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


def our_format_variants(a, layer) -> list[EngineVariant]:
    """Ours in each expert format asked for besides bf16: int8 weights and int8 GEMMs (--int8), then --formats."""
    names = {"int8": "kt-sft int8 weights", "int8-gemm": "kt-sft int8 GEMMs"} if a.int8 else {}
    for name in a.formats:  # quantized at load with the row's default scale grid
        names.setdefault(name, f"kt-sft {name}")
    return [EngineVariant(label, f"ours {name}", layer(name)) for name, label in names.items()]


def against_variants(a, checkout: str, i: int, ours: list[EngineVariant], gate_up, down,
                     threads: int) -> list[EngineVariant]:
    """Another build's row of every format of ours (bf16 and each other one), each compared with ours of it."""
    other = load_other_engine(checkout, f"kt_sft_against{i}")
    if a.isa:
        other.select_isa(a.isa)
    other.set_num_threads(threads)
    name, label = pathlib.Path(checkout).resolve().name[:12], against_label(checkout)
    out = []
    for v in ours:
        fmt = v.variant.removeprefix("ours ")
        layer = other_layer(other, gate_up, down, fmt)
        if layer is None:
            print(f"--against {checkout}: that build has no {fmt} experts; no row of it")
            continue
        shown = f"{name} ({other.current_isa()})" if fmt == "bf16" else f"{name} {v.name.removeprefix('kt-sft ')}"
        out.append(EngineVariant(shown, f"against {label} {fmt}", layer, engine=other, against=v))
    return out


def build_variants(a, gate_up, down, threads: int) -> list[EngineVariant]:
    """Ours bf16 first, then each --against build's row of every format we time, ours + LoRA, ours in the other
    formats (int8 weights and int8 GEMMs with --int8, then --formats)."""
    layer = lambda fmt: ke.ExpertLayer.from_fused(gate_up, down, fmt)  # noqa: E731
    frozen = EngineVariant(f"kt-sft ({ke.current_isa()})", "ours bf16", layer("bf16"))
    formats = our_format_variants(a, layer)
    variants = [frozen]
    for i, checkout in enumerate(a.against):
        variants += against_variants(a, checkout, i, [frozen, *formats], gate_up, down, threads)
    ours_int8 = next((v for v in formats if v.variant == "ours int8-gemm"), None) if a.int8 else None
    for n in a.kchunk:  # the same layers with a forced K chunk
        variants.append(EngineVariant(f"kt-sft kchunk={n}", f"kchunk={n} bf16", frozen.layer, against=frozen, kchunk=n))
        if ours_int8 is not None:
            variants.append(EngineVariant(f"kt-sft int8 kchunk={n}", f"kchunk={n} int8-gemm", ours_int8.layer,
                                          against=ours_int8, kchunk=n))
    if a.lora_rank > 0:
        variants.append(EngineVariant(f"kt-sft + LoRA r={a.lora_rank}", f"ours bf16 + LoRA r={a.lora_rank}",
                                      frozen.layer, make_lora(a, a.lora_rank)))
    return variants + formats


def compare(v: EngineVariant, frozen: EngineVariant) -> tuple[str, dict]:
    """The ratio line of a variant against its reference (ours of the same format for an --against build, the
    frozen bf16 layer otherwise) and the same ratio as results fields."""
    v_fwd, v_bwd = v.medians()
    f_fwd, f_bwd = frozen.medians()
    if v.against is not None:
        o_fwd, o_bwd = v.against.medians()
        ratio = (v_fwd + v_bwd) / (o_fwd + o_bwd)
        label = v.variant.removesuffix(" bf16").replace("against ", "ours/")
        same = all(torch.equal(v.state[k], v.against.state[k]) for k in ("y", "dx", "dw"))
        return (f"{v.against.name} / {v.name} tokens/s: {ratio:.3f}x "
                f"(fwd {v_fwd / o_fwd:.3f}x, bwd {v_bwd / o_bwd:.3f}x); outputs {'bitwise equal' if same else 'differ'}",
                {"ratio": round(ratio, 3), "ratio_of": label,
                 "note": "outputs bitwise equal" if same else "outputs differ"})
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


def setup_engine(a: argparse.Namespace) -> int:
    """The engine's ISA and threads as asked, torch's threads the same; prints the cpu line, returns the threads."""
    if a.isa:
        ke.select_isa(a.isa)
    if a.numa is not None:
        ke.set_numa(a.numa)
    ke.set_num_threads(a.threads)
    threads = ke.num_threads()
    torch.set_num_threads(threads)
    numa = ke.numa_layout()
    nodes = "/".join(str(n["workers"]) for n in numa["nodes"])
    print(f"cpu: {ke.cpu_info()['model']} | engine isa={ke.current_isa()} threads={threads} "
          f"numa={numa['setting']}: {len(numa['nodes'])}{' virtual' if numa['virtual'] else ''} node(s), workers "
          f"{nodes} | torch {torch.__version__} threads={torch.get_num_threads()}")
    return threads


def run(a: argparse.Namespace) -> list[dict]:
    """Every variant timed, the human report printed (ratios last); the results rows returned."""
    threads = setup_engine(a)
    E, H, I, T, k = a.experts, a.hidden, a.intermediate, a.tokens, a.topk
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


# ---------------------------------------------------------------------------------------------- the shape table
# our format -> kt-kernel's kernels of the same GEMMs. Its AMXINT4_SFT_SkipLoRA (0.6.1) is left out: at the
# DeepSeek-V3 shape it aborts the whole process (std::runtime_error "n or k is not aligned to N_STEP or B_K_STEP",
# n 2048, k 64; device, 2026-12-05), which no try/except here can catch.
KT_KERNEL_METHODS = {"bf16": "AMXBF16_SFT_SkipLoRA", "int8-gemm": "AMXINT8_SFT_SkipLoRA"}


def kt_kernel_wrapper():
    """kt-kernel's AMX SFT MoE wrapper class where its wheel is installed (and built with it), else None."""
    try:
        from kt_kernel.sft import AMXSFTMoEWrapper
    except Exception:  # noqa: BLE001  (absent, built without AMX SFT, or for another torch: all mean "not here")
        return None
    return AMXSFTMoEWrapper


class KtKernelLayer:
    """One layer of kt-kernel's AMX SFT MoE (kt_kernel.sft.AMXSFTMoEWrapper with its LoRA-free "SkipLoRA"
    kernels; the API of its 0.6 wheel) behind the calls EngineVariant makes of an ExpertLayer, so the incumbent
    runs in the same rounds as ours. Like its users' calls, each one copies inputs into its buffers and back."""
    max_saved = 1

    def __init__(self, wrapper, gate_up, down, fmt: str, topk: int, threads: int, max_tokens: int) -> None:
        from kt_kernel.sft import KExpertsSFTBuffer

        KExpertsSFTBuffer.clear_cache()  # one shared buffer, regrown by token count only: another H would overrun
        E, two_i, H = gate_up.shape
        I = two_i // 2
        self.format = ke.get_format(fmt)
        self.moe = wrapper(layer_idx=0, num_experts=E, num_experts_per_tok=topk, hidden_size=H,
                           moe_intermediate_size=I, num_gpu_experts=0, cpuinfer_threads=threads, threadpool_count=1,
                           weight_path=None, chunked_prefill_size=max_tokens, lora_rank=8, lora_alpha=16.0,
                           method=KT_KERNEL_METHODS[fmt])
        self.moe.load_weights_from_tensors(gate_up[:, :I], gate_up[:, I:], down, torch.arange(E))

    def forward(self, x, ids, w, save_for_backward=False, lora=None):
        return self.moe.forward(x, ids, w, save_for_backward=save_for_backward), int(save_for_backward)

    def backward(self, handle, dy, lora=None):
        return self.moe.backward(dy)

    def release(self, handle) -> None:
        pass  # it keeps one forward's activations, overwritten by the next


def pool_experts(shape: moe_shapes.Shape, experts: int) -> int:
    """How many experts of random weights to make (the others derive from them: packing, not the values, costs)."""
    return max(1, min(experts, 4, POOL_BYTES // (3 * shape.hidden * shape.intermediate * 2)))


def random_experts(shape: moe_shapes.Shape, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n experts of random bf16 weights, gate_up [n, 2I, H] and down [n, H, I], scaled as an initialised layer."""
    gen = torch.Generator().manual_seed(0)
    H, I = shape.hidden, shape.intermediate
    return (torch.randn(n, 2 * I, H, generator=gen, dtype=torch.bfloat16).mul_(H ** -0.5),
            torch.randn(n, H, I, generator=gen, dtype=torch.bfloat16).mul_(I ** -0.5))


def expert_chunks(gate_up: torch.Tensor, down: torch.Tensor, experts: int):
    """(first expert, gate_up, down) of `experts` experts, a chunk of the random ones at a time, the c-th chunk's
    rows rotated by c columns: no expert's pages equal another's (a host that merges equal pages would serve them
    from cache), at the cost of a copy instead of random numbers."""
    n = gate_up.shape[0]
    for c, e in enumerate(range(0, experts, n)):
        yield e, gate_up[: experts - e].roll(c, -1), down[: experts - e].roll(c, -1)


def build_layers(a, plan: moe_shapes.Plan, formats: list, wrapper, threads: int) -> list[tuple]:
    """(name, variant, layer) of ours in every format (one saved forward: the table times forward-backward
    pairs), then kt-kernel's in the formats it has (where it fails, a line says why and the table goes on)."""
    E, H, I = plan.experts_run, plan.shape.hidden, plan.shape.intermediate
    ours = [ke.ExpertLayer(E, H, I, f, max_saved=1) for f in formats]
    kt_formats = [f.name for f in formats if wrapper is not None and f.name in KT_KERNEL_METHODS]
    kept = []  # kt-kernel takes every expert's bf16 weights at once
    for e, gate_up, down in expert_chunks(*random_experts(plan.shape, pool_experts(plan.shape, E)), E):
        for layer in ours:
            layer.load_fused(gate_up, down, e)
        kept += [(gate_up, down)] if kt_formats else []
    built = [(f"kt-sft {f.name}", f"ours {f.name}", layer) for f, layer in zip(formats, ours)]
    if kt_formats:
        gate_up, down = (torch.cat(parts) for parts in zip(*kept))
    for name in kt_formats:
        try:
            layer = KtKernelLayer(wrapper, gate_up, down, name, plan.shape.topk, threads,
                                  plan.tokens_run(max(a.tokens)))
        except Exception as exc:  # noqa: BLE001  (another wheel's API or a refusal: say so, time ours)
            print(f"  kt-kernel {name}: n/a ({type(exc).__name__}: {exc})")
            continue
        built.append((f"kt-kernel {name}", f"kt-kernel {name}", layer))
    return built


def routings(T: int, experts: int, k: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` uniform random routings (topk_ids, topk_weights) of T tokens to k of `experts` experts."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(T, experts, generator=gen).topk(k, dim=-1).indices.contiguous(),
             torch.softmax(torch.randn(T, k, generator=gen), -1).contiguous()) for _ in range(count)]


def time_rounds(a, variants: list[EngineVariant], x, routed: list, dy) -> int:
    """Every variant warmed, one round left out of the results (it sizes the rest), then rounds of each variant
    once, interleaved, for about --row-seconds: at least --iters, at most MAX_ROUNDS, the routings taken in turn.
    Returns the rounds timed."""
    for v in variants:
        v.warm(x, *routed[0], dy)
    t0 = time.perf_counter()
    for v in variants:
        v.pair(x, *routed[0], dy, record=False)
    per_round = max(time.perf_counter() - t0, 1e-6)
    rounds = min(MAX_ROUNDS, max(a.iters, math.ceil(a.row_seconds / per_round)))
    for r in range(rounds):
        for v in variants:
            v.pair(x, *routed[r % len(routed)], dy, profile=a.profile)
    return rounds


def shape_row(v: EngineVariant, plan: moe_shapes.Plan, tokens: int, touched: float, ceilings, rounds: int) -> dict:
    """A variant's row of one (shape, T): its times, TF/s and its time against this host's floor for the pass."""
    shape, T = plan.shape, plan.tokens_run(tokens)
    passes, fmt = (2 if v.train else 1), v.layer.format
    flops = moe_shapes.pass_flops(shape, T)
    ceiling = ceilings.compute_tflops(fmt)
    floor, binding = moe_shapes.floor_seconds(flops, moe_shapes.pass_bytes(fmt, touched, shape, T), ceiling,
                                              ceilings.bandwidth_gbs)
    seconds = sum(v.medians())
    row = v.row(T)
    return {**row, "bwd_ms": row["bwd_ms"] if v.train else None, "shape": shape.name, "experts": shape.experts,
            "topk": shape.topk, "hidden": shape.hidden, "intermediate": shape.intermediate, "tokens": tokens,
            "experts_run": plan.experts_run, "tokens_run": T, "pass": "fwd+bwd" if v.train else "fwd",
            "iters": rounds, "achieved_tflops": passes * flops / seconds / 1e12, "ceiling_tflops": ceiling,
            "floor_ms": None if floor is None else passes * floor * 1e3,
            "pct_ceiling": None if floor is None else 100 * passes * floor / seconds, "binding": binding,
            "note": plan.note(tokens) or None}


def add_kt_kernel_ratios(rows: list[dict]) -> None:
    """Ours over kt-kernel's tokens/s, on our row of each format kt-kernel ran too."""
    by_variant = {r["variant"]: r for r in rows}
    for row in rows:
        kt = by_variant.get(row["variant"].replace("ours ", "kt-kernel ", 1))
        if row["variant"].startswith("ours ") and kt is not None:
            row.update(ratio=round(row["tokens_per_s"] / kt["tokens_per_s"], 3), ratio_of="ours/kt-kernel")


SHAPE_HEADER = (f"{'shape':<17} {'T':>6} {'variant':<20} {'pass':<7} {'fwd ms':>9} {'bwd ms':>9} {'tokens/s':>10} "
                f"{'TF/s':>6} {'ceiling':>7} {'floor ms':>9} {'% floor':>7}  binds")


def shape_line(row: dict) -> str:
    """A row in the human report (SHAPE_HEADER's columns, then ours/kt-kernel and the subset note)."""
    show = lambda v, spec: f"{'n/a':>{spec.split('.')[0]}}" if v is None else format(v, spec)  # noqa: E731
    ratio = row.get("ratio")
    tail = "".join(f"  {part}" for part in (ratio is not None and f"{ratio:.2f}x ours/kt-kernel", row["note"]) if part)
    return (f"{row['shape']:<17} {row['tokens']:>6} {row['variant']:<20} {row['pass']:<7} {row['fwd_ms']:9.2f} "
            f"{show(row['bwd_ms'], '9.2f')} {row['tokens_per_s']:10,.0f} {row['achieved_tflops']:6.2f} "
            f"{show(row['ceiling_tflops'], '7.2f')} {show(row['floor_ms'], '9.2f')} "
            f"{show(row['pct_ceiling'], '7.1f')}  {row['binding']}{tail}")


def shape_cell(a, plan: moe_shapes.Plan, tokens: int, layers: list[tuple], ceilings) -> list[dict]:
    """One (shape, T): every layer timed in the same rounds (forward + backward, or forward alone for a decode
    call, whose rounds cycle through DECODE_ROUTINGS routings); their rows, printed."""
    shape, T = plan.shape, plan.tokens_run(tokens)
    train = tokens > moe_shapes.DECODE_MAX_TOKENS
    routed = routings(T, plan.experts_run, shape.topk, 1 if train else DECODE_ROUTINGS)
    gen = torch.Generator().manual_seed(2)
    x, dy = (torch.randn(T, shape.hidden, generator=gen).bfloat16() for _ in range(2))
    variants = [EngineVariant(name, variant, layer, train=train) for name, variant, layer in layers]
    rounds = time_rounds(a, variants, x, routed, dy)
    touched = statistics.mean(ids.unique().numel() for ids, _ in routed)  # experts each call reads
    rows = [shape_row(v, plan, tokens, touched, ceilings, rounds) for v in variants]
    add_kt_kernel_ratios(rows)
    for v, row in zip(variants, rows):
        print(shape_line(row))
        print_phases(v)
    return rows


def run_shape(a, shape: moe_shapes.Shape, formats: list, wrapper, threads: int, ceilings) -> list[dict]:
    """One shape: as many of its experts as fit in RAM with every format (and kt-kernel's copies), built once,
    then each --tokens; its rows."""
    gc.collect()  # the previous shape's layers are gone before this one's RAM is counted
    kt = [f for f in formats if wrapper is not None and f.name in KT_KERNEL_METHODS]
    budget = int(moe_shapes.RAM_FRACTION * moe_shapes.available_bytes())
    # kt-kernel: every expert's bf16 source at once, and (assumed) a second copy of its weights per format
    plan = moe_shapes.plan(shape, formats + kt, (1 + len(kt)) if kt else 0, max(a.tokens),
                           pool_experts(shape, shape.experts), budget, a.max_experts)
    t0 = time.perf_counter()
    layers = build_layers(a, plan, formats, wrapper, threads)
    print(f"# {shape.name} (E={shape.experts} k={shape.topk} H={shape.hidden} I={shape.intermediate}): "
          f"{plan.experts_run} experts x {len(layers)} layers built in {time.perf_counter() - t0:.1f} s"
          + (" (subset: RAM)" if plan.subset and plan.experts_run < (a.max_experts or shape.experts) else ""))
    return [row for tokens in a.tokens for row in shape_cell(a, plan, tokens, layers, ceilings)]


def run_shapes(a: argparse.Namespace):
    """The shape table: this host's ceilings, then every shape at every --tokens; yields each shape's rows (printed
    as they come)."""
    threads = setup_engine(a)
    ceilings = host_ceiling.measure(ke.current_isa(), threads, 0.02 if a.smoke else 0.2, a.read_mb * 2**20)
    print(host_ceiling.describe(ceilings))
    wrapper = None if a.no_kt_kernel else kt_kernel_wrapper()
    print(f"kt-kernel: {'off' if a.no_kt_kernel else 'not installed' if wrapper is None else 'installed'} | "
          f"rounds per (shape, T): ~{a.row_seconds:g} s, at least {a.iters} | decode (T <= "
          f"{moe_shapes.DECODE_MAX_TOKENS}): forward only | % floor: the pass's floor over its median time")
    run_info = {**results.provenance(ke.current_isa(), threads), "bf16_ceiling_tflops": ceilings.bf16_tflops,
                "int8_ceiling_tflops": ceilings.int8_tflops, "bandwidth_gbs": ceilings.bandwidth_gbs}
    formats = [ke.get_format(f) for f in dict.fromkeys(["bf16", *(["int8", "int8-gemm"] if a.int8 else []),
                                                        *a.formats])]
    print(SHAPE_HEADER)
    for shape in a.shapes:
        yield [{**run_info, **row} for row in run_shape(a, shape, formats, wrapper, threads, ceilings)]


def main() -> None:
    a = parse_args()
    if a.shapes is None:
        with results.human_output(a):
            rows = run(a)
        results.emit("bench_moe", rows, a)
        return
    shapes = run_shapes(a)
    while True:  # each shape's rows recorded as soon as they exist: a run cut short keeps the shapes it finished
        with results.human_output(a):
            rows = next(shapes, None)
        if rows is None:
            return
        results.emit("bench_moe_shapes", rows, a)


if __name__ == "__main__":
    main()

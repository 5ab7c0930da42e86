"""Load a DeepSeek-V2-Lite-shaped random checkpoint with the experts on the CPU engine and the rest on the GPU.

Writes the checkpoint once (per-expert keys, sharded safetensors, as on the Hub; `--source` picks its layout:
bf16, or block FP8 / FP8 per channel / INT4 written by tests/quantized_checkpoints.py), then in a fresh process
loads it with `kt_sft.load_model` (experts in `--format`, default: load_model's choice) and reports: load time and
GB/s of checkpoint bytes, peak host RSS against the bound (packed experts + 10% + one shard, above the process's
RSS before loading), GPU memory against the non-expert bytes (no expert bytes may land there), and
forward/backward tokens/s of a few training steps with LoRA on the attention projections (`--steps 0`: load only).

    python benchmarks/bench_load.py --dir /tmp/v2lite-rand --layers 11      # 10 MoE layers = 11.1 GB of experts
    python benchmarks/bench_load.py --dir /tmp/v2lite-fp8 --source fp8-block --format int8-gemm --steps 0

`--profile` times instead, in this process, one expert-sized tensor at a time (a DeepSeek-V3 expert's 7168 x 2048
and an odd size no block divides) for every source -> format pair: the loader's reading of it, the engine's packing
of what was read (a quantized tensor decoded by the engine itself, or its codes kept), and the loader's whole
`_load_projection`, in ms and GB/s of checkpoint bytes (rows: bench_load_tensors). `--against DIR` times another
checkout's `_load_projection` (built in place, imported beside ours) on the same tensors, interleaved, for ratios
measured in one process:

    python benchmarks/bench_load.py --profile --iters 5 --against .dev/base

--json prints the result rows as JSON lines on stdout (the report goes to stderr); --record appends them to
benchmarks/results/bench_load.csv / bench_load_tensors.csv (or --results-dir). GB = 2^30 bytes throughout.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (benchmarks/results.py: the rows every benchmark records)

GB = 1024 ** 3
SOURCES = ("bf16", "fp8-block", "fp8-channel", "int4-group")
# --profile's tensors [rows, cols]: a DeepSeek-V3 expert's down_proj [hidden, moe_intermediate], and an odd size that
# neither 128 x 128 blocks nor groups of 32 divide.
PROFILE_SHAPES = ((7168, 2048), (1407, 2053))


def v2_lite_config(layers: int, **overrides):
    """DeepSeek-V2-Lite's config with `layers` decoder layers (`overrides`: other sizes, e.g. a toy version)."""
    from transformers import AutoConfig

    sizes = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                 num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
                 num_experts_per_tok=6, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 max_position_embeddings=4096)
    return AutoConfig.for_model(
        "deepseek_v2", num_hidden_layers=layers, first_k_dense_replace=1, q_lora_rank=None, hidden_act="silu",
        tie_word_embeddings=False, dtype="bfloat16", **{**sizes, **overrides})


def write_checkpoint(out: Path, layers: int, shard_bytes: int, config=None) -> None:
    """Random bf16 tensors with the Hub's per-expert names, written shard by shard (never the whole model).

    config: another deepseek_v2-family config to write (default: V2-Lite's shape with `layers` decoder layers)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = config if config is not None else v2_lite_config(layers)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    specs = []
    for name, p in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base, (E, two_i, H) = name[: -len("gate_up_proj")], p.shape
            for e in range(E):
                specs += [(f"{base}{e}.gate_proj.weight", (two_i // 2, H)), (f"{base}{e}.up_proj.weight", (two_i // 2, H))]
        elif name.endswith("mlp.experts.down_proj"):
            base, (E, H, I) = name[: -len("down_proj")], p.shape
            specs += [(f"{base}{e}.down_proj.weight", (H, I)) for e in range(E)]
        else:
            specs.append((name, tuple(p.shape)))
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            fname = f"model-{n:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
            shard, size, n = {}, 0, n + 1

    for name, shape in specs:
        t = torch.randn(shape, generator=gen, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        if "norm" in name:
            t = torch.ones(shape, dtype=torch.bfloat16)
        shard[name] = t
        size += t.numel() * 2
        if size >= shard_bytes:
            flush()
    flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(out)


def write_source_checkpoint(out: Path, source: str, layers: int, shard_bytes: int, config=None) -> None:
    """`write_checkpoint`'s random checkpoint stored in `source`'s layout: a quantized one is the bf16 one rewritten
    by tests/quantized_checkpoints.py (the official blocks of 128 x 128, groups of 32, INT4 on the routed experts
    only), the bf16 original removed."""
    if source == "bf16":
        write_checkpoint(out, layers, shard_bytes, config)
        return
    sys.path.insert(0, str(results.REPO / "tests"))
    from quantized_checkpoints import quantize_checkpoint

    original = out.with_name(out.name + "-bf16")
    write_checkpoint(original, layers, shard_bytes, config)
    try:
        quantize_checkpoint(original, out, source)
    finally:
        shutil.rmtree(original)


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_and_train(path: Path, steps: int, seq: int, fmt: str | None = None) -> dict:
    """Load `path` (experts in `fmt`, None: load_model's default), then `steps` LoRA training steps (0: none)."""
    import kt_sft
    import kt_sft.engine as ke

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context before the baseline reading
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    model = kt_sft.load_model(path, device=device, dtype=torch.bfloat16, format=fmt, progress=False)
    load_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    layers = [m.kt_layer for m in model.modules() if hasattr(m, "kt_layer")]
    packed = sum(l.packed_bytes for l in layers)
    shards = sorted(path.glob("*.safetensors"))
    dense = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    res = {"summary": model.kt_summary, "load_s": load_s, "rss_before_gb": rss0 / GB, "peak_rss_gb": peak_rss / GB,
           "packed_gb": packed / GB, "largest_shard_gb": max(s.stat().st_size for s in shards) / GB,
           "dense_gb": dense / GB, "checkpoint_gb": checkpoint_bytes(path) / GB, "format": layers[0].format.name}
    res["load_gb_per_s"] = res["checkpoint_gb"] / load_s
    on_host = dense if device.type == "cpu" else 0  # without a GPU the dense weights live in host RAM too
    res["rss_bound_gb"] = (rss0 + packed * 1.1 + max(s.stat().st_size for s in shards) + on_host) / GB
    if device.type == "cuda":
        res["gpu_after_load_gb"] = torch.cuda.memory_allocated(device) / GB
    res["isa"], res["threads"] = ke.current_isa(), ke.num_threads()
    res["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    if steps:
        res.update(train(model, layers, device, steps, seq))
    return res


def train(model, layers: list, device: torch.device, steps: int, seq: int) -> dict:
    """Median step time of `steps` LoRA steps on the attention projections (gradient checkpointing)."""
    from peft import LoraConfig, get_peft_model

    res = {}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "kv_a_proj_with_mqa",
                                                                                    "kv_b_proj", "o_proj"]))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 102400, (1, seq), device=device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    res["step_s"] = sorted(times)[len(times) // 2]
    res["tokens_per_s"] = seq / res["step_s"]
    res["loss"] = loss.item()
    if device.type == "cuda":
        res["gpu_peak_gb"] = torch.cuda.max_memory_allocated(device) / GB
    res["saved_activation_gb"] = sum(l.saved_bytes for l in layers) / GB
    return res


def stored_tensors(source: str, key: str, rows: int, cols: int, gen: torch.Generator) -> dict:
    """A random weight [rows, cols] stored under `key` (`X.weight`) as `source` stores it, with its companions
    (kt_sft/checkpoint_formats.py's layouts: blocks of 128 x 128, groups of 32); codes drawn at random, no NaN."""
    linear = key[: -len(".weight")]
    if source == "bf16":
        return {key: (torch.randn(rows, cols, generator=gen) * 0.02).bfloat16()}
    if source == "int4-group":
        return {linear + ".weight_packed": torch.randint(-2 ** 31, 2 ** 31, (rows, -(-cols // 8)), generator=gen,
                                                         dtype=torch.int32),
                linear + ".weight_scale": (torch.rand(rows, -(-cols // 32), generator=gen) * 1e-3).bfloat16(),
                linear + ".weight_shape": torch.tensor([rows, cols], dtype=torch.int32)}
    codes = (torch.randn(rows, cols, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    if source == "fp8-block":
        return {key: codes, linear + ".weight_scale_inv": torch.rand(-(-rows // 128), -(-cols // 128), generator=gen)
                * 1e-4}
    return {key: codes, linear + ".weight_scale": (torch.rand(rows, 1, generator=gen) * 1e-4).bfloat16()}


def _medians_ms(fns, iters: int) -> list[float]:
    """The median ms of each of `fns` over `iters` rounds that run them in turn (a drift of the machine hits all alike),
    after one untimed call of each (which faults in the pages of the file and of the layer)."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for spent, fn in zip(times, fns):
            t0 = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - t0)
    return [statistics.median(t) * 1e3 for t in times]


def other_checkout(checkout: str):
    """(label, its kt_sft package) of another kt-sft checkout built in place, imported under another name beside ours
    (bench_moe.py's load_other_engine)."""
    from bench_moe import load_other_engine

    name = "kt_sft_base"
    load_other_engine(checkout, name)
    return Path(checkout).resolve().name, importlib.import_module(name)


def profile_tensors(iters: int, shapes=PROFILE_SHAPES, sources=SOURCES, base=None, formats=None) -> list[dict]:
    """For each source -> format pair and shape, the ms per expert tensor of what the loader does with it (read from
    a safetensors file in a temporary directory, as the loader reads shards): `profile_tensor`'s rows. base: (label,
    kt_sft package) of another checkout whose loader is timed on the same tensors, interleaved with ours: each row
    gets ratio = its ms / ours (ratio_of ours/label), and a row of its own (variant `label: source -> format`).
    formats: the expert formats to pack into (None: all)."""
    from safetensors.torch import save_file

    from kt_sft.checkpoint_files import TensorReader, scan
    from kt_sft.checkpoint_formats import source_format
    from kt_sft.engine.formats import FORMATS
    from kt_sft.loader import _fit_to_source

    sys.path.insert(0, str(results.REPO / "tests"))
    from quantized_checkpoints import scheme_config

    rows, gen = [], torch.Generator().manual_seed(0)
    for source in sources:
        fmt = source_format(None if source == "bf16" else scheme_config(source))
        with tempfile.TemporaryDirectory() as tmp:
            tensors = {}
            for n, k in shapes:
                tensors.update(stored_tensors(source, f"e{n}x{k}.weight", n, k, gen))
            save_file(tensors, f"{tmp}/model.safetensors")
            reader = TensorReader(scan(Path(tmp)))
            reader.use(Path(tmp) / "model.safetensors")
            for (n, k), (name, row) in itertools.product(shapes, FORMATS.items()):
                if formats and name not in formats:
                    continue
                try:
                    expert_fmt = _fit_to_source(row, fmt)
                except ValueError:  # a format that cannot hold this source's weights (fp8 from INT4)
                    continue
                stored = {key: t for key, t in tensors.items() if key.startswith(f"e{n}x{k}.")}
                times = profile_tensor(reader, fmt, expert_fmt, next(iter(stored)), (n, k), iters, base)
                nbytes = sum(t.numel() * t.element_size() for t in stored.values())
                gbps = {key: nbytes / GB / (ms / 1e3) for key, ms in times.items() if key.endswith("tensor_ms")}
                rows.append({"variant": f"{source} -> {name}", "rows": n, "cols": k,
                             **{key: ms for key, ms in times.items() if key != "base_tensor_ms"},
                             "gb_per_s": gbps["tensor_ms"]})
                if base:
                    rows[-1].update(ratio=times["base_tensor_ms"] / times["tensor_ms"], ratio_of=f"ours/{base[0]}")
                    rows.append({"variant": f"{base[0]}: {source} -> {name}", "rows": n, "cols": k,
                                 "tensor_ms": times["base_tensor_ms"], "gb_per_s": gbps["base_tensor_ms"]})
    return rows


def profile_tensor(reader, source, expert_fmt, key: str, shape: tuple, iters: int, base=None) -> dict:
    """ms of one tensor's read (TensorReader.get of the weight and its companions), pack (ExpertLayer.set_projection
    of what was read: the engine decodes a quantized weight itself, or keeps its codes) and the whole of
    loader._load_projection, each the median of `iters`; decode_ms (the loader's torch decode before packing) is 0:
    expert tensors are no longer decoded outside the engine. base: also base_tensor_ms, the other checkout's whole
    _load_projection of the tensor into a layer of the same format, interleaved with ours."""
    from kt_sft.checkpoint_formats import encoded, stored_parts
    from kt_sft.engine import ExpertLayer
    from kt_sft.loader import _load_projection

    weight = reader.get(key)
    parts = [p.key for p in stored_parts(source, key, weight.dtype, tuple(weight.shape), reader.get)] or [key]
    layer, enc = ExpertLayer(1, *shape, expert_fmt), encoded(source, key, reader.get)
    if enc is None:
        pack = lambda: layer.set_projection("down", reader.get(key))  # noqa: E731
    else:
        pack = lambda: layer.set_projection("down", enc.codes, scale=enc.scale, block=enc.block)  # noqa: E731
    fns = [lambda: [reader.get(k) for k in parts], pack,
           lambda: _load_projection(layer, "down", 0, key, reader, source)]
    if base:
        fns.append(_base_projection(base[1], reader, source, expert_fmt, key, shape))
    times = dict(zip(("read_ms", "pack_ms", "tensor_ms", "base_tensor_ms"), _medians_ms(fns, iters)))
    return {"read_ms": times["read_ms"], "decode_ms": 0.0, **times}


def _base_projection(pkg, reader, source, expert_fmt, key: str, shape: tuple):
    """The other checkout's _load_projection of `key` into a layer of its own in the same format (its loader decoded
    quantized experts in torch into a reused buffer, `scratch`, before its engine packed them)."""
    loader = importlib.import_module(f"{pkg.__name__}.loader")
    formats = importlib.import_module(f"{pkg.__name__}.engine.formats")
    layer = pkg.engine.ExpertLayer(1, *shape, loader._fit_to_source(formats.FORMATS[expert_fmt.name], source))
    scratch = (torch.empty(shape[0] * shape[1]),) if "scratch" in inspect.signature(loader._load_projection).parameters \
        else ()
    return lambda: loader._load_projection(layer, "down", 0, key, reader, source, *scratch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/kt-sft-v2lite-random")
    p.add_argument("--layers", type=int, default=11, help="decoder layers (the first is dense)")
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--source", choices=SOURCES, default="bf16", help="how the written checkpoint stores its weights")
    p.add_argument("--format", default=None, help="the experts' format (kt_sft.engine.formats; default: load_model's)")
    p.add_argument("--steps", type=int, default=3, help="training steps after loading (0: load only)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="time one tensor at a time per source -> format pair")
    p.add_argument("--iters", type=int, default=5, help="--profile: timed repetitions per stage (median)")
    p.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in PROFILE_SHAPES],
                   help="--profile: tensor shapes ROWSxCOLS")
    p.add_argument("--sources", nargs="+", choices=SOURCES, default=list(SOURCES),
                   help="--profile: the checkpoint layouts to time (default: all)")
    p.add_argument("--formats", nargs="+", default=None, help="--profile: the expert formats to time (default: all)")
    p.add_argument("--against", metavar="DIR", default=None,
                   help="--profile: also time the loader of this kt-sft checkout (built in place) on the same tensors, "
                        "interleaved with ours in this process (rows gain ratio = its ms / ours)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    results.add_arguments(p)
    a = p.parse_args()
    path = Path(a.dir)
    if a.child:
        print("RESULT " + json.dumps(load_and_train(path, a.steps, a.seq, a.format)))
        return
    if a.profile:
        profile(a)
        return
    with results.human_output(a):
        r = run(a, path)
    fields = ("load_s", "rss_before_gb", "peak_rss_gb", "rss_bound_gb", "gpu_after_load_gb", "gpu_peak_gb",
              "tokens_per_s", "saved_activation_gb", "loss", "checkpoint_gb", "load_gb_per_s")
    variant = "ours bf16" if a.source == "bf16" and a.format is None else f"ours {a.source} -> {r['format']}"
    results.emit("bench_load", [{**results.provenance(r["isa"], r["threads"], r["gpu"]), "layers": a.layers,
                                 "seq": a.seq, "steps": a.steps, "variant": variant,
                                 **{k: r.get(k) for k in fields}}], a)


def profile(a: argparse.Namespace) -> None:
    import kt_sft.engine as ke

    with results.human_output(a):
        base = other_checkout(a.against) if a.against else None
        rows = profile_tensors(a.iters, [tuple(int(v) for v in shape.split("x")) for shape in a.shapes], a.sources,
                               base, a.formats)
        print(f"per tensor, ms (median of {a.iters}); torch threads {torch.get_num_threads()}, engine threads "
              f"{ke.num_threads()} [{ke.current_isa()}]")
        print(f"{'source -> format':44} {'shape':>11} {'read':>7} {'pack':>7} {'tensor':>7} {'GB/s':>6}")
        for r in rows:
            stages = f"{r['read_ms']:7.2f} {r['pack_ms']:7.2f}" if "read_ms" in r else " " * 15
            ratio = f"  {r['ratio']:.2f}x {r['ratio_of']}" if "ratio" in r else ""
            print(f"{r['variant']:44} {r['rows']:>5}x{r['cols']:<5} {stages} {r['tensor_ms']:7.2f} "
                  f"{r['gb_per_s']:6.2f}{ratio}")
    run = results.provenance(ke.current_isa(), ke.num_threads())
    results.emit("bench_load_tensors", [{**run, "iters": a.iters, **r} for r in rows], a)


def run(a: argparse.Namespace, path: Path) -> dict:
    """The checkpoint written if missing, loaded (and trained) in a child process; its report printed."""
    from kt_sft.checkpoint_formats import source_format

    if not (path / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        write_source_checkpoint(path, a.source, a.layers, int(a.shard_gb * GB))
        print(f"wrote {path} ({a.source}) in {time.perf_counter() - t0:.0f}s")
    stored = source_format(json.loads((path / "config.json").read_text()).get("quantization_config")).name
    if stored != a.source:
        sys.exit(f"{path} holds a {stored} checkpoint, not {a.source}: pick another --dir")
    command = [sys.executable, __file__, "--child", "--dir", str(path), "--steps", str(a.steps), "--seq", str(a.seq)]
    out = subprocess.run(command + (["--format", a.format] if a.format else []), capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:])
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"child failed (rc={out.returncode})")
    r = json.loads(line[7:])
    print(r["summary"])
    print(f"load {r['load_s']:.1f}s = {r['load_gb_per_s']:.2f} GB/s of {r['checkpoint_gb']:.1f} GB checkpoint | host "
          f"RSS peak {r['peak_rss_gb']:.1f} GB (before load {r['rss_before_gb']:.1f} GB; bound {r['rss_bound_gb']:.1f} "
          f"GB = before + packed {r['packed_gb']:.1f} GB x1.1 + shard {r['largest_shard_gb']:.1f} GB) -> "
          f"{'within' if r['peak_rss_gb'] <= r['rss_bound_gb'] else 'OVER'} bound")
    if "gpu_after_load_gb" in r:
        print(f"GPU after load {r['gpu_after_load_gb']:.2f} GB; non-expert parameters + buffers {r['dense_gb']:.2f} GB; "
              f"packed experts {r['packed_gb']:.1f} GB are in host RAM only")
    if a.steps:
        if "gpu_peak_gb" in r:
            print(f"GPU peak while training {r['gpu_peak_gb']:.2f} GB")
        print(f"train step (seq {a.seq}, LoRA attention, grad ckpt): {r['step_s']:.2f}s = {r['tokens_per_s']:.0f} "
              f"tokens/s, loss {r['loss']:.3f}; saved expert activations {r['saved_activation_gb']:.2f} GB")
    return r


if __name__ == "__main__":
    main()

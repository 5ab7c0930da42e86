"""Load a DeepSeek-V2-Lite-shaped random checkpoint with the experts on the CPU engine and the rest on the GPU.

Writes the checkpoint once (per-expert keys, sharded safetensors, as on the Hub), then in a fresh process loads it
with `kt_sft.load_model` and reports: load time, peak host RSS against the bound (packed experts + 10% + one
shard, above the process's RSS before loading), GPU memory against the non-expert bytes (no expert bytes may
land there), and forward/backward tokens/s of a few training steps with LoRA on the attention projections.

    python benchmarks/bench_load.py --dir /tmp/v2lite-rand --layers 11      # 10 MoE layers = 11.1 GB of experts

--json prints the result row as one JSON line on stdout (the report goes to stderr); --record appends it to
benchmarks/results/bench_load.csv (or --results-dir).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (benchmarks/results.py: the rows every benchmark records)

GB = 1024 ** 3


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


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_and_train(path: Path, steps: int, seq: int) -> dict:
    import kt_sft
    from peft import LoraConfig, get_peft_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context before the baseline reading
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    model = kt_sft.load_model(path, device=device, dtype=torch.bfloat16, progress=False)
    load_s = time.perf_counter() - t0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    layers = [m.kt_layer for m in model.modules() if hasattr(m, "kt_layer")]
    packed = sum(l.packed_bytes for l in layers)
    shards = sorted(path.glob("*.safetensors"))
    dense = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    res = {"summary": model.kt_summary, "load_s": load_s, "rss_before_gb": rss0 / GB, "peak_rss_gb": peak_rss / GB,
           "packed_gb": packed / GB, "largest_shard_gb": max(s.stat().st_size for s in shards) / GB,
           "dense_gb": dense / GB}
    on_host = dense if device.type == "cpu" else 0  # without a GPU the dense weights live in host RAM too
    res["rss_bound_gb"] = (rss0 + packed * 1.1 + max(s.stat().st_size for s in shards) + on_host) / GB
    if device.type == "cuda":
        res["gpu_after_load_gb"] = torch.cuda.memory_allocated(device) / GB
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
    import kt_sft.engine as ke

    res["isa"], res["threads"] = ke.current_isa(), ke.num_threads()
    res["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/kt-sft-v2lite-random")
    p.add_argument("--layers", type=int, default=11, help="decoder layers (the first is dense)")
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    results.add_arguments(p)
    a = p.parse_args()
    path = Path(a.dir)
    if a.child:
        print("RESULT " + json.dumps(load_and_train(path, a.steps, a.seq)))
        return
    with results.human_output(a):
        r = run(a, path)
    fields = ("load_s", "rss_before_gb", "peak_rss_gb", "rss_bound_gb", "gpu_after_load_gb", "gpu_peak_gb",
              "tokens_per_s", "saved_activation_gb", "loss")
    results.emit("bench_load", [{**results.provenance(r["isa"], r["threads"], r["gpu"]), "layers": a.layers,
                                 "seq": a.seq, "steps": a.steps, "variant": "ours bf16",
                                 **{k: r.get(k) for k in fields}}], a)


def run(a: argparse.Namespace, path: Path) -> dict:
    """The checkpoint written if missing, loaded and trained in a child process; its report printed."""
    if not (path / "model.safetensors.index.json").is_file():
        t0 = time.perf_counter()
        write_checkpoint(path, a.layers, int(a.shard_gb * GB))
        print(f"wrote {path} in {time.perf_counter() - t0:.0f}s")
    out = subprocess.run([sys.executable, __file__, "--child", "--dir", str(path), "--steps", str(a.steps),
                          "--seq", str(a.seq)], capture_output=True, text=True)
    sys.stderr.write(out.stderr[-3000:])
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"child failed (rc={out.returncode})")
    r = json.loads(line[7:])
    print(r["summary"])
    print(f"load {r['load_s']:.1f}s | host RSS peak {r['peak_rss_gb']:.1f} GB (before load {r['rss_before_gb']:.1f} GB; "
          f"bound {r['rss_bound_gb']:.1f} GB = before + packed {r['packed_gb']:.1f} GB x1.1 + shard "
          f"{r['largest_shard_gb']:.1f} GB) -> {'within' if r['peak_rss_gb'] <= r['rss_bound_gb'] else 'OVER'} bound")
    if "gpu_after_load_gb" in r:
        print(f"GPU after load {r['gpu_after_load_gb']:.2f} GB; non-expert parameters + buffers {r['dense_gb']:.2f} GB; "
              f"packed experts {r['packed_gb']:.1f} GB are in host RAM only")
        print(f"GPU peak while training {r['gpu_peak_gb']:.2f} GB")
    print(f"train step (seq {a.seq}, LoRA attention, grad ckpt): {r['step_s']:.2f}s = {r['tokens_per_s']:.0f} tokens/s, "
          f"loss {r['loss']:.3f}; saved expert activations {r['saved_activation_gb']:.2f} GB")
    return r


if __name__ == "__main__":
    main()

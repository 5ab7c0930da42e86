"""End-to-end LoRA training on a DeepSeek-V2-Lite-shaped random checkpoint: kt-sft (routed experts on the CPU
engine, everything else on the GPU) against stock transformers + PEFT with the whole model on the GPU, same run.

Writes the checkpoint once (the real V2-Lite config shape: 27 decoder layers = 1 dense + 26 MoE, ~15.7B params,
31 GB of bf16 in 2 GB safetensors shards, per-expert keys as on the Hub; reused when `--dir` already holds it),
then trains each side in its own process, so peak GPU memory and peak host RSS are per side, on the same random
token batches (labels = input_ids) with the same LoRA config. Per side it reports:

  tokens/s         batch x seq / median step wall (cuda-synchronized), after `--warmup` steps
  GPU compute ms   union of the CUDA kernel intervals of one extra, profiled step (torch.profiler, CUDA activity)
  copies ms        union of the CUDA memcpy/memset intervals of that step (the engine's host<->device staging)
  CPU experts ms   wall time inside the engine's forward + backward calls per step (ExpertLayer.forward/backward)
  GPU idle         1 - (kernels + copies, merged) / the profiled step's wall
  GPU share ms     the GPU share's time per step (CUDA events, first chunk's compute to the last), and inside the
                   split calls how long the CPU waited for it and it for the engine (kt_sft.engine.share_plan)
  peak GPU         torch.cuda.max_memory_allocated over training (weights included); peak RSS = ru_maxrss
  busy breakdown   of the profiled step: the GPU's kernels alone, copies alone (the link), both, neither (idle);
                   the CPU engine's calls busy with the GPU busy too (the overlap) or alone (the GPU waits)

and last the ratios and whether the targets hold (<= 6 GB GPU; the engine alone >= 1,500 tokens/s, GPU idle < 30%
of a step; with a GPU share issue 25's >= 8,000 tokens/s for int8 experts, >= 6,000 for bf16, idle < 20%).
The stock side runs without gradient checkpointing (the fastest setting that fits an 80 GB H100; on OOM it
retries with checkpointing and says so). The figures mean something on the device (16-core AMX + H100) only:

    python benchmarks/bench_e2e.py --dir /tmp/v2lite-rand --layers 27       # device: bash benchmarks/device_e2e.sh
    python benchmarks/bench_e2e.py --tiny                                   # CPU smoke run of the script itself

--gpu-experts auto 1.0 0 (kt_gpu_experts; default auto with a GPU): one load, then each value in turn from the
same LoRA init, a row each (bash benchmarks/device_hybrid.sh); --ring-mb 140 560: each share value once per staging
ring size (140 MiB: the 2 slots of before). --sweep 2x2048 4x2048 8x4096: each batch x seq in turn, then one table
(tokens/s, step, peak GPU, CPU experts, GPU share, idle) of all.

--loss dpo: each step is LLaMA-Factory's DPO step (pref_loss sigmoid, beta 0.1) instead of the causal-LM loss: the
batch's first half are the chosen sequences, the second half the rejected ones, both in one policy forward, then
the reference forward (the same model under PEFT's disable_adapter, no_grad) and the loss from the full logits'
log-probabilities; tokens/s counts batch x seq per step as for SFT (the reference forward is part of the step).
Rows carry the variant "... DPO". On the device: bash benchmarks/device_e2e.sh OUTDIR --loss dpo (ours vs stock
all-GPU DPO in one run, GPU peak of each).

--json prints one JSON row per side on stdout (the report goes to stderr); --record appends them to
benchmarks/results/bench_e2e.csv (or --results-dir), the rows BENCHMARKS.md's tables are generated from.

--family deepseek_v3: DeepSeek-V3 at its real dimensions, from a random checkpoint in the published block-FP8
layout (benchmarks/v3_checkpoint.py: the real config truncated to --layers, default 3 dense + 3 MoE = 40.0 GB;
written once, shard by shard, reused while --dir holds it), trained in one child process per --formats (default
fp8 = kt_backend FP8, the checkpoint's own codes; int4-gemm = AMXINT4 and int8-gemm = AMXINT8, quantized at load).
Per format: load seconds and GB/s (checkpoint bytes / load seconds), tokens/s, peak GPU and RSS, each decoder
layer's forward + backward (LayerTimer), the CPU engine's time and phases per MoE layer, and the projection to the
whole 61-layer model: step = rest + 3 x dense layer + 58 x MoE layer, as tokens/s next to KTransformers' published
40.35 tokens/s. No stock side: the stock model does not fit one GPU at this size. Rows: bench_e2e_v3.csv.

    python benchmarks/bench_e2e.py --family deepseek_v3 --record          # device (16 cores + H200): see below
    python benchmarks/bench_e2e.py --family deepseek_v3 --tiny            # CPU smoke run, toy dimensions

Device budget (16 AMX cores, estimated from this box's per-tensor costs and bench_moe's V3-shape rates): writing
40 GB ~5 s of generation + the disk (~40 s at 1 GB/s); per format ~20 s of imports and CUDA set-up, the load
(fp8 ~20 s: codes copied as stored; int4-gemm / int8-gemm ~60-100 s: each fp8 weight decoded to fp32, then
quantized) and 5 steps of 4,096 tokens (fp8 ~4 s each, the int8-GEMM formats ~2 s): ~5-7 minutes in all;
--layers 5 saves a MoE layer's 11.5 GB and ~40 s.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_load import v2_lite_config, write_checkpoint  # noqa: E402  (same random checkpoint writer)
import results  # noqa: E402  (benchmarks/results.py: the rows every benchmark records)
from kt_sft.engine import share_plan  # noqa: E402
from kt_sft.engine.gpu_share import RING_BYTES as SHIPPED_RING_BYTES  # noqa: E402
import v3_checkpoint  # noqa: E402  (the block-FP8 DeepSeek-V3 checkpoint writer)
from kt_sft.engine.formats import FORMATS  # noqa: E402

GB = 1024 ** 3
# LoRA on the attention projections and on the dense / shared-expert MLP linears (not the router `mlp.gate`).
DEFAULT_TARGETS = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
V3_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
              "down_proj"]
EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TARGETS = {"tokens_per_s": 1500, "peak_gpu_gb": 6.0, "gpu_idle": 0.30}  # the engine alone (first milestone)
# With a GPU share (issue 25, V2-Lite shape, 2 x 2048 tokens, <= 6 GB): tokens/s by expert format, GPU idle.
SHARE_TARGETS = {"int8": 8000, "int8-gemm": 8000, "bf16": 6000, "gpu_idle": 0.20}
# What an option left unset means for each --family (--tiny then overrides layers, seq, steps, warmup, shards).
FAMILY_DEFAULTS = {
    "deepseek_v2_lite": dict(layers=27, shard_gb=2.0, batch=2, seq=2048, steps=5, warmup=2,
                             lora_target=DEFAULT_TARGETS),
    "deepseek_v3": dict(layers=6, shard_gb=4.0, batch=1, seq=4096, steps=3, warmup=1, lora_target=V3_TARGETS),
}
CHECKPOINT_DIRS = {"deepseek_v2_lite": ("/tmp/v2lite-rand", "/tmp/v2lite-tiny-rand"),  # (default, --tiny)
                   "deepseek_v3": ("/tmp/v3-rand", "/tmp/v3-tiny-rand")}
V3_FORMATS = ["fp8", "int4-gemm", "int8-gemm"]  # kt_backend FP8 (the checkpoint's own), AMXINT4, AMXINT8
FULL_LAYERS = v3_checkpoint.V3_CONFIG["num_hidden_layers"]  # DeepSeek-V3: 61 = 3 dense + 58 MoE
# KTransformers' published DeepSeek-V3 671B LoRA (BF16) training throughput, on 2-4 RTX 4090s (70 GB GPU summed) and
# a Xeon 8488C host with 1.2-1.3 TB RAM: "KTransformers Fine-Tuning x LLaMA-Factory Integration - User Guide",
# https://kvcache-ai.github.io/ktransformers/en/SFT/KTransformers-Fine-Tuning_User-Guide.html
# (summarized in ../shared/notes/field.md).
INCUMBENT_V3_TOKENS_PER_S = 40.35


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)  # stdout carries the child's RESULT line only


def tiny_config(layers: int):
    """V2-Lite's structure (MLA with plain q_proj, dense first layer, shared experts) at toy sizes."""
    return v2_lite_config(
        layers, vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=512)


def ensure_checkpoint(path: Path, config, shard_bytes: int) -> None:
    """Write the random checkpoint unless `path` already holds one of this shape with every shard present."""
    index, cfg = path / "model.safetensors.index.json", path / "config.json"
    if index.is_file() and cfg.is_file():
        on_disk = json.loads(cfg.read_text())
        shards = set(json.loads(index.read_text())["weight_map"].values())
        same = all(on_disk.get(k) == getattr(config, k) for k in ("num_hidden_layers", "hidden_size", "n_routed_experts"))
        if same and all((path / s).is_file() for s in shards):
            print(f"reusing {path} ({config.num_hidden_layers} layers, {len(shards)} shards)", flush=True)
            return
        log(f"{path} holds another shape or misses shards: rewriting it")
    start = time.perf_counter()
    write_checkpoint(path, config.num_hidden_layers, shard_bytes, config=config)
    print(f"wrote {path} ({config.num_hidden_layers} layers) in {time.perf_counter() - start:.0f}s", flush=True)


class EngineTimer:
    """Wall time inside the CPU engine's forward/backward calls and inside the autograd glue's host<->device
    staging (`_to_engine` / `_from_engine`; its device->host side waits for the queued GPU work first)."""

    def __init__(self) -> None:
        import kt_sft.engine.autograd as glue
        from kt_sft.engine import ExpertLayer

        self.seconds = {"forward": 0.0, "backward": 0.0, "staging": 0.0}
        self.calls = 0
        self.intervals: list | None = None  # (start, end) perf_counter seconds of each engine call, when a list
        for name in ("forward", "backward"):
            setattr(ExpertLayer, name, self._timed(getattr(ExpertLayer, name), name, count=True))
        for name in ("_to_engine", "_from_engine"):  # looked up as module globals at call time
            setattr(glue, name, self._timed(getattr(glue, name), "staging"))

    def _timed(self, fn, bucket: str, count: bool = False):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.seconds[bucket] += end - start
                self.calls += count
                if count and self.intervals is not None:
                    self.intervals.append((start, end))

        return timed

    def take(self) -> dict:
        out = {**self.seconds, "calls": self.calls}
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = 0
        return out


class LayerTimer:
    """Wall time of each decoder layer in a training step, CUDA-synchronized at the layer boundaries: its forward,
    and its backward, from the moment the gradient of its output is complete to the moment that of the layer
    below's output is (layer 0: to the end of the backward), so a gradient checkpoint's recompute counts in its
    layer's backward. The step's wall minus the layers' is the rest (embeddings, final norm, loss, optimizer)."""

    def __init__(self, layers, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds = [0.0] * len(layers)
        self.in_backward, self._start, self._grad_at = False, 0.0, {}
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda module, args: self._forward_starts())
            layer.register_forward_hook(functools.partial(self._forward_ends, i))

    def _now(self) -> float:
        self.sync()
        return time.perf_counter()

    def _forward_starts(self) -> None:
        if not self.in_backward:  # in the backward: a checkpoint recompute, timed with its layer's backward
            self._start = self._now()

    def _forward_ends(self, i: int, module, args, output) -> None:
        if self.in_backward:
            return
        self.seconds[i] += self._now() - self._start
        out = output[0] if isinstance(output, tuple) else output
        if out.requires_grad:
            out.register_hook(lambda grad: self._grad_at.__setitem__(i, self._now()))

    @contextlib.contextmanager
    def backward(self):
        """Around loss.backward(): forwards in here are checkpoint recomputes; layer i's backward ends where the
        gradient of layer i-1's output is complete."""
        self.in_backward, self._grad_at = True, {}
        try:
            yield
        finally:
            self.in_backward = False
        end = self._now()
        missing = sorted(set(range(len(self.seconds))) - set(self._grad_at))
        if missing:
            raise RuntimeError(f"LayerTimer: the outputs of layers {missing} got no gradient (no trainable parameter "
                               "in or below them?)")
        for i, began in self._grad_at.items():
            self.seconds[i] += self._grad_at.get(i - 1, end) - began

    def take(self) -> list[float]:
        out, self.seconds = self.seconds, [0.0] * len(self.seconds)
        return out


def _merge(intervals) -> list[tuple[float, float]]:
    """The union of [start, end) intervals as disjoint sorted ones."""
    out: list[list[float]] = []
    for start, stop in sorted(intervals):
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], stop)
        elif stop > start:
            out.append([start, stop])
    return [(a, b) for a, b in out]


def _merged_ms(intervals) -> float:
    """Length of the union of [start, end) intervals (us in, ms out): concurrent streams count once."""
    return sum(b - a for a, b in _merge(intervals)) / 1e3


def _both_ms(first, second) -> float:
    """Length of the intersection of two unions of intervals (us in, ms out): the time both are busy."""
    a, b, total, i, j = _merge(first), _merge(second), 0.0, 0, 0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total / 1e3


def busy_breakdown(kernels, copies, engine, wall_ms: float) -> dict:
    """Where a step's time goes (intervals in us on one clock, ms out): the GPU's kernels and copies apart and
    together (a step bound by the link shows copies alone, one bound by compute kernels alone), idle (neither),
    and the CPU engine's calls against the GPU: both busy, the engine alone (the GPU waits for it)."""
    gpu = kernels + copies
    both = _both_ms(kernels, copies)
    gpu_ms, engine_ms, with_gpu = _merged_ms(gpu), _merged_ms(engine), _both_ms(engine, gpu)
    return {"kernels_only_ms": _merged_ms(kernels) - both, "copies_only_ms": _merged_ms(copies) - both,
            "kernels_and_copies_ms": both, "gpu_idle_ms": max(0.0, wall_ms - gpu_ms),
            "engine_busy_ms": engine_ms, "engine_and_gpu_ms": with_gpu, "engine_alone_ms": engine_ms - with_gpu,
            "neither_ms": max(0.0, wall_ms - _merged_ms(gpu + engine))}


def profile_gpu(step, device: torch.device, timer: "EngineTimer | None" = None) -> dict:
    """GPU busy time of one step from a CUDA-activity trace, and with `timer` its busy_breakdown against the
    engine's calls (host clock mapped onto the trace's by a marker kernel launched on an idle GPU right at the
    start: the trace's first kernel, off by its launch latency, ~10 us); without CUDA every figure is n/a (None)."""
    none = {"gpu_kernel_ms": None, "gpu_copy_ms": None, "gpu_busy_ms": None, "profiled_step_ms": None}
    if device.type != "cuda":
        step()
        return none
    from torch.profiler import ProfilerActivity, profile

    marker = torch.zeros(1, device=device)
    if timer is not None:
        timer.intervals = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        start = time.perf_counter()
        marker.fill_(1.0)
        step()
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    engine = [] if timer is None else timer.intervals
    if timer is not None:
        timer.intervals = None
    with tempfile.TemporaryDirectory() as tmp:  # the chrome trace names the device categories explicitly
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    spans = {"kernel": [], "copy": []}
    for e in events:
        kind = {"kernel": "kernel", "gpu_memcpy": "copy", "gpu_memset": "copy"}.get(e.get("cat"))
        if kind and "dur" in e:
            spans[kind].append((float(e["ts"]), float(e["ts"]) + float(e["dur"])))
    if not spans["kernel"]:  # CUPTI unavailable (e.g. no profiling permission): n/a, not a 100% idle GPU
        log("profiler recorded no CUDA kernels; GPU compute / copies / idle are n/a")
        return {**none, "profiled_step_ms": wall_ms}
    origin = min(a for a, _ in spans["kernel"])  # the marker's start, i.e. `start` on the host clock
    engine = [((a - start) * 1e6 + origin, (b - start) * 1e6 + origin) for a, b in engine]
    return {"gpu_kernel_ms": _merged_ms(spans["kernel"]), "gpu_copy_ms": _merged_ms(spans["copy"]),
            "gpu_busy_ms": _merged_ms(spans["kernel"] + spans["copy"]), "profiled_step_ms": wall_ms,
            "busy": busy_breakdown(spans["kernel"], spans["copy"], engine, wall_ms)}


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, lora_dropout=0.0,
                      target_modules=list(args.lora_target),
                      target_parameters=list(EXPERT_TARGETS) if args.expert_lora else None)


def load_side(side: str, args, device: torch.device):
    """The LoRA-wrapped model of one side, and what loading it cost."""
    info = {}
    start = time.perf_counter()
    if side == "ours":
        import kt_sft
        from kt_sft.models.expert_lora import get_peft_model

        # int8: int8 weights, bf16 GEMMs (kt_backend INT8); int8-gemm: int8 GEMMs too (kt_backend AMXINT8)
        model = kt_sft.load_model(args.dir, device=device, dtype=torch.bfloat16, format=args.format,
                                  threads=args.threads, progress=False, gpu_experts=0)  # shares: use_gpu_experts
        info["summary"] = model.kt_summary
    else:
        from peft import get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, device_map=str(device))
        info["summary"] = (f"stock transformers: whole model on {device}, experts_implementation="
                           f"{getattr(model.config, '_experts_implementation', None)}")
    info["load_s"] = time.perf_counter() - start
    torch.manual_seed(0)  # same LoRA init on both sides (B = 0: the first step's loss is the base model's)
    model = get_peft_model(model, lora_config(args))
    if device.type == "cuda":
        info["gpu_after_load_gb"] = torch.cuda.memory_allocated(device) / GB
    return model, info


def token_batches(args, vocab: int, count: int, device: torch.device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)  # identical batches on both sides
    return [torch.randint(0, vocab, (args.batch, args.seq), generator=gen).to(device) for _ in range(count)]


def engine_phases(on: bool):
    """The engine's per-phase wall times (kt_sft.engine.phase_profile) over one step, or an empty dict."""
    if not on:
        return contextlib.nullcontext({})
    import kt_sft.engine as ke

    return ke.phase_profile()


def _sequence_logps(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Sum of each row's next-token log-probabilities in fp32, as LLaMA-Factory's get_batch_logps."""
    logps = logits[:, :-1].float().log_softmax(-1)
    return logps.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def dpo_loss(model, ids: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """LLaMA-Factory's DPO sigmoid loss on `ids` = chosen rows then rejected rows (its concatenated_forward): one
    policy forward for both halves, the reference forward under disable_adapter and no_grad."""
    policy = _sequence_logps(model(input_ids=ids, use_cache=False).logits, ids)
    with torch.no_grad(), model.disable_adapter():
        reference = _sequence_logps(model(input_ids=ids, use_cache=False).logits, ids)
    chosen, rejected = (policy - reference).chunk(2)
    return -torch.nn.functional.logsigmoid(beta * (chosen - rejected)).mean()


def train(model, args, device: torch.device, checkpointing: bool, timer: EngineTimer | None,
          layers: LayerTimer | None = None) -> dict:
    if checkpointing:  # non-reentrant: kt-sft's retained forwards spare the experts the recompute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = token_batches(args, model.config.vocab_size, args.warmup + args.steps + 1, device)

    def step(ids):
        loss = dpo_loss(model, ids) if args.loss == "dpo" else model(input_ids=ids, labels=ids, use_cache=False).loss
        with layers.backward() if layers else contextlib.nullcontext():
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    walls, engine, losses, phases, per_layer, shares = [], [], [], {}, [], []
    for i, ids in enumerate(batches[:-1]):
        for discarded in filter(None, (timer, layers)):
            discarded.take()
        share_plan.take_totals()
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with engine_phases(timer is not None and i >= args.warmup) as ph:
            loss = step(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        for name, (_, seconds) in ph.items():  # summed over the timed steps; averaged below
            phases[name] = phases.get(name, 0.0) + seconds
        losses.append(loss.item())
        log(f"  step {i + 1}/{len(batches) - 1}{' (warm-up)' if i < args.warmup else ''}: {wall * 1e3:.0f} ms, "
            f"loss {losses[-1]:.4f}")
        if i >= args.warmup:
            walls.append(wall)
            if timer:
                engine.append(timer.take())
                shares.append(share_plan.take_totals())
            if layers:
                per_layer.append(layers.take())
    res = profile_gpu(lambda: step(batches[-1]), device, timer)
    step_s = statistics.median(walls)
    res.update(results.spread(args.batch * args.seq, walls))
    res.update(step_ms=step_s * 1e3, losses=losses, gradient_checkpointing=checkpointing)
    if res["gpu_busy_ms"] is not None:
        res["gpu_idle"] = max(0.0, 1.0 - res["gpu_busy_ms"] / res["profiled_step_ms"])
    res.update(_timings(walls, engine, phases, per_layer))
    res.update(_share_timings(shares))
    if device.type == "cuda":
        res["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / GB
        res["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GB
    return res


def _timings(walls: list[float], engine: list[dict], phases: dict, per_layer: list[list[float]]) -> dict:
    """Means over the timed steps: the engine's calls and phases (EngineTimer), each decoder layer (LayerTimer)
    and the rest of each step, its wall minus its layers."""
    res = {}
    if engine:
        mean_ms = lambda key: 1e3 * sum(e[key] for e in engine) / len(engine)  # noqa: E731
        res.update(experts_fwd_ms=mean_ms("forward"), experts_bwd_ms=mean_ms("backward"),
                   staging_ms=mean_ms("staging"), engine_calls=engine[-1]["calls"])
        res["experts_ms"] = res["experts_fwd_ms"] + res["experts_bwd_ms"]
        res["engine_phases_ms"] = {k: 1e3 * v / len(engine) for k, v in phases.items()}
    if per_layer:
        res["layer_ms"] = [1e3 * statistics.fmean(layer) for layer in zip(*per_layer)]
        res["rest_ms"] = 1e3 * statistics.fmean(w - sum(step) for w, step in zip(walls, per_layer))
    return res


def _share_timings(shares: list[dict]) -> dict:
    """Means over the timed steps of the GPU share's totals (kt_sft.engine.share_plan.take_totals): its GPU time,
    the time the CPU waited for it and it for the engine inside the split calls, the experts it took per call."""
    calls = sum(t["calls"] for t in shares)
    if not calls:
        return {}
    mean_ms = lambda key: 1e3 * sum(t[key] for t in shares) / len(shares)  # noqa: E731
    return {"gpu_share_ms": mean_ms("gpu_s"), "cpu_waits_ms": mean_ms("cpu_waits_s"),
            "gpu_waits_ms": mean_ms("gpu_waits_s"), "share_calls": calls / len(shares),
            "gpu_experts_per_call": sum(t["gpu_experts"] for t in shares) / calls}


def variants(args) -> list[tuple]:
    """(--gpu-experts value, staging ring MiB, experts per streamed chunk; None: the default) in run order: each
    value with a share once per --ring-mb and --share-chunk, 0 once."""
    return [(value, ring, chunk) for value in args.gpu_experts
            for ring in (args.ring_mb or [None] if value else [None])
            for chunk in (args.share_chunk or [None] if value else [None])]


def use_gpu_experts(model, value, args, device: torch.device, ring_mb=None, chunk=None) -> None:
    """Every experts module of `model` computes with a GPU share for `value` ("auto" or a fraction of its experts;
    0: none) on the run's device (on the CPU, as under --tiny, the share's code without streams) through a fresh
    staging ring of ring_mb MiB (None: gpu_share.RING_BYTES as shipped) in chunks of `chunk` experts (None: the
    share's default), and the engine's pool is sized as the
    loader sizes it for that setting."""
    import dataclasses

    import kt_sft.engine as ke
    import kt_sft.engine.gpu_share as gs
    from kt_sft.loader import reserve_launch_cores

    if device.type == "cuda":
        torch.cuda.synchronize()
    gs._rings.clear()  # the previous variant's slots are freed; the next share call allocates them anew
    gs.RING_BYTES = (ring_mb << 20) if ring_mb else SHIPPED_RING_BYTES
    for module in model.modules():
        layer = getattr(module, "kt_layer", None)
        if layer is not None:
            share = None
            if value:
                experts = "auto" if value == "auto" else max(1, round(value * layer.num_experts))
                share = ke.GpuShare(layer, experts, device, min_tokens=args.share_min_tokens, chunk=chunk)
            module.kt_policy = dataclasses.replace(module.kt_policy, share=share)
    ke.set_num_threads(args.threads)
    reserve_launch_cores(args.threads, bool(value) and device.type == "cuda")


def train_side(model, side: str, args, device: torch.device, timer, layers) -> dict:
    """train() with the side's checkpointing; a run without it that runs out of GPU memory is retried with it."""
    checkpointing = args.gradient_checkpointing if side == "ours" else args.stock_gradient_checkpointing
    oom = None
    try:
        return train(model, args, device, checkpointing, timer, layers)
    except torch.OutOfMemoryError as err:
        oom = str(err).splitlines()[0]
    # retried outside the except block, so the failed step's frames are gone
    if checkpointing:
        raise RuntimeError(f"{side}: out of GPU memory even with gradient checkpointing: {oom}")
    log(f"{side}: out of GPU memory without gradient checkpointing; retrying with it ({oom})")
    model.zero_grad(set_to_none=True)  # the failed step's partial gradients
    gc.collect()
    torch.cuda.empty_cache()
    res = train(model, args, device, True, timer, layers)
    res["note"] = "OOM without gradient checkpointing; measured with it"
    return res


def run_child(side: str, args):
    """One side's measurement; ours: a list, one per --gpu-experts value, each trained from the same LoRA init
    on the same batches in this process (one load)."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context up before anything is timed
    model, info = load_side(side, args, device)
    log(f"{side}: {info['summary']} (loaded in {info['load_s']:.0f}s)")
    timer = EngineTimer() if side == "ours" else None
    layers = None
    if args.family == "deepseek_v3":
        info.update(v3_load_info(model, args, info["load_s"]))
        layers = LayerTimer(model.get_base_model().model.layers, device)
    host = {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else ""}
    host["host"] = f"{host['gpu'] or 'no GPU'}; {os.cpu_count()} CPUs; torch {torch.__version__}"
    if side == "stock":
        return {**train_side(model, side, args, device, timer, layers), **info, **host, "peak_rss_gb": _rss_gb()}
    import kt_sft.engine as ke

    init = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    runs = []
    for value, ring_mb, chunk in variants(args):
        use_gpu_experts(model, value, args, device, ring_mb, chunk)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in init:
                    p.copy_(init[n])
        ring = (f", staging ring {ring_mb} MiB" if ring_mb else "") + (f", chunks of {chunk} experts" if chunk else "")
        log(f"--- ours, gpu_experts {value}{ring} ({ke.num_threads()} engine threads) ---")
        res = train_side(model, side, args, device, timer, layers)
        res.update(info, **host, gpu_experts=value, ring_mb=ring_mb, share_chunk=chunk, peak_rss_gb=_rss_gb(),
                   isa=ke.current_isa(), threads=ke.num_threads())
        res["engine"] = f"{res['isa']}, {res['threads']} threads"
        runs.append(res)
    return runs


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB


def v3_load_info(model, args, load_s: float) -> dict:
    """What a DeepSeek-V3 run reports of its load: the checkpoint's bytes over the load's seconds, the packed
    experts of one MoE layer in host RAM."""
    engines = [m.kt_layer for m in model.modules() if hasattr(m, "kt_layer")]
    checkpoint = v3_checkpoint.checkpoint_bytes(args.dir)
    return {"checkpoint_gb": checkpoint / 1e9, "load_gb_per_s": checkpoint / 1e9 / load_s,
            "packed_gb_per_moe_layer": sum(e.packed_bytes for e in engines) / len(engines) / GB}


def run_side(side: str, args, extra: tuple[str, ...] = ()) -> dict | None:
    """One side in a fresh process (its own RSS and GPU peaks), with `extra` arguments; its progress streams to
    our stderr."""
    cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], *extra, "--child", side]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        print(f"{side}: failed (rc={proc.returncode}); see stderr above", flush=True)
        return None
    return json.loads(line[len("RESULT "):])


def _cell(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _share_name(value) -> str:
    return "auto" if value == "auto" else f"{value:g}"


def _label(side: str, r: dict, args) -> str:
    ckpt = ", grad ckpt" if r["gradient_checkpointing"] else ""
    value = r.get("gpu_experts")
    share = f", GPU share {_share_name(value)}" if value else ""
    share += f", ring {r['ring_mb']} MiB" if r.get("ring_mb") else ""
    share += f", chunks of {r['share_chunk']}" if r.get("share_chunk") else ""
    dtype = "" if args.format == "bf16" else f", {args.format}"
    dpo = ", DPO" if args.loss == "dpo" else ""
    return f"kt-sft (ours{dtype}{share}{ckpt}{dpo})" if side == "ours" else f"stock (all on {args.device}{ckpt}{dpo})"


def report(runs: list[tuple[str, dict]], args) -> None:
    """The table of one (batch, seq): a row per (side, --gpu-experts value), then per run its details."""
    cols = [("tokens/s", "tokens_per_s", ".0f", 1), ("step ms", "step_ms", ".0f", 1),
            ("GPU compute ms", "gpu_kernel_ms", ".0f", 1), ("copies ms", "gpu_copy_ms", ".1f", 1),
            ("CPU experts ms", "experts_ms", ".0f", 1), ("GPU share ms", "gpu_share_ms", ".0f", 1),
            ("GPU idle %", "gpu_idle", ".1f", 100), ("peak GPU GB", "peak_gpu_gb", ".2f", 1),
            ("peak RSS GB", "peak_rss_gb", ".1f", 1), ("loss step 1", "losses", ".4f", 1)]
    if runs:  # the parent never touches CUDA: no context of its own on the GPU the children measure
        print(f"\ndevice: {runs[0][1]['host']}")
    print(f"LoRA r={args.lora_rank} on {', '.join(args.lora_target)}{' + routed experts' if args.expert_lora else ''}; "
          f"batch {args.batch} x {args.seq} tokens; {args.steps} timed steps after {args.warmup} warm-up")
    print(f"{'':<64}" + "".join(f"{c[0]:>15}" for c in cols))
    for side, r in runs:
        cells = []
        for _, key, spec, scale in cols:
            v = r.get(key)
            v = v[0] if key == "losses" and v else v
            cells.append(_cell(None if v is None else v * scale, spec))
        print(f"{_label(side, r, args):<64}" + "".join(f"{c:>15}" for c in cells))
    for side, r in runs:
        _report_details(side, r, args)
    ours = [r for side, r in runs if side == "ours"]
    stock = next((r for side, r in runs if side == "stock"), None)
    for r in ours:
        _report_targets(r, args)
    for r in ours if stock else ():  # same weights, batches and LoRA init: losses agree up to bf16 (int8: more)
        diff = max(abs(a - b) for a, b in zip(r["losses"], stock["losses"]))
        gpu = (f"; peak GPU ours/stock {r['peak_gpu_gb'] / stock['peak_gpu_gb']:.3f}"
               if r.get("peak_gpu_gb") and stock.get("peak_gpu_gb") else "")
        print(f"{_label('ours', r, args)} vs stock: loss per step max |difference| {diff:.4f} over "
              f"{len(r['losses'])} steps; tokens/s {r['tokens_per_s'] / stock['tokens_per_s']:.3f} of stock{gpu}")


def _report_details(side: str, r: dict, args) -> None:
    extra = f"; {r['note']}" if r.get("note") else ""
    print(f"{_label(side, r, args)}: {r['summary']}; load {r['load_s']:.0f}s; GPU after load "
          f"{_cell(r.get('gpu_after_load_gb'), '.2f')} GB, peak reserved {_cell(r.get('peak_reserved_gb'), '.2f')} GB"
          f"; profiled step {_cell(r.get('profiled_step_ms'), '.0f')} ms{extra}")
    if r.get("experts_ms") is not None:
        print(f"  per step: CPU experts forward {r['experts_fwd_ms']:.0f} ms + backward {r['experts_bwd_ms']:.0f} "
              f"ms over {r['engine_calls']} engine calls; staging (host wall, incl. waiting for queued GPU work) "
              f"{r['staging_ms']:.0f} ms; engine {r['engine']}")
        inside = ", ".join(f"{name} {ms:.0f}" for name, ms in r.get("engine_phases_ms", {}).items())
        print(f"  engine phases per step (ms, all layers): {inside}")
    if r.get("gpu_share_ms") is not None:
        print(f"  {_share_breakdown(r)}")
    if r.get("busy"):
        print(f"  {_busy_line(r)}")


def _busy_line(r: dict) -> str:
    """The profiled step's busy_breakdown (also in the results row's note)."""
    b = r["busy"]
    line = (f"profiled step {r['profiled_step_ms']:.0f} ms: GPU kernels alone {b['kernels_only_ms']:.0f}, copies "
            f"alone {b['copies_only_ms']:.0f}, both {b['kernels_and_copies_ms']:.0f}, idle {b['gpu_idle_ms']:.0f}")
    if b["engine_busy_ms"]:
        line += (f"; CPU engine busy {b['engine_busy_ms']:.0f} ms, {b['engine_and_gpu_ms']:.0f} of it with the GPU "
                 f"busy too, {b['engine_alone_ms']:.0f} alone; neither busy {b['neither_ms']:.0f}")
    return line


def _share_breakdown(r: dict) -> str:
    """The GPU share's per-step line (also the note of its results row)."""
    return (f"GPU share {r['gpu_share_ms']:.0f} ms/step over {r['share_calls']:.0f} calls, "
            f"{r['gpu_experts_per_call']:.1f} experts per call; in those calls the CPU waited "
            f"{r['cpu_waits_ms']:.0f} ms for the GPU, the GPU {r['gpu_waits_ms']:.0f} ms for the engine")


def _report_targets(r: dict, args) -> None:
    tokens, idle = TARGETS["tokens_per_s"], TARGETS["gpu_idle"]
    if r.get("gpu_experts") and args.format in SHARE_TARGETS:
        tokens, idle = SHARE_TARGETS[args.format], SHARE_TARGETS["gpu_idle"]
    checks = [(f"tokens/s >= {tokens:,}", r.get("tokens_per_s"), lambda v: v >= tokens, ".0f", 1),
              ("peak GPU <= 6 GB", r.get("peak_gpu_gb"), lambda v: v <= TARGETS["peak_gpu_gb"], ".2f", 1),
              (f"GPU idle < {idle:.0%} of a step", r.get("gpu_idle"), lambda v: v < idle, ".1f", 100)]
    judged = args.device == "cuda" and not args.tiny  # the targets are for the full shape on the device
    for label, v, ok, spec, scale in checks:
        verdict = ("holds" if ok(v) else "MISSED") if judged and v is not None else "n/a (device run only)"
        print(f"target {label:<26} {_label('ours', r, args):<64} {_cell(None if v is None else v * scale, spec):>8}: "
              f"{verdict}")


def variant(side: str, args) -> str:
    """The side's name in the results: "ours <format>[ + expert LoRA]" or "stock", " DPO" after either with --loss
    dpo (the GPU share is the row's gpu_experts setting)."""
    dpo = " DPO" if args.loss == "dpo" else ""
    if side == "stock":
        return f"stock{dpo}"
    return f"ours {args.format}{' + expert LoRA' if args.expert_lora else ''}{dpo}"


def result_rows(runs: list[tuple[str, dict]], args, provenance: dict | None = None) -> list[dict]:
    """One results row per (side, --gpu-experts value) that finished; ours carry tokens/s over stock's and the
    largest loss gap, and the GPU share's breakdown as the note. `provenance`: the run's (a sweep's points share
    one run id); default: this call's."""
    stock = next((r for side, r in runs if side == "stock"), None)
    first = runs[0][1] if runs else {}
    engine = next((r for side, r in runs if side == "ours"), {})
    provenance = provenance or results.provenance(engine.get("isa", ""), engine.get("threads", ""),
                                                  first.get("gpu", ""))
    run_info = {**provenance, "layers": args.layers, "batch": args.batch, "seq": args.seq, "lora_rank": args.lora_rank,
                "steps": args.steps}
    rows = []
    for side, r in runs:
        losses = r.get("losses") or [None]
        ring = f"staging ring {r['ring_mb']} MiB" if r.get("ring_mb") else None
        chunk = f"chunks of {r['share_chunk']} experts" if r.get("share_chunk") else None
        share = _share_breakdown(r) if r.get("gpu_share_ms") is not None else None
        notes = [n for n in (r.get("note"), ring, chunk, share, _busy_line(r) if r.get("busy") else None) if n]
        row = {**run_info, "gpu_experts": _share_name(r.get("gpu_experts") or 0) if side == "ours" else 0,
               "threads": r.get("threads", run_info["threads"]), "variant": variant(side, args),
               "tokens_per_s": r["tokens_per_s"], "tokens_per_s_min": r["tokens_per_s_min"],
               "tokens_per_s_max": r["tokens_per_s_max"], "step_ms": r["step_ms"],
               "gpu_compute_ms": r.get("gpu_kernel_ms"), "gpu_copy_ms": r.get("gpu_copy_ms"),
               "gpu_idle": r.get("gpu_idle"), "cpu_experts_ms": r.get("experts_ms"), "peak_gpu_gb": r.get("peak_gpu_gb"),
               "peak_rss_gb": r.get("peak_rss_gb"), "load_s": r.get("load_s"), "loss_first": losses[0],
               "loss_last": losses[-1], "phases_ms": r.get("engine_phases_ms") or None,
               "note": "; ".join(notes) or None}
        if side == "ours" and stock:
            row.update(ratio=round(r["tokens_per_s"] / stock["tokens_per_s"], 3), ratio_of="ours/stock",
                       loss_diff=max(abs(a - b) for a, b in zip(r["losses"], stock["losses"])))
        rows.append(row)
    return rows


def measure(args) -> list[tuple[str, dict]]:
    """Ours (a run per --gpu-experts value, one process) and, with --baseline, stock, at args.batch x args.seq."""
    extra = ("--batch", str(args.batch), "--seq", str(args.seq))
    runs = [("ours", r) for r in run_side("ours", args, extra) or []]
    if args.baseline:
        stock = run_side("stock", args, extra)
        runs += [("stock", stock)] if stock else []
    return runs


def report_sweep(sweep: list[tuple[int, int, list]], args) -> None:
    """One line per (batch x seq, run): how the stream's fixed cost amortizes over more tokens per step."""
    print(f"\nsweep over tokens per step ({args.format} experts; gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}):")
    print(f"{'batch x seq':>12} {'run':<40} {'tokens/s':>9} {'step ms':>8} {'peak GPU GB':>12} {'CPU experts ms':>15} "
          f"{'GPU share ms':>13} {'GPU idle %':>11}")
    for batch, seq, runs in sweep:
        for side, r in runs:
            idle = r.get("gpu_idle")
            print(f"{f'{batch} x {seq}':>12} {_label(side, r, args):<40} {r['tokens_per_s']:>9.0f} {r['step_ms']:>8.0f} "
                  f"{_cell(r.get('peak_gpu_gb'), '.2f'):>12} {_cell(r.get('experts_ms'), '.0f'):>15} "
                  f"{_cell(r.get('gpu_share_ms'), '.0f'):>13} {_cell(None if idle is None else 100 * idle, '.1f'):>11}")


def v3_run_config(args) -> dict:
    return v3_checkpoint.v3_config(args.layers, args.fp8_block, **(v3_checkpoint.TINY_SIZES if args.tiny else {}))


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.2f} MB"


def ensure_v3_checkpoint(args, config: dict, size: dict) -> None:
    """Say what the checkpoint holds; write it unless `args.dir` holds it already."""
    dense, block = config["first_k_dense_replace"], args.fp8_block
    print(f"DeepSeek-V3{' (tiny dimensions)' if args.tiny else ''}: {args.layers} of its {FULL_LAYERS} layers "
          f"({dense} dense + {args.layers - dense} MoE), block-FP8 {block}x{block}: {_gb(size['total'])} (routed "
          f"experts {_gb(size['experts'])}; one MoE layer {_gb(size['moe_layer'])}, one dense layer "
          f"{_gb(size['dense_layer'])}, embeddings + lm_head {_gb(size['embeddings'])})", flush=True)
    if v3_checkpoint.holds(args.dir, config):
        print(f"reusing {args.dir}", flush=True)
        return
    seconds = v3_checkpoint.write_checkpoint(args.dir, config, int(args.shard_gb * GB), log=log)
    print(f"wrote {args.dir} in {seconds:.0f}s ({size['total'] / 1e9 / seconds:.2f} GB/s, each shard fsync'ed)",
          flush=True)


def v3_projection(r: dict, config: dict, args, size: dict, full: dict) -> dict:
    """One format's step split by layer kind (LayerTimer) and projected to the whole model of these dimensions
    (FULL_LAYERS layers, the first first_k_dense_replace dense): step = rest + dense x the dense layers' mean +
    MoE x the MoE layers' mean. GPU: the measured peak plus the other layers' non-expert bf16 weights and
    checkpointed hidden states; host RAM: the measured peak plus the other MoE layers' packed experts."""
    dense, layer_ms = config["first_k_dense_replace"], r["layer_ms"]
    moe, full_moe = len(layer_ms) - dense, FULL_LAYERS - dense
    dense_ms, moe_ms = statistics.fmean(layer_ms[:dense]), statistics.fmean(layer_ms[dense:])
    step_ms = r["rest_ms"] + dense * dense_ms + full_moe * moe_ms
    hidden_states = (FULL_LAYERS - len(layer_ms)) * args.batch * args.seq * config["hidden_size"] * 2
    out = {"dense_layer_ms": dense_ms, "moe_layer_ms": moe_ms, "projected_step_ms": step_ms,
           "projected_tokens_per_s": args.batch * args.seq / step_ms * 1e3,
           "projected_rss_gb": r["peak_rss_gb"] + (full_moe - moe) * r["packed_gb_per_moe_layer"]}
    if r.get("peak_gpu_gb") is not None:
        out["projected_gpu_gb"] = r["peak_gpu_gb"] + (full["gpu"] - size["gpu"] + hidden_states) / GB
    if r.get("experts_ms") is not None:
        out["experts_ms_per_moe_layer"] = r["experts_ms"] / moe
        out["phases_per_moe_layer"] = {k: ms / moe for k, ms in r.get("engine_phases_ms", {}).items()}
    return out


def report_v3(runs: dict, config: dict, args, full: dict) -> None:
    cols = [("load s", "load_s", ".0f"), ("load GB/s", "load_gb_per_s", ".2f"), ("tokens/s", "tokens_per_s", ".1f"),
            ("step ms", "step_ms", ".0f"), ("MoE layer ms", "moe_layer_ms", ".0f"),
            ("dense layer ms", "dense_layer_ms", ".0f"), ("rest ms", "rest_ms", ".0f"),
            ("experts ms/layer", "experts_ms_per_moe_layer", ".0f"), ("peak GPU GB", "peak_gpu_gb", ".2f"),
            ("peak RSS GB", "peak_rss_gb", ".1f"), ("loss step 1", "loss_first", ".4f")]
    if runs:
        print(f"\ndevice: {next(iter(runs.values()))['host']}")
    experts = " + routed experts" if args.expert_lora else ""
    print(f"LoRA r={args.lora_rank} on {', '.join(args.lora_target)}{experts}; batch {args.batch} x {args.seq} tokens; "
          f"{args.steps} timed steps after {args.warmup} warm-up; gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"no stock baseline: at DeepSeek-V3 size the stock model does not fit one GPU (the full model is "
          f"{_gb(full['total'])} in block-FP8, twice that in bf16)")
    print(f"{'':<22}" + "".join(f"{c[0]:>17}" for c in cols))
    for fmt, r in runs.items():
        cells = [_cell(r["losses"][0] if key == "loss_first" else r.get(key), spec) for _, key, spec in cols]
        print(f"{'kt-sft ' + fmt:<22}" + "".join(f"{c:>17}" for c in cells))
    dense = config["first_k_dense_replace"]
    print(f"projection to the full model ({dense} dense + {FULL_LAYERS - dense} MoE layers): step = rest + {dense} x "
          f"dense layer + {FULL_LAYERS - dense} x MoE layer (each layer's forward + backward, recompute included)")
    for fmt, r in runs.items():
        print(f"  {fmt}: {r['rest_ms'] / 1e3:.2f} + {dense} x {r['dense_layer_ms'] / 1e3:.2f} + {FULL_LAYERS - dense} "
              f"x {r['moe_layer_ms'] / 1e3:.2f} s = {r['projected_step_ms'] / 1e3:.1f} s per {args.batch * args.seq} "
              f"tokens -> {r['projected_tokens_per_s']:.1f} tokens/s = "
              f"{r['projected_tokens_per_s'] / INCUMBENT_V3_TOKENS_PER_S:.2f}x KTransformers' published "
              f"{INCUMBENT_V3_TOKENS_PER_S} tokens/s; GPU ~{_cell(r.get('projected_gpu_gb'), '.0f')} GB, host RAM "
              f"~{r['projected_rss_gb']:.0f} GB")
    for fmt, r in runs.items():
        inside = ", ".join(f"{name} {ms:.0f}" for name, ms in r.get("phases_per_moe_layer", {}).items())
        print(f"{fmt}: {r['summary']}; checkpoint {r['checkpoint_gb']:.2f} GB read at {r['load_gb_per_s']:.2f} GB/s "
              f"(from the page cache where the shards were just written or read); engine phases per MoE layer (ms): "
              f"{inside}{'; ' + r['note'] if r.get('note') else ''}")


def v3_run_info(first: dict, config: dict, args) -> dict:
    """The columns every row of the run shares (provenance from the first format that finished)."""
    return {**results.provenance(first["isa"], first["threads"], first["gpu"]), "layers": args.layers,
            "moe_layers": args.layers - config["first_k_dense_replace"], "batch": args.batch, "seq": args.seq,
            "lora_rank": args.lora_rank, "gpu_experts": _share_name(first.get("gpu_experts") or 0),
            "steps": args.steps, "checkpoint_gb": first["checkpoint_gb"]}


def v3_row(fmt: str, r: dict, run_info: dict, args) -> dict:
    """The bench_e2e_v3 row of one format (experts ms and phases per MoE layer)."""
    keys = ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "step_ms", "load_s", "load_gb_per_s",
            "moe_layer_ms", "dense_layer_ms", "rest_ms", "peak_gpu_gb", "peak_rss_gb", "projected_tokens_per_s",
            "projected_gpu_gb", "projected_rss_gb", "note")
    variant = f"ours {fmt}{' + expert LoRA' if args.expert_lora else ''}"
    return {**run_info, **{k: r.get(k) for k in keys}, "variant": variant,
            "cpu_experts_ms": r.get("experts_ms_per_moe_layer"), "loss_first": r["losses"][0],
            "loss_last": r["losses"][-1], "phases_ms": r.get("phases_per_moe_layer") or None,
            "ratio": round(r["projected_tokens_per_s"] / INCUMBENT_V3_TOKENS_PER_S, 3),
            "ratio_of": f"projected {FULL_LAYERS} layers / KTransformers {INCUMBENT_V3_TOKENS_PER_S}"}


def main_v3(args) -> None:
    """DeepSeek-V3: the checkpoint, then one child per format, each format's row emitted (--json, --record) as
    soon as it finished (a call cut short by a time limit keeps the formats done), and the report."""
    with results.human_output(args):
        config = v3_run_config(args)
        size = v3_checkpoint.sizes(config)
        ensure_v3_checkpoint(args, config, size)
        full = v3_checkpoint.sizes({**config, "num_hidden_layers": FULL_LAYERS})
    runs, run_info = {}, None
    for fmt in args.formats:
        with results.human_output(args):
            log(f"--- {fmt} experts ---")
            r = (run_side("ours", args, ("--format", fmt)) or [None])[0]
        if r is None:
            continue
        runs[fmt] = {**r, **v3_projection(r, config, args, size, full)}
        run_info = run_info or v3_run_info(r, config, args)
        results.emit("bench_e2e_v3", [v3_row(fmt, runs[fmt], run_info, args)], args)
    with results.human_output(args):
        report_v3(runs, config, args, full)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=list(FAMILY_DEFAULTS), default="deepseek_v2_lite",
                   help="deepseek_v2_lite: the bf16 V2-Lite-shaped run against stock (default); deepseek_v3: the real "
                        "DeepSeek-V3 dimensions from a block-FP8 checkpoint, one child per --formats, no stock side")
    p.add_argument("--dir", type=Path, default=None, help="checkpoint dir (default /tmp/v2lite-rand, /tmp/v3-rand; "
                   "--tiny: /tmp/v2lite-tiny-rand, /tmp/v3-tiny-rand); written only when it lacks the config or a "
                   "shard (deepseek_v3: or holds another config, whose shards it first deletes)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (V2-Lite: default 27, the first dense; DeepSeek-V3: default 6 = 3 dense + 3 "
                        "MoE, of its 61. V3 sizes on disk, fp8: one MoE layer 11.5 GB (routed experts 11.3; in RAM "
                        "fp8 / int8-gemm 11.3 GB, int4-gemm 7.1 GB), one dense layer 0.58 GB, embeddings + lm_head "
                        "3.7 GB: 6 layers = 40.0 GB, 5 = 28.5 GB)")
    p.add_argument("--shard-gb", type=float, default=None, help="shard size (default 2; deepseek_v3: 4)")
    p.add_argument("--batch", type=int, default=None, help="default 2 (deepseek_v3: 1)")
    p.add_argument("--seq", type=int, default=None, help="default 2048 (deepseek_v3: 4096)")
    p.add_argument("--steps", type=int, default=None, help="timed steps, then one more, profiled (default 5; "
                                                           "deepseek_v3: 3)")
    p.add_argument("--warmup", type=int, default=None, help="default 2 (deepseek_v3: 1)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-target", nargs="+", default=None,
                   help=f"default {' '.join(DEFAULT_TARGETS)} (deepseek_v3: {' '.join(V3_TARGETS)})")
    p.add_argument("--expert-lora", action="store_true", help="also LoRA on the routed experts (target_parameters)")
    p.add_argument("--loss", choices=("sft", "dpo"), default="sft",
                   help="sft: the causal-LM loss (default); dpo: LLaMA-Factory's DPO step (chosen + rejected halves of "
                        "the batch in one forward, the reference = the model with its adapter disabled)")
    p.add_argument("--format", choices=list(FORMATS), default=None,
                   help="ours: the experts' format (kt_sft.engine.formats: bf16 (default), int8 = kt_backend INT8, "
                        "int8-gemm = AMXINT8, ...); deepseek_v3 takes --formats")
    p.add_argument("--formats", choices=list(FORMATS), nargs="+", default=None,
                   help=f"deepseek_v3: the experts' formats, one child process each (default {' '.join(V3_FORMATS)}"
                        ": kt_backend FP8, the checkpoint's own codes; AMXINT4 and AMXINT8, quantized at load)")
    p.add_argument("--fp8-block", type=int, default=None,
                   help="deepseek_v3: weights per block scale, B x B (default 128 as published; --tiny: 40)")
    p.add_argument("--gpu-experts", type=_gpu_experts_arg, nargs="+", default=None,
                   help="ours: kt_gpu_experts, auto or the fraction of each layer's experts computed on the GPU, "
                        "streamed per call (0: all on the CPU engine); several values run one after another in the "
                        "same process, each from the same LoRA init (default: auto with a GPU, else 0)")
    p.add_argument("--ring-mb", type=int, nargs="+", default=None, metavar="MIB",
                   help="ours: the GPU share's staging ring (kt_sft.engine.gpu_share.RING_BYTES, shipped: "
                        f"{SHIPPED_RING_BYTES >> 20}); several values run each --gpu-experts value with a share once "
                        "per size, in the same process (140: the 2 slots of before, for V2-Lite bf16 and int8)")
    p.add_argument("--share-chunk", type=int, nargs="+", default=None, metavar="N",
                   help="ours: experts per streamed chunk of the GPU share (GpuShare's chunk; default: ~CHUNK_BYTES "
                        "of weights per chunk); several values run each --gpu-experts value with a share once per "
                        "value, in the same process")
    p.add_argument("--share-min-tokens", type=int, default=None,
                   help="ours: calls of at least this many tokens use the GPU share (default 1024 as the loader; "
                        "--tiny: 1, so that the smoke run goes through the share's code on the CPU)")
    p.add_argument("--sweep", type=_shape_arg, nargs="+", default=None, metavar="BATCHxSEQ",
                   help="run each batch x seq (e.g. 2x2048 4x2048 8x4096), then a table of all: how the stream's "
                        "fixed cost amortizes with tokens per step, and the GPU memory each needs")
    p.add_argument("--threads", type=int, default=0, help="engine threads (0: the family default, all cores)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="ours (default on: the GPU memory target)")
    p.add_argument("--stock-gradient-checkpointing", action="store_true",
                   help="stock too (default off: its fastest setting that fits the H100)")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="train stock as well (default: yes, except with --tiny and for deepseek_v3)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 3 toy-sized layers, seq 64, no baseline")
    p.add_argument("--child", choices=("ours", "stock"), help=argparse.SUPPRESS)
    results.add_arguments(p)
    args = p.parse_args()
    v3 = args.family == "deepseek_v3"
    if v3 and args.baseline:
        p.error("--baseline: no stock side at DeepSeek-V3 size (its whole model does not fit one GPU)")
    if v3 and args.format and not args.child:
        p.error("--format: a deepseek_v3 run trains each of --formats in its own process; use --formats")
    if not v3 and (args.formats or args.fp8_block):
        p.error("--formats and --fp8-block are for --family deepseek_v3")
    if v3 and (args.sweep or len(args.gpu_experts or ()) > 1):
        p.error("--sweep and several --gpu-experts values are for the V2-Lite run")
    if args.loss == "dpo" and (v3 or any(b % 2 for b in [args.batch or 2] + [b for b, _ in args.sweep or []])):
        p.error("--loss dpo: the V2-Lite run with an even --batch (chosen and rejected halves)")
    return _resolve_defaults(args)


def _gpu_experts_arg(text: str):
    """auto, or a fraction in [0, 1] (kt_gpu_experts)."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected auto or a fraction between 0 and 1, got {text!r}")
    return value


def _shape_arg(text: str) -> tuple[int, int]:
    """BATCHxSEQ, e.g. 4x2048."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected BATCHxSEQ with positive integers (e.g. 4x2048), got {text!r}")
    return int(parts[0]), int(parts[1])


def _resolve_defaults(args):
    """The family's values for the options left unset, then --tiny's overrides."""
    seq_given = args.seq is not None
    for key, value in FAMILY_DEFAULTS[args.family].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.format = args.format or "bf16"
    args.formats = args.formats or V3_FORMATS
    args.dir = args.dir or Path(CHECKPOINT_DIRS[args.family][args.tiny])
    args.fp8_block = args.fp8_block or (40 if args.tiny else 128)
    if args.tiny:
        args.layers, args.steps, args.warmup, args.shard_gb = 3, 2, 1, 1 / 1024
        args.seq = args.seq if seq_given else 64
        args.device = "cpu"
    else:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.gpu_experts is None:
        args.gpu_experts = ["auto"] if args.device == "cuda" else [0.0]
    if args.share_min_tokens is None:
        args.share_min_tokens = 1 if args.tiny else 1024
    if args.baseline is None:
        args.baseline = not args.tiny and args.family != "deepseek_v3"
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        print("RESULT " + json.dumps(run_child(args.child, args)), flush=True)
        return
    if args.family == "deepseek_v3":
        main_v3(args)
        return
    with results.human_output(args):
        config = tiny_config(args.layers) if args.tiny else v2_lite_config(args.layers)
        ensure_checkpoint(args.dir, config, int(args.shard_gb * GB))
    sweep, provenance = [], None
    for batch, seq in args.sweep or [(args.batch, args.seq)]:
        args.batch, args.seq = batch, seq
        with results.human_output(args):
            runs = measure(args)
            report(runs, args)
        rows = result_rows(runs, args, provenance)
        if rows and provenance is None:
            provenance = {k: rows[0][k] for k in results.PROVENANCE}
        results.emit("bench_e2e", rows, args)
        sweep.append((batch, seq, runs))
    if args.sweep:
        with results.human_output(args):
            report_sweep(sweep, args)


if __name__ == "__main__":
    main()

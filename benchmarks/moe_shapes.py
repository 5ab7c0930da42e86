"""The routed-expert shapes of the MoE models kt-sft is for, how much of each fits this host, and what one pass of
a layer costs at least here (bench_moe.py --shapes).

Each shape is (experts E, top-k, hidden H, moe intermediate I) from the model's own config, named in `source`.
A shape whose layers (every format of the run, their activations, the weight source) exceed the RAM budget runs
a subset of E' experts on T' = T * E' / E tokens: the same T * k / E rows per expert as the full layer, so its
tokens/s stands for the full layer's (whose time is E / E' times the subset's on E / E' times the tokens).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Shape:
    name: str
    experts: int
    topk: int
    hidden: int
    intermediate: int
    source: str  # where the numbers come from


SHAPES = {s.name: s for s in (
    Shape("DeepSeek-V2-Lite", 64, 6, 2048, 1408, "deepseek-ai/DeepSeek-V2-Lite config.json (n_routed_experts, "
          "num_experts_per_tok, hidden_size, moe_intermediate_size), as benchmarks/bench_load.py's v2_lite_config"),
    Shape("Qwen3-30B-A3B", 128, 8, 2048, 768, "transformers 5.6 Qwen3MoeConfig defaults (Qwen/Qwen3-30B-A3B-Base)"),
    Shape("Qwen3-235B-A22B", 128, 8, 4096, 1536, "Qwen/Qwen3-235B-A22B as slime's scripts/models/qwen3-235B-A22B.sh "
          "gives it (num-experts, moe-router-topk, hidden-size, moe-ffn-hidden-size)"),
    Shape("GLM-4.5-Air", 128, 8, 4096, 1408, "transformers 5.6 Glm4MoeConfig defaults (the Air sizes: hidden 4096, "
          "moe_intermediate 1408, as the 106B-A12B Megatron recipe)"),
    Shape("GLM-4.5", 160, 8, 5120, 1536, "zai-org/GLM-4.5 as slime's scripts/models/glm4.5-355B-A32B.sh gives it"),
    Shape("DeepSeek-V3", 256, 8, 7168, 2048, "transformers 5.6 DeepseekV3Config defaults (DeepSeek-V3 / R1)"),
    Shape("Kimi-K2", 384, 8, 7168, 2048, "moonshotai/Kimi-K2 as slime's scripts/models/kimi-k2.sh gives it"),
    Shape("Mixtral-8x7B", 8, 2, 4096, 14336, "transformers 5.6 MixtralConfig defaults (mistralai/Mixtral-8x7B-v0.1)"),
    Shape("Mixtral-8x22B", 8, 2, 6144, 16384, "mistral-community/Mixtral-8x22B-v0.1 (hidden 6144, intermediate "
          "16384, 8 experts, top-2) as Megatron-LM's Mixtral 8x22B settings give it"),
    Shape("gpt-oss-120b", 128, 4, 2880, 2880, "transformers 5.6 GptOssConfig defaults (openai/gpt-oss-120b; timed with "
          "the table's SiLU GLU: its clamped SwiGLU + biases cost the same GEMMs)"),
    Shape("Qwen3-Next-80B-A3B", 512, 10, 2048, 512, "transformers 5.6 Qwen3NextConfig defaults "
          "(Qwen/Qwen3-Next-80B-A3B)"),
)}
DECODE_MAX_TOKENS = 32  # calls of at most this many tokens are decode steps: timed forward only
RAM_FRACTION = 0.75  # of MemAvailable at the start of a shape: room for the interpreter, torch and the page cache
# Bytes a routed row holds while a forward waits for its backward, per (I, H) element: the engine's saved slot
# (~4.2 bytes per I, measured with ExpertLayer.saved_bytes), its scratch, x / y / dx / dy: 8 per I + 4 per H.
ACTIVATION_BYTES = (8, 4)


def find(name: str) -> Shape:
    """A shape by name, case-insensitive."""
    for shape in SHAPES.values():
        if shape.name.lower() == name.lower():
            return shape
    raise SystemExit(f"--shapes: unknown shape {name!r} (known: {', '.join(SHAPES)})")


@dataclass(frozen=True)
class Plan:
    """The experts of `shape` that one run builds (all of them, or a subset that fits)."""
    shape: Shape
    experts_run: int

    @property
    def subset(self) -> bool:
        return self.experts_run < self.shape.experts

    def tokens_run(self, tokens: int) -> int:
        """The tokens a call of `tokens` runs on the subset: the full layer's rows per expert (at least 1 token)."""
        return max(1, round(tokens * self.experts_run / self.shape.experts))

    def note(self, tokens: int) -> str:
        """What a row of a subset ran, with its rows per expert and the full layer's (they differ only where a
        decode call's token count rounds up)."""
        if not self.subset:
            return ""
        s, T = self.shape, self.tokens_run(tokens)
        rows, full_rows = T * s.topk / self.experts_run, tokens * s.topk / s.experts
        return (f"subset: {self.experts_run} of {s.experts} experts on {T} of {tokens} tokens ({rows:.3g} rows per "
                f"expert; the full layer {full_rows:.3g})")


def available_bytes() -> int:
    """MemAvailable from /proc/meminfo (the free pages and the reclaimable cache), else free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def plan(shape: Shape, formats: list, copies: int, max_tokens: int, source_experts: int, budget: int,
         max_experts: int = 0) -> Plan:
    """How many experts of `shape` fit `budget` bytes: each one's packed weights in every format of `formats`
    (ExpertFormats), `copies` more bf16 copies of it (a comparator's source and weights), the activations of
    `max_tokens` calls in every format, and `source_experts` bf16 experts of random weights once; `max_experts`
    (> 0) caps it. At least top-k experts (a token's k experts are distinct), else SystemExit."""
    E, k, H, I = shape.experts, shape.topk, shape.hidden, shape.intermediate
    bf16_expert = 3 * H * I * 2
    rows_per_expert = max_tokens * k / E
    activations = len(formats) * rows_per_expert * (ACTIVATION_BYTES[0] * I + ACTIVATION_BYTES[1] * H)
    per_expert = sum(f.packed_bytes(1, H, I) for f in formats) + copies * bf16_expert + activations
    fitting = math.floor((budget - source_experts * bf16_expert) / per_expert)
    experts = min(E, fitting, max_experts or E)
    if experts < k:
        need = (source_experts * bf16_expert + k * per_expert) / 2**30
        raise SystemExit(f"{shape.name}: not even its top-{k} experts fit the RAM budget ({budget / 2**30:.1f} GiB "
                         f"of {RAM_FRACTION:.0%} of MemAvailable; {need:.1f} GiB needed): run fewer formats")
    return Plan(shape, experts)


def pass_bytes(fmt, experts_touched: int, shape: Shape, tokens: int) -> float:
    """Bytes one pass must move at least: every routed expert's packed weights once, the [T, H] bf16 input read
    and output written (x -> y forward, dy -> dx backward)."""
    return experts_touched * fmt.packed_bytes(1, shape.hidden, shape.intermediate) + 2 * tokens * shape.hidden * 2


def pass_flops(shape: Shape, tokens: int) -> float:
    """FLOPs of one pass: gate_up (2 * T*k * H * 2I) and down (2 * T*k * I * H); backward's dx does the same."""
    return 6.0 * tokens * shape.topk * shape.hidden * shape.intermediate


def floor_seconds(flops: float, nbytes: float, ceiling_tflops: Optional[float],
                  bandwidth_gbs: Optional[float]) -> tuple[Optional[float], str]:
    """The least time of one pass on this host and which ceiling sets it: max(flops / compute ceiling, bytes /
    read bandwidth), over the ceilings that were measured; (None, "n/a") without either."""
    bounds = {}
    if ceiling_tflops:
        bounds["compute"] = flops / (ceiling_tflops * 1e12)
    if bandwidth_gbs:
        bounds["bandwidth"] = nbytes / (bandwidth_gbs * 1e9)
    if not bounds:
        return None, "n/a"
    binding = max(bounds, key=bounds.get)
    return bounds[binding], binding

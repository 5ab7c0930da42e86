"""A random DeepSeek-V3 checkpoint in the official block-FP8 layout, at the real dimensions, written shard by shard.

The config is deepseek-ai/DeepSeek-V3's config.json (hidden 7168, 128 MLA heads, q_lora_rank 1536, kv_lora_rank 512,
qk_nope 128 / qk_rope 64 / v_head 128, dense intermediate 18432, 256 routed experts of 2048 + 1 shared, top-8 in
4 of 8 groups, vocab 129280, yarn rope) with `num_hidden_layers` truncated; the first first_k_dense_replace = 3
layers are dense, as there. Tensors carry the stock key names (those transformers 5.6's DeepseekV3ForCausalLM
state_dict has, routed experts per expert as on the Hub: model.layers.N.mlp.experts.E.gate_proj.weight) and the
stored layout of the published checkpoint:

    every linear of attention, dense MLP, shared and routed experts   X.weight float8_e4m3fn [out, in] and
                                                                      X.weight_scale_inv fp32 [ceil(out/B), ceil(in/B)]
    embed_tokens, lm_head, the router mlp.gate.weight                  bf16 (random, uniform with std 0.02)
    norms                                                              bf16 ones
    mlp.gate.e_score_correction_bias                                   fp32 zeros

Sizes at the real dimensions (B = 128): one MoE layer 11.51 GB (11.27 GB of it routed experts), one dense layer
0.58 GB, embeddings + lm_head 3.71 GB; 3 dense + 3 MoE layers = 40.0 GB. The full 61-layer model is 673 GB.

Random fp8 codes are uniform bytes with bit 6 (the top exponent bit) cleared: no NaN code (0x7F / 0xFF) can occur
and |code| <= 1.875, RMS 0.598. Each block's scale is 1 / (sqrt(in) * 0.598) times a factor in [0.75, 1.25), so a
weight has variance ~1 / in and every linear keeps its input's scale: activations stay O(1) and losses finite.
Values come from numpy generators seeded per (tensor, row chunk) and filled on all cores (numpy releases the GIL),
so a shard takes well under a second to generate; only one shard (`shard_bytes`) is in memory at a time, and each
is fsync'ed so that the next process's timings do not share the disk with the write-back.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

GB = 1e9
# deepseek-ai/DeepSeek-V3 config.json (auto_map and the transformers version aside); num_hidden_layers is truncated
# by `v3_config`. num_nextn_predict_layers: the MTP layer, which the checkpoint stores past the last layer and
# transformers does not build (not written here).
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "pretraining_tp": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
# The toy version for CPU smoke runs: odd sizes (the engine pads hidden 136 and intermediate 72 to 160 / 96; the
# blocks of `block` weights do not divide them), the same structure and layout.
TINY_SIZES = dict(hidden_size=136, intermediate_size=200, moe_intermediate_size=72, n_routed_experts=12,
                  num_experts_per_tok=3, n_group=4, topk_group=2, q_lora_rank=48, kv_lora_rank=40,
                  qk_nope_head_dim=24, qk_rope_head_dim=8, v_head_dim=20, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=1000, first_k_dense_replace=1)

FP8_FINITE_MASK = 0xBF  # clears bit 6: exponent <= 7, so never the NaN codes 0x7F / 0xFF, |value| <= 1.875
CODE_RMS = float(torch.arange(256, dtype=torch.uint8).bitwise_and(FP8_FINITE_MASK)
                 .view(torch.float8_e4m3fn).float().pow(2).mean().sqrt())
BF16_STD = 0.02  # embeddings, lm_head and routers, as transformers' initializer_range
CHUNK_BYTES = 16 << 20  # one generator task fills at most this much (one routed-expert projection: 14.7 MB)


def v3_config(layers: int, block: int = 128, **overrides) -> dict:
    """The config.json of DeepSeek-V3 truncated to `layers` decoder layers, blocks of `block` x `block` weights per
    scale (`overrides`: other sizes, e.g. TINY_SIZES)."""
    config = {**copy.deepcopy(V3_CONFIG), **overrides, "num_hidden_layers": layers}
    config["quantization_config"] = {**V3_CONFIG["quantization_config"], "weight_block_size": [block, block]}
    if layers <= config["first_k_dense_replace"]:
        raise ValueError(f"--layers {layers}: the first {config['first_k_dense_replace']} layers are dense; ask for "
                         "more to have a MoE layer to train")
    return config


@dataclass(frozen=True)
class Tensor:
    """One tensor of the checkpoint as the model names it: kind fp8 (a block-FP8 linear, stored as its weight and
    its weight_scale_inv), bf16 (random normal), norm (bf16 ones) or bias (fp32 zeros)."""

    name: str
    shape: tuple
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def stored_bytes(self, block: int) -> int:
        if self.kind == "fp8":
            return self.numel + 4 * math.ceil(self.shape[0] / block) * math.ceil(self.shape[1] / block)
        return self.numel * (4 if self.kind == "bias" else 2)

    @property
    def routed_expert(self) -> bool:
        return ".mlp.experts." in self.name


def _kind(name: str, shape: tuple) -> str:
    if name.endswith("e_score_correction_bias"):
        return "bias"
    if "norm" in name:
        return "norm"
    unquantized = ("embed_tokens" in name or name.startswith("lm_head") or name.endswith("mlp.gate.weight"))
    return "fp8" if len(shape) == 2 and name.endswith(".weight") and not unquantized else "bf16"


def checkpoint_tensors(config: dict) -> list[Tensor]:
    """Every tensor of the checkpoint in file order (layer by layer), from the state_dict of transformers' model
    built on the meta device: the fused experts parameters become the Hub's per-expert keys."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    # a copy: transformers edits the rope_scaling dict it is given
    plain = copy.deepcopy({k: v for k, v in config.items() if k != "quantization_config"})
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING["deepseek_v3"].from_dict(plain))
    tensors = []
    for name, p in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            base, (experts, two_i, hidden) = name[: -len("gate_up_proj")], p.shape
            for e in range(experts):
                tensors += [Tensor(f"{base}{e}.{proj}.weight", shape, "fp8") for proj, shape in
                            (("gate_proj", (two_i // 2, hidden)), ("up_proj", (two_i // 2, hidden)),
                             ("down_proj", (hidden, two_i // 2)))]
        elif not name.endswith("mlp.experts.down_proj"):  # down_proj: written with gate/up above, expert by expert
            tensors.append(Tensor(name, tuple(p.shape), _kind(name, tuple(p.shape))))
    return tensors


def block_of(config: dict) -> int:
    return config["quantization_config"]["weight_block_size"][0]


def sizes(config: dict) -> dict[str, int]:
    """Stored bytes: all, the routed experts', one MoE layer, one dense layer, embeddings + lm_head; and gpu = the
    bf16 bytes of everything but the routed experts (what load_model puts on the GPU)."""
    tensors, block = checkpoint_tensors(config), block_of(config)
    per_layer: dict[int, int] = {}
    for t in tensors:
        if t.name.startswith("model.layers."):
            layer = int(t.name.split(".")[2])
            per_layer[layer] = per_layer.get(layer, 0) + t.stored_bytes(block)
    dense = config["first_k_dense_replace"]
    return {"total": sum(t.stored_bytes(block) for t in tensors),
            "experts": sum(t.stored_bytes(block) for t in tensors if t.routed_expert),
            "moe_layer": per_layer[dense], "dense_layer": per_layer[0],
            "embeddings": sum(t.stored_bytes(block) for t in tensors if not t.name.startswith("model.layers.")),
            "gpu": sum(2 * t.numel for t in tensors if not t.routed_expert)}


def _row_chunks(t: Tensor) -> list[slice]:
    row_bytes = math.prod(t.shape[1:]) * (1 if t.kind == "fp8" else 2)
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    return [slice(r, min(r + step, t.shape[0])) for r in range(0, t.shape[0], step)]


def _fill(t: Tensor, array: np.ndarray, rows: slice, seed: tuple) -> None:
    """Rows `rows` of `array` (t's codes: uint8 fp8 codes or uint16 bf16 bits), from a generator seeded by `seed`."""
    rng, part = np.random.default_rng(seed), array[rows]
    if t.kind == "fp8":
        part[...] = rng.integers(0, 256, part.shape, dtype=np.uint8)
        np.bitwise_and(part, FP8_FINITE_MASK, out=part)
    else:  # bf16: the top half of an fp32 sample (truncated, not rounded: it is random anyway), uniform in
        x = rng.random(part.shape, dtype=np.float32)  # +-sqrt(3) std: 4x cheaper than normal samples
        x -= 0.5
        x *= 2 * math.sqrt(3) * BF16_STD
        part[...] = (x.view(np.uint32) >> 16).astype(np.uint16)


def _scale_inv(t: Tensor, block: int, seed: tuple) -> torch.Tensor:
    grid = (math.ceil(t.shape[0] / block), math.ceil(t.shape[1] / block))
    jitter = np.random.default_rng(seed).uniform(0.75, 1.25, grid).astype(np.float32)
    return torch.from_numpy(jitter * np.float32(1 / (math.sqrt(t.shape[1]) * CODE_RMS)))


def _shard_tensors(tensors: list[Tensor], block: int, seed: int, first: int, pool: ThreadPoolExecutor) -> dict:
    """The stored tensors of one shard ({key: torch tensor}), the random ones filled by `pool`; tensor i of the
    checkpoint (`first` + its place here) seeds its generators, so the values do not depend on the shard size."""
    arrays, jobs, out = {}, [], {}
    for i, t in enumerate(tensors, start=first):
        if t.kind in ("fp8", "bf16"):
            arrays[t.name] = np.empty(t.shape, np.uint8 if t.kind == "fp8" else np.uint16)
            jobs += [(t, arrays[t.name], rows, (seed, i, 1, rows.start)) for rows in _row_chunks(t)]
    list(pool.map(lambda job: _fill(*job), jobs))
    for i, t in enumerate(tensors, start=first):
        if t.kind == "fp8":
            out[t.name] = torch.from_numpy(arrays[t.name]).view(torch.float8_e4m3fn)
            out[t.name[: -len(".weight")] + ".weight_scale_inv"] = _scale_inv(t, block, (seed, i, 0))
        elif t.kind == "bf16":
            out[t.name] = torch.from_numpy(arrays[t.name]).view(torch.bfloat16)
        else:
            out[t.name] = torch.ones(t.shape, dtype=torch.bfloat16) if t.kind == "norm" else torch.zeros(t.shape)
    return out


def _shards(tensors: list[Tensor], block: int, shard_bytes: int) -> list[list[Tensor]]:
    """Consecutive tensors grouped into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for t in tensors:
        nbytes = t.stored_bytes(block)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def _remove_previous(out: Path) -> int:
    """Delete the checkpoint files a previous write left in `out` (its index, config and the shards the index
    lists), so that a rewrite never needs the disk twice; returns the bytes freed."""
    index, freed = out / "model.safetensors.index.json", 0
    if index.is_file():
        for name in set(json.loads(index.read_text())["weight_map"].values()):
            shard = out / name
            if shard.is_file():
                freed += shard.stat().st_size
                shard.unlink()
        index.unlink()
    (out / "config.json").unlink(missing_ok=True)
    return freed


def _check_disk(out: Path, need: int) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise SystemExit(f"{out}: the checkpoint needs {need / GB:.1f} GB but the disk has {free / GB:.1f} GB free: "
                         "ask for fewer --layers or another --dir")


def write_checkpoint(out: Path, config: dict, shard_bytes: int, seed: int = 0,
                     log: Callable[[str], None] = print) -> float:
    """Write the checkpoint of `config` into `out` one shard at a time (see the module docstring); the index and
    config.json come last, so a directory holding both was written completely. Returns the seconds it took."""
    from safetensors.torch import save_file

    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous(out)
    tensors, block = checkpoint_tensors(config), block_of(config)
    _check_disk(out, sum(t.stored_bytes(block) for t in tensors))
    shards, weight_map, first = _shards(tensors, block, shard_bytes), {}, 0
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for n, shard in enumerate(shards):
            stored = _shard_tensors(shard, block, seed, first, pool)
            name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(stored, str(out / name), metadata={"format": "pt"})
            with open(out / name, "rb") as f:
                os.fsync(f.fileno())
            weight_map.update(dict.fromkeys(stored, name))
            first += len(shard)
            log(f"  wrote {name} ({sum(t.nbytes for t in stored.values()) / GB:.2f} GB, "
                f"{time.perf_counter() - start:.0f}s so far)")
    total = sum(t.stored_bytes(block) for t in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return time.perf_counter() - start


def holds(out: Path, config: dict) -> bool:
    """Whether `out` holds a complete checkpoint written from `config` (same config.json, every shard present)."""
    index, cfg = out / "model.safetensors.index.json", out / "config.json"
    if not (index.is_file() and cfg.is_file()) or json.loads(cfg.read_text()) != json.loads(json.dumps(config)):
        return False
    return all((out / name).is_file() for name in set(json.loads(index.read_text())["weight_map"].values()))


def checkpoint_bytes(out: Path) -> int:
    """Bytes of the shard files the index of `out` lists (what a load reads)."""
    names = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    return sum((out / name).stat().st_size for name in names)

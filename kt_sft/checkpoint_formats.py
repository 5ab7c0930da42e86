"""The checkpoint formats kt-sft reads: how a (possibly quantized) checkpoint stores one linear's weight, and its
exact decoder.

A checkpoint's format comes from config.json's `quantization_config` (`source_format`):

    bf16           no quantization_config: `X.weight` in bf16 / fp16 / fp32
    fp8-block      quant_method fp8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, MiniMax-M2): `X.weight` float8_e4m3fn
                   [N, K] and `X.weight_scale_inv` fp32 [ceil(N/Bn), ceil(K/Bk)]; W = w * scale_inv (a multiplier,
                   despite the name); edge blocks are partial
    fp8-channel    compressed-tensors float-quantized, strategy channel (GLM-4.5-FP8): `X.weight` e4m3 and
                   `X.weight_scale` [N, 1]
    int4-group     compressed-tensors pack-quantized, 4-bit symmetric groups (Kimi-K2-Thinking, K2.5): `X.weight_packed`
                   int32 [N, ceil(K/8)] (nibble i of each int32 at bits 4i, lowest first along K, stored q + 8),
                   `X.weight_scale` [N, ceil(K/G)], `X.weight_shape` [N, K]; W = (nibble - 8) * scale

Tensors a quantized checkpoint leaves unquantized (embeddings, norms, routers, lm_head, compressed-tensors'
`ignore` list) are plain `X.weight`s, which `decode` tells apart by their dtype. `decode` gives W in fp32, computed exactly as fl32(stored value * scale),
the value every engine format then starts from (bf16 rounds it once, int8 quantizes it per channel, fp32 keeps it).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Optional

import torch

# Tensors stored beside a quantized weight (input_scale: static activation scales, which kt-sft does not use).
COMPANION_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_shape", ".input_scale")


class CheckpointFormatError(ValueError):
    """A checkpoint kt-sft cannot read, or a tensor that does not match its format; raised before loading."""


@dataclass(frozen=True)
class SourceFormat:
    """How the quantized linears of one checkpoint are stored (see the module docstring)."""

    name: str                        # bf16, fp8-block, fp8-channel, int4-group
    block: tuple = ()                # fp8-block: (Bn, Bk) rows x columns per scale
    group: int = 0                   # int4-group: weights per scale along K

    @property
    def quantized(self) -> bool:
        return self.name != "bf16"

    @property
    def weight_bytes(self) -> float:
        """Stored bytes per weight of a quantized linear, scales included (for RAM and disk estimates)."""
        if self.name == "fp8-block":
            return 1 + 4 / (self.block[0] * self.block[1])
        if self.name == "int4-group":
            return 0.5 + 2 / self.group
        return 1.0 if self.name == "fp8-channel" else 2.0


def is_companion(key: str) -> bool:
    """A scale / shape tensor that belongs to a quantized weight (read with it, never placed on its own)."""
    return key.endswith(COMPANION_SUFFIXES)


# ---------------------------------------------------------------------------------------------- config.json

def source_format(quant: Optional[dict], where: str = "config.json") -> SourceFormat:
    """The format a checkpoint's `quantization_config` describes; anything else is refused with its name."""
    if not quant:
        return SourceFormat("bf16")
    if not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    method = str(quant.get("quant_method", "unknown"))
    if method == "fp8":
        return _fp8_block_format(quant, where)
    if method == "compressed-tensors":
        return _compressed_tensors_format(quant, where)
    detail = f" ({quant['fmt']})" if quant.get("fmt") else ""
    raise CheckpointFormatError(
        f"{where}: quantization_config.quant_method={method}{detail} is not a format kt-sft reads (it reads bf16/fp16/"
        "fp32, block-FP8 (quant_method fp8) and compressed-tensors FP8 per channel / INT4 pack-quantized); "
        "convert the checkpoint to one of these")


def _fp8_block_format(quant: dict, where: str) -> SourceFormat:
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointFormatError(f"{where}: quantization_config.fmt={fmt!r}: only e4m3 FP8 is supported")
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointFormatError(f"{where}: quantization_config.weight_block_size={block!r}: expected two positive "
                                    "integers [rows, columns] (per-tensor FP8 without blocks is not supported)")
    return SourceFormat("fp8-block", block=tuple(block))


def _compressed_tensors_format(quant: dict, where: str) -> SourceFormat:
    groups = quant.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if len(weights) != 1:
        raise CheckpointFormatError(f"{where}: compressed-tensors with {len(weights)} config_groups; kt-sft reads "
                                    "checkpoints with exactly one weight scheme")
    w, fmt = weights[0], str(quant.get("format", ""))
    kind = (w.get("type"), w.get("num_bits"), w.get("strategy"), bool(w.get("symmetric", True)))
    if fmt == "float-quantized" and kind == ("float", 8, "channel", True):
        return SourceFormat("fp8-channel")
    if fmt == "pack-quantized" and kind[:3] == ("int", 4, "group") and kind[3]:
        group = w.get("group_size")
        if not (isinstance(group, int) and group > 0):
            raise CheckpointFormatError(f"{where}: INT4 group_size={group!r}: expected a positive integer")
        return SourceFormat("int4-group", group=group)
    raise CheckpointFormatError(
        f"{where}: compressed-tensors format={fmt!r} with weights {dict(type=kind[0], num_bits=kind[1], strategy=kind[2], symmetric=kind[3])} "
        "is not a scheme kt-sft reads (it reads float-quantized 8-bit per channel and pack-quantized 4-bit "
        "symmetric groups)")


# ---------------------------------------------------------------------------------------------- decoding

def _check(name: str, t: torch.Tensor, dtypes: tuple, shape: tuple) -> None:
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise CheckpointFormatError(f"{name}: expected {want} {list(shape)}, got {str(t.dtype).replace('torch.', '')} "
                                    f"{list(t.shape)}")


def _expand(scale: torch.Tensor, rows: int, cols: int, n: int, k: int) -> torch.Tensor:
    """Per-element scales [n][k] from one scale per rows x cols block (edge blocks partial)."""
    return scale.repeat_interleave(rows, 0)[:n].repeat_interleave(cols, 1)[:, :k]


def stored_linear(key: str) -> Optional[str]:
    """The linear whose weight `key` stores (`a.b.weight` / `a.b.weight_packed` -> `a.b`); None for other keys."""
    for suffix in (".weight_packed", ".weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def decode(fmt: SourceFormat, key: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """W [N, K] in fp32 of the weight stored under `key` (`X.weight` or `X.weight_packed`), reading it and its scale
    tensors with `get(key)`. A weight stored as a plain float (unquantized in a quantized checkpoint: routers,
    norms, compressed-tensors' `ignore` list) is returned as it is; each companion's dtype and shape is checked
    against the weight, and a mismatch names the tensor."""
    w = get(key)
    linear = stored_linear(key)
    if key.endswith(".weight_packed"):
        if fmt.name != "int4-group":
            raise CheckpointFormatError(f"{key}: a packed INT4 weight in a {fmt.name} checkpoint")
        return _decode_int4(fmt, linear, w, get)
    if w.dtype != torch.float8_e4m3fn:
        return w.float()
    if fmt.name == "fp8-block":
        n, k = w.shape
        bn, bk = fmt.block
        skey = linear + ".weight_scale_inv"
        s = get(skey)
        _check(skey, s, (torch.float32, torch.bfloat16), (math.ceil(n / bn), math.ceil(k / bk)))
        return w.float() * _expand(s.float(), bn, bk, n, k)
    if fmt.name == "fp8-channel":
        skey = linear + ".weight_scale"
        s = get(skey)
        _check(skey, s, (torch.float32, torch.bfloat16, torch.float16), (w.shape[0], 1))
        return w.float() * s.float()
    raise CheckpointFormatError(f"{key}: a float8 weight in a {fmt.name} checkpoint (config.json declares no FP8 "
                                "quantization_config)")


def _decode_int4(fmt: SourceFormat, linear: str, packed: torch.Tensor, get) -> torch.Tensor:
    shape_key, scale_key = linear + ".weight_shape", linear + ".weight_scale"
    shape = get(shape_key)
    if shape.numel() != 2:
        raise CheckpointFormatError(f"{shape_key}: expected 2 values [out, in], got {shape.tolist()}")
    n, k = (int(v) for v in shape.tolist())
    _check(linear + ".weight_packed", packed, (torch.int32,), (n, math.ceil(k / 8)))
    scale = get(scale_key)
    _check(scale_key, scale, (torch.bfloat16, torch.float16, torch.float32), (n, math.ceil(k / fmt.group)))
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [n, k/8, 8]: nibble i of each int32, lowest bits first
    q = nibbles.reshape(n, -1)[:, :k].float() - 8
    return q * _expand(scale.float(), 1, fmt.group, n, k)

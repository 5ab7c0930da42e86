"""Quantized copies of a tiny checkpoint, in the on-disk layouts the flagship models ship (block FP8, compressed-
tensors FP8 per channel, INT4 pack-quantized), and the dequantized fp32 copy stock transformers loads as reference.

`quantize_checkpoint(src, dst, scheme)` rewrites every shard of `src`: each 2-D linear weight that the scheme
quantizes becomes the stored tensors of that layout (scales beside it, same shard), config.json gains the
scheme's `quantization_config`, and the index lists the new keys. `dequantized_checkpoint(dst, ref)` writes what
the quantized checkpoint means in fp32 (decoded by kt_sft.checkpoint_formats, itself checked against element
loops in test_checkpoint_formats.py), with the original config.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kt_sft.checkpoint_formats import decode, is_companion, source_format

FP8_MAX = 448.0
NOT_QUANTIZED = ("embed_tokens", "lm_head", "norm", ".gate.weight", "shared_expert_gate")


def scheme_config(scheme: str, block=(128, 128), group=32) -> dict:
    if scheme == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}
    weights = (dict(num_bits=8, type="float", strategy="channel", symmetric=True) if scheme == "fp8-channel" else
               dict(num_bits=4, type="int", strategy="group", group_size=group, symmetric=True))
    return {"quant_method": "compressed-tensors", "quantization_status": "compressed",
            "format": "float-quantized" if scheme == "fp8-channel" else "pack-quantized",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}, "ignore": ["lm_head"]}


def _quantizes(scheme: str, key: str, t: torch.Tensor) -> bool:
    if t.dim() != 2 or not key.endswith(".weight") or any(s in key for s in NOT_QUANTIZED):
        return False
    return scheme != "int4-group" or ".experts." in key  # Kimi-K2-Thinking: INT4 routed experts only


def _fp8_block(w: torch.Tensor, bn: int, bk: int) -> dict:
    n, k = w.shape
    s = torch.zeros(math.ceil(n / bn), math.ceil(k / bk))
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            s[i, j] = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk].abs().max().clamp(min=1e-12) / FP8_MAX
    scale = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return {".weight": (w / scale).to(torch.float8_e4m3fn), ".weight_scale_inv": s}


def _fp8_channel(w: torch.Tensor) -> dict:
    s = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    return {".weight": (w / s).to(torch.float8_e4m3fn), ".weight_scale": s.bfloat16()}


def _int4(w: torch.Tensor, group: int) -> dict:
    n, k = w.shape
    g = torch.nn.functional.pad(w, (0, -k % group)).view(n, -1, group)
    s = (g.abs().amax(-1) / 7).clamp(min=1e-8).bfloat16()
    q = (g / s.float()[..., None]).round().clamp(-8, 7).view(n, -1)[:, :k].to(torch.int64)
    padded = torch.nn.functional.pad(q + 8, (0, -k % 8)).view(n, -1, 8)
    words = (padded << torch.arange(0, 32, 4)).sum(-1)
    packed = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return {".weight_packed": packed, ".weight_scale": s, ".weight_shape": torch.tensor([n, k], dtype=torch.int32)}


def _quantize(scheme: str, w: torch.Tensor, block, group) -> dict:
    w = w.float()
    if scheme == "fp8-block":
        return _fp8_block(w, *block)
    return _fp8_channel(w) if scheme == "fp8-channel" else _int4(w, group)


def quantize_checkpoint(src, dst, scheme: str, *, block=(128, 128), group=32) -> Path:
    """A copy of checkpoint `src` in `dst` with its linears stored in `scheme` (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    weight_map = {}
    for shard in sorted(src.glob("*.safetensors")):
        out = {}
        with safe_open(str(shard), "pt") as f:
            for key in f.keys():
                t = f.get_tensor(key)
                if not _quantizes(scheme, key, t):
                    out[key] = t
                    continue
                for suffix, v in _quantize(scheme, t, block, group).items():
                    out[key[: -len(".weight")] + suffix] = v
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in out})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = scheme_config(scheme, block, group)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def dequantized_checkpoint(quantized, ref) -> Path:
    """What the quantized checkpoint means, in fp32 with the original config: stock transformers' reference."""
    quantized, ref = Path(quantized), Path(ref)
    shutil.copytree(quantized, ref, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    config = json.loads((quantized / "config.json").read_text())
    fmt = source_format(config.pop("quantization_config"))
    (ref / "config.json").write_text(json.dumps(config, indent=2))
    weight_map = {}
    for shard in sorted(quantized.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out = {}
            for key in f.keys():
                if is_companion(key):
                    continue
                name = key[: -len("_packed")] if key.endswith(".weight_packed") else key
                out[name] = decode(fmt, key, f.get_tensor) if f.get_tensor(key).is_floating_point() or \
                    key.endswith("_packed") else f.get_tensor(key)
        save_file(out, str(ref / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in out})
    (ref / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return ref

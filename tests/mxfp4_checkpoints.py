"""MXFP4 copies of tiny checkpoints (gpt-oss's layout), written by a reference quantizer, with their reference
dequantization: plain torch from the OCP MX spec (E2M1 sign / exponent / mantissa bits, E8M0 scales), nothing of
kt_sft's decoder.

`write_mxfp4(model, dst, ref)` saves `model` (stock save_pretrained) twice: in `ref` with every fused experts
parameter replaced by its MXFP4 round trip (what the MXFP4 checkpoint means, for stock transformers), and in `dst`
the same checkpoint with those parameters stored as MXFP4: `X_blocks` uint8 [E, out, ceil(in/32), 16] and
`X_scales` uint8 [E, out, ceil(in/32)] in place of `X` (out / in: the parameter's output and input dimensions,
transposed first for transposed experts modules such as gpt-oss's [E, H, 2I]), config.json with gpt-oss's
`quantization_config`. Needs fused experts on disk (gpt_oss, qwen3_5_moe_text: save_pretrained writes `X` itself).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

GROUP = 32
E2M1_MAX = 6.0
QUANT_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def e2m1_value(code: torch.Tensor) -> torch.Tensor:
    """The value of each 4-bit code (OCP MX: sign bit 3, exponent bits 2-1 with bias 1, mantissa bit 0; exponent
    0 is subnormal: 0 or 0.5)."""
    sign = 1 - 2 * ((code >> 3) & 1).float()
    exp, man = ((code >> 1) & 3).float(), (code & 1).float()
    normal = (1 + man / 2) * torch.exp2(exp - 1)
    return sign * torch.where(exp == 0, man / 2, normal)


_GRID = e2m1_value(torch.arange(8))  # 0, 0.5, 1, 1.5, 2, 3, 4, 6


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (blocks uint8 [..., N, G, 16], scales uint8 [..., N, G]), G = ceil(K / 32): per group a shared
    exponent floor(log2(amax)) - 2 (E2M1's largest value is 1.5 * 2^2), values rounded to the nearest E2M1 code
    (ties to the lower magnitude), the last group zero-padded."""
    *lead, n, k = w.shape
    g = torch.nn.functional.pad(w.float(), (0, -k % GROUP)).reshape(*lead, n, -1, GROUP)
    amax = g.abs().amax(-1)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -126))) - 2, torch.zeros_like(amax))
    exp = exp.clamp(-127, 127)
    x = (g / torch.exp2(exp)[..., None]).clamp(-E2M1_MAX, E2M1_MAX)
    mag = (x.abs()[..., None] - _GRID).abs().argmin(-1)
    codes = (mag | ((x < 0).long() << 3)).to(torch.uint8).reshape(*lead, n, -1, GROUP // 2, 2)
    blocks = codes[..., 0] | (codes[..., 1] << 4)
    return blocks, (exp + 127).to(torch.uint8)


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """The reference decode, fp32 [..., N, k]: low nibble the even element, E8M0 scale 2^(s - 127)."""
    low, high = e2m1_value(blocks.long() & 15), e2m1_value(blocks.long() >> 4)
    values = torch.stack((low, high), -1).flatten(-2) * torch.exp2(scales.float() - 127)[..., None]
    return values.flatten(-2)[..., :k]


def _experts_params(model) -> dict[str, bool]:
    """{fused experts parameter name: its module is transposed} of every @use_experts_implementation module."""
    out = {}
    for name, module in model.named_modules():
        if hasattr(module, "has_gate") and hasattr(module, "gate_up_proj"):
            for param in ("gate_up_proj", "down_proj"):
                out[f"{name}.{param}"] = bool(module.is_transposed)
    return out


def write_mxfp4(model, dst, ref) -> dict[str, torch.Tensor]:
    """See the module docstring; returns {fused parameter name: its reference dequantization [E, out, in] fp32}."""
    dst, ref = Path(dst), Path(ref)
    params, state, decoded, stored = _experts_params(model), model.state_dict(), {}, {}
    with torch.no_grad():
        for name, transposed in params.items():
            rows = state[name].transpose(1, 2) if transposed else state[name]
            blocks, scales = quantize_mxfp4(rows)
            decoded[name] = dequantize_mxfp4(blocks, scales, rows.shape[-1])
            stored[name] = {f"{name}_blocks": blocks, f"{name}_scales": scales}
            state[name].copy_(decoded[name].transpose(1, 2) if transposed else decoded[name])
    model.save_pretrained(ref, max_shard_size="40KB")
    model.save_pretrained(dst, max_shard_size="40KB")
    _store_as_mxfp4(dst, stored)
    return decoded


def _store_as_mxfp4(dst: Path, stored: dict[str, dict]) -> None:
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(dst / shard), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for name in [k for k in tensors if k in stored]:
            del tensors[name], index["weight_map"][name]
            tensors.update(stored[name])
            index["weight_map"].update({k: shard for k in stored[name]})
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = QUANT_CONFIG
    (dst / "config.json").write_text(json.dumps(config, indent=2))

"""LLaMA-Factory's `from_pretrained` call, answered by kt-sft's loader (see patches.patch_loader).

LLaMA-Factory has already read and patched the config (attention implementation, rope scaling, KV cache,
MoE aux-loss settings) and picked the dtype; we keep all of that and only change where the weights go:
routed experts into the CPU engine, everything else onto the compute device.
"""
from __future__ import annotations

from typing import Any

import torch

from ..load_options import LoadOptions
from ..loader import load_model
from .config import KTSettings, load_fields


def _device(device_map: Any) -> torch.device:
    """LLaMA-Factory passes {"": device} for single-device runs; anything else means "the default device"."""
    if isinstance(device_map, dict) and set(device_map) == {""}:
        return torch.device(device_map[""])
    if isinstance(device_map, (str, torch.device)) and str(device_map) not in ("auto", "balanced", "sequential"):
        return torch.device(device_map)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _dtype(requested: Any, config) -> torch.dtype:
    if isinstance(requested, torch.dtype):
        return requested
    if requested in (None, "auto"):
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if value is None:
            return torch.float32
        return value if isinstance(value, torch.dtype) else getattr(torch, str(value).replace("torch.", ""))
    return getattr(torch, str(requested))


def _logger():
    from llamafactory.extras import logging as lf_logging

    return lf_logging.get_logger("llamafactory.kt_sft")


def load_for_llamafactory(path, kwargs: dict, model_args, settings: KTSettings, is_trainable: bool):
    """Build the model for LLaMA-Factory's `load_class.from_pretrained(**init_kwargs)` call."""
    config = kwargs.get("config")
    dtype = _dtype(kwargs.get("dtype", kwargs.get("torch_dtype", "auto")), config)
    options = LoadOptions(device=_device(kwargs.get("device_map")), dtype=dtype, progress=True,
                          **load_fields(settings))
    # The hook's checks resolved the family already (config.KTSettings.family): not read again here.
    model = load_model(path, options, config=config, family=settings.family)
    _logger().info_rank0(model.kt_summary)
    for adapter in getattr(model_args, "adapter_name_or_path", None) or []:
        check_adapter_fits(adapter, model, path)
    return model


def check_adapter_fits(adapter: str, model, base_path) -> None:
    """Refuse, naming both sides, an adapter whose LoRA factors do not fit this model's modules (PEFT would
    fail later with a bare size-mismatch list, or load silently into nothing when module names differ)."""
    import json
    import os

    from safetensors import safe_open

    config = json.loads(open(os.path.join(adapter, "adapter_config.json")).read())
    trained_on = config.get("base_model_name_or_path") or "an unrecorded base model"
    weights = os.path.join(adapter, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"adapter_name_or_path={adapter!r}: adapter_model.safetensors is missing")
    with safe_open(weights, framework="pt") as f:
        shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    modules = dict(model.named_modules())

    def refuse(detail: str):
        raise ValueError(f"adapter {adapter} (trained on {trained_on}) does not fit model_name_or_path {base_path}: "
                         f"{detail}")

    for key, shape in sorted(shapes.items()):
        for factor in ("lora_A", "lora_B"):
            if f".{factor}." not in key:
                continue
            name = key.split(f".{factor}.")[0].removeprefix("base_model.model.").replace(".base_layer", "")
            module = modules.get(name)
            if module is None:
                refuse(f"it has LoRA weights for {name}, which this model does not have")
            layer = getattr(module, "kt_layer", None)
            if layer is not None:  # expert LoRA (PEFT target_parameters): A [r*E, d1], B [d2, r*E]
                E, H, I = layer.num_experts, layer.hidden_size, layer.intermediate_size
                dims = {(2 * I, H), (H, I)} if factor == "lora_A" else {(H, 2 * I), (I, H)}
                inner, rank_dim = (shape[1], shape[0]) if factor == "lora_A" else (shape[0], shape[1])
                if not any(inner == d[0] for d in dims) or rank_dim % E:
                    refuse(f"{key} is {list(shape)}, but {name} has {E} experts with hidden {H} and intermediate {I}")
                continue
            expected = getattr(module, "in_features", None) if factor == "lora_A" else \
                getattr(module, "out_features", None)
            actual = shape[1] if factor == "lora_A" else shape[0]
            if expected is not None and actual != expected:
                side = "in_features" if factor == "lora_A" else "out_features"
                refuse(f"{name}.{factor} is {list(shape)} but the module has {side}={expected}")

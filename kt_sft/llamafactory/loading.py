"""LLaMA-Factory's `from_pretrained` call, answered by kt-sft's loader (see patches.patch_loader).

LLaMA-Factory has already read and patched the config (attention implementation, rope scaling, KV cache,
MoE aux-loss settings) and picked the dtype; we keep all of that and only change where the weights go:
routed experts into the CPU engine, everything else onto the compute device.
"""
from __future__ import annotations

from typing import Any

import torch

from .. import distributed
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
    # Under FSDP the dense weights load to host RAM: accelerate's fully_shard moves each rank's shard to its GPU.
    options = LoadOptions(device=_device(kwargs.get("device_map")), dtype=dtype, progress=True,
                          dense_device="cpu" if distributed.fsdp() else None, **load_fields(settings))
    # The hook's checks resolved the family already (config.KTSettings.family): not read again here.
    model = load_model(path, options, config=config, family=settings.family)
    _logger().info_rank0(model.kt_summary)
    return model  # adapters were checked against this model (built on meta) by the hook's checks (preflight)


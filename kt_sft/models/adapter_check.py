"""A PEFT adapter directory checked against a model before PEFT reads a weight of it.

`check_adapter(adapter, model, base)` runs on the model kt-sft would load, built on the meta device (the hook's
checks, before anything loads) or on a loaded engine model (`expert_lora.load_adapter`): the directory is complete
(adapter_config.json, an adapter_model.safetensors whose header covers the file: a save cut short is named with its
path and what to do), and every LoRA factor fits its module: in/out features of a linear, and for expert LoRA (PEFT
`target_parameters`, docs/expert_lora_format.md: lora_A [r*E, d1], lora_B [d2, r*E]) the experts' hidden and
intermediate sizes and the expert count E, from the rank r the adapter's config declares. PEFT itself would fail
later with a bare "size mismatch" list, or load silently into nothing where module names differ.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from torch import nn

from ..checkpoint_files import open_safetensors

FACTORS = ("lora_A", "lora_B")
REDO = "re-save the adapter (or, for a training checkpoint-N, delete that directory and resume from an earlier one)"


def adapter_shapes(adapter) -> tuple[dict, dict]:
    """(adapter_config.json, key -> shape of adapter_model.safetensors) from the headers, each file checked whole."""
    folder = Path(adapter)
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(f"adapter_name_or_path={str(adapter)!r}: no adapter_config.json there; give the "
                                "output_dir (or a checkpoint-N directory) of a LoRA training run")
    try:
        config = json.loads(config_file.read_text())
    except ValueError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}): {REDO}") from None
    if not weights.is_file():
        raise FileNotFoundError(f"adapter_name_or_path={str(adapter)!r}: adapter_model.safetensors is missing; {REDO}")
    with open_safetensors(weights, "adapter file", REDO) as f:
        return config, {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def expert_dims(module: nn.Module) -> Optional[tuple[int, int, int]]:
    """(experts, hidden, intermediate) of a routed-experts module: an engine one (`kt_layer`) or one built on meta
    (its fused gate_up_proj [E, 2I, H]); None for any other module."""
    layer = getattr(module, "kt_layer", None)
    if layer is not None:
        return layer.num_experts, layer.hidden_size, layer.intermediate_size
    gate_up = module._parameters.get("gate_up_proj")
    if gate_up is not None and gate_up.dim() == 3 and "down_proj" in module._parameters:
        return gate_up.shape[0], gate_up.shape[2], gate_up.shape[1] // 2
    return None


def check_adapter(adapter, model: nn.Module, base) -> None:
    """Refuse, naming the adapter, the base it was trained on and this model, an adapter that is incomplete or whose
    LoRA factors do not fit this model's modules."""
    config, shapes = adapter_shapes(adapter)
    trained_on = config.get("base_model_name_or_path") or "an unrecorded base model"
    ranks = {int(config.get("r") or 8), *(int(v) for v in (config.get("rank_pattern") or {}).values())}
    modules = dict(model.named_modules())

    def refuse(detail: str):
        raise ValueError(f"adapter {adapter} (trained on {trained_on}) does not fit model_name_or_path {base}: "
                         f"{detail}")

    for key, shape in sorted(shapes.items()):
        factor = next((f for f in FACTORS if f".{f}." in key), None)
        if factor is None:
            continue
        name = key.split(f".{factor}.")[0].removeprefix("base_model.model.").replace(".base_layer", "")
        module = modules.get(name)
        if module is None:
            refuse(f"it has LoRA weights for {name}, which this model does not have")
        dims = expert_dims(module)
        problem = _expert_factor_problem(factor, shape, dims, ranks) if dims else _linear_factor_problem(
            factor, shape, module)
        if problem:
            refuse(f"{key} is {list(shape)}, but {name} {problem}")


def _expert_factor_problem(factor: str, shape: tuple, dims: tuple, ranks: set) -> Optional[str]:
    """Why an expert LoRA factor does not fit experts of `dims` (None: it fits). lora_A [r*E, d1], lora_B [d2, r*E]
    with (d1, d2) = (2I, H) for gate_up_proj, (H, I) for down_proj."""
    E, H, I = dims
    sizes = {(2 * I, H), (H, I)} if factor == "lora_A" else {(H, 2 * I), (I, H)}
    inner, rank_dim = (shape[1], shape[0]) if factor == "lora_A" else (shape[0], shape[1])
    what = f"has {E} experts with hidden size {H} and intermediate size {I}"
    if not any(inner == d[0] for d in sizes):
        return f"{what} (the adapter was trained on other expert sizes)"
    if rank_dim not in {r * E for r in ranks}:
        r = min(ranks)
        trained = f" = r {r} x {rank_dim // r} experts" if rank_dim % r == 0 else ""
        return (f"{what}: the rank dimension is {rank_dim}{trained}, this model needs r x {E} = "
                f"{' or '.join(str(r * E) for r in sorted(ranks))} (the adapter was trained on a model with another "
                "expert count)")
    return None


def _linear_factor_problem(factor: str, shape: tuple, module: nn.Module) -> Optional[str]:
    side = "in_features" if factor == "lora_A" else "out_features"
    expected = getattr(module, side, None)
    actual = shape[1] if factor == "lora_A" else shape[0]
    if expected is not None and actual != expected:
        return f"has {side}={expected}"
    return None

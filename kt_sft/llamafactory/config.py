"""The `kt_*` config surface: which keys a LLaMA-Factory YAML may carry with `use_kt: true`, what they mean, and
the checks that run before any weight is loaded.

LLaMA-Factory 0.9.5 declares a few KT fields itself (`use_kt`, `kt_weight_path`, `kt_expert_checkpoint_path`,
`kt_use_lora_experts`, `kt_lora_expert_num`, `kt_lora_expert_intermediate_size`); the other keys users carry over
from KTransformers configs (`kt_optimize_rule`, `cpu_infer`, `chunk_size`, `kt_backend`, `kt_num_threads`, ...)
are not LLaMA-Factory fields, so the hook takes them out of the arguments before LLaMA-Factory parses them
(`split_kt_keys`) and validates everything together once the dataclasses exist (`resolve`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from ..engine.formats import ExpertFormat, backend_names, get_format

# key -> what it means (README's key table is generated from the same words).
KEYS: dict[str, str] = {
    "use_kt": "Turn the CPU expert engine on (LLaMA-Factory's own switch; the hook also needs USE_KT=1).",
    "kt_optimize_rule": "Model family rule: a family name (e.g. qwen3_moe) or a family YAML (kt_sft/models/families "
                        "format). Default: picked from config.json's model_type.",
    "kt_backend": "Expert weight format and GEMMs: AMXBF16 (default; bf16, runs on amx/avx512/avx2/scalar, "
                  "whichever the CPU has), AMXINT8 (int8 weights with one scale per output channel, quantized "
                  "while loading: half the RAM; the GEMMs run in int8 too, activations quantized per row: AMX's "
                  "int8 rate, other CPUs run it slowly), INT8 (the same int8 weights, GEMMs in bf16: exact "
                  "dequantized math, fast on every path) or FP32 (exact fp32 experts, for parity checks).",
    "kt_num_threads": "CPU engine threads. 0 / unset: KT_SFT_THREADS, else the physical cores of the CPU set.",
    "cpu_infer": "KTransformers' name for kt_num_threads (same meaning; give one or equal values).",
    "chunk_size": "Most tokens per engine call: longer micro-batches are split, bounding the engine's scratch "
                  "memory. 0 / unset: the whole micro-batch in one call.",
    "kt_cpu_activation": "retain (default): a gradient-checkpoint recompute reuses the CPU experts' forward instead "
                         "of running it again; recompute: run it again (less host RAM, more CPU time).",
    "kt_gpu_experts": "Fraction (0..1) of each MoE layer's routed experts that training / prefill calls of >= 1024 "
                      "tokens compute on the GPU, their weights streamed from RAM per call while the CPU engine "
                      "runs the rest (default 0: all on the CPU). Costs GPU memory for a few experts at a time.",
    "kt_max_cache_depth": "Forward results each MoE layer keeps for backward (default 4; raise it if an error says "
                          "a saved forward was evicted). A chunk_size split raises it, per layer, to the number of "
                          "calls a batch needs.",
    "kt_expert_checkpoint_path": "Directory whose safetensors hold the routed-expert tensors when they are not in "
                                 "model_name_or_path (same key names). Default: model_name_or_path.",
    "kt_weight_path": "Pre-quantized KTransformers .kt expert files: not supported (kt-sft reads safetensors).",
    "kt_use_lora_experts": "kt-kernel's extra GPU-side 'LoRA experts': not supported; must be false or unset.",
    "kt_lora_expert_num": "Belongs to kt_use_lora_experts: not supported; must be unset.",
    "kt_lora_expert_intermediate_size": "Belongs to kt_use_lora_experts: not supported; must be unset.",
}

# Keys LLaMA-Factory 0.9.5 parses itself (fields of its ModelArguments).
LLAMAFACTORY_FIELDS = {"use_kt", "kt_weight_path", "kt_expert_checkpoint_path", "kt_use_lora_experts",
                       "kt_lora_expert_num", "kt_lora_expert_intermediate_size"}
# Not `kt_`-prefixed, but ours when present.
EXTRA_KEYS = {"cpu_infer", "chunk_size"}
# KTransformers (gen 1) keys with no kt-sft meaning: say what to use instead.
RETIRED: dict[str, str] = {
    "kt_maxlen": "use LLaMA-Factory's cutoff_len",
    "kt_use_cuda_graph": "kt-sft does not capture CUDA graphs; remove the key",
    "kt_force_think": "use a thinking template (e.g. template: qwen3) instead",
    "kt_mode": "remove the key: kt-sft has one training mode",
    "kt_share_cache_pool": "remove the key: kt-sft shares engine scratch across layers always",
}
SUPPORTED_STAGES = ("sft", "pt")


class KTConfigError(ValueError):
    """A `kt_*` key or an argument combination kt-sft cannot run; raised before any weight is loaded."""


@dataclasses.dataclass
class KTSettings:
    """What the loader and engine need, resolved from the YAML (see KEYS for the meaning of each field)."""

    rule: Optional[str] = None
    format: Optional[ExpertFormat] = None  # None = the family default / fp32 model
    threads: int = 0
    chunk_size: int = 0
    retain_activations: bool = True
    max_cache_depth: int = 4
    expert_path: Optional[str] = None
    loss_chunk_tokens: Optional[int] = None  # None = load_model's default; 0 = stock loss with full logits
    gpu_experts: float = 0.0


def _is_ours(key: str) -> bool:
    return (key.startswith("kt_") and key not in LLAMAFACTORY_FIELDS) or key in EXTRA_KEYS


def split_kt_keys(args: Any) -> tuple[Any, dict[str, Any]]:
    """Remove our keys from LLaMA-Factory's raw arguments (a dict from YAML, or an argv list).

    Returns (args without our keys, our keys). Unknown `kt_*` keys are kept in ours so `resolve` can name them.
    """
    ours: dict[str, Any] = {}
    if isinstance(args, dict):
        rest = {k: v for k, v in args.items() if not _is_ours(k)}
        ours = {k: v for k, v in args.items() if _is_ours(k)}
        return rest, ours
    if isinstance(args, (list, tuple)):
        rest, i = [], 0
        while i < len(args):
            item = str(args[i])
            key = item[2:].split("=", 1)[0] if item.startswith("--") else None
            if key is not None and _is_ours(key):
                if "=" in item:
                    ours[key] = item.split("=", 1)[1]
                elif i + 1 < len(args) and not str(args[i + 1]).startswith("--"):
                    ours[key] = args[i + 1]
                    i += 1
                else:
                    ours[key] = True
            else:
                rest.append(args[i])
            i += 1
        return rest, ours
    return args, ours


def _as_int(key: str, value: Any, minimum: int) -> int:
    """An int, or a string of digits (YAML/CLI overrides); not a bool, a float or anything else."""
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or text.lstrip("-").isdigit()) \
            or int(text) < minimum:
        raise KTConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
    return int(text)


def _settings_from_keys(keys: dict[str, Any], model_args) -> KTSettings:
    settings = KTSettings()
    unknown = sorted(k for k in keys if k not in KEYS and k not in RETIRED)
    if unknown:
        accepted = ", ".join(sorted(KEYS))
        raise KTConfigError(f"unknown kt-sft key(s) {', '.join(unknown)}; accepted keys: {accepted} "
                            "(meanings in README.md, 'Config keys')")
    for key in sorted(k for k in keys if k in RETIRED):
        raise KTConfigError(f"{key} is a KTransformers key kt-sft does not use: {RETIRED[key]}")

    if keys.get("kt_optimize_rule") not in (None, ""):
        settings.rule = str(keys["kt_optimize_rule"])
    backend = keys.get("kt_backend")
    if backend not in (None, ""):
        name = str(backend).strip().upper()
        if name not in backend_names():
            raise KTConfigError(f"kt_backend: {backend!r} is not one of {', '.join(backend_names())}")
        settings.format = get_format(name)

    threads = {k: _as_int(k, keys[k], 0) for k in ("kt_num_threads", "cpu_infer") if keys.get(k) is not None}
    if len(set(threads.values())) > 1:
        raise KTConfigError(f"kt_num_threads={threads['kt_num_threads']} and cpu_infer={threads['cpu_infer']} "
                            "disagree; they are the same setting, give one")
    settings.threads = next(iter(threads.values()), 0)
    if keys.get("chunk_size") is not None:
        settings.chunk_size = _as_int("chunk_size", keys["chunk_size"], 0)
    if keys.get("kt_max_cache_depth") is not None:
        settings.max_cache_depth = _as_int("kt_max_cache_depth", keys["kt_max_cache_depth"], 1)
    if keys.get("kt_gpu_experts") is not None:
        value = keys["kt_gpu_experts"]
        try:
            fraction = float(value)
        except (TypeError, ValueError):
            fraction = -1.0
        if isinstance(value, bool) or not 0.0 <= fraction <= 1.0:
            raise KTConfigError(f"kt_gpu_experts: expected a fraction between 0 and 1, got {value!r}")
        settings.gpu_experts = fraction
    activation = keys.get("kt_cpu_activation")
    if activation not in (None, ""):
        if str(activation) not in ("retain", "recompute"):
            raise KTConfigError(f"kt_cpu_activation: expected retain or recompute, got {activation!r}")
        settings.retain_activations = str(activation) == "retain"

    # LLaMA-Factory's own KT fields (already parsed into model_args).
    if getattr(model_args, "kt_weight_path", None):
        raise KTConfigError(f"kt_weight_path={model_args.kt_weight_path!r}: pre-quantized .kt expert files are not "
                            "supported; point model_name_or_path at the safetensors checkpoint and remove the key")
    if getattr(model_args, "kt_use_lora_experts", None):
        raise KTConfigError("kt_use_lora_experts: kt-kernel's GPU-side LoRA experts are not supported; remove the "
                            "key (LoRA targets come from lora_target)")
    for key in ("kt_lora_expert_num", "kt_lora_expert_intermediate_size"):
        if getattr(model_args, key, None) is not None:
            raise KTConfigError(f"{key} belongs to kt_use_lora_experts, which kt-sft does not support; remove it")
    expert_path = getattr(model_args, "kt_expert_checkpoint_path", None)
    if expert_path:
        if not os.path.isdir(expert_path):
            raise KTConfigError(f"kt_expert_checkpoint_path={expert_path!r} is not a directory")
        settings.expert_path = str(expert_path)
    return settings


def resolve(keys: dict[str, Any], model_args, finetuning_args=None, training_args=None) -> Optional[KTSettings]:
    """Validate our keys against LLaMA-Factory's parsed arguments; the settings when use_kt is on, else None."""
    if not getattr(model_args, "use_kt", False):
        if keys:
            raise KTConfigError(f"{', '.join(sorted(keys))} given but use_kt is false: set use_kt: true to train "
                                "with the CPU expert engine, or remove the kt-sft keys")
        return None
    settings = _settings_from_keys(keys, model_args)
    if finetuning_args is not None:
        if finetuning_args.finetuning_type != "lora":
            raise KTConfigError(f"finetuning_type={finetuning_args.finetuning_type!r} with use_kt: kt-sft trains "
                                "LoRA adapters only (the routed experts are frozen); set finetuning_type: lora")
        if training_args is not None and getattr(training_args, "do_train", False) \
                and finetuning_args.stage not in SUPPORTED_STAGES:
            raise KTConfigError(f"stage={finetuning_args.stage!r} with use_kt: supported stages are "
                                f"{', '.join(SUPPORTED_STAGES)}")
        if getattr(finetuning_args, "use_asft_loss", False):
            settings.loss_chunk_tokens = 0  # ASFT reads the training forward's logits (labels passed along)
    if getattr(model_args, "quantization_bit", None) is not None:
        raise KTConfigError("quantization_bit with use_kt: the routed experts are already in CPU RAM; remove "
                            "quantization_bit (for int8 experts use kt_backend: AMXINT8)")
    if getattr(model_args, "train_from_scratch", False):
        raise KTConfigError("train_from_scratch with use_kt: kt-sft fine-tunes an existing checkpoint")
    if getattr(model_args, "use_unsloth", False):
        raise KTConfigError("use_unsloth with use_kt: both replace model loading; remove use_unsloth")
    backend = str(getattr(model_args, "infer_backend", "huggingface") or "huggingface")
    if backend.lower() not in ("huggingface", "hf", "enginename.hf"):
        raise KTConfigError(f"infer_backend={backend!r} with use_kt: the CPU expert engine serves through "
                            "infer_backend: huggingface (vLLM/SGLang would load the whole model themselves)")
    if getattr(model_args, "mixture_of_depths", None):
        raise KTConfigError("mixture_of_depths with use_kt is not supported; remove it")
    if training_args is not None:
        _check_training(training_args)
    _check_model(model_args, settings)
    return settings


def _check_model(model_args, settings: KTSettings) -> None:
    """A local checkpoint of a supported family (kt-sft never downloads), checked before anything is loaded."""
    import json

    from ..models.registry import UnsupportedModelError, get_family

    path = getattr(model_args, "model_name_or_path", None)
    config_file = os.path.join(str(path), "config.json")
    if not path or not os.path.isfile(config_file):
        raise KTConfigError(f"model_name_or_path={path!r}: use_kt needs a local Hugging Face checkpoint directory "
                            "(config.json + *.safetensors); kt-sft does not download models")
    try:
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
    except ValueError as err:
        raise KTConfigError(f"{config_file} is not valid JSON: {err}") from err
    try:
        get_family(model_type, settings.rule)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as err:
        raise KTConfigError(f"model_name_or_path={path!r}: {err}") from err
    for adapter in getattr(model_args, "adapter_name_or_path", None) or []:
        if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
            raise KTConfigError(f"adapter_name_or_path={adapter!r}: no adapter_config.json there; give the output_dir "
                                "(or a checkpoint-N directory) of a LoRA training run")


def _check_training(training_args) -> None:
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(training_args, "deepspeed", None) and is_deepspeed_zero3_enabled():
        raise KTConfigError("DeepSpeed ZeRO-3 with use_kt: ZeRO-3 shards parameters across GPUs but the routed "
                            "experts live in CPU RAM outside it; use ZeRO-2 / no DeepSpeed")
    if getattr(training_args, "fsdp", None):
        raise KTConfigError("FSDP with use_kt is not supported; remove the fsdp keys")
    if getattr(training_args, "world_size", 1) > 1:
        raise KTConfigError(f"use_kt runs one training process per machine, but world_size="
                            f"{training_args.world_size}: launch without torchrun / FORCE_TORCHRUN")
    if getattr(training_args, "n_gpu", 1) > 1:
        raise KTConfigError(f"{training_args.n_gpu} GPUs are visible and the Trainer would replicate the model "
                            "over them (DataParallel); kt-sft uses one GPU: set CUDA_VISIBLE_DEVICES=0")

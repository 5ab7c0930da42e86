"""`LoadOptions`: what `load_model` can be told besides the checkpoint, each field checked here, once, before
anything is read.

`load_model(path, options, **fields)` takes a LoadOptions, field names as keywords on top of it, or both
(`load_model(path, dtype=torch.float32, format="bf16")`); an unknown name is a TypeError naming it.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .engine.formats import FormatLike, get_format
from .engine.runtime import NumaSetting, numa_setting
from .models.chunked_loss import DEFAULT_CHUNK_TOKENS, check_chunk_tokens

PathLike = Union[str, os.PathLike]


@dataclass(frozen=True)
class LoadOptions:
    """device: where everything but the routed experts goes (default: cuda if available, else cpu; a bare "cuda"
    becomes the current CUDA device).
    dtype: dtype of those non-expert weights.
    format: the experts' format (kt_sft.engine.formats: an ExpertFormat, its name or a kt_backend name; default:
    fp32 when dtype is float32, exact from any checkpoint; else for a quantized checkpoint the smallest format at
    least as wide as its weights, its own element type first (fp8 from FP8, int4 from INT4, codes and scales kept
    as stored), never silently bf16; else a rule file's defaults.format, bf16 without one); "int8" stores the experts as
    int8 with per-channel scales, quantized while loading (half the RAM of bf16), "int8-gemm" also runs the GEMMs
    in int8 (fast on AMX).
    int4_group: weights per scale along the input dimension when int4 / int4-gemm experts are quantized while
    loading (from bf16 or FP8 weights; symmetric, the last group of a row partial when it does not divide the
    size). None: the int4 row's own groups of 32, or an INT4 checkpoint's own groups, which are kept exactly (any
    other value is refused for such a checkpoint, as is a value with a format that is not int4).
    rule: a family rule YAML (configs/*.yaml format) replacing the rule derived from the model, or the
    checkpoint's own model_type (kt_optimize_rule).
    threads: engine worker threads (0 = a rule file's defaults.threads, else 'auto': KT_SFT_THREADS or
    the physical cores).
    max_saved: forwards each layer keeps for backward at once (kt_max_cache_depth).
    check_memory: refuse to load when host RAM (packed experts + 10 % + one shard) or GPU memory (non-expert
    weights) is short, naming the expert formats that would fit; False skips the check.
    progress: show a progress bar over the shards.
    expert_path: a directory whose safetensors hold the routed-expert tensors (default: the checkpoint); expert
    keys are then read only from there and everything else only from the checkpoint.
    chunk_size: most tokens per engine call (longer inputs are split; 0 = no limit).
    retain_activations: keep the experts' forward for gradient checkpointing's recompute pass (see
    kt_sft.models.experts); False runs the CPU experts again instead.
    loss_chunk_tokens: in training (train mode, grad enabled, `labels` given) compute the causal-LM loss from
    lm_head in chunks of this many tokens, each recomputed in backward, so the [tokens, vocab] logits are never
    materialized (kt_sft.models.chunked_loss; same loss and gradients as stock). Such a forward returns
    `logits=None`; eval, generate and label-less calls are stock. 0 = off (stock loss, full logits).
    gpu_experts: how many of each MoE layer's routed experts calls of >= 1024 tokens on a CUDA `device` compute
    on the GPU, streaming their weights from the engine's RAM per call (kt_sft.engine.gpu_share) while the CPU
    engine runs the rest: "auto" (default): per call, the experts with the most rows, as many as make both sides
    finish together by the rates measured on the calls so far (kt_sft.engine.share_plan); a fraction F in (0, 1]:
    the last F x E experts on every call; 0 = off (everything on the CPU engine). Ignored without a CUDA device.
    numa: the NUMA nodes the engine runs on (kt_sft.engine.set_numa): "auto" (the nodes this process's cpus span),
    "off" (one node), or a node count (N > 1 on a one-node host: N virtual nodes, for testing). Each layer's experts
    are cut into one contiguous range per node, their weights in that node's memory and their tasks run by its
    pinned workers first. None: KT_SFT_NUMA (default auto), or what set_numa last set.
    dense_device: where the non-expert weights go while loading (default: device). "cpu" under FSDP: its
    `fully_shard` then moves each rank's shard to `device`, so a dense part larger than one GPU loads; `device`
    stays where the model computes (the GPU share, the memory check's GPU).
    """

    device: Union[str, torch.device, None] = None
    dtype: torch.dtype = torch.bfloat16
    format: Optional[FormatLike] = None
    rule: Optional[PathLike] = None
    threads: int = 0
    max_saved: int = 4
    check_memory: bool = True
    progress: bool = True
    expert_path: Optional[PathLike] = None
    chunk_size: int = 0
    retain_activations: bool = True
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    gpu_experts: Union[float, str] = "auto"
    int4_group: Optional[int] = None
    numa: Optional[NumaSetting] = None
    dense_device: Union[str, torch.device, None] = None

    def __post_init__(self) -> None:
        # Frozen: the normalized fields (device with its index, format as an ExpertFormat, numa) are set here, once.
        object.__setattr__(self, "device", _device(self.device))
        dense = self.device if self.dense_device is None else _device(self.dense_device)
        object.__setattr__(self, "dense_device", dense)
        if self.format is not None:
            object.__setattr__(self, "format", get_format(self.format))
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {self.dtype!r}")
        for name, minimum in (("threads", 0), ("max_saved", 1), ("chunk_size", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
        for name in ("check_memory", "progress", "retain_activations"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}: expected True or False, got {getattr(self, name)!r}")
        for name in ("rule", "expert_path"):
            if not (getattr(self, name) is None or isinstance(getattr(self, name), (str, os.PathLike))):
                raise TypeError(f"{name}: expected a path, got {getattr(self, name)!r}")
        check_chunk_tokens(self.loss_chunk_tokens)
        if self.gpu_experts != "auto" and (isinstance(self.gpu_experts, bool) or not (
                isinstance(self.gpu_experts, (int, float)) and 0.0 <= self.gpu_experts <= 1.0)):
            raise ValueError(f"gpu_experts must be 'auto' or a fraction in [0, 1], got {self.gpu_experts!r}")
        self._check_int4_group()
        if self.numa is not None:
            object.__setattr__(self, "numa", numa_setting(self.numa, "numa"))

    def _check_int4_group(self) -> None:
        """A positive group size, which a format given with its own int4 grid must not contradict."""
        group = self.int4_group
        if group is None:
            return
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"int4_group: expected an integer >= 1 (weights per scale along the input dimension), "
                             f"got {group!r}")
        fmt = self.format
        if fmt is not None and fmt.weight_dtype == torch.int4 and fmt.scale_block not in (
                get_format(fmt.name).scale_block, (1, group)):
            raise ValueError(f"format {fmt.label} and int4_group={group} give two int4 grids; give one")


def _device(device) -> torch.device:
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device ({err})") from None
    if device.type == "cuda" and device.index is None:  # tensors' devices carry an index: compare like with like
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_options(options: Optional[LoadOptions], fields: dict) -> LoadOptions:
    """`options` (default: LoadOptions()) with `fields` set on top; an unknown field name is a TypeError."""
    names = [f.name for f in dataclasses.fields(LoadOptions)]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise TypeError(f"load_model() got unexpected keyword argument(s) {', '.join(unknown)}; "
                        f"its options are {', '.join(names)} (kt_sft.load_options.LoadOptions)")
    if options is None:
        return LoadOptions(**fields)
    if not isinstance(options, LoadOptions):
        raise TypeError(f"options: expected a kt_sft.load_options.LoadOptions, got {type(options).__name__}")
    return dataclasses.replace(options, **fields) if fields else options

"""`load_model`: a stock transformers MoE model whose routed experts live in the CPU engine.

The model is built on the meta device from config.json; non-expert tensors are loaded onto the compute device
(CUDA when there is one, else CPU); routed-expert tensors stream shard by shard (safetensors mmap) straight into
each layer's packed engine buffers, converted to the engine dtype, so host RAM peaks near the packed experts
plus one shard. Which tensors are experts is the model registry's business (kt_sft/models).
"""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Optional

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.conversion_mapping import get_model_conversion_mapping

from . import engine
from .engine.formats import ExpertFormat, FormatLike, for_model_dtype, get_format
from .models.chunked_loss import DEFAULT_CHUNK_TOKENS, check_chunk_tokens, install_chunked_loss
from .models.experts import attach_engine, use_engine
from .models.registry import MoEFamily, get_family

logger = logging.getLogger(__name__)

GB = 1024 ** 3


def _shards(path: Path) -> tuple[list[Path], dict[str, str]]:
    """Shard files and, when an index exists, its key -> file map."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({path / f for f in weight_map.values()})
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files (kt-sft loads safetensors checkpoints only)")
    return files, {}


def _open(shard: Path):
    if not shard.is_file():
        raise FileNotFoundError(f"checkpoint shard {shard} listed in the index does not exist")
    try:
        return safe_open(str(shard), framework="pt", device="cpu")
    except Exception as err:  # safetensors raises its own error type for truncated/corrupt headers
        raise ValueError(f"checkpoint shard {shard} is unreadable (truncated or corrupt?): {err}") from err


def _check_config(path: Path, config) -> None:
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else type(quant).__name__
        fmt = quant.get("fmt", "") if isinstance(quant, dict) else ""
        raise ValueError(f"{path} is a quantized checkpoint (quant_method={method}{' ' + fmt if fmt else ''}); "
                         "kt-sft loads bf16/fp16/fp32 checkpoints today: convert it to bf16 first")


def _experts_modules(model: torch.nn.Module, family: MoEFamily) -> dict[int, torch.nn.Module]:
    pattern = family.experts_module_regex()
    found, elsewhere, unfused = {}, [], []
    for name, module in model.named_modules():
        m = pattern.match(name)
        if not ("gate_up_proj" in module._parameters and "down_proj" in module._parameters):
            if m:
                unfused.append(name)
            continue
        if m:
            found[int(m["layer"])] = module
        else:
            elsewhere.append(name)
    if not found and elsewhere:
        raise ValueError(f"no experts module matches {family.experts_module!r} in this {type(model).__name__} "
                         f"(rule {family.source}), whose experts modules are at {', '.join(elsewhere[:2])}"
                         f"{', ...' if len(elsewhere) > 2 else ''}; check experts_module in the rule file")
    if not found and unfused:
        raise ValueError(f"{unfused[0]} ({type(model).__name__}, rule {family.source}) holds no fused gate_up_proj / "
                         "down_proj expert parameters: kt-sft runs transformers 5's fused experts modules "
                         "(@use_experts_implementation); check experts_module in the rule file")
    if not found:
        raise ValueError(f"this {type(model).__name__} has no routed-expert (MoE) layers: every layer of its config "
                         "is dense (e.g. first_k_dense_replace, mlp_only_layers or decoder_sparse_step cover all "
                         "layers), so there is nothing to offload; load it without kt-sft (unset USE_KT)")
    return found


def _free_host_bytes() -> Optional[int]:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _check_memory(expert_bytes: int, dense_bytes: int, largest_shard: int, device: torch.device) -> None:
    host_need = int(expert_bytes * 1.1) + largest_shard + (dense_bytes if device.type == "cpu" else 0)
    free = _free_host_bytes()
    if free is not None and host_need > free:
        raise MemoryError(f"loading needs about {host_need / GB:.1f} GB of host RAM (experts {expert_bytes / GB:.1f} GB "
                          f"packed + 10% + one shard {largest_shard / GB:.1f} GB) but {free / GB:.1f} GB is "
                          "available; free memory or use a machine with more RAM (KT_SFT_SKIP_MEMORY_CHECK=1 skips this)")
    if device.type == "cuda":
        free_gpu, _ = torch.cuda.mem_get_info(device)
        if dense_bytes > free_gpu:
            raise MemoryError(f"the non-expert weights need {dense_bytes / GB:.1f} GB on {device} but only "
                              f"{free_gpu / GB:.1f} GB is free (KT_SFT_SKIP_MEMORY_CHECK=1 skips this)")


class _Placer:
    """Puts non-expert checkpoint tensors into the meta model under their in-memory names."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        conversions = get_model_conversion_mapping(model)
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.meta_state = model.state_dict()
        self.fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) | \
            set(getattr(model, "_keep_in_fp32_modules", None) or [])
        self.unexpected: list[str] = []

    def name_of(self, key: str) -> Optional[str]:
        name, _ = rename_source_key(key, self.renamings, [], self.model.base_model_prefix, self.meta_state)
        return name if name in self.meta_state else None

    def place(self, name: str, tensor: torch.Tensor) -> None:
        dtype = None
        if tensor.is_floating_point():
            keep32 = any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in self.fp32)
            dtype = torch.float32 if keep32 else self.dtype
        set_module_tensor_to_device(self.model, name, self.device, value=tensor, dtype=dtype)


def load_model(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.bfloat16,
    format: FormatLike | None = None,
    rule: str | os.PathLike | None = None,
    threads: int = 0,
    max_saved: int = 4,
    check_memory: bool = True,
    progress: bool = True,
    config=None,
    expert_path: str | os.PathLike | None = None,
    chunk_size: int = 0,
    retain_activations: bool = True,
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    gpu_experts: float = 0.0,
):
    """Load a Hugging Face MoE checkpoint directory with the routed experts on the CPU engine.

    device: where everything but the routed experts goes (default: cuda if available, else cpu).
    dtype: dtype of those non-expert weights. format: the experts' format (kt_sft.engine.formats: an ExpertFormat,
    its name or a kt_backend name; default: fp32 when dtype is float32, else the family file's
    defaults.engine_dtype, bf16); "int8" stores the experts as int8 with per-channel scales, quantized while
    loading (half the RAM of bf16), "int8-gemm" also runs the GEMMs in int8 (fast on AMX).
    rule: a family YAML overriding the built-in registry entry (kt_optimize_rule).
    threads: engine worker threads (0 = the family file's defaults.threads; 'auto' = KT_SFT_THREADS or physical cores).
    config: an already loaded (and possibly patched, e.g. by LLaMA-Factory) config of this checkpoint.
    expert_path: a directory whose safetensors hold the routed-expert tensors (default: `path`); expert keys
    are then read only from there and everything else only from `path`.
    chunk_size: most tokens per engine call (longer inputs are split; 0 = no limit).
    retain_activations: keep the experts' forward for gradient checkpointing's recompute pass (see
    kt_sft.models.experts); False runs the CPU experts again instead.
    loss_chunk_tokens: in training (train mode, grad enabled, `labels` given) compute the causal-LM loss from
    lm_head in chunks of this many tokens, each recomputed in backward, so the [tokens, vocab] logits are never
    materialized (kt_sft.models.chunked_loss; same loss and gradients as stock). Such a forward returns
    `logits=None`; eval, generate and label-less calls are stock. 0 = off (stock loss, full logits).
    gpu_experts: fraction of each MoE layer's routed experts that calls of >= 1024 tokens on a CUDA `device`
    compute on the GPU, streaming their weights from the engine's RAM per call (kt_sft.engine.gpu_share); the
    rest runs on the CPU engine at the same time. 0 = off (everything on the CPU engine).
    """
    loss_chunk_tokens = check_chunk_tokens(loss_chunk_tokens)
    if not (isinstance(gpu_experts, (int, float)) and 0.0 <= gpu_experts <= 1.0):
        raise ValueError(f"gpu_experts must be a fraction in [0, 1], got {gpu_experts!r}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json here; model_name_or_path must be a local Hugging Face "
                                "model directory (config.json + *.safetensors)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {err}") from err
    family = get_family(model_type, rule)  # before transformers, whose error would not list what we support
    fmt, threads = _resolve_defaults(family, dtype, format, threads)
    if engine.current_isa() not in fmt.fast_isas:
        logger.warning("kt-sft: %s experts need %s to be fast; this CPU runs them on the %s path in plain loops "
                       "(correct, slow). kt_backend: INT8 keeps the int8 weights and computes in bf16, fast here.",
                       fmt.label, "/".join(fmt.fast_isas), engine.current_isa())
    if config is None:
        config = AutoConfig.from_pretrained(path)
    elif getattr(config, "model_type", model_type) != model_type:
        raise ValueError(f"config model_type {config.model_type!r} does not match {path / 'config.json'} "
                         f"({model_type!r})")
    _check_config(path, config)
    hidden_act = next((getattr(config, a) for a in ("hidden_act", "hidden_activation", "activation_function")
                       if getattr(config, a, None) is not None), None)
    if not family.accepts_activation(hidden_act):
        raise ValueError(f"{path}: hidden_act={hidden_act!r}, but the engine runs {family.activation}-gated experts")
    if threads:
        engine.set_num_threads(threads)

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules = _experts_modules(model, family)
    layers = {}
    for idx, module in sorted(modules.items()):
        E, two_i, H = module.gate_up_proj.shape
        layers[idx] = engine.ExpertLayer(E, H, two_i // 2, fmt, max_saved=max_saved)
        layers[idx].chunk_size, layers[idx].retain_activations = int(chunk_size), bool(retain_activations)

    shards, weight_map = _shards(path)
    sources = {shard: "all" for shard in shards}
    if expert_path is not None and Path(expert_path).resolve() != path.resolve():
        expert_shards, expert_map = _shards(Path(expert_path))
        sources = {shard: "dense" for shard in shards}
        sources.update({shard: "experts" for shard in expert_shards})
        weight_map = {**weight_map, **expert_map}
    expert_re, fused_re = family.expert_key_regexes(), family.fused_key_regexes()
    placer = _Placer(model, device, dtype)
    if check_memory and os.environ.get("KT_SFT_SKIP_MEMORY_CHECK") != "1":
        expert_params = {id(p) for m in modules.values() for p in m.parameters()}
        dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
        _check_memory(sum(l.packed_bytes for l in layers.values()), dense,
                      max(s.stat().st_size for s in sources if s.is_file()), device)

    for shard, kinds in tqdm(sources.items(), desc="kt-sft: loading shards", disable=not progress):
        with _open(shard) as f:
            for key in f.keys():
                try:
                    _load_key(key, f, layers, expert_re, fused_re, placer, kinds)
                except (RuntimeError, ValueError) as err:
                    raise type(err)(f"{key} in {shard.name}: {err}") from err
    _finish(model, family, layers, modules, weight_map, placer, device)
    if gpu_experts > 0 and device.type == "cuda":
        for layer in layers.values():
            layer.gpu_share = engine.GpuShare(layer, max(1, round(gpu_experts * layer.num_experts)), device)
    use_engine(model.config)
    install_chunked_loss(model, loss_chunk_tokens)
    model.kt_summary = _summary(layers, fmt, device)
    logger.info(model.kt_summary)
    return model


def _resolve_defaults(family: MoEFamily, dtype, fmt, threads) -> tuple[ExpertFormat, int]:
    """Explicit arguments win; then the family file's defaults; fp32 models get the exact fp32 engine."""
    if fmt is None:
        if dtype == torch.float32:
            fmt = for_model_dtype(dtype)
        else:
            name = str(family.defaults.get("engine_dtype", "bf16"))
            try:
                fmt = get_format(name)
            except ValueError as err:
                raise ValueError(f"{family.source}: defaults.engine_dtype: {err}") from None
    fmt = get_format(fmt)
    if not threads:
        value = family.defaults.get("threads", "auto")
        if value != "auto" and not (isinstance(value, int) and value > 0):
            raise ValueError(f"{family.source}: defaults.threads must be 'auto' or a positive integer, got {value!r}")
        threads = 0 if value == "auto" else value
    return fmt, threads


def _load_key(key, f, layers, expert_re, fused_re, placer, kinds: str = "all") -> None:
    """Route one checkpoint tensor: into an engine layer, onto the model, or (kinds says) not from this shard."""
    for proj, regex in expert_re.items():
        m = regex.match(key)
        if m and int(m["layer"]) in layers:
            if kinds != "dense":
                layers[int(m["layer"])].set_projection(proj, f.get_tensor(key), int(m["expert"]))
            return
    for proj, regex in fused_re.items():
        m = regex.match(key)
        if m and int(m["layer"]) in layers:
            if kinds == "dense":
                return
            layer = layers[int(m["layer"])]
            if proj == "gate_up":
                layer.load_gate_up(f.get_tensor(key))
            else:
                layer.set_projection("down", f.get_tensor(key))
            return
    if kinds == "experts":
        return
    name = placer.name_of(key)
    if name is None:
        placer.unexpected.append(key)  # e.g. DeepSeek-V3's MTP layer; stock transformers skips these too
        return
    placer.place(name, f.get_tensor(key))


def _finish(model, family, layers, modules, weight_map, placer, device) -> None:
    for idx, layer in sorted(layers.items()):
        missing = layer.missing_weights()
        if missing:
            expert, proj = missing[0].split()[1:]
            key = family.checkpoint[proj].format(layer=idx, expert=expert)
            where = f"the index maps it to {weight_map[key]}, which lacks it" if key in weight_map \
                else "no shard contains it"
            raise KeyError(f"expert tensor {key} is missing ({where}); {len(missing)} expert projections of layer "
                           f"{idx} were never loaded. Is the checkpoint complete?")
        attach_engine(modules[idx], layer)
    if any(p.is_meta for p in model.parameters()) and getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:
        raise KeyError(f"tensor {still_meta[0]} (and {len(still_meta) - 1} more) not found in the checkpoint")
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            set_module_tensor_to_device(model, name, device, value=buf)
    if placer.unexpected:
        logger.warning("kt-sft: %d checkpoint tensors have no place in the model and were skipped (first: %s)",
                       len(placer.unexpected), placer.unexpected[0])


def _summary(layers: dict, fmt: ExpertFormat, device: torch.device) -> str:
    experts = sum(l.num_experts for l in layers.values())
    packed = sum(l.packed_bytes for l in layers.values())
    size = f"{packed / 1e9:.1f} GB" if packed >= 1e8 else f"{packed / 1e6:.1f} MB"
    return (f"kt-sft: {len(layers)} MoE layers / {experts} experts ({size} {fmt.label}) on CPU engine "
            f"[{engine.current_isa()}, {engine.num_threads()} threads]; dense on {device}")

"""`load_model`: a stock transformers MoE model whose routed experts live in the CPU engine.

Options come as one `LoadOptions` (kt_sft/load_options.py). The model is built on the meta device from config.json
(read once; the model family is resolved once, or handed in already resolved); non-expert tensors are loaded onto
the compute device (CUDA when there is one, else CPU); routed-expert tensors stream shard by shard (safetensors
mmap) straight into each layer's packed engine buffers, converted to the engine dtype, so host RAM peaks near the
packed experts plus one shard. Which tensors are experts is the model registry's business (kt_sft/models).
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
from transformers import AutoModelForCausalLM, PreTrainedConfig
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from . import engine
from .engine.formats import ExpertFormat, for_model_dtype, get_format
from .load_options import LoadOptions, resolve_options
from .models.chunked_loss import install_chunked_loss
from .models.experts import ExpertCallPolicy, attach_engine, use_engine
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
        raise MemoryError(f"loading needs about {host_need / GB:.1f} GB of host RAM (experts "
                          f"{expert_bytes / GB:.1f} GB packed + 10% + one shard {largest_shard / GB:.1f} GB) but "
                          f"{free / GB:.1f} GB is available; free memory or use a machine with more RAM "
                          "(LoadOptions.check_memory=False skips this check)")
    if device.type == "cuda":
        free_gpu, _ = torch.cuda.mem_get_info(device)
        if dense_bytes > free_gpu:
            raise MemoryError(f"the non-expert weights need {dense_bytes / GB:.1f} GB on {device} but only "
                              f"{free_gpu / GB:.1f} GB is free (LoadOptions.check_memory=False skips this check)")


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


def load_model(path: str | os.PathLike, options: Optional[LoadOptions] = None, *, config=None,
               family: Optional[MoEFamily] = None, **fields):
    """Load a Hugging Face MoE checkpoint directory with the routed experts on the CPU engine.

    options: a LoadOptions (kt_sft.load_options: device, dtype, expert format, threads, chunking, GPU share, ...);
    `**fields` set any of its fields by name on top of it: `load_model(path, dtype=torch.float32, format="bf16")`.
    config: an already loaded (and possibly patched, e.g. by LLaMA-Factory) config of this checkpoint; default:
    built from config.json.
    family: the checkpoint's MoEFamily when the caller has resolved it already (KTSettings.family); default:
    resolved here from the model_type and `options.rule`.
    Returns a stock transformers model whose experts modules run on the engine; `model.kt_summary` says where
    everything went.
    """
    opts = resolve_options(options, fields)
    path = Path(path)
    config, family = _resolve_model(path, config, family, opts.rule)
    fmt, threads = _resolve_defaults(family, opts)
    if threads:
        engine.set_num_threads(threads)
    model, modules = _build_meta_model(config, family, opts.dtype)
    layers = {idx: engine.ExpertLayer(E, H, I, fmt, max_saved=opts.max_saved)
              for idx, (E, H, I) in _expert_shapes(modules).items()}
    sources, weight_map = _shard_sources(path, opts.expert_path)
    if opts.check_memory:
        _check_load_memory(model, modules, layers, sources, opts.device)
    placer = _Placer(model, opts.device, opts.dtype)
    _stream_shards(sources, layers, family, placer, opts.progress)
    _check_experts_loaded(layers, family, weight_map)
    for idx, layer in sorted(layers.items()):
        attach_engine(modules[idx], layer, _call_policy(layer, opts))
    _finish_dense(model, placer, opts.device)
    use_engine(model.config)
    install_chunked_loss(model, opts.loss_chunk_tokens)
    model.kt_summary = _summary(layers, fmt, opts.device)
    logger.info(model.kt_summary)
    return model


def _resolve_model(path: Path, config, family: Optional[MoEFamily], rule) -> tuple[object, MoEFamily]:
    """The checkpoint's config (from one read of config.json, unless given) and its MoE family (from the registry,
    unless given), checked against each other before any weight is read."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json here; model_name_or_path must be a local Hugging Face "
                                "model directory (config.json + *.safetensors)")
    config_dict = None
    if config is None:
        try:  # transformers' own reader, as AutoConfig.from_pretrained calls it
            config_dict, config_kwargs = PreTrainedConfig.get_config_dict(path, _from_auto=True, name_or_path=str(path))
        except OSError as err:
            raise ValueError(f"{path / 'config.json'} is not valid JSON: {err}") from err
        model_type = config_dict.get("model_type")
    else:
        model_type = getattr(config, "model_type", None)
    if family is None:
        family = get_family(model_type, rule)  # before transformers, whose error would not list what we support
    elif family.model_type != model_type:
        raise ValueError(f"family {family.source or family.model_type} is for model_type {family.model_type!r}, "
                         f"but the config of {path} says {model_type!r}")
    if config is None:
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{path / 'config.json'}: transformers has no model_type {model_type!r} "
                             f"(rule {family.source}); kt-sft runs transformers' own MoE model classes")
        config = CONFIG_MAPPING[model_type].from_dict(config_dict, **config_kwargs)
    _check_config(path, config)
    hidden_act = next((getattr(config, a) for a in ("hidden_act", "hidden_activation", "activation_function")
                       if getattr(config, a, None) is not None), None)
    if not family.accepts_activation(hidden_act):
        raise ValueError(f"{path}: hidden_act={hidden_act!r}, but the engine runs {family.activation}-gated experts")
    return config, family


def _resolve_defaults(family: MoEFamily, opts: LoadOptions) -> tuple[ExpertFormat, int]:
    """(expert format, engine threads; 0 = KT_SFT_THREADS or the physical cores): explicit options win; then the
    family file's defaults; fp32 models get the exact fp32 engine."""
    fmt = opts.format
    if fmt is None and opts.dtype == torch.float32:
        fmt = for_model_dtype(opts.dtype)
    elif fmt is None:
        try:
            fmt = get_format(str(family.defaults.get("engine_dtype", "bf16")))
        except ValueError as err:
            raise ValueError(f"{family.source}: defaults.engine_dtype: {err}") from None
    if engine.current_isa() not in fmt.fast_isas:
        logger.warning("kt-sft: %s experts need %s to be fast; this CPU runs them on the %s path in plain loops "
                       "(correct, slow). kt_backend: INT8 keeps the int8 weights and computes in bf16, fast here.",
                       fmt.label, "/".join(fmt.fast_isas), engine.current_isa())
    threads = opts.threads
    if not threads:
        value = family.defaults.get("threads", "auto")
        if value != "auto" and not (isinstance(value, int) and value > 0):
            raise ValueError(f"{family.source}: defaults.threads must be 'auto' or a positive integer, got {value!r}")
        threads = 0 if value == "auto" else value
    return fmt, threads


def _build_meta_model(config, family: MoEFamily, dtype: torch.dtype):
    """(the model with every tensor on the meta device, its experts modules by layer index)."""
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model, _experts_modules(model, family)


def _expert_shapes(modules: dict[int, torch.nn.Module]) -> dict[int, tuple[int, int, int]]:
    """(experts, hidden, intermediate) of each experts module, from its fused gate_up_proj [E, 2I, H]."""
    shapes = {}
    for idx, module in sorted(modules.items()):
        E, two_i, H = module.gate_up_proj.shape
        shapes[idx] = (E, H, two_i // 2)
    return shapes


def _shard_sources(path: Path, expert_path) -> tuple[dict[Path, str], dict[str, str]]:
    """({shard: which tensors to read from it, "all" / "dense" / "experts"}, the merged key -> file map)."""
    shards, weight_map = _shards(path)
    if expert_path is None or Path(expert_path).resolve() == path.resolve():
        return {shard: "all" for shard in shards}, weight_map
    expert_shards, expert_map = _shards(Path(expert_path))
    sources = {shard: "dense" for shard in shards}
    sources.update({shard: "experts" for shard in expert_shards})
    return sources, {**weight_map, **expert_map}


def _check_load_memory(model, modules, layers, sources, device: torch.device) -> None:
    expert_params = {id(p) for m in modules.values() for p in m.parameters()}
    dense = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in expert_params)
    _check_memory(sum(l.packed_bytes for l in layers.values()), dense,
                  max(s.stat().st_size for s in sources if s.is_file()), device)


def _stream_shards(sources: dict[Path, str], layers, family: MoEFamily, placer: "_Placer", progress: bool) -> None:
    expert_re, fused_re = family.expert_key_regexes(), family.fused_key_regexes()
    for shard, kinds in tqdm(sources.items(), desc="kt-sft: loading shards", disable=not progress):
        with _open(shard) as f:
            for key in f.keys():
                try:
                    _load_key(key, f, layers, expert_re, fused_re, placer, kinds)
                except (RuntimeError, ValueError) as err:
                    raise type(err)(f"{key} in {shard.name}: {err}") from err


def _call_policy(layer, opts: LoadOptions) -> ExpertCallPolicy:
    share = None
    if opts.gpu_experts > 0 and opts.device.type == "cuda":
        share = engine.GpuShare(layer, max(1, round(opts.gpu_experts * layer.num_experts)), opts.device)
    return ExpertCallPolicy(chunk_size=opts.chunk_size, retain=opts.retain_activations, share=share)


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


def _check_experts_loaded(layers: dict, family: MoEFamily, weight_map: dict[str, str]) -> None:
    """Every expert projection of every layer came from some shard; else name the first missing tensor."""
    for idx, layer in sorted(layers.items()):
        missing = layer.missing_weights()
        if missing:
            expert, proj = missing[0].split()[1:]
            key = family.checkpoint[proj].format(layer=idx, expert=expert)
            where = f"the index maps it to {weight_map[key]}, which lacks it" if key in weight_map \
                else "no shard contains it"
            raise KeyError(f"expert tensor {key} is missing ({where}); {len(missing)} expert projections of layer "
                           f"{idx} were never loaded. Is the checkpoint complete?")


def _finish_dense(model, placer: _Placer, device: torch.device) -> None:
    """Tie what the checkpoint leaves tied, refuse tensors still on meta, move buffers to the device (after the
    experts modules gave up their weights, which stay on meta)."""
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

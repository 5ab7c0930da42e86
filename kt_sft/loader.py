"""`load_model`: a stock transformers MoE model whose routed experts live in the CPU engine.

Options come as one `LoadOptions` (kt_sft/load_options.py). Loading runs in named steps:
  plan      config.json (read once), the model built on the meta device with the class LLaMA-Factory uses, the
            model family (derived from that model, or a rule file, or handed in; its experts math probed), the
            checkpoint's source format (bf16, or block FP8 / FP8 per channel / INT4 pack-quantized:
            kt_sft/checkpoint_formats.py), the expert format (asked for, or the default rule) (`plan_load`, `LoadPlan`)
  scan      every shard's header (kt_sft/checkpoint_files.py): quantized weights checked against their format
            (scales present, of the right shape) and the host RAM each expert format would need checked against
            what is free, before any weight is read
  stream    shard by shard (safetensors mmap): routed-expert tensors straight into each layer's packed engine
            buffers, converted to the expert format; everything else onto the compute device (CUDA when there is
            one, else CPU) in the model dtype. A quantized expert projection goes to the engine as stored (codes
            and scales), which decodes it itself where the format does not keep it; any other quantized tensor is
            decoded to fp32 as it is read. Host RAM peaks near the packed experts plus one shard, never a layer
            of bf16. Under data parallel (several torchrun ranks: kt_sft/distributed.py) the settings are compared
            across ranks first, and only the host's lowest rank streams the experts, into a shared store the
            host's other ranks then map read-only (they stream the dense tensors meanwhile).
Which modules and tensors are experts is the family rule's business (kt_sft/models: derived from the model, or a
rule file).
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import torch
from accelerate.utils import set_module_tensor_to_device
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedConfig
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from . import distributed, engine
from .checkpoint_files import CheckpointFiles, TensorReader, scan
from .checkpoint_formats import (MXFP4_BLOCKS, MXFP4_SCALES, SourceFormat, check_stored, decode, decode_mxfp4, encoded,
                                 is_companion, is_quantized, logical_key, mxfp4_experts_per_step, source_format)
from .engine.formats import FORMATS, ExpertFormat, FormatLike, for_model_dtype, get_format
from .load_options import LoadOptions, resolve_options
from .models.chunked_loss import install_chunked_loss
from .models import experts_math
from .models.derive import build_meta, resolve_family
from .models.experts import ExpertCallPolicy, attach_engine, install_checkpoint_marking, use_engine
from .models.registry import TESTED, ExpertsAt, MoEFamily, UnsupportedModelError, fused_projections, get_override

logger = logging.getLogger(__name__)


@dataclass
class LoadPlan:
    """What `load_model` decides before reading any weight (`plan_load`)."""

    path: Path
    config: object                   # what the model is built from: the checkpoint's, without quantization_config
    family: MoEFamily
    source: SourceFormat             # how the checkpoint stores its weights
    format: ExpertFormat             # how the routed experts will be stored in RAM
    format_reason: str               # why that format (asked for, or which default rule)
    threads: int                     # engine threads (0: KT_SFT_THREADS or the physical cores)
    model: torch.nn.Module           # every tensor on the meta device
    experts_modules: dict            # ExpertsAt (MoE layer, experts set) -> its experts module

    @property
    def expert_shapes(self) -> dict[ExpertsAt, tuple[int, int, int]]:
        """(experts, hidden, intermediate) of each experts module, from its fused down_proj [E, H, I] (transposed:
        [E, I, H])."""
        def dims(at, down):
            transposed = self.family.experts_sets[at.set].transposed
            return (down.shape[0], down.shape[2], down.shape[1]) if transposed else tuple(down.shape)
        return {at: dims(at, m.down_proj) for at, m in sorted(self.experts_modules.items())}

    def expert_bytes(self, fmt: Optional[FormatLike] = None) -> int:
        """Host bytes of every MoE layer's packed experts in `fmt` (default: the planned format), without
        allocating: what the loaded layers' `packed_bytes` add up to."""
        fmt = self.format if fmt is None else get_format(fmt)
        return sum(fmt.packed_bytes(*shape) for shape in self.expert_shapes.values())

    @property
    def dense_bytes(self) -> int:
        """Bytes of every non-expert parameter in the model dtype (what goes to the compute device)."""
        expert_params = {id(p) for m in self.experts_modules.values() for p in m.parameters()}
        return sum(p.numel() * p.element_size() for p in self.model.parameters() if id(p) not in expert_params)


def plan_load(path: str | os.PathLike, options: Optional[LoadOptions] = None, *, config=None,
              family: Optional[MoEFamily] = None, **fields) -> LoadPlan:
    """What `load_model(path, options, config=config, family=family, **fields)` would do, decided from config.json
    alone: no weight is read (e.g. the host RAM of each expert format: `plan.expert_bytes(fmt)`)."""
    return _plan(Path(path), resolve_options(options, fields), config, family)


def _plan(path: Path, opts: LoadOptions, config, family: Optional[MoEFamily]) -> LoadPlan:
    config, given, source = _resolve_model(path, config, family, opts.rule)
    model = build_meta(config, opts.dtype)
    family = resolve_family(model, config.model_type, given)
    modules = _experts_modules(model, family)
    fmt, reason = (opts.format, "asked for") if opts.format is not None else \
        _default_format(family, source, opts.dtype)
    if opts.int4_group is not None and fmt.weight_dtype != torch.int4:
        int4 = [r for r in FORMATS.values() if r.weight_dtype == torch.int4]
        raise ValueError(f"int4_group={opts.int4_group} (kt_int4_group_size) sets the groups of int4 experts, but "
                         f"the experts load as {fmt.label} ({reason}); use kt_backend "
                         f"{' / '.join(r.backends[-1] for r in int4)} (format="
                         f"{' / '.join(repr(r.name) for r in int4)}) or remove it")
    fmt = _fit_to_source(fmt, source, opts.int4_group)
    if engine.current_isa() not in fmt.fast_isas:
        logger.warning("kt-sft: %s experts need %s to be fast; this CPU runs them on the %s path in plain loops "
                       "(correct, slow). kt_backend: INT8 keeps the int8 weights and computes in bf16, fast here.",
                       fmt.label, "/".join(fmt.fast_isas), engine.current_isa())
    return LoadPlan(path, config, family, source, fmt, reason, _threads(family, opts), model, modules)


def load_model(path: str | os.PathLike, options: Optional[LoadOptions] = None, *, config=None,
               family: Optional[MoEFamily] = None, **fields):
    """Load a Hugging Face MoE checkpoint directory with the routed experts on the CPU engine.

    options: a LoadOptions (kt_sft.load_options: device, dtype, expert format, threads, chunking, GPU share, ...);
    `**fields` set any of its fields by name on top of it: `load_model(path, dtype=torch.float32, format="bf16")`.
    config: an already loaded (and possibly patched, e.g. by LLaMA-Factory) config of this checkpoint; default:
    built from config.json. It is not modified (a quantized checkpoint's model is built from a copy without
    quantization_config).
    family: the checkpoint's MoEFamily when the caller has resolved it already (KTSettings.family); default:
    `options.rule`'s rule file, else derived from the model (kt_sft.models.derive). Its experts math is probed either
    way.
    The checkpoint may be bf16/fp16/fp32 or quantized (block FP8, FP8 per channel, INT4 pack-quantized).
    Returns a stock transformers model whose experts modules run on the engine; `model.kt_summary` says where
    everything went.
    """
    opts = resolve_options(options, fields)
    host = distributed.join(_rank_settings(Path(path), opts))  # None unless several ranks run (torchrun)
    plan = _plan(Path(path), opts, config, family)
    logger.info("kt-sft: %s checkpoint, experts as %s (%s)", plan.source, plan.format.label, plan.format_reason)
    if opts.numa is not None:
        engine.set_numa(opts.numa)
    _set_threads(plan.threads, host)
    files = scan(plan.path, opts.expert_path)
    model, placer = plan.model, _Placer(plan.model, opts.dense_device, opts.dtype)
    router = _KeyRouter(plan.family, files.headers, placer.renamings, expert_counts(plan.experts_modules))
    placer.expect(router.logical(k) for k in files.headers
                  if router.expert(k) is None and not is_companion(k, plan.source))
    _check_stored(plan.source, files, router)
    if opts.check_memory:  # the experts count once per host: on the rank that packs them
        packs = host is None or host.packs
        check = functools.partial(_check_memory, {f: plan.expert_bytes(f) if packs else 0 for f in _formats_for(plan)},
                                  plan.dense_bytes * _dense_copies(host, packs, opts.dense_device),
                                  files.largest_shard, opts.dense_device, plan.format, plan.path.name)
        if host is None:
            check()
        else:
            host.together(check, "the memory check")
    sets = plan.family.experts_sets
    layers = {at: engine.ExpertLayer(E, H, I, plan.format, experts_math.engine_activation(sets[at.set].math),
                                     opts.max_saved, bias=sets[at.set].bias)
              for at, (E, H, I) in plan.expert_shapes.items()}
    with distributed.shared_experts(host, [layers[at] for at in sorted(layers)]) as packs:
        _stream_shards(files, layers, router, placer, plan.source, opts.progress, experts=packs)
    _check_experts_loaded(layers, plan, files, router.prefix)
    policies = {at: _call_policy(layer, opts, sets[at.set]) for at, layer in layers.items()}
    for at, layer in sorted(layers.items()):
        attach_engine(plan.experts_modules[at], layer, policies[at])
    reserve_launch_cores(plan.threads, any(p.share is not None for p in policies.values()))
    _finish_dense(model, placer, opts.dense_device)
    _read_generation_config(model, plan.path)
    use_engine(model.config)
    install_chunked_loss(model, opts.loss_chunk_tokens)
    install_checkpoint_marking(model)
    model.kt_summary = (_summary(layers, plan, opts.dense_device)
                        + distributed.store_summary(host, list(layers.values())))
    logger.info(model.kt_summary)
    return model


def _resolve_model(path: Path, config, family: Optional[MoEFamily], rule) -> tuple[object, Optional[MoEFamily],
                                                                                   SourceFormat]:
    """The checkpoint's config (from one read of config.json, unless given), the family rule given or read from a
    rule file (None: derive it from the model, kt_sft.models.derive) and its source format, checked against each
    other before any weight is read."""
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
    if family is not None and family.model_type != model_type:
        raise ValueError(f"family {family.source or family.model_type} is for model_type {family.model_type!r}, "
                         f"but the config of {path} says {model_type!r}")
    given = family or get_override(model_type, rule)
    if config is None:
        if model_type not in CONFIG_MAPPING:
            raise UnsupportedModelError(
                f"model_type {model_type!r} ({path / 'config.json'}) is not supported by kt-sft: transformers has no "
                f"such model; kt-sft runs transformers' own MoE model classes (tested: {', '.join(TESTED)}; every "
                f"family: python -m kt_sft families)")
        config = CONFIG_MAPPING[model_type].from_dict(config_dict, **config_kwargs)
    config, source = _without_quantization(path, config)
    return config, given, source


def checkpoint_family(path: str | os.PathLike, rule=None) -> MoEFamily:
    """The MoE family of the checkpoint at `path` (its rule file, or derived from the model built on meta), its
    experts' math checked, from config.json alone: what LLaMA-Factory's checks resolve before anything loads."""
    return checkpoint_model(path, rule)[0]


def checkpoint_model(path: str | os.PathLike, rule=None) -> tuple[MoEFamily, torch.nn.Module]:
    """`checkpoint_family` and the model it was derived from (every tensor on meta): what the hook's checks hold
    adapters and lora_target against before anything loads."""
    config, given, _ = _resolve_model(Path(path), None, None, rule)
    model = build_meta(config, buffers=False)
    return resolve_family(model, config.model_type, given), model


def _without_quantization(path: Path, config) -> tuple[object, SourceFormat]:
    """The checkpoint's source format (from quantization_config; a format kt-sft cannot read is refused, named) and
    the config to build the model from: a copy without quantization_config, so that transformers builds plain
    modules and PEFT, the Trainer and save_pretrained see an ordinary model. The caller's config stays as it was."""
    source = source_format(getattr(config, "quantization_config", None), str(path / "config.json"))
    if hasattr(config, "quantization_config"):
        config = copy.deepcopy(config)
        del config.quantization_config
    return config, source


def _default_format(family: MoEFamily, source: SourceFormat, dtype: torch.dtype) -> tuple[ExpertFormat, str]:
    """(expert format, why) when the caller names none: an fp32 model gets exact fp32 experts (from the exactly
    decoded weights of a quantized checkpoint); otherwise an unquantized checkpoint gets a rule file's
    defaults.format, a quantized one the smallest format that holds its weights (`_smallest_holding`)."""
    if dtype == torch.float32:
        return for_model_dtype(dtype), "fp32 model: exact fp32 experts" + \
            (f", decoded exactly from {source.name}" if source.quantized else "")
    if source.quantized:
        fmt = _smallest_holding(source)
        bf16 = "" if fmt.name == "bf16" else f", bf16 would take {FORMATS['bf16'].weight_bytes}"
        return fmt, (f"the smallest expert format that holds {source.name}'s weights without rounding them again: "
                     f"{fmt.weight_bytes:g} byte(s) per weight{bf16}; kt_backend / format= picks another")
    try:
        fmt = get_format(str(family.defaults.get("format", "bf16")))
    except ValueError as err:
        raise ValueError(f"{family.source}: defaults.format: {err}") from None
    return fmt, (f"defaults.format of {family.source}" if family.defaults.get("format") else "the default")


def _smallest_holding(source: SourceFormat) -> ExpertFormat:
    """The default expert format of a quantized checkpoint, a rule over the format table: the rows whose weights are
    at least as wide as the source needs to keep its weights (`holding_bytes`: no silent loss of precision), the
    fewest bytes per weight first (no silent doubling of RAM), among equals a row that stores the source's own
    element type (exact, e.g. a native FP8 row for FP8 checkpoints), then table order (exact formats are listed
    before their activation-quantized siblings). Today: fp8 for FP8 (1 byte, like int8, and its own element type),
    int4 for INT4, bf16 for MXFP4."""
    rows = list(FORMATS.values())
    holding = [f for f in rows if f.weight_bytes >= source.holding_bytes]
    return min(holding, key=lambda f: (f.weight_bytes, f.weight_dtype != source.element_dtype, rows.index(f)))


def _fit_to_source(fmt: ExpertFormat, source: SourceFormat, int4_group: Optional[int] = None) -> ExpertFormat:
    """`fmt` with the scale grid it takes for this checkpoint. A format that keeps a checkpoint's own tensors (fp8
    from block / per-channel FP8, int4 from INT4) takes the checkpoint's grid, so its experts load exactly as stored
    (`ExpertLayer.set_projection` with scale and block keeps them); an int4 format quantizing at load (from bf16
    or FP8) takes groups of `int4_group` along K (None: its own); any other keeps its grid. FP8 cannot hold INT4 checkpoints' weights."""
    if fmt.weight_dtype == torch.int4:
        return _int4_groups(fmt, source, int4_group)
    if fmt.stored_dtype is None or not source.quantized:
        return fmt
    if fmt.weight_dtype != source.element_dtype:
        if source.name == "int4-group" and fmt.weight_dtype == torch.float8_e4m3fn:
            others = [r.backends[-1] for r in FORMATS.values() if r.weight_dtype != fmt.weight_dtype]
            raise ValueError(f"expert format {fmt.name} (kt_backend {fmt.backends[0]}) cannot hold this checkpoint's "
                             "INT4 weights (a 4-bit grid of group scales is not an FP8 block grid); use "
                             f"{' / '.join(others)} (INT4 keeps them exactly and is the default; the others decode "
                             "them)")
        return fmt
    return fmt.with_scales(block=source.block if source.name == "fp8-block" else (1, 0))


def _int4_groups(fmt: ExpertFormat, source: SourceFormat, group: Optional[int]) -> ExpertFormat:
    """An int4 format's groups: an INT4 checkpoint's own (its codes kept exactly; regrouping them would quantize
    them a second time, so another group size asked for is refused), else `group` (None: the format's own)."""
    if source.name != "int4-group":
        return fmt if group is None else fmt.with_scales(group=group)
    if group not in (None, source.group):
        raise ValueError(f"int4_group={group} (kt_int4_group_size): this checkpoint stores its experts as INT4 in "
                         f"groups of {source.group}, which {fmt.backends[-1]} experts keep exactly as stored; "
                         f"regrouping them would quantize them twice. Remove the setting (or give {source.group})")
    return fmt.with_scales(group=source.group)


def _rank_settings(path: Path, opts: LoadOptions) -> dict:
    """What every rank of a distributed run must load alike (compared by kt_sft.distributed.join): the options
    (the kt_* keys) but the device and the progress bar, and the checkpoint's config. KT_SFT_* variables may differ
    between hosts (threads, ISA of another CPU)."""
    shown = lambda v: f"{v.label} (scale blocks {v.scale_block})" if isinstance(v, ExpertFormat) else repr(v)
    settings = {f"load option {f.name}": shown(getattr(opts, f.name)) for f in dataclasses.fields(opts)
                if f.name not in ("device", "dense_device", "progress")}
    config_file = path / "config.json"
    if config_file.is_file():
        settings["the checkpoint's config.json"] = hashlib.sha256(config_file.read_bytes()).hexdigest()[:16]
    return settings


def _set_threads(threads: int, host) -> None:
    """The engine's threads: `threads` (0: auto); auto with several ranks on this host splits the cores among them
    (kt_sft.distributed.threads_per_rank) unless KT_SFT_THREADS sets them."""
    if threads:
        engine.set_num_threads(threads)
    elif host is not None and not os.environ.get("KT_SFT_THREADS"):
        engine.set_num_threads(0)
        engine.set_num_threads(distributed.threads_per_rank(engine.num_threads(), host))


def _threads(family: MoEFamily, opts: LoadOptions) -> int:
    """Engine threads: the option, else a rule file's defaults.threads, else KT_SFT_THREADS when it asks for more
    than this process's CPUs (0: the engine's own choice, KT_SFT_THREADS or the cores); never more than the CPUs
    (engine.threads_for_cpus: clamped with a warning)."""
    if opts.threads:
        return engine.threads_for_cpus(opts.threads, "threads (kt_num_threads)")
    value = family.defaults.get("threads", "auto")
    if value != "auto" and not (isinstance(value, int) and value > 0):
        raise ValueError(f"{family.source}: defaults.threads must be 'auto' or a positive integer, got {value!r}")
    if value != "auto":
        return engine.threads_for_cpus(value, f"{family.source}: defaults.threads")
    env = int(os.environ.get("KT_SFT_THREADS", "").strip() or 0)  # the engine parsed it at import
    return 0 if env <= engine.usable_cpus() else engine.threads_for_cpus(env, "KT_SFT_THREADS")


def _experts_modules(model: torch.nn.Module, family: MoEFamily) -> dict[ExpertsAt, torch.nn.Module]:
    """Every experts module of the rule's experts modules (`experts_sets`), by MoE layer and set."""
    found = {}
    for index, rule in enumerate(family.experts_sets):
        found.update({ExpertsAt(layer, index): m for layer, m in _experts_modules_of(model, rule).items()})
    return found


def expert_counts(modules: dict) -> dict[ExpertsAt, int]:
    """The expert count of each experts module (its fused down_proj's first dimension in either layout)."""
    return {at: m.down_proj.shape[0] for at, m in modules.items()}


def _experts_modules_of(model: torch.nn.Module, family: MoEFamily) -> dict[int, torch.nn.Module]:
    """MoE layer index -> the experts module at `family.experts_module` (one experts set)."""
    pattern = family.experts_module_regex()
    params = [f"{p}_proj" for p in fused_projections(family.gated)]
    found, elsewhere, unfused = {}, [], []
    for name, module in model.named_modules():
        m = pattern.match(name)
        if not all(p in module._parameters for p in params):
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
        raise ValueError(f"{unfused[0]} ({type(model).__name__}, rule {family.source}) holds no fused "
                         f"{' / '.join(params)} expert parameters: kt-sft runs transformers 5's fused experts modules "
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


def _size(nbytes: float) -> str:
    if nbytes >= 1e11:
        return f"{nbytes / 1e12:.2f} TB"
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _host_need(expert_bytes: int, dense_bytes: int, largest_shard: int, device: torch.device) -> int:
    """Host RAM a load needs: the packed experts + 10 % (allocator, engine scratch) + one shard being read (mmap)
    + the dense weights when they stay on the CPU."""
    return int(expert_bytes * 1.1) + largest_shard + (dense_bytes if device.type == "cpu" else 0)


def _dense_copies(host, packs: bool, device: torch.device) -> int:
    """The copies of the dense weights a rank's memory check counts: on a GPU its own; in host RAM (a CPU run, or
    FSDP before it shards them) each rank of the host holds one, all counted by the rank that packs the experts."""
    if device.type != "cpu" or host is None:
        return 1
    return len(host.local) if packs else 0


def _formats_for(plan: LoadPlan) -> list[ExpertFormat]:
    """Every expert format this checkpoint could load into (each with the scale grid it would take: the int4 rows
    the planned format's groups when it is one of them, e.g. an int4_group asked for), the planned one included:
    the choices the RAM preflight weighs."""
    group = plan.format.scale_block[1] if plan.format.weight_dtype == torch.int4 else None
    fitted = []
    for row in FORMATS.values():
        try:
            fitted.append(_fit_to_source(row, plan.source, group))
        except ValueError:  # a format that cannot hold this checkpoint's weights
            continue
    return list(dict.fromkeys([*fitted, plan.format]))


def _check_memory(expert_bytes: dict[ExpertFormat, int], dense_bytes: int, largest_shard: int, device: torch.device,
                  fmt: ExpertFormat, name: str) -> None:
    """Refuse, before any weight is read, a load whose host RAM (for the packed experts in `fmt`; `expert_bytes`
    has them per candidate format) or GPU memory (the dense weights) is short, naming the expert formats that
    would fit."""
    needs = {f: _host_need(b, dense_bytes, largest_shard, device) for f, b in expert_bytes.items()}
    free = _free_host_bytes()
    if free is not None and needs[fmt] > free:
        fits = [f for f, need in sorted(needs.items(), key=lambda item: item[1]) if need <= free]
        advice = (f"use kt_backend {' or '.join(f.backends[-1] for f in fits)} (load_model format="
                  f"{' / '.join(repr(f.name) for f in fits)}), " if fits else "no expert format fits: ")
        raise MemoryError(
            f"loading {name} with {fmt.label} experts needs about {_size(needs[fmt])} of host RAM (experts "
            f"{_size(expert_bytes[fmt])} packed + 10% + one shard {_size(largest_shard)}"
            f"{' + dense weights' if device.type == 'cpu' else ''}) but {_size(free)} is available. Host RAM per "
            f"expert format for {name}: {', '.join(f'{f.backends[-1]} {_size(n)}' for f, n in needs.items())}; "
            f"{_size(free)} free: {advice}free memory or use a machine with more RAM (LoadOptions.check_memory=False"
            " / kt_check_memory: false skips this check)")
    if device.type == "cuda":
        free_gpu, _ = torch.cuda.mem_get_info(device)
        if dense_bytes > free_gpu:
            raise MemoryError(f"the non-expert weights need {_size(dense_bytes)} on {device} but only "
                              f"{_size(free_gpu)} is free (LoadOptions.check_memory=False skips this check)")


class _Placer:
    """Puts non-expert checkpoint tensors into the meta model under their in-memory names: renamed as transformers'
    conversion mapping renames them, and built as its converters build them where several stored tensors make one
    parameter or one makes several (Kimi-Linear's q/k/v convolutions concatenated, a vision tower's fused qkv split,
    ERNIE-4.5-VL's routers stored transposed and its two experts sets' score biases stacked in one tensor): such a
    converter's sources are kept until the last one is read (`expect` counts them), then its own `convert` runs, as
    in transformers' loading."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.dtype = model, device, dtype
        conversions = get_model_conversion_mapping(model)
        self.renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
        self.converters = [c for c in conversions if isinstance(c, WeightConverter)]
        self.pending: dict[str, list] = {}  # converter target -> [its converter with the sources read, sources left]
        self.meta_state = model.state_dict()
        self.fp32 = set(getattr(model, "_keep_in_fp32_modules_strict", None) or []) | \
            set(getattr(model, "_keep_in_fp32_modules", None) or [])
        self.unexpected: list[str] = []

    def name_of(self, key: str) -> Optional[str]:
        name, _ = rename_source_key(key, self.renamings, [], self.model.base_model_prefix, self.meta_state)
        return name if name in self.meta_state else None

    def _route(self, key: str) -> tuple[str, Optional[str]]:
        """(in-memory name, or a converter's first target; the converter's source pattern, None: a renaming)."""
        return rename_source_key(key, self.renamings, self.converters, self.model.base_model_prefix, self.meta_state)

    def expect(self, keys: Iterable[str]) -> None:
        """Count, per converter target, the (logical, non-expert) checkpoint keys it is built from."""
        counts = Counter(name for name, pattern in map(self._route, keys) if pattern is not None)
        self.pending = {name: [None, count] for name, count in counts.items()}

    def take(self, key: str, read) -> None:
        """Place the tensor `read()` of checkpoint key `key`, or keep it for its converter."""
        name, pattern = self._route(key)
        if pattern is None:
            if name in self.meta_state:
                self.place(name, read())
            else:
                self.unexpected.append(key)  # e.g. DeepSeek-V3's MTP layer; stock transformers skips these too
            return
        entry = self.pending.get(name)
        if entry is None:  # a converter's source the count left out: an expert of no MoE layer here (MTP layers)
            self.unexpected.append(key)
            return
        if entry[0] is None:
            entry[0] = copy.deepcopy(next(c for c in self.converters if pattern in c.source_patterns))
        entry[0].add_tensor(name, key, pattern, read())
        entry[1] -= 1
        if not entry[1]:
            del self.pending[name]
            self._place_converted(key, entry[0].convert(name, model=self.model, config=self.model.config))

    def _place_converted(self, key: str, tensors: dict) -> None:
        for name, tensor in tensors.items():
            if name not in self.meta_state:  # as stock transformers, which reports them as unexpected
                self.unexpected.append(name)
                continue
            self.place(name, tensor[0] if isinstance(tensor, list) else tensor)

    def place(self, name: str, tensor: torch.Tensor) -> None:
        dtype = None
        if tensor.is_floating_point():
            keep32 = any(re.search(rf"(^|\.){re.escape(m)}(\.|$)", name) for m in self.fp32)
            dtype = torch.float32 if keep32 else self.dtype
        set_module_tensor_to_device(self.model, name, self.device, value=tensor, dtype=dtype)


class _KeyRouter:
    """Where each checkpoint key goes, by its logical name (`logical_key`: INT4's `X.weight_packed` as `X.weight`,
    MXFP4's `X_blocks` as `X`), without the prefix the checkpoint puts before the model's names (Kimi-K2.5:
    `language_model.`). That prefix is found once, from the first key that matches a routed-expert template once a
    prefix is cut, and then cut from every key that has it, experts and the rest alike (the rest then resolve
    through transformers' rename_source_key). An
    expert key that matches no template as stored is tried once more under transformers' renamings of the model
    (`renamings`, e.g. Qwen3.5's PrefixChange that drops `language_model.`), as transformers' own loading reads it."""

    def __init__(self, family: MoEFamily, keys: Iterable[str], renamings=(), experts=None):
        """`experts`: the expert count of each experts module (ExpertsAt -> E), to tell apart experts sets whose
        per-expert names are the same and whose experts are blocks of one on-disk list (`MoEFamily.expert_block`)."""
        self.family, self.sets = family, family.experts_sets
        self.regexes = [[*r.expert_key_regexes().items(), *r.fused_key_regexes().items(),
                         *((f"{p}_bias", x) for p, x in r.bias_key_regexes().items())] for r in self.sets]
        self.experts = dict(experts or {})
        self.renamings = list(renamings)
        self.prefix = self._find_prefix(keys)

    def rule(self, at: ExpertsAt) -> MoEFamily:
        """The rule of the experts module at `at` (its own layout, math and biases)."""
        return self.sets[at.set]

    def logical(self, key: str) -> str:
        key = logical_key(key)
        return key[len(self.prefix):] if self.prefix and key.startswith(self.prefix) else key

    def expert(self, key: str) -> Optional[tuple[str, ExpertsAt, Optional[int]]]:
        """(projection, experts module, expert) of a routed-expert key (expert None: a fused tensor of all experts;
        projection `<p>_bias`: its biases)."""
        name = self.logical(key)
        route = self._match(name)
        if route is None and self.renamings:
            renamed, _ = rename_source_key(name, self.renamings, [])
            route = self._match(renamed) if renamed != name else None
        return route

    def _match(self, name: str) -> Optional[tuple[str, ExpertsAt, Optional[int]]]:
        claims = []
        for index, regexes in enumerate(self.regexes):
            for proj, regex in regexes:
                m = regex.match(name)
                if m:
                    expert = int(m["expert"]) if "expert" in regex.groupindex else None
                    claims.append((proj, ExpertsAt(int(m["layer"]), index), expert))
                    break
        return self._claimed(claims)

    def _claimed(self, claims: list) -> Optional[tuple[str, ExpertsAt, Optional[int]]]:
        """The claim of the experts set whose block of the on-disk expert list holds the expert, its index made
        the set's own; else the first claim as it is (an expert past the list fails where it is loaded, a layer
        without experts module is no expert key)."""
        for proj, at, expert in claims:
            block, count = self.sets[at.set].expert_block, self.experts.get(at)
            if expert is None or (count and expert // count == block):
                return proj, at, expert if expert is None else expert - block * count
        return claims[0] if claims else None

    def _find_prefix(self, keys: Iterable[str]) -> str:
        patterns = [regex for regexes in self.regexes for proj, regex in regexes if not proj.endswith("_bias")]
        for key in keys:
            parts = logical_key(key).split(".")
            for cut in range(len(parts)):
                if any(p.match(".".join(parts[cut:])) for p in patterns):
                    return "".join(f"{part}." for part in parts[:cut])
        return ""


def _check_stored(source: SourceFormat, files: CheckpointFiles, router: "_KeyRouter") -> None:
    """Every quantized weight's scales present and of the right shape (from the headers), MXFP4 blocks only where
    they stand for a routed experts' fused weight, before any weight is read; a checkpoint whose config declares a
    quantization but that stores no quantized tensor loads as it is."""
    reader = TensorReader(files)
    count = check_stored(source, files.headers, reader.get, where=lambda key: f"in {files.shard_of(key)}")
    for key, (dtype, _) in files.headers.items():
        route = router.expert(key) if key.endswith(MXFP4_BLOCKS) and is_quantized(key, dtype) else ("", 0, None)
        if route is None or route[2] is not None:
            raise ValueError(f"{key} ({files.shard_of(key)}): MXFP4 blocks of a tensor that is not a routed experts' "
                             "fused weight; kt-sft reads MXFP4 routed experts (gate_up_proj / down_proj) only")
    if source.quantized and not count:
        logger.warning("kt-sft: config.json declares %s, but no tensor is stored quantized; loading the tensors as "
                       "they are", source)


def _stream_shards(files: CheckpointFiles, layers: dict, router: _KeyRouter, placer: "_Placer",
                   source: SourceFormat, progress: bool, experts: bool = True) -> None:
    """Every tensor of every shard to its place; `experts` False: the dense tensors and the experts' biases only (a
    rank whose host's experts another rank packs: the shared store holds the packed weights, each rank its own
    small fp32 biases)."""
    reader = TensorReader(files)
    for shard, kinds in tqdm(files.sources.items(), desc="kt-sft: loading shards", disable=not progress):
        if not experts:
            kinds = {"all": "dense+biases", "experts": "biases"}.get(kinds, kinds)
        reader.use(shard)
        for key in files.keys[shard]:
            try:
                _load_key(key, kinds, reader, router, layers, placer, source)
            except (RuntimeError, ValueError) as err:  # about this tensor: reading, decoding, shape, packing (the
                # engine's settings are parsed at import and set before streaming, so none of theirs lands here)
                raise type(err)(f"{key} in {shard.name}: {err}") from err


def _load_key(key: str, kinds: str, reader: TensorReader, router: _KeyRouter, layers: dict, placer: "_Placer",
              source: SourceFormat) -> None:
    """Route one checkpoint tensor: into an engine layer, onto the model, or (kinds says) not from this shard.
    Companions (scales, shapes) are read with their weight, never on their own."""
    if is_companion(key, source):
        return
    route = router.expert(key)
    if route is not None and route[1] in layers:
        proj, layer, expert = route
        if kinds == "dense" or (kinds in ("biases", "dense+biases") and not proj.endswith("_bias")):
            return
        family = router.rule(layer)
        if proj.endswith("_bias"):
            _load_bias(layers[layer], proj[: -len("_bias")], expert, _read(key, reader, source), family)
        elif expert is None and key.endswith(MXFP4_BLOCKS):
            _load_mxfp4(layers[layer], proj, key, reader, family)
        elif expert is None:
            _load_fused(layers[layer], proj, _fused_rows(_read(key, reader, source), layers[layer], proj, family), 0,
                        family)
        else:
            _load_projection(layers[layer], proj, expert, key, reader, source)
        return
    if kinds in ("experts", "biases"):
        return
    placer.take(router.logical(key), lambda: _read(key, reader, source))


def _load_bias(layer, proj: str, expert: Optional[int], tensor: torch.Tensor, family: MoEFamily) -> None:
    """Experts' biases into their layer: fused [E, 2I] gate_up (halves, or interleaved as the math says), [E, H]
    down, [E, I] up; or one expert's [I] / [H]."""
    if proj == "gate_up":
        layer.load_gate_up_bias(tensor, interleaved=family.math.interleaved)
    else:
        layer.set_bias(proj, tensor, expert or 0)


def _read(key: str, reader: TensorReader, source: SourceFormat) -> torch.Tensor:
    """The tensor stored under `key`: as stored, or, for a quantized weight (not a routed expert's), decoded to fp32
    (its scales read from whichever shard holds them; `decode`)."""
    tensor = reader.get(key)
    if not is_quantized(key, tensor.dtype):
        return tensor
    return decode(source, key, lambda k: tensor if k == key else reader.get(k))


def _fused_shape(layer, proj: str) -> tuple[int, int, int]:
    """[E, rows, cols] of a fused projection in the engine's orientation: gate_up [E, 2I, H], down [E, H, I]."""
    rows, cols = layer.projection_shape("down" if proj == "down" else "up")  # up: gate's shape, and ungated too
    return layer.num_experts, rows * (2 if proj == "gate_up" else 1), cols


def _fused_rows(stored: torch.Tensor, layer, proj: str, family: MoEFamily) -> torch.Tensor:
    """A fused experts tensor as stored -> [E, out, in] (a view): stored as the model's parameter ([E, in, out] for
    transposed experts modules, gpt-oss), or, where transformers' conversion mapping transposes it on load
    (`family.disk_transposed`: Qwen3-VL-MoE), as the parameter's transpose, told apart by shape as transformers does
    (a shape equal to the parameter's is taken as it is)."""
    E, rows, cols = _fused_shape(layer, proj)
    param = (E, cols, rows) if family.transposed else (E, rows, cols)
    if tuple(stored.shape) == param:
        tensor = stored
    elif family.disk_transposed and tuple(stored.shape) == (E, param[2], param[1]):
        tensor = stored.transpose(1, 2)
    else:
        raise ValueError(f"the stored tensor is {list(stored.shape)}, but the model's fused {proj}_proj is "
                         f"{list(param)}{' (or its transpose)' if family.disk_transposed else ''}")
    return tensor.transpose(1, 2) if family.transposed else tensor


def _load_fused(layer, proj: str, rows: torch.Tensor, expert_begin: int, family: MoEFamily) -> None:
    """Experts expert_begin.. of a fused projection, [n, out, in] (`_fused_rows`), into the layer: gate_up's gate
    and up rows as [gate | up] halves, or alternating where the experts math says so (gpt-oss), as strided views."""
    if proj == "gate_up":
        layer.load_gate_up(rows, expert_begin, interleaved=family.math.interleaved)
    else:
        layer.set_projection(proj, rows, expert_begin)


def _load_mxfp4(layer, proj: str, key: str, reader: TensorReader, family: MoEFamily) -> None:
    """A fused projection stored as MXFP4 (`X_blocks` + `X_scales`, [E, out, in/32, 16] whatever the parameter's
    orientation) into the layer: a few experts at a time decoded to bf16 in torch (exact) and packed from there
    into the layer's format (bf16 keeps them, int8 / int4 quantize them as from any bf16 weights). Host memory
    beyond the mmap-ed shard: one step's indices and bf16 values (`mxfp4_experts_per_step`: one gpt-oss-120b
    expert's gate_up, 66 MB)."""
    blocks, scales = reader.get(key), reader.get(key[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES)
    E, rows, cols = _fused_shape(layer, proj)
    groups = -(-cols // 32)
    if tuple(blocks.shape) != (E, rows, groups, 16) or tuple(scales.shape) != (E, rows, groups):
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} / scales {list(scales.shape)}, but the model's fused "
                         f"{proj}_proj [{E}, {rows}, {cols}] (experts, out, in) needs [{E}, {rows}, {groups}, 16] / "
                         f"[{E}, {rows}, {groups}]")
    step = mxfp4_experts_per_step(blocks)
    for e0 in range(0, E, step):
        _load_fused(layer, proj, decode_mxfp4(blocks[e0: e0 + step], scales[e0: e0 + step], cols), e0, family)


def _load_projection(layer, proj: str, expert: int, key: str, reader: TensorReader, source: SourceFormat) -> None:
    """One expert's projection into its layer, as the checkpoint stores it: a plain weight as it is, a quantized one as
    its codes and scales (`encoded`), which the engine keeps as they are when the layer's format stores their element
    type (the plan gave that format the checkpoint's scale grid, `_fit_to_source`) and otherwise decodes itself,
    exactly as `decode` would, and packs into the format: no fp32 copy of the weight, no torch threads beside the
    engine's."""
    tensor = reader.get(key)
    enc = encoded(source, key, reader.get, tensor)
    if enc is None:
        layer.set_projection(proj, tensor, expert)
        return
    if enc.shape != layer.projection_shape(proj):  # INT4's weight_shape against the model's
        raise ValueError(f"the stored weight is {list(enc.shape)} but the model's {proj} projection is "
                         f"{list(layer.projection_shape(proj))}")
    layer.set_projection(proj, enc.codes, expert, scale=enc.scale, block=enc.block)


def _check_experts_loaded(layers: dict, plan: LoadPlan, files: CheckpointFiles, prefix: str) -> None:
    """Every expert projection of every layer came from some shard; else name the first missing tensor."""
    for at, layer in sorted(layers.items()):
        missing = layer.missing_weights()
        if missing:
            expert, proj, *bias = missing[0].split()[1:]
            rule = plan.family.experts_sets[at.set]
            key = prefix + rule.expected_key(proj, at.layer, rule.disk_expert(int(expert), layer.num_experts),
                                             bias=bool(bias))
            suffix = None if bias else {"int4-group": "_packed", "mxfp4": MXFP4_BLOCKS}.get(plan.source.name)
            stored = [key, key + suffix] if suffix else [key]
            listed = next((files.index[k] for k in stored if k in files.index), None)
            where = f"the index maps it to {listed}, which lacks it" if listed else "no shard contains it"
            module = rule.experts_module.format(layer=at.layer)
            raise KeyError(f"expert tensor {' / '.join(stored)} is missing ({where}); {len(missing)} expert "
                           f"projections of {module} were never loaded. Is the checkpoint complete?")


def _read_generation_config(model, path: Path) -> None:
    """The checkpoint's generation_config.json (its eos list, sampling defaults), as stock `from_pretrained` reads
    it; without the file the model keeps the one derived from its config, as stock does."""
    if model.can_generate() and (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def _call_policy(layer, opts: LoadOptions, family: MoEFamily) -> ExpertCallPolicy:
    share = None
    if opts.gpu_experts and opts.device.type == "cuda":
        experts = "auto" if opts.gpu_experts == "auto" else max(1, round(opts.gpu_experts * layer.num_experts))
        share = engine.GpuShare(layer, experts, opts.device)
    return ExpertCallPolicy(chunk_size=opts.chunk_size, retain=opts.retain_activations, share=share,
                            transposed=family.transposed, interleaved=family.math.interleaved)


# Cores left to the thread that launches the GPU share's work while the engine computes (forward: the caller's;
# backward: autograd's device thread). With every core in the engine's pool, that thread time-shares a core with a
# worker, and a worker descheduled mid-task holds up its phase's barrier (the pool's other workers spin on it).
LAUNCH_CORES = 1


def reserve_launch_cores(threads: int, shared: bool) -> None:
    """With a GPU share (`shared`) and the engine's threads left to auto (`threads` 0: no option, no family
    default; no KT_SFT_THREADS), the pool gets LAUNCH_CORES fewer threads."""
    if shared and not threads and not os.environ.get("KT_SFT_THREADS"):
        engine.set_num_threads(max(1, engine.num_threads() - LAUNCH_CORES))


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


def _summary(layers: dict, plan: LoadPlan, device: torch.device) -> str:
    experts = sum(l.num_experts for l in layers.values())
    packed = sum(l.packed_bytes for l in layers.values())
    stored = plan.format.label + (f" from {plan.source.name}" if plan.source.quantized else "")
    nodes = len(engine.numa_layout()["nodes"])
    numa = f", {nodes} NUMA nodes" if nodes > 1 else ""
    sets = len(plan.family.experts_sets)
    where = f"{len({at.layer for at in layers})} MoE layers" + (f" x {sets} experts modules" if sets > 1 else "")
    return (f"kt-sft: {where} / {experts} experts ({_size(packed)} {stored}) on CPU engine "
            f"[{engine.current_isa()}, {engine.num_threads()} threads{numa}]; dense on {device}")


def describe(path: str | os.PathLike) -> list[str]:
    """What kt-sft makes of a checkpoint directory, from config.json alone (for `python -m kt_sft env PATH`): its
    family and source format, the host RAM of its experts in each expert format, the default format, and on several
    NUMA nodes which experts each node holds."""
    plan = plan_load(path, device="cpu", dtype=torch.bfloat16, progress=False)
    shapes = plan.expert_shapes
    experts = {E for E, _, _ in shapes.values()}
    sets = len(plan.family.experts_sets)
    modules = f" x {sets} experts modules" if sets > 1 else ""
    lines = [f"checkpoint {plan.path}: {plan.family.model_type}, {len({at.layer for at in shapes})} MoE layers"
             f"{modules} x "
             f"{'/'.join(map(str, sorted(experts)))} experts, stored {plan.source}",
             "  experts in host RAM: " + ", ".join(f"{f.backends[-1]} {_size(plan.expert_bytes(f))}"
                                                   for f in _formats_for(plan)),
             f"  default expert format (bf16 model): {plan.format.label} ({plan.format_reason})"]
    for E in sorted(experts):
        nodes = engine.expert_nodes(E)
        if len(nodes) > 1:
            lines.append(f"  experts on NUMA nodes ({E} per layer): " + ", ".join(
                f"{first}-{end - 1} on node {n}" if end - first > 1 else f"{first} on node {n}" if end > first
                else f"none on node {n}" for n, (first, end, _) in enumerate(nodes)))
    return lines

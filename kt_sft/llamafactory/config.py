"""The `kt_*` config surface: which keys a LLaMA-Factory YAML may carry with `use_kt: true`, what they mean, and
the checks that run before any weight is loaded.

Every key is declared once, as a `KeySpec` in `KEY_SPECS` (name, parser, default, aliases, help, the `KTSettings`
field it sets, and who parses it). Everything else is derived from that table: the `KTSettings` fields and their
defaults, which keys `split_kt_keys` takes out of LLaMA-Factory's arguments, the unknown-key error and its list
of accepted keys, each key's parse error, and README.md's "Config keys" table (`python -m
kt_sft.llamafactory.config README.md` rewrites it; a test compares them).

LLaMA-Factory 0.9.5 declares a few KT fields itself (`use_kt`, `kt_weight_path`, `kt_expert_checkpoint_path`, ...):
it parses those into its ModelArguments and we only check them. Our keys (`kt_backend`, `chunk_size`, ...) are not
LLaMA-Factory fields, so the hook takes them out of the arguments before LLaMA-Factory parses them
(`split_kt_keys`) and validates everything together once the dataclasses exist (`resolve`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Callable, Optional

from .. import readme_tables
from ..checkpoint_formats import source_format
from ..engine.formats import FORMATS, ExpertFormat, backend_names, get_format
from ..engine.runtime import numa_setting
from ..models.registry import MoEFamily, UnsupportedModelError

SUPPORTED_STAGES = ("sft", "pt", "dpo", "kto")
# Stages whose loss compares the policy with a reference model: with use_kt the reference is the policy with its
# adapter disabled (PEFT's disable_adapter), never a second copy of the routed experts (_check_reference).
PREFERENCE_STAGES = ("dpo", "kto")
# Who parses a key (KeySpec.source).
OURS = "kt-sft"                 # the hook takes it out of LLaMA-Factory's arguments and parses it
LLAMAFACTORY = "LLaMA-Factory"  # a field of LLaMA-Factory's ModelArguments: parsed there, checked here
RETIRED = "KTransformers"       # a KTransformers key with no kt-sft meaning: refused, its help is the advice
# What a setting configures (KeySpec.use).
LOAD = "load"                   # kt_sft.load_model: the setting is the LoadOptions field of its name
EXPORT = "export"               # `llamafactory-cli export`: an export_checkpoint argument (kt_sft/llamafactory/exporting.py)


class KTConfigError(ValueError):
    """A `kt_*` key or an argument combination kt-sft cannot run; raised before any weight is loaded."""


Parser = Callable[[str, Any], Any]  # (key as given, value as given) -> the setting's value; raises KTConfigError


@dataclasses.dataclass(frozen=True)
class KeySpec:
    """One config key: everything the hook, its checks and README's key table know about it."""

    name: str
    help: str                       # README's meaning; for a RETIRED key, the advice its error gives
    source: str = OURS
    setting: Optional[str] = None   # the KTSettings field it sets (None: checked only)
    parse: Optional[Parser] = None  # None: nothing to parse (use_kt, RETIRED keys)
    default: Any = None             # the key's value when unset, as a YAML gives it; None: auto (see help)
    aliases: tuple = ()             # other names for the same key; several given must parse to equal values
    use: str = LOAD                 # what the setting configures: LOAD or EXPORT

    @property
    def names(self) -> tuple:
        return (self.name, *self.aliases)


def _text(key: str, value: Any) -> str:
    return str(value)


def _integer(minimum: int) -> Parser:
    """An int, or a string of digits (YAML/CLI overrides); not a bool, a float or anything else."""
    def parse(key: str, value: Any) -> int:
        text = str(value).strip()
        if isinstance(value, bool) or not re.fullmatch(r"-?\d+", text) or int(text) < minimum:
            raise KTConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")
        return int(text)
    return parse


def _boolean(key: str, value: Any) -> bool:
    """true/false as YAML gives them (or the words from a command-line override)."""
    words = {"true": True, "false": False}
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() not in words:
        raise KTConfigError(f"{key}: expected true or false, got {value!r}")
    return words[str(value).strip().lower()]


def _gpu_experts(key: str, value: Any):
    """"auto" or a fraction."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _fraction(key, value)
    except KTConfigError:
        raise KTConfigError(f"{key}: expected auto or a fraction between 0 and 1, got {value!r}") from None


def _fraction(key: str, value: Any) -> float:
    try:
        fraction = float(value)
    except (TypeError, ValueError):
        fraction = -1.0
    if isinstance(value, bool) or not 0.0 <= fraction <= 1.0:  # NaN fails the comparison too
        raise KTConfigError(f"{key}: expected a fraction between 0 and 1, got {value!r}")
    return fraction


def _choice(meanings: dict) -> Parser:
    """One of a few words, each standing for a setting value."""
    def parse(key: str, value: Any) -> Any:
        if str(value) not in meanings:
            raise KTConfigError(f"{key}: expected {' or '.join(meanings)}, got {value!r}")
        return meanings[str(value)]
    return parse


def _expert_format(key: str, value: Any) -> ExpertFormat:
    name = str(value).strip().upper()
    if name not in backend_names():
        raise KTConfigError(f"{key}: {value!r} is not one of {', '.join(backend_names())}")
    return get_format(name)


def _numa(key: str, value: Any) -> Any:
    """auto / off / a node count (kt_sft.engine.set_numa); YAML reads a bare `off` as false, which means off here."""
    if value is False:
        return "off"
    try:
        return numa_setting(value, key)
    except ValueError as err:
        raise KTConfigError(str(err)) from None


def _directory(key: str, value: Any) -> str:
    if not os.path.isdir(str(value)):
        raise KTConfigError(f"{key}={value!r}{_relative_note(value)} is not a directory")
    return str(value)


def _refused(advice: str, allowed: tuple = ()) -> Parser:
    """A key kt-sft cannot honour: any value other than `allowed` fails with the advice."""
    def parse(key: str, value: Any) -> None:
        if not any(value is ok for ok in allowed):
            raise KTConfigError(f"{key}={value!r}: {advice}")
    return parse


def _backend_help() -> str:
    """kt_backend's meaning, one clause per row of the format table (a new format documents itself)."""
    formats = "; ".join(f"{' / '.join(f.backends)}: {f.doc}" for f in FORMATS.values())
    return (f"Expert weight format and GEMMs. {formats}. Unset: fp32 experts for an fp32 model; for a quantized "
            "checkpoint the smallest format at least as wide as its weights, its own element type first (FP8 from "
            "FP8, INT4 from INT4: the checkpoint's codes and scales kept exactly); else a rule file's "
            "defaults.format, bf16 without one.")


KEY_SPECS: tuple[KeySpec, ...] = (
    KeySpec("use_kt", "Turn the CPU expert engine on (the hook also needs USE_KT=1 in the environment).",
            LLAMAFACTORY),
    KeySpec("kt_optimize_rule", "Model family rule file (the format of configs/*.yaml) replacing the rule kt-sft "
            "derives from the model, or a family name (the checkpoint's model_type, e.g. qwen3_moe). Unset: "
            "derived from the model (python -m kt_sft families lists every family).",
            setting="rule", parse=_text),
    KeySpec("kt_backend", _backend_help(), setting="format", parse=_expert_format),
    KeySpec("kt_int4_group_size", "Weights per scale along the input dimension when INT4 / AMXINT4 experts are "
            "quantized while loading from bf16 or FP8 weights (symmetric groups; a size that does not divide the "
            f"hidden or intermediate size leaves a partial last group). Unset: {FORMATS['int4'].scale_block[1]}. "
            "An INT4 checkpoint's experts keep their own groups (another size is refused), and experts in any "
            "other format refuse the key.",
            setting="int4_group", parse=_integer(1)),
    KeySpec("kt_num_threads", "CPU engine threads. 0: a rule file's defaults.threads, else auto (KT_SFT_THREADS, "
            "else the physical cores of the CPU set). `cpu_infer` is its KTransformers name.",
            setting="threads", parse=_integer(0), default=0, aliases=("cpu_infer",)),
    KeySpec("kt_numa", "NUMA nodes of the CPU engine: auto (the nodes this process's cpus span: one on a one-socket "
            "host), off (one node), or a node count N (N > 1 on a one-node host: N virtual nodes, for testing the "
            "split). Each MoE layer's experts are cut into one contiguous range per node (expert e on node e·N/E), "
            "their weights placed in that node's memory and their tasks run first by that node's workers, pinned to "
            "its cpus, which then help the other nodes. Unset: KT_SFT_NUMA, else auto. `python -m kt_sft env` "
            "shows the layout.", setting="numa", parse=_numa),
    KeySpec("chunk_size", "Most tokens per engine call: longer micro-batches are split, bounding the engine's "
            "scratch memory. 0: the whole micro-batch in one call.", setting="chunk_size", parse=_integer(0),
            default=0),
    KeySpec("kt_cpu_activation", "retain: a gradient-checkpoint recompute reuses the CPU experts' forward instead "
            "of running it again; recompute: run it again (less host RAM, more CPU time).",
            setting="retain_activations", parse=_choice({"retain": True, "recompute": False}), default="retain"),
    KeySpec("kt_gpu_experts", "Routed experts that training / prefill calls of >= 1024 tokens compute on the GPU, "
            "their weights streamed from RAM per call while the CPU engine runs the rest. auto: per call and MoE "
            "layer, the experts with the most tokens, as many as make the GPU and the CPU engine finish together "
            "by the rates measured on the calls so far (a log line says the split when it moves; the engine keeps "
            "one core fewer for the GPU's launches unless kt_num_threads is set); a fraction F: the last F x E "
            "experts of each layer; 0: all on the CPU. Without a CUDA device everything runs on the CPU. Costs GPU "
            "memory for a few experts at a time (a staging ring of 560 MiB that the copy engine fills ahead of "
            "each call).",
            setting="gpu_experts", parse=_gpu_experts, default="auto"),
    KeySpec("kt_max_cache_depth", "Forward results each MoE layer keeps for backward; raise it if an error says a "
            "saved forward was evicted. A `chunk_size` split raises it, per layer, to the number of calls a batch "
            "needs.", setting="max_saved", parse=_integer(1), default=4),
    KeySpec("kt_check_memory", "Before loading, check that host RAM holds the packed experts (+ 10 % + one shard) "
            "and the GPU the non-expert weights, and refuse early when they do not; false skips the check.",
            setting="check_memory", parse=_boolean, default="true"),
    KeySpec("kt_export_format", "`llamafactory-cli export` only: the format of the merged checkpoint. bf16: every "
            "weight in bf16 (an FP8 / INT4 base's quantized weights dequantized; weights stored as other floats keep "
            "their dtype; infer_dtype casts them all). fp8 (a block-FP8 base only): every weight the base stores in "
            "block FP8 stays so, the merged ones (LoRA targets, routed experts with expert LoRA) requantized on the "
            "base's own block grid, and config.json keeps the quantization_config.", setting="export_format",
            parse=_choice({"bf16": "bf16", "fp8": "fp8"}), default="bf16", use=EXPORT),
    KeySpec("kt_expert_checkpoint_path", "Directory whose safetensors hold the routed-expert tensors when they are "
            "not in model_name_or_path (same key names). Unset: model_name_or_path.", LLAMAFACTORY,
            setting="expert_path", parse=_directory),
    KeySpec("kt_weight_path", "Pre-quantized KTransformers .kt expert files: not supported (kt-sft reads "
            "safetensors).", LLAMAFACTORY, parse=_refused(
                "pre-quantized .kt expert files are not supported; point model_name_or_path at the safetensors "
                "checkpoint and remove the key")),
    KeySpec("kt_use_lora_experts", "kt-kernel's extra GPU-side 'LoRA experts': not supported; must be false or "
            "unset.", LLAMAFACTORY, parse=_refused("kt-kernel's GPU-side LoRA experts are not supported; remove the "
                                                   "key (LoRA targets come from lora_target)", allowed=(False,))),
    *(KeySpec(name, "Belongs to kt_use_lora_experts: not supported; must be unset.", LLAMAFACTORY,
              parse=_refused("belongs to kt_use_lora_experts, which kt-sft does not support; remove it"))
      for name in ("kt_lora_expert_num", "kt_lora_expert_intermediate_size")),
    KeySpec("kt_maxlen", "use LLaMA-Factory's cutoff_len", RETIRED),
    KeySpec("kt_use_cuda_graph", "kt-sft does not capture CUDA graphs; remove the key", RETIRED),
    KeySpec("kt_force_think", "use a thinking template (e.g. template: qwen3) instead", RETIRED),
    KeySpec("kt_mode", "remove the key: kt-sft has one training mode", RETIRED),
    KeySpec("kt_share_cache_pool", "remove the key: kt-sft shares engine scratch across layers always", RETIRED),
)
_BY_NAME: dict[str, KeySpec] = {name: spec for spec in KEY_SPECS for name in spec.names}


def _setting_default(spec: KeySpec) -> Any:
    return None if spec.default is None else spec.parse(spec.name, spec.default)


KTSettings = dataclasses.make_dataclass("KTSettings", [
    *((s.setting, Any, dataclasses.field(default=_setting_default(s))) for s in KEY_SPECS if s.setting),
    ("loss_chunk_tokens", Optional[int], dataclasses.field(default=None)),  # None: load_model's default; 0: stock
    ("family", Optional[MoEFamily], dataclasses.field(default=None, compare=False, repr=False)),  # by _check_model
], namespace={"__module__": __name__, "__doc__": (
    "What the loader and engine need, resolved from the YAML: one field per KeySpec.setting (default: its key's "
    "default, parsed), plus loss_chunk_tokens (from the loss LLaMA-Factory trains with) and family (the registry "
    "entry of the checkpoint, resolved once by the checks).")})


def load_fields(settings) -> dict:
    """The `kt_sft.load_options.LoadOptions` fields the settings give (each LOAD KeySpec.setting is a LoadOptions
    field name), loss_chunk_tokens when the run's loss decided it; the rest (device, dtype, ...) is LLaMA-Factory's."""
    fields = {s.setting: getattr(settings, s.setting) for s in KEY_SPECS if s.setting and s.use == LOAD}
    if settings.loss_chunk_tokens is not None:
        fields["loss_chunk_tokens"] = settings.loss_chunk_tokens
    return fields


def _is_ours(key: str) -> bool:
    """Keys the hook takes out of LLaMA-Factory's arguments: our keys, retired ones, and unknown `kt_*` keys (kept so
    `resolve` can name them)."""
    spec = _BY_NAME.get(key)
    return spec.source != LLAMAFACTORY if spec is not None else key.startswith("kt_")


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


def _refuse_unknown_and_retired(keys: dict[str, Any]) -> None:
    unknown = sorted(k for k in keys if k not in _BY_NAME)
    if unknown:
        accepted = ", ".join(sorted(n for n, spec in _BY_NAME.items() if spec.source != RETIRED))
        raise KTConfigError(f"unknown kt-sft key(s) {', '.join(unknown)}; accepted keys: {accepted} "
                            "(meanings in README.md, 'Config keys')")
    retired = sorted(k for k in keys if _BY_NAME[k].source == RETIRED)
    if retired:
        raise KTConfigError(f"{retired[0]} is a KTransformers key kt-sft does not use: {_BY_NAME[retired[0]].help}")


def _given(spec: KeySpec, keys: dict[str, Any], model_args) -> dict[str, Any]:
    """name -> value for each of the spec's names that is set (None and "" mean unset)."""
    if spec.source == LLAMAFACTORY:
        values = {spec.name: getattr(model_args, spec.name, None)}
    else:
        values = {name: keys.get(name) for name in spec.names}
    return {name: value for name, value in values.items() if value is not None and value != ""}


def _settings_from_keys(keys: dict[str, Any], model_args) -> KTSettings:
    _refuse_unknown_and_retired(keys)
    values = {}
    for spec in KEY_SPECS:
        given = _given(spec, keys, model_args)
        if spec.parse is None or not given:
            continue
        parsed = {name: spec.parse(name, value) for name, value in given.items()}
        if len(set(parsed.values())) > 1:
            names = " and ".join(f"{name}={value}" for name, value in given.items())
            raise KTConfigError(f"{names} disagree; they are the same setting, give one")
        if spec.setting:
            values[spec.setting] = next(iter(parsed.values()))
    return KTSettings(**values)


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
            reference = (" and its reference model is the same model with the adapter disabled"
                         if finetuning_args.stage in PREFERENCE_STAGES else "")
            raise KTConfigError(f"finetuning_type={finetuning_args.finetuning_type!r} with use_kt: kt-sft trains "
                                f"LoRA adapters only (the routed experts are frozen{reference}); set "
                                "finetuning_type: lora")
        if training_args is not None and getattr(training_args, "do_train", False) \
                and finetuning_args.stage not in SUPPORTED_STAGES:
            raise KTConfigError(f"stage={finetuning_args.stage!r} with use_kt: supported stages are "
                                f"{', '.join(SUPPORTED_STAGES)}")
        if getattr(finetuning_args, "use_asft_loss", False):
            settings.loss_chunk_tokens = 0  # ASFT reads the training forward's logits (labels passed along)
        _check_reference(model_args, finetuning_args)
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
    model = _check_model(model_args, settings)
    from .preflight import check_run  # the checks of files and machine, on the model built on meta

    check_run(model_args, settings, keys, model, finetuning_args, training_args)
    return settings


def _relative_note(path) -> str:
    """For an error about a path that does not exist: where a relative one was looked for."""
    return "" if not path or os.path.isabs(str(path)) else f" (relative to the working directory {os.getcwd()})"


def same_checkpoint(a, b) -> bool:
    """Whether two model paths name the same directory (a symlink or another spelling of it counts)."""
    try:
        return os.path.samefile(str(a), str(b))
    except OSError:
        return False


def _check_reference(model_args, finetuning_args) -> None:
    """DPO / KTO with use_kt: the reference model is the policy with its adapter disabled, so the routed experts stay
    in RAM once. A `ref_model` naming the base checkpoint itself is that model and is reused (patches.
    patch_preference_workflow); any other reference would load a second copy of the experts and is refused."""
    if finetuning_args.stage not in PREFERENCE_STAGES:
        return
    ref = getattr(finetuning_args, "ref_model", None)
    how = ("with use_kt the reference model is model_name_or_path with the LoRA adapter disabled (no second copy "
           "of the routed experts)")
    if ref is not None and not same_checkpoint(ref, model_args.model_name_or_path):
        raise KTConfigError(f"ref_model={ref!r}: {how}, so a different reference model cannot be used; remove "
                            "ref_model or set it to model_name_or_path")
    for key in ("ref_model_adapters", "ref_model_quantization_bit"):
        if getattr(finetuning_args, key, None) is not None:
            raise KTConfigError(f"{key}={getattr(finetuning_args, key)!r}: {how}; remove {key}")


def _check_model(model_args, settings: KTSettings):
    """A local checkpoint of a supported family (kt-sft never downloads), checked before anything is loaded; its
    registry entry goes into `settings.family` so the loader does not resolve it again. Returns its model built on
    the meta device (what the later checks hold adapters and lora_target against)."""
    path = getattr(model_args, "model_name_or_path", None)
    config_file = os.path.join(str(path), "config.json")
    if not path or not os.path.isfile(config_file):
        where = _relative_note(path)
        raise KTConfigError(f"model_name_or_path={path!r}{where}: no config.json there; use_kt needs a local Hugging "
                            "Face checkpoint directory (config.json + *.safetensors); kt-sft does not download "
                            f"models{': give an absolute path, or run from the directory it is relative to' if where else ''}")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except ValueError as err:
        raise KTConfigError(f"{config_file} is not valid JSON: {err}") from err
    try:
        from ..loader import checkpoint_model  # transformers' model code: only once a config names use_kt

        settings.family, model = checkpoint_model(path, settings.rule)
        # Before LLaMA-Factory's own quantization set-up, which would ask for gptqmodel, autoawq, ... instead.
        source_format(config.get("quantization_config"), config_file)
    except (UnsupportedModelError, FileNotFoundError, ValueError) as err:
        raise KTConfigError(f"model_name_or_path={path!r}: {err}") from err
    return model


def _check_training(training_args) -> None:
    from transformers.integrations import is_deepspeed_zero3_enabled

    if getattr(training_args, "deepspeed", None) and is_deepspeed_zero3_enabled():
        raise KTConfigError("DeepSpeed ZeRO-3 with use_kt: ZeRO-3 shards parameters across GPUs but the routed "
                            "experts live in CPU RAM outside it; use ZeRO-2 / no DeepSpeed")
    _check_fsdp(training_args)
    if getattr(training_args, "world_size", 1) > 1:
        from .. import distributed

        distributed.set_timeout(getattr(training_args, "ddp_timeout", None) or 1800)
    if getattr(training_args, "n_gpu", 1) > 1:
        raise KTConfigError(f"{training_args.n_gpu} GPUs are visible and the Trainer would replicate the model "
                            "over them (DataParallel); kt-sft uses one GPU: set CUDA_VISIBLE_DEVICES=0")


def _fsdp_settings(training_args) -> Optional[tuple[int, bool]]:
    """(FSDP version, whether it offloads parameters) of this run, None without FSDP: from `accelerate launch`'s
    FSDP config (the ACCELERATE_USE_FSDP / FSDP_* variables it sets, as LLaMA-Factory documents FSDP) or from the
    Trainer's own `fsdp` / `fsdp_config` keys."""
    env = lambda name, default: os.environ.get(name, default).strip().lower()
    if env("ACCELERATE_USE_FSDP", "false") in ("1", "true"):
        return int(env("FSDP_VERSION", "1")), env("FSDP_OFFLOAD_PARAMS", "false") in ("1", "true")
    given = getattr(training_args, "fsdp", None) or []
    options = given.split() if isinstance(given, str) else [str(getattr(o, "value", o)) for o in given]
    if not options:
        return None
    config = getattr(training_args, "fsdp_config", None) or {}
    return int(config.get("version", config.get("fsdp_version", 1))), "offload" in options


def _check_fsdp(training_args) -> None:
    """FSDP2 shards the dense part over the GPUs (kt_sft.distributed: the experts and their LoRA factors stay out
    of it); FSDP1 and parameter offloading are refused, saying what to set instead."""
    from .. import distributed

    fsdp = _fsdp_settings(training_args)
    distributed.set_fsdp(fsdp is not None)
    if fsdp is None:
        return
    version, offload = fsdp
    if version != 2:
        raise KTConfigError(f"FSDP version {version} with use_kt: FSDP1 flattens each wrapped module's parameters "
                            "into one, which cannot leave out the expert-LoRA factors (fp32 CPU tensors the engine "
                            "reads); use FSDP2: fsdp_version: 2 in the accelerate config (or fsdp_config: "
                            "{version: 2}); README.md, 'The dense part over several GPUs'")
    if offload:
        raise KTConfigError("FSDP parameter offloading (fsdp_offload_params) with use_kt is not supported: the "
                            "routed experts already fill host RAM and its cores run them, where offloading would "
                            "keep the dense shards and run their optimizer step; set fsdp_offload_params: false, "
                            "and shard over more GPUs if the dense part does not fit them")


def readme_table() -> str:
    """README.md's "Config keys" table, one row per key name (aliases get their own row, pointing at the key)."""
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for spec in KEY_SPECS:
        default = "—" if spec.source == RETIRED else "unset" if spec.default is None else f"`{spec.default}`"
        meaning = {OURS: spec.help, LLAMAFACTORY: f"{spec.help} LLaMA-Factory parses it; kt-sft checks it.",
                   RETIRED: f"KTransformers key with no kt-sft meaning, refused with the advice: {spec.help}."}
        rows.append(f"| `{spec.name}` | {default} | {meaning[spec.source]} |")
        rows += [f"| `{alias}` | | Another name for `{spec.name}` (same meaning; give one, or equal values). |"
                 for alias in spec.aliases]
    return "\n".join(rows) + "\n"


KEYS_HEADING = "### Config keys"


def readme_key_table(readme: str) -> str:
    return readme_tables.table_in(readme, KEYS_HEADING)


def with_readme_table(readme: str) -> str:
    return readme_tables.with_table(readme, KEYS_HEADING, readme_table())


if __name__ == "__main__":
    # `python -m kt_sft.llamafactory.config`: print the table; `... README.md`: rewrite the table in that file.
    if len(sys.argv) > 1:
        readme_tables.rewrite(sys.argv[1], KEYS_HEADING, readme_table())
    else:
        sys.stdout.write(readme_table())

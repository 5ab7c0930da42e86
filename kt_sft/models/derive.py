"""A MoE family's rule derived from the model itself: no rule file for any transformers family with fused experts.

  class      the auto class LLaMA-Factory 0.9.5 loads the config with (`model_class`: image-text-to-text first, then
             seq2seq, text-to-waveform, else causal LM); omni models (text-to-waveform) are refused for now
  where      the experts modules are the modules transformers' `@use_experts_implementation` marks with has_gate /
             has_bias / is_transposed; their names give the `experts_module` template (the first index in the name
             is the layer) and so the MoE layers; several templates (ERNIE-4.5-VL: text + vision experts in each
             MoE layer) give one rule each (`MoEFamily.more`), each experts module an engine layer of its own
  on disk    transformers' own checkpoint conversion mapping (`get_model_conversion_mapping`): the WeightConverter
             that builds a fused parameter from per-expert tensors is read as an index map (MergeModulelist(dim=0):
             `*` is the expert index; Concatenate(dim=1): source j is block j of [gate | up]), its source patterns
             with the model's renamings undone give the per-expert names on disk, and transformers'
             `rename_source_key` must map each back to the fused parameter (checked here). So experts stream one
             tensor at a time, as before. ERNIE-4.5-VL's ErnieFuseAndSplitTextVisionExperts reads the same way
             per target: target j (text, vision) stacks block j of the on-disk expert list (`expert_block`).
             The in-memory names are the fused names on disk; a Transpose(1, 2)
             converter on them (Qwen3-VL-MoE) means they may be stored transposed (`disk_transposed`); any other
             converter of them (separate gate / up stacks, interleaved rows) is refused, naming it. Patterns are read
             as names (newer transformers escape them: `\\.experts`), the disk names through the saving direction
             (no legacy renamings), as save_pretrained writes them.
  math       the probe of kt_sft.models.experts_math on the module's own gate (and its clamp `limit`), mapped to
             the engine's activation rows (silu / clamped silu / gpt-oss swiglu / GELU-tanh glu, relu^2 ungated);
             biases and transposed / interleaved fused layouts load as they are; experts the decorator marks with
             what the engine lacks (ENGINE_LACKS: a norm on each expert's output) are refused
A YAML override (kt_sft.models.registry) replaces the derivation; its math is probed against the model all the same.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import torch
from torch import nn

from . import experts_math
from .registry import (TESTED, MoEFamily, UnsupportedModelError, fused_projections, projections,
                       template_regex)

EXPERTS_FLAGS = ("has_gate", "has_bias", "is_transposed")  # set on every @use_experts_implementation module
# Flags of newer transformers' @use_experts_implementation for what the engine does not compute yet: what each means.
ENGINE_LACKS = {"has_post_expert_norm": "a norm on each expert's output (has_post_expert_norm)"}
_SENTINEL_LAYER = "987654321"  # stands for {layer} while names go through transformers' regex renamings
# The auto classes LLaMA-Factory 0.9.5's model/loader.py picks from, in its order: the first whose mapping holds the
# config's class, else the last.
AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForSeq2SeqLM", "AutoModelForTextToWaveform",
                "AutoModelForCausalLM")


def model_class(config):
    """The auto class LLaMA-Factory 0.9.5 (model/loader.py) builds this config with."""
    import transformers

    for name in AUTO_CLASSES[:-1]:
        auto = getattr(transformers, name)
        if type(config) in auto._model_mapping.keys():
            return auto
    return getattr(transformers, AUTO_CLASSES[-1])


def model_kind_gap(config) -> Optional[str]:
    """Why kt-sft cannot load this config's model class yet (omni: audio / speech out), or None. Causal LMs and
    vision-language models (AutoModelForImageTextToText: the vision tower and projector are dense modules on the
    device, the language model's routed experts go to the engine) load."""
    auto = model_class(config)
    if auto.__name__ in ("AutoModelForCausalLM", "AutoModelForImageTextToText"):
        return None
    cls = auto._model_mapping[type(config)]
    return f"{config.model_type}: omni (audio / speech) model ({cls.__name__}, loaded with {auto.__name__}) not " \
        "supported yet"


def build_meta(config, dtype: torch.dtype = torch.bfloat16, *, buffers: bool = True, any_kind: bool = False):
    """The model LLaMA-Factory would build from `config`, every parameter on the meta device (and the buffers too
    when `buffers` is False: for derivation only, nothing allocated). A model kind kt-sft cannot load yet
    (`model_kind_gap`) is refused unless `any_kind` (the families table describes those too)."""
    from accelerate import init_empty_weights

    gap = None if any_kind else model_kind_gap(config)
    if gap:
        raise UnsupportedModelError(gap)
    auto = model_class(config)
    if buffers:
        with init_empty_weights():
            return auto.from_config(config, dtype=dtype)
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype)


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module transformers' @use_experts_implementation decorated, by name."""
    return {n: m for n, m in model.named_modules() if all(hasattr(m, f) for f in EXPERTS_FLAGS)}


def experts_templates(names) -> list[str]:
    """The distinct `experts_module` templates of these module names: the first index in a name is the layer."""
    templates = []
    for name in names:
        template, count = re.subn(r"(?<=\.)\d+(?=\.|$)", "{layer}", name, count=1)
        if not count:
            raise UnsupportedModelError(f"experts module {name} sits in no indexed layer list; kt-sft places one "
                                        "experts module per decoder layer")
        if template not in templates:
            templates.append(template)
    return templates


def is_experts_class(cls) -> bool:
    """A class decorated by @use_experts_implementation (it gives the class `_apply_gate` and wraps `forward`)."""
    return isinstance(cls, type) and hasattr(cls, "_apply_gate") and hasattr(getattr(cls, "forward", None),
                                                                            "__wrapped__")


def _no_experts(model: nn.Module, model_type: str) -> str:
    """Why `model` has no experts module: a MoE family configured all dense, or no fused-experts family at all."""
    import sys

    name = type(model).__name__
    if any(is_experts_class(c) for c in vars(sys.modules[type(model).__module__]).values()):
        return (f"this {name} has no routed-expert (MoE) layers: every layer of its config is dense (e.g. "
                "first_k_dense_replace, mlp_only_layers or decoder_sparse_step cover all layers), so there is "
                "nothing to offload; load it without kt-sft (unset USE_KT)")
    return (f"model_type {model_type!r} is not supported by kt-sft (supported: transformers' MoE families with fused "
            f"experts; tested: {', '.join(TESTED)}; all: python -m kt_sft families): {name} has no experts module "
            "marked by transformers' @use_experts_implementation (a dense model, or an undecorated MoE: write a rule "
            "file, configs/*.yaml)")


def derive_family(model: nn.Module, model_type: str) -> MoEFamily:
    """The rule of `model` (built on meta, e.g. by build_meta): experts template(s), math, on-disk names. Several
    experts modules per layer (ERNIE-4.5-VL's text and vision experts) give one rule each, the first with the
    others as its `more`. Raises UnsupportedModelError when the model has no decorated experts or they cannot be
    described (an unknown conversion op); an engine that cannot run the math is checked by `engine_gap`."""
    modules = experts_modules(model)
    if not modules:
        raise UnsupportedModelError(_no_experts(model, model_type))
    _refuse_tied_experts(model, modules)
    rules = []
    for template in experts_templates(modules):
        pattern = template_regex(template)
        rules.append(_derive_set(model, model_type, template, [m for n, m in modules.items() if pattern.match(n)]))
    return dataclasses.replace(rules[0], more=tuple(rules[1:])) if len(rules) > 1 else rules[0]


def _refuse_tied_experts(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Experts whose weights transformers ties to other experts (DiffusionGemma's encoder layers are its decoder's)
    are stored once; two engine copies of them would train apart: refused, naming the tie."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for name in modules:
        ties = [(t, s) for t, s in tied.items() if t.startswith(name + ".")]
        if ties:
            raise UnsupportedModelError(f"{type(model).__name__}: its experts {name} are tied to {ties[0][1]} "
                                        "(transformers' tied weights): experts shared between modules are not "
                                        "supported yet")


def _derive_set(model: nn.Module, model_type: str, template: str, modules: list) -> MoEFamily:
    """The rule of the experts modules at `template` (one per MoE layer)."""
    first = modules[0]
    flags = {f: bool(getattr(first, f)) for f in EXPERTS_FLAGS}
    if any({f: bool(getattr(m, f)) for f in EXPERTS_FLAGS} != flags for m in modules):
        raise UnsupportedModelError(f"{type(model).__name__}: its experts modules {template} differ in "
                                    f"{', '.join(EXPERTS_FLAGS)}")
    lacks = [what for flag, what in ENGINE_LACKS.items() if getattr(first, flag, False)]
    if lacks:
        raise UnsupportedModelError(f"{model_type}: experts with {', '.join(lacks)} ({type(first).__name__}) not "
                                    "supported yet")
    math = experts_math.probe(first)
    if not isinstance(math, experts_math.ExpertsMath):  # nothing a rule file could name either
        raise UnsupportedModelError(f"{model_type}: {experts_math.engine_gap(math)}")
    gated = flags["has_gate"]
    names, block = disk_names(model, template, gated)
    return MoEFamily(
        model_type=model_type, experts_module=template, checkpoint=names,
        fused_checkpoint={p: f"{template}.{p}_proj" for p in fused_projections(gated)},
        activation=math.activation, gated=gated, limit=math.limit, bias=flags["has_bias"],
        transposed=flags["is_transposed"], disk_transposed=disk_transposed(model, template, gated),
        expert_block=block, source=f"derived from {type(model).__name__}")


def _split_conversions(model: nn.Module, legacy: bool = True):
    """(renamings, converters) of the model's conversion mapping; `legacy` False: without the renamings of old
    checkpoint layouts, which transformers' saving leaves out too (it is the direction the disk names go)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    conversions = get_model_conversion_mapping(model, add_legacy=legacy)
    return ([c for c in conversions if isinstance(c, WeightRenaming)],
            [c for c in conversions if isinstance(c, WeightConverter)])


def _literal(pattern: str) -> str:
    """A converter's source pattern as the name it stands for: anchors dropped, regex escapes undone (transformers
    newer than 5.6 write `\\.experts.*.w1.weight`); `*` stays, the expert index."""
    return re.sub(r"\\(.)", r"\1", pattern.strip("^$"))


def _names(target: str, name: str) -> bool:
    """Whether a converter's (literal) target pattern names the parameter `name`: its last dotted parts (an inner
    match such as `up_proj` in `experts.gate_up_proj` is another parameter)."""
    return name == target or name.endswith(target if target.startswith(".") else "." + target)


def _converter_for(name: str, converters):
    """(converter, target pattern, its index among the converter's targets) of the WeightConverter that builds the
    fused parameter `name` from per-expert tensors, or (None, None, 0): stored fused, maybe transposed
    (`disk_transposed`). Any other converter of it (e.g. Step-3.7's gate and up stored as two fused tensors,
    concatenated on load) is refused, naming it."""
    for converter in converters:
        for index, target in enumerate(map(_literal, converter.target_patterns)):
            if not _names(target, name):
                continue
            if any("*" in s for s in converter.source_patterns):
                return converter, target, index
            ops = [type(op).__name__ for op in converter.operations]
            if ops != ["Transpose"]:
                raise UnsupportedModelError(
                    f"transformers' conversion mapping builds the experts' {name.rsplit('.', 1)[-1]} from "
                    f"{' + '.join(map(_literal, converter.source_patterns))} ({' -> '.join(ops)}): experts stored "
                    "as fused tensors that differ from the model's are not supported yet")
    return None, None, 0


def _splits_expert_list(converter) -> bool:
    """transformers' ErnieFuseAndSplitTextVisionExperts(stack_dim=0, concat_dim=1): target j stacks the j-th equal
    block of the on-disk expert list along dim 0 and concatenates the sources along dim 1 (MergeModulelist(0) +
    Concatenate(1) per block)."""
    ops = converter.operations
    return (len(ops) == 1 and type(ops[0]).__name__ == "ErnieFuseAndSplitTextVisionExperts"
            and ops[0].stack_dim == 0 and ops[0].concat_dim == 1)


def _index_blocks(converter, fused: str) -> list[str]:
    """The projection each source pattern of `converter` fills (ops read as index maps), in source order."""
    ops = [type(op).__name__ for op in converter.operations]
    sources = len(converter.source_patterns)
    split = _splits_expert_list(converter)
    merged = split or (ops[:1] == ["MergeModulelist"] and converter.operations[0].dim == 0)
    concat = split or (ops[1:] == ["Concatenate"] and converter.operations[1].dim == 1)
    if merged and (split or len(ops) == 1) and sources == 1 and fused in ("down", "up"):
        return [fused]
    if merged and concat and fused == "gate_up" and sources == 2:
        return ["gate", "up"]  # Concatenate(dim=1) of [E, I, H] stacks: source 0 = rows [0, I) = gate (probed order)
    raise UnsupportedModelError(f"the checkpoint conversion {converter} ({' -> '.join(ops)}) of the fused {fused} "
                                "weights is not a per-expert stack kt-sft can stream: not supported yet")


def _undo_renamings(name: str, renamings) -> str:
    from transformers.core_model_loading import PrefixChange

    for renaming in reversed(renamings):
        if not isinstance(renaming, PrefixChange):  # prefixes: both spellings load (loader._KeyRouter)
            name, _ = renaming.reverse_transform().rename_source_key(name)
    return name


def disk_names(model: nn.Module, template: str, gated: bool) -> tuple[dict[str, str], int]:
    """Per-expert on-disk templates {projection: name with {layer} / {expert}} from transformers' conversion
    mapping ({} when the checkpoint stores the fused tensors: no converter builds them), and the block of the
    on-disk expert list these experts are (`MoEFamily.expert_block`)."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = _split_conversions(model)
    saving, _ = _split_conversions(model, legacy=False)
    out, blocks = {}, set()
    for fused in fused_projections(gated):
        param = f"{template.replace('{layer}', _SENTINEL_LAYER)}.{fused}_proj"
        converter, target, index = _converter_for(param, converters)
        if converter is None:
            continue
        blocks.add(index if _splits_expert_list(converter) else 0)
        # transformers renames a source of a one-to-many converter to its first target (the ops then split it)
        expected = param[: len(param) - len(target)] + _literal(converter.target_patterns[0])
        for source, proj in zip(converter.source_patterns, _index_blocks(converter, fused)):
            disk = _undo_renamings(param[: len(param) - len(target)] + _literal(source), saving)
            back, matched = rename_source_key(disk.replace("*", "3"), renamings, converters)
            if back != expected or matched is None:
                raise UnsupportedModelError(f"{disk}: transformers' conversion mapping does not map it back to "
                                            f"{expected} (got {back}); the derivation cannot name this family's "
                                            "experts on disk, write a rule file (configs/*.yaml)")
            out[proj] = disk.replace(_SENTINEL_LAYER, "{layer}").replace("*", "{expert}")
    if out and set(out) != set(projections(gated)):
        raise UnsupportedModelError(f"transformers' conversion mapping names only {', '.join(out)} of the "
                                    f"per-expert projections of {template}")
    if len(blocks) > 1:
        raise UnsupportedModelError(f"transformers' conversion mapping puts the projections of {template} in "
                                    "different blocks of the on-disk expert list: not supported yet")
    return out, blocks.pop() if blocks else 0


def disk_transposed(model: nn.Module, template: str, gated: bool) -> bool:
    """Whether transformers' conversion mapping transposes the fused experts tensors on load (a one-to-one
    converter whose only op is Transpose of dims 1 and 2, e.g. Qwen3-VL-MoE's [E, H, 2I] gate_up_proj on disk): the
    loader then takes either orientation, by shape, as transformers' Transpose(check_dims=True) does."""
    _, converters = _split_conversions(model)
    found = []
    for fused in fused_projections(gated):
        param = f"{template.replace('{layer}', _SENTINEL_LAYER)}.{fused}_proj"
        for converter in converters:
            ops = converter.operations
            if (any(_names(_literal(t), param) for t in converter.target_patterns) and len(ops) == 1
                    and type(ops[0]).__name__ == "Transpose" and {ops[0].dim0, ops[0].dim1} == {1, 2}):
                found.append(fused)
    if found and len(found) != len(fused_projections(gated)):
        raise UnsupportedModelError(f"transformers' conversion mapping transposes only {', '.join(found)} of the "
                                    f"fused experts tensors of {template}: not supported yet")
    return bool(found)


def check_math(family: MoEFamily, modules: dict[str, nn.Module]) -> None:
    """Each experts module computes the family's math (probed), and the engine runs it; else a clear error naming
    what is missing, e.g. "experts math 'relu2 ungated' not supported yet"."""
    for name, module in modules.items():
        lacks = [what for flag, what in ENGINE_LACKS.items() if getattr(module, flag, False)]
        if lacks:
            raise UnsupportedModelError(f"{family.model_type} ({name}): experts with {', '.join(lacks)} not "
                                        "supported yet")
        found = experts_math.probe(module)
        gap = experts_math.engine_gap(found)
        if gap:
            raise UnsupportedModelError(f"{family.model_type} ({name}): {gap}")
        if found != family.math:
            raise UnsupportedModelError(f"{name} computes '{experts_math.label(found)}' but the rule "
                                        f"{family.source or family.model_type} says '{family.math.label}'")
        for flag, value in (("has_bias", family.bias), ("is_transposed", family.transposed)):
            if bool(getattr(module, flag, value)) != value:
                raise UnsupportedModelError(f"{name} has {flag}={not value} but the rule "
                                            f"{family.source or family.model_type} says {value}")
    gap = family.engine_gap()
    if gap:
        raise UnsupportedModelError(f"{family.model_type} ({family.source}): {gap}")


def resolve_family(model: nn.Module, model_type: str, override: Optional[MoEFamily] = None) -> MoEFamily:
    """The family of `model`: `override` (a rule file) or the derived rule, its math checked on the model (each
    experts module against its own rule)."""
    family = override or derive_family(model, model_type)
    modules = experts_modules(model)
    for rule in family.experts_sets:
        pattern = rule.experts_module_regex()
        check_math(rule, {n: m for n, m in modules.items() if pattern.match(n)})
    return family

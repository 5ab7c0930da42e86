"""The model registry: a MoE family's rule says where its routed experts are, in memory and on disk, and what they
compute.

The rule (`MoEFamily`) is derived from the model itself (kt_sft.models.derive: the experts modules transformers'
@use_experts_implementation marks, and transformers' own checkpoint conversion mapping). A YAML file with the
fields below overrides it, for models whose derivation fails (undecorated or exotic experts): passed as `rule=` /
`kt_optimize_rule`, or dropped into `kt_sft/models/families/` to apply to its model_type by default. `configs/*.yaml`
are examples of the format, each equal to what kt-sft derives for its family (tests/test_families.py compares).

    model_type       config.json's model_type
    experts_module   the transformers experts module, e.g. model.layers.{layer}.mlp.experts
    checkpoint       per-expert tensor names on disk: gate / up / down, with {layer} and {expert}
    fused_checkpoint fused names on disk: gate_up [E, 2I, H] (gate rows first) / down [E, H, I]; at least one of
                     checkpoint / fused_checkpoint names every projection
    activation       with `gated` (and `limit`, a clamped variant's): the experts' math (kt_sft.models.experts_math:
                     silu, silu_clamped, gpt_oss_swiglu, gelu_tanh, relu2, ...); a probe of the model's own experts
                     modules must agree
    bias, transposed the experts modules' has_bias / is_transposed: biases load from `<fused name>_bias` (per-expert
                     names: `.bias` for `.weight`); transposed fused tensors are [E, H, 2I] / [E, I, H]
    disk_transposed  the fused tensors on disk may be the transpose of the parameters ([E, H, 2I] for gate_up_proj
                     [E, 2I, H]: Qwen3-VL-MoE); told apart by shape as transformers' Transpose(check_dims) converter
                     does (a shape equal to the parameter's loads as it is)
    expert_block     the per-expert names on disk number this experts module's experts from expert_block x E (E: its
                     expert count), as transformers' ErnieFuseAndSplitTextVisionExperts splits one on-disk expert list
                     into equal blocks (ERNIE-4.5-VL: text experts 0..E-1, vision experts E..2E-1 under one
                     `mlp.experts.{expert}`); 0 for every other family
    more             further experts modules of each MoE layer (ERNIE-4.5-VL's vision experts beside its text
                     experts), each a mapping of the fields above but model_type, on_device and defaults; every
                     experts module is an engine layer of its own (`experts_sets`)
    on_device        informational: what stays stock on the GPU (attention, router, shared experts, dense MLPs)
    defaults         format (a kt_sft.engine.formats name: bf16, int8, ...) and threads (auto or n) used when the
                     caller sets none
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

from . import experts_math

FAMILY_DIR = Path(__file__).parent / "families"
DEFAULTS_KEYS = ("format", "threads")
# The model types whose tiny random model tests/test_families.py (text) and tests/test_vlm.py (vision-language, with
# images) compare with stock transformers + PEFT (logits, LoRA steps with expert LoRA, greedy generation), under
# transformers 5.6 (`make test`) and the newest one (`make test-tfnew`); a test keeps the installed transformers'
# part of it equal to those tables.
TESTED = ("afmoe", "aria", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe", "deepseek_ocr2",
          "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1", "dots3_note_text", "ergo",
          "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flex_olmo", "flint", "gemma4", "gemma4_text", "glm4_moe",
          "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa",
          "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "hy_v4_vl", "inkling_text",
          "jamba", "kimi_linear", "kolibri1", "kolibri1_1", "laguna", "lara_mini", "lfm2_moe", "longcat_flash",
          "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2", "mistral4", "mistral_large4", "mixtral",
          "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text", "qwen3_moe", "qwen3_next",
          "qwen3_omni_moe_thinker", "qwen3_vl_moe", "qwen4_exp", "qwen4_exp_text", "solar_open", "unlimited_ocr", "zaya")


class UnsupportedModelError(ValueError):
    pass


class ExpertsAt(NamedTuple):
    """Where one engine layer sits: the decoder layer and which of the rule's experts modules (`experts_sets`
    index) in it. Sorts layer-major."""

    layer: int
    set: int = 0


def template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(f"^{pattern}$")


def projections(gated: bool) -> tuple[str, ...]:
    """The per-expert projections (`checkpoint` keys) and the fused ones (`fused_checkpoint` keys)."""
    return ("gate", "up", "down") if gated else ("up", "down")


def fused_projections(gated: bool) -> tuple[str, ...]:
    return ("gate_up", "down") if gated else ("up", "down")


@dataclass(frozen=True)
class MoEFamily:
    model_type: str
    experts_module: str
    checkpoint: dict = field(default_factory=dict)
    fused_checkpoint: dict = field(default_factory=dict)
    activation: str = "silu"
    gated: bool = True
    limit: Optional[float] = None
    bias: bool = False
    transposed: bool = False
    disk_transposed: bool = False
    expert_block: int = 0
    more: tuple = ()
    on_device: tuple = ()
    defaults: dict = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or self.model_type
        try:
            self.math
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        for name, names, allowed in (("checkpoint", self.checkpoint, projections(self.gated)),
                                     ("fused_checkpoint", self.fused_checkpoint, fused_projections(self.gated))):
            if set(names) - set(allowed) or (names and set(names) != set(allowed)):
                raise ValueError(f"{where}: {name} must name {', '.join(allowed)} (got {', '.join(names) or 'none'})")
        if not self.checkpoint and not self.fused_checkpoint:
            raise ValueError(f"{where}: checkpoint (per-expert names) or fused_checkpoint must name the experts' "
                             "tensors on disk")
        if "{layer}" not in self.experts_module:
            raise ValueError(f"{where}: experts_module must contain {{layer}}, got {self.experts_module!r}")
        unknown = sorted(set(self.defaults) - set(DEFAULTS_KEYS))
        if unknown:
            hint = " (engine_dtype is now format: a kt_sft.engine.formats name, e.g. bf16)" \
                if "engine_dtype" in unknown else ""
            raise ValueError(f"{where}: unknown defaults {', '.join(unknown)}; allowed: {', '.join(DEFAULTS_KEYS)}{hint}")
        self._check_more(where)

    def _check_more(self, where: str) -> None:
        if not isinstance(self.expert_block, int) or self.expert_block < 0:
            raise ValueError(f"{where}: expert_block must be a non-negative integer, got {self.expert_block!r}")
        for rule in self.more:
            if not isinstance(rule, MoEFamily) or rule.more or rule.model_type != self.model_type or rule.defaults:
                raise ValueError(f"{where}: each entry of more describes one further experts module of "
                                 f"{self.model_type} (no model_type, defaults or more of its own)")
        templates = [r.experts_module for r in self.experts_sets]
        if len(set(templates)) != len(templates):
            raise ValueError(f"{where}: experts_module {templates} names one module twice")

    @property
    def experts_sets(self) -> tuple["MoEFamily", ...]:
        """One rule per experts module of a MoE layer: this one (without `more`), then each of `more`."""
        if not self.more:
            return (self,)
        return (dataclasses.replace(self, more=()), *self.more)

    def disk_expert(self, expert: int, experts: int) -> int:
        """The on-disk index of expert `expert` of this experts module of `experts` experts (`expert_block`)."""
        return self.expert_block * experts + expert

    @property
    def math(self) -> experts_math.ExpertsMath:
        return experts_math.variant(self.activation, self.gated, self.limit)

    def engine_gap(self) -> Optional[str]:
        """Why the CPU engine cannot run this family's experts, any of its experts modules (None: it can)."""
        gaps = (experts_math.engine_gap(rule.math) for rule in (self, *self.more))
        return next((gap for gap in gaps if gap), None)

    def bias_names(self) -> dict[str, str]:
        """Where the experts' biases are on disk ({} without biases): `<fused name>_bias` per fused projection
        (gate_up / down / up), else the per-expert names with `.bias` for `.weight`."""
        if not self.bias:
            return {}
        if self.fused_checkpoint:
            return {p: f"{name}_bias" for p, name in self.fused_checkpoint.items()}
        return {p: re.sub(r"\.weight$", ".bias", name) for p, name in self.checkpoint.items()}

    def bias_key_regexes(self) -> dict[str, re.Pattern]:
        return {p: template_regex(t) for p, t in self.bias_names().items()}

    def expert_key_regexes(self) -> dict[str, re.Pattern]:
        """projection -> regex with groups layer/expert, for per-expert keys on disk."""
        return {p: template_regex(t) for p, t in self.checkpoint.items()}

    def fused_key_regexes(self) -> dict[str, re.Pattern]:
        return {p: template_regex(t) for p, t in self.fused_checkpoint.items()}

    def experts_module_regex(self) -> re.Pattern:
        return template_regex(self.experts_module)

    def expected_key(self, proj: str, layer: int, expert: int, bias: bool = False) -> str:
        """The on-disk name expert `expert`'s projection `proj` (its bias: `bias`) of MoE layer `layer` is looked up
        by (error messages): its per-expert name, else the fused tensor holding it."""
        if bias:
            names, per_expert = self.bias_names(), not self.fused_checkpoint
        else:
            per_expert = proj in self.checkpoint
            names = self.checkpoint if per_expert else self.fused_checkpoint
        if per_expert:
            return names[proj].format(layer=layer, expert=expert)
        fused = "gate_up" if proj in ("gate", "up") and self.gated else proj
        return names[fused].format(layer=layer)


def load_family_file(path: str | Path) -> MoEFamily:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read the model rule file {path}: {err}") from err
    if isinstance(data, list) and any(isinstance(e, dict) and "match" in e for e in data):
        raise ValueError(f"{path} is a KTransformers injection rule (match/replace entries); kt-sft derives where the "
                         "experts are from the model itself: remove kt_optimize_rule, or point it to a file in the "
                         "format of configs/*.yaml")
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: expected a mapping with at least model_type, experts_module and checkpoint")
    known = set(MoEFamily.__dataclass_fields__) - {"source"}
    _refuse_unknown(data, known, str(path))
    data["on_device"] = tuple(data.get("on_device") or ())
    data["more"] = tuple(_more_entry(entry, data["model_type"], f"{path} (more[{i}])")
                         for i, entry in enumerate(data.get("more") or ()))
    return MoEFamily(source=str(path), **data)


def _refuse_unknown(data: dict, known: set, where: str) -> None:
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")


def _more_entry(entry, model_type: str, where: str) -> MoEFamily:
    """One further experts module of a rule file (`more`): the fields of one experts module, its model_type's."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a mapping with experts_module and checkpoint / fused_checkpoint")
    _refuse_unknown(entry, set(MoEFamily.__dataclass_fields__) - {"source", "model_type", "more", "on_device",
                                                                  "defaults"}, where)
    return MoEFamily(model_type=model_type, source=where, **entry)


def builtin_overrides() -> dict[str, MoEFamily]:
    """The family files shipped in kt_sft/models/families/ (each overrides the derived rule of its model_type)."""
    families = {}
    for path in sorted(FAMILY_DIR.glob("*.yaml")):
        fam = load_family_file(path)
        families[fam.model_type] = fam
    return families


def _is_name(rule) -> bool:
    text = str(rule)
    return not Path(text).exists() and "/" not in text and not text.endswith((".yaml", ".yml"))


def get_override(model_type: str, rule: str | Path | None = None) -> Optional[MoEFamily]:
    """The rule file that replaces the derived rule for `model_type`: `rule` (a family YAML, or a family name,
    which must be `model_type`'s own), else a built-in override file; None: derive the rule from the model."""
    if rule and _is_name(rule):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if str(rule) not in CONFIG_MAPPING_NAMES and str(rule) not in builtin_overrides():
            raise ValueError(f"rule {rule!r}: no such rule file, and no model_type of that name")
        if str(rule) != model_type:
            raise UnsupportedModelError(f"rule {rule!r} is the built-in family for model_type {rule!r}, but the "
                                        f"checkpoint's config.json says {model_type!r}")
        return builtin_overrides().get(model_type)
    if rule:
        fam = load_family_file(rule)
        if fam.model_type != model_type:
            raise UnsupportedModelError(f"rule file {rule} is for model_type {fam.model_type!r}, "
                                        f"but the checkpoint's config.json says {model_type!r}")
        return fam
    return builtin_overrides().get(model_type)

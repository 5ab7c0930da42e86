"""The model registry: one YAML file per MoE family says where its routed experts are, on disk and in memory.

Adding a family = one file in `kt_sft/models/families/` (or any YAML passed as `rule=` / `kt_optimize_rule`)
+ one tiny-config parity test. Fields (see `families/qwen3_moe.yaml` for a commented example):

    model_type       config.json's model_type
    experts_module   the transformers experts module, e.g. model.layers.{layer}.mlp.experts
    checkpoint       per-expert tensor names on disk: gate / up / down, with {layer} and {expert}
    fused_checkpoint optional fused names on disk: gate_up [E, 2I, H] (gate rows first) / down [E, H, I]
    activation       the gated activation (config.hidden_act, where the config has one, must be one of its aliases)
    on_device        informational: what stays stock on the GPU (attention, router, shared experts, dense MLPs)
    defaults         format (a kt_sft.engine.formats name: bf16, int8, ...) and threads (auto or n) used when the
                     caller sets none
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

FAMILY_DIR = Path(__file__).parent / "families"
ADD_A_MODEL_DOC = "README.md, section 'Add a model'"
PROJECTIONS = ("gate", "up", "down")
ACTIVATION_ALIASES = {"silu": ("silu", "swish")}
DEFAULTS_KEYS = ("format", "threads")


class UnsupportedModelError(ValueError):
    pass


def _template_regex(template: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(f"^{pattern}$")


@dataclass(frozen=True)
class MoEFamily:
    model_type: str
    experts_module: str
    checkpoint: dict
    fused_checkpoint: dict = field(default_factory=dict)
    activation: str = "silu"
    gated: bool = True
    bias: bool = False
    transposed: bool = False
    on_device: tuple = ()
    defaults: dict = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        where = self.source or self.model_type
        missing = [p for p in PROJECTIONS if p not in self.checkpoint]
        if missing:
            raise ValueError(f"{where}: checkpoint must name {', '.join(PROJECTIONS)} (missing {', '.join(missing)})")
        if self.activation not in ACTIVATION_ALIASES or not self.gated or self.bias or self.transposed:
            raise ValueError(f"{where}: only gated SiLU experts without bias, not transposed, run on the engine today "
                             f"(got activation={self.activation}, gated={self.gated}, bias={self.bias}, "
                             f"transposed={self.transposed})")
        if "{layer}" not in self.experts_module:
            raise ValueError(f"{where}: experts_module must contain {{layer}}, got {self.experts_module!r}")
        unknown = sorted(set(self.defaults) - set(DEFAULTS_KEYS))
        if unknown:
            hint = " (engine_dtype is now format: a kt_sft.engine.formats name, e.g. bf16)" \
                if "engine_dtype" in unknown else ""
            raise ValueError(f"{where}: unknown defaults {', '.join(unknown)}; allowed: {', '.join(DEFAULTS_KEYS)}{hint}")

    def expert_key_regexes(self) -> dict[str, re.Pattern]:
        """projection -> regex with groups layer/expert, for per-expert keys on disk."""
        return {p: _template_regex(self.checkpoint[p]) for p in PROJECTIONS}

    def fused_key_regexes(self) -> dict[str, re.Pattern]:
        return {p: _template_regex(t) for p, t in self.fused_checkpoint.items()}

    def experts_module_regex(self) -> re.Pattern:
        return _template_regex(self.experts_module)

    def accepts_activation(self, hidden_act: Optional[str]) -> bool:
        # None: the config names no activation (its model code fixes one), so the rule's `activation` stands.
        return hidden_act is None or hidden_act in ACTIVATION_ALIASES[self.activation]


def load_family_file(path: str | Path) -> MoEFamily:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"cannot read the model rule file {path}: {err}") from err
    if isinstance(data, list) and any(isinstance(e, dict) and "match" in e for e in data):
        raise ValueError(f"{path} is a KTransformers injection rule (match/replace entries); kt-sft places experts "
                         "from its own family files instead: remove kt_optimize_rule (the family is picked from "
                         "model_type) or point it to a file in the format of kt_sft/models/families/*.yaml")
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: expected a mapping with at least model_type, experts_module and checkpoint")
    known = set(MoEFamily.__dataclass_fields__) - {"source"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {', '.join(unknown)} (allowed: {', '.join(sorted(known))})")
    data["on_device"] = tuple(data.get("on_device") or ())
    return MoEFamily(source=str(path), **data)


def builtin_families() -> dict[str, MoEFamily]:
    families = {}
    for path in sorted(FAMILY_DIR.glob("*.yaml")):
        fam = load_family_file(path)
        families[fam.model_type] = fam
    return families


def supported_model_types() -> list[str]:
    return sorted(builtin_families())


def get_family(model_type: str, rule: str | Path | None = None) -> MoEFamily:
    """The registry entry for `model_type`, or the one `rule` names (a family YAML path or a built-in name)."""
    if rule and not Path(rule).exists() and str(rule) in builtin_families():
        fam = builtin_families()[str(rule)]
        if fam.model_type != model_type:
            raise UnsupportedModelError(f"rule {rule!r} is the built-in family for model_type {fam.model_type!r}, "
                                        f"but the checkpoint's config.json says {model_type!r}")
        return fam
    if rule:
        fam = load_family_file(rule)
        if fam.model_type != model_type:
            raise UnsupportedModelError(f"rule file {rule} is for model_type {fam.model_type!r}, "
                                        f"but the checkpoint's config.json says {model_type!r}")
        return fam
    families = builtin_families()
    if model_type not in families:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by kt-sft (supported: {', '.join(sorted(families))}). "
            f"To add a family, write a rule YAML (copy one from configs/) and pass it as kt_optimize_rule; "
            f"see {ADD_A_MODEL_DOC}.")
    return families[model_type]

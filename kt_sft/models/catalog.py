"""Every MoE family of the installed transformers with fused experts, and what kt-sft makes of it: the rows of
`python -m kt_sft families` and of README.md's family table (`python -m kt_sft families README.md` rewrites it; a
test compares them).

A family is a model_type that LLaMA-Factory can load as a language model (kt_sft.models.derive.model_class) whose
modeling file defines experts modules decorated with transformers' @use_experts_implementation. Each row comes from
the model itself: its default config (plus PROBE_KWARGS where the defaults build no experts or no model) built on
the meta device, the derived rule (experts path, math probe) and why the engine cannot run it, if it cannot:
  tested            derived, the engine runs its math, and tests/test_families.py compares a tiny random model
                    with stock transformers + PEFT (registry.TESTED)
  derived-untested  derived and runnable, no tiny-model test yet
  refused           the error a load gives, before anything is read (math variant, omni model, ...)
The `transformers` column says which transformers a family needs: PINNED (LLaMA-Factory 0.9.5's pin, what
`llamafactory-cli` runs with) for the families it has (PINNED_FAMILIES), else the installed newer version, which CI
tests too (`make test-tfnew`). README.md holds two tables: PINNED's every family (HEADING, written under PINNED) and
the newest's families beyond PINNED's (NEWER_HEADING, written under the newest transformers).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import derive, experts_math
from .registry import TESTED, UnsupportedModelError

HEADING = "### Families"
NEWER_HEADING = "#### Families of a newer transformers"
PINNED = "5.6.0"  # LLaMA-Factory 0.9.5's transformers (requirements/cpu.txt)
# Its families (a test under PINNED keeps this equal to family_model_types()): the rows that need no newer one.
PINNED_FAMILIES = ("afmoe", "deepseek_v2", "deepseek_v3", "dots1", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe",
                   "flex_olmo", "gemma4", "gemma4_text", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa",
                   "gpt_oss", "hunyuan_v1_moe", "hy_v3", "jamba", "lfm2_moe", "minimax", "minimax_m2", "mistral4",
                   "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text",
                   "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_vl_moe",
                   "solar_open")
# What a default config needs so that its model builds and shows its experts (defaults that are dense, None or
# inconsistent, in transformers 5.6 and newer); the sizes do not matter on the meta device.
_QSA = dict(indexer_n_heads=4, indexer_kv_heads=1, indexer_head_dim=256, indexer_budget=2048, indexer_compress_ratio=4)
PROBE_KWARGS = {
    "deepseek_ocr2": dict(text_config=dict(num_hidden_layers=4, num_experts_per_tok=6,
                                           mlp_layer_types=["dense", "sparse", "sparse", "sparse"])),
    "diffusion_gemma": dict(text_config=dict(num_experts=8, top_k_experts=2, moe_intermediate_size=256)),
    "qwen4_exp": dict(text_config=_QSA),
    "qwen4_exp_text": _QSA,
    "dots1": dict(n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1),
    "gemma4_text": dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=256),
    "gemma4": dict(text_config=dict(enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=256)),
    "hunyuan_v1_moe": dict(head_dim=128),
    "lfm2_moe": dict(layer_types=["conv", "full_attention", "conv", "full_attention"]),
}
_LAYERS = 4  # enough for a dense first layer and MoE layers after it, fast to build


@dataclass(frozen=True)
class FamilyRow:
    model_type: str
    loaded_as: str      # the model class LLaMA-Factory builds
    experts: str        # experts module template(s)
    math: str           # experts math variant (+ biases, layout)
    status: str         # tested / derived-untested / refused
    reason: str = ""    # why refused

    @property
    def needs(self) -> str:
        """The transformers this family needs: PINNED if it has it, else the installed (newer) one."""
        import transformers

        return PINNED if self.model_type in PINNED_FAMILIES else transformers.__version__

    def cells(self) -> list[str]:
        status = f"refused: {self.reason}" if self.status == "refused" else self.status
        return [f"`{self.model_type}`", self.needs, self.loaded_as, f"`{self.experts}`" if self.experts else "—",
                self.math or "—", status]


def _lm_class_names() -> dict[str, str]:
    """model_type -> the class name LLaMA-Factory would load, for every model_type with a language-model class."""
    from transformers.models.auto import modeling_auto as ma

    names = {}
    for mapping in (ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES,
                    ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES):
        names.update(mapping)  # later mappings win, in LLaMA-Factory's order of preference
    return names


def family_model_types() -> list[str]:
    """The model_types whose language-model class comes from a modeling file with decorated experts (read as text:
    importing every model of transformers would take minutes)."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    root = Path(transformers.__file__).parent / "models"
    found = []
    for model_type in sorted(_lm_class_names()):
        module = model_type_to_module_name(model_type)
        source = root / module.replace(".", "/") / f"modeling_{module.rsplit('.', 1)[-1]}.py"
        if source.is_file() and "@use_experts_implementation" in source.read_text():
            found.append(model_type)
    return found


def _probe_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type](**{"num_hidden_layers": _LAYERS, **PROBE_KWARGS.get(model_type, {})})


def family_row(model_type: str) -> FamilyRow:
    """What kt-sft makes of `model_type`, from its default config's model built on meta."""
    kind_gap = None
    try:
        config = _probe_config(model_type)
        kind_gap = derive.model_kind_gap(config)
        model = derive.build_meta(config, buffers=False, any_kind=True)
    except Exception as err:  # transformers' own config or model code failing on its defaults
        return FamilyRow(model_type, "", "", "", "refused", kind_gap or f"its default config does not build ({err})")
    modules = derive.experts_modules(model)
    first = next(iter(modules.values()), None)
    math = "" if first is None else experts_math.label(experts_math.probe(first), bool(first.has_bias)) + \
        (", transposed" if first.is_transposed else "")
    try:
        gap = kind_gap or derive.derive_family(model, model_type).engine_gap()
    except UnsupportedModelError as err:
        gap = str(err)
    status = "refused" if gap else "tested" if model_type in TESTED else "derived-untested"
    return FamilyRow(model_type, type(model).__name__, ", ".join(derive.experts_templates(modules)), math, status,
                     gap or "")


def family_rows() -> list[FamilyRow]:
    return [family_row(t) for t in family_model_types()]


def table(rows=None) -> str:
    """The markdown table of `rows` (default: every family)."""
    import transformers

    lines = [f"| model_type (transformers {transformers.__version__}) | needs transformers | loaded as | "
             "routed experts | experts math | kt-sft |", "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in (family_rows() if rows is None else rows)]
    return "\n".join(lines) + "\n"


def readme_table() -> tuple[str, str]:
    """(heading, table) of README.md that the installed transformers writes: PINNED every family under HEADING,
    a newer one its families beyond PINNED's under NEWER_HEADING."""
    import transformers

    if transformers.__version__ == PINNED:
        return HEADING, table()
    return NEWER_HEADING, table([family_row(t) for t in family_model_types() if t not in PINNED_FAMILIES])

"""LoRA adapters (PEFT directories) read as edits of a model's parameters, for the streaming export (kt_sft.export).

PEFT 0.18 saves an adapter's tensors under the model's in-memory module names (`base_model.model.` + the module
path, adapter name stripped). Each key is read as one of:

    <m>.lora_A.weight, <m>.lora_B.weight     LoRA on <m>'s weight (nn.Linear, Conv1D with fan_in_fan_out), or on
                                             the parameter a `target_parameters` wrapper of <m> targets (a fused
                                             [E, d1, d2] expert parameter, or a 2-D one such as a router weight).
                                             Several targeted parameters of one module nest in their registration
                                             order: the first is the innermost, `<m>.base_layer....base_layer`
                                             (docs/expert_lora_format.md)
    <m>.lora_embedding_A / _B                LoRA on an nn.Embedding
    any other key                            a whole tensor that replaces the base's: `modules_to_save`
                                             (`<m>.weight`), `save_embedding_layers` (`<m>.base_layer.weight`: a
                                             resized vocabulary; PEFT then also saves `<m>.modules_to_save.weight`,
                                             the same tensor, and `<m>.original_module.weight`, the base's own,
                                             which merging does not use), trained biases (`bias: all / lora_only`)

and the delta is PEFT's `get_delta_weight`: `transpose(B @ A, fan_in_fan_out) * scaling` (embeddings
`(B @ A).T * scaling`; fused experts per expert e `A_e.T @ B_e.T * scaling` with A_e = rows [e r, (e+1) r) of A
and B_e = columns e, e + E, ... of B), scaling = alpha / r, or alpha / sqrt(r) with use_rslora, r and alpha from
`rank_pattern` / `alpha_pattern` where a pattern matches (PEFT's `get_pattern_key`). Several adapters apply in
their order, as LLaMA-Factory merges them one after another: their deltas add up, and a replacement discards what
earlier adapters did to that parameter. Everything is checked against the model (built on the meta device) before
the export reads a weight: a module the model lacks or a factor whose shape does not fit names both sides.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
FACTORS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
# adapter_config.json settings whose adapters cannot be merged into plain weights here, with what to do.
UNMERGEABLE = {
    "use_dora": "DoRA's magnitude vectors are not merged by kt-sft's export; merge with stock PEFT",
    "lora_bias": "lora_bias adapters are not merged by kt-sft's export; merge with stock PEFT",
    "alora_invocation_tokens": "activated LoRA (aLoRA) applies to some tokens only and cannot be merged",
    "trainable_token_indices": "trainable tokens are not merged by kt-sft's export; merge with stock PEFT",
    "layer_replication": "layer replication changes the model's layers; merge with stock PEFT",
}


class AdapterError(ValueError):
    """An adapter the export cannot merge into this base checkpoint; raised before any weight is read."""


@dataclass
class Lora:
    """One LoRA pair on one parameter (factors as saved; `experts` > 0: a fused [E, d1, d2] expert parameter)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    transpose: bool = False  # fan_in_fan_out and embeddings: PEFT's delta is (B @ A).T
    experts: int = 0

    def delta(self) -> torch.Tensor:
        """The fp32 delta of a 2-D parameter, in its layout."""
        delta = self.B.float() @ self.A.float()
        return (delta.T if self.transpose else delta) * self.scale

    def expert_delta(self, e: int, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        """The fp32 delta [d1, d2] of expert e of a fused parameter [E, d1, d2] (only `rows` of d1 / `cols` of d2)."""
        r = self.A.shape[0] // self.experts
        a = self.A[e * r:(e + 1) * r].float()   # [r, d1]
        b = self.B[:, e::self.experts].float()  # [d2, r]
        a = a if rows is None else a[:, rows]
        b = b if cols is None else b[cols]
        return (a.T @ b.T) * self.scale


@dataclass
class ParamEdit:
    """What the adapters do to one parameter of the model (its in-memory name): a replacement tensor and / or LoRA
    deltas on top of it."""

    name: str
    shape: tuple
    replacement: Optional[torch.Tensor] = None
    loras: list = field(default_factory=list)

    @property
    def experts(self) -> int:
        return self.shape[0] if len(self.shape) == 3 else 0


def _strip_base_layers(path: str) -> tuple[str, int]:
    depth = 0
    while path.endswith(".base_layer"):
        path, depth = path[: -len(".base_layer")], depth + 1
    return path, depth


def _split_key(key: str) -> tuple[str, Optional[str]]:
    """(module path, "A" / "B") of a LoRA factor key, (parameter name with no base_layer, None) of any other."""
    parts = key.removeprefix(PREFIX).split(".")
    for i, part in enumerate(parts):
        if part in FACTORS:
            return ".".join(parts[:i]), FACTORS[part] + ("e" if part.startswith("lora_embedding") else "")
    return ".".join(p for p in parts if p not in ("base_layer", "modules_to_save")), None


def _targets(name: str, targets) -> bool:
    """PEFT's matching of a `target_parameters` entry: the whole name or a dotted suffix."""
    return any(name == t or name.endswith("." + t) for t in targets or ())


class _Reader:
    """Reads one adapter directory against the model: `edits` grows with each of its tensors."""

    def __init__(self, path: Path, model: nn.Module, base: str):
        self.path, self.base = path, base
        self.config = _read_config(path)
        self.modules = dict(model.named_modules())
        self.params = dict(model.named_parameters())
        self.trained_on = self.config.get("base_model_name_or_path") or "an unrecorded base model"

    def refuse(self, detail: str) -> AdapterError:
        return AdapterError(f"adapter {self.path} (trained on {self.trained_on}) does not fit the base model "
                            f"{self.base}: {detail}")

    def param_of(self, path: str) -> tuple[str, str]:
        """(the parameter the LoRA layer at module `path` adapts, PEFT's key for its rank / alpha patterns): a
        `target_parameters` wrapper (`path` with a `.base_layer` per wrapper nested inside it) adapts one of its
        module's targeted parameters, keyed `module.param`; any other LoRA layer its module's weight, keyed by the
        module's name."""
        module_path, depth = _strip_base_layers(path)
        module = self.modules.get(module_path)
        if module is None:
            raise self.refuse(f"it has LoRA weights for {module_path}, which this model does not have")
        targets = self.config.get("target_parameters")
        targeted = [p for p, v in module._parameters.items()
                    if v is not None and _targets(f"{module_path}.{p}", targets)]
        if targeted and depth < len(targeted):
            name = f"{module_path}.{targeted[len(targeted) - 1 - depth]}"
            return name, name
        if depth or "weight" not in module._parameters:
            raise self.refuse(f"its LoRA layer {path} adapts no parameter of {module_path} "
                              f"({type(module).__name__}); target_parameters={targets}")
        return f"{module_path}.weight", module_path

    def scale(self, key: str, rank: int) -> float:
        from peft.utils.other import get_pattern_key

        c = self.config
        ranks, alphas = c.get("rank_pattern") or {}, c.get("alpha_pattern") or {}
        r = ranks.get(get_pattern_key(ranks.keys(), key), c.get("r", 8))
        if r != rank:
            raise self.refuse(f"{key}: the LoRA factors have rank {rank}, adapter_config.json says r={r}")
        alpha = alphas.get(get_pattern_key(alphas.keys(), key), c.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    def lora(self, path: str, pair: dict, name: str, key: str, shape: tuple) -> Lora:
        """The LoRA pair saved for the layer at `path`, on parameter `name` of `shape`, its fit checked."""
        if set(pair) not in ({"A", "B"}, {"Ae", "Be"}):
            raise self.refuse(f"{path}: lora_A and lora_B come in pairs, found {sorted(pair)}")
        embedding = "Ae" in pair
        A, B = (pair["Ae"], pair["Be"]) if embedding else (pair["A"], pair["B"])
        if A.dim() != 2 or B.dim() != 2:
            raise self.refuse(f"{path}: {A.dim()}-D LoRA factors (a convolution?); the export merges LoRA on "
                              "linear, embedding and fused expert weights")
        experts = shape[0] if len(shape) == 3 else 0
        rank = A.shape[0] // max(experts, 1)
        transpose = embedding or bool(self.config.get("fan_in_fan_out"))
        if experts:
            fits = A.shape == (rank * experts, shape[1]) and B.shape == (shape[2], rank * experts)
        else:
            delta_shape = (A.shape[1], B.shape[0]) if transpose else (B.shape[0], A.shape[1])
            fits = B.shape[1] == A.shape[0] and delta_shape == shape
        if not fits or rank == 0:
            raise self.refuse(f"its LoRA factors of {name} are A {list(A.shape)}, B {list(B.shape)}, but the "
                              f"model's {name} is {list(shape)}")
        return Lora(A, B, self.scale(key, rank), transpose, experts)


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise FileNotFoundError(f"adapter {path}: no such directory")
    config_file, weights = path / ADAPTER_CONFIG, path / ADAPTER_WEIGHTS
    if not config_file.is_file():
        raise AdapterError(f"adapter {path}: no {ADAPTER_CONFIG} there; give the output_dir (or a checkpoint-N "
                           "directory) of a LoRA training run")
    if not weights.is_file():
        other = " (it has adapter_model.bin: re-save it as safetensors)" if (path / "adapter_model.bin").is_file() \
            else ""
        raise AdapterError(f"adapter {path}: {ADAPTER_WEIGHTS} is missing{other}")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"adapter {path}: peft_type {config.get('peft_type')!r}; the export merges LoRA adapters")
    for key, why in UNMERGEABLE.items():
        if config.get(key):
            raise AdapterError(f"adapter {path}: {key}={config[key]!r}: {why}")
    return config


def read_adapters(paths, model: nn.Module, base: str, vocab_params=()) -> dict[str, ParamEdit]:
    """{parameter name: its edit} of `paths` (adapter directories, applied in order) on `model` (built on the meta
    device from the base checkpoint `base`'s config). `vocab_params`: the input / output embedding weights, whose
    replacement may have more rows than the base (a resized vocabulary); any other replacement keeps the shape."""
    from safetensors.torch import load_file

    edits: dict[str, ParamEdit] = {}
    for path in paths:
        reader = _Reader(Path(path), model, base)
        tensors = load_file(str(Path(path) / ADAPTER_WEIGHTS))
        pairs: dict[str, dict] = {}
        for key, tensor in tensors.items():
            if ".original_module." in key:
                continue
            module, factor = _split_key(key)
            if factor is not None:
                pairs.setdefault(module, {})[factor] = tensor
                continue
            _replace(reader, edits, module, tensor, vocab_params)
        for module, pair in pairs.items():
            name, key = reader.param_of(module)
            edit = edits.setdefault(name, ParamEdit(name, tuple(reader.params[name].shape)))
            edit.loras.append(reader.lora(module, pair, name, key, edit.shape))
    return edits


def _replace(reader: _Reader, edits: dict, name: str, tensor: torch.Tensor, vocab_params) -> None:
    param = reader.params.get(name)
    if param is None:
        raise reader.refuse(f"it saves a whole {name} (modules_to_save / a trained bias), which this model does "
                            "not have")
    shape, given = tuple(param.shape), tuple(tensor.shape)
    if param.dim() == 3:
        raise reader.refuse(f"it replaces the routed experts' {name} (modules_to_save on the experts); the export "
                            "merges LoRA on them only")
    resized = name in vocab_params and given[1:] == shape[1:]
    if given != shape and not resized:
        raise reader.refuse(f"its saved {name} is {list(given)}, the model's is {list(shape)}")
    edits[name] = ParamEdit(name, given, replacement=tensor)

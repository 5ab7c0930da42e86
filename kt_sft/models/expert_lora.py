"""LoRA on the routed experts as standard PEFT adapters, computed by the CPU engine.

PEFT 0.18 puts LoRA on fused 3-D expert parameters with `LoraConfig(target_parameters=[...])`: each targeted
parameter of an experts module gets a `lora.ParamWrapper` (two targets = two nested wrappers), whose factors
`lora_A` [r*E, d1] / `lora_B` [d2, r*E] are what adapter_model.safetensors stores (docs/expert_lora_format.md).
Our experts modules hold no real weights (they are in the engine), so:

1. `expert_params_exposed(model)`: for PEFT's injection, each engine-backed experts module shows `gate_up_proj`
   and `down_proj` as parameters again: zero-stride fp32 CPU stand-ins of the right shape (one float of storage).
   PEFT creates, initialises and places the factors from them (fp32, on the CPU); afterwards the stand-ins are
   taken out of the parameter set again, so `.to()`, optimizers and state_dict never see them.
2. `attach_expert_lora(model)`: the outermost wrapper of each experts module runs the module's own forward, whose
   engine call gets the factors of every wrapper in its chain (`ExpertLoRA`), so the engine computes the LoRA terms
   next to the frozen GEMMs and returns their gradients; the factor modules ignore `.to()` (they stay fp32 in CPU
   RAM, where the engine reads them without a copy, and the optimizer updates them there); merging is refused.

Why fp32 master factors in CPU RAM: the factors are small next to the experts (r=8 on V2-Lite: 0.27 GB for all
26 layers), the engine computes the LoRA terms in fp32 anyway, and fp32 keeps AdamW's small updates from rounding
away; in CPU RAM they cost no transfer per step.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import types
from typing import Iterator, Optional

import torch
from torch import nn

from ..engine import ExpertLoRA

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # gated experts' fused parameters; ungated ones: up_proj, down_proj
ALL_EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
# Names `lora_target` / target_parameters may use for the routed experts (besides "<module path>.<param>"); they
# resolve against each family's own experts module (mlp.experts, feed_forward.experts, ...); "experts": all of its.
EXPERT_ALIASES = {"experts": ALL_EXPERT_PARAMS, **{p: (p,) for p in ALL_EXPERT_PARAMS}}


def engine_experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if getattr(m, "kt_layer", None) is not None}


def expert_params(module: nn.Module) -> tuple[str, ...]:
    """The fused parameters of an engine experts module, in registration order: gate_up_proj, down_proj (ungated
    experts: up_proj, down_proj)."""
    return EXPERT_PARAMS if module.kt_layer.activation.gated else ("up_proj", "down_proj")


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the routed-expert parameters targets can name, e.g. model.layers.1.mlp.experts.down_proj."""
    return [f"{name}.{p}" for name, m in engine_experts_modules(model).items() for p in expert_params(m)]


def _matches(full_name: str, target: str) -> bool:
    """PEFT's rule for a string target: the whole name or a dotted suffix of it."""
    return full_name == target or full_name.endswith("." + target)


def experts_paths(model: nn.Module, names=None) -> list[str]:
    """Each engine experts module's path below its layer index (`mlp.experts` for model.layers.3.mlp.experts),
    the form adapters name them by; the whole name where it has no index. `names`: other experts modules' names
    (default: the engine ones)."""
    paths = []
    for name in engine_experts_modules(model) if names is None else names:
        parts = name.split(".")
        last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
        path = ".".join(parts[last_index + 1:]) or name
        if path not in paths:
            paths.append(path)
    return paths


def names_routed_experts(model: nn.Module, target: str, experts=None) -> bool:
    """Whether one `lora_target` entry names the routed experts (-> target_parameters) rather than modules.

    Stock PEFT's meaning comes first: a name that matches any other module of the model (a dense or shared-expert
    `down_proj`, `shared_experts.down_proj`, ...) stays a module target, as it would without kt-sft. The routed
    experts are named by `experts`, by their module path (`mlp.experts`), or by a parameter suffix
    (`gate_up_proj`, `mlp.experts.down_proj`) that no module name matches. A name that matches nothing but looks
    like an expert parameter (`...experts.<x>`, `<x>.down_proj`) also lands here, so its error lists the real
    expert parameter names. `experts`: the routed-experts modules' names (default: the engine ones)."""
    experts = set(engine_experts_modules(model) if experts is None else experts)
    if target == "experts" or any(_matches(name, target) for name in experts):
        return True
    if any(_matches(name, target) for name, _ in model.named_modules() if name and name not in experts):
        return False
    if any(_matches(f"{name}.{p}", target) for name in experts for p in EXPERT_PARAMS):
        return True
    return target.rsplit(".", 1)[-1] in ALL_EXPERT_PARAMS or "experts." in target


def check_lora_targets(model: nn.Module, targets, experts, dropout: float = 0.0) -> None:
    """Refuse a lora_target entry that names no module and no routed-expert parameter of `model` (`experts`: the
    names of its routed-experts modules, engine ones or, before loading, those of the model built on meta), saying
    how this model names its experts and linears; and LoRA on the experts with `dropout` (PEFT refuses it only once
    the model is loaded). PEFT's own error ("Target modules ... not found") does not, and
    e.g. `gate_proj` names nothing in a model whose only gate_proj were routed experts (transformers 5 fuses them
    into one gate_up_proj)."""
    modules = [name for name, _ in model.named_modules() if name]
    params = [f"{name}.{p}" for name in experts for p in EXPERT_PARAMS]
    for target in targets:
        if target == "all" or target in EXPERT_ALIASES or any(_matches(n, target) for n in [*modules, *params]):
            continue
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora_target {target!r} matches no module of this {type(model).__name__}. Its routed experts are the "
            f"fused modules {' / '.join(experts_paths(model, experts))}, whose projections are gate_up_proj (gate and "
            "up together) and down_proj: name them with experts (both), gate_up_proj or down_proj (e.g. lora_target: "
            f"all,experts). Its linear layers: {', '.join(linears)}")
    on_experts = [t for t in targets if t != "all" and names_routed_experts(model, t, experts)]
    if on_experts and dropout:
        raise ValueError(f"lora_dropout={dropout}: LoRA on the routed experts (lora_target {', '.join(on_experts)}) "
                         "needs lora_dropout: 0 (PEFT applies no dropout to target_parameters); set lora_dropout: 0 "
                         "or leave the routed experts out of lora_target")


def resolve_expert_targets(model: nn.Module, names) -> list[str]:
    """target_parameters entries for `names` (aliases, experts module paths or parameter-name suffixes); error when
    one matches nothing."""
    full = expert_parameter_names(model)
    experts = engine_experts_modules(model)
    out = []
    for name in names:
        if name in EXPERT_ALIASES:
            suffixes = [f"{path}.{p}" for path in experts_paths(model) for p in EXPERT_ALIASES[name]]
            suffixes = [x for x in suffixes if any(_matches(f, x) for f in full)] or suffixes[:1]
        elif any(_matches(module, name) for module in experts):
            suffixes = [f"{name}.{p}" for p in ALL_EXPERT_PARAMS if any(_matches(f, f"{name}.{p}") for f in full)]
        else:
            suffixes = [name]
        for suffix in suffixes or [name]:
            if not any(_matches(f, suffix) for f in full):
                shown = ", ".join(full[:4]) + (", ..." if len(full) > 4 else "")
                raise ValueError(f"target {name!r} matches no routed-expert parameter of this model; its expert "
                                 f"parameters are {shown} (use 'experts', 'gate_up_proj' (ungated experts: "
                                 "'up_proj'), 'down_proj' or a suffix of those names)")
            if suffix not in out:
                out.append(suffix)
    return out


@contextlib.contextmanager
def expert_params_exposed(model: nn.Module) -> Iterator[None]:
    exposed = []
    for module in engine_experts_modules(model).values():
        params = expert_params(module)
        if any(name in module._parameters for name in params):
            continue
        for name in params:  # the shapes of the module's own (meta) parameters, transposed layouts included
            shape = tuple(module.__dict__.pop(name).shape)
            stand_in = torch.zeros((), dtype=torch.float32).expand(shape)
            module.register_parameter(name, nn.Parameter(stand_in, requires_grad=False))
        exposed.append(module)
    try:
        yield
    finally:
        for module in exposed:
            for name in expert_params(module):
                param = module._parameters.pop(name, None)
                if param is not None:
                    object.__setattr__(module, name, param.detach())


def _wrapper_chain(module: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    from peft.tuners.lora.layer import ParamWrapper

    chain = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module


def engine_factors(lora_A: torch.Tensor, lora_B: torch.Tensor, experts: int, transposed: bool,
                   interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's factors of one fused parameter -> the engine's (A [r*E, out] rows e*r + rho, B [in, r*E] columns
    rho*E + e; kt_sft.engine.lora), differentiably (gradients reach PEFT's). A parameter of [E, out, in] (transformers'
    usual layout) has them already; a transposed one [E, in, out] (gpt-oss) has lora_A on the input side and lora_B on
    the output side, so they trade places; interleaved gate / up output columns (gpt-oss) become [gate | up] halves."""
    A, B = lora_A, lora_B
    if transposed:
        r = lora_A.shape[0] // experts
        A = lora_B.t().reshape(r, experts, -1).transpose(0, 1).reshape(experts * r, -1)
        B = lora_A.reshape(experts, r, -1).transpose(0, 1).reshape(r * experts, -1).t()
    if interleaved:
        A = torch.cat([A[:, 0::2], A[:, 1::2]], dim=1)
    return A, B


def _active_factors(chain, experts: nn.Module) -> Optional[ExpertLoRA]:
    factors = {}
    for wrapper in chain:
        if wrapper.disable_adapters or wrapper.merged:
            continue
        for adapter in wrapper.active_adapters:
            if adapter in wrapper.lora_A:
                factors[wrapper.parameter_name] = (wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight,
                                                   float(wrapper.scaling[adapter]))
                break
    if not factors:
        return None
    policy = experts.kt_policy
    if policy.transposed or policy.interleaved:
        E = experts.kt_layer.num_experts
        factors = {p: (*engine_factors(A, B, E, policy.transposed, policy.interleaved and p == "gate_up_proj"), sc)
                   for p, (A, B, sc) in factors.items()}
    gu, d = factors.get("gate_up_proj", factors.get("up_proj")), factors.get("down_proj")
    return ExpertLoRA(A_gu=gu[0] if gu else None, B_gu=gu[1] if gu else None, A_d=d[0] if d else None,
                      B_d=d[1] if d else None, scale_gu=gu[2] if gu else 1.0, scale_d=d[2] if d else 1.0)


def _engine_forward(self, *args, **kwargs):
    """The experts module's own forward, as stock PEFT's wrappers run it (a subclass may work around the dispatched
    call: ERGO's per-route norms), with this chain's factors handed to the engine call (`kt_lora`, which
    kt_experts_forward reads)."""
    chain, experts = _wrapper_chain(self)
    experts.kt_lora = _active_factors(chain, experts)
    try:
        return experts(*args, **kwargs)
    finally:
        experts.kt_lora = None


def _refuse_merge(self, *args, **kwargs):
    raise NotImplementedError("merging expert LoRA into the CPU engine's packed weights is not supported; serve "
                              "the adapter unmerged (kt-sft computes it next to the frozen experts)")


def _stay_put(self, fn, recurse=True):  # nn.Module._apply: keep the factors fp32 in CPU RAM
    return self


def attach_expert_lora(model: nn.Module) -> int:
    """Route every PEFT-wrapped engine experts module through the engine with its LoRA; returns how many."""
    from peft.tuners.lora.layer import ParamWrapper

    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(w.base_layer) for w in wrappers}
    attached = 0
    for outer in (w for w in wrappers if id(w) not in inner):
        chain, experts = _wrapper_chain(outer)
        if getattr(experts, "kt_layer", None) is None:
            continue
        outer.forward = types.MethodType(_engine_forward, outer)
        for wrapper in chain:
            wrapper.merge = types.MethodType(_refuse_merge, wrapper)
            for adapter in list(wrapper.lora_A):
                for factor in (wrapper.lora_A[adapter], wrapper.lora_B[adapter]):
                    if factor.weight.device.type != "cpu" or factor.weight.dtype != torch.float32:
                        factor.to(device="cpu", dtype=torch.float32)
                    factor._apply = types.MethodType(_stay_put, factor)
        attached += 1
    return attached


def save_atomically(peft_model) -> None:
    """Make this PeftModel's `save_pretrained` write into a staging folder inside the target directory and move
    each finished file into place (os.replace: atomic within a filesystem). A save cut short (killed, disk full)
    then leaves the previous files and a `.kt-sft-saving-*` folder, never a truncated adapter_model.safetensors in
    the output_dir or a Trainer checkpoint-N. (The Trainer calls `self.model.save_pretrained`.)"""
    original = peft_model.save_pretrained

    def save_pretrained(save_directory, *args, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".kt-sft-saving-", dir=save_directory)
        try:
            original(staging, *args, **kwargs)
            for root, _, files in os.walk(staging):
                for name in files:
                    target = os.path.join(save_directory, os.path.relpath(os.path.join(root, name), staging))
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                    os.replace(os.path.join(root, name), target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    peft_model.save_pretrained = save_pretrained


def expert_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The factors (lora_A / lora_B weights of every adapter) of the PEFT wrappers on engine experts modules."""
    from peft.tuners.lora.layer import ParamWrapper

    params = []
    for wrapper in (m for m in model.modules() if isinstance(m, ParamWrapper)):
        if getattr(_wrapper_chain(wrapper)[1], "kt_layer", None) is None:
            continue
        for adapter in wrapper.lora_A:
            params += [wrapper.lora_A[adapter].weight, wrapper.lora_B[adapter].weight]
    return list({id(p): p for p in params}.values())


def _ready(peft_model):
    """The expert factors on the engine, and under data parallel their gradients averaged over the ranks."""
    from .. import distributed

    attach_expert_lora(peft_model)
    save_atomically(peft_model)
    distributed.share_expert_grads(peft_model, expert_lora_parameters(peft_model))
    return peft_model


def get_peft_model(model: nn.Module, config, **kwargs):
    """peft.get_peft_model for a kt-sft model: `target_parameters` may name the routed experts; saves are atomic
    per file (`save_atomically`)."""
    import peft

    if getattr(config, "target_parameters", None):
        config.target_parameters = resolve_expert_targets(model, list(config.target_parameters))
    with expert_params_exposed(model):
        peft_model = peft.get_peft_model(model, config, **kwargs)
    return _ready(peft_model)


def load_adapter(model: nn.Module, adapter_path, **kwargs):
    """peft.PeftModel.from_pretrained for a kt-sft model (expert LoRA in the adapter goes to the engine); a local
    adapter is checked first (complete, fitting this model: kt_sft.models.adapter_check)."""
    from peft import PeftModel

    from .adapter_check import check_adapter

    if os.path.isdir(str(adapter_path)):
        check_adapter(adapter_path, model, getattr(model, "name_or_path", None) or "this model")
    with expert_params_exposed(model):
        peft_model = PeftModel.from_pretrained(model, adapter_path, **kwargs)
    return _ready(peft_model)

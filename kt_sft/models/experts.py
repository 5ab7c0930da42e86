"""The `kt` experts implementation: transformers 5 experts modules hand their routed tokens to the CPU engine.

transformers routes every `@use_experts_implementation` experts module (qwen2_moe, qwen3_moe, deepseek_v2/v3,
mixtral, glm4_moe, ...) through `ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`. We register "kt"
there; the router, shared experts and everything else stay stock modules. The experts module's own weights
are detached from the module (kept as meta tensors, not parameters), so `.to(device)`, optimizers and
state_dict never see them and they never occupy GPU memory.
"""
from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from ..engine import ExpertLayer, moe_experts

IMPLEMENTATION = "kt"


def kt_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, lora=None) -> torch.Tensor:
    """`lora`: the ExpertLoRA of a PEFT adapter on these experts (see expert_lora.py), computed by the engine."""
    layer = getattr(self, "kt_layer", None)
    if layer is None:
        raise RuntimeError(f"experts_implementation='{IMPLEMENTATION}' but this {type(self).__name__} has no CPU "
                           "engine layer attached; load the model with kt_sft.load_model")
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    k = top_k_index.shape[-1]
    ids, weights = top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k)
    # Training under no_grad = the first pass of reentrant checkpointing: retain for the recompute pass.
    retain = self.training and not torch.is_grad_enabled() and getattr(layer, "retain_activations", True)
    chunk = getattr(layer, "chunk_size", 0)
    if not chunk or x.shape[0] <= chunk:
        return moe_experts(x, ids, weights, layer, retain=retain, lora=lora).view(shape)
    calls = -(-x.shape[0] // chunk)
    if calls > layer.max_saved and (retain or torch.is_grad_enabled()):
        # Each call saves its own forward for backward; together they hold what one unchunked call would, so the
        # layer keeps as many as this batch needs (batch lengths vary: a fixed kt_max_cache_depth would fail on
        # the first batch longer than chunk_size x depth).
        layer.grow_saved(calls)
    parts = [moe_experts(xc, ic, wc, layer, retain=retain, lora=lora)
             for xc, ic, wc in zip(x.split(chunk), ids.split(chunk), weights.split(chunk))]
    return torch.cat(parts).view(shape)


ExpertsInterface.register(IMPLEMENTATION, kt_experts_forward)
assert IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS


def attach_engine(module: torch.nn.Module, layer: ExpertLayer) -> None:
    """Point `module` at its engine layer and take its expert weights out of the parameter set (left on meta)."""
    for name in list(module._parameters):
        param = module._parameters.pop(name)
        object.__setattr__(module, name, param.detach() if param is not None else None)
    module.kt_layer = layer


def use_engine(config) -> None:
    """Switch a built model's experts dispatch to the engine (after init: transformers' own check knows only its
    built-in names, while its dispatch reads the registry at call time)."""
    config._experts_implementation = IMPLEMENTATION

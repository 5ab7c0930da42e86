"""The `kt` experts implementation: transformers 5 experts modules hand their routed tokens to the CPU engine.

transformers routes every `@use_experts_implementation` experts module (qwen2_moe, qwen3_moe, deepseek_v2/v3,
mixtral, glm4_moe, ...) through `ALL_EXPERTS_FUNCTIONS[config._experts_implementation]`. We register "kt"
there; the router, shared experts and everything else stay stock modules. The experts module's own weights
are detached from the module (kept as meta tensors, not parameters), so `.to(device)`, optimizers and
state_dict never see them and they never occupy GPU memory. The loader attaches each module's engine layer
(`kt_layer`) and how to call it (`kt_policy`, an ExpertCallPolicy) side by side.

NOTE (which no_grad forwards keep their result): reentrant gradient checkpointing runs each layer's forward first
under no_grad and again, with grad, in backward; the experts keep the first pass's result (`retain`) so the second
does not run the CPU experts again. Other training-mode forwards under no_grad must keep nothing: DPO's and KTO's
reference forwards (the policy with its adapter disabled) and KTO's KL forward, which have no backward; kept, they
held engine slots and host copies per layer and, with `chunk_size` splitting a batch into more calls than the
slots, evicted the policy forward's saved activations before its backward. So a no_grad forward retains only
inside a checkpoint call entered with grad enabled: `install_checkpoint_marking` (the loader calls it) wraps the
checkpoint function transformers' `_set_gradient_checkpointing` hands each layer (stock's, LLaMA-Factory's or
unsloth's), and that wrapper marks the call (`_checkpoint_with_grad`). A no_grad forward outside such a call
(inference, a reference forward, a hand-made torch.utils.checkpoint call) saves nothing.
"""
from __future__ import annotations

import contextvars
import functools
import types
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.checkpoint import checkpoint
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

from ..engine import ExpertLayer, GpuShare, moe_experts

IMPLEMENTATION = "kt"


@dataclass(frozen=True)
class ExpertCallPolicy:
    """How an experts module calls its engine layer, set once by the loader (kt_sft.loader.LoadOptions).

    chunk_size: most tokens per engine call (longer inputs are split; 0 = no limit).
    retain: in a checkpoint's first pass (training mode, no_grad, inside a checkpoint entered with grad: the NOTE
    above) keep the forward for the recompute pass; False runs the CPU experts again instead.
    share: the GPU share of this module's layer (kt_sft.engine.GpuShare), or None (every expert on the engine).
    transposed, interleaved: the module's fused parameters are [E, in, out] / its gate_up columns alternate gate and
    up (gpt-oss), as the engine's loading undid: PEFT's expert LoRA factors on them are mapped likewise
    (expert_lora.engine_factors).
    """

    chunk_size: int = 0
    retain: bool = True
    share: Optional[GpuShare] = None
    transposed: bool = False
    interleaved: bool = False


def kt_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                       top_k_weights: torch.Tensor, lora=None) -> torch.Tensor:
    """`lora`: the ExpertLoRA of a PEFT adapter on these experts (see expert_lora.py), computed by the engine;
    default: the one its PEFT wrapper set for this call (`kt_lora`)."""
    if lora is None:
        lora = getattr(self, "kt_lora", None)
    layer = getattr(self, "kt_layer", None)
    if layer is None:
        raise RuntimeError(f"experts_implementation='{IMPLEMENTATION}' but this {type(self).__name__} has no CPU "
                           "engine layer attached; load the model with kt_sft.load_model")
    policy: ExpertCallPolicy = self.kt_policy
    shape = hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1])
    k = top_k_index.shape[-1]
    ids, weights = top_k_index.reshape(-1, k), top_k_weights.reshape(-1, k)
    # ids past the routed experts (a router's zero / skip experts, expert-parallel sentinels) add nothing and get no
    # weight gradient, as in transformers' own experts implementations: the engine's "not here" slot (-1)
    ids = ids.masked_fill(ids >= layer.num_experts, -1)
    # The first pass of reentrant checkpointing (training, no_grad, inside a checkpoint entered with grad; see the
    # module's NOTE): retain for the recompute pass.
    retain = self.training and not torch.is_grad_enabled() and policy.retain and _checkpoint_with_grad.get()
    chunk = policy.chunk_size
    if not chunk or x.shape[0] <= chunk:
        return moe_experts(x, ids, weights, layer, retain=retain, lora=lora, share=policy.share).view(shape)
    calls = -(-x.shape[0] // chunk)
    if calls > layer.max_saved and (retain or torch.is_grad_enabled()):
        # Each call saves its own forward for backward; together they hold what one unchunked call would, so the
        # layer keeps as many as this batch needs (batch lengths vary: a fixed kt_max_cache_depth would fail on
        # the first batch longer than chunk_size x depth).
        layer.grow_saved(calls)
    parts = [moe_experts(xc, ic, wc, layer, retain=retain, lora=lora, share=policy.share)
             for xc, ic, wc in zip(x.split(chunk), ids.split(chunk), weights.split(chunk))]
    return torch.cat(parts).view(shape)


ExpertsInterface.register(IMPLEMENTATION, kt_experts_forward)
assert IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS

# True inside a gradient-checkpoint call that was entered with grad enabled (its first pass will have a backward).
_checkpoint_with_grad: contextvars.ContextVar = contextvars.ContextVar("kt_sft_checkpoint_with_grad", default=False)


def _marked_checkpoint(checkpoint_func):
    """`checkpoint_func` (the function a GradientCheckpointingLayer calls as func(layer_call, *args)), marking its
    calls with whether grad was enabled where they were entered."""
    if getattr(checkpoint_func, "_kt_sft_marked", False):
        return checkpoint_func

    @functools.wraps(checkpoint_func, assigned=functools.WRAPPER_ASSIGNMENTS + ("__self__",))
    def marked(function, *args, **kwargs):
        token = _checkpoint_with_grad.set(torch.is_grad_enabled())
        try:
            return checkpoint_func(function, *args, **kwargs)
        finally:
            _checkpoint_with_grad.reset(token)

    marked._kt_sft_marked = True
    return marked


def install_checkpoint_marking(model) -> None:
    """Make every checkpoint function the model's `_set_gradient_checkpointing` installs a marked one (see the
    module's NOTE); `gradient_checkpointing_enable` (transformers', LLaMA-Factory's) goes through it."""
    original = model._set_gradient_checkpointing
    if getattr(original, "_kt_sft_marked", False):
        return

    def set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=checkpoint, **kwargs):
        # kwargs: what newer transformers pass besides (every_n_layers), handed on as they are
        return original(enable=enable, gradient_checkpointing_func=_marked_checkpoint(gradient_checkpointing_func),
                        **kwargs)

    set_gradient_checkpointing._kt_sft_marked = True
    model._set_gradient_checkpointing = types.MethodType(set_gradient_checkpointing, model)


def attach_engine(module: torch.nn.Module, layer: ExpertLayer, policy: ExpertCallPolicy) -> None:
    """Point `module` at its engine layer and call policy, and take its expert weights out of the parameter set
    (left on meta)."""
    for name in list(module._parameters):
        param = module._parameters.pop(name)
        object.__setattr__(module, name, param.detach() if param is not None else None)
    module.kt_layer, module.kt_policy = layer, policy


def use_engine(config) -> None:
    """Switch a built model's experts dispatch to the engine (after init: transformers' own check knows only its
    built-in names, while its dispatch reads the registry at call time)."""
    config._experts_implementation = IMPLEMENTATION

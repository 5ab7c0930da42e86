"""Plain-PyTorch fp32 reference for LoRA on fused 3-D MoE expert weights, as PEFT 0.18.1 applies it.

transformers 5.6 experts modules (Qwen2/3Moe, Mixtral, DeepseekV2/V3, Glm4Moe) hold
    gate_up_proj [E, 2I, H]   (rows 0..I-1 = gate, rows I..2I-1 = up;  z = x @ gate_up[e].T)
    down_proj    [E, H, I]    (o = h @ down[e].T)
PEFT's `LoraConfig(target_parameters=[...])` wraps each 3-D parameter W [E, d1, d2] in `lora.ParamWrapper`
with flat factors
    lora_A.weight [r*E, d1]   -> A_e = lora_A.weight.view(E, r, d1)[e]        (expert-major rows)
    lora_B.weight [d2, r*E]   -> B_e = lora_B.weight.view(d2, r, E)[:, :, e]  (expert is the FASTEST column index)
and during forward temporarily replaces W by W + s * einsum("ore,eri->eio", B, A), i.e. per expert
    W_eff[e] = W[e] + s * A_e.T @ B_e.T          (s = lora_alpha / r, or lora_alpha / sqrt(r) with rslora)
Since W[e] is used as x @ W[e].T, the LoRA path is  x @ W_eff[e].T = x @ W[e].T + s * (x @ B_e) @ A_e:
for these [E, out, in] layouts PEFT's lora_B is the input-side ("down") factor and lora_A the output-side one.

Here the per-expert factors are kept as stacked tensors (see `ExpertLora`):
    A_gu [E, r, 2I], B_gu [E, H, r], A_d [E, r, H], B_d [E, I, r]
and the reference never materialises W_eff (x @ B then @ A), which is what an engine should compute.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

# Parameter registration order in every transformers 5.6 experts class; PEFT nests one ParamWrapper per
# targeted parameter in this order (first registered = innermost), which fixes the saved key names.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class ExpertLora(NamedTuple):
    """Per-expert LoRA factors; either projection may be None (not targeted)."""
    A_gu: Optional[torch.Tensor]  # [E, r_gu, 2I]
    B_gu: Optional[torch.Tensor]  # [E, H, r_gu]
    A_d: Optional[torch.Tensor]   # [E, r_d, H]
    B_d: Optional[torch.Tensor]   # [E, I, r_d]


# ---------------------------------------------------------------------------------------------------------------
# PEFT flat layout <-> per-expert tensors
# ---------------------------------------------------------------------------------------------------------------

def split_peft_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, num_experts: int):
    """PEFT flat (lora_A [r*E, d1], lora_B [d2, r*E]) -> (A [E, r, d1], B [E, d2, r]). Differentiable (views)."""
    E = num_experts
    r = lora_A.shape[0] // E
    assert lora_A.shape[0] == r * E and lora_B.shape[1] == r * E, (lora_A.shape, lora_B.shape, E)
    A = lora_A.reshape(E, r, lora_A.shape[1])
    B = lora_B.reshape(lora_B.shape[0], r, E).permute(2, 0, 1)  # B[e, i, rho] = lora_B[i, rho*E + e]
    return A, B


def pack_peft_lora(A: torch.Tensor, B: torch.Tensor):
    """Inverse of `split_peft_lora`: (A [E, r, d1], B [E, d2, r]) -> (lora_A [r*E, d1], lora_B [d2, r*E])."""
    E, r, d1 = A.shape
    assert B.shape[0] == E and B.shape[2] == r, (A.shape, B.shape)
    return A.reshape(E * r, d1).contiguous(), B.permute(1, 2, 0).reshape(B.shape[1], r * E).contiguous()


def lora_scale(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def peft_module_path(experts_prefix: str, param: str, targeted: Sequence[str]) -> str:
    """Module path of the ParamWrapper holding `param`'s LoRA, e.g. '...mlp.experts.base_layer' for gate_up_proj
    when both params are targeted, '...mlp.experts' for the outermost (last registered) targeted param."""
    order = [p for p in EXPERT_PARAMS if p in targeted]
    depth = len(order) - 1 - order.index(param)
    return experts_prefix + ".base_layer" * depth


def peft_adapter_keys(experts_prefix: str, targeted: Sequence[str] = EXPERT_PARAMS) -> dict:
    """{param: (lora_A key, lora_B key)} as in adapter_model.safetensors (no adapter name in saved keys).
    experts_prefix is the full saved prefix, e.g. 'base_model.model.model.layers.1.mlp.experts'."""
    return {p: (peft_module_path(experts_prefix, p, targeted) + ".lora_A.weight",
                peft_module_path(experts_prefix, p, targeted) + ".lora_B.weight") for p in targeted}


def to_peft_state_dict(experts_prefix: str, lora: ExpertLora) -> dict:
    """Saved-adapter tensors (vanilla-PEFT loadable) for one experts module from per-expert factors."""
    targeted = [p for p, a in zip(EXPERT_PARAMS, (lora.A_gu, lora.A_d)) if a is not None]
    keys = peft_adapter_keys(experts_prefix, targeted)
    out = {}
    for p, A, B in (("gate_up_proj", lora.A_gu, lora.B_gu), ("down_proj", lora.A_d, lora.B_d)):
        if A is not None:
            out[keys[p][0]], out[keys[p][1]] = pack_peft_lora(A, B)
    return out


def expert_lora_from_state_dict(sd: dict, experts_prefix: str, num_experts: int,
                                targeted: Sequence[str] = EXPERT_PARAMS) -> ExpertLora:
    """Per-expert factors of one experts module from a saved adapter state dict (safetensors load_file)."""
    keys = peft_adapter_keys(experts_prefix, targeted)
    got = {}
    for p in EXPERT_PARAMS:
        got[p] = split_peft_lora(sd[keys[p][0]], sd[keys[p][1]], num_experts) if p in targeted else (None, None)
    return ExpertLora(*got["gate_up_proj"], *got["down_proj"])


def expert_lora_from_module(experts_module, adapter_name: str = "default"):
    """(ExpertLora, (s_gu, s_d), base experts module) from a PeftModel's (possibly nested) ParamWrapper stack.
    The factors are views of the live lora_A/lora_B weights, so autograd reaches the PEFT parameters."""
    got = {p: (None, None) for p in EXPERT_PARAMS}
    scales = {p: 0.0 for p in EXPERT_PARAMS}
    mod = experts_module
    while hasattr(mod, "parameter_name") and hasattr(mod, "lora_A"):  # lora.ParamWrapper
        if adapter_name in mod.lora_A:
            got[mod.parameter_name] = split_peft_lora(mod.lora_A[adapter_name].weight,
                                                      mod.lora_B[adapter_name].weight, mod.num_experts)
            scales[mod.parameter_name] = mod.scaling[adapter_name]
        mod = mod.base_layer
    lora = ExpertLora(*got["gate_up_proj"], *got["down_proj"])
    return lora, (scales["gate_up_proj"], scales["down_proj"]), mod


# ---------------------------------------------------------------------------------------------------------------
# forward / backward
# ---------------------------------------------------------------------------------------------------------------

def _scales(scale):
    return (scale, scale) if isinstance(scale, (int, float)) else tuple(scale)


def merged_expert_weights(gate_up, down, lora: ExpertLora, scale):
    """W_eff as PEFT's parametrization builds it: W[e] + s * A_e.T @ B_e.T (materialised for all experts)."""
    s_gu, s_d = _scales(scale)
    gu = gate_up if lora.A_gu is None else gate_up + s_gu * torch.einsum("erd,eir->edi", lora.A_gu, lora.B_gu)
    dn = down if lora.A_d is None else down + s_d * torch.einsum("erd,eir->edi", lora.A_d, lora.B_d)
    return gu, dn


def experts_with_lora(x, topk_ids, topk_weights, gate_up, down, lora: Optional[ExpertLora], scale):
    """x [T, H], topk_ids [T, k], topk_weights [T, k], gate_up [E, 2I, H], down [E, H, I] -> y [T, H].

    y_t = sum_j w_tj * o(e_tj, x_t) with, for expert e,
        z = x @ gate_up[e].T + s_gu * (x @ B_gu[e]) @ A_gu[e]        [2I]
        g, u = z[:I], z[I:]                                           (gate first)
        h = silu(g) * u                                               [I]
        o = h @ down[e].T + s_d * (h @ B_d[e]) @ A_d[e]               [H]
    scale: float, or (s_gu, s_d). Unrolled per expert, no W_eff materialised. Differentiable in everything.
    """
    s_gu, s_d = _scales(scale)
    lora = lora if lora is not None else ExpertLora(None, None, None, None)
    I = down.shape[2]
    y = torch.zeros_like(x)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        z = xe @ gate_up[e].T
        if lora.A_gu is not None:
            z = z + s_gu * (xe @ lora.B_gu[e]) @ lora.A_gu[e]
        h = F.silu(z[:, :I]) * z[:, I:]
        o = h @ down[e].T
        if lora.A_d is not None:
            o = o + s_d * (h @ lora.B_d[e]) @ lora.A_d[e]
        y = y.index_add(0, tok, o * topk_weights[tok, slot, None])
    return y


def experts_with_lora_grads(x, topk_ids, topk_weights, gate_up, down, lora: ExpertLora, scale, dy):
    """Hand-written backward (the formulas in docs/expert_lora_format.md), no autograd.

    Returns dict with dx [T, H], dw [T, k], dA_gu, dB_gu, dA_d, dB_d (per-expert, shapes of ExpertLora).
    Both projections must be targeted here.
    """
    s_gu, s_d = _scales(scale)
    A_gu, B_gu, A_d, B_d = lora
    I = down.shape[2]
    dx = torch.zeros_like(x)
    dw = torch.zeros_like(topk_weights)
    g_ = {k: torch.zeros_like(v) for k, v in zip(("dA_gu", "dB_gu", "dA_d", "dB_d"), lora)}
    for e in range(gate_up.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe, w = x[tok], topk_weights[tok, slot, None]
        # forward, keeping what backward needs
        u_gu = xe @ B_gu[e]                                   # [n, r]   x B_gu
        z = xe @ gate_up[e].T + s_gu * u_gu @ A_gu[e]         # [n, 2I]
        g, up = z[:, :I], z[:, I:]
        sg = torch.sigmoid(g)
        act = g * sg                                          # silu(g)
        h = act * up                                          # [n, I]
        u_d = h @ B_d[e]                                      # [n, r]   h B_d
        o = h @ down[e].T + s_d * u_d @ A_d[e]                # [n, H]
        # backward
        dye = dy[tok]
        dw[tok, slot] = (dye * o).sum(-1)
        do = dye * w                                          # [n, H]
        g_["dA_d"][e] = s_d * u_d.T @ do                      # [r, H]
        t_d = do @ A_d[e].T                                   # [n, r]
        g_["dB_d"][e] = s_d * h.T @ t_d                       # [I, r]
        dh = do @ down[e] + s_d * t_d @ B_d[e].T              # [n, I]
        dg = dh * up * sg * (1 + g * (1 - sg))                # silu'(g) = sg * (1 + g (1 - sg))
        du = dh * act
        dz = torch.cat([dg, du], dim=-1)                      # [n, 2I]
        g_["dA_gu"][e] = s_gu * u_gu.T @ dz                   # [r, 2I]
        t_gu = dz @ A_gu[e].T                                 # [n, r]
        g_["dB_gu"][e] = s_gu * xe.T @ t_gu                   # [H, r]
        dx.index_add_(0, tok, dz @ gate_up[e] + s_gu * t_gu @ B_gu[e].T)
    return dict(dx=dx, dw=dw, **g_)

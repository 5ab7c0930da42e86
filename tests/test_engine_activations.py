"""The engine's expert activations and biases (csrc/activations.h, kt_sft/engine/activations.py): every activation
row x formats (fp32, bf16, int8) x every ISA path, forward, backward and expert LoRA, against plain-PyTorch fp32
references written here (clamps, alpha, up + 1, GELU-tanh, ungated relu^2, gate_up / down biases), by autograd.

Each case: a layer of odd sizes with LoRA on both projections, pre-activations ~N(0, 1) (or scaled past gpt-oss's
limit of 7), limits that clamp a good part of them, so the clamps' zero gradients are exercised. The GPU share (on
the CPU device) computes the same variants through activations.py's torch rows. Tolerances: engine_cases.TOLERANCE
(what a format's rounding costs with silu glu; the activations add nothing measurable).
"""
from __future__ import annotations

import zlib
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F

import kt_sft.engine as ke
from engine_cases import SHARE_DEVICES, TOLERANCE, computed_weights, make_lora
from expert_lora_reference import split_peft_lora
from moe_reference import make_routing, rel_err


class Variant(NamedTuple):
    activation: str
    limit: Optional[float]  # the layer's clamp limit (None: the row's own)
    bias: bool
    scale: float = 1.0      # gate / up weights scaled by this (gpt-oss's own limit 7 needs pre-activations past 7)


VARIANTS = {
    "silu_glu-bias": Variant("silu_glu", None, True),
    "silu_glu_clamped": Variant("silu_glu_clamped", 0.6, False),
    "gpt_oss_swiglu-bias": Variant("gpt_oss_swiglu", None, True, 6.0),
    "gpt_oss_swiglu-limit-bias": Variant("gpt_oss_swiglu", 0.7, True),
    "gelu_tanh_glu": Variant("gelu_tanh_glu", None, False),
    "relu2": Variant("relu2", None, False),
    "relu2-bias": Variant("relu2", None, True),
}
FORMATS = ("fp32", "bf16", "int8")
# (E, H, I, T, k, r_gu, r_d): odd sizes with tails inside a 32-block; more rows than one 32-row group
SHAPES = ((5, 40, 24, 9, 2, 3, 2), (6, 72, 40, 70, 3, 4, 5))


def reference_act(v: Variant, g: Optional[torch.Tensor], u: torch.Tensor) -> torch.Tensor:
    """h from the pre-activations, as the families' own modules write it (gpt-oss's _apply_gate, DeepSeek-V4's
    clamped swiglu, gemma4's GELU-tanh, nemotron_h's ReLUSquaredActivation)."""
    if v.activation == "relu2":
        return torch.square(F.relu(u))
    limit = v.limit if v.limit is not None else (7.0 if v.activation == "gpt_oss_swiglu" else None)
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(min=-limit, max=limit)
    if v.activation == "gpt_oss_swiglu":
        return (u + 1) * (g * torch.sigmoid(g * 1.702))
    if v.activation == "gelu_tanh_glu":
        return F.gelu(g, approximate="tanh") * u
    return F.silu(g) * u


class Experts(NamedTuple):
    gate: Optional[torch.Tensor]  # [E, I, H] (None: ungated)
    up: torch.Tensor              # [E, I, H]
    down: torch.Tensor            # [E, H, I]
    b_gate: Optional[torch.Tensor]  # [E, I]
    b_up: Optional[torch.Tensor]
    b_down: Optional[torch.Tensor]  # [E, H]


def make_experts(v: Variant, E, H, I, gen) -> Experts:
    gated = ke.ACTIVATIONS[v.activation].gated
    w = lambda *shape: torch.randn(*shape, generator=gen) * shape[-1] ** -0.5  # noqa: E731
    gate, up, down = (w(E, I, H) * v.scale if gated else None), w(E, I, H) * v.scale, w(E, H, I)
    b = (lambda *shape: 0.3 * torch.randn(*shape, generator=gen)) if v.bias else (lambda *shape: None)
    return Experts(gate, up, down, b(E, I) if gated else None, b(E, I), b(E, H))


def as_saved(t: torch.Tensor, fmt: str) -> torch.Tensor:
    """t with the values the format saves its pre-activations in (bf16: rounded), gradients passing straight
    through: a clamp's mask then flips where the engine's (and stock bf16 torch's) does. Near a limit a bf16 step
    flips a mask; those full-size gradient elements alone cost sqrt(their fraction) in relative error (5-9 % with
    fp32 pre-activations here)."""
    dtype = ke.get_format(fmt).compute_dtype
    return t + (t.to(dtype).float() - t).detach()


def reference(v: Variant, ex: Experts, fmt, x, ids, w, lora: ke.ExpertLoRA, dy):
    """fp32 (y, dx, dw, the four factor gradients) by autograd, on the weights the format computes with."""
    E = ex.up.shape[0]
    I = ex.up.shape[1]
    weights = [None if t is None else computed_weights(ke.get_format(fmt), t) for t in (ex.gate, ex.up, ex.down)]
    factors = [t.detach().clone().requires_grad_(True) for t in lora.factors()]
    xr, wr = x.float().requires_grad_(True), w.clone().requires_grad_(True)
    A_gu, B_gu = split_peft_lora(factors[0], factors[1], E)
    A_d, B_d = split_peft_lora(factors[2], factors[3], E)
    y = torch.zeros(x.shape[0], x.shape[1])
    for e in range(E):
        tok, slot = torch.nonzero(ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xr[tok]
        z = lora.scale_gu * (h @ B_gu[e]) @ A_gu[e]  # the gate_up columns: [gate | up], ungated [up]
        g = None if weights[0] is None else h @ weights[0][e].T + z[:, :I]
        u = h @ weights[1][e].T + z[:, -I:]
        if ex.b_up is not None:
            g, u = None if g is None else g + ex.b_gate[e], u + ex.b_up[e]
        g, u = (None if t is None else as_saved(t, fmt) for t in (g, u))
        a = reference_act(v, g, u)
        o = a @ weights[2][e].T + lora.scale_d * (a @ B_d[e]) @ A_d[e]
        if ex.b_down is not None:
            o = o + ex.b_down[e]
        y = y.index_add(0, tok, o * wr[tok, slot, None])
    grads = torch.autograd.grad(y, [xr, wr] + factors, dy.float(), allow_unused=True)
    return (y.detach(), grads[0], grads[1], tuple(torch.zeros_like(f) if g is None else g
                                                  for f, g in zip(factors, grads[2:])))


def make_case(name: str, fmt: str, shape):
    v = VARIANTS[name]
    E, H, I, T, k, r_gu, r_d = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr((name, shape)).encode()))
    ex = make_experts(v, E, H, I, gen)
    ids, w = make_routing(T, E, k, "uniform", gen)
    compute = ke.get_format(fmt).compute_dtype
    x, dy = torch.randn(T, H, generator=gen).to(compute), torch.randn(T, H, generator=gen).to(compute)
    lora = make_lora(E, H, I, r_gu, r_d, gen)
    if ex.gate is None:  # ungated: LoRA on up_proj alone, A_gu [r*E, I]
        lora.A_gu = lora.A_gu[:, I:].contiguous()
    layer = ke.ExpertLayer(E, H, I, fmt, v.activation, limit=v.limit, bias=v.bias)
    for which, t in zip(("gate", "up", "down"), ex[:3]):
        if t is not None:
            layer.set_projection(which, t)
    if v.bias:
        for which, t in zip(("gate", "up", "down"), ex[3:]):
            if t is not None:
                layer.set_bias(which, t)
    return v, ex, layer, x, ids, w, lora, dy


def assert_close(got, want, tol, what):
    names = ("y", "dx", "dw", "dA_gu", "dB_gu", "dA_d", "dB_d")
    limits = (tol.y, tol.dx, tol.dw) + (tol.factors,) * 4
    for name, g, r, limit in zip(names, (*got[:3], *got[3]), (*want[:3], *want[3]), limits):
        err = rel_err(g, r)
        assert err < limit, f"{name}: rel err {err:.2e} >= {limit:.1e} ({what})"


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", VARIANTS)
def test_activation_matches_reference(name, fmt, shape, isa):
    v, ex, layer, x, ids, w, lora, dy = make_case(name, fmt, shape)
    y, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, grads = layer.backward(handle, dy, lora=lora)
    want = reference(v, ex, fmt, x, ids, w, lora, dy)
    assert_close((y, dx, dw, tuple(grads)), want, TOLERANCE[fmt], f"{name} {fmt} {isa}")
    # the frozen path (no LoRA) too: its epilogues run without the LoRA terms
    y0, _ = layer.forward(x, ids, w)
    ref0 = reference(v, ex, fmt, x, ids, w, ke.ExpertLoRA(*(torch.zeros_like(t) for t in lora.factors()), 1.0, 1.0),
                     dy)
    assert rel_err(y0, ref0[0]) < TOLERANCE[fmt].y


@pytest.mark.parametrize("device", SHARE_DEVICES)
@pytest.mark.parametrize("name", ["gpt_oss_swiglu-limit-bias", "relu2-bias", "gelu_tanh_glu"])
def test_gpu_share_computes_the_activation(name, device):
    """Half the experts on the GPU share (the CPU device, and CUDA where present): the same references."""
    shape = SHAPES[1]
    v, ex, layer, x, ids, w, lora, dy = make_case(name, "fp32", shape)
    share = ke.GpuShare(layer, shape[0] // 2, device, min_tokens=1, chunk=2)
    xs, ws = (t.to(device, copy=True).requires_grad_(True) for t in (x, w))
    params = ke.ExpertLoRA(*(t.clone().requires_grad_(True) for t in lora.factors()), lora.scale_gu, lora.scale_d)
    y = ke.moe_experts(xs, ids.to(device), ws, layer, lora=params, share=share)
    y.backward(dy.to(device))
    want = reference(v, ex, "fp32", x, ids, w, lora, dy)
    got = (y.detach().cpu(), xs.grad.cpu(), ws.grad.cpu(), tuple(t.grad for t in params.factors()))
    assert_close(got, want, TOLERANCE["fp32"], f"{name} with a share")


def test_ungated_layer_has_no_gate():
    layer = ke.ExpertLayer(4, 32, 16, "bf16", "relu2")
    assert layer.projections == ("up", "down") and layer.panels().projections[0].raw.numel() == 0
    assert layer.packed_bytes == ke.ExpertLayer(4, 32, 16, "bf16").packed_bytes * 2 // 3
    with pytest.raises(ValueError, match="relu2 ungated experts have no gate"):
        layer.set_projection("gate", torch.zeros(4, 16, 32))
    assert layer.missing_weights()[0] == "expert 0 up"


def test_bad_activation_arguments():
    with pytest.raises(ValueError, match="silu_glu_clamped needs a clamp limit"):
        ke.ExpertLayer(4, 32, 16, "bf16", "silu_glu_clamped")
    with pytest.raises(ValueError, match="silu_glu takes no clamp limit"):
        ke.ExpertLayer(4, 32, 16, "bf16", "silu_glu", limit=3.0)
    with pytest.raises(ValueError, match="finite number > 0"):
        ke.get_activation("silu_glu_clamped", float("nan"))
    with pytest.raises(ValueError, match="is not one of"):
        ke.get_activation("swish")
    with pytest.raises(ValueError, match="made without expert biases"):
        ke.ExpertLayer(4, 32, 16, "bf16").set_bias("down", torch.zeros(4, 32))
    layer = ke.ExpertLayer(4, 32, 16, "bf16", bias=True)
    with pytest.raises(ValueError, match=r"non-finite value \(NaN/Inf\) in the up bias of expert 2"):
        layer.set_bias("up", torch.tensor([[0.0] * 16, [float("nan")] * 16]), expert_begin=1)
    assert "expert 0 gate bias" in layer.missing_weights()


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
@pytest.mark.parametrize("name", ["relu2-bias", "gpt_oss_swiglu-limit-bias"])
def test_block_formats(name, fmt, isa):
    """fp8 and int4 compute bf16 GEMMs on their decoded weights (engine_cases.py): the same reference on those."""
    v, ex, layer, x, ids, w, lora, dy = make_case(name, fmt, SHAPES[1])
    y, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, grads = layer.backward(handle, dy, lora=lora)
    want = reference(v, ex, fmt, x, ids, w, lora, dy)
    assert_close((y, dx, dw, tuple(grads)), want, TOLERANCE[fmt], f"{name} {fmt} {isa}")


@pytest.mark.parametrize("fmt", ["int8-gemm", "int4-gemm"])
@pytest.mark.parametrize("name", ["relu2-bias", "gelu_tanh_glu"])
def test_int8_gemm_formats_near_the_unquantized_reference(name, fmt, isa):
    """The int8-GEMM formats (their exact spec is engine_cases.py's W8A8 reference, for silu glu): within what their
    quantization costs of the unquantized fp32 model, an ungated layer's dz scale fold included. (Not with clamps:
    quantization moves pre-activations across a limit, and each such element is a whole gradient off.)"""
    v, ex, layer, x, ids, w, lora, dy = make_case(name, fmt, SHAPES[1])
    y, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, grads = layer.backward(handle, dy, lora=lora)
    want = reference(v, ex, "fp32", x, ids, w, lora, dy)
    bound = TOLERANCE[fmt].unquantized
    assert_close((y, dx, dw, tuple(grads)), want, type(TOLERANCE[fmt])(*[bound] * 5), f"{name} {fmt} {isa}")

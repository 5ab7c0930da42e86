"""INT8 expert weights (`ExpertLayer(weights="int8")`, kt_backend: AMXINT8) on every ISA path.

The spec (csrc/common.h, INT8): per output channel n, s = max_k |w[n][k]| / 127 and q = clamp(round_half_even(
w / s), -127, 127) (an all-zero channel: s = 0, q = 0); the kernels compute with bf16(q * s). So an int8 layer must
give *bitwise* the outputs and gradients of a bf16 layer loaded with those dequantized weights, whatever the path,
and stay within quantization error of the unquantized fp32 reference.
"""
import zlib

import pytest
import torch

import kt_sft.engine as ke
from moe_reference import make_experts, make_routing, reference_grads, rel_err
from test_engine_lora import make_lora
from test_engine_parity import SHAPES as PARITY_SHAPES, make_layer


def dequantized(w: torch.Tensor) -> torch.Tensor:
    """What an int8 layer computes with, from the spec above (plain torch, fp32 arithmetic)."""
    w = w.float()
    s = w.abs().amax(-1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0).clamp(-127, 127)
    return (q * s).bfloat16()


def _run(layer, x, ids, w, dy, lora=None):
    y, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    out = layer.backward(handle, dy, lora=lora)
    return (y, *out[:2]) if lora is None else (y, out[0], out[1], *out[2])


# The engine parity shapes (odd H and I, decode, empty experts, skewed routing, 32-row blocks plus tails) without
# the three whose routing variants add nothing for the weight format.
SHAPES = {s: why for s, why in PARITY_SHAPES.items() if s[5] != "one_expert" and s[4] != 8 and s[1] > 16}


@pytest.mark.parametrize("shape", list(SHAPES), ids=[f"{s[0]}x{s[1]}x{s[2]}-T{s[3]}k{s[4]}-{s[5]}" for s in SHAPES])
def test_int8_layer_is_the_bf16_layer_of_its_dequantized_weights(isa, shape):
    E, H, I, T, k, routing = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    gate, up, down = make_experts(E, H, I, gen, torch.float32)
    gate[0, 3] = 0.0  # an all-zero channel: scale 0
    down[E - 1, :, 5] = 0.0  # an all-zero input column (not a channel): ordinary zeros
    ids, w = make_routing(T, E, k, routing, gen)
    x = torch.randn(T, H, generator=gen).bfloat16()
    dy = torch.randn(T, H, generator=gen).bfloat16()

    got = _run(make_layer(gate, up, down, "int8"), x, ids, w, dy)
    want = _run(make_layer(dequantized(gate), dequantized(up), dequantized(down), torch.bfloat16), x, ids, w, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, want):
        assert torch.equal(a, b), f"{name} differs from the bf16 layer of dequantized weights ({SHAPES[shape]})"

    # Quantization error against the unquantized model stays small (per-channel int8 of Gaussian weights).
    ref = reference_grads(x, gate, up, down, ids, w, dy)
    for name, a, b in zip(("y", "dx", "dw"), got, ref):
        assert rel_err(a, b) < 2e-2, name


def test_rounding_is_half_to_even_per_channel(isa):
    """Weights placed exactly on half steps of their channel's scale: round-half-even (2.5 -> 2, -0.5 -> -0,
    63.5 -> 64) must be what the engine stores; round-half-away would change the outputs."""
    E, H, I = 2, 32, 32
    gen = torch.Generator().manual_seed(11)
    steps = torch.tensor([127.0, 63.5, -0.5, 1.5, 2.5, -2.5, 0.5, -126.5])
    scale = 2.0 ** -6  # exact in binary: w / s is exactly the half step
    gate = (steps[torch.randint(0, 8, (E, I, H), generator=gen)] * scale)
    gate[:, :, 0] = 127 * scale  # every channel's max is 127 steps, so s = scale exactly
    up, down = gate.clone(), gate.transpose(1, 2).contiguous()
    ids, w = make_routing(9, E, 2, "uniform", gen)
    x = torch.randn(9, H, generator=gen).bfloat16()
    dy = torch.randn(9, H, generator=gen).bfloat16()
    got = _run(make_layer(gate, up, down, "int8"), x, ids, w, dy)
    want = _run(make_layer(dequantized(gate), dequantized(up), dequantized(down), torch.bfloat16), x, ids, w, dy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    away = torch.sign(gate) * torch.floor(gate.abs() / scale + 0.5) * scale  # half away from zero
    assert not torch.equal(away, dequantized(gate).float()), "the test data must contain ties"


def lora_case(E, H, I, T, k, routing):
    """Experts (fp32), routing, bf16 x and dy, and a LoRA of ranks 4 / 8, drawn from seed 5 in this order."""
    gen = torch.Generator().manual_seed(5)
    gate, up, down = make_experts(E, H, I, gen, torch.float32)
    ids, w = make_routing(T, E, k, routing, gen)
    x = torch.randn(T, H, generator=gen).bfloat16()
    dy = torch.randn(T, H, generator=gen).bfloat16()
    return gate, up, down, ids, w, x, dy, make_lora(E, H, I, 4, 8, gen)


def test_int8_with_expert_lora(isa):
    """LoRA on int8 experts: the same bitwise identity, factor gradients included."""
    gate, up, down, ids, w, x, dy, lora = lora_case(6, 72, 40, 60, 2, "skewed")
    got = _run(make_layer(gate, up, down, "int8"), x, ids, w, dy, lora)
    want = _run(make_layer(dequantized(gate), dequantized(up), dequantized(down), torch.bfloat16),
                x, ids, w, dy, lora)
    assert len(got) == 7
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), i


def test_int8_halves_the_weight_memory():
    E, H, I = 4, 100, 70  # padded to 128 x 96
    gate, up, down = make_experts(E, H, I, torch.Generator().manual_seed(0), torch.float32)
    q = make_layer(gate, up, down, "int8")
    b = make_layer(gate, up, down, torch.bfloat16)
    assert b.packed_bytes == 3 * E * 128 * 96 * 2
    assert q.packed_bytes == 3 * E * 128 * 96 + 4 * E * (2 * 96 + 128)  # panels + fp32 scales per channel
    assert "format=int8," in repr(q)


@pytest.mark.parametrize("fmt", ["int4", "float16", "AMXINT4"])
def test_unknown_format_is_refused(fmt):
    with pytest.raises(ValueError, match=f"expert format '{fmt}' is not one of bf16, fp32, int8, int8-gemm"):
        ke.ExpertLayer(2, 32, 32, fmt)


def test_non_finite_weight_is_refused_when_quantizing():
    gate, up, down = make_experts(3, 32, 32, torch.Generator().manual_seed(0), torch.float32)
    gate[2, 4, 7] = float("inf")
    layer = ke.ExpertLayer(3, 32, 32, "int8")
    with pytest.raises(ValueError, match="gate weights of expert 2"):
        layer.set_projection("gate", gate)

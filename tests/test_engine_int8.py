"""INT8 expert weights (format "int8", kt_backend INT8): what the engine tester's shape grid (test_engine_parity.py)
does not cover.

The spec (csrc/common.h, INT8): per output channel n, s = max_k |w[n][k]| / 127 and q = clamp(round_half_even(
w / s), -127, 127) (an all-zero channel: s = 0, q = 0); the kernels compute with bf16(q * s), so an int8 layer gives
*bitwise* the outputs of a bf16 layer loaded with those dequantized weights (engine_cases.bitwise_dequantized_twin,
checked over the whole grid). Here: ties must round half to even, the memory, and the refusals.
"""
import pytest
import torch

import kt_sft.engine as ke
from engine_cases import Case, bitwise_dequantized_twin, dequantized, make_layer, run_layer
from moe_reference import make_experts, make_routing


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
    case = Case(ke.FORMATS["int8"], gate, up, down, ids, w, x, dy, None)
    bitwise_dequantized_twin(case, run_layer(make_layer(gate, up, down, "int8"), case), "weights on half steps")
    away = torch.sign(gate) * torch.floor(gate.abs() / scale + 0.5) * scale  # half away from zero
    assert not torch.equal(away, dequantized(gate).float()), "the test data must contain ties"


def test_int8_halves_the_weight_memory():
    E, H, I = 4, 100, 70  # padded to 128 x 96
    gate, up, down = make_experts(E, H, I, torch.Generator().manual_seed(0), torch.float32)
    q = make_layer(gate, up, down, "int8")
    b = make_layer(gate, up, down, "bf16")
    assert b.packed_bytes == 3 * E * 128 * 96 * 2
    assert q.packed_bytes == 3 * E * 128 * 96 + 4 * E * (2 * 96 + 128)  # panels + fp32 scales per channel
    assert "format=int8," in repr(q)


@pytest.mark.parametrize("fmt", ["int2", "float16", "AMXFP4"])
def test_unknown_format_is_refused(fmt):
    with pytest.raises(ValueError, match=f"expert format '{fmt}' is not one of bf16, fp32, int8, int8-gemm, fp8, int4"):
        ke.ExpertLayer(2, 32, 32, fmt)


def test_non_finite_weight_is_refused_when_quantizing():
    gate, up, down = make_experts(3, 32, 32, torch.Generator().manual_seed(0), torch.float32)
    gate[2, 4, 7] = float("inf")
    layer = ke.ExpertLayer(3, 32, 32, "int8")
    with pytest.raises(ValueError, match="gate weights of expert 2"):
        layer.set_projection("gate", gate)

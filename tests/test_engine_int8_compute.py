"""INT8 GEMMs (format "int8-gemm", kt_backend AMXINT8): what the shape grid of the engine tester (test_engine_parity.py)
does not cover.

The spec (csrc/common.h, INT8 GEMMs): the weights are the int8 layer's (per output channel q_w, s_w); each GEMM's A
rows are quantized per row, v = a * cs (cs = the weight scales of the reduction dimension in backward, 1 in
forward), s = max |v| / 127, q = round_half_even(v / s) clamped to +-127, and C = float(sum q_a q_w) * s (* s_w in
forward). engine_cases.w8a8_reference is that spec in plain torch (LoRA terms included), the grid's reference for
this format. Here: the spec is far from the W8A16 computation (or matching it would prove nothing), Inf stays
non-finite, tiny rows, and the format row.
"""
import pytest
import torch

import kt_sft.engine as ke
from engine_cases import (SHAPES, TOLERANCE, Shape, case_layer, exact_reference, make_case, run_layer, shape_id,
                          w8a8_reference)
from moe_reference import rel_err


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=[shape_id(s) for s in SHAPES])
def test_spec_is_far_from_w8a16(shape, lora):
    """The int8 layer's bf16 GEMMs on the same weights (W8A16, here its reference) are far from the W8A8 spec (measured
    >= 6.6e-3; bound: 20x the grid's largest int8-gemm tolerance), so the grid tells the two computations apart."""
    case = make_case(shape, "int8-gemm", lora)
    spec, w8a16 = w8a8_reference(case), exact_reference(make_case(shape, "int8", lora))
    tol = TOLERANCE["int8-gemm"]
    for name in ("y", "dx", "dw"):
        err = rel_err(getattr(w8a16, name), getattr(spec, name))
        assert err > 20 * max(tol.y, tol.dx, tol.dw), f"{name}: W8A16 only {err:.1e} from the W8A8 spec"


def test_non_finite_activation_stays_non_finite(isa):
    """A row with Inf must not be quantized into finite garbage: its token's output is NaN/Inf, the others not."""
    case = make_case(Shape(4, 64, 64, 6, 2, "uniform", 0, 0), "int8-gemm", lora=False)
    case.x[2, 5] = float("inf")
    y, _ = case_layer(case).forward(case.x, case.ids, case.w)
    assert not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


def test_tiny_row_divides_instead_of_overflowing(isa):
    """A row whose maximum is below 127 / FLT_MAX (here a dy row near 1e-37, and the dz rows it makes) would get
    127 / m = Inf: it is quantized by division instead, so its gradient follows the spec instead of vanishing."""
    case = make_case(Shape(4, 64, 64, 6, 2, "uniform", 0, 0), "int8-gemm", lora=False)
    case.dy[1] = (case.dy[1].float() * (1e-37 / case.dy[1].float().abs().max())).bfloat16()
    got, spec = run_layer(case_layer(case), case), w8a8_reference(case)
    assert got.dx[1].abs().max() > 0
    assert rel_err(got.dx[1], spec.dx[1]) < 1e-2
    assert rel_err(got.dx, spec.dx) < TOLERANCE["int8-gemm"].dx


def test_int8_gemm_format_row():
    layer = ke.ExpertLayer(2, 32, 32, "int8-gemm")
    assert layer.format is ke.get_format("AMXINT8") and layer.dtype == torch.bfloat16
    assert layer.packed_bytes == 3 * 2 * 32 * 32 + 2 * (2 * 32 + 32) * 4  # int8 panels + fp32 channel scales

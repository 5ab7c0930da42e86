"""Every ISA path of the engine against the fp32 reference (tests/moe_reference.py), forward and backward."""
import zlib

import pytest
import torch

import kt_sft.engine as ke
from moe_reference import make_experts, make_routing, reference_grads, rel_err

# Tolerance per engine dtype on ||out - ref|| / ||ref||. fp32 differs from the reference only in summation
# order and exp(); bf16 rounds x, dy, the intermediate activation and the outputs (2^-9 each).
TOLERANCE = {
    torch.float32: {"y": 5e-6, "dx": 5e-6, "dw": 5e-6},
    torch.bfloat16: {"y": 1e-2, "dx": 1.5e-2, "dw": 1.5e-2},
}

# (E, H, I, T, k, routing): reason
SHAPES = {
    (8, 64, 96, 16, 2, "uniform"): "aligned sizes, the common case",
    (5, 33, 17, 7, 3, "uniform"): "odd H and I: tails inside one padded 32-block",
    (4, 130, 70, 1, 2, "uniform"): "T=1 (decode), H and I past a block boundary",
    (16, 64, 48, 5, 2, "uniform"): "more experts than routed rows: most experts empty",
    (8, 48, 64, 40, 1, "one_expert"): "k=1, every token on one expert",
    (8, 96, 80, 37, 8, "uniform"): "k=8, every expert used by every token",
    (6, 72, 40, 300, 4, "skewed"): "skewed routing, >256 rows on one expert (several row chunks)",
    (3, 16, 16, 3, 2, "uniform"): "sizes below one block",
    (4, 256, 192, 100, 2, "uniform"): "full 32-row AMX blocks plus a 16-row and a short tail",
}


def make_layer(gate, up, down, fmt):
    """An ExpertLayer of format `fmt` (a format name, or the dtype of the exact format) loaded with gate/up [E, I, H]
    and down [E, H, I]."""
    E, I, H = gate.shape
    layer = ke.ExpertLayer(E, H, I, ke.for_model_dtype(fmt) if isinstance(fmt, torch.dtype) else fmt)
    layer.set_projection("gate", gate)
    layer.set_projection("up", up)
    layer.set_projection("down", down)
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=[f"{s[0]}x{s[1]}x{s[2]}-T{s[3]}k{s[4]}-{s[5]}" for s in SHAPES])
def test_forward_backward_match_reference(isa, dtype, shape):
    E, H, I, T, k, routing = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))  # same data in every process
    gate, up, down = make_experts(E, H, I, gen, dtype)
    ids, w = make_routing(T, E, k, routing, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    dy = torch.randn(T, H, generator=gen).to(dtype)
    y_ref, dx_ref, dw_ref = reference_grads(x, gate, up, down, ids, w, dy)

    layer = make_layer(gate, up, down, dtype)
    y, handle = layer.forward(x, ids, w, save_for_backward=True)
    dx, dw = layer.backward(handle, dy)

    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    assert rel_err(y, y_ref) < tol["y"], SHAPES[shape]
    assert rel_err(dx, dx_ref) < tol["dx"], SHAPES[shape]
    assert rel_err(dw, dw_ref) < tol["dw"], SHAPES[shape]


def test_paths_agree_with_scalar_spec(isa):
    """Every path computes what the scalar path (the executable spec) computes, to fp32 rounding."""
    gen = torch.Generator().manual_seed(7)
    gate, up, down = make_experts(6, 80, 112, gen, torch.float32)
    ids, w = make_routing(50, 6, 2, "uniform", gen)
    x = torch.randn(50, 80, generator=gen)
    layer = make_layer(gate, up, down, torch.float32)
    y, _ = layer.forward(x, ids, w)
    with ke.use_isa("scalar"):
        y_spec, _ = layer.forward(x, ids, w)
    assert rel_err(y, y_spec) < 1e-6


def test_empty_batch(isa):
    gen = torch.Generator().manual_seed(3)
    layer = make_layer(*make_experts(4, 32, 32, gen), torch.float32)
    ids = torch.zeros(0, 2, dtype=torch.int64)
    y, handle = layer.forward(torch.zeros(0, 32), ids, torch.zeros(0, 2), save_for_backward=True)
    dx, dw = layer.backward(handle, torch.zeros(0, 32))
    assert y.shape == (0, 32) and dx.shape == (0, 32) and dw.shape == (0, 2)


@pytest.mark.parametrize("threads", [1, 3])
def test_result_does_not_depend_on_thread_count(threads):
    """Reductions run in a fixed order, so any pool size gives bit-identical results."""
    gen = torch.Generator().manual_seed(11)
    gate, up, down = make_experts(8, 96, 64, gen, torch.bfloat16)
    ids, w = make_routing(200, 8, 3, "skewed", gen)
    x = torch.randn(200, 96, generator=gen).bfloat16()
    dy = torch.randn(200, 96, generator=gen).bfloat16()
    layer = make_layer(gate, up, down, torch.bfloat16)
    before = ke.num_threads()
    try:
        ke.set_num_threads(2)
        y2, h2 = layer.forward(x, ids, w, save_for_backward=True)
        dx2, dw2 = layer.backward(h2, dy)
        ke.set_num_threads(threads)
        y, h = layer.forward(x, ids, w, save_for_backward=True)
        dx, dw = layer.backward(h, dy)
    finally:
        ke.set_num_threads(before)
    assert torch.equal(y, y2) and torch.equal(dx, dx2) and torch.equal(dw, dw2)

"""The block-scaled expert formats fp8, int4 and int4-gemm (csrc/common.h, FP8 / INT4 / INT4 GEMMs; csrc/kernels/
moe_fp8.inc, moe_int4.inc, moe_int4_gemm.inc) beyond the engine tester's grid (test_engine_parity.py covers them,
default and quirky scale grids, on every path):

  * a checkpoint's own tensors kept as they are (`ExpertLayer.load_stored`): block-FP8 `weight` + `weight_scale_inv`
    and INT4 `weight_packed` + `weight_scale`, with blocks / groups that divide neither dimension: the layer computes
    bitwise what a bf16 layer holding bf16(kt_sft.checkpoint_formats.decode(...)) computes, on every path, and its
    panels unpack (GPU share) to those weights; int4-gemm keeps the same panels and computes its INT8-GEMM spec on
    the int8 weights it expands the checkpoint's to, bitwise those of an int8-gemm layer holding them (S = 1);
  * quantization while loading from fp32 / bf16 / fp16: e4m3 rounding (ties, subnormals) as torch's
    `.to(torch.float8_e4m3fn)`, int4 ties to even;
  * the scale grid a format carries (`with_scales`, `get_format(..., block=, group=)`), as the engine describes it
    (`MoELayer.layout()`), and its memory;
  * bad input: another format, a grid that is not the layer's, NaN codes, non-finite scales, bad block sizes.
"""
import math

import pytest
import torch

import kt_sft.engine as ke
from engine_cases import (TOLERANCE, Shape, assert_close, dequantized, make_case, make_layer, outputs_equal,
                          requantized, run_layer, w8a8_reference)
from kt_sft.checkpoint_formats import SourceFormat, decode
from kt_sft.engine.gpu_share import panels_to_matrix

SHAPE = Shape(4, 33, 19, 23, 2, "uniform", 3, 2)  # odd H and I: partial blocks and groups, and padding inside them


def fp8_checkpoint(n, k, block, gen):
    """An FP8 linear as a checkpoint stores it: every e4m3 code but NaN (0x7f, 0xff) cycled through the weight, and
    block-FP8's fp32 scale_inv [ceil(n / Bn), ceil(k / Bk)] or, block (1, 0), compressed-tensors' per-channel bf16
    weight_scale [n, 1] (each a power of two times 1..2)."""
    codes = (torch.arange(n * k) * 37 + torch.randint(0, 256, (1,), generator=gen)) % 254
    codes = torch.where(codes >= 0x7f, codes + 1, codes).to(torch.uint8).view(n, k).view(torch.float8_e4m3fn)
    grid = (math.ceil(n / (block[0] or n)), math.ceil(k / (block[1] or k)))
    scale = (1 + torch.rand(grid, generator=gen)) * 2.0 ** torch.randint(-12, -4, grid, generator=gen)
    if block == (1, 0):
        return {"w.weight": codes, "w.weight_scale": scale.bfloat16()}
    return {"w.weight": codes, "w.weight_scale_inv": scale}


def int4_checkpoint(n, k, group, gen):
    """An INT4 pack-quantized linear: random nibbles (the unused ones of the last word too: they must be ignored),
    bf16 weight_scale [n, ceil(k / G)], weight_shape."""
    words = torch.randint(-2 ** 31, 2 ** 31, (n, math.ceil(k / 8)), generator=gen, dtype=torch.int64)
    scale = ((1 + torch.rand(n, math.ceil(k / group), generator=gen)) * 2 ** -6).bfloat16()
    return {"w.weight_packed": words.to(torch.int32), "w.weight_scale": scale,
            "w.weight_shape": torch.tensor([n, k], dtype=torch.int32)}


def checkpoint_of(fmt):
    """(the source format whose tensors a layer of `fmt` keeps as they are, its code and scale keys, their maker for
    one [n, k] linear)."""
    if fmt.stored_dtype == torch.int32:  # int4, int4-gemm
        return (SourceFormat("int4-group", group=fmt.scale_block[1]), ("w.weight_packed", "w.weight_scale"),
                lambda n, k, gen: int4_checkpoint(n, k, fmt.scale_block[1], gen))
    if fmt.scale_block == (1, 0):
        return SourceFormat("fp8-channel"), ("w.weight", "w.weight_scale"), \
            lambda n, k, gen: fp8_checkpoint(n, k, (1, 0), gen)
    return (SourceFormat("fp8-block", block=fmt.scale_block), ("w.weight", "w.weight_scale_inv"),
            lambda n, k, gen: fp8_checkpoint(n, k, fmt.scale_block, gen))


STORED_FORMATS = [pytest.param(ke.get_format("fp8", block=(5, 7)), id="fp8-5x7"),
                  pytest.param(ke.get_format("fp8"), id="fp8-128x128"),
                  pytest.param(ke.get_format("fp8", block=(1, 0)), id="fp8-channel"),
                  pytest.param(ke.get_format("int4", group=5), id="int4-g5"),
                  pytest.param(ke.get_format("int4"), id="int4-g32")]


def stored_experts(fmt, E, H, I, gen):
    """{projection: (codes [E, N, K], scales [E, grid], decoded fp32 [E, N, K])} of E experts' checkpoint tensors."""
    source, (code_key, scale_key), make = checkpoint_of(fmt)
    out = {}
    for which, (n, k) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
        experts = [make(n, k, gen) for _ in range(E)]
        out[which] = tuple(torch.stack(t) for t in zip(*[
            (t[code_key], t[scale_key], decode(source, code_key, t.__getitem__)) for t in experts]))
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora"])
@pytest.mark.parametrize("fmt", STORED_FORMATS)
def test_stored_checkpoint_computes_like_bf16_of_its_decode(isa, fmt, lora):
    case = make_case(SHAPE, fmt, lora)
    E, H, I = SHAPE.E, SHAPE.H, SHAPE.I
    stored = stored_experts(fmt, E, H, I, torch.Generator().manual_seed(3))
    layer = ke.ExpertLayer(E, H, I, fmt)
    for which, (codes, scale, _) in stored.items():
        layer.load_stored(which, codes[:1], scale[:1])  # 3-D, then expert by expert as 2-D (the loader's way)
        for e in range(1, E):
            layer.load_stored(which, codes[e], scale[e], expert_begin=e)
    assert layer.missing_weights() == []
    twin = make_layer(stored["gate"][2], stored["up"][2], stored["down"][2], "bf16")
    assert outputs_equal(run_layer(layer, case), run_layer(twin, case))
    for proj, (_, _, decoded) in zip(layer.panels().projections, stored.values()):
        got = panels_to_matrix(proj.raw, E, proj.layout, fmt, proj.scales)
        assert torch.equal(got[:, :decoded.shape[1], :decoded.shape[2]], decoded.bfloat16())
        assert not got[:, decoded.shape[1]:].any() and not got[:, :, decoded.shape[2]:].any()  # zero padding


def test_stored_scales_of_any_float_dtype_and_strides():
    """bf16 / fp16 scales are kept exactly (as fp32); codes and scales may be strided views."""
    fmt = ke.get_format("int4", group=5)
    gen = torch.Generator().manual_seed(5)
    stored = stored_experts(fmt, 2, 40, 24, gen)
    ref = ke.ExpertLayer(2, 40, 24, fmt)
    layer = ke.ExpertLayer(2, 40, 24, fmt)
    for which, (codes, scale, _) in stored.items():
        ref.load_stored(which, codes, scale)
        wide = torch.zeros(codes.shape[0], codes.shape[1], 2 * codes.shape[2], dtype=codes.dtype)
        wide[:, :, ::2] = codes
        layer.load_stored(which, wide[:, :, ::2], scale.half().transpose(1, 2).contiguous().transpose(1, 2))
    for a, b in zip(ref.panels().projections, layer.panels().projections):  # fp16 of these bf16 scales: exact
        assert torch.equal(a.raw, b.raw) and torch.equal(a.scales, b.scales)


def int4_values(packed, scale, n, k, group):
    """(q [n, k] in [-8, 7], each weight's group scale [n, k]) of an INT4 checkpoint's tensors, fp32."""
    nibbles = (packed.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF
    q = nibbles.reshape(n, -1)[:, :k].float() - 8
    return q, scale.float().repeat_interleave(group, dim=1)[:, :k]


@pytest.mark.parametrize("lora", [False, True], ids=["frozen", "lora"])
@pytest.mark.parametrize("group", [5, 32])
def test_int4_gemm_keeps_the_checkpoint_and_computes_its_spec(isa, group, lora):
    fmt = ke.get_format("int4-gemm", group=group)
    case = make_case(SHAPE, fmt, lora)
    E, H, I = SHAPE.E, SHAPE.H, SHAPE.I
    stored = stored_experts(fmt, E, H, I, torch.Generator().manual_seed(17))
    layers = [ke.ExpertLayer(E, H, I, f) for f in (fmt, ke.get_format("int4", group=group))]
    for layer in layers:
        for which, (codes, scale, _) in stored.items():
            layer.load_stored(which, codes, scale)
    for a, b in zip(*(layer.panels().projections for layer in layers)):
        assert torch.equal(a.raw, b.raw) and torch.equal(a.scales, b.scales)  # int4 storage, as the checkpoint's
    shapes = {"gate": (I, H), "up": (I, H), "down": (H, I)}
    spec = w8a8_reference(case, lambda which, e: requantized(*int4_values(
        stored[which][0][e], stored[which][1][e], *shapes[which], group)))
    assert_close(run_layer(layers[0], case), spec, TOLERANCE["int4-gemm"], f"int4-gemm g{group} from a checkpoint")


def unit_channel_checkpoint(n, k, group, gen):
    """int4_checkpoint whose every row has S = 1 exactly: group 0's bf16 scale 127 / 8 (the row's largest; S = 8 m /
    127) and code 0 (value -8: w8 = -127) at its first weight; the other scales in (0, 127 / 8], ties of q * s
    among them."""
    t = int4_checkpoint(n, k, group, gen)
    scale = (torch.randint(1, 128, t["w.weight_scale"].shape, generator=gen).float() / 8).bfloat16()  # k / 8: ties
    scale[:, 0] = 127 / 8
    t["w.weight_scale"] = scale
    t["w.weight_packed"][:, 0] &= ~0xF
    return t


@pytest.mark.parametrize("group", [5, 32, 48])
def test_int4_gemm_is_bitwise_int8_gemm_of_its_int8_weights(isa, group):
    """The expansion is exact on every path (tables, lookups, the transposed ones, straddled groups): with channel
    scales S = 1 an int4-gemm layer computes bitwise what an int8-gemm layer holding w8 = clamp(round_half_even(q *
    s), +-127) computes (its per-channel quantizer keeps integers of row maximum 127 as they are, scale 1)."""
    E, H, I = 3, 100, 72
    fmt = ke.get_format("int4-gemm", group=group)
    case = make_case(Shape(E, H, I, 29, 2, "uniform", 0, 0), fmt, False)
    gen = torch.Generator().manual_seed(23)
    layer, w8 = ke.ExpertLayer(E, H, I, fmt), {}
    for which, (n, k) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
        experts = [unit_channel_checkpoint(n, k, group, gen) for _ in range(E)]
        codes, scales = (torch.stack([t[key] for t in experts]) for key in ("w.weight_packed", "w.weight_scale"))
        layer.load_stored(which, codes, scales)
        w8[which] = [requantized(*int4_values(c, s, n, k, group)) for c, s in zip(codes, scales)]
        assert all(torch.equal(S, torch.ones(n, dtype=S.dtype)) for _, S in w8[which])
    twin = make_layer(*(torch.stack([w for w, _ in w8[which]]).float() for which in ("gate", "up", "down")),
                      "int8-gemm")
    assert outputs_equal(run_layer(layer, case), run_layer(twin, case))


# ------------------------------------------------------------------ quantization while loading

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", STORED_FORMATS)
def test_quantizes_float_sources_like_the_reference(fmt, dtype):
    """From a float source the panels hold exactly engine_cases.dequantized (the plain-torch quantizer)."""
    E, H, I = 3, 45, 29
    gen = torch.Generator().manual_seed(7)
    weights = [torch.randn(E, n, k, generator=gen).to(dtype) for n, k in ((I, H), (I, H), (H, I))]
    weights[0][1, :, 3:12] = 0  # all-zero groups and blocks: scale 0
    layer = make_layer(*weights, fmt)
    for proj, w in zip(layer.panels().projections, weights):
        got = panels_to_matrix(proj.raw, E, proj.layout, fmt, proj.scales)[:, :w.shape[1], :w.shape[2]]
        assert torch.equal(got, dequantized(w.float(), fmt))


def test_fp8_rounds_like_torch():
    """Ties to even (normal and subnormal steps), values below half the smallest subnormal, the largest code: one block
    of amax 448 has scale 1, so its codes are torch's .to(float8_e4m3fn) of the weights themselves."""
    sub = 2.0 ** -9
    values = [448.0, -448.0, 1.0625, 1.1875, -1.0625, 0.5 * sub, 0.51 * sub, 1.5 * sub, 2.5 * sub, 7.5 * sub,
              0.015624, 15.5 * 2 ** -7, 240.0, 232.0, 447.0, 3e-5]
    w = torch.tensor(values).repeat(32, 2)[:, :32].contiguous()
    layer = make_layer(w[None], w[None], w[None], ke.get_format("fp8", block=(32, 32)))
    proj = layer.panels().projections[0]
    assert proj.scales.flatten().tolist() == [1.0]
    got = panels_to_matrix(proj.raw, 1, proj.layout, layer.format, proj.scales)[0].float()
    assert torch.equal(got, w.to(torch.float8_e4m3fn).float().bfloat16().float())


def test_int4_rounds_half_to_even():
    w = torch.tensor([7.0, 0.5, 1.5, 2.5, -2.5, -0.5, 6.5, -7.0] * 4).repeat(32, 1)  # amax 7: scale 1
    layer = make_layer(w[None], w[None], w[None], ke.get_format("int4", group=8))
    proj = layer.panels().projections[0]
    got = panels_to_matrix(proj.raw, 1, proj.layout, layer.format, proj.scales)[0, 0, :8].float()
    assert got.tolist() == [7.0, 0.0, 2.0, 2.0, -2.0, -0.0, 6.0, -7.0]


# ------------------------------------------------------------------ the scale grid of a format

def test_format_carries_its_scale_grid():
    fp8 = ke.get_format("FP8", block=(5, 7))
    assert fp8 == ke.FORMATS["fp8"].with_scales(block=(5, 7)) and fp8.scale_block == (5, 7)
    assert fp8.label == "fp8 (5x7 blocks)" and fp8.name == "fp8"
    assert ke.get_format("int4", group=5).scale_block == (1, 5)
    assert ke.get_format("fp8", block=(1, 0)).label == "fp8 (per channel)"
    assert ke.get_format("int4", group=32) is ke.FORMATS["int4"]
    layout = ke.ExpertLayer(2, 33, 19, fp8)._layer.layout()
    assert layout["gate"]["scale_block"] == (5, 7) and layout["gate"]["scale_grid"] == (7, 10)  # Ip 32, Hp 64
    assert layout["down"]["scale_grid"] == (13, 5) and layout["down"]["scales"] == "block"
    assert layout["gate"]["elem_bits"] == 8
    assert ke.ExpertLayer(1, 32, 32, "int4")._layer.layout()["up"]["elem_bits"] == 4
    assert ke.ExpertLayer(1, 32, 32, "int8")._layer.layout()["up"]["scale_block"] == (1, 32)
    per_channel = ke.ExpertLayer(1, 33, 19, ke.get_format("fp8", block=(1, 0)))._layer.layout()
    assert per_channel["gate"]["scale_block"] == (1, 64) and per_channel["down"]["scale_grid"] == (64, 1)


@pytest.mark.parametrize("fmt", [ke.get_format("fp8", block=(5, 7)), ke.get_format("int4", group=5),
                                 ke.get_format("fp8", block=(1000, 3)), ke.get_format("int4", block=(3, 2 ** 31 - 1)),
                                 ke.get_format("fp8", block=(1, 0)), ke.get_format("int4", block=(0, 0)),
                                 ke.get_format("int4-gemm", group=5), ke.get_format("int4-gemm", block=(2, 9))])
@pytest.mark.parametrize("shape", [(3, 37, 13), (1, 33, 65)])
def test_packed_bytes_of_any_grid_is_the_engines(fmt, shape):
    assert fmt.packed_bytes(*shape) == ke.ExpertLayer(*shape, fmt).packed_bytes


def test_memory_against_bf16():
    """fp8: a byte per weight and an fp32 scale per 128 x 128 block; int4: half a byte and an fp32 scale per 32;
    int4-gemm: int4's, and one fp32 scale per output channel."""
    bf16 = ke.FORMATS["bf16"].packed_bytes(8, 7168, 2048)
    assert ke.FORMATS["fp8"].packed_bytes(8, 7168, 2048) / bf16 == (8 + 32 / 128 ** 2) / 16
    assert ke.FORMATS["int4"].packed_bytes(8, 7168, 2048) / bf16 == (4 + 32 / 32) / 16
    extra = ke.FORMATS["int4-gemm"].packed_bytes(8, 7168, 2048) - ke.FORMATS["int4"].packed_bytes(8, 7168, 2048)
    assert extra == 8 * 4 * (2 * 2048 + 7168)  # int4-gemm: an fp32 channel scale per output row besides


# ------------------------------------------------------------------ bad input

def test_with_scales_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="expert format int8 has no scale grid to choose"):
        ke.get_format("int8", block=(5, 7))
    with pytest.raises(ValueError, match=r"fp8: scale block sizes must be two integers >= 0 .*, got \(-1, 7\)"):
        ke.get_format("fp8", block=(-1, 7))
    with pytest.raises(ValueError, match="give block=.* or group="):
        ke.FORMATS["int4"].with_scales(block=(1, 5), group=5)


def test_load_stored_refuses_other_formats_and_other_grids():
    gen = torch.Generator().manual_seed(11)
    t = fp8_checkpoint(19, 33, (5, 7), gen)
    with pytest.raises(ValueError, match="expert format bf16 keeps no checkpoint tensors as they are .*fp8, int4"):
        ke.ExpertLayer(1, 33, 19, "bf16").load_stored("gate", t["w.weight"], t["w.weight_scale_inv"])
    with pytest.raises(ValueError, match=r"gate scale: expected \[1, 1, 1\] \(fp8: blocks of 128x128 over 19x33 "
                                         r"weights, 0 = all\), got \[1, 4, 5\]: the checkpoint's grid differs from the "
                                         r"layer's; build the layer with get_format\('fp8', block="):
        ke.ExpertLayer(1, 33, 19, "fp8").load_stored("gate", t["w.weight"], t["w.weight_scale_inv"])
    with pytest.raises(TypeError, match="gate codes: expected dtype int32, got float8_e4m3fn"):
        ke.ExpertLayer(1, 33, 19, "int4").load_stored("gate", t["w.weight"], t["w.weight_scale_inv"])
    with pytest.raises(ValueError, match=r"up codes: expected shape \[\*, 19, 5\], got \[1, 19, 33\]"):
        ke.ExpertLayer(1, 33, 19, "int4").load_stored("up", t["w.weight"].view(torch.uint8).int(), torch.ones(19, 2))


def test_nan_codes_and_non_finite_scales_name_the_expert():
    fmt = ke.get_format("fp8", block=(5, 7))
    t = fp8_checkpoint(19, 33, (5, 7), torch.Generator().manual_seed(13))
    codes = t["w.weight"].view(torch.uint8).clone()[None].repeat(3, 1, 1)
    codes[2, 4, 9] = 0xFF  # e4m3 NaN
    layer = ke.ExpertLayer(3, 33, 19, fmt)
    scale = t["w.weight_scale_inv"][None].repeat(3, 1, 1)
    with pytest.raises(ValueError, match="gate weights of expert 2"):
        layer.load_stored("gate", codes.view(torch.float8_e4m3fn), scale)
    scale[1, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="up weights of expert 1"):
        layer.load_stored("up", codes[:2].view(torch.float8_e4m3fn), scale[:2])
    assert set(layer.missing_weights()) >= {"expert 2 gate", "expert 1 up"}

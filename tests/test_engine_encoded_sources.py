"""Encoded checkpoint tensors handed to the engine, which decodes them itself (`ExpertLayer.set_projection(which,
codes, scale=..., block=...)`, csrc/packing.cpp), for every source x every expert format:

  * sources: fp32 and bf16 / fp16 rows; block-FP8 codes on 5 x 7 blocks (dividing neither dimension) and on 128 x 128
    (one partial block), FP8 per channel, INT4 pack-quantized words in groups of 7 (K divides neither into groups
    nor into whole words), contiguous and strided, scales fp32 / bf16 / fp16;
  * the previous path is the reference: decode in plain torch (torch's e4m3 conversion / the nibbles by shifts,
    times each block's scale, fl32), then set_projection of those fp32 weights: the packed panels and scales (and
    the layer's outputs) are bit-equal; a format that stores the source's element type on its grid keeps the codes
    and scales exactly instead (its panels unpack to bf16 of the decoded weights);
  * a scale grid too tall for one decode band (computed in a pass of its own) and bad input.
"""
import math

import pytest
import torch

import kt_sft.engine as ke
from engine_cases import Shape, dequantized, make_case, make_layer, outputs_equal, run_layer
from kt_sft.engine.gpu_share import panels_to_matrix

E, H, I = 2, 45, 27  # gate/up [27, 45], down [45, 27]: no block, group or int4 word divides them
SHAPES = {"gate": (I, H), "up": (I, H), "down": (H, I)}
CASE = Shape(E, H, I, 9, 2, "uniform", 0, 0)


def fp8_source(n, k, block, gen, scale_dtype=torch.float32):
    """Codes cycling through every e4m3 byte but the NaNs (0x7f, 0xff), scales [ceil(n/Bn), ceil(k/Bk)] of both signs
    of exponent (block (1, 0): per channel, [n, 1])."""
    codes = (torch.arange(n * k) * 37 + torch.randint(0, 256, (1,), generator=gen)) % 254
    codes = torch.where(codes >= 0x7f, codes + 1, codes).to(torch.uint8).view(n, k).view(torch.float8_e4m3fn)
    grid = (math.ceil(n / (block[0] or n)), math.ceil(k / (block[1] or k)))
    scale = (1 + torch.rand(grid, generator=gen)) * 2.0 ** torch.randint(-12, 3, grid, generator=gen)
    return codes, scale.to(scale_dtype)


def int4_source(n, k, group, gen, scale_dtype=torch.bfloat16):
    """Random int32 words (the nibbles past k too: ignored) and scales [n, ceil(k/G)]."""
    words = torch.randint(-2 ** 31, 2 ** 31, (n, math.ceil(k / 8)), generator=gen, dtype=torch.int64).to(torch.int32)
    scale = (1 + torch.rand(n, math.ceil(k / group), generator=gen)) * 2.0 ** -6
    return words, scale.to(scale_dtype)


def block_scales(scale, block, n, k):
    """Each weight's scale [.., n, k] from a grid of block (Bn, Bk) (0: the whole dimension), fp32."""
    bn, bk = block[0] or n, block[1] or k
    return scale.float().repeat_interleave(bn, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :k]


def plain_decode(codes, scale, block, k):
    """W = fl32(value * scale) in plain torch: e4m3 by torch's conversion, int4 nibbles (stored q + 8) by shifts."""
    if codes.dtype == torch.int32:
        nibbles = (codes.unsqueeze(-1) >> torch.arange(0, 32, 4, dtype=torch.int32)) & 0xF
        values = nibbles.flatten(-2)[..., :k].float() - 8
    else:
        values = codes.float()
    return values * block_scales(scale, block, codes.shape[-2], k)


def make_source(kind, gen):
    """{projection: (what set_projection gets: weight, scale, block), the fp32 weights it means [E, n, k]}."""
    out = {}
    for which, (n, k) in SHAPES.items():
        if kind in ("fp32", "bf16", "fp16"):
            w = torch.randn(E, n, k, generator=gen) * 2.0 ** torch.randint(-8, 4, (E, n, 1), generator=gen)
            w[0, 2] = 0.0  # an all-zero row
            w = w.to(getattr(torch, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[kind]))
            out[which] = (w, None, None), w.float()
            continue
        name, size = kind.split("-", 1)
        if name == "int4":
            block = (1, int(size[1:]))
            codes, scale = zip(*(int4_source(n, k, block[1], gen) for _ in range(E)))
        else:
            block = (1, 0) if size == "channel" else tuple(int(b) for b in size.split("x"))
            codes, scale = zip(*(fp8_source(n, k, block, gen, torch.bfloat16 if size == "channel" else
                                            torch.float32) for _ in range(E)))
        codes, scale = torch.stack(codes), torch.stack(scale)
        out[which] = (codes, scale, block), plain_decode(codes, scale, block, k)
    return out


SOURCES = ["fp32", "bf16", "fp16", "fp8-5x7", "fp8-128x128", "fp8-channel", "int4-g7"]


def keeps(fmt, kind) -> bool:
    """Whether `fmt` keeps a `kind` source's codes (it stores their element type)."""
    return (fmt.stored_dtype == torch.float8_e4m3fn and kind.startswith("fp8")) or \
        (fmt.stored_dtype == torch.int32 and kind.startswith("int4"))


def layer_format(name, kind, block):
    """The format as the loader fits it: one that keeps the source's codes takes the source's grid."""
    fmt = ke.get_format(name)
    return fmt.with_scales(block=block) if keeps(fmt, kind) else fmt


def packed(layer):
    return [(p.raw.clone(), None if p.scales is None else p.scales.clone()) for p in layer.panels().projections]


def same_packing(a, b) -> bool:
    return all(torch.equal(ra, rb) and (sa is None) == (sb is None) and (sa is None or torch.equal(
        sa.view(torch.int32), sb.view(torch.int32))) for (ra, sa), (rb, sb) in zip(a, b))


@pytest.mark.parametrize("fmt_name", list(ke.FORMATS))
@pytest.mark.parametrize("kind", SOURCES)
def test_engine_decode_packs_like_plain_torch_decode(isa, kind, fmt_name):
    source = make_source(kind, torch.Generator().manual_seed(len(kind) * 31 + len(fmt_name)))
    fmt = layer_format(fmt_name, kind, source["gate"][0][2])
    layer = ke.ExpertLayer(E, H, I, fmt)
    for which, ((weight, scale, block), _) in source.items():
        layer.set_projection(which, weight[:1], scale=None if scale is None else scale[:1], block=block)
        layer.set_projection(which, weight[1], 1, scale=None if scale is None else scale[1], block=block)
    assert layer.missing_weights() == []
    decoded = {which: w for which, (_, w) in source.items()}
    if keeps(fmt, kind):  # the checkpoint's codes and scales as they are
        for proj, w in zip(layer.panels().projections, decoded.values()):
            got = panels_to_matrix(proj.raw, E, proj.layout, fmt, proj.scales)
            assert torch.equal(got[:, :w.shape[1], :w.shape[2]], w.bfloat16())
        return
    reference = make_layer(decoded["gate"], decoded["up"], decoded["down"], fmt)
    assert same_packing(packed(layer), packed(reference))
    case = make_case(CASE, fmt, lora=False)
    assert outputs_equal(run_layer(layer, case), run_layer(reference, case))


def test_strided_codes_and_scales_of_other_dtypes():
    """Codes and scales may be strided views; fp16 scales decode as fp32 of them."""
    gen = torch.Generator().manual_seed(5)
    for fmt in ("int8-gemm", ke.get_format("int4", group=7), "bf16"):
        fmt = ke.get_format(fmt)
        for kind, block, make in (("fp8", (5, 7), lambda n, k: fp8_source(n, k, (5, 7), gen, torch.float16)),
                                  ("int4", (1, 7), lambda n, k: int4_source(n, k, 7, gen, torch.float16))):
            layer, reference = ke.ExpertLayer(E, H, I, fmt), ke.ExpertLayer(E, H, I, fmt)
            for which, (n, k) in SHAPES.items():
                codes, scale = (torch.stack(t) for t in zip(*(make(n, k) for _ in range(E))))
                wide = torch.zeros(E, n, 2 * codes.shape[2], dtype=codes.dtype)
                wide[:, :, ::2] = codes
                strided_scale = scale.transpose(1, 2).contiguous().transpose(1, 2)
                layer.set_projection(which, wide[:, :, ::2], scale=strided_scale, block=block)
                reference.set_projection(which, plain_decode(codes, scale, block, k))
            if fmt.stored_dtype == torch.int32 and kind == "int4":
                continue  # kept as they are: test_engine_fp8_int4.py
            assert same_packing(packed(layer), packed(reference)), (fmt, kind)


@pytest.mark.parametrize("kind", ["fp32", "int4-g7"])
def test_grid_too_tall_for_a_band_is_computed_in_its_own_pass(kind):
    """fp8 with one scale per matrix over 1408 x 1536 weights: a grid row of 8.6 MB of fp32 rows, above the band
    limit, so packing computes the grid first; the panels hold engine_cases.dequantized of the weights."""
    fmt = ke.get_format("fp8", block=(0, 0))
    gen = torch.Generator().manual_seed(9)
    n, k = 1408, 1536
    layer = ke.ExpertLayer(1, k, n, fmt)
    if kind == "fp32":
        w = torch.randn(1, n, k, generator=gen)
        layer.set_projection("gate", w)
    else:
        codes, scale = int4_source(n, k, 7, gen)
        w = plain_decode(codes, scale, (1, 7), k)[None]
        layer.set_projection("gate", codes, scale=scale, block=(1, 7))
    proj = layer.panels().projections[0]
    got = panels_to_matrix(proj.raw, 1, proj.layout, fmt, proj.scales)[:, :n, :k]
    assert torch.equal(got, dequantized(w, fmt))


def test_bad_encoded_input_is_refused_naming_it():
    gen = torch.Generator().manual_seed(13)
    codes, scale = fp8_source(I, H, (5, 7), gen)
    layer = ke.ExpertLayer(1, H, I, "fp8")  # 128 x 128 blocks: the 5 x 7 codes cannot be kept
    with pytest.raises(ValueError, match=r"gate: codes in blocks of 5x7 can be kept only on the layer's own grid "
                                         r"\(fp8: blocks of 27x45 here\).*get_format\('fp8', block="):
        layer.set_projection("gate", codes, scale=scale, block=(5, 7))
    with pytest.raises(ValueError, match=r"up scale: expected \[1, 6, 5\] \(blocks of 5x9 over 27x45 weights"):
        ke.ExpertLayer(1, H, I, "bf16").set_projection("up", codes, scale=scale, block=(5, 9))
    with pytest.raises(ValueError, match=r"block=\(rows, columns\) of weights per scale is needed"):
        ke.ExpertLayer(1, H, I, "int8").set_projection("up", codes, scale=scale)
    with pytest.raises(ValueError, match=r"block=\(5, -7\): expected \(rows, columns\)"):
        ke.ExpertLayer(1, H, I, "int8").set_projection("up", codes, scale=scale, block=(5, -7))
    with pytest.raises(TypeError, match="up codes: expected dtype float8_e4m3fn or int32, got uint8"):
        ke.ExpertLayer(1, H, I, "int8").set_projection("up", codes.view(torch.uint8), scale=scale, block=(5, 7))
    nan_codes = codes.view(torch.uint8).clone()
    nan_codes[3, 4] = 0x7F
    with pytest.raises(ValueError, match="non-finite value .* in the gate weights of expert 0"):
        ke.ExpertLayer(1, H, I, "int8").set_projection("gate", nan_codes.view(torch.float8_e4m3fn), scale=scale,
                                                       block=(5, 7))
    words, groups = int4_source(I, H, 7, gen)
    groups[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite value .* in the up weights of expert 0"):
        ke.ExpertLayer(1, H, I, "bf16").set_projection("up", words, scale=groups, block=(1, 7))

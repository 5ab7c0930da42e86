"""Checkpoint formats (kt_sft/checkpoint_formats.py): config detection, and decoders bit-equal to the plain element
loops below, with block and group sizes that do not divide the dimensions."""
import math

import pytest
import torch

from kt_sft.checkpoint_formats import (CheckpointFormatError, SourceFormat, check_stored, decode, is_companion,
                                       source_format)

FP8_BLOCK = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [5, 7]}


def _ct(fmt, **weights):
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head", "re:.*self_attn.*"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


FP8_CHANNEL = _ct("float-quantized", num_bits=8, type="float", strategy="channel", symmetric=True)
INT4 = _ct("pack-quantized", num_bits=4, type="int", strategy="group", group_size=5, symmetric=True)


# ------------------------------------------------------------------ references: one element at a time

def ref_fp8_block(w, s, bn, bk):
    out = torch.empty(w.shape)
    for n in range(w.shape[0]):
        for k in range(w.shape[1]):
            out[n, k] = torch.tensor(float(w[n, k].float())) * s[n // bn, k // bk]
    return out


def ref_int4(packed, scale, n, k, group):
    out = torch.empty(n, k)
    for r in range(n):
        for c in range(k):
            word = int(packed[r, c // 8]) & 0xFFFFFFFF
            q = ((word >> (4 * (c % 8))) & 0xF) - 8
            out[r, c] = torch.tensor(float(q)) * scale[r, c // group].float()
    return out


def pack_int4(q):
    """q [n, k] in [-8, 7] -> int32 [n, ceil(k/8)], nibble i at bits 4i, stored q + 8."""
    n, k = q.shape
    padded = torch.zeros(n, math.ceil(k / 8) * 8, dtype=torch.int64)
    padded[:, :k] = q + 8
    words = (padded.view(n, -1, 8) << torch.arange(0, 32, 4)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _getter(tensors):
    return lambda key: tensors[key]


# ------------------------------------------------------------------ detection

def test_source_formats_from_config():
    assert source_format(None) == SourceFormat("bf16")
    assert source_format(FP8_BLOCK) == SourceFormat("fp8-block", block=(5, 7))
    assert source_format(FP8_CHANNEL) == SourceFormat("fp8-channel")
    assert source_format(INT4) == SourceFormat("int4-group", group=5)
    assert source_format(INT4).weight_bytes == 0.5 + 2 / 5
    assert [source_format(q).element_bytes for q in (None, FP8_BLOCK, FP8_CHANNEL, INT4)] == [2, 1, 1, 0.5]
    assert source_format({"quant_method": "mxfp4"}) == SourceFormat("mxfp4", group=32)
    assert [source_format(q).holding_bytes for q in (None, FP8_BLOCK, INT4, {"quant_method": "mxfp4"})] == [2, 1, .5, 2]
    assert [str(source_format(q)) for q in (FP8_BLOCK, INT4)] == ["fp8-block (5x7 blocks)", "int4-group (groups of 5)"]


@pytest.mark.parametrize("quant, match", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "quant_method=bitsandbytes is not a format kt-sft reads"),
    ({"quant_method": "awq", "bits": 4}, "quant_method=awq"),
    ({"quant_method": "gptq", "bits": 4}, "quant_method=gptq"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "only e4m3"),
    ({"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": None}, "weight_block_size=None"),
    (_ct("pack-quantized", num_bits=4, type="int", strategy="group", group_size=32, symmetric=False), "symmetric"),
    (_ct("int-quantized", num_bits=8, type="int", strategy="channel"), "format='int-quantized'"),
])
def test_unsupported_quantization_is_named(quant, match):
    with pytest.raises(CheckpointFormatError, match=match):
        source_format(quant, "model/config.json")


# ------------------------------------------------------------------ decoding

def test_fp8_block_decodes_with_partial_edge_blocks():
    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(13, 23, generator=gen) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(3, 4, generator=gen) + 0.01  # ceil(13/5) x ceil(23/7)
    got = decode(source_format(FP8_BLOCK), "m.experts.0.up_proj.weight",
                 _getter({"m.experts.0.up_proj.weight": w, "m.experts.0.up_proj.weight_scale_inv": s}))
    assert torch.equal(got, ref_fp8_block(w, s, 5, 7))


def test_fp8_channel_decodes():
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(9, 11, generator=gen) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(9, 1, generator=gen).bfloat16()
    got = decode(source_format(FP8_CHANNEL), "a.weight", _getter({"a.weight": w, "a.weight_scale": s}))
    assert torch.equal(got, ref_fp8_block(w, s.float(), 1, 11))


def test_int4_groups_decode_with_a_partial_last_word_and_group():
    gen = torch.Generator().manual_seed(2)
    n, k, group = 6, 23, 5
    q = torch.randint(-8, 8, (n, k), generator=gen)
    scale = (torch.rand(n, math.ceil(k / group), generator=gen) + 0.1).bfloat16()
    packed = pack_int4(q)
    tensors = {"e.weight_packed": packed, "e.weight_scale": scale, "e.weight_shape": torch.tensor([n, k])}
    got = decode(source_format(INT4), "e.weight_packed", _getter(tensors))
    assert torch.equal(got, ref_int4(packed, scale, n, k, group))
    assert torch.equal(got, q.float() * scale.float().repeat_interleave(group, 1)[:, :k])


def test_unquantized_tensors_pass_through():
    router = torch.randn(4, 8).bfloat16()
    assert torch.equal(decode(source_format(FP8_BLOCK), "mlp.gate.weight", _getter({"mlp.gate.weight": router})),
                       router.float())


@pytest.mark.parametrize("case, match", [
    ("scale_shape", r"up.weight_scale_inv: expected float32 or bfloat16 \[3, 4\], got float32 \[3, 3\]"),
    ("shape_disagrees", r"e.weight_packed: expected int32 \[6, 4\], got int32 \[6, 3\]"),
    ("int4_scale_shape", r"e.weight_scale: expected float32 or bfloat16 or float16 \[6, 5\], got bfloat16 \[6, 4\]"),
    ("packed_in_fp8", "a packed INT4 weight in a fp8-block checkpoint"),
])
def test_bad_tensors_are_named(case, match):
    fp8 = {"up.weight": torch.zeros(13, 23).to(torch.float8_e4m3fn), "up.weight_scale_inv": torch.ones(3, 3)}
    int4 = {"e.weight_packed": torch.zeros(6, 3, dtype=torch.int32), "e.weight_scale": torch.ones(6, 5).bfloat16(),
            "e.weight_shape": torch.tensor([6, 23])}
    fmt, key, tensors = {
        "scale_shape": (source_format(FP8_BLOCK), "up.weight", fp8),
        "shape_disagrees": (source_format(INT4), "e.weight_packed", {**int4, "e.weight_shape": torch.tensor([6, 30])}),
        "int4_scale_shape": (source_format(INT4), "e.weight_packed",
                             {**int4, "e.weight_scale": torch.ones(6, 4).bfloat16()}),
        "packed_in_fp8": (source_format(FP8_BLOCK), "e.weight_packed", int4),
    }[case]
    with pytest.raises(CheckpointFormatError, match=match):
        decode(fmt, key, _getter(tensors))


def test_companions_are_recognised():
    assert all(is_companion(f"x.{s}") for s in ("weight_scale_inv", "weight_scale", "weight_shape", "input_scale"))
    assert not is_companion("x.weight") and not is_companion("x.weight_packed")


@pytest.mark.parametrize("dtype, shape, match", [
    (torch.float8_e5m2, (13, 23), "a float8_e5m2 weight; kt-sft reads e4m3 FP8 only"),
    (torch.float8_e4m3fn, (2, 13, 23), "a 3-D FP8 tensor"),
])
def test_fp8_tensors_kt_sft_cannot_read_are_named(dtype, shape, match):
    w = torch.zeros(shape).to(dtype)
    with pytest.raises(CheckpointFormatError, match=match):
        decode(source_format(FP8_BLOCK), "m.up.weight",
               _getter({"m.up.weight": w, "m.up.weight_scale_inv": torch.ones(3, 4)}))


# ------------------------------------------------------------------ the header check before loading

def _headers(tensors):
    return {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}


def _int4_tensors(**replace):
    tensors = {"e.weight_packed": torch.zeros(6, 3, dtype=torch.int32), "e.weight_scale": torch.ones(6, 5).bfloat16(),
               "e.weight_shape": torch.tensor([6, 23]), "router.weight": torch.zeros(4, 6)}
    tensors.update(replace)
    return {k: v for k, v in tensors.items() if v is not None}


@pytest.mark.parametrize("case, match", [
    ("ok", None),
    ("scale_missing", r"up.weight_scale_inv is missing: the fp8-block weight up.weight \(shard-1\) is stored with it"),
    ("scale_shape", r"up.weight_scale_inv: expected float32 or bfloat16 \[3, 4\], got float32 \[3, 3\] \(shard-1"),
    ("int4_shape_disagrees", r"e.weight_packed: expected int32 \[6, 4\], got int32 \[6, 3\] \(shard-1"),
    ("int4_scale_missing", r"e.weight_scale is missing: the int4-group weight e.weight_packed"),
    ("int4_weight_shape_missing", "e.weight_shape"),
])
def test_headers_are_checked_before_reading(case, match):
    """check_stored finds a missing or misshapen companion from the headers alone (INT4's weight_shape is read)."""
    fp8 = {"up.weight": torch.zeros(13, 23).to(torch.float8_e4m3fn), "up.weight_scale_inv": torch.ones(3, 4),
           "norm.weight": torch.ones(23)}
    if case.startswith("int4"):
        fmt = source_format(INT4)
        tensors = _int4_tensors(**{"int4_shape_disagrees": {"e.weight_shape": torch.tensor([6, 30])},
                                   "int4_scale_missing": {"e.weight_scale": None},
                                   "int4_weight_shape_missing": {"e.weight_shape": None}}[case])
    else:
        fmt = source_format(FP8_BLOCK)
        tensors = {**fp8, **{"ok": {}, "scale_missing": {"up.weight_scale_inv": None},
                             "scale_shape": {"up.weight_scale_inv": torch.ones(3, 3)}}[case]}
        tensors = {k: v for k, v in tensors.items() if v is not None}

    def read(key):
        if key not in tensors:
            raise CheckpointFormatError(f"{key} is missing")
        return tensors[key]

    run = lambda: check_stored(fmt, _headers(tensors), read, where=lambda key: "shard-1")  # noqa: E731
    if match is None:
        assert run() == 1
    else:
        with pytest.raises(CheckpointFormatError, match=match):
            run()


# ------------------------------------------------------------------ decoding: every code, step boundaries, buffers

def _bits_equal(got, ref):
    """Bit for bit (-0.0 apart from 0.0), NaN where the reference has NaN."""
    nan = ref.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan].view(torch.int32), ref[~nan].view(torch.int32))


@pytest.mark.parametrize("scale_exp", [-20, 0, 125])  # 125: 256 s overflows fp32, decoded without that shortcut
def test_fp8_block_decodes_every_code(scale_exp):
    """All 256 e4m3 bytes (subnormals, -0, the NaN codes 0x7f / 0xff) in 3 x 4 blocks of partial edges."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).view(16, 16)
    s = (torch.rand(6, 4, generator=torch.Generator().manual_seed(3)) + 0.5) * 2.0 ** scale_exp
    got = decode(source_format({**FP8_BLOCK, "weight_block_size": [3, 5]}), "w.weight",
                 _getter({"w.weight": codes, "w.weight_scale_inv": s}))
    assert _bits_equal(got, ref_fp8_block(codes, s, 3, 5))


def test_decoding_in_steps_and_into_a_buffer_gives_the_same_bits(monkeypatch):
    """Steps of a few rows (block rows of fp8, rows of int4 and FP8 per channel), into a larger reused buffer."""
    import kt_sft.checkpoint_formats as formats

    monkeypatch.setattr(formats, "_STEP_ELEMENTS_PER_THREAD", 40)
    gen = torch.Generator().manual_seed(4)
    n, k = 17, 29
    fp8 = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen).view(torch.float8_e4m3fn)
    q = torch.randint(-8, 8, (n, k), generator=gen)
    cases = [
        (FP8_BLOCK, "w.weight", {"w.weight": fp8, "w.weight_scale_inv": torch.rand(4, 5, generator=gen)},
         lambda t: ref_fp8_block(fp8, t["w.weight_scale_inv"], 5, 7)),
        (FP8_CHANNEL, "w.weight", {"w.weight": fp8, "w.weight_scale": torch.rand(n, 1, generator=gen).half()},
         lambda t: ref_fp8_block(fp8, t["w.weight_scale"].float(), 1, k)),
        (INT4, "w.weight_packed", {"w.weight_packed": pack_int4(q), "w.weight_shape": torch.tensor([n, k]),
                                   "w.weight_scale": torch.rand(n, 6, generator=gen).bfloat16()},
         lambda t: ref_int4(t["w.weight_packed"], t["w.weight_scale"], n, k, 5)),
    ]
    buffer = torch.full((n * k + 3,), 7.0)
    for quant, key, tensors, ref in cases:
        got = decode(source_format(quant), key, _getter(tensors), out=buffer)
        assert got.shape == (n, k) and got.data_ptr() == buffer.data_ptr() and _bits_equal(got, ref(tensors))

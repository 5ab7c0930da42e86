"""INT8 GEMMs (`ExpertLayer(weights="int8", int8_compute=True)`, kt_backend: AMXINT8) on every ISA path.

The spec (csrc/common.h, INT8 GEMMs): the weights are the int8 layer's (per output channel q_w, s_w); each GEMM's A
rows are quantized per row, v = a * cs (cs = the weight scales of the reduction dimension in backward, 1 in
forward), s = max |v| / 127, q = round_half_even(v / s) clamped to +-127, and C = float(sum q_a q_w) * s (* s_w in
forward). `w8a8_reference` below is that spec in plain torch (fp64 integer sums, fp32 scaling, bf16 where the
engine stores bf16), so the engine must match it to rounding noise on every path; the W8A16 layer (the same int8
weights, bf16 GEMMs) must be far from it, or the test could not tell the two apart.
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

import kt_sft.engine as ke
from moe_reference import make_experts, make_routing, reference_grads, rel_err
from test_engine_int8 import SHAPES, _run, lora_case
from test_engine_parity import make_layer


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (last dim): (q as fp64 integers, s [.., 1] fp32); s = 0 gives q = 0."""
    w = w.float()
    s = w.abs().amax(-1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0).clamp(-127, 127)
    return q.double(), s


def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM inputs' per-row int8 (common.h, INT8 GEMMs): q = round(a * (127 / max|a|)) in fp32, s = max|a| / 127."""
    a = a.float()
    amax = a.abs().amax(-1, keepdim=True)
    s = amax / 127
    # a tensor divided by a tensor: `127 / t` is t.reciprocal() * 127 in torch, one rounding more than 127.0f / m
    inv = torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, 1.0)
    # m < 127 / FLT_MAX: 127 / m overflows, and such a row divides by s instead
    q = torch.where(torch.isinf(inv), a / torch.where(s > 0, s, 1.0), a * inv)
    q = torch.where(s > 0, torch.round(q), 0.0).clamp(-127, 127)
    return q.double(), s


def int8_gemm(a: torch.Tensor, qw: torch.Tensor, col_scale=None) -> torch.Tensor:
    """float(sum_k q_a q_w) * s_a (* col_scale): a [M, K] fp32 (already column-scaled), qw [N, K] integers."""
    qa, sa = quantize_rows(a)
    out = (qa @ qw.T).float() * sa
    return out * col_scale if col_scale is not None else out


def w8a8_reference(x, gate, up, down, ids, w, dy):
    """y, dx, dw of the INT8-GEMM layer, row by gathered row (bf16 storage where the engine stores bf16)."""
    (qg, sg), (qu, su), (qd, sd) = (quantize(t) for t in (gate, up, down))
    T, k = ids.shape
    y = torch.zeros(T, x.shape[1])
    dx = torch.zeros(T, x.shape[1])
    dw = torch.zeros(T, k)
    for e in ids.unique().tolist():
        t, j = (ids == e).nonzero(as_tuple=True)
        xe, dye, we = x[t].float(), dy[t].float(), w[t, j][:, None]
        g = int8_gemm(xe, qg[e], sg[e, :, 0])
        u = int8_gemm(xe, qu[e], su[e, :, 0])
        h = (F.silu(g) * u).bfloat16().float()
        y.index_add_(0, t, (we * int8_gemm(h, qd[e], sd[e, :, 0])).bfloat16().float())  # bf16 rows, fp32 sum
        gb, ub = g.bfloat16().float(), u.bfloat16().float()  # the saved pre-activations
        da = int8_gemm(dye * sd[e, :, 0], qd[e].T)  # dy . W_down, down's scales folded into dy
        dw[t, j] = (da * (F.silu(gb) * ub).bfloat16().float()).sum(-1)
        sig = torch.sigmoid(gb)
        dzg = (we * da * ub * sig * (1 + gb * (1 - sig))).bfloat16().float()
        dzu = (we * da * gb * sig).bfloat16().float()
        dz = torch.cat([dzg * sg[e, :, 0], dzu * su[e, :, 0]], -1)
        dx.index_add_(0, t, int8_gemm(dz, torch.cat([qg[e], qu[e]], 0).T).bfloat16().float())
    return y.bfloat16(), dx.bfloat16(), dw


def _data(shape):
    E, H, I, T, k, routing = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    gate, up, down = make_experts(E, H, I, gen, torch.float32)
    gate[0, 3] = 0.0  # an all-zero channel: scale 0
    ids, w = make_routing(T, E, k, routing, gen)
    x = torch.randn(T, H, generator=gen).bfloat16()
    if T > 1:
        x[0] = 0.0  # an all-zero activation row: scale 0
    dy = torch.randn(T, H, generator=gen).bfloat16()
    return gate, up, down, ids, w, x, dy


@pytest.mark.parametrize("shape", list(SHAPES), ids=[f"{s[0]}x{s[1]}x{s[2]}-T{s[3]}k{s[4]}-{s[5]}" for s in SHAPES])
def test_int8_gemms_match_the_w8a8_spec(isa, shape):
    gate, up, down, ids, w, x, dy = _data(shape)
    got = _run(make_layer(gate, up, down, "int8-gemm"), x, ids, w, dy)
    spec = w8a8_reference(x, gate, up, down, ids, w, dy)
    w8a16 = _run(make_layer(gate, up, down, "int8"), x, ids, w, dy)
    exact = reference_grads(x, gate, up, down, ids, w, dy)
    for i, name in enumerate(("y", "dx", "dw")):
        # Exact integer sums: what differs is fp32 summation order (dw) and a rare activation rounding to the
        # other side of a bf16 or int8 step (measured: 0 for y and dx, <= 2.4e-5 overall).
        err = rel_err(got[i], spec[i])
        assert err < 1e-4, f"{name}: {err:.2e} from the W8A8 spec ({SHAPES[shape]})"
        # W8A16 (bf16 activations) is a different computation: 20x the tolerance away (measured >= 4.9e-3).
        assert rel_err(w8a16[i], spec[i]) > 2e-3, name
        assert rel_err(got[i], exact[i]) < 4e-2, f"{name}: quantization error against the fp32 model"


def test_same_sums_on_every_path_and_for_any_thread_count():
    """The int32 sums are exact, so the frozen outputs depend on nothing but the unit's fp32 epilogue: scalar and
    every vector unit agree to rounding, and one unit is bitwise the same for 1 and 3 threads."""
    gate, up, down, ids, w, x, dy = _data((8, 96, 80, 37, 4, "uniform"))
    layer = make_layer(gate, up, down, "int8-gemm")
    runs = {}
    for isa in ("scalar", "avx2", "avx512", "amx"):
        if ke.isa_supported(isa)[0]:
            with ke.use_isa(isa):
                runs[isa] = _run(layer, x, ids, w, dy)
    for isa, out in runs.items():
        for a, b in zip(out, runs["scalar"]):
            assert rel_err(a, b) < 2e-3, isa
    before = ke.num_threads()
    try:
        ke.set_num_threads(1)
        one = _run(layer, x, ids, w, dy)
        ke.set_num_threads(3)
        three = _run(layer, x, ids, w, dy)
    finally:
        ke.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(one, three))


def test_int8_gemms_with_expert_lora(isa):
    """LoRA epilogues are unchanged: with int8 GEMMs the adapter outputs and factor gradients stay within
    activation-quantization error of the W8A16 layer (whose own LoRA is tested exactly elsewhere), and a LoRA
    of zeros changes nothing."""
    gate, up, down, ids, w, x, dy, lora = lora_case(6, 64, 96, 50, 2, "uniform")
    got = _run(make_layer(gate, up, down, "int8-gemm"), x, ids, w, dy, lora)
    ref = _run(make_layer(gate, up, down, "int8"), x, ids, w, dy, lora)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert rel_err(a, b) < 3e-2, f"output {i}"
    # Zero B factors: the adapter adds exactly nothing to the frozen int8 outputs.
    zero = ke.ExpertLoRA(lora.A_gu, torch.zeros_like(lora.B_gu), lora.A_d, torch.zeros_like(lora.B_d),
                         lora.scale_gu, lora.scale_d)
    layer = make_layer(gate, up, down, "int8-gemm")
    with_zero, frozen = _run(layer, x, ids, w, dy, zero), _run(layer, x, ids, w, dy)
    for a, b in zip(with_zero[:3], frozen):
        assert torch.equal(a, b)


def test_non_finite_activation_stays_non_finite(isa):
    """A row with Inf must not be quantized into finite garbage: its token's output is NaN/Inf, the others not."""
    gate, up, down, ids, w, x, dy = _data((4, 64, 64, 6, 2, "uniform"))
    x[2, 5] = float("inf")
    layer = make_layer(gate, up, down, "int8-gemm")
    y, _ = layer.forward(x, ids, w)
    assert not torch.isfinite(y[2]).all()
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


def test_tiny_row_divides_instead_of_overflowing(isa):
    """A row whose maximum is below 127 / FLT_MAX (here a dy row near 1e-37, and the dz rows it makes) would get
    127 / m = Inf: it is quantized by division instead, so its gradient follows the spec instead of vanishing."""
    gate, up, down, ids, w, x, dy = _data((4, 64, 64, 6, 2, "uniform"))
    dy[1] = (dy[1].float() * (1e-37 / dy[1].float().abs().max())).bfloat16()
    got = _run(make_layer(gate, up, down, "int8-gemm"), x, ids, w, dy)
    spec = w8a8_reference(x, gate, up, down, ids, w, dy)
    assert got[1][1].abs().max() > 0
    assert rel_err(got[1][1], spec[1][1]) < 1e-2
    assert rel_err(got[1], spec[1]) < 1e-4


def test_int8_gemm_format_row():
    layer = ke.ExpertLayer(2, 32, 32, "int8-gemm")
    assert layer.format is ke.get_format("AMXINT8") and layer.dtype == torch.bfloat16
    assert layer.packed_bytes == 3 * 2 * 32 * 32 + 2 * (2 * 32 + 32) * 4  # int8 panels + fp32 channel scales

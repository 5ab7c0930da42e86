"""K-chunked task GEMMs (csrc/kernels/moe_common.inc `gemm_rows`; `ke.set_kchunk` / `KT_SFT_KCHUNK` for any path):
the kernels store and reload their fp32 accumulators between chunks, so every output must be *bitwise* that of the
one-pass GEMM, on every path, for every format, with and without expert LoRA.
With LoRA this also pins the fused factor gradients (moe_tasks.inc, bwd_act with fuse_grads: dA_gu and dB_d summed
inside bwd_act, only when K is not chunked) to the separate lora_grad pass that chunked runs use: bit for bit.

The chunk is settable in-process (`ke.use_kchunk`), so every setting runs in this process.
"""
import pytest
import torch

import kt_sft.engine as ke
from moe_reference import make_experts, make_routing
from engine_cases import make_layer, make_lora

# (E, H, I, T, k, routing): H, I not multiples of the chunk; >256 rows on one expert; T=1
SHAPES = [(6, 130, 200, 300, 4, "skewed"), (4, 96, 64, 1, 2, "uniform"), (8, 64, 96, 40, 2, "uniform")]


def _outputs(kchunk: int) -> dict:
    """Every output of every shape x format x LoRA on/off, computed with the K chunk set to `kchunk`."""
    out = {}
    with ke.use_kchunk(kchunk):
        assert ke.kchunk() == kchunk
        for shape in SHAPES:
            E, H, I, T, k, routing = shape
            gen = torch.Generator().manual_seed(sum(shape[:5]))
            gate, up, down = make_experts(E, H, I, gen, torch.float32)
            ids, w = make_routing(T, E, k, routing, gen)
            x32, dy32 = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
            lora = make_lora(E, H, I, 4, 8, gen)
            for fmt in ke.FORMATS.values():  # int8 GEMMs ignore the chunk
                layer = make_layer(gate, up, down, fmt)
                x, dy = x32.to(fmt.compute_dtype), dy32.to(fmt.compute_dtype)
                for use_lora in (None, lora):
                    y, h = layer.forward(x, ids, w, save_for_backward=True, lora=use_lora)
                    res = layer.backward(h, dy, lora=use_lora)
                    key = f"{shape}-{fmt.name}-{use_lora is not None}"
                    out[key + "-y"], out[key + "-dx"], out[key + "-dw"] = y, res[0], res[1]
                    if use_lora is not None:
                        for i, g in enumerate(res[2]):
                            out[key + f"-g{i}"] = g
    return out


def test_k_chunked_gemms_are_bitwise_one_pass(isa):
    one_pass = _outputs(0)
    assert len(one_pass) == 3 * 4 * (3 + 3 + 4)  # shapes x formats x (frozen y, dx, dw + LoRA y, dx, dw, 4 grads)
    for kchunk in (64, 96):
        chunked = _outputs(kchunk)
        assert chunked.keys() == one_pass.keys()
        for key, value in one_pass.items():
            assert torch.equal(chunked[key], value), (kchunk, key)


def test_use_kchunk_restores_the_setting():
    before = ke.kchunk()
    with ke.use_kchunk(64) as k:
        assert k == 64 and ke.kchunk() == 64
        with ke.use_kchunk(None):  # the default: KT_SFT_KCHUNK, else the ISA path's own
            assert ke.kchunk() == before
    assert ke.kchunk() == before


@pytest.mark.parametrize("value", [48, -32, 33])
def test_bad_kchunk_is_refused(value):
    with pytest.raises(ValueError, match=r"kchunk must be 0 \(one pass\) or a positive multiple of 32"):
        ke.set_kchunk(value)

"""K-chunked task GEMMs (moe_tasks.inc `gemm_rows`; the AMX unit's default, KT_SFT_KCHUNK for any path): the
kernels store and reload their fp32 accumulators between chunks, so every output must be *bitwise* that of the
one-pass GEMM, on every path, for bf16 / fp32 / int8 layers, with and without expert LoRA.
With LoRA this also pins the fused factor gradients (moe_tasks.inc, bwd_act with fuse_grads: dA_gu and dB_d summed
inside bwd_act, only when K is not chunked) to the separate lora_grad pass that chunked runs use: bit for bit.

The chunk is read once per process (at engine start), so each setting runs in its own subprocess.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kt_sft.engine as ke
from conftest import isas_under_test

TESTS = Path(__file__).resolve().parent

SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import kt_sft.engine as ke
from moe_reference import make_experts, make_routing
from engine_cases import make_layer, make_lora

ke.select_isa({isa!r})
out = {{}}
# (E, H, I, T, k, routing): H, I not multiples of the chunk; >256 rows on one expert; T=1
for shape in [(6, 130, 200, 300, 4, "skewed"), (4, 96, 64, 1, 2, "uniform"), (8, 64, 96, 40, 2, "uniform")]:
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
            key = f"{{shape}}-{{fmt.name}}-{{use_lora is not None}}"
            out[key + "-y"], out[key + "-dx"], out[key + "-dw"] = y, res[0], res[1]
            if use_lora is not None:
                for i, g in enumerate(res[2]):
                    out[key + f"-g{{i}}"] = g
torch.save(out, sys.argv[1])
"""


def _outputs(isa: str, kchunk: str, path: Path) -> dict:
    env = {**os.environ, "KT_SFT_KCHUNK": kchunk, "KT_SFT_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS), isa=isa), str(path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(path)


@pytest.mark.parametrize("isa_name", isas_under_test())
def test_k_chunked_gemms_are_bitwise_one_pass(isa_name, tmp_path):
    ok, why = ke.isa_supported(isa_name)
    if not ok:
        pytest.skip(f"{isa_name} path unavailable here: {why}")
    one_pass = _outputs(isa_name, "0", tmp_path / "one_pass.pt")
    assert len(one_pass) == 3 * 4 * (3 + 3 + 4)  # shapes x kinds x (frozen y, dx, dw + LoRA y, dx, dw, 4 grads)
    for kchunk in ("64", "96"):
        chunked = _outputs(isa_name, kchunk, tmp_path / f"k{kchunk}.pt")
        assert chunked.keys() == one_pass.keys()
        for key, value in one_pass.items():
            assert torch.equal(chunked[key], value), (kchunk, key)


@pytest.mark.parametrize("value", ["48", "-32", "many"])
def test_bad_kchunk_is_refused(value):
    code = "import kt_sft.engine as ke; ke.select_isa('scalar')"
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "KT_SFT_KCHUNK": value},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"KT_SFT_KCHUNK='{value}' is not 0 or a positive multiple of 32" in proc.stderr

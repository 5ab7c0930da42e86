"""The K-chunk setting (`ke.set_kchunk` / `ke.use_kchunk`; `KT_SFT_KCHUNK` at start-up), and the tasks' own choice
(csrc/kernels/moe_tasks.inc, plan_k). That forced chunks are bitwise the one-pass GEMMs is a row of the engine
tester (test_engine_parity.py, every kind x shape x path); its shapes are too small for a task to chunk by itself."""
import pytest

import kt_sft.engine as ke
from engine_cases import Shape, case_layer, make_case, outputs_equal, run_layer

ONE_PASS = 1 << 20  # a forced K chunk no layer reaches


def test_use_kchunk_restores_the_setting():
    before = ke.kchunk()
    with ke.use_kchunk(64) as k:
        assert k == 64 and ke.kchunk() == 64
        with ke.use_kchunk(None):  # the default: KT_SFT_KCHUNK, else 0 (each task chooses)
            assert ke.kchunk() == before
    assert ke.kchunk() == before


@pytest.mark.parametrize("value", [48, -32, 33])
def test_bad_kchunk_is_refused(value):
    with pytest.raises(ValueError, match=r"kchunk must be 0 \(each task chooses\) or a positive multiple of 32"):
        ke.set_kchunk(value)


# Layers whose tasks run K in chunks by themselves (weight blocks + a row group past 1 MiB), kept cheap by a narrow
# other dimension: a long hidden size (gate_up, dy.W_down), a long intermediate size (down, dx). Skewed routing puts
# ~1100 rows on each of two experts: more than one sweep of C sums (1024 rows for two blocks).
AUTO_CHUNKED = {
    Shape(3, 12000, 40, 1100, 2, "skewed", 3, 5): "H = 12000",
    Shape(3, 40, 12000, 1100, 2, "skewed", 3, 5): "I = 12000",
}
# (format, LoRA): the target formats, a decoded one (chunks decoded per task) and int4 GEMMs (expanded to quads);
# LoRA: the chunked bwd_act's fused factor gradients against the separate pass of a forced one-pass run.
AUTO_KINDS = [("bf16", True), ("int8-gemm", False), ("fp8", False), ("int4-gemm", True)]


@pytest.mark.parametrize("fmt, lora", AUTO_KINDS, ids=[f"{f}{'-lora' if lo else ''}" for f, lo in AUTO_KINDS])
@pytest.mark.parametrize("shape", list(AUTO_CHUNKED), ids=list(AUTO_CHUNKED.values()))
def test_tasks_that_chunk_by_themselves_are_bitwise_one_pass(vector_isa, fmt, lora, shape):
    case = make_case(shape, fmt, lora)
    layer = case_layer(case)
    with ke.use_kchunk(ONE_PASS):
        one_pass = run_layer(layer, case)
    with ke.use_kchunk(0):
        assert outputs_equal(run_layer(layer, case), one_pass)

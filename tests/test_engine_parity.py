"""The engine tester: every layer kind (tests/engine_cases.py KINDS: format x LoRA x GPU share) on every ISA path, over
the shape grid, against its format's plain-PyTorch reference (REFERENCES) within the one tolerance table (TOLERANCE);
the quantized formats also against their unquantized weights and their identities (IDENTITIES)."""
import dataclasses
from functools import lru_cache

import pytest

import kt_sft.engine as ke
from engine_cases import (IDENTITIES, KINDS, REFERENCES, SHAPES, SHARE_COMPUTES_LIKE, TOLERANCE, Shape, assert_close,
                          assert_output_layout, case_layer, case_references, check_layer, make_case, outputs_equal,
                          run_layer, shape_id)

KIND_PARAMS = [pytest.param(kind, id=str(kind)) for kind in KINDS]
# The engine alone: what a GPU share cannot change (its experts' paths, an empty call, the engine's thread count).
ENGINE_KIND_PARAMS = [pytest.param(kind, id=str(kind)) for kind in KINDS if kind.share is None]
ONE_PASS = 1 << 20  # a forced K chunk no layer reaches: every task GEMM in one pass


def test_every_format_has_a_row_in_each_table():
    assert set(REFERENCES) == set(TOLERANCE) == set(IDENTITIES) == set(SHARE_COMPUTES_LIKE) == set(ke.FORMATS)


@pytest.mark.parametrize("kind", KIND_PARAMS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=[shape_id(s) for s in SHAPES])
def test_layer_matches_its_reference(isa, kind, shape):
    case, references = grid_case(shape, kind)
    check_layer(case, SHAPES[shape], references)


@lru_cache(maxsize=None)
def grid_case(shape, kind):
    """A grid case and its references, computed once for all ISA paths (the tests only read them)."""
    case = make_case(shape, kind.format, kind.lora, kind.share)
    return case, case_references(case)


@pytest.mark.parametrize("kind", ENGINE_KIND_PARAMS)
def test_paths_agree_with_scalar_spec(vector_isa, kind):
    """Every vector path computes what the scalar path (the executable spec) computes on the same layer, to the
    rounding of the compute dtype (for fp32 5x tighter than the reference tolerance)."""
    case = make_case(Shape(6, 80, 112, 50, 2, "uniform", 8, 4), kind.format, kind.lora)
    layer = case_layer(case)
    got = run_layer(layer, case)
    with ke.use_isa("scalar"):
        spec = run_layer(layer, case)
    tol = TOLERANCE[kind.format.name]
    assert_close(got, spec, tol, f"{vector_isa} vs scalar", tol.paths)


@pytest.mark.parametrize("kind", ENGINE_KIND_PARAMS)
def test_empty_batch(isa, kind):
    """T = 0: empty outputs of the compute dtype, factor gradients of the factors' shapes and exactly zero, and the
    layer's state untouched: the next call gives bitwise what the call before it gave."""
    case = make_case(Shape(4, 32, 32, 9, 2, "uniform", 2, 3), kind.format, kind.lora)
    layer = case_layer(case)
    before = run_layer(layer, case)
    empty = dataclasses.replace(case, ids=case.ids[:0], w=case.w[:0], x=case.x[:0], dy=case.dy[:0])
    got = run_layer(layer, empty)
    assert_output_layout(got, empty)  # every expert is without tokens: all factor gradients zero
    assert all(g is None or (g.numel() > 0 and not g.any()) for g in got.factors or ())
    assert outputs_equal(run_layer(layer, case), before)


@pytest.mark.parametrize("kind", ENGINE_KIND_PARAMS)
def test_result_does_not_depend_on_thread_count(kind):
    """Reductions (the k routed rows of a token, the factor gradients per expert and column block) run in a fixed
    order, and int8 GEMM sums are exact: any pool size gives bit-identical results."""
    case = make_case(Shape(8, 96, 64, 200, 3, "skewed", 8, 4), kind.format, kind.lora)
    layer = case_layer(case)
    before = ke.num_threads()
    runs = {}
    try:
        for threads in (2, 1, 3):
            ke.set_num_threads(threads)
            runs[threads] = run_layer(layer, case)
    finally:
        ke.set_num_threads(before)
    assert outputs_equal(runs[1], runs[2]) and outputs_equal(runs[3], runs[2])


@pytest.mark.parametrize("kind", ENGINE_KIND_PARAMS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=[shape_id(s) for s in SHAPES])
def test_k_chunked_gemms_are_bitwise_one_pass(isa, kind, shape):
    """K-chunked task GEMMs (csrc/kernels/moe_tasks.inc `task_gemms`, `ke.use_kchunk`) store and reload their fp32
    (int8 GEMMs: int32) sums between chunks, so every output is bitwise the one-pass GEMM's, on every path and
    format. With LoRA this also pins the fused factor gradients of bwd_act (0: the tasks choose) to the separate
    lora_grad pass that forced chunks use."""
    case, _ = grid_case(shape, kind)
    layer = case_layer(case)
    with ke.use_kchunk(ONE_PASS):
        one_pass = run_layer(layer, case)
    for kchunk in (0, 64, 96):  # neither divides the grid's odd H and I (int8 GEMMs round 96 up to 128)
        with ke.use_kchunk(kchunk):
            assert outputs_equal(run_layer(layer, case), one_pass), kchunk

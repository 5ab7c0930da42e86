"""LoRA on the routed experts, computed by the engine, against the fp32 reference (tests/expert_lora_reference.py).

Factors are in PEFT 0.18's flat layout (docs/expert_lora_format.md): A_gu [r_gu*E, 2I], B_gu [H, r_gu*E],
A_d [r_d*E, H], B_d [I, r_d*E]. Every ISA path, fp32 (tight) and bf16 engines; forward y, dx, d topk_weights and
the four factor gradients; autograd glue, finite differences, determinism and argument checks.
"""
import zlib

import pytest
import torch

import kt_sft.engine as ke
from expert_lora_reference import ExpertLora, experts_with_lora, experts_with_lora_grads, split_peft_lora
from moe_reference import make_experts, make_routing, rel_err

# ||out - ref|| / ||ref|| per engine dtype. fp32: summation order and exp() only. bf16: x, dy, the activation fed
# to the down GEMM and d(gate|up) are rounded to bf16 (2^-9 each); the LoRA terms themselves are fp32.
TOLERANCE = {
    torch.float32: {"y": 5e-6, "dx": 5e-6, "dw": 5e-6, "factors": 5e-6},
    torch.bfloat16: {"y": 1e-2, "dx": 1.5e-2, "dw": 1.5e-2, "factors": 1.5e-2},
}

# (E, H, I, T, k, routing, r_gu, r_d): reason
SHAPES = {
    (8, 64, 96, 16, 2, "uniform", 8, 8): "aligned sizes, one rank",
    (5, 33, 17, 7, 3, "uniform", 3, 5): "odd H and I, odd ranks that differ between the projections",
    (4, 130, 70, 1, 2, "uniform", 4, 2): "T=1 (decode), H and I past a block boundary",
    (16, 64, 48, 5, 2, "uniform", 8, 4): "more experts than routed rows: most experts empty (zero grads)",
    (8, 48, 64, 40, 1, "one_expert", 2, 6): "k=1, every token on one expert",
    (8, 96, 80, 37, 8, "uniform", 4, 4): "k=8, every expert used by every token",
    (6, 72, 40, 300, 4, "skewed", 16, 8): "skewed routing, >256 rows on one expert (several row chunks)",
    (3, 16, 16, 3, 2, "uniform", 1, 1): "sizes below one block, rank 1",
    (4, 256, 192, 100, 2, "uniform", 8, 16): "full 32-row blocks plus tails, r_d > r_gu",
}


def _ids(shapes):
    return [f"{s[0]}x{s[1]}x{s[2]}-T{s[3]}k{s[4]}-{s[5]}-r{s[6]}.{s[7]}" for s in shapes]


def make_lora(E, H, I, r_gu, r_d, gen, scale=(0.75, 1.5)):
    """Random PEFT-layout factors, sized so the LoRA terms are comparable to the frozen ones (B != 0)."""
    def pair(r, d1, d2):
        if r == 0:
            return None, None
        return (torch.randn(r * E, d1, generator=gen) * d1 ** -0.5 * 2,
                torch.randn(d2, r * E, generator=gen) * d2 ** -0.5)
    A_gu, B_gu = pair(r_gu, 2 * I, H)
    A_d, B_d = pair(r_d, H, I)
    return ke.ExpertLoRA(A_gu, B_gu, A_d, B_d, *scale)


def _setup(shape, dtype):
    E, H, I, T, k, routing, r_gu, r_d = shape
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))  # same data in every process
    gate, up, down = make_experts(E, H, I, gen, dtype)
    ids, w = make_routing(T, E, k, routing, gen)
    x = torch.randn(T, H, generator=gen).to(dtype)
    dy = torch.randn(T, H, generator=gen).to(dtype)
    lora = make_lora(E, H, I, r_gu, r_d, gen)
    layer = ke.ExpertLayer(E, H, I, ke.for_model_dtype(dtype))
    layer.load_fused(torch.cat([gate, up], dim=1), down)
    return layer, (gate, up, down), ids, w, x, dy, lora


def reference_with_grads(x, ids, w, gate, up, down, lora: ke.ExpertLoRA, dy):
    """fp32 (y, dx, dw, [grad A_gu, B_gu, A_d, B_d] in PEFT layout) by autograd through the reference."""
    E = gate.shape[0]
    flat = [None if t is None else t.detach().clone().requires_grad_(True) for t in lora.factors()]
    xr = x.detach().float().requires_grad_(True)
    wr = w.detach().float().requires_grad_(True)
    per_expert = []
    for A, B in ((flat[0], flat[1]), (flat[2], flat[3])):
        per_expert += [None, None] if A is None else list(split_peft_lora(A, B, E))
    y = experts_with_lora(xr, ids, wr, torch.cat([gate, up], dim=1).float(), down.float(), ExpertLora(*per_expert),
                          (lora.scale_gu, lora.scale_d))
    live = [t for t in flat if t is not None]
    grads = torch.autograd.grad(y, [xr, wr] + live, dy.float())
    it = iter(grads[2:])
    return y.detach(), grads[0], grads[1], [None if t is None else next(it) for t in flat]


def _assert_close(got, ref, tol, what):
    err = rel_err(got, ref)
    assert err < tol, f"{what}: rel err {err:.2e} >= {tol:.1e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=_ids(SHAPES))
def test_forward_backward_match_reference(isa, dtype, shape):
    layer, (gate, up, down), ids, w, x, dy, lora = _setup(shape, dtype)
    y, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, grads = layer.backward(handle, dy, lora=lora)

    y_ref, dx_ref, dw_ref, g_ref = reference_with_grads(x, ids, w, gate, up, down, lora, dy)
    tol = TOLERANCE[dtype]
    why = SHAPES[shape]
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    _assert_close(y, y_ref, tol["y"], f"y ({why})")
    _assert_close(dx, dx_ref, tol["dx"], f"dx ({why})")
    _assert_close(dw, dw_ref, tol["dw"], f"dw ({why})")
    for name, g, r, t in zip(("A_gu", "B_gu", "A_d", "B_d"), grads, g_ref, lora.factors()):
        assert g.shape == t.shape and g.dtype == torch.float32, name
        _assert_close(g, r, tol["factors"], f"d{name} ({why})")
    E = shape[0]
    unrouted = [e for e in range(E) if not (ids == e).any()]
    for e in unrouted:  # PEFT: experts without tokens get exactly zero gradient
        r_gu, r_d = lora.ranks(E)
        assert not grads.A_gu[e * r_gu:(e + 1) * r_gu].any() and not grads.B_gu[:, e::E].any()
        assert not grads.A_d[e * r_d:(e + 1) * r_d].any() and not grads.B_d[:, e::E].any()


def test_hand_written_reference_agrees(isa):
    """The engine also matches experts_with_lora_grads (the formulas of docs/expert_lora_format.md) directly."""
    shape = (5, 33, 17, 7, 3, "uniform", 3, 5)
    layer, (gate, up, down), ids, w, x, dy, lora = _setup(shape, torch.float32)
    y, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, grads = layer.backward(handle, dy, lora=lora)
    E = shape[0]
    per_expert = split_peft_lora(lora.A_gu, lora.B_gu, E) + split_peft_lora(lora.A_d, lora.B_d, E)
    ref = experts_with_lora_grads(x, ids, w, torch.cat([gate, up], 1), down, ExpertLora(*per_expert),
                                  (lora.scale_gu, lora.scale_d), dy)
    _assert_close(dx, ref["dx"], 5e-6, "dx")
    _assert_close(dw, ref["dw"], 5e-6, "dw")
    A, B = split_peft_lora(grads.A_gu, grads.B_gu, E)
    _assert_close(A, ref["dA_gu"], 5e-6, "dA_gu")
    _assert_close(B, ref["dB_gu"], 5e-6, "dB_gu")
    A, B = split_peft_lora(grads.A_d, grads.B_d, E)
    _assert_close(A, ref["dA_d"], 5e-6, "dA_d")
    _assert_close(B, ref["dB_d"], 5e-6, "dB_d")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("which", ["gate_up", "down"])
def test_one_projection_only(isa, dtype, which):
    """PEFT may target one of the two params: the other one's factors are None (rank 0)."""
    shape = (6, 72, 40, 50, 3, "uniform", 4 if which == "gate_up" else 0, 4 if which == "down" else 0)
    layer, (gate, up, down), ids, w, x, dy, lora = _setup(shape, dtype)
    y, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, grads = layer.backward(handle, dy, lora=lora)
    y_ref, dx_ref, dw_ref, g_ref = reference_with_grads(x, ids, w, gate, up, down, lora, dy)
    tol = TOLERANCE[dtype]
    _assert_close(y, y_ref, tol["y"], "y")
    _assert_close(dx, dx_ref, tol["dx"], "dx")
    _assert_close(dw, dw_ref, tol["dw"], "dw")
    for g, r in zip(grads, g_ref):
        assert (g is None) == (r is None)
        if g is not None:
            _assert_close(g, r, tol["factors"], which)


def test_paths_agree_with_scalar_spec(isa):
    shape = (6, 80, 112, 50, 2, "uniform", 8, 4)
    layer, _, ids, w, x, dy, lora = _setup(shape, torch.float32)
    y, h = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, g = layer.backward(h, dy, lora=lora)
    with ke.use_isa("scalar"):
        y_s, h = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
        dx_s, dw_s, g_s = layer.backward(h, dy, lora=lora)
    for a, b in zip((y, dx, dw) + tuple(g), (y_s, dx_s, dw_s) + tuple(g_s)):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_fresh_adapter_is_exact_noop(isa, dtype):
    """PEFT init (B = 0): y, dx, dw equal the frozen path's (the LoRA terms add exact zeros; only dw's fp32 sum may
    be contracted into FMAs differently by the compiler in the LoRA variant of bwd_act); dA = 0 exactly, dB != 0."""
    shape = (8, 64, 48, 30, 2, "uniform", 4, 4)
    layer, _, ids, w, x, dy, lora = _setup(shape, dtype)
    lora.B_gu.zero_()
    lora.B_d.zero_()
    y0, h0 = layer.forward(x, ids, w, save_for_backward=True)
    dx0, dw0 = layer.backward(h0, dy)
    y, h = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    dx, dw, g = layer.backward(h, dy, lora=lora)
    assert rel_err(y, y0) <= 1e-6 and rel_err(dx, dx0) <= 1e-6 and rel_err(dw, dw0) <= 1e-6
    assert not g.A_gu.any() and not g.A_d.any()
    assert g.B_gu.abs().sum() > 0 and g.B_d.abs().sum() > 0


@pytest.mark.parametrize("threads", [1, 3])
def test_result_does_not_depend_on_thread_count(threads):
    """Factor gradients are fixed-order sums per (expert, column block): bit-identical for any pool size."""
    shape = (8, 96, 64, 200, 3, "skewed", 8, 4)
    layer, _, ids, w, x, dy, lora = _setup(shape, torch.bfloat16)
    before = ke.num_threads()
    try:
        ke.set_num_threads(2)
        y2, h2 = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
        r2 = layer.backward(h2, dy, lora=lora)
        ke.set_num_threads(threads)
        y, h = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
        r = layer.backward(h, dy, lora=lora)
    finally:
        ke.set_num_threads(before)
    assert torch.equal(y, y2)
    assert torch.equal(r[0], r2[0]) and torch.equal(r[1], r2[1])
    assert all(torch.equal(a, b) for a, b in zip(r[2], r2[2]))


def test_empty_batch_gives_zero_factor_grads(isa):
    shape = (4, 32, 32, 0, 2, "uniform", 2, 3)
    layer, _, _, _, _, _, lora = _setup((4, 32, 32, 1, 2, "uniform", 2, 3), torch.float32)
    ids = torch.zeros(0, 2, dtype=torch.int64)
    y, h = layer.forward(torch.zeros(0, 32), ids, torch.zeros(0, 2), save_for_backward=True, lora=lora)
    dx, dw, g = layer.backward(h, torch.zeros(0, 32), lora=lora)
    assert y.shape == (0, 32) and dx.shape == (0, 32) and dw.shape == (0, 2), shape
    assert all(t.shape == f.shape and not t.any() for t, f in zip(g, lora.factors()))


# ------------------------------------------------------------------------------------------------ autograd glue

def _params(lora: ke.ExpertLoRA):
    return ke.ExpertLoRA(*(t.clone().requires_grad_(True) for t in lora.factors()), lora.scale_gu, lora.scale_d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_autograd_reaches_factors(isa, dtype):
    shape = (6, 40, 24, 9, 2, "uniform", 4, 2)
    layer, (gate, up, down), ids, w, x, dy, lora = _setup(shape, dtype)
    p = _params(lora)
    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    y = ke.moe_experts(xg, ids, wg, layer, lora=p)
    (y.float() * dy.float()).sum().backward()
    _, dx_ref, dw_ref, g_ref = reference_with_grads(x, ids, w, gate, up, down, lora, dy)
    tol = TOLERANCE[dtype]
    _assert_close(xg.grad, dx_ref, tol["dx"], "x.grad")
    _assert_close(wg.grad, dw_ref, tol["dw"], "topk_weights.grad")
    for t, r in zip(p.factors(), g_ref):
        assert t.grad is not None and t.grad.dtype == torch.float32
        _assert_close(t.grad, r, tol["factors"], "factor .grad")
    # a second backward accumulates into .grad like for any parameter
    before = [t.grad.clone() for t in p.factors()]
    (ke.moe_experts(x, ids, w, layer, lora=p).float() * dy.float()).sum().backward()
    for t, b in zip(p.factors(), before):
        _assert_close(t.grad, 2 * b, 1e-6, "accumulated .grad")


def test_factor_grads_finite_differences(isa):
    """d/de L(A + e V) at e=0 == <dL/dA, V> for each factor, central differences on the fp32 engine."""
    shape = (4, 24, 20, 7, 2, "uniform", 3, 2)
    layer, _, ids, w, x, _, lora = _setup(shape, torch.float32)
    gen = torch.Generator().manual_seed(5)
    probe = torch.randn(x.shape, generator=gen)
    p = _params(lora)
    (ke.moe_experts(x, ids, w, layer, lora=p) * probe).sum().backward()
    names = ("A_gu", "B_gu", "A_d", "B_d")
    for i, name in enumerate(names):
        t = p.factors()[i]
        v = torch.randn(t.shape, generator=gen)
        analytic = (t.grad * v).sum()
        eps = 1e-2

        def loss(sign):
            fs = [f.detach().clone() for f in p.factors()]
            fs[i] = fs[i] + sign * eps * v
            with torch.no_grad():
                return (ke.moe_experts(x, ids, w, layer, lora=ke.ExpertLoRA(*fs, p.scale_gu, p.scale_d))
                        * probe).sum()

        numeric = (loss(1) - loss(-1)) / (2 * eps)
        assert abs(numeric - analytic) <= 2e-3 * abs(analytic) + 1e-4, (name, numeric.item(), analytic.item())


def test_in_place_update_between_forward_and_backward_is_refused():
    shape = (4, 32, 32, 5, 2, "uniform", 2, 2)
    layer, _, ids, w, x, _, lora = _setup(shape, torch.float32)
    p = _params(lora)
    y = ke.moe_experts(x, ids, w, layer, lora=p)
    with torch.no_grad():
        p.A_gu.add_(1.0)  # an optimizer step before backward: the engine's saved u, q would be stale
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_checkpoint_recompute_reuses_forward_unless_factors_changed():
    shape = (4, 32, 32, 5, 2, "uniform", 2, 2)
    layer, _, ids, w, x, _, lora = _setup(shape, torch.float32)
    p = _params(lora)
    with torch.no_grad():
        y0 = ke.moe_experts(x, ids, w, layer, retain=True, lora=p)
    y1 = ke.moe_experts(x, ids, w, layer, lora=p)  # the recompute pass: same inputs, same factors -> reused
    assert torch.equal(y0, y1)
    y1.sum().backward()
    g = [t.grad.clone() for t in p.factors()]
    with torch.no_grad():
        ke.moe_experts(x, ids, w, layer, retain=True, lora=p)
        p.B_d.mul_(2.0)
    y2 = ke.moe_experts(x, ids, w, layer, lora=p)  # factors changed in place: must recompute
    assert not torch.equal(y2, y1)
    for t in p.factors():
        t.grad = None
    y2.sum().backward()
    assert not torch.equal(p.A_d.grad, g[2])


# ------------------------------------------------------------------------------------------------ bad input

def _bad_cases(E, H, I):
    r = 2
    ok = dict(A_gu=torch.zeros(r * E, 2 * I), B_gu=torch.zeros(H, r * E), A_d=torch.zeros(r * E, H),
              B_d=torch.zeros(I, r * E))
    yield "A_gu", dict(ok, A_gu=torch.zeros(r * E, I)), ValueError, "expected shape"
    yield "B_gu", dict(ok, B_gu=torch.zeros(H, r * E + 1)), ValueError, "r\\*"
    yield "A_gu", dict(ok, A_gu=torch.zeros((r + 1) * E, 2 * I)), ValueError, "expected shape"
    yield "B_d", dict(ok, B_d=torch.zeros(H, r * E)), ValueError, "expected shape"
    yield "A_d", dict(ok, A_d=torch.zeros(r * E, H, dtype=torch.bfloat16)), TypeError, "float32"
    yield "B_gu", dict(ok, B_gu=torch.zeros(H, r * E, dtype=torch.float64)), TypeError, "float32"
    yield "B_d", dict(ok, B_d=torch.zeros(I, r * E, device="meta")), ValueError, "CPU"
    yield "A_gu", dict(ok, A_gu=torch.zeros(2 * I, r * E).T), ValueError, "contiguous"
    yield "A_d", dict(ok, A_d=None), ValueError, "give both or neither"
    yield "B_gu", dict(ok, B_gu=[[0.0]]), TypeError, "torch.Tensor"


@pytest.mark.parametrize("case", range(10))
def test_bad_factor_names_the_argument(case):
    E, H, I = 4, 32, 24
    name, kw, exc, msg = list(_bad_cases(E, H, I))[case]
    layer = ke.ExpertLayer(E, H, I, "fp32")
    gen = torch.Generator().manual_seed(0)
    gate, up, down = make_experts(E, H, I, gen)
    layer.load_fused(torch.cat([gate, up], 1), down)
    ids, w = make_routing(3, E, 2, "uniform", gen)
    lora = ke.ExpertLoRA(**kw, scale_gu=1.0, scale_d=1.0)
    with pytest.raises(exc, match=msg) as info:
        layer.forward(torch.zeros(3, H), ids, w, lora=lora)
    assert f"lora.{name}" in str(info.value)


def test_bad_scale_and_mismatched_backward():
    shape = (4, 32, 32, 5, 2, "uniform", 2, 3)
    layer, _, ids, w, x, dy, lora = _setup(shape, torch.float32)
    with pytest.raises(TypeError, match="lora.scale_d"):
        layer.forward(x, ids, w, lora=ke.ExpertLoRA(*lora.factors(), 1.0, float("nan")))
    with pytest.raises(TypeError, match="ExpertLoRA"):
        layer.forward(x, ids, w, lora=tuple(lora.factors()))
    with pytest.raises(ValueError, match="no factors"):
        layer.forward(x, ids, w, lora=ke.ExpertLoRA(None, None, None, None))
    _, h = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
    with pytest.raises(ValueError, match="ran with LoRA"):
        layer.backward(h, dy)
    other = make_lora(4, 32, 32, 2, 2, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="differ from the forward"):
        layer.backward(h, dy, lora=other)
    layer.backward(h, dy, lora=lora)  # the handle is still live after the refused calls
    _, h = layer.forward(x, ids, w, save_for_backward=True)
    with pytest.raises(ValueError, match="differ from the forward"):
        layer.backward(h, dy, lora=lora)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_factors_round_trip():
    shape = (6, 40, 24, 33, 2, "uniform", 4, 2)
    layer, (gate, up, down), ids, w, x, dy, lora = _setup(shape, torch.bfloat16)
    p = ke.ExpertLoRA(*(t.cuda().requires_grad_(True) for t in lora.factors()), lora.scale_gu, lora.scale_d)
    y = ke.moe_experts(x.cuda().requires_grad_(True), ids.cuda(), w.cuda(), layer, lora=p)
    (y.float() * dy.cuda().float()).sum().backward()
    _, _, _, g_ref = reference_with_grads(x, ids, w, gate, up, down, lora, dy)
    for t, r in zip(p.factors(), g_ref):
        assert t.grad.device.type == "cuda"
        _assert_close(t.grad.cpu(), r, 1.5e-2, "cuda factor grad")


def test_phase_profile_names_every_phase_once_per_call():
    """kt_sft.engine.phase_profile: each phase of a LoRA forward + backward, in execution order, one call each;
    profiling stops (and records nothing) outside the block."""
    layer, _, ids, w, x, dy, lora = _setup((8, 64, 96, 16, 2, "uniform", 8, 8), torch.float32)
    with ke.phase_profile() as phases:
        _, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
        layer.backward(handle, dy, lora=lora)
    assert list(phases) == [
        "forward: plan + gather", "forward: LoRA repack + save x", "forward: LoRA x.B_gu",
        "forward: gate_up GEMM + SiLU-GLU",
        "forward: LoRA h.B_d", "forward: down GEMM", "forward: sum rows",
        "backward: gather dy", "backward: LoRA repack", "backward: LoRA dy.A_d", "backward: dy.W_down + dSiLU-GLU + dw",
        "backward: LoRA dz.A_gu", "backward: dz.W_gu (dx)", "backward: LoRA factor gradients",
        "backward: sum rows + dw"]
    assert all(calls == 1 and seconds >= 0 for calls, seconds in phases.values())
    layer.forward(x, ids, w)
    with ke.phase_profile() as frozen:
        layer.forward(x, ids, w)
    assert list(frozen) == ["forward: plan + gather", "forward: gate_up GEMM + SiLU-GLU", "forward: down GEMM",
                            "forward: sum rows"]
    assert all(calls == 1 for calls, _ in frozen.values())  # the forward before the block is not counted

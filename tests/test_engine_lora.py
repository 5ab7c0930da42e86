"""LoRA on the routed experts, computed by the engine (factors in PEFT 0.18's flat layout, docs/expert_lora_format.md:
A_gu [r_gu*E, 2I], B_gu [H, r_gu*E], A_d [r_d*E, H], B_d [I, r_d*E]).

The shape grid of every format with LoRA is the engine tester's (test_engine_parity.py, tests/engine_cases.py); here:
the hand-written backward formulas, one projection only, a fresh adapter, the autograd glue, finite differences,
checkpoint recompute, argument checks and the phase profile.
"""
import pytest
import torch

import kt_sft.engine as ke
from engine_cases import (REFERENCES, SHARE_DEVICES, TOLERANCE, Case, Outputs, Shape, assert_close, case_layer,
                          check_layer, lora_params, make_case, make_lora, run_layer)
from expert_lora_reference import ExpertLora, experts_with_lora_grads, split_peft_lora
from moe_reference import make_experts, make_routing, rel_err

FORMAT_PARAMS = [pytest.param(name, id=name) for name in ke.FORMATS]


def _lora_case(shape: Shape, fmt="fp32") -> tuple[ke.ExpertLayer, Case]:
    case = make_case(shape, fmt, lora=True)
    return case_layer(case), case


def test_hand_written_reference_agrees(isa):
    """The engine also matches experts_with_lora_grads (the formulas of docs/expert_lora_format.md) directly."""
    layer, case = _lora_case(Shape(5, 33, 17, 7, 3, "uniform", 3, 5))
    got = run_layer(layer, case)
    E, lora = case.gate.shape[0], case.lora
    per_expert = split_peft_lora(lora.A_gu, lora.B_gu, E) + split_peft_lora(lora.A_d, lora.B_d, E)
    ref = experts_with_lora_grads(case.x, case.ids, case.w, torch.cat([case.gate, case.up], 1), case.down,
                                  ExpertLora(*per_expert), (lora.scale_gu, lora.scale_d), case.dy)
    want = {"dx": got.dx, "dw": got.dw}
    for proj, (A, B) in (("gu", got.factors[:2]), ("d", got.factors[2:])):
        want[f"dA_{proj}"], want[f"dB_{proj}"] = split_peft_lora(A, B, E)
    for name, value in want.items():
        err = rel_err(value, ref[name])
        assert err < TOLERANCE["fp32"].factors, f"{name}: rel err {err:.2e}"


@pytest.mark.parametrize("share", [None, *SHARE_DEVICES], ids=lambda d: f"share_{d}" if d else "engine")
@pytest.mark.parametrize("fmt", FORMAT_PARAMS)
@pytest.mark.parametrize("which", ["gate_up", "down"])
def test_one_projection_only(isa, fmt, which, share):
    """PEFT may target one of the two params: the other one's factors are None (rank 0), for every format, with and
    without a GPU share (of 4 of the 6 experts)."""
    shape = Shape(6, 72, 40, 50, 3, "uniform", 4 if which == "gate_up" else 0, 4 if which == "down" else 0, 4, 3)
    got = check_layer(make_case(shape, fmt, lora=True, share=share), f"LoRA on {which} only")
    assert [g is None for g in got.factors] == ([False, False, True, True] if which == "gate_up"
                                                else [True, True, False, False])


@pytest.mark.parametrize("fmt", FORMAT_PARAMS)
def test_fresh_adapter_is_exact_noop(isa, fmt):
    """PEFT init (B = 0): y and dx are bitwise the frozen path's (the LoRA terms add exact zeros), dw too up to its
    fp32 sum, which the compiler may contract into FMAs differently in the LoRA variant of bwd_act; dA = 0 exactly,
    dB != 0."""
    layer, case = _lora_case(Shape(8, 64, 48, 30, 2, "uniform", 4, 4), fmt)
    case.lora.B_gu.zero_()
    case.lora.B_d.zero_()
    frozen, got = run_layer(layer, case, lora=None), run_layer(layer, case)
    assert torch.equal(got.y, frozen.y) and torch.equal(got.dx, frozen.dx) and rel_err(got.dw, frozen.dw) <= 1e-6
    A_gu, B_gu, A_d, B_d = got.factors
    assert not A_gu.any() and not A_d.any()
    assert B_gu.abs().sum() > 0 and B_d.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ autograd glue

@pytest.mark.parametrize("fmt", FORMAT_PARAMS)
def test_autograd_reaches_factors(isa, fmt):
    layer, case = _lora_case(Shape(6, 40, 24, 9, 2, "uniform", 4, 2), fmt)
    p = lora_params(case.lora)
    xg, wg = case.x.clone().requires_grad_(True), case.w.clone().requires_grad_(True)
    y = ke.moe_experts(xg, case.ids, wg, layer, lora=p)
    (y.float() * case.dy.float()).sum().backward()
    got = Outputs(y.detach(), xg.grad, wg.grad, tuple(t.grad for t in p.factors()))
    assert all(t.grad.dtype == torch.float32 for t in p.factors())
    assert_close(got, REFERENCES[fmt](case), TOLERANCE[fmt], ".grad of x, topk_weights and the factors")
    # a second backward accumulates into .grad like for any parameter
    before = [t.grad.clone() for t in p.factors()]
    (ke.moe_experts(case.x, case.ids, case.w, layer, lora=p).float() * case.dy.float()).sum().backward()
    for t, b in zip(p.factors(), before):
        assert rel_err(t.grad, 2 * b) < 1e-6, "accumulated .grad"


def test_factor_grads_finite_differences(isa):
    """d/de L(A + e V) at e=0 == <dL/dA, V> for each factor, central differences on the fp32 engine."""
    layer, case = _lora_case(Shape(4, 24, 20, 7, 2, "uniform", 3, 2))
    x, ids, w = case.x, case.ids, case.w
    gen = torch.Generator().manual_seed(5)
    probe = torch.randn(x.shape, generator=gen)
    p = lora_params(case.lora)
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
    layer, case = _lora_case(Shape(4, 32, 32, 5, 2, "uniform", 2, 2))
    x, ids, w = case.x, case.ids, case.w
    p = lora_params(case.lora)
    y = ke.moe_experts(x, ids, w, layer, lora=p)
    with torch.no_grad():
        p.A_gu.add_(1.0)  # an optimizer step before backward: the engine's saved u, q would be stale
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_checkpoint_recompute_reuses_forward_unless_factors_changed():
    layer, case = _lora_case(Shape(4, 32, 32, 5, 2, "uniform", 2, 2))
    x, ids, w = case.x, case.ids, case.w
    p = lora_params(case.lora)
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
    layer, case = _lora_case(Shape(4, 32, 32, 5, 2, "uniform", 2, 3))
    x, ids, w, dy, lora = case.x, case.ids, case.w, case.dy, case.lora
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
    layer, case = _lora_case(Shape(6, 40, 24, 33, 2, "uniform", 4, 2), "bf16")
    lora = case.lora
    p = ke.ExpertLoRA(*(t.cuda().requires_grad_(True) for t in lora.factors()), lora.scale_gu, lora.scale_d)
    y = ke.moe_experts(case.x.cuda().requires_grad_(True), case.ids.cuda(), case.w.cuda(), layer, lora=p)
    (y.float() * case.dy.cuda().float()).sum().backward()
    for name, t, r in zip(("A_gu", "B_gu", "A_d", "B_d"), p.factors(), REFERENCES["bf16"](case).factors):
        assert t.grad.device.type == "cuda"
        assert rel_err(t.grad.cpu(), r) < TOLERANCE["bf16"].factors, f"cuda d{name}"


def test_phase_profile_names_every_phase_once_per_call():
    """kt_sft.engine.phase_profile: each phase of a LoRA forward + backward, in execution order, one call each;
    profiling stops (and records nothing) outside the block."""
    layer, case = _lora_case(Shape(8, 64, 96, 16, 2, "uniform", 8, 8))
    x, ids, w, dy, lora = case.x, case.ids, case.w, case.dy, case.lora
    with ke.phase_profile() as profile:
        _, handle = layer.forward(x, ids, w, save_for_backward=True, lora=lora)
        layer.backward(handle, dy, lora=lora)
    phases = {name: v for name, v in profile.items() if " | " not in name}
    assert list(phases) == [
        "forward: plan + gather", "forward: LoRA repack + save x", "forward: LoRA x.B_gu",
        "forward: gate_up GEMM + SiLU-GLU",
        "forward: LoRA h.B_d", "forward: down GEMM", "forward: sum rows",
        "backward: gather dy", "backward: LoRA repack", "backward: LoRA dy.A_d", "backward: dy.W_down + dSiLU-GLU + dw",
        "backward: LoRA dz.A_gu", "backward: dz.W_gu (dx)", "backward: LoRA factor gradients",
        "backward: sum rows + dw"]
    assert all(calls == 1 and seconds >= 0 for calls, seconds in phases.values())
    for gemm in ("forward: gate_up GEMM + SiLU-GLU", "forward: down GEMM", "backward: dy.W_down + dSiLU-GLU + dw",
                 "backward: dz.W_gu (dx)"):  # where the workers' time went, right after the phase
        names = list(profile)
        parts = {}
        for name in names[names.index(gemm) + 1:]:
            if not name.startswith(gemm + " | "):
                break
            parts[name.split(" | ")[1]] = profile[name][1]
        assert {"tiles", "epilogue", "task set-up", "idle"} <= set(parts), (gemm, parts)
        assert sum(parts.values()) <= 1.05 * profile[gemm][1] + 1e-4, (gemm, parts, profile[gemm])
    layer.forward(x, ids, w)
    with ke.phase_profile() as frozen:
        layer.forward(x, ids, w)
    assert [name for name in frozen if " | " not in name] == [
        "forward: plan + gather", "forward: gate_up GEMM + SiLU-GLU", "forward: down GEMM", "forward: sum rows"]
    assert all(calls == 1 for calls, _ in frozen.values())  # the forward before the block is not counted

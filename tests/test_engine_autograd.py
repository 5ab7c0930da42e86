"""The autograd Function over the engine: gradients reach x and topk_weights and match the reference."""
import pytest
import torch

import kt_sft.engine as ke
from moe_reference import make_experts, make_routing, moe_reference, rel_err


def _layer_and_inputs(dtype, seed=0, E=6, H=40, I=24, T=9, k=2):
    gen = torch.Generator().manual_seed(seed)
    gate, up, down = make_experts(E, H, I, gen, dtype)
    layer = ke.ExpertLayer(E, H, I, ke.for_model_dtype(dtype))
    layer.load_fused(torch.cat([gate, up], dim=1), down)
    ids, w = make_routing(T, E, k, "uniform", gen)
    x = torch.randn(T, H, generator=gen)
    return layer, (gate, up, down), ids, w, x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_loss_backward_reaches_x_and_weights(isa, dtype):
    layer, (gate, up, down), ids, w, x = _layer_and_inputs(dtype)
    x_ours = x.to(dtype).requires_grad_(True)
    w_ours = w.clone().requires_grad_(True)
    y = ke.moe_experts(x_ours, ids, w_ours, layer)
    (y.float() ** 2).sum().backward()

    x_ref = x.to(dtype).float().requires_grad_(True)
    w_ref = w.clone().requires_grad_(True)
    (moe_reference(x_ref, gate, up, down, ids, w_ref) ** 2).sum().backward()
    tol = 5e-6 if dtype == torch.float32 else 1.5e-2
    assert x_ours.grad.dtype == dtype and w_ours.grad.dtype == torch.float32
    assert rel_err(x_ours.grad, x_ref.grad) < tol
    assert rel_err(w_ours.grad, w_ref.grad) < tol


def test_directional_finite_differences(isa):
    """d/de L(x + e v, w + e u) at e=0 equals <dL/dx, v> + <dL/dw, u>, central differences on the fp32 engine."""
    layer, _, ids, w, x = _layer_and_inputs(torch.float32, seed=1)
    gen = torch.Generator().manual_seed(2)
    v, u = torch.randn(x.shape, generator=gen), torch.randn(w.shape, generator=gen) * 0.1
    probe = torch.randn(x.shape, generator=gen)

    def loss(xx, ww):
        return (ke.moe_experts(xx, ids, ww, layer) * probe).sum()

    xg, wg = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss(xg, wg).backward()
    analytic = (xg.grad * v).sum() + (wg.grad * u).sum()
    eps = 1e-2
    with torch.no_grad():
        numeric = (loss(x + eps * v, w + eps * u) - loss(x - eps * v, w - eps * u)) / (2 * eps)
    assert abs(numeric - analytic) <= 2e-3 * abs(analytic) + 1e-4


def test_no_grad_forward_saves_nothing(isa):
    layer, _, ids, w, x = _layer_and_inputs(torch.float32)
    with torch.no_grad():
        ke.moe_experts(x, ids, w, layer)
    assert layer.saved_bytes == 0


def _reference_grads(x, w, weights, ids):
    """(dx, dw) of sum(moe_reference(x, ...)) with dy = ones, in fp32."""
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    moe_reference(xr, *weights, ids, wr).sum().backward()
    return xr.grad, wr.grad


@pytest.mark.parametrize("needs", ["x", "w"])
def test_only_one_input_requires_grad(isa, needs):
    """The input that requires grad gets the reference gradient, bit for bit what it gets when both do; the other
    gets none."""
    layer, weights, ids, w, x = _layer_and_inputs(torch.float32)
    xg, wg = x.clone().requires_grad_(needs == "x"), w.clone().requires_grad_(needs == "w")
    ke.moe_experts(xg, ids, wg, layer).sum().backward()
    xb, wb = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    ke.moe_experts(xb, ids, wb, layer).sum().backward()
    dx_ref, dw_ref = _reference_grads(x, w, weights, ids)
    got, other, both, ref = (xg, wg, xb, dx_ref) if needs == "x" else (wg, xg, wb, dw_ref)
    assert other.grad is None
    assert rel_err(got.grad, ref) < 5e-6
    assert torch.equal(got.grad, both.grad)


def test_int32_ids_and_bf16_weights_are_converted(isa):
    """Routers hand out other dtypes; the glue converts them instead of failing."""
    layer, _, ids, w, x = _layer_and_inputs(torch.float32)
    y = ke.moe_experts(x, ids.int(), w.bfloat16(), layer)
    y_ref = ke.moe_experts(x, ids, w.bfloat16().float(), layer)
    assert torch.equal(y, y_ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_inputs_round_trip_through_pinned_staging():
    """Three calls with different inputs through the reused pinned buffers: each call's y and gradients equal, bit
    for bit, the same call with CPU inputs (a stale staging buffer would hand back the previous call's values)."""
    layer, weights, ids, w, x = _layer_and_inputs(torch.bfloat16, T=33)
    for i in range(3):
        xi, wi = (x * (i + 1)).bfloat16(), (w * (1 + 0.25 * i)).contiguous()
        xc, wc = xi.cuda().requires_grad_(True), wi.cuda().requires_grad_(True)
        y = ke.moe_experts(xc, ids.cuda(), wc, layer)
        assert y.device.type == "cuda"
        y.float().sum().backward()
        xh, wh = xi.clone().requires_grad_(True), wi.clone().requires_grad_(True)
        y_cpu = ke.moe_experts(xh, ids, wh, layer)
        y_cpu.float().sum().backward()
        assert torch.equal(y.cpu(), y_cpu)
        assert xc.grad.device.type == "cuda" and wc.grad.device.type == "cuda"
        assert torch.equal(xc.grad.cpu(), xh.grad) and torch.equal(wc.grad.cpu(), wh.grad)
        dx_ref, dw_ref = _reference_grads(xi.float(), wi, weights, ids)
        assert rel_err(xc.grad.cpu(), dx_ref) < 1.5e-2 and rel_err(wc.grad.cpu(), dw_ref) < 1.5e-2

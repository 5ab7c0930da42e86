"""The GPU share (kt_sft/engine/gpu_share.py): experts [E - n, E) computed by PyTorch from the engine's streamed
panels, the rest by the engine with those slots at -1.

Its results against the references, for every format with and without LoRA over the shape grid, on the CPU (the
share's device is then the CPU: same code without streams) and, where a GPU exists, on it, are the engine tester's
GPU share axis (test_engine_parity.py, tests/engine_cases.py). Here: the panels it streams, the -1 slots, checkpoint
recompute, prefetch, the token threshold, arguments and chunk sizes.
"""
import pytest
import torch

import kt_sft.engine as ke
from engine_cases import SHARE_DEVICES, TOLERANCE, dequantized, reference_with_grads
from kt_sft.engine.gpu_share import GpuShare, panels_to_matrix
from kt_sft.engine.share_plan import FORWARD
from moe_reference import make_experts, make_routing, rel_err


def _layer(E, H, I, fmt, gen):
    fmt = ke.for_model_dtype(fmt) if isinstance(fmt, torch.dtype) else ke.get_format(fmt)
    gate, up, down = make_experts(E, H, I, gen, fmt.compute_dtype)
    layer = ke.ExpertLayer(E, H, I, fmt)
    layer.load_fused(torch.cat([gate, up], dim=1), down)
    return layer, (gate, up, down)


@pytest.mark.parametrize("fmt", list(ke.FORMATS))
def test_panels_unpack_to_the_loaded_weights(fmt):
    """The unpacked panels are the weights the engine computes with: exact for f32/bf16, bf16(q * s) for int8 (stored
    as VNNI pairs, or as quads for a layer with int8 GEMMs), fp8 and int4 (engine_cases.dequantized)."""
    E, H, I = 3, 40, 24  # pads to 64 x 32: the padding must come back as zeros outside [:N, :K]
    layer, (gate, up, down) = _layer(E, H, I, fmt, torch.Generator().manual_seed(0))
    share = GpuShare(layer, 2, "cpu", chunk=1)
    mats = {}
    for a, c, g, u, d in share._chunks(share.plan(torch.zeros(0, 1, dtype=torch.int64), share.fixed), FORWARD):
        mats[a] = (g, u, d)
    for j, e in enumerate(range(1, 3)):
        g, u, d = mats[j]
        for got, ref in ((g[0], gate[e]), (u[0], up[e]), (d[0], down[e])):
            if ke.get_format(fmt).quantized:
                ref = dequantized(ref, fmt)
            assert torch.equal(got.float(), ref.float()), f"expert {e}"
    raw = torch.arange(32 * 32, dtype=torch.float32).view(torch.uint8)  # one f32 expert of 32 x 32
    fp32_layout = ke.ExpertLayer(1, 32, 32, "fp32")._layer.layout()["gate"]
    w = panels_to_matrix(raw, 1, fp32_layout, ke.FORMATS["fp32"])
    assert w[0, 17, 5] == 16 * 32 + 5 * 16 + 1  # panel 1, k = 5, n = 1


def test_engine_skips_slots_marked_minus_one(isa):
    """Slots with id -1 add nothing and get dw = 0; the two halves sum to the whole call."""
    gen = torch.Generator().manual_seed(1)
    layer, _ = _layer(5, 33, 17, torch.float32, gen)
    ids, w = make_routing(9, 5, 3, "uniform", gen)
    x, dy = torch.randn(9, 33, generator=gen), torch.randn(9, 33, generator=gen)
    mask = ids >= 3
    a, b = torch.where(mask, -1, ids), torch.where(mask, ids, -1)
    outs = []
    for i in (ids, a, b):
        y, h = layer.forward(x, i, w, save_for_backward=True)
        outs.append((y,) + layer.backward(h, dy))
    for full, pa, pb in zip(*outs):
        assert rel_err(pa + pb, full) < 1e-5
    assert not outs[1][2][mask].any() and not outs[2][2][~mask].any()
    y, _ = layer.forward(x, torch.full_like(ids, -1), w)
    assert not y.any()
    with pytest.raises(ValueError, match=r"topk_ids\[0\]\[0\] = -2 is outside"):
        layer.forward(x, torch.full_like(ids, -2), w)


@pytest.mark.parametrize("device", SHARE_DEVICES)
@pytest.mark.parametrize("n", [3, 6], ids=["split", "share_only"])
def test_checkpoint_recompute_reuses_the_retained_forward(device, n):
    """A no_grad retain pass then the grad pass (reentrant checkpointing): the second pass computes nothing on
    either side, and backward still streams and recomputes the share. On a GPU the retained y of a share-only
    call is copied to the host without waiting (retained.HostCopy): the recompute must still see it whole."""
    gen = torch.Generator().manual_seed(3)
    layer, (gate, up, down) = _layer(6, 40, 24, torch.float32, gen)
    ids, w = make_routing(20, 6, 2, "uniform", gen)
    x, dy = torch.randn(20, 40, generator=gen).to(device), torch.randn(20, 40, generator=gen).to(device)
    ids, w = ids.to(device), w.to(device)
    share = GpuShare(layer, n, device, min_tokens=1)
    with torch.no_grad():
        y0 = ke.moe_experts(x, ids, w, layer, retain=True, share=share)
    calls = []
    share_forward, engine_forward = share.forward, layer.forward
    share.forward = lambda *a, **kw: calls.append("share") or share_forward(*a, **kw)
    layer.forward = lambda *a, **kw: calls.append("engine") or engine_forward(*a, **kw)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y1 = ke.moe_experts(xs, ids, ws, layer, share=share)
    assert calls == [] and torch.equal(y0, y1)
    y1.backward(dy)
    _, dx_ref, dw_ref, _ = reference_with_grads(x.cpu(), ids.cpu(), w.cpu(), gate, up, down, None, dy.cpu())
    tol = TOLERANCE["fp32"]
    assert rel_err(xs.grad.cpu(), dx_ref) < tol.dx and rel_err(ws.grad.cpu(), dw_ref) < tol.dw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_prefetched_chunks_serve_their_own_share_only():
    """prefetch() copies a share's first chunks ahead of its call. Its next call must use them; a call of another
    share in between refills the ring slots, and the first share must then copy its chunks again, not read the
    other layer's weights."""
    gen = torch.Generator().manual_seed(8)
    T, E, H, I = 24, 6, 64, 32
    (la, wa), (lb, _) = _layer(E, H, I, torch.bfloat16, gen), _layer(E, H, I, torch.bfloat16, gen)
    ids, w = make_routing(T, E, 2, "uniform", gen)
    x = torch.randn(T, H, generator=gen).bfloat16().cuda()
    sa, sb = GpuShare(la, E, "cuda", min_tokens=1, chunk=2), GpuShare(lb, E, "cuda", min_tokens=1, chunk=2)
    ya_plain = sa.forward(x, w.cuda(), sa.split(ids)[1])
    yb_plain = sb.forward(x, w.cuda(), sb.split(ids)[1])
    sa.prefetch()
    assert sa.ring.prefetched[0] is sa
    ya = sa.forward(x, w.cuda(), sa.split(ids)[1])
    assert sa.ring.prefetched is None and torch.equal(ya, ya_plain)
    sa.prefetch()
    yb = sb.forward(x, w.cuda(), sb.split(ids)[1])  # takes the slots over
    ya = sa.forward(x, w.cuda(), sa.split(ids)[1])
    assert torch.equal(yb, yb_plain) and torch.equal(ya, ya_plain)
    y_ref = reference_with_grads(x.cpu(), ids, w, *wa, None, torch.zeros(T, H)).y
    assert rel_err(ya.cpu(), y_ref) < TOLERANCE["bf16"].y


def test_small_calls_stay_on_the_engine():
    gen = torch.Generator().manual_seed(4)
    layer, _ = _layer(4, 32, 32, torch.float32, gen)
    ids, w = make_routing(8, 4, 2, "uniform", gen)
    x = torch.randn(8, 32, generator=gen)
    share = GpuShare(layer, 2, "cpu", min_tokens=9)
    share.forward = lambda *a, **kw: pytest.fail("a call below min_tokens reached the share")
    y = ke.moe_experts(x, ids, w, layer, share=share)
    assert torch.equal(y, ke.moe_experts(x, ids, w, layer))


def test_bad_share_arguments():
    layer, _ = _layer(4, 32, 32, torch.float32, torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=r"experts must be in \[1, 4\]"):
        GpuShare(layer, 0, "cpu")
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        GpuShare(layer, 2, "cpu", chunk=0)
    other, _ = _layer(4, 32, 32, torch.float32, torch.Generator().manual_seed(6))
    ids, w = make_routing(3, 4, 2, "uniform", torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="share: a GpuShare of another ExpertLayer"):
        ke.moe_experts(torch.randn(3, 32), ids, w, other, share=GpuShare(layer, 2, "cpu", min_tokens=1))


def test_default_chunk_is_sized_in_unpacked_bytes():
    """~140 MB of unpacked weights per chunk: 8 DeepSeek-V2-Lite experts whether the engine holds bf16 or int8
    (the GPU computes both in bf16), fewer for bigger experts, and a tiny layer streams in one chunk."""
    for fmt in ("bf16", "int8"):
        v2lite = ke.ExpertLayer(64, 2048, 1408, fmt)
        assert GpuShare(v2lite, 64, "cpu").chunk == 8
    assert GpuShare(ke.ExpertLayer(8, 7168, 2048, "bf16"), 8, "cpu").chunk == 2
    tiny, _ = _layer(6, 40, 24, "fp32", torch.Generator().manual_seed(6))
    assert GpuShare(tiny, 6, "cpu").chunk >= 6

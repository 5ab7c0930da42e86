"""The GPU share (kt_sft/engine/gpu_share.py): experts [E - n, E) computed by PyTorch from the engine's streamed
panels, the rest by the engine with those slots at -1.

Its results against the references, for every format with and without LoRA over the shape grid, on the CPU (the
share's device is then the CPU: same code without streams) and, where a GPU exists, on it, are the engine tester's
GPU share axis (test_engine_parity.py, tests/engine_cases.py). Here: the panels it streams, the -1 slots, checkpoint
recompute, prefetch, the token threshold, arguments and chunk sizes; shares of any expert set; "auto": plan_split's
choices for synthetic rates, per-call splits reused by the recompute, the rates measured, the split log line.
"""
import dataclasses

import pytest
import torch

import kt_sft.engine as ke
from engine_cases import (SHARE_DEVICES, TOLERANCE, Shape, case_layer, check_layer, dequantized, make_case,
                          reference_with_grads)
from kt_sft.engine import share_plan
from kt_sft.engine.gpu_share import GpuShare, _runs, panels_to_matrix
from kt_sft.engine.share_plan import FORWARD, Rates, plan_split, streaming_order
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
    for a, c, g, u, d in share._chunks(share.plan(torch.zeros(0, 1, dtype=torch.int64), share.fixed, [0] * E), FORWARD):
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


def _ring_of(monkeypatch, slots: int, *layers_and_chunk):
    """Shares on the CPU device over a fresh ring of `slots` chunk slots (the ring's bookkeeping is the same on
    CUDA, with events and a copy stream), each counting the chunks it issues."""
    import kt_sft.engine.gpu_share as gs

    monkeypatch.setattr(gs, "_rings", {})
    shares = []
    for layer, chunk in layers_and_chunk:
        share = GpuShare(layer, layer.num_experts, "cpu", min_tokens=1, chunk=chunk)
        share.issued = []
        issue = share._issue
        share._issue = lambda j, experts, _i=issue, _s=share: _s.issued.append(j) or _i(j, experts)
        shares.append(share)
    monkeypatch.setattr(gs, "RING_BYTES", 3 * max(s.slot_bytes for s in shares) * slots)
    return shares


def test_ring_prefetch_serves_the_next_call_until_its_slots_are_refilled(monkeypatch):
    """prefetch() copies as many of the share's chunks as the ring holds; its next call reads them without copying
    again and copies the rest; a call of another share in between that refills their slots (FIFO) makes the
    first share copy its chunks again, never read the other layer's weights. Results stay those of a plain call."""
    gen = torch.Generator().manual_seed(8)
    T, E, H, I = 24, 6, 64, 32
    (la, wa), (lb, _) = _layer(E, H, I, torch.bfloat16, gen), _layer(E, H, I, torch.bfloat16, gen)
    ids, w = make_routing(T, E, 2, "uniform", gen)
    x = torch.randn(T, H, generator=gen).bfloat16()
    for slots, issued_after_prefetch in ((4, []), (2, [2])):  # 3 chunks per call: all fit, or the last one not
        sa, sb = _ring_of(monkeypatch, slots, (la, 2), (lb, 2))
        assert sa.ring.size == 0 and sa.ring_experts == 2 * slots
        ya_plain, yb_plain = sa.forward(x, w, sa.split(ids)[1]), sb.forward(x, w, sb.split(ids)[1])
        assert sa.ring.size == slots
        sa.issued.clear()
        sa.prefetch()
        assert sa.issued == [0, 1, 2][:slots] and sa._prefetched_experts() == sa._last[:2 * min(slots, 3)]
        sa.issued.clear()
        assert torch.equal(sa.forward(x, w, sa.split(ids)[1]), ya_plain)
        assert sa.issued == issued_after_prefetch and sa.ring.prefetched is None
        sa.prefetch()
        assert torch.equal(sb.forward(x, w, sb.split(ids)[1]), yb_plain)  # refills the slots of sa's chunk 0
        assert sa._prefetched_experts() == ()
        sa.issued.clear()
        assert torch.equal(sa.forward(x, w, sa.split(ids)[1]), ya_plain) and sa.issued == [0, 1, 2]
    y_ref = reference_with_grads(x, ids, w, *wa, None, torch.zeros(T, H)).y
    assert rel_err(ya_plain, y_ref) < TOLERANCE["bf16"].y


def test_ring_keeps_a_calls_unread_chunks(monkeypatch):
    """A call never refills a slot that holds one of its own chunks not read yet: with 2 slots and 5 chunks it
    copies chunk j + 2 only once chunk j is read, in forward and backward, whatever another share left in the
    ring; gradients match the plain reference."""
    gen = torch.Generator().manual_seed(9)
    T, E, H, I = 30, 5, 40, 24
    layer, weights = _layer(E, H, I, torch.float32, gen)
    other, _ = _layer(E, H, I, torch.float32, gen)
    ids, w = make_routing(T, E, 2, "skewed", gen)
    x, dy = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
    share, rival = _ring_of(monkeypatch, 2, (layer, 1), (other, 1))
    rival.forward(x, w, rival.split(ids)[1])
    rival.prefetch()  # two chunks of the other layer wait in the ring
    reads = []
    unpack = GpuShare._chunks

    def chunks(self, plan, direction):
        for item in unpack(self, plan, direction):
            reads.append((len(self.issued), item[0]))
            yield item

    monkeypatch.setattr(GpuShare, "_chunks", chunks)
    _, plan = share.split(ids)
    y = share.forward(x, w, plan)
    forward_reads, reads[:] = list(reads), []
    share.issued.clear()
    dx, dw, _ = share.backward(x, w, dy, plan)
    ref = reference_with_grads(x, ids, w, *weights, None, dy)
    assert rel_err(y, ref.y) < 1e-5 and rel_err(dx, ref.dx) < 1e-5 and rel_err(dw, ref.dw) < 1e-5
    # chunk j is handed out once read and its slot refilled: chunks up to j + 2 issued, never more (2 slots)
    for got in (forward_reads, reads):
        assert len(got) == 5 and all(issued <= min(5, a + 3) for issued, a in got), got


@pytest.mark.parametrize("grouped", [False, True], ids=["per_expert", "grouped_mm"])
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_backward_without_lora_is_autograds_own_result(fmt, grouped, monkeypatch):
    """The share's backward without LoRA computes the chunk's gradients by hand (no graph): bit for bit what
    autograd computes through the forward's own ops, per expert or through grouped_mm (run on the CPU here)."""
    import kt_sft.engine.gpu_share as gs

    gen = torch.Generator().manual_seed(10)
    T, E, H, I, k = 40, 6, 64, 48, 3
    layer, _ = _layer(E, H, I, fmt, gen)
    share = GpuShare(layer, (4, 1, 2), "cpu", min_tokens=1, chunk=2)
    if grouped:
        monkeypatch.setattr(GpuShare, "_mm", lambda self, x, w, counts, offs, transposed=True:
                            gs._expert_mm(x, w.contiguous(), counts, offs, transposed))
    ids, w = make_routing(T, E, k, "skewed", gen)
    x, dy = torch.randn(T, H, generator=gen).bfloat16(), torch.randn(T, H, generator=gen)
    _, plan = share.split(ids)
    dx, dw, grads = share.backward(x, w, dy, plan)
    assert grads is None
    want_dx, want_dw = torch.zeros(T, H), torch.zeros(T * k)
    for a, c, gate, up, down in share._chunks(plan, 1):
        lo, hi = share._chunk_rows(plan, a, c)
        tok, pos = plan["tok"][lo:hi], plan["pos"][lo:hi]
        xs, ws = x[tok].requires_grad_(), w.flatten()[pos].float().requires_grad_()
        with torch.enable_grad():
            torch.autograd.backward(share._rows(xs, ws, a, plan, gate, up, down, None, share._row_experts(plan, lo, hi)),
                                    dy[tok].float())
        want_dx.index_add_(0, tok, xs.grad.float())
        want_dw[pos] = ws.grad
    assert torch.equal(dx, want_dx) and torch.equal(dw.flatten(), want_dw)


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


# ------------------------------------------------------------------------------------------ any expert set, "auto"

@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int8-gemm", "fp8", "int4-gemm"])
@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
def test_a_share_of_any_expert_set_matches_the_reference(fmt, lora):
    """Experts given by id, out of order and not consecutive (runs 5 | 0 | 2-3 of 7, chunks of 2 that cut a run),
    LoRA factors and scales picked by id: the engine tester's reference and tolerance, as for a tail share."""
    case = make_case(Shape(7, 40, 24, 30, 3, "skewed", 3, 2), fmt, lora)
    for device in SHARE_DEVICES:
        check_layer(dataclasses.replace(case, share=(device, (5, 0, 2, 3), 2)), f"share of experts 5,0,2,3 on {device}")


def test_copy_runs():
    assert _runs((5, 0, 2, 3, 4, 7)) == [(5, 1), (0, 1), (2, 3), (7, 1)]
    assert _runs(()) == []


# plan_split cases: counts, engine (fwd, bwd) rows/s, stream bytes/s, gpu (fwd, bwd) rows/s, expert bytes,
# backward, lead -> the experts. Costs worked by hand in the comments (seconds).
PLANS = [
    # one direction; order 0(100) 1(50) 4(40) 2(10), 3 has no rows. CPU 200/100 = 2.0; n=1: max(1.0, 1) = 1.0;
    # n=2: max(0.5, 2) = 2.
    ([100, 50, 10, 0, 40], (100, 100), 1.0, (1e9, 1e9), 1, False, (), [0]),
    # both directions, backward engine at 50 rows/s: n=0 2+4 = 6; n=1 max(1,1)+max(2,1) = 3; n=2 max(.5,2)+max(1,2)=4
    ([100, 50, 10, 0, 40], (100, 50), 1.0, (1e9, 1e9), 1, True, (), [0]),
    # a fast stream: every expert with rows, never the one without
    ([100, 50, 10, 0, 40], (100, 100), 1e6, (1e9, 1e9), 1, True, (), [0, 1, 4, 2]),
    # a slow stream: nothing streams
    ([100, 50, 10, 0, 40], (100, 100), 1e-3, (1e9, 1e9), 1, True, (), []),
    # GPU compute bound (10 rows/s, stream free): n=1 max(1, 10) = 10 > 2.0 = all on the CPU
    ([100, 50, 10, 0, 40], (100, 100), 1e6, (10, 10), 1, False, (), []),
    # equal costs: n=0 max(2, 0) = 2 = n=2 max(1, 2): ties go to fewer streamed experts; n=1 max(1.5, 1) is best
    ([50, 50, 50, 50], (100, 100), 1.0, (1e9, 1e9), 1, False, (), [0]),
    ([50, 50, 50, 50], (100, 100), 0.5, (1e9, 1e9), 1, False, (), []),  # n=1: max(1.5, 2) = 2 = n=0
    # lead experts (prefetched) come first while they have rows: 2 then 1, then by count
    ([100, 50, 10, 0, 40], (100, 100), 1e6, (1e9, 1e9), 1, False, (2, 1), [2, 1, 0, 4]),
    # a lead expert without rows ends the lead (its copy is useless; the ones after it would land elsewhere)
    ([100, 50, 10, 0, 40], (100, 100), 1e6, (1e9, 1e9), 1, False, (3, 1), [0, 1, 4, 2]),
    # the lead goes first, then the busiest: n=1 (4) max(1.6, .5) = 1.6; n=2 (4, 0) max(.6, 1) = 1; n=3 max(.1, 1.5)
    ([100, 50, 10, 0, 40], (100, 100), 2.0, (1e9, 1e9), 1, False, (4,), [4, 0]),
]


@pytest.mark.parametrize("counts,engine,stream,gpu,nbytes,backward,lead,want", PLANS)
def test_plan_split(counts, engine, stream, gpu, nbytes, backward, lead, want):
    assert plan_split(counts, engine, stream, gpu, nbytes, backward=backward, lead=lead) == want


def test_plan_split_counts_the_copies_ahead_of_the_call():
    """Copies that ran before the call (prefetched chunks while the GPU did the work before it) do not count in
    the call. One direction, counts as in PLANS, 100 rows/s, 1 s per streamed expert, lead (0, 1) prefetched with
    1.5 s of link before the call: n=1 max(1, 1 - 1) = 1; n=2 max(.5, 2 - 1.5) = .5; n=3 max(.1, 3 - 1.5) = 1.5:
    two experts (without the overlap one: n=2 costs 2)."""
    counts = [100, 50, 10, 0, 40]
    assert plan_split(counts, (100, 100), 1.0, (1e9, 1e9), 1, backward=False, lead=(0, 1)) == [0]
    assert plan_split(counts, (100, 100), 1.0, (1e9, 1e9), 1, backward=False, lead=(0, 1),
                      hidden_s=(1.5, 0.0)) == [0, 1]
    # no lead: nothing was prefetched for the forward, whatever the link had time for
    assert plan_split(counts, (100, 100), 1.0, (1e9, 1e9), 1, backward=False, hidden_s=(1.5, 0.0)) == [0]
    # backward: the recompute prefetches the first ring_experts of this split. Two experts of 100 rows, 1 s each,
    # engine call 0.5 s: n=1 max(1, 1) + max(1, 0) + 2 x .5 = 3; n=2 2 + max(0, 2 - 2) = 2 with a 2-expert ring
    # and 5 s of link before the backward; 2 + 1 = 3 with a 1-expert ring (a tie: fewer streamed); without the
    # overlap n=2 costs 4.
    two = [100, 100]
    kw = dict(engine_call_s=0.5, hidden_s=(0.0, 5.0))
    assert plan_split(two, (100, 100), 1.0, (1e9, 1e9), 1, engine_call_s=0.5) == [0]
    assert plan_split(two, (100, 100), 1.0, (1e9, 1e9), 1, ring_experts=2, **kw) == [0, 1]
    assert plan_split(two, (100, 100), 1.0, (1e9, 1e9), 1, ring_experts=1, **kw) == [0]


def test_plan_split_weighs_the_engine_call():
    """A fixed cost per direction whenever the engine gets rows (outside the max): one direction, counts as in
    PLANS, 100 rows/s, 1 s per streamed expert. n=0 2 + c, n=1 max(1, 1) + c, n=2 max(.5, 2) + c, every expert
    with rows (n=4) 4 s and no engine call: c = 1.5 keeps the split (2.5 s), c = 3.5 streams all four."""
    counts = [100, 50, 10, 0, 40]
    assert plan_split(counts, (100, 100), 1.0, (1e9, 1e9), 1, backward=False, engine_call_s=1.5) == [0]
    assert plan_split(counts, (100, 100), 1.0, (1e9, 1e9), 1, backward=False, engine_call_s=3.5) == [0, 1, 4, 2]
    # both directions pay it: n=1 2 x (1 + 1.5) = 5 < 8 = 2 x 4 (split kept); 2 x (1 + 3.5) = 9 > 8 (all streamed)
    assert plan_split(counts, (100, 100), 1.0, (1e9, 1e9), 1, engine_call_s=1.5) == [0]
    assert plan_split(counts, (100, 100), 1.0, (1e9, 1e9), 1, engine_call_s=3.5) == [0, 1, 4, 2]


def test_plan_split_balances_v2_lite_like_rates():
    """V2-Lite-like numbers (4096 tokens x 6 of 64 experts; engine 465k rows/s each direction, 16 MB per expert over
    53 GB/s, GPU compute 20M rows/s): the chosen split leaves neither side more than one expert's cost idle, and
    the experts streamed are the busiest."""
    gen = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.multinomial(torch.rand(64, generator=gen), 4096 * 6, replacement=True,
                                              generator=gen), minlength=64).tolist()
    engine, stream, gpu, nbytes = (465e3, 465e3), 53e9, (20e6, 10e6), 16_000_000
    chosen = plan_split(counts, engine, stream, gpu, nbytes)
    cpu_s = (sum(counts) - sum(counts[e] for e in chosen)) / engine[0]
    gpu_s = len(chosen) * nbytes / stream
    assert abs(cpu_s - gpu_s) <= max(nbytes / stream, max(counts) / engine[0])
    assert min(counts[e] for e in chosen) >= max(counts[e] for e in range(64) if e not in chosen)


def test_streaming_order_keeps_the_lead_then_goes_by_id():
    """The copies under way first, in their order; the rest by id (one copy per run of consecutive ids)."""
    assert streaming_order([0, 1, 4, 2]) == [0, 1, 2, 4]
    assert streaming_order([2, 1, 0, 4], lead=(2, 1)) == [2, 1, 0, 4]
    assert streaming_order([4, 0], lead=(4, 5)) == [4, 0]  # a lead expert not chosen is left out
    assert streaming_order(list(range(63, -1, -1)), lead=tuple(range(8))) == list(range(64))


def _frozen_rates(book, engine, stream, gpu):
    """Pin a RateBook to the given rates (the calls' samples no longer move them)."""
    book.rates = Rates(list(engine), list(gpu), stream)
    book.engine = lambda d, rows, s: book.totals.__setitem__("engine_s", book.totals["engine_s"] + s)
    book.gpu = book.stream = lambda *a: None


def test_auto_splits_per_call_and_the_recompute_reuses_the_split():
    """"auto" on the CPU device: each call's split comes from its counts (busiest first); the result matches the
    reference; a checkpoint recompute reuses the forward's split even when the planner would now choose another,
    and backward computes the same experts on the share."""
    gen = torch.Generator().manual_seed(11)
    E, H, I, T, k = 8, 48, 40, 64, 2
    layer, weights = _layer(E, H, I, "bf16", gen)
    ids, w = make_routing(T, E, k, "skewed", gen)
    x, dy = torch.randn(T, H, generator=gen).bfloat16(), torch.randn(T, H, generator=gen).bfloat16()
    share = GpuShare(layer, "auto", "cpu", min_tokens=1, chunk=3)
    nbytes = 3 * share.expert_bytes
    # engine 1000 rows/s, one expert's stream 1/10 s: about 100 rows' worth per streamed expert
    _frozen_rates(share.book, (1000, 1000), nbytes * 10, (1e9, 1e9))
    counts = torch.bincount(ids.flatten(), minlength=E).tolist()
    want = plan_split(counts, (1000, 1000), nbytes * 10, (1e9, 1e9), nbytes)
    assert 0 < len(want) < E
    seen = []
    plan_of = share.plan
    share.plan = lambda ids, experts, counts: seen.append(experts) or plan_of(ids, experts, counts)
    with torch.no_grad():
        y0 = ke.moe_experts(x, ids, w, layer, retain=True, share=share)
    assert seen == [tuple(sorted(want))]  # streamed in id order (streaming_order; nothing was prefetched)
    _frozen_rates(share.book, (1e9, 1e9), 1.0, (1.0, 1.0))  # the planner would now keep everything on the CPU
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y1 = ke.moe_experts(xs, ids, ws, layer, share=share)
    y1.backward(dy)
    assert torch.equal(y0, y1) and seen[1:] == [tuple(want)]  # the recompute's plan: the forward's experts
    ref = reference_with_grads(x, ids, w, *weights, None, dy)
    tol = TOLERANCE["bf16"]
    assert rel_err(y1, ref.y) < tol.y and rel_err(xs.grad, ref.dx) < tol.dx and rel_err(ws.grad, ref.dw) < tol.dw
    assert layer.retained.entries == []


def test_auto_measures_rates_and_keeps_small_calls_on_the_engine():
    """The calls' measurements move the engine and GPU rates off their priors; a call below min_tokens never asks
    the planner; take_totals counts the split calls and resets."""
    gen = torch.Generator().manual_seed(12)
    layer, _ = _layer(6, 32, 24, "bf16", gen)
    share = GpuShare(layer, "auto", "cpu", min_tokens=16, chunk=2)
    # ~13 rows per expert at 1000 rows/s against 10 ms per streamed expert: some experts stream
    share.book.rates = Rates([1000.0, 1000.0], [1e9, 1e9], 3 * share.expert_bytes * 100)
    share_plan.take_totals()
    before = (list(share.book.rates.engine), list(share.book.rates.gpu))
    ids, w = make_routing(40, 6, 2, "uniform", gen)
    x = torch.randn(40, 32, generator=gen).bfloat16().requires_grad_()
    ke.moe_experts(x, ids, w, layer, share=share).float().sum().backward()
    after = (share.book.rates.engine, share.book.rates.gpu)
    assert after[0] != before[0] and after[1] != before[1]
    totals = share_plan.take_totals()
    assert totals["calls"] == 1 and totals["engine_s"] > 0 and totals["gpu_s"] > 0
    assert share_plan.take_totals()["calls"] == 0
    share.choose = lambda *a: pytest.fail("a call below min_tokens reached the planner")
    ke.moe_experts(x[:8].detach(), ids[:8], w[:8], layer, share=share)


def test_split_log_is_rate_limited(monkeypatch, caplog):
    """One line when the mean split moves by an expert or more, at most once per LOG_INTERVAL_S."""
    clock = [1000.0]
    monkeypatch.setattr(share_plan.time, "monotonic", lambda: clock[0])
    book = share_plan.RateBook("test", Rates([1.0, 1.0], [1.0, 1.0], 1.0))
    caplog.set_level("INFO", logger="kt_sft.gpu_share")
    lines = lambda: [r for r in caplog.records if "gpu share auto" in r.getMessage()]  # noqa: E731
    clock[0] += 10
    book.split(3, 30, 60, 8)
    assert len(lines()) == 1 and "3.0 of 8 experts" in lines()[0].getMessage()
    for _ in range(5):
        book.split(5, 50, 60, 8)
    assert len(lines()) == 1  # within the interval
    clock[0] += share_plan.LOG_INTERVAL_S
    book.split(5, 50, 60, 8)
    assert len(lines()) == 2
    assert "5.0 of 8 experts on the GPU (83 % of the rows) over the last 6 calls" in lines()[1].getMessage()
    clock[0] += share_plan.LOG_INTERVAL_S
    book.split(5, 50, 60, 8)
    assert len(lines()) == 2  # interval over, but the split moved by less than an expert


def test_auto_and_bad_expert_arguments():
    layer, _ = _layer(4, 32, 32, torch.float32, torch.Generator().manual_seed(13))
    assert GpuShare(layer, "auto", "cpu").fixed is None
    assert GpuShare(layer, [3, 1], "cpu").fixed == (3, 1)
    for bad in ("all", [1, 1], [4], []):
        with pytest.raises(ValueError, match="gpu share: expert"):
            GpuShare(layer, bad, "cpu")


def test_auto_training_matches_the_engine_only_run(tmp_path):
    """A tiny qwen3_moe (fp32 model, bf16 experts: the share takes x in the model's dtype) trained 8 LoRA steps
    with gradient checkpointing, every MoE call split by "auto" on the CPU device (rates pinned so that the busiest
    experts of each call go to the share): every step's loss within the bf16 bounds of the engine-only run
    (tests/test_offload_parity.py, BF16_LOSS_*), and the splits did vary."""
    import statistics

    import kt_sft
    from lora_train import lora_run, make_batches
    from tiny_models import make_tiny_checkpoint

    make_tiny_checkpoint("qwen3_moe", tmp_path)

    def run(auto: bool):
        model = kt_sft.load_model(tmp_path, device="cpu", dtype=torch.float32, format="bf16", progress=False)
        chosen = []
        for module in model.modules():
            if hasattr(module, "kt_layer") and auto:
                share = GpuShare(module.kt_layer, "auto", "cpu", min_tokens=1, chunk=3)
                # ~6 rows per expert and call: one streamed expert costs about as much as 6 engine rows
                _frozen_rates(share.book, (1000, 1000), 3 * share.expert_bytes * 1000 / 6, (1e9, 1e9))
                choose = share.choose
                share.choose = lambda *a, _c=choose, **kw: chosen.append(_c(*a, **kw)) or chosen[-1]
                module.kt_policy = dataclasses.replace(module.kt_policy, share=share)
        losses = lora_run(model, "qwen3_moe", make_batches(8), gradient_checkpointing={"use_reentrant": False}).losses
        return losses, chosen

    ref, _ = run(False)
    got, chosen = run(True)
    assert len(set(chosen)) > 3 and all(0 < len(c) < 8 for c in chosen), chosen
    dev = [abs(a - b) / abs(b) for a, b in zip(got, ref)]
    print(f"[auto share] loss rel dev median {statistics.median(dev):.1e} max {max(dev):.1e}, {len(chosen)} splits")
    assert statistics.median(dev) <= 1e-3 and max(dev) <= 3e-2, dev


@pytest.mark.parametrize("fmt", ["int8", "fp8", "int4", "int4-gemm"])
def test_streamed_scales_match_the_reference(fmt, monkeypatch):
    """Scale grids above RESIDENT_SCALES_BYTES (int4 groups of a large layer) travel with their experts' panels,
    gathered run by run like them: the same reference as resident scales, for an expert set cut into runs."""
    import kt_sft.engine.gpu_share as gs

    monkeypatch.setattr(gs, "RESIDENT_SCALES_BYTES", 0)
    case = make_case(Shape(7, 40, 24, 30, 3, "skewed", 3, 2), fmt, True)
    for device in SHARE_DEVICES:
        share = GpuShare(case_layer(case), (5, 0, 2, 3), device, chunk=3)
        assert share.resident is None and min(share.scale_bytes) > 0
        check_layer(dataclasses.replace(case, share=(device, (5, 0, 2, 3), 3)), f"streamed scales on {device}")

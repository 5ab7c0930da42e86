"""Loading paths and bad input: every mistake is a Python exception naming the argument and what was expected."""
import os
import subprocess
import sys

import pytest
import torch

import kt_sft.engine as ke
from moe_reference import make_experts, make_routing

E, H, I = 4, 40, 24


@pytest.fixture
def experts():
    return make_experts(E, H, I, torch.Generator().manual_seed(0), torch.bfloat16)


@pytest.fixture
def layer(experts):
    gate, up, down = experts
    lay = ke.ExpertLayer(E, H, I, "bf16")
    lay.load_fused(torch.cat([gate, up], dim=1), down)
    return lay


def _routing(T=5, k=2):
    return make_routing(T, E, k, "uniform", torch.Generator().manual_seed(1))


# ---------------------------------------------------------------- loading
def test_per_expert_fused_and_fp16_sources_pack_identically(experts):
    """Hub per-expert tensors, transformers' fused 3-D tensors and an fp16 copy give bit-identical layers."""
    gate, up, down = experts
    per_expert = ke.ExpertLayer(E, H, I)
    for e in range(E):
        per_expert.load_expert(e, gate[e], up[e], down[e])
    fused = ke.ExpertLayer.from_fused(torch.cat([gate, up], dim=1), down)
    half = ke.ExpertLayer.from_fused(torch.cat([gate, up], dim=1).half(), down.half())
    ids, w = _routing()
    x = torch.randn(5, H).bfloat16()
    y1, y2 = per_expert.forward(x, ids, w)[0], fused.forward(x, ids, w)[0]
    assert torch.equal(y1, y2)
    # fp16 -> bf16 rounds differently from the original bf16 values, but only at bf16 precision
    assert torch.allclose(half.forward(x, ids, w)[0].float(), y1.float(), rtol=2e-2, atol=2e-2)


def test_transposed_source_via_strides(experts):
    """A checkpoint storing W^T (e.g. [E, H, I] for gate) loads from a transposed view, no copy needed."""
    gate, up, down = experts
    ref = ke.ExpertLayer.from_fused(torch.cat([gate, up], dim=1), down)
    lay = ke.ExpertLayer(E, H, I)
    lay.set_projection("gate", gate.transpose(1, 2).contiguous().transpose(1, 2))
    lay.set_projection("up", up.transpose(1, 2).contiguous().transpose(1, 2))
    lay.set_projection("down", down)
    ids, w = _routing()
    x = torch.randn(5, H).bfloat16()
    assert torch.equal(lay.forward(x, ids, w)[0], ref.forward(x, ids, w)[0])


def test_nan_weight_names_the_expert(experts):
    gate, up, down = experts
    bad = down.clone()
    bad[2, 3, 4] = float("nan")
    lay = ke.ExpertLayer(E, H, I)
    with pytest.raises(ValueError, match="down weights of expert 2"):
        lay.set_projection("down", bad)


def test_forward_before_every_weight_is_loaded(experts):
    gate, up, _ = experts
    lay = ke.ExpertLayer(E, H, I)
    lay.set_projection("gate", gate)
    lay.set_projection("up", up)
    ids, w = _routing()
    with pytest.raises(RuntimeError, match="never loaded for expert 0 down"):
        lay.forward(torch.zeros(5, H).bfloat16(), ids, w)
    assert lay.missing_weights()[0] == "expert 0 down" and len(lay.missing_weights()) == E


@pytest.mark.parametrize("which, shape, match", [
    ("gate", (E, H, I), r"gate weight: expected shape \[\*, 24, 40\]"),
    ("down", (E, I, H), r"down weight: expected shape \[\*, 40, 24\]"),
    ("router", (E, I, H), "which='router'"),
])
def test_wrong_weight_shape_or_name(which, shape, match):
    with pytest.raises(ValueError, match=match):
        ke.ExpertLayer(E, H, I).set_projection(which, torch.zeros(shape))


def test_expert_range_checked():
    with pytest.raises(ValueError, match=r"experts \[3, 5\) are outside \[0, 4\)"):
        ke.ExpertLayer(E, H, I).set_projection("gate", torch.zeros(2, I, H), expert_begin=3)


def test_bad_layer_arguments():
    with pytest.raises(ValueError, match="expert format 'float16' is not one of"):
        ke.ExpertLayer(E, H, I, "float16")
    with pytest.raises(ValueError, match="expert activation 'gelu' is not one of silu_glu, "):
        ke.ExpertLayer(E, H, I, activation="gelu")
    with pytest.raises(ValueError, match="must be >= 1"):
        ke.ExpertLayer(0, H, I)


# ---------------------------------------------------------------- compute inputs
@pytest.mark.parametrize("arg, make, err, match", [
    ("x", lambda x, i, w: (x.float(), i, w), TypeError, "x: expected dtype bfloat16, got float32"),
    ("x", lambda x, i, w: (x[:, :-1].contiguous(), i, w), ValueError, r"x: expected shape \[\*, 40\]"),
    ("x", lambda x, i, w: (torch.zeros(H, 5).bfloat16().T, i, w), ValueError, "x: expected a contiguous tensor"),
    ("x", lambda x, i, w: (x.to("meta"), i, w), ValueError, "x: expected a CPU tensor, got one on meta"),
    ("ids", lambda x, i, w: (x, i.int(), w), TypeError, "topk_ids: expected dtype int64, got int32"),
    ("ids", lambda x, i, w: (x, i[:3], w), ValueError, r"topk_ids: expected shape \[5, \*\]"),
    ("ids", lambda x, i, w: (x, i.fill_(-2), w), ValueError, r"topk_ids\[0\]\[0\] = -2 is outside \[0, 4\)"),
    ("ids", lambda x, i, w: (x, i.fill_(E), w), ValueError, r"topk_ids\[0\]\[0\] = 4 is outside \[0, 4\)"),
    ("w", lambda x, i, w: (x, i, w.double()), TypeError, "topk_weights: expected dtype float32, got float64"),
    ("w", lambda x, i, w: (x, i, w[:, :1].contiguous()), ValueError, r"topk_weights: expected shape \[5, 2\]"),
    ("w", lambda x, i, w: (x, i, "0.5"), TypeError, "topk_weights: expected a torch.Tensor, got str"),
])
def test_forward_rejects(layer, arg, make, err, match):
    ids, w = _routing()
    x = torch.randn(5, H).bfloat16()
    with pytest.raises(err, match=match):
        layer.forward(*make(x, ids.clone(), w))


def test_backward_checks_dy_and_handle(layer):
    ids, w = _routing()
    x = torch.randn(5, H).bfloat16()
    _, handle = layer.forward(x, ids, w, save_for_backward=True)
    with pytest.raises(ValueError, match=r"dy: expected shape \[5, 40\], got \[4, 40\]"):
        layer.backward(handle, torch.zeros(4, H).bfloat16())
    layer.backward(handle, torch.zeros(5, H).bfloat16())
    with pytest.raises(RuntimeError, match="backward already ran"):
        layer.backward(handle, torch.zeros(5, H).bfloat16())
    _, no_save = layer.forward(x, ids, w, save_for_backward=False)
    with pytest.raises(RuntimeError, match="saved by this forward are gone"):
        layer.backward(no_save, torch.zeros(5, H).bfloat16())


def test_saved_slots_are_bounded_and_evict_oldest(experts):
    gate, up, down = experts
    lay = ke.ExpertLayer(E, H, I, max_saved=2)
    lay.load_fused(torch.cat([gate, up], dim=1), down)
    ids, w = _routing()
    x = torch.randn(5, H).bfloat16()
    handles = [lay.forward(x, ids, w, save_for_backward=True)[1] for _ in range(3)]
    with pytest.raises(RuntimeError, match="max_saved=2"):
        lay.backward(handles[0], torch.zeros(5, H).bfloat16())
    for h in handles[1:]:
        lay.backward(h, torch.zeros(5, H).bfloat16())
    held = lay.saved_bytes
    for _ in range(5):  # buffers are reused, not reallocated per call
        lay.backward(lay.forward(x, ids, w, save_for_backward=True)[1], torch.zeros(5, H).bfloat16())
    assert lay.saved_bytes == held


# ---------------------------------------------------------------- ISA selection
def test_unknown_isa_name():
    with pytest.raises(ValueError, match="expected one of scalar, avx2, avx512, amx"):
        ke.select_isa("neon")


def test_forcing_an_unsupported_isa_raises():
    missing = [isa for isa in ("avx2", "avx512", "amx") if not ke.isa_supported(isa)[0]]
    if not missing:
        pytest.skip("this CPU runs every path")
    with pytest.raises(RuntimeError, match=f"ISA '{missing[-1]}' cannot run on this CPU"):
        ke.select_isa(missing[-1])


@pytest.mark.slow  # a fresh interpreter per value
@pytest.mark.parametrize("value, expect", [("scalar", "isa chosen: scalar"), ("bogus", "unknown ISA 'bogus'"),
                                           ("avx2", "isa chosen: avx2")])
def test_kt_sft_isa_environment_variable(value, expect):
    if value == "avx2" and not ke.isa_supported("avx2")[0]:
        pytest.skip("no avx2 here")
    env = dict(os.environ, KT_SFT_ISA=value, KT_SFT_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "kt_sft", "env"], env=env, capture_output=True, text=True, check=True)
    assert expect in out.stdout
    assert "threads: 1" in out.stdout or "isa chosen: none" in out.stdout


def test_cpu_flags_match_proc_cpuinfo():
    """CPUID decoding agrees with the kernel's own view of the CPU flags."""
    try:
        flags = set(next(l for l in open("/proc/cpuinfo") if l.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo")
    ours = ke.cpu_info()["flags"]
    for name in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512vbmi", "amx_tile",
                 "amx_bf16"):
        assert ours[name] == (name in flags), name


# ---------------------------------------------------------------- worker spin
@pytest.mark.skipif("KT_SFT_SPIN_US" in os.environ, reason="KT_SFT_SPIN_US fixes the spin")
def test_worker_spin_stays_short_for_cpu_training_and_is_settable(layer):
    """moe_experts keeps the short spin when training on CPU tensors (torch needs the cores between calls);
    set_worker_spin_us sets it (csrc/thread_pool.h)."""
    ids, w = _routing()
    ke.set_worker_spin_us(7)
    assert ke.worker_spin_us() == 7
    x = torch.randn(5, H).bfloat16().requires_grad_(True)
    ke.moe_experts(x, ids, w, layer).float().sum().backward()
    assert x.grad is not None and ke.worker_spin_us() == 100
    with pytest.raises(ValueError, match="worker spin must be >= 0"):
        ke.set_worker_spin_us(-1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.skipif("KT_SFT_SPIN_US" in os.environ, reason="KT_SFT_SPIN_US fixes the spin")
def test_worker_spin_is_long_while_training_on_a_gpu(layer):
    ids, w = _routing()
    x = torch.randn(5, H, device="cuda").bfloat16().requires_grad_(True)
    y = ke.moe_experts(x, ids.cuda(), w.cuda(), layer)
    assert ke.worker_spin_us() == 20000
    with torch.no_grad():
        ke.moe_experts(x, ids.cuda(), w.cuda(), layer)
    assert ke.worker_spin_us() == 100
    y.float().sum().backward()
    assert ke.worker_spin_us() == 20000


@pytest.mark.slow  # a fresh interpreter
def test_kt_sft_spin_us_environment_variable_fixes_the_spin():
    code = "import kt_sft.engine as ke; ke.set_worker_spin_us(20000); print('spin', ke.worker_spin_us())"
    env = dict(os.environ, KT_SFT_SPIN_US="0", KT_SFT_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "spin 0" in out.stdout

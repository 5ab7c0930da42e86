"""Plain-PyTorch fp32 reference for the routed experts (the definition every engine path is tested against).

y_t = sum_j w_tj * down_e(silu(gate_e x_t) * up_e x_t),  e = topk_ids[t, j]
Backward comes from autograd on this code: d x and d topk_weights (dw_tj = <dy_t, expert_out_tj>); with LoRA,
tests/expert_lora_reference.py, and the engine tester's per-format references, tests/engine_cases.py.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def moe_reference(x, gate, up, down, topk_ids, topk_weights):
    """x [T, H], gate/up [E, I, H], down [E, H, I], topk_ids [T, k], topk_weights [T, k] -> y [T, H]."""
    y = torch.zeros_like(x)
    for e in range(gate.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        h = x[tok]
        out = (F.silu(h @ gate[e].T) * (h @ up[e].T)) @ down[e].T
        y = y.index_add(0, tok, out * topk_weights[tok, slot, None])
    return y


def make_routing(T: int, E: int, k: int, pattern: str, gen: torch.Generator):
    """topk_ids [T, k] (distinct experts per token) and softmax-normalised topk_weights [T, k] fp32."""
    if pattern == "one_expert":
        ids = torch.arange(k).repeat(T, 1) + 1  # every token on experts 1..k
    else:
        scores = torch.randn(T, E, generator=gen)
        if pattern == "skewed":
            scores[:, 0] += 4.0  # expert 0 gets almost every token, the others a few
            scores[:, 1] += 2.0
        ids = scores.topk(k, dim=-1).indices
    w = torch.softmax(torch.randn(T, k, generator=gen), dim=-1)
    return ids.long().contiguous(), w.float().contiguous()


def make_experts(E: int, H: int, I: int, gen: torch.Generator, dtype=torch.float32):
    """Random gate/up [E, I, H] and down [E, H, I], rounded to `dtype` then held in fp32 for the reference."""
    gate = torch.randn(E, I, H, generator=gen) * H ** -0.5
    up = torch.randn(E, I, H, generator=gen) * H ** -0.5
    down = torch.randn(E, H, I, generator=gen) * I ** -0.5
    return tuple(t.to(dtype).float() for t in (gate, up, down))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||; NaN anywhere fails."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()

"""Argument checks for everything that crosses into the C++ engine as a raw pointer.

The engine trusts pointers and sizes blindly, so each check names the argument and the expected value.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

SOURCE_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


def check_tensor(
    name: str,
    t: object,
    *,
    dtype: torch.dtype | Sequence[torch.dtype],
    shape: Sequence[int | None],
    contiguous: bool = True,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless `t` is a CPU tensor of that dtype and shape (None = any size)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtypes = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor, got one on {t.device} (the engine reads host memory)")
    if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (call .contiguous() first)")
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{name}: negative strides are not supported")
    return t


_LORA_FIELDS = (("A_gu", "B_gu", "scale_gu", "gate_up"), ("A_d", "B_d", "scale_d", "down"))


def check_lora(lora: object, num_experts: int, hidden: int, intermediate: int, gated: bool = True) -> tuple[int, int]:
    """Validate an `ExpertLoRA` for a layer of (E, H, I); returns the ranks (r_gu, r_d).

    Each factor must be a contiguous fp32 CPU tensor in PEFT's flat layout: A_gu [r_gu*E, 2I] (ungated experts:
    [r_gu*E, I], on up_proj), B_gu [H, r_gu*E], A_d [r_d*E, H], B_d [I, r_d*E]; the two projections may have
    different ranks, and a projection may be left out (both of its factors None), but not both.
    """
    from .lora import ExpertLoRA

    if not isinstance(lora, ExpertLoRA):
        raise TypeError(f"lora: expected kt_sft.engine.ExpertLoRA, got {type(lora).__name__}")
    E, H, I = num_experts, hidden, intermediate
    dims = {"gate_up": ((2 if gated else 1) * I, H), "down": (H, I)}  # (A columns = output dim, B rows = input dim)
    ranks = []
    for a_name, b_name, s_name, proj in _LORA_FIELDS:
        A, B = getattr(lora, a_name), getattr(lora, b_name)
        if A is None and B is None:
            ranks.append(0)
            continue
        if A is None or B is None:
            missing = a_name if A is None else b_name
            raise ValueError(f"lora.{missing}: is None but the other {proj} factor is given (give both or neither)")
        out_dim, in_dim = dims[proj]
        check_tensor(f"lora.{b_name}", B, dtype=torch.float32, shape=(in_dim, None))
        if B.shape[1] == 0 or B.shape[1] % E:
            raise ValueError(f"lora.{b_name}: expected shape [{in_dim}, r*{E}] (r >= 1, {E} experts), "
                             f"got {list(B.shape)}")
        r = B.shape[1] // E
        check_tensor(f"lora.{a_name}", A, dtype=torch.float32, shape=(r * E, out_dim))
        scale = getattr(lora, s_name)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
            raise TypeError(f"lora.{s_name}: expected a finite float, got {scale!r}")
        ranks.append(r)
    if ranks == [0, 0]:
        raise ValueError("lora: no factors given (pass lora=None for the frozen experts)")
    return ranks[0], ranks[1]

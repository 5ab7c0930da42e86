"""Argument checks for everything that crosses into the C++ engine as a raw pointer.

The engine trusts pointers and sizes blindly, so each check names the argument and the expected value.
"""
from __future__ import annotations

from typing import Sequence

import torch

ENGINE_DTYPES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}
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


def dtype_name(dtype: torch.dtype, allowed: dict) -> str:
    if dtype not in allowed:
        want = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"dtype {str(dtype).replace('torch.', '')} is not supported here (expected {want})")
    return allowed[dtype]

"""The expert activations: what a layer's experts compute between their two projections, one row per activation.

Each row is the twin of a row of csrc/activations.h (`code`: its `_engine.Activation` member): the function
(`fn`: swish x * sigmoid(alpha x), gelu_tanh, relu2), whether the experts are gated (gate and up projections,
h = act(gate) * up) or not (one up projection, h = act(up)), and its constants: `alpha`, `limit` (gated: the gate
clamped to <= limit and up to [-limit, limit] first; None: no clamp; `takes_limit` rows take a layer's own, e.g.
DeepSeek-V4's swiglu_limit) and `up_shift` (h = act(gate) * (up + up_shift), gpt-oss's + 1).

`ExpertLayer(..., activation=...)` takes a row or its name; the model side (kt_sft.models.experts_math) maps each
family's probed math to a row. `row(gate, up)` is the row's math in torch, what the GPU share computes with
(gpu_share.py); the engine tests keep their own references.

A new activation = one row here + its `Activation` value and row in csrc/activations.h (+ its function in
kernels/moe_common.inc's act_fn16, when it is a new one).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .. import _engine


@dataclass(frozen=True)
class ExpertActivation:
    name: str                # the row's name (= the _engine.Activation member's)
    code: object             # _engine.Activation value
    fn: str                  # "swish", "gelu_tanh" or "relu2"
    gated: bool              # gate and up projections (True) or up alone (False)
    label: str               # how errors, the summary and the families table name it
    alpha: float = 1.0       # swish: x * sigmoid(alpha * x)
    limit: Optional[float] = None  # gated: gate <= limit, up in [-limit, limit] before the activation; None: none
    up_shift: float = 0.0    # gated: act(gate) * (up + up_shift)
    takes_limit: bool = False  # a layer may give its own limit (`with_limit`); required where the row has none

    def with_limit(self, limit: Optional[float]) -> "ExpertActivation":
        """This row with a layer's clamp limit (None: the row's own)."""
        if limit is None:
            if self.takes_limit and self.limit is None:
                raise ValueError(f"activation {self.name} needs a clamp limit (e.g. the config's swiglu_limit)")
            return self
        if not self.takes_limit:
            raise ValueError(f"activation {self.name} takes no clamp limit (got {limit!r})")
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
            raise ValueError(f"activation {self.name}: the clamp limit must be a finite number > 0, got {limit!r}")
        limit = float(limit)
        if limit == self.limit:
            return self
        return dataclasses.replace(self, limit=limit, label=_label(self.name, limit))

    def __call__(self, gate: Optional[torch.Tensor], up: torch.Tensor) -> torch.Tensor:
        """h from the pre-activations in torch (gate None for an ungated row)."""
        if not self.gated:
            return F.relu(up).square()
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        if self.fn == "gelu_tanh":
            act = F.gelu(gate, approximate="tanh")
        else:
            act = F.silu(gate) if self.alpha == 1.0 else gate * torch.sigmoid(self.alpha * gate)
        return act * (up + self.up_shift if self.up_shift else up)

    def __str__(self) -> str:
        return self.name


def _label(name: str, limit: Optional[float] = None) -> str:
    if name == "silu_glu_clamped":
        return f"clamped silu glu (limit {limit:g})" if limit is not None else "clamped silu glu"
    if name == "gpt_oss_swiglu":
        return f"gpt-oss clamped swiglu (alpha 1.702, limit {7.0 if limit is None else limit:g}, up + 1)"
    return {"silu_glu": "silu glu", "gelu_tanh_glu": "gelu-tanh glu", "relu2": "relu2 ungated"}[name]


_A = _engine.Activation
ACTIVATIONS: dict[str, ExpertActivation] = {a.name: a for a in (
    ExpertActivation("silu_glu", _A.silu_glu, "swish", True, _label("silu_glu")),
    ExpertActivation("silu_glu_clamped", _A.silu_glu_clamped, "swish", True, _label("silu_glu_clamped"),
                     takes_limit=True),
    ExpertActivation("gpt_oss_swiglu", _A.gpt_oss_swiglu, "swish", True, _label("gpt_oss_swiglu"), alpha=1.702,
                     limit=7.0, up_shift=1.0, takes_limit=True),
    ExpertActivation("gelu_tanh_glu", _A.gelu_tanh_glu, "gelu_tanh", True, _label("gelu_tanh_glu")),
    ExpertActivation("relu2", _A.relu2, "relu2", False, _label("relu2")),
)}
assert set(ACTIVATIONS) == set(_A.__members__), "csrc/activations.h and this table must have the same rows"

# Names older code used for the same rows.
_ALIASES = {"silu": "silu_glu"}

ActivationLike = Union[ExpertActivation, str]


def get_activation(activation: ActivationLike, limit: Optional[float] = None) -> ExpertActivation:
    """The row for an activation or its name, with the layer's clamp `limit` where given (`with_limit`)."""
    if isinstance(activation, ExpertActivation):
        row = activation
    elif isinstance(activation, str) and _ALIASES.get(activation, activation) in ACTIVATIONS:
        row = ACTIVATIONS[_ALIASES.get(activation, activation)]
    else:
        raise ValueError(f"expert activation {activation!r} is not one of {', '.join(ACTIVATIONS)}")
    return row.with_limit(limit)

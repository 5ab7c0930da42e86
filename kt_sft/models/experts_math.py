"""What an experts module computes between its two projections, one row per known variant, and the probe that finds
which row a module's own code matches.

transformers' experts implementations (`batched_mm` / `grouped_mm` in transformers.integrations.moe) run
`down(gate(x))` around one per-module step: `module._apply_gate(gate_up_out)` for gated experts (default: split in
[gate | up] halves, `act_fn(gate) * up`; gpt-oss overrides it), `module.act_fn(up_out)` for ungated ones. The probe
calls that step on a fixed tensor and compares the result with each row's plain-torch formula, so the variant comes
from the model's own code (an activation fixed in code, a config's `hidden_act`, a custom `_apply_gate`), never
from a name. `engine=True` marks the rows the CPU engine computes today; the others are named in the refusal so
the next one to add is known (kt_sft.models.catalog lists which families need which).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F


def _halves(fn: Callable) -> Callable:
    """A gated variant on [gate | up] halves (transformers' default `_apply_gate`): fn(gate) * up."""
    def gate(x: torch.Tensor) -> torch.Tensor:
        g, u = x.chunk(2, dim=-1)
        return fn(g) * u
    return gate


def _gpt_oss_swiglu(x: torch.Tensor, limit: float = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss: gate / up interleaved (even / odd columns), gate clamped above, up clamped both ways, (up + 1)."""
    g, u = x[..., ::2].clamp(max=limit), x[..., 1::2].clamp(-limit, limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


@dataclass(frozen=True)
class ExpertsMath:
    activation: str                 # the registry's `activation` name
    gated: bool                     # [gate | up] projection pair (True) or one up projection (False)
    label: str                      # how errors and the families table name it
    engine: bool                    # the CPU engine computes it today
    fn: Callable[[torch.Tensor], torch.Tensor]  # gate_up_out [T, 2I] -> [T, I] (gated); up_out -> [T, I] (ungated)
    interleaved: bool = False       # gate / up rows of gate_up_proj alternate (gpt-oss) instead of [gate | up] halves


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


VARIANTS: tuple[ExpertsMath, ...] = (
    ExpertsMath("silu", True, "silu glu", True, _halves(F.silu)),
    ExpertsMath("gelu_tanh", True, "gelu-tanh glu", False, _halves(_gelu_tanh)),
    ExpertsMath("gelu", True, "gelu glu", False, _halves(F.gelu)),
    ExpertsMath("relu", True, "relu glu", False, _halves(F.relu)),
    ExpertsMath("gpt_oss_swiglu", True, "gpt-oss clamped swiglu (interleaved gate/up, limit 7, alpha 1.702, up + 1)",
                False, _gpt_oss_swiglu, interleaved=True),
    ExpertsMath("relu2", False, "relu2 ungated", False, _relu2),
    ExpertsMath("silu", False, "silu ungated", False, F.silu),
    ExpertsMath("gelu", False, "gelu ungated", False, F.gelu),
    ExpertsMath("gelu_tanh", False, "gelu-tanh ungated", False, _gelu_tanh),
    ExpertsMath("relu", False, "relu ungated", False, F.relu),
)
ENGINE_LABELS = " / ".join(v.label for v in VARIANTS if v.engine)
# Names a family file may use for a variant's activation (config.json's hidden_act spellings).
ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def variant(activation: str, gated: bool) -> ExpertsMath:
    """The row for a family file's `activation` / `gated`; ValueError listing the known ones."""
    name = ALIASES.get(activation, activation)
    for row in VARIANTS:
        if row.activation == name and row.gated == gated:
            return row
    known = ", ".join(f"{r.activation} ({'gated' if r.gated else 'ungated'})" for r in VARIANTS)
    raise ValueError(f"unknown experts math activation={activation!r}, gated={gated} (known: {known})")


def _probe_input(width: int = 24) -> torch.Tensor:
    """Fixed values over [-10, 10] (beyond gpt-oss's clamp limit of 7 on both sides), one row exactly zero."""
    x = torch.randn(6, width, generator=torch.Generator().manual_seed(20), dtype=torch.float32) * 4
    x[0] = torch.linspace(-10, 10, width)
    x[1] = 0
    return x


def probe(module: torch.nn.Module) -> Union[ExpertsMath, str]:
    """The variant the experts `module` (a transformers @use_experts_implementation module) computes, found by
    calling its own `_apply_gate` (gated) or `act_fn` (ungated) on a probe tensor; a description string when no
    row matches (or the call fails, e.g. an activation with parameters on the meta device)."""
    gated = bool(getattr(module, "has_gate", True))
    x = _probe_input()
    try:
        with torch.no_grad():
            out = module._apply_gate(x) if gated else module.act_fn(x)
    except Exception as err:  # the module's own code: any failure means "not one of ours"
        return f"{'gate' if gated else 'activation'} of {type(module).__name__} could not be probed ({err})"
    for row in VARIANTS:
        if row.gated != gated:
            continue
        want = row.fn(x)
        if out.shape == want.shape and torch.allclose(out.float(), want, rtol=1e-5, atol=1e-6):
            return row
    act = getattr(module, "act_fn", None)
    return (f"{'custom gate' if gated else 'activation'} of {type(module).__name__} "
            f"(act_fn {type(act).__name__ if act is not None else 'none'}) matches no known variant")


def label(math: Union[ExpertsMath, str], bias: bool = False) -> str:
    text = math.label if isinstance(math, ExpertsMath) else "unrecognized"
    return text + (" + biases" if bias else "")


def engine_gap(math: Union[ExpertsMath, str], bias: bool, transposed: bool) -> Optional[str]:
    """Why the engine cannot run experts of this math / layout (None: it can), e.g. "experts math 'relu2 ungated'
    not supported yet"."""
    missing = []
    if not isinstance(math, ExpertsMath):
        missing.append(f"experts math '{math}'")
    elif not math.engine:
        missing.append(f"experts math '{math.label}'")
    if bias:
        missing.append("expert biases")
    if transposed:
        missing.append("transposed expert weights (gate_up_proj [E, H, 2I])")
    if not missing:
        return None
    return f"{', '.join(missing)} not supported yet (the CPU engine runs {ENGINE_LABELS} experts without biases)"

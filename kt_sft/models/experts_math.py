"""What an experts module computes between its two projections, one row per known variant, and the probe that finds
which row a module's own code matches.

transformers' experts implementations (`batched_mm` / `grouped_mm` in transformers.integrations.moe) run
`down(gate(x))` around one per-module step: `module._apply_gate(gate_up_out)` for gated experts (default: split in
[gate | up] halves, `act_fn(gate) * up`; gpt-oss and DeepSeek-V4 override it), `module.act_fn(up_out)` for ungated
ones. The probe calls that step on a fixed tensor and compares the result with each row's plain-torch formula, so the
variant comes from the model's own code (an activation fixed in code, a config's `hidden_act`, a custom
`_apply_gate`, its clamp `limit`), never from a name. `engine` names the CPU engine's activation row a variant runs
as (kt_sft/engine/activations.py); the others are named in the refusal so the next one to add is known
(kt_sft.models.catalog lists which families need which).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F


def _halves(fn: Callable) -> Callable:
    """A gated variant on [gate | up] halves (transformers' default `_apply_gate`): fn(gate) * up."""
    def gate(x: torch.Tensor, limit: Optional[float] = None) -> torch.Tensor:
        g, u = x.chunk(2, dim=-1)
        return fn(g) * u
    return gate


def _clamped_silu(x: torch.Tensor, limit: Optional[float] = 10.0) -> torch.Tensor:
    """DeepSeek-V4 / GLM-5 style: [gate | up] halves, gate clamped above, up both ways, silu(gate) * up."""
    g, u = x.chunk(2, dim=-1)
    return F.silu(g.clamp(max=limit)) * u.clamp(-limit, limit)


def _gpt_oss_swiglu(x: torch.Tensor, limit: Optional[float] = 7.0, alpha: float = 1.702) -> torch.Tensor:
    """gpt-oss: gate / up interleaved (even / odd columns), gate clamped above, up clamped both ways, (up + 1)."""
    g, u = x[..., ::2].clamp(max=limit), x[..., 1::2].clamp(-limit, limit)
    return (u + 1) * g * torch.sigmoid(alpha * g)


@dataclass(frozen=True)
class ExpertsMath:
    activation: str                 # the registry's `activation` name
    gated: bool                     # [gate | up] projection pair (True) or one up projection (False)
    label: str                      # how errors and the families table name it
    engine: Optional[str]           # the engine activation it runs as (kt_sft.engine.activations), None: not yet
    fn: Callable                    # (gate_up_out [T, 2I] or up_out [T, I], limit) -> [T, I]
    interleaved: bool = False       # gate / up alternate in the fused gate_up columns (gpt-oss) instead of halves
    limit: Optional[float] = None   # the clamp limit of a clamped row (its default until a module's is probed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.limit) if self.limit is not None else self.fn(x)

    def with_limit(self, limit: Optional[float]) -> "ExpertsMath":
        """This row with a module's own clamp limit (rows with a limit only)."""
        if self.limit is None or limit is None or float(limit) == self.limit:
            return self
        return dataclasses.replace(self, limit=float(limit), label=self.label.replace(f"limit {self.limit:g}",
                                                                                       f"limit {float(limit):g}"))


def _relu2(x: torch.Tensor, limit: Optional[float] = None) -> torch.Tensor:
    return F.relu(x).square()


def _gelu_tanh(x: torch.Tensor, limit: Optional[float] = None) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _plain(fn: Callable) -> Callable:
    return lambda x, limit=None: fn(x)


VARIANTS: tuple[ExpertsMath, ...] = (
    ExpertsMath("silu", True, "silu glu", "silu_glu", _halves(F.silu)),
    ExpertsMath("silu_clamped", True, "clamped silu glu (limit 10)", "silu_glu_clamped", _clamped_silu, limit=10.0),
    ExpertsMath("gelu_tanh", True, "gelu-tanh glu", "gelu_tanh_glu", _halves(_gelu_tanh)),
    ExpertsMath("gelu", True, "gelu glu", None, _halves(F.gelu)),
    ExpertsMath("relu", True, "relu glu", None, _halves(F.relu)),
    ExpertsMath("gpt_oss_swiglu", True, "gpt-oss clamped swiglu (interleaved gate/up, limit 7, alpha 1.702, up + 1)",
                "gpt_oss_swiglu", _gpt_oss_swiglu, interleaved=True, limit=7.0),
    ExpertsMath("relu2", False, "relu2 ungated", "relu2", _relu2),
    ExpertsMath("silu", False, "silu ungated", None, _plain(F.silu)),
    ExpertsMath("gelu", False, "gelu ungated", None, _plain(F.gelu)),
    ExpertsMath("gelu_tanh", False, "gelu-tanh ungated", None, _gelu_tanh),
    ExpertsMath("relu", False, "relu ungated", None, _plain(F.relu)),
)
ENGINE_LABELS = " / ".join(v.label.split(" (")[0] for v in VARIANTS if v.engine)
# Names a family file may use for a variant's activation (config.json's hidden_act spellings).
ALIASES = {"swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}


def variant(activation: str, gated: bool, limit: Optional[float] = None) -> ExpertsMath:
    """The row for a family file's `activation` / `gated` (and clamp `limit`); ValueError listing the known ones."""
    name = ALIASES.get(activation, activation)
    for row in VARIANTS:
        if row.activation == name and row.gated == gated:
            if limit is not None and row.limit is None:
                raise ValueError(f"experts math activation={activation!r} takes no limit (got {limit!r})")
            return row.with_limit(limit)
    known = ", ".join(f"{r.activation} ({'gated' if r.gated else 'ungated'})" for r in VARIANTS)
    raise ValueError(f"unknown experts math activation={activation!r}, gated={gated} (known: {known})")


def _probe_input(width: int = 24) -> torch.Tensor:
    """Fixed values over [-10, 10] (beyond gpt-oss's clamp limit of 7 on both sides), one row exactly zero."""
    x = torch.randn(6, width, generator=torch.Generator().manual_seed(20), dtype=torch.float32) * 4
    x[0] = torch.linspace(-10, 10, width)
    x[1] = 0
    return x


def module_limit(module: torch.nn.Module) -> Optional[float]:
    """The clamp limit an experts module keeps (gpt-oss's and DeepSeek-V4's `limit`), or None."""
    limit = getattr(module, "limit", None)
    if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit <= 0:
        return None
    return float(limit)


def probe(module: torch.nn.Module) -> Union[ExpertsMath, str]:
    """The variant the experts `module` (a transformers @use_experts_implementation module) computes, found by
    calling its own `_apply_gate` (gated) or `act_fn` (ungated) on a probe tensor reaching past the module's clamp
    limit, if it has one (clamped rows take it); a description string when no row matches (or the call fails, e.g.
    an activation with parameters on the meta device)."""
    gated = bool(getattr(module, "has_gate", True))
    limit = module_limit(module)
    x = _probe_input() * max(1.0, 2 * max(limit or 0.0, *(r.limit or 0.0 for r in VARIANTS)) / 10)
    try:
        with torch.no_grad():
            out = module._apply_gate(x) if gated else module.act_fn(x)
    except Exception as err:  # the module's own code: any failure means "not one of ours"
        return f"{'gate' if gated else 'activation'} of {type(module).__name__} could not be probed ({err})"
    for row in VARIANTS:
        if row.gated != gated:
            continue
        row = row.with_limit(limit)
        want = row(x)
        if out.shape == want.shape and torch.allclose(out.float(), want, rtol=1e-5, atol=1e-6):
            return row
    act = getattr(module, "act_fn", None)
    return (f"{'custom gate' if gated else 'activation'} of {type(module).__name__} "
            f"(act_fn {type(act).__name__ if act is not None else 'none'}) matches no known variant")


def label(math: Union[ExpertsMath, str], bias: bool = False) -> str:
    text = math.label if isinstance(math, ExpertsMath) else "unrecognized"
    return text + (" + biases" if bias else "")


def engine_gap(math: Union[ExpertsMath, str]) -> Optional[str]:
    """Why the engine cannot run experts of this math (None: it can), e.g. "experts math 'relu2 ungated' not
    supported yet". Biases and any fused layout (transposed, interleaved) it runs."""
    if isinstance(math, ExpertsMath) and math.engine:
        return None
    name = math.label if isinstance(math, ExpertsMath) else math
    return f"experts math '{name}' not supported yet (the CPU engine runs {ENGINE_LABELS} experts)"


def engine_activation(math: ExpertsMath):
    """The engine's activation row for a variant it runs, with the variant's limit (kt_sft.engine.activations)."""
    from ..engine.activations import ACTIVATIONS

    row = ACTIVATIONS[math.engine]
    return row.with_limit(math.limit) if row.takes_limit else row

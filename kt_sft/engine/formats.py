"""The expert weight formats: one row per format, the only place a format's properties are written down.

A format says how one MoE layer's frozen experts are stored and multiplied: the element type of the packed panels,
their layout, the scales beside them, the dtype activations flow in, and the GEMM arithmetic. Everything that needs
one of these facts (the `kt_backend` key, `load_model`, `ExpertLayer`, `GpuShare`, the summary line, the
benchmarks) takes an `ExpertFormat` from `FORMATS` and reads it; the C++ engine gets `code`, a value of its
`enum class WeightFormat` (csrc/common.h), whose kernels live in one file per format (csrc/kernels/).

A new format = one row here + its `WeightFormat` value + its kernel file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from .. import _engine

PAD = 32  # the engine pads hidden and intermediate to multiples of this (csrc/common.h kBlock)


@dataclass(frozen=True)
class ExpertFormat:
    name: str                     # the format's own name (family files' defaults.format, benchmarks)
    code: object                  # _engine.WeightFormat value
    backends: tuple               # LLaMA-Factory kt_backend names that select it
    compute_dtype: torch.dtype    # activations in and out of the engine (x, y, dx, dy)
    weight_dtype: torch.dtype     # element type of the packed panels
    panel: str                    # panel layout (csrc/common.h): "f32" [k][n], "pairs" [k/2][n][2], "quads" [k/4][n][4]
    scales: str                   # "none" or "channel" (one fp32 multiplier per output channel)
    label: str                    # how the summary line names it
    fast_isas: tuple              # ISA paths with a tuned kernel; elsewhere it runs correct plain loops
    doc: str                      # one line for kt_backend's help

    @property
    def weight_bytes(self) -> int:
        """Bytes per packed weight (the scales come on top: 4 bytes per output channel when quantized)."""
        return self.weight_dtype.itemsize

    @property
    def quantized(self) -> bool:
        return self.scales != "none"

    def packed_bytes(self, experts: int, hidden: int, intermediate: int) -> int:
        """Host bytes of one MoE layer's experts packed in this format, computed without allocating (equal to
        `ExpertLayer(experts, hidden, intermediate, self).packed_bytes`): gate, up and down panels of Ip x Hp
        weights per expert (the engine pads both to multiples of PAD with zeros), plus, per scale layout, the
        scales: "channel" keeps one fp32 multiplier per output channel (gate and up: Ip, down: Hp)."""
        hp, ip = -(-hidden // PAD) * PAD, -(-intermediate // PAD) * PAD
        scales_per_expert = {"none": 0, "channel": 2 * ip + hp}[self.scales]
        return experts * (3 * ip * hp * self.weight_bytes + 4 * scales_per_expert)

    def __str__(self) -> str:
        return self.name


_ALL_ISAS = ("scalar", "avx2", "avx512", "amx")

FORMATS: dict[str, ExpertFormat] = {f.name: f for f in (
    ExpertFormat("bf16", _engine.WeightFormat.bf16, ("AMXBF16", "BF16"), torch.bfloat16, torch.bfloat16, "pairs", "none",
                 "bf16", _ALL_ISAS, "bf16 experts (default), fast on amx/avx512/avx2"),
    ExpertFormat("fp32", _engine.WeightFormat.f32, ("FP32",), torch.float32, torch.float32, "f32", "none",
                 "fp32", _ALL_ISAS, "exact fp32 experts, for parity checks"),
    ExpertFormat("int8", _engine.WeightFormat.int8, ("INT8",), torch.bfloat16, torch.int8, "pairs", "channel",
                 "int8", _ALL_ISAS, "int8 weights (one scale per output channel, quantized while loading: half "
                 "the RAM), GEMMs in bf16: exact dequantized math, fast on every path"),
    ExpertFormat("int8-gemm", _engine.WeightFormat.int8_gemm, ("AMXINT8",), torch.bfloat16, torch.int8, "quads", "channel",
                 "int8, int8 GEMMs", ("amx",), "the same int8 weights with the GEMMs in int8 too, activations "
                 "quantized per row: AMX's int8 rate, other CPUs run it slowly"),
)}

# Names older code and family files used for the same formats.
_ALIASES = {"bfloat16": "bf16", "float32": "fp32"}

FormatLike = Union[ExpertFormat, str]


def get_format(fmt: FormatLike) -> ExpertFormat:
    """The row for a format, its name (or an alias: bfloat16, float32) or a kt_backend name (case-insensitive)."""
    if isinstance(fmt, ExpertFormat):
        return fmt
    if isinstance(fmt, str):
        name = _ALIASES.get(fmt, fmt)
        if name in FORMATS:
            return FORMATS[name]
        for f in FORMATS.values():
            if fmt.upper() in f.backends:
                return f
    raise ValueError(f"expert format {fmt!r} is not one of {', '.join(FORMATS)} "
                     f"(kt_backend names: {', '.join(backend_names())})")


def backend_names() -> list[str]:
    return [b for f in FORMATS.values() for b in f.backends]


def for_model_dtype(dtype: torch.dtype) -> ExpertFormat:
    """The exact format for a model of this dtype when nothing else is said: fp32 models get fp32 experts."""
    return FORMATS["fp32"] if dtype == torch.float32 else FORMATS["bf16"]

"""The expert weight formats: one row per format, the only place a format's properties are written down.

A format says how one MoE layer's frozen experts are stored and multiplied: the element type of the packed panels,
their layout, the scales beside them, the dtype activations flow in, and the GEMM arithmetic. Everything that needs
one of these facts (the `kt_backend` key, `load_model`, `ExpertLayer`, `GpuShare`, the summary line, the
benchmarks) takes an `ExpertFormat` from `FORMATS` and reads it; the C++ engine gets `code`, a value of its
`enum class WeightFormat` (csrc/common.h), whose kernels live in one file per format (csrc/kernels/).

A new format = one row here + its `WeightFormat` value + its kernel file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import _engine

PAD = 32  # the engine pads hidden and intermediate to multiples of this (csrc/common.h kBlock)


@dataclass(frozen=True)
class ExpertFormat:
    name: str                     # the format's own name (family files' defaults.format, benchmarks)
    code: object                  # _engine.WeightFormat value
    backends: tuple               # LLaMA-Factory kt_backend names that select it
    compute_dtype: torch.dtype    # activations in and out of the engine (x, y, dx, dy)
    weight_dtype: torch.dtype     # element type of the packed panels (torch.int4: two weights per byte)
    panel: str                    # panel layout (csrc/common.h): "f32" [k][n], "pairs" [k/2][n][2], "quads" [k/4][n][4]
    scales: str                   # "none", "channel" (one fp32 multiplier per output channel) or "block" (a grid)
    label: str                    # how the summary line names it
    fast_isas: tuple              # ISA paths with a tuned kernel; elsewhere it runs correct plain loops
    doc: str                      # one line for kt_backend's help
    scale_block: tuple = (0, 0)   # (rows, columns) of weights per fp32 scale, 0 = the whole padded dimension: per
                                  # channel (1, 0); "block" formats default to fp8's (128, 128) blocks and int4's
                                  # (1, 32) groups along K, and `with_scales` gives a layer any other grid
    stored_dtype: Optional[torch.dtype] = None  # a checkpoint's code tensors `ExpertLayer.load_stored` keeps as they
                                                # are (fp8: e4m3 bytes; int4: int32 words of 8 nibbles), or None
    channel_scales: bool = False  # also one fp32 scale per output channel, derived from the grid (int4-gemm's int8
                                  # GEMMs: csrc/common.h, INT4 GEMMs)
    quantized_gemm: bool = False  # the GEMMs run in int8 on activations quantized per row (not the exact math of
                                  # the stored weights: int8-gemm, int4-gemm)

    @property
    def weight_bytes(self) -> float:
        """Bytes per packed weight, scales aside (torch reports int4's itemsize as 1)."""
        return 0.5 if self.weight_dtype == torch.int4 else self.weight_dtype.itemsize

    @property
    def quantized(self) -> bool:
        return self.scales != "none"

    def scale_grid(self, rows: int, cols: int) -> tuple[int, int]:
        """The scale grid over a padded [rows][cols] weight: one scale per scale_block (0: the whole dimension)."""
        if not self.quantized:
            return 0, 0
        return tuple(-(-n // (b or n)) for n, b in zip((rows, cols), self.scale_block))

    def packed_bytes(self, experts: int, hidden: int, intermediate: int) -> int:
        """Host bytes of one MoE layer's experts packed in this format, computed without allocating (equal to
        `ExpertLayer(experts, hidden, intermediate, self).packed_bytes`): gate, up and down panels of Ip x Hp
        weights per expert (the engine pads both to multiples of PAD with zeros), plus 4 bytes per scale of each
        projection's grid (`scale_grid`; per channel: gate and up Ip, down Hp), and per output channel when the
        format derives channel scales too."""
        hp, ip = -(-hidden // PAD) * PAD, -(-intermediate // PAD) * PAD
        grids = [self.scale_grid(ip, hp)] * 2 + [self.scale_grid(hp, ip)]
        channels = (2 * ip + hp) if self.channel_scales else 0
        return experts * (int(3 * ip * hp * self.weight_bytes) + 4 * (sum(r * c for r, c in grids) + channels))

    def with_scales(self, block: Optional[tuple] = None, group: Optional[int] = None) -> "ExpertFormat":
        """This format with another scale grid: `block` (rows, columns) of weights per scale, 0 = the whole
        dimension ((1, 0): per channel), or `group` weights along K (block (1, group)); any sizes, for a "block"
        format only (e.g. a checkpoint's own grid, so `ExpertLayer.load_stored` keeps its tensors as they are)."""
        if (block is None) == (group is None):
            raise ValueError("with_scales: give block=(rows, columns) or group=G")
        block = (1, group) if group is not None else tuple(block)
        if self.scales != "block":
            raise ValueError(f"expert format {self.name} has no scale grid to choose ({self.scales} scales)")
        if len(block) != 2 or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in block):
            raise ValueError(f"{self.name}: scale block sizes must be two integers >= 0 (0: the whole dimension), "
                             f"got {block}")
        row = FORMATS[self.name]
        if block == row.scale_block:
            return row
        return dataclasses.replace(self, scale_block=block, label=f"{row.label} ({_grid_name(block)})")

    def __str__(self) -> str:
        return self.name


def _grid_name(block: tuple) -> str:
    """How a label names a scale grid: per tensor, per channel, groups of G or RxC blocks (0: the whole dimension)."""
    names = {(0, 0): "per tensor", (1, 0): "per channel"}
    if block in names:
        return names[block]
    return f"groups of {block[1]}" if block[0] == 1 else f"{block[0] or 'N'}x{block[1] or 'K'} blocks"


_ALL_ISAS = ("scalar", "avx2", "avx512", "amx")

FORMATS: dict[str, ExpertFormat] = {f.name: f for f in (
    ExpertFormat("bf16", _engine.WeightFormat.bf16, ("AMXBF16", "BF16"), torch.bfloat16, torch.bfloat16, "pairs", "none",
                 "bf16", _ALL_ISAS, "bf16 experts (default), fast on amx/avx512/avx2"),
    ExpertFormat("fp32", _engine.WeightFormat.f32, ("FP32",), torch.float32, torch.float32, "f32", "none",
                 "fp32", _ALL_ISAS, "exact fp32 experts, for parity checks"),
    ExpertFormat("int8", _engine.WeightFormat.int8, ("INT8",), torch.bfloat16, torch.int8, "pairs", "channel",
                 "int8", _ALL_ISAS, "int8 weights (one scale per output channel, quantized while loading: half "
                 "the RAM), GEMMs in bf16: exact dequantized math, fast on every path", (1, 0)),
    ExpertFormat("int8-gemm", _engine.WeightFormat.int8_gemm, ("AMXINT8",), torch.bfloat16, torch.int8, "quads", "channel",
                 "int8, int8 GEMMs", ("amx",), "the same int8 weights with the GEMMs in int8 too, activations "
                 "quantized per row: AMX's int8 rate, other CPUs run it slowly", (1, 0), None, False, True),
    ExpertFormat("fp8", _engine.WeightFormat.fp8, ("FP8",), torch.bfloat16, torch.float8_e4m3fn, "pairs", "block",
                 "fp8", _ALL_ISAS, "block-FP8 experts (e4m3, a scale per 128x128 block; a block-FP8 checkpoint's own "
                 "kept exactly, others quantized while loading): half the RAM of bf16, GEMMs in bf16 on the decoded "
                 "weights", (128, 128), torch.float8_e4m3fn),
    ExpertFormat("int4", _engine.WeightFormat.int4, ("INT4",), torch.bfloat16, torch.int4, "pairs", "block",
                 "int4", _ALL_ISAS, "int4 experts (a scale per group of 32 along the input; an INT4 checkpoint's own "
                 "kept exactly, others quantized while loading): 0.31 of bf16's RAM, GEMMs in bf16 on the decoded "
                 "weights", (1, 32), torch.int32),
    ExpertFormat("int4-gemm", _engine.WeightFormat.int4_gemm, ("AMXINT4",), torch.bfloat16, torch.int4, "pairs",
                 "block", "int4, int8 GEMMs", ("amx",), "the same int4 experts with int8 GEMMs: each block expanded "
                 "to int8 on one scale per output channel, activations quantized per row: AMX's int8 rate, other "
                 "CPUs run it slowly", (1, 32), torch.int32, True, True),
)}

# Names older code and family files used for the same formats.
_ALIASES = {"bfloat16": "bf16", "float32": "fp32"}

FormatLike = Union[ExpertFormat, str]


def get_format(fmt: FormatLike, block: Optional[tuple] = None, group: Optional[int] = None) -> ExpertFormat:
    """The row for a format, its name (or an alias: bfloat16, float32) or a kt_backend name (case-insensitive);
    with `block` or `group`, that row with this scale grid (`ExpertFormat.with_scales`)."""
    row = _row(fmt)
    return row if block is None and group is None else row.with_scales(block, group)


def _row(fmt: FormatLike) -> ExpertFormat:
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

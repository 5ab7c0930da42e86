"""The engine tester's tables: layer kinds (format x LoRA x GPU share), the shape grid, one tolerance table, and the
plain-PyTorch fp32 reference of every format (the weights and arithmetic that format computes with).

A layer kind runs on every ISA path (the `isa` fixture) over SHAPES and is compared, output by output (y, dx, dw and
the four LoRA factor gradients), with REFERENCES[format] within TOLERANCE[format]. With a GPU share (on the CPU, and
on CUDA where present) the last `share` experts of the shape run as PyTorch code (kt_sft/engine/gpu_share.py), which
computes like SHARE_COMPUTES_LIKE[format]. A new format is one row in each table; `test_engine_parity.py` fails
until it has them.

References (tests/moe_reference.py, tests/expert_lora_reference.py for the definitions):
  fp32, bf16  autograd through `experts_with_lora` on the weights rounded to the compute dtype
  int8        the same on the dequantized weights bf16(q * s) (csrc/common.h, INT8): exact dequantized math
  fp8, int4   the same on the decoded weights bf16(fl32(value * s)) of their block / group quantization
              (csrc/common.h, FP8 / INT4); the kinds cover the formats' default grids and quirky ones (VARIANTS)
  int8-gemm   `w8a8_reference`, the INT8-GEMMs spec of csrc/common.h written out row by row
  int4-gemm   the same on the int8 weights it expands its int4 ones to (`int4_gemm_weights`, common.h INT4 GEMMs)
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

import kt_sft.engine as ke
from expert_lora_reference import ExpertLora, experts_with_lora, pack_peft_lora, split_peft_lora
from moe_reference import make_experts, make_routing, rel_err


class Shape(NamedTuple):
    E: int
    H: int
    I: int
    T: int
    k: int
    routing: str     # moe_reference.make_routing: uniform, skewed or one_expert
    r_gu: int        # the LoRA kinds' ranks (0: no LoRA on that projection)
    r_d: int
    share: int = 1   # the GPU share kinds: experts [E - share, E) on the share, streamed `chunk` experts at a time
    chunk: int = 1


# Shape: reason. Ranks odd, unequal, 1, r_d > r_gu; shares of half, all but one, every routed expert.
SHAPES = {
    Shape(8, 64, 96, 16, 2, "uniform", 8, 8, 4, 2): "aligned sizes, the common case; half the experts shared",
    Shape(5, 33, 17, 7, 3, "uniform", 3, 5, 5, 2): "odd H and I (tails inside one padded 32-block), odd unequal "
                                                   "ranks; every expert on the share (the engine gets only -1)",
    Shape(4, 130, 70, 1, 2, "uniform", 4, 2, 2, 1): "T=1 (decode), H and I past a block boundary",
    Shape(16, 64, 48, 5, 2, "uniform", 8, 4, 9, 4): "more experts than routed rows: most experts empty (zero LoRA "
                                                    "grads), also in the share",
    Shape(8, 48, 64, 40, 1, "one_expert", 2, 6, 7, 3): "k=1, every token on one expert (all on the share)",
    Shape(8, 96, 80, 37, 8, "uniform", 4, 4, 3, 3): "k=8, every expert used by every token",
    Shape(6, 72, 40, 300, 4, "skewed", 16, 8, 5, 2): "skewed routing, >256 rows on one expert (several row chunks); "
                                                     "all but the busiest expert shared",
    Shape(3, 16, 16, 3, 2, "uniform", 1, 1, 1, 1): "sizes below one block, rank 1",
    Shape(4, 256, 192, 100, 2, "uniform", 8, 16, 2, 1): "full 32-row AMX blocks plus a 16-row and a short tail, "
                                                        "r_d > r_gu",
}
OUTPUTS = ("y", "dx", "dw")
PROJECTIONS = ("gate", "up", "down")
FACTORS = ("A_gu", "B_gu", "A_d", "B_d")


@dataclass(frozen=True)
class Tolerance:
    """||out - ref|| / ||ref|| bounds of one format. y, dx, dw, factors: against REFERENCES[format]; paths: a vector
    ISA path against the scalar path on the same layer (every output); unquantized: a quantized format against the
    fp32 model of the weights it was quantized from (y, dx, dw)."""
    y: float
    dx: float
    dw: float
    factors: float
    paths: float
    unquantized: Optional[float] = None


# Measured maxima over KINDS x SHAPES x the four ISA paths in (). fp32: summation order and exp() only (1e-6). bf16
# rounds x, dy, the activation fed to the down GEMM, d(gate|up) and the outputs (2^-9 each; 7.5e-3); the LoRA terms
# are fp32. int8 is bf16 arithmetic on the dequantized weights (6.5e-3; 2.3e-2 from the unquantized weights). int8
# GEMMs: the integer sums are exact, so what differs from the spec is fp32 summation order (dw; the LoRA terms) and
# an output or activation rounding to the other side of a bf16 or int8 step (y, dx 1.0e-4 with LoRA, 0 without;
# dw 3.1e-5, factors 5.9e-5; 3.1e-2 from the unquantized weights). fp8 and int4 are bf16 arithmetic on the decoded
# weights like int8 (1.0e-2 at most, int4 groups of 5's dw); from the unquantized weights they differ by what e4m3's
# 3 mantissa bits (1.1e-1) and 4-bit groups (4.6e-1, dw; y and dx 2.2e-1) lose. int4 GEMMs are int8 GEMMs on the
# expanded weights: against their spec as int8 GEMMs (1.3e-4, factors), from the unquantized weights as int4 (4.6e-1).
# Paths: the same flips between two units' bf16 outputs (2.4e-4).
TOLERANCE = {
    "fp32": Tolerance(y=5e-6, dx=5e-6, dw=5e-6, factors=5e-6, paths=1e-6),
    "bf16": Tolerance(y=1e-2, dx=1.5e-2, dw=1.5e-2, factors=1.5e-2, paths=1e-3),
    "int8": Tolerance(y=1e-2, dx=1.5e-2, dw=1.5e-2, factors=1.5e-2, paths=1e-3, unquantized=4e-2),
    "int8-gemm": Tolerance(y=3e-4, dx=3e-4, dw=1e-4, factors=2e-4, paths=1e-3, unquantized=5e-2),
    "fp8": Tolerance(y=1e-2, dx=1.5e-2, dw=1.5e-2, factors=1.5e-2, paths=1e-3, unquantized=1.5e-1),
    "int4": Tolerance(y=1e-2, dx=1.5e-2, dw=1.5e-2, factors=1.5e-2, paths=1e-3, unquantized=6e-1),
    "int4-gemm": Tolerance(y=3e-4, dx=3e-4, dw=1e-4, factors=2e-4, paths=1e-3, unquantized=6e-1),
}


# The format whose reference and tolerance a GPU share's experts follow: the share runs stock PyTorch experts in the
# format's compute dtype on the weights the engine multiplies with (int8: dequantized), so int8 GEMMs are bf16 there.
# A call with a share gets the looser of the two rows (measured on the CPU device: fp32 6.1e-7, the others 8.8e-3).
SHARE_COMPUTES_LIKE = {"fp32": "fp32", "bf16": "bf16", "int8": "int8", "int8-gemm": "int8", "fp8": "fp8", "int4": "int4",
                       "int4-gemm": "int4"}
SHARE_DEVICES = ("cpu",) + (("cuda",) if torch.cuda.is_available() else ())


@dataclass(frozen=True)
class LayerKind:
    format: ke.ExpertFormat
    lora: bool
    share: Optional[str] = None  # the GPU share's device, or None: every expert on the engine

    def __str__(self) -> str:
        return format_id(self.format) + ("-lora" if self.lora else "") + (f"-share_{self.share}" if self.share else "")


# Scale grids besides the rows' own that every engine test covers: blocks and groups that divide neither the grid's
# sizes nor their padding (odd block_k: a (k, k+1) pair straddles two blocks).
VARIANTS = (ke.get_format("fp8", block=(5, 7)), ke.get_format("int4", group=5), ke.get_format("int4-gemm", group=5))
KINDS = [LayerKind(fmt, lora, share) for fmt in (*ke.FORMATS.values(), *VARIANTS) for lora in (False, True)
         for share in (None,) + SHARE_DEVICES]


def format_id(fmt: ke.ExpertFormat) -> str:
    """The format's name, with its scale grid when it is not the row's own."""
    if fmt.scale_block == ke.FORMATS[fmt.name].scale_block:
        return fmt.name
    return f"{fmt.name}-{fmt.scale_block[0]}x{fmt.scale_block[1]}"


def shape_id(shape: Shape) -> str:
    return (f"{shape.E}x{shape.H}x{shape.I}-T{shape.T}k{shape.k}-{shape.routing}-r{shape.r_gu}.{shape.r_d}"
            f"-s{shape.share}.{shape.chunk}")


class Outputs(NamedTuple):
    y: torch.Tensor
    dx: torch.Tensor
    dw: torch.Tensor
    factors: Optional[tuple]  # the four factor gradients (None for a projection without LoRA); None without LoRA


@dataclass
class Case:
    """One call: fp32 experts as loaded (before any rounding or quantization), routing, x and dy in the format's
    compute dtype, the LoRA (PEFT layout) or None, and the GPU share (device, experts, chunk) or None."""
    format: ke.ExpertFormat
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    ids: torch.Tensor
    w: torch.Tensor
    x: torch.Tensor
    dy: torch.Tensor
    lora: Optional[ke.ExpertLoRA]
    share: Optional[tuple] = None


def make_lora(E, H, I, r_gu, r_d, gen, scale=(0.75, 1.5)) -> ke.ExpertLoRA:
    """Random PEFT-layout factors, sized so the LoRA terms are comparable to the frozen ones (B != 0); rank 0: None."""
    def pair(r, d1, d2):
        if r == 0:
            return None, None
        return (torch.randn(r * E, d1, generator=gen) * d1 ** -0.5 * 2,
                torch.randn(d2, r * E, generator=gen) * d2 ** -0.5)
    A_gu, B_gu = pair(r_gu, 2 * I, H)
    A_d, B_d = pair(r_d, H, I)
    return ke.ExpertLoRA(A_gu, B_gu, A_d, B_d, *scale)


def make_case(shape: Shape, fmt: ke.FormatLike, lora: bool, share: Optional[str] = None) -> Case:
    """The same experts, routing, x and dy for every format (seeded by the shape's sizes, so by nothing else)."""
    E, H, I, T, k, routing, r_gu, r_d = shape[:8]
    fmt = ke.get_format(fmt)
    gen = torch.Generator().manual_seed(zlib.crc32(repr(tuple(shape[:8])).encode()))
    gate, up, down = make_experts(E, H, I, gen)
    gate[0, 3] = 0.0  # an all-zero output channel: scale 0 for the quantized formats
    down[E - 1, :, 5] = 0.0  # an all-zero input column (not a channel): ordinary zeros
    ids, w = make_routing(T, E, k, routing, gen)
    x = torch.randn(T, H, generator=gen).to(fmt.compute_dtype)
    if T > 1:
        x[0] = 0.0  # an all-zero activation row: scale 0 for int8 GEMMs
    dy = torch.randn(T, H, generator=gen).to(fmt.compute_dtype)
    factors = make_lora(E, H, I, r_gu, r_d, gen) if lora else None
    return Case(fmt, gate, up, down, ids, w, x, dy, factors, (share, shape.share, shape.chunk) if share else None)


def make_layer(gate, up, down, fmt: ke.FormatLike) -> ke.ExpertLayer:
    """An ExpertLayer of format `fmt` loaded with gate/up [E, I, H] and down [E, H, I]."""
    E, I, H = gate.shape
    layer = ke.ExpertLayer(E, H, I, fmt)
    layer.set_projection("gate", gate)
    layer.set_projection("up", up)
    layer.set_projection("down", down)
    return layer


def case_layer(case: Case) -> ke.ExpertLayer:
    return make_layer(case.gate, case.up, case.down, case.format)


def run_layer(layer: ke.ExpertLayer, case: Case, lora=...) -> Outputs:
    """Forward with save_for_backward, then backward (`lora`: the case's when not given; None runs without)."""
    lora = case.lora if lora is ... else lora
    y, handle = layer.forward(case.x, case.ids, case.w, save_for_backward=True, lora=lora)
    out = layer.backward(handle, case.dy, lora=lora)
    return Outputs(y, out[0], out[1], None if lora is None else tuple(out[2]))


def lora_params(lora: ke.ExpertLoRA) -> ke.ExpertLoRA:
    """Copies of the factors that collect .grad (trainable parameters)."""
    return ke.ExpertLoRA(*(None if t is None else t.detach().clone().requires_grad_(True) for t in lora.factors()),
                         lora.scale_gu, lora.scale_d)


def run_with_share(layer: ke.ExpertLayer, case: Case) -> Outputs:
    """The call through moe_experts with the case's GpuShare: inputs on its device, gradients by autograd (of x,
    topk_weights and trainable LoRA factors). Checks that the share did compute its experts and that backward left
    no retained forward behind."""
    device, experts, chunk = case.share
    share = ke.GpuShare(layer, experts, device, min_tokens=1, chunk=chunk)
    calls = []
    for name in ("forward", "backward"):
        run = getattr(share, name)
        setattr(share, name, lambda *a, _run=run, _name=name, **kw: calls.append(_name) or _run(*a, **kw))
    xs, ws = (t.to(device, copy=True).requires_grad_(True) for t in (case.x, case.w))  # the case stays as it is
    lora = None if case.lora is None else lora_params(case.lora)  # on the host, where the loader keeps expert LoRA
    y = ke.moe_experts(xs, case.ids.to(device), ws, layer, lora=lora, share=share)
    y.backward(case.dy.to(device))
    assert y.device.type == device and calls == ["forward", "backward"], calls
    assert layer.retained.entries == []
    if device == "cuda" and share.format.compute_dtype == torch.bfloat16 and case.x.shape[1] % 8 == 0 \
            and case.gate.shape[1] % 8 == 0 and torch.cuda.get_device_capability() >= (9, 0):
        assert share.grouped, "torch._grouped_mm fell back to one GEMM per expert on an sm90+ GPU"
    factors = None if lora is None else tuple(None if t is None else t.grad for t in lora.factors())
    return Outputs(y.detach().cpu(), xs.grad.cpu(), ws.grad.cpu(), factors)


def outputs_equal(a: Outputs, b: Outputs) -> bool:
    """Bitwise the same outputs (None where the other has None)."""
    pairs = list(zip(a[:3] + (a.factors or ()), b[:3] + (b.factors or ())))
    return (a.factors is None) == (b.factors is None) and all(
        (p is None and q is None) or (p is not None and q is not None and torch.equal(p, q)) for p, q in pairs)


# ------------------------------------------------------------------------------------------------ references

def dequantized(w: torch.Tensor, fmt: ke.FormatLike = "int8") -> torch.Tensor:
    """What a layer of quantized format `fmt` computes with, from fp32 weights w [.., N, K], plain torch in fp32:
    int8 (csrc/common.h, INT8): per output channel s = max |w| / 127, q = round_half_even(w / s) clamped to +-127
    (s = 0: q = 0), then bf16(q * s); fp8 and int4 (FP8 / INT4): per block of the format's grid s = max |w| / 448
    (7), q = e4m3(w / s) (round_half_even(w / s) clamped to [-8, 7]), then bf16(fl32(q * s))."""
    fmt = ke.get_format(fmt)
    if fmt.scales == "channel":  # int8, and int8-gemm's weights
        q, s = quantize(w)
        return (q.float() * s).bfloat16()
    q, s = block_codes(w, fmt)
    return (q * s).bfloat16()


def block_codes(w: torch.Tensor, fmt: ke.ExpertFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, scales), both like w [.., N, K] in fp32, of a "block" format's quantization of w: each weight's e4m3
    number (fp8) or q in [-8, 7] (int4, int4-gemm), and the scale of its block (0 for a block of zeros)."""
    blocks = as_blocks(w, fmt.scale_block)
    s = blocks.abs().amax(dim=(-3, -1), keepdim=True) / (448 if fmt.name == "fp8" else 7)
    ratio = blocks / torch.where(s > 0, s, 1.0)
    q = ratio.to(torch.float8_e4m3fn).float() if fmt.name == "fp8" else torch.round(ratio).clamp(-8, 7)
    return from_blocks(torch.where(s > 0, q, 0.0), w.shape), from_blocks(s.expand_as(blocks), w.shape)


def int4_gemm_weights(w: torch.Tensor, fmt: ke.ExpertFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8 as fp64 integers [N, K], S [N]): the int8 weights and channel scales an int4-gemm layer multiplies with
    (csrc/common.h, INT4 GEMMs): S = 8 * max |s| of the row / 127, w8 = clamp(round_half_even(q * (s / S)), +-127)."""
    return requantized(*block_codes(w, fmt))


def requantized(q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int4_gemm_weights of int4 values q [N, K] in [-8, 7] and their group scales s [N, K] (one per weight)."""
    S = 8 * s.abs().amax(-1) / 127
    r = torch.where(S[:, None] > 0, s / torch.where(S > 0, S, 1.0)[:, None], 0.0)
    return torch.round(q * r).clamp(-127, 127).double(), S


def gemm_weights(fmt: ke.ExpertFormat, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weights as fp64 integers [N, K], channel scales [N]) of a layer with int8 GEMMs."""
    if fmt.scales == "channel":
        q, s = quantize(w)
        return q, s[:, 0]
    return int4_gemm_weights(w, fmt)


def as_blocks(w: torch.Tensor, block: tuple) -> torch.Tensor:
    """w [.., N, K] zero-padded to whole blocks of block (Bn, Bk) (0: the whole dimension) and viewed as
    [.., N / Bn, Bn, K / Bk, Bk]."""
    (N, K) = w.shape[-2:]
    bn, bk = block[0] or N, block[1] or K
    padded = F.pad(w.float(), (0, -K % bk, 0, -N % bn))
    return padded.view(*w.shape[:-2], padded.shape[-2] // bn, bn, padded.shape[-1] // bk, bk)


def from_blocks(blocks: torch.Tensor, shape) -> torch.Tensor:
    """as_blocks undone: [.., N, K] of shape `shape` (the padding cut off)."""
    nb, bn, kb, bk = blocks.shape[-4:]
    return blocks.reshape(*blocks.shape[:-4], nb * bn, kb * bk)[..., :shape[-2], :shape[-1]]


def computed_weights(fmt: ke.ExpertFormat, w: torch.Tensor) -> torch.Tensor:
    """The weights a layer of `fmt` multiplies with, in fp32."""
    return (dequantized(w, fmt) if fmt.quantized else w.to(fmt.compute_dtype)).float()


def reference_with_grads(x, ids, w, gate, up, down, lora: Optional[ke.ExpertLoRA], dy) -> Outputs:
    """fp32 (y, dx, dw, factor gradients in PEFT layout) by autograd through experts_with_lora."""
    E = gate.shape[0]
    flat = [None if t is None else t.detach().clone().requires_grad_(True) for t in lora.factors()] if lora else []
    xr = x.detach().float().requires_grad_(True)
    wr = w.detach().float().requires_grad_(True)
    per_expert = []
    for A, B in zip(flat[::2], flat[1::2]):
        per_expert += [None, None] if A is None else list(split_peft_lora(A, B, E))
    y = experts_with_lora(xr, ids, wr, torch.cat([gate, up], dim=1).float(), down.float(),
                          ExpertLora(*per_expert) if lora else None, (lora.scale_gu, lora.scale_d) if lora else 1.0)
    live = [t for t in flat if t is not None]
    if y.requires_grad:
        grads = iter(torch.autograd.grad(y, [xr, wr] + live, dy.float()))
    else:  # no slot is routed to these experts (all -1): nothing flows back
        grads = iter(torch.zeros_like(t) for t in [xr, wr] + live)
    dx, dw = next(grads), next(grads)
    factors = tuple(None if t is None else next(grads) for t in flat) if lora else None
    return Outputs(y.detach(), dx, dw, factors)


def exact_reference(case: Case) -> Outputs:
    """The fp32 model of the weights the format computes with (rounded to bf16, or dequantized)."""
    gate, up, down = (computed_weights(case.format, t) for t in (case.gate, case.up, case.down))
    return reference_with_grads(case.x, case.ids, case.w, gate, up, down, case.lora, case.dy)


def unquantized_reference(case: Case) -> Outputs:
    return reference_with_grads(case.x, case.ids, case.w, case.gate, case.up, case.down, case.lora, case.dy)


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric int8 (last dim): (q as fp64 integers, s [.., 1] fp32); s = 0 gives q = 0."""
    w = w.float()
    s = w.abs().amax(-1, keepdim=True) / 127
    q = torch.where(s > 0, torch.round(w / torch.where(s > 0, s, 1.0)), 0.0).clamp(-127, 127)
    return q.double(), s


def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GEMM inputs' per-row int8 (common.h, INT8 GEMMs): q = round(a * (127 / max|a|)) in fp32, s = max|a| / 127."""
    a = a.float()
    amax = a.abs().amax(-1, keepdim=True)
    s = amax / 127
    # a tensor divided by a tensor: `127 / t` is t.reciprocal() * 127 in torch, one rounding more than 127.0f / m
    inv = torch.full_like(amax, 127.0) / torch.where(amax > 0, amax, 1.0)
    # m < 127 / FLT_MAX: 127 / m overflows, and such a row divides by s instead
    q = torch.where(torch.isinf(inv), a / torch.where(s > 0, s, 1.0), a * inv)
    q = torch.where(s > 0, torch.round(q), 0.0).clamp(-127, 127)
    return q.double(), s


def int8_gemm(a: torch.Tensor, qw: torch.Tensor, col_scale=None) -> torch.Tensor:
    """float(sum_k q_a q_w) * s_a (* col_scale): a [M, K] fp32 (already column-scaled), qw [N, K] integers."""
    qa, sa = quantize_rows(a)
    out = (qa @ qw.T).float() * sa
    return out * col_scale if col_scale is not None else out


def bf16(t: torch.Tensor) -> torch.Tensor:
    """Rounded to bf16 where the engine stores bf16, computed on in fp32."""
    return t.bfloat16().float()


class _W8A8Expert:
    """One expert of the INT8-GEMM layer (quantized weights, per-expert LoRA factors or None) and its rows' math;
    weights(which, e): projection `which`'s int8 weights and channel scales."""

    def __init__(self, case: Case, e: int, weights):
        (self.qg, self.sg), (self.qu, self.su), (self.qd, self.sd) = (weights(which, e) for which in PROJECTIONS)
        lora, E = case.lora, case.gate.shape[0]
        self.s_gu, self.s_d = (lora.scale_gu, lora.scale_d) if lora else (0.0, 0.0)
        self.A_gu = self.B_gu = self.A_d = self.B_d = None
        if lora is not None and lora.A_gu is not None:
            A, B = split_peft_lora(lora.A_gu, lora.B_gu, E)
            self.A_gu, self.B_gu = A[e], B[e]
        if lora is not None and lora.A_d is not None:
            A, B = split_peft_lora(lora.A_d, lora.B_d, E)
            self.A_d, self.B_d = A[e], B[e]

    def forward(self, x, we):
        """Routing-weighted output rows (bf16) and what backward keeps: g, u (fp32), h (bf16), u_gu, q."""
        I = self.qg.shape[0]
        g, u = int8_gemm(x, self.qg, self.sg), int8_gemm(x, self.qu, self.su)
        u_gu = q = None
        if self.A_gu is not None:  # LoRA epilogue: z += s_gu * (x . B_gu) . A_gu, before SiLU-GLU
            u_gu = x @ self.B_gu
            z = self.s_gu * u_gu @ self.A_gu
            g, u = g + z[:, :I], u + z[:, I:]
        h = bf16(F.silu(g) * u)
        o = int8_gemm(h, self.qd, self.sd)
        if self.A_d is not None:  # o += s_d * (h . B_d) . A_d, before the routing weight
            q = h @ self.B_d
            o = o + self.s_d * q @ self.A_d
        return bf16(we * o), (g, u, u_gu, q)

    def backward(self, x, dy, we, saved):
        """(dx rows (bf16), dw, factor gradients dA_gu, dB_gu, dA_d, dB_d of this expert or None)."""
        g, u, u_gu, q = saved
        gb, ub = bf16(g), bf16(u)  # the saved pre-activations
        hb = bf16(F.silu(gb) * ub)  # h as backward recomputes it
        da = int8_gemm(dy * self.sd, self.qd.T)  # dy . W_down, down's scales folded into dy
        dw = (da * hb).sum(-1)
        dy_a = None
        if self.A_d is not None:  # da += s_d * (dy . A_d^T) . B_d^T; dw += s_d * <dy . A_d^T, q>
            dy_a = dy @ self.A_d.T
            da = da + self.s_d * dy_a @ self.B_d.T
            dw = dw + self.s_d * (dy_a * q).sum(-1)
        sig = torch.sigmoid(gb)
        dzg = bf16(we * da * ub * sig * (1 + gb * (1 - sig)))
        dzu = bf16(we * da * gb * sig)
        dz = torch.cat([dzg, dzu], -1)
        dx = int8_gemm(torch.cat([dzg * self.sg, dzu * self.su], -1), torch.cat([self.qg, self.qu], 0).T)
        grads = [None] * 4
        if self.A_gu is not None:
            t_gu = dz @ self.A_gu.T
            dx = dx + self.s_gu * t_gu @ self.B_gu.T
            grads[0], grads[1] = self.s_gu * u_gu.T @ dz, self.s_gu * x.T @ t_gu
        if self.A_d is not None:
            grads[2], grads[3] = self.s_d * q.T @ (we * dy), self.s_d * hb.T @ (we * dy_a)
        return bf16(dx), dw, grads


def w8a8_reference(case: Case, weights=None) -> Outputs:
    """y, dx, dw (and the LoRA factor gradients) of the INT8-GEMM layer, expert by expert over its gathered rows
    (fp64 integer sums, fp32 scaling and LoRA terms, bf16 where the engine stores bf16). `weights(which, e)`: the
    int8 weights and channel scales of expert e's projection `which` (gate, up, down); by default gemm_weights of
    the case's format and weights."""
    weights = weights or (lambda which, e: gemm_weights(case.format, getattr(case, which)[e]))
    x, dy, ids, w = case.x.float(), case.dy.float(), case.ids, case.w
    T, k = ids.shape
    E, I, H = case.gate.shape
    y, dx, dw = torch.zeros(T, H), torch.zeros(T, H), torch.zeros(T, k)
    ranks = case.lora.ranks(E) if case.lora else (0, 0)
    per_expert = [torch.zeros(E, r, d1) if i % 2 == 0 else torch.zeros(E, d2, r)
                  for i, (r, d1, d2) in enumerate([(ranks[0], 2 * I, H)] * 2 + [(ranks[1], H, I)] * 2)]
    for e in [e for e in ids.unique().tolist() if e >= 0]:  # -1: a slot another part of the layer computes
        t, j = (ids == e).nonzero(as_tuple=True)
        expert, we = _W8A8Expert(case, e, weights), w[t, j][:, None]
        rows, saved = expert.forward(x[t], we)
        y.index_add_(0, t, rows)  # bf16 rows, fp32 sum
        dx_rows, dw[t, j], grads = expert.backward(x[t], dy[t], we, saved)
        dx.index_add_(0, t, dx_rows)
        for i, g in enumerate(grads):
            if g is not None:
                per_expert[i][e] = g
    factors = None
    if case.lora is not None:
        gu = pack_peft_lora(*per_expert[:2]) if ranks[0] else (None, None)
        d = pack_peft_lora(*per_expert[2:]) if ranks[1] else (None, None)
        factors = gu + d
    return Outputs(y.bfloat16(), dx.bfloat16(), dw, factors)


REFERENCES = {"fp32": exact_reference, "bf16": exact_reference, "int8": exact_reference, "int8-gemm": w8a8_reference,
              "fp8": exact_reference, "int4": exact_reference, "int4-gemm": w8a8_reference}


# ------------------------------------------------------------------------------------------------ checks

def assert_close(got: Outputs, want: Outputs, tol: Tolerance, what: str, bound=None, scale=None) -> None:
    """Every output of `got` within its tolerance of `want` (`bound`: one bound for all instead). `scale`
    (`magnitudes`): errors relative to the larger of ||want|| and the size of its terms, for shapes whose few
    outputs may cancel (one token: dw_tj = <dy_t, o_tj> of random vectors is ~1/sqrt(H) of |dy_t| |o_tj|)."""
    def err_of(g, r, s):
        return rel_err(g, r) if s is None else rel_err(g, r) * r.double().norm().item() / max(
            r.double().norm().item(), s.double().norm().item(), 1e-30)
    for name in OUTPUTS:
        err = err_of(getattr(got, name), getattr(want, name), None if scale is None else getattr(scale, name))
        limit = bound if bound is not None else getattr(tol, name)
        assert err < limit, f"{name}: rel err {err:.2e} >= {limit:.1e} ({what})"
    assert (got.factors is None) == (want.factors is None), what
    scales = scale.factors if scale is not None and scale.factors is not None else (None,) * len(FACTORS)
    for name, g, r, s in zip(FACTORS, got.factors or (), want.factors or (), scales):
        assert (g is None) == (r is None), f"d{name} ({what})"
        if g is not None:
            err = err_of(g, r, s)
            limit = bound if bound is not None else tol.factors
            assert err < limit, f"d{name}: rel err {err:.2e} >= {limit:.1e} ({what})"


def assert_output_layout(got: Outputs, case: Case) -> None:
    """Dtypes and shapes: compute dtype for y and dx, fp32 dw and factor gradients of the factors' shapes; experts
    without tokens get exactly zero factor gradients (as with PEFT)."""
    T, H = case.x.shape
    dtype = case.format.compute_dtype
    assert got.y.dtype == dtype and got.dx.dtype == dtype and got.dw.dtype == torch.float32
    assert got.y.shape == got.dx.shape == (T, H) and got.dw.shape == case.ids.shape
    if case.lora is None:
        return
    for name, g, f in zip(FACTORS, got.factors, case.lora.factors()):
        assert (g is None) == (f is None), name
        assert g is None or (g.shape == f.shape and g.dtype == torch.float32), name
    E = case.gate.shape[0]
    r_gu, r_d = case.lora.ranks(E)
    A_gu, B_gu, A_d, B_d = got.factors
    for e in range(E):
        if (case.ids == e).any():
            continue
        assert r_gu == 0 or (not A_gu[e * r_gu:(e + 1) * r_gu].any() and not B_gu[:, e::E].any()), f"expert {e}"
        assert r_d == 0 or (not A_d[e * r_d:(e + 1) * r_d].any() and not B_d[:, e::E].any()), f"expert {e}"


def bitwise_dequantized_twin(case: Case, got: Outputs, why: str) -> None:
    """int8, fp8 and int4 compute *bitwise* what the bf16 layer of their dequantized weights computes."""
    twin = make_layer(*(dequantized(t, case.format) for t in (case.gate, case.up, case.down)), "bf16")
    assert outputs_equal(got, run_layer(twin, case)), f"differs from the bf16 layer of dequantized weights ({why})"


# What a format's layer must satisfy besides matching its reference (quantized formats are also checked against the
# fp32 model of their unquantized weights, Tolerance.unquantized).
def int4_panels(case: Case, got: Outputs, why: str) -> None:
    """int4-gemm stores exactly the int4 layer's codes and group scales (its int8 weights are made per task)."""
    layers = [make_layer(case.gate, case.up, case.down, ke.FORMATS[name].with_scales(block=case.format.scale_block))
              for name in ("int4", "int4-gemm")]
    for a, b in zip(*(layer.panels().projections for layer in layers)):
        assert torch.equal(a.raw, b.raw) and torch.equal(a.scales, b.scales), f"not int4's panels ({why})"


IDENTITIES = {"fp32": (), "bf16": (), "int8": (bitwise_dequantized_twin,), "int8-gemm": (),
              "fp8": (bitwise_dequantized_twin,), "int4": (bitwise_dequantized_twin,), "int4-gemm": (int4_panels,)}


def shared_reference(case: Case) -> Outputs:
    """A call with a GPU share: the engine's experts by the format's reference, the share's by the reference of the
    format it computes like; the parts add up (disjoint slots and experts)."""
    E, experts = case.gate.shape[0], case.share[1]  # a count (the last ones) or the ids
    on_share = case.ids >= E - experts if isinstance(experts, int) else torch.isin(case.ids, torch.tensor(experts))
    engine = REFERENCES[case.format.name](dataclasses.replace(case, ids=case.ids.masked_fill(on_share, -1)))
    like = ke.FORMATS[SHARE_COMPUTES_LIKE[case.format.name]]
    if like.scales == "block":  # with the case's own scale grid
        like = like.with_scales(block=case.format.scale_block)
    share = REFERENCES[like.name](dataclasses.replace(case, format=like, ids=case.ids.masked_fill(~on_share, -1)))
    factors = None if case.lora is None else tuple(
        None if a is None else a + b for a, b in zip(engine.factors, share.factors))
    return Outputs(engine.y.float() + share.y.float(), engine.dx.float() + share.dx.float(), engine.dw + share.dw,
                   factors)


def case_tolerance(case: Case) -> Tolerance:
    """The format's row; with a GPU share, the looser of it and the row of the format the share computes like."""
    tol = TOLERANCE[case.format.name]
    if case.share is None:
        return tol
    like = TOLERANCE[SHARE_COMPUTES_LIKE[case.format.name]]
    return Tolerance(*(None if a is None else max(a, b if b is not None else 0.0) for a, b in zip(
        dataclasses.astuple(tol), dataclasses.astuple(like))))


def case_references(case: Case) -> tuple:
    """(the case's reference, the unquantized weights' reference for a quantized format else None)."""
    reference = shared_reference(case) if case.share else REFERENCES[case.format.name](case)
    quantized = TOLERANCE[case.format.name].unquantized is not None
    return reference, unquantized_reference(case) if quantized else None


def magnitudes(case: Case) -> Outputs:
    """The outputs of the case's exact reference with every input made non-negative (x, dy, weights, LoRA factors):
    the size of each output's terms without their cancellation, `assert_close`'s `scale`."""
    def pos(t):
        return None if t is None else t.abs()
    lora = None if case.lora is None else ke.ExpertLoRA(*(pos(t) for t in case.lora.factors()), case.lora.scale_gu,
                                                        case.lora.scale_d)
    fmt = case.format if case.format.name not in ("int8-gemm", "int4-gemm") else ke.FORMATS["bf16"]
    return exact_reference(dataclasses.replace(case, format=fmt, gate=pos(case.gate), up=pos(case.up),
                                               down=pos(case.down), x=pos(case.x), dy=pos(case.dy), lora=lora,
                                               ids=case.ids.clamp_min(0)))


def check_layer(case: Case, why: str, references: Optional[tuple] = None, scale=None) -> Outputs:
    """The engine tester: one layer kind on the current ISA path against its reference, output by output; the
    format's identities on engine-only calls. `references`: case_references(case), when already computed;
    `scale`: see assert_close."""
    layer = case_layer(case)
    got = run_with_share(layer, case) if case.share else run_layer(layer, case)
    assert_output_layout(got, case)
    tol = case_tolerance(case)
    reference, unquantized = references or case_references(case)
    assert_close(got, reference, tol, why, scale=scale)
    if unquantized is not None:
        assert_close(got, unquantized, tol, f"{why}, from the unquantized weights", tol.unquantized)
    for identity in IDENTITIES[case.format.name] if case.share is None else ():
        identity(case, got, why)
    return got

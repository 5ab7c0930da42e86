"""The checkpoint formats kt-sft reads: how a (possibly quantized) checkpoint stores one linear's weight, and its
exact decoder.

A checkpoint's format comes from config.json's `quantization_config` (`source_format`):

    bf16           no quantization_config: `X.weight` in bf16 / fp16 / fp32
    fp8-block      quant_method fp8 (DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, MiniMax-M2): `X.weight` float8_e4m3fn
                   [N, K] and `X.weight_scale_inv` fp32 [ceil(N/Bn), ceil(K/Bk)]; W = w * scale_inv (a multiplier,
                   despite the name); edge blocks are partial
    fp8-channel    compressed-tensors float-quantized, strategy channel (GLM-4.5-FP8): `X.weight` e4m3 and
                   `X.weight_scale` [N, 1]
    int4-group     compressed-tensors pack-quantized, 4-bit symmetric groups (Kimi-K2-Thinking, K2.5): `X.weight_packed`
                   int32 [N, ceil(K/8)] (nibble i of each int32 at bits 4i, lowest first along K, stored q + 8),
                   `X.weight_scale` [N, ceil(K/G)], `X.weight_shape` [N, K]; W = (nibble - 8) * scale
    mxfp4          quant_method mxfp4 (gpt-oss): routed experts only, each fused experts parameter X (gate_up_proj,
                   down_proj) stored as `X_blocks` uint8 [E, N, ceil(K/32), 16] (two E2M1 values a byte, the low
                   nibble the even element along K) and `X_scales` uint8 [E, N, ceil(K/32)] (E8M0: 2^(s - 127)), N the
                   output and K the input dimension whatever the parameter's own orientation (transformers transposes
                   gpt-oss's after decoding); W = e2m1 * 2^(s - 127), exact in bf16 (`decode_mxfp4`); a last group
                   past K is cut off

Tensors a quantized checkpoint leaves unquantized (embeddings, norms, routers, lm_head, compressed-tensors'
`ignore` list, MXFP4's `modules_to_not_convert`) are plain `X.weight`s, told apart by their dtype (`is_quantized`).
`stored_parts` states each layout once (which tensors a weight is stored as, with their dtypes and shapes):
`check_stored` checks a whole checkpoint's file headers against it before anything is read, and `encoded` the
tensors it reads. Routed experts go to the engine as `encoded` gives them (codes, scales, block), which decodes them
itself (csrc/packing.h); `decode` gives any other quantized weight in fp32. Both compute W exactly as fl32(stored
value * scale), the value every engine format then starts from (bf16 rounds it once, int8 quantizes it per channel,
fp32 keeps it). MXFP4 experts are decoded to bf16 in torch a few experts at a time (`decode_mxfp4`, a 256-entry
table of byte -> two values) and packed from there (kt_sft.loader).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

# Tensors stored beside a quantized weight (input_scale: static activation scales, which kt-sft does not use).
COMPANION_SUFFIXES = (".weight_scale_inv", ".weight_scale", ".weight_shape", ".input_scale")


class CheckpointFormatError(ValueError):
    """A checkpoint kt-sft cannot read, or a tensor that does not match its format; raised before loading."""


@dataclass(frozen=True)
class SourceFormat:
    """How the quantized linears of one checkpoint are stored (see the module docstring)."""

    name: str                        # bf16, fp8-block, fp8-channel, int4-group, mxfp4
    block: tuple = ()                # fp8-block: (Bn, Bk) rows x columns per scale
    group: int = 0                   # int4-group, mxfp4: weights per scale along K

    @property
    def quantized(self) -> bool:
        return self.name != "bf16"

    @property
    def weight_bytes(self) -> float:
        """Stored bytes per weight of a quantized linear, scales included (for RAM and disk estimates)."""
        if self.name == "fp8-block":
            return 1 + 4 / (self.block[0] * self.block[1])
        if self.name == "int4-group":
            return 0.5 + 2 / self.group
        if self.name == "mxfp4":
            return 0.5 + 1 / self.group
        return 1.0 if self.name == "fp8-channel" else 2.0

    @property
    def element_dtype(self) -> Optional[torch.dtype]:
        """The element type of a quantized weight (None: unquantized, stored as bf16 / fp16 / fp32)."""
        return {"fp8-block": torch.float8_e4m3fn, "fp8-channel": torch.float8_e4m3fn,
                "int4-group": torch.int4, "mxfp4": torch.float4_e2m1fn_x2}.get(self.name)

    @property
    def element_bytes(self) -> float:
        """Bytes of one stored weight element, scales aside."""
        return {"fp8-block": 1.0, "fp8-channel": 1.0, "int4-group": 0.5, "mxfp4": 0.5}.get(self.name, 2.0)

    @property
    def holding_bytes(self) -> float:
        """Bytes per weight an engine format needs to hold this checkpoint's weights without rounding them again (the
        default format rule in kt_sft.loader compares it with the format rows): the element's own width, except
        MXFP4's, whose E2M1 values under a power-of-two scale per 32 weights fit no int8 / int4 grid of the engine
        (8 and 12 times a group's scale are no int4 codes; the groups' scales differ by powers of two along a row):
        bf16 holds them exactly."""
        return 2.0 if self.name == "mxfp4" else self.element_bytes

    def __str__(self) -> str:
        if self.name == "fp8-block":
            return f"fp8-block ({self.block[0]}x{self.block[1]} blocks)"
        return f"int4-group (groups of {self.group})" if self.name == "int4-group" else self.name


# MXFP4's stored tensors: X_blocks with X_scales beside it (X: a fused experts parameter).
MXFP4_BLOCKS, MXFP4_SCALES, MXFP4_GROUP = "_blocks", "_scales", 32

# What each source format is, for `python -m kt_sft env` and the refusal of other formats.
SOURCE_FORMATS = {
    "bf16": "no quantization_config: bf16 / fp16 / fp32 weights",
    "fp8-block": "quant_method fp8, fmt e4m3, any weight_block_size: DeepSeek-V3/R1, Kimi-K2, Qwen3-FP8, MiniMax-M2",
    "fp8-channel": "compressed-tensors float-quantized, 8-bit per output channel: GLM-4.5/4.7-FP8",
    "int4-group": "compressed-tensors pack-quantized, 4-bit symmetric groups, any group size: Kimi-K2-Thinking, K2.5",
    "mxfp4": "quant_method mxfp4, E2M1 routed experts with an E8M0 scale per 32 weights: gpt-oss",
}


def is_companion(key: str, fmt: Optional[SourceFormat] = None) -> bool:
    """A scale / shape tensor that belongs to a quantized weight (read with it, never placed on its own); in an MXFP4
    checkpoint (`fmt`) also the `X_scales` beside `X_blocks`."""
    return key.endswith(COMPANION_SUFFIXES) or (fmt is not None and fmt.name == "mxfp4" and key.endswith(MXFP4_SCALES))


def logical_key(key: str) -> str:
    """The name a stored tensor stands for: INT4's `X.weight_packed` is `X.weight`, MXFP4's `X_blocks` is `X`."""
    if key.endswith(".weight_packed"):
        return key[: -len("_packed")]
    return key[: -len(MXFP4_BLOCKS)] if key.endswith(MXFP4_BLOCKS) else key


# ---------------------------------------------------------------------------------------------- config.json

def source_format(quant: Optional[dict], where: str = "config.json") -> SourceFormat:
    """The format a checkpoint's `quantization_config` describes; anything else is refused with its name."""
    if not quant:
        return SourceFormat("bf16")
    if not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    method = str(quant.get("quant_method", "unknown"))
    if method == "fp8":
        return _fp8_block_format(quant, where)
    if method == "compressed-tensors":
        return _compressed_tensors_format(quant, where)
    if method == "mxfp4":
        return SourceFormat("mxfp4", group=MXFP4_GROUP)
    detail = f" ({quant['fmt']})" if quant.get("fmt") else ""
    raise CheckpointFormatError(
        f"{where}: quantization_config.quant_method={method}{detail} is not a format kt-sft reads (it reads bf16/fp16/"
        "fp32, block-FP8 (quant_method fp8), compressed-tensors FP8 per channel / INT4 pack-quantized and MXFP4); "
        "convert the checkpoint to one of these")


def _fp8_block_format(quant: dict, where: str) -> SourceFormat:
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise CheckpointFormatError(f"{where}: quantization_config.fmt={fmt!r}: only e4m3 FP8 is supported")
    block = quant.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointFormatError(f"{where}: quantization_config.weight_block_size={block!r}: expected two positive "
                                    "integers [rows, columns] (per-tensor FP8 without blocks is not supported)")
    return SourceFormat("fp8-block", block=tuple(block))


def _compressed_tensors_format(quant: dict, where: str) -> SourceFormat:
    groups = quant.get("config_groups") or {}
    weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
    if len(weights) != 1:
        raise CheckpointFormatError(f"{where}: compressed-tensors with {len(weights)} config_groups; kt-sft reads "
                                    "checkpoints with exactly one weight scheme")
    w, fmt = weights[0], str(quant.get("format", ""))
    kind = (w.get("type"), w.get("num_bits"), w.get("strategy"), bool(w.get("symmetric", True)))
    if fmt == "float-quantized" and kind == ("float", 8, "channel", True):
        return SourceFormat("fp8-channel")
    if fmt == "pack-quantized" and kind[:3] == ("int", 4, "group") and kind[3]:
        group = w.get("group_size")
        if not (isinstance(group, int) and group > 0):
            raise CheckpointFormatError(f"{where}: INT4 group_size={group!r}: expected a positive integer")
        return SourceFormat("int4-group", group=group)
    raise CheckpointFormatError(
        f"{where}: compressed-tensors format={fmt!r} with weights "
        f"{dict(type=kind[0], num_bits=kind[1], strategy=kind[2], symmetric=kind[3])} "
        "is not a scheme kt-sft reads (it reads float-quantized 8-bit per channel and pack-quantized 4-bit "
        "symmetric groups)")


# ---------------------------------------------------------------------------------------------- layout

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class StoredPart:
    """One tensor a quantized weight is stored as (the weight itself or a companion) and what it must be."""

    key: str
    dtypes: tuple
    shape: tuple

    def check(self, dtype, shape) -> None:
        if dtype not in self.dtypes or tuple(shape) != tuple(self.shape):
            want = " or ".join(_dtype_name(d) for d in self.dtypes)
            raise CheckpointFormatError(f"{self.key}: expected {want} {list(self.shape)}, got {_dtype_name(dtype)} "
                                        f"{list(shape)}")


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def stored_linear(key: str) -> Optional[str]:
    """The linear whose weight `key` stores (`a.b.weight` / `a.b.weight_packed` -> `a.b`); None for other keys."""
    for suffix in (".weight_packed", ".weight"):
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def is_quantized(key: str, dtype: torch.dtype) -> bool:
    """Whether the tensor stored under `key` with `dtype` is a quantized weight (read through `decode`, or for MXFP4
    `decode_mxfp4`); the rest of a checkpoint (and all of an unquantized one) is read as stored."""
    return key.endswith(".weight_packed") or dtype in FLOAT8 or (key.endswith(MXFP4_BLOCKS) and dtype == torch.uint8)


def stored_parts(fmt: SourceFormat, key: str, dtype: torch.dtype, shape: tuple,
                 read: Callable[[str], torch.Tensor]) -> tuple[StoredPart, ...]:
    """The tensors the weight stored under `key` (dtype [shape] in its file) is read from, itself first, each with
    the dtypes and shape the format requires; () for a weight stored unquantized. `read(key)` gives a tensor's
    value: only INT4's `weight_shape` (two integers, the logical [out, in]) is read. The one statement of each
    layout: `decode` checks the tensors it reads against it, `check_stored` the file headers before loading."""
    if key.endswith(MXFP4_BLOCKS) and dtype == torch.uint8:
        return _mxfp4_parts(fmt, key, shape)
    if key.endswith(".weight_packed"):
        if fmt.name != "int4-group":
            raise CheckpointFormatError(f"{key}: a packed INT4 weight in a {fmt.name} checkpoint")
        linear = stored_linear(key)
        n, k = _int4_shape(linear + ".weight_shape", read)
        return (StoredPart(key, (torch.int32,), (n, math.ceil(k / 8))),
                StoredPart(linear + ".weight_scale", SCALE_DTYPES, (n, math.ceil(k / fmt.group))))
    if dtype not in FLOAT8:
        return ()
    if dtype != torch.float8_e4m3fn:
        raise CheckpointFormatError(f"{key}: a {_dtype_name(dtype)} weight; kt-sft reads e4m3 FP8 only")
    if len(shape) != 2:
        raise CheckpointFormatError(f"{key}: a {len(shape)}-D FP8 tensor; kt-sft reads FP8 linears stored as 2-D "
                                    "[out, in] weights")
    (n, k), linear = shape, stored_linear(key)
    weight = StoredPart(key, (torch.float8_e4m3fn,), (n, k))
    if fmt.name == "fp8-block":
        bn, bk = fmt.block
        return weight, StoredPart(linear + ".weight_scale_inv", (torch.float32, torch.bfloat16),
                                  (math.ceil(n / bn), math.ceil(k / bk)))
    if fmt.name == "fp8-channel":
        return weight, StoredPart(linear + ".weight_scale", SCALE_DTYPES, (n, 1))
    raise CheckpointFormatError(f"{key}: a float8 weight in a {fmt.name} checkpoint (config.json declares no FP8 "
                                "quantization_config)")


def logical_shape(key: str, shape: tuple, read: Callable[[str], torch.Tensor]) -> tuple:
    """The shape of the weight stored under `key` (file shape `shape`): INT4's [out, in] from its `weight_shape`
    (read with `read`), anything else's as stored."""
    return _int4_shape(stored_linear(key) + ".weight_shape", read) if key.endswith(".weight_packed") else tuple(shape)


def _mxfp4_parts(fmt: SourceFormat, key: str, shape: tuple) -> tuple[StoredPart, ...]:
    if fmt.name != "mxfp4":
        raise CheckpointFormatError(f"{key}: an MXFP4 block tensor in a {fmt.name} checkpoint (config.json declares "
                                    "no quant_method mxfp4)")
    if len(shape) != 4 or shape[-1] != MXFP4_GROUP // 2:
        raise CheckpointFormatError(f"{key}: expected MXFP4 blocks [experts, out, in / {MXFP4_GROUP}, "
                                    f"{MXFP4_GROUP // 2}] (uint8), got {list(shape)}")
    return (StoredPart(key, (torch.uint8,), tuple(shape)),
            StoredPart(key[: -len(MXFP4_BLOCKS)] + MXFP4_SCALES, (torch.uint8,), tuple(shape[:-1])))


def _int4_shape(shape_key: str, read) -> tuple[int, int]:
    shape = read(shape_key)
    if shape.numel() != 2 or shape.is_floating_point():
        raise CheckpointFormatError(f"{shape_key}: expected 2 integers [out, in], got {shape.tolist()}")
    n, k = (int(v) for v in shape.tolist())
    if n < 1 or k < 1:
        raise CheckpointFormatError(f"{shape_key}: expected positive [out, in], got {[n, k]}")
    return n, k


def check_stored(fmt: SourceFormat, headers: Mapping[str, tuple], read: Callable[[str], torch.Tensor],
                 where: Callable[[str], str] = lambda key: "") -> int:
    """Every quantized weight in `headers` ({key: (dtype, shape)} of a whole checkpoint, from its files' headers)
    comes with the companions its format needs, each of the right dtype and shape: checked before any weight is
    read (INT4's two-integer `weight_shape`s aside). `where(key)` names a key's file in errors. Returns how many
    quantized weights there are."""
    count = 0
    for key, (dtype, shape) in headers.items():
        if is_companion(key, fmt) or not is_quantized(key, dtype):
            continue
        count += 1
        try:
            parts = stored_parts(fmt, key, dtype, shape, read)
        except CheckpointFormatError as err:
            raise CheckpointFormatError(f"{err} ({where(key)})") from None
        for part in parts:
            found = headers.get(part.key)
            if found is None:
                raise CheckpointFormatError(
                    f"{part.key} is missing: the {fmt.name} weight {key} ({where(key)}) is stored with it, and no "
                    "shard holds it. Is the checkpoint complete?")
            try:
                part.check(*found)
            except CheckpointFormatError as err:
                raise CheckpointFormatError(f"{err} ({where(part.key)}; {fmt.name})") from None
    return count


# ---------------------------------------------------------------------------------------------- decoding

# Weights decoded per step and torch thread: a step's int16 / int8 codes and fp32 values stay in each core's L2
# between its passes (conversion, scaling), so memory sees the codes read and the fp32 result written once. A V3
# expert (7168 x 2048) on one thread: 18 ms of CPU at 2^17 (19 at 2^16 and 2^18, 21 at 2^20, 28 in one step).
_STEP_ELEMENTS_PER_THREAD = 1 << 17
# fp16 bits of (e4m3 byte as int8) << 7: its sign, exponent and mantissa at fp16's places (the value / 256).
_E4M3_AS_FP16_MASK = -16512  # 0xBF80 as int16


@dataclass(frozen=True)
class Encoded:
    """A quantized weight as stored, its tensors checked against the layout (`stored_parts`): `codes` (e4m3 [N, K],
    or INT4's int32 words [N, ceil(K/8)]), `scale` [ceil(N/Bn), ceil(K/Bk)] of `block` (Bn, Bk) weights each (edge
    blocks partial; per channel (1, K), INT4 groups (1, G)), and the weight's logical `shape` (N, K)."""

    codes: torch.Tensor
    scale: torch.Tensor
    block: tuple
    shape: tuple


def encoded(fmt: SourceFormat, key: str, get: Callable[[str], torch.Tensor],
            weight: Optional[torch.Tensor] = None) -> Optional[Encoded]:
    """The stored tensors of the weight under `key` (`X.weight` or `X.weight_packed`; `weight`: that tensor, already
    read), each read with `get(key)` and its dtype and shape checked (a mismatch names the tensor); None for a weight
    stored as a plain float (unquantized in a quantized checkpoint: routers, norms, compressed-tensors' `ignore`)."""
    w = get(key) if weight is None else weight
    parts = stored_parts(fmt, key, w.dtype, tuple(w.shape), get)
    if not parts:
        return None
    if fmt.name == "mxfp4":
        raise CheckpointFormatError(f"{key}: MXFP4 blocks are read as a routed experts' fused weight (decode_mxfp4); "
                                    "kt-sft reads MXFP4 routed experts only")
    stored = {key: w}
    for part in parts:
        t = stored[part.key] if part.key in stored else get(part.key)
        part.check(t.dtype, t.shape)
        stored[part.key] = t
    codes, scale = stored[parts[0].key], stored[parts[1].key]
    if fmt.name == "int4-group":
        n, k = _int4_shape(stored_linear(key) + ".weight_shape", get)
        return Encoded(codes, scale, (1, fmt.group), (n, k))
    n, k = codes.shape
    return Encoded(codes, scale, fmt.block if fmt.name == "fp8-block" else (1, k), (n, k))


def decode(fmt: SourceFormat, key: str, get: Callable[[str], torch.Tensor],
           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W [N, K] in fp32 of the weight stored under `key` (`X.weight` or `X.weight_packed`), reading it and its scale
    tensors with `get(key)` (`encoded`); a weight stored as a plain float is returned in fp32 as it is. Routed
    experts never come here: the engine decodes their stored tensors itself, to the same values
    (ExpertLayer.set_projection with scale=).

    out: a float32 tensor of at least N * K elements to decode a quantized weight into (the result is a view of
    it): a caller decoding one tensor after another reuses one buffer instead of faulting in fresh pages for each."""
    w = get(key)
    enc = encoded(fmt, key, get, w)
    if enc is None:
        return w.float()
    scale, out = enc.scale.float(), _output(out, *enc.shape)
    if fmt.name == "int4-group":
        return _decode_steps(_int4_codes, enc.codes, scale, enc.block, out)
    if scale.abs().max() < 2.0 ** 119:  # 256 s is exact: one multiply makes fl32(value * s) of value / 256
        values = _decode_steps(_fp8_over_256, enc.codes, scale * 256, enc.block, out)
    else:  # 256 s would overflow (e4m3 scales are ~1e-4; an inf or NaN scale lands here too): the values in fp16
        values = _decode_steps(lambda w, k: _fp8_over_256(w, k).mul_(256), enc.codes, scale, enc.block, out)
    return _fp8_nans(enc.codes, values)


def _output(out: Optional[torch.Tensor], n: int, k: int) -> torch.Tensor:
    if out is None or out.dtype != torch.float32 or out.numel() < n * k:
        return torch.empty(n, k)
    return out.view(-1)[: n * k].view(n, k)


def _decode_steps(codes_of: Callable, weight: torch.Tensor, scale: torch.Tensor, block: tuple,
                  out: torch.Tensor) -> torch.Tensor:
    """out [n, k] = fl32(c * s) for the codes c that `codes_of(weight rows, k)` gives (a tensor torch converts to
    fp32 exactly) and s = the scale of each rows x cols block (scale [ceil(n/rows), ceil(k/cols)], edge blocks
    partial), a step of whole block rows at a time."""
    (n, k), rows = out.shape, block[0]
    step = max(1, _STEP_ELEMENTS_PER_THREAD * torch.get_num_threads() // (rows * k)) * rows
    for r0 in range(0, n, step):
        part = out[r0: r0 + step]
        part.copy_(codes_of(weight[r0: r0 + step], k))
        s = scale[r0 // rows: -(-(r0 + part.shape[0]) // rows)]
        _scale_blocks(part, s if rows == 1 else s.repeat_interleave(rows, 0)[: part.shape[0]], block[1])
    return out


def _scale_blocks(values: torch.Tensor, row_scales: torch.Tensor, cols: int) -> None:
    """values [n, k] *= the scale of each block of `cols` columns (row_scales [n, ceil(k/cols)], the last block
    partial), in place: the whole blocks as a [n, k // cols, cols] view, the partial one as a strip."""
    n, k = values.shape
    whole = k // cols
    if whole:
        values[:, : whole * cols].view(n, whole, cols).mul_(row_scales[:, :whole, None])
    if whole * cols < k:
        values[:, whole * cols:].mul_(row_scales[:, whole:])


def _fp8_over_256(weight: torch.Tensor, k: int) -> torch.Tensor:
    """e4m3 codes [n, k] as fp16 holding each value / 256, exactly: e4m3 is fp16 with a 4-bit exponent of bias 7
    (fp16's: 5 bits, bias 15), so the byte's sign, exponent and mantissa moved to fp16's places read as value * 2^-8,
    subnormals included (fp16's exponent range covers them as well). Vectorized integer passes: torch's e4m3 -> fp32
    conversion is an element loop (4 ns a weight on one core; this whole decode takes 1.2). The NaN codes (0x7f,
    0xff) read as +-1.875: `_fp8_nans` restores them."""
    codes = weight.view(torch.int8).to(torch.int16)  # sign-extended: the sign lands in bit 15 after the shift
    return codes.bitwise_left_shift_(7).bitwise_and_(_E4M3_AS_FP16_MASK).view(torch.float16)


def _fp8_nans(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """values with NaN wherever the code is e4m3's NaN (0x7f or 0xff), as torch's conversion decodes them; two byte
    maxima find whether there is any (0x7f is the largest int8, 0xff the largest uint8)."""
    if weight.view(torch.int8).max() == 127 or weight.view(torch.uint8).max() == 255:
        values[(weight.view(torch.uint8) & 0x7F) == 0x7F] = float("nan")
    return values


def _int4_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The q = nibble - 8 [n, k] (int8) of int32 words [n, ceil(k/8)] holding 8 nibbles each, lowest first. Bytes
    of a little-endian word hold nibbles 2j (low) and 2j + 1 (high); xor 0x88 turns each nibble into q's 4-bit two's
    complement, which arithmetic shifts of the byte as int8 sign-extend."""
    n = packed.shape[0]
    halves = packed.contiguous().view(torch.uint8).bitwise_xor(0x88).view(torch.int8)
    low = halves.bitwise_left_shift(4).bitwise_right_shift_(4)
    return torch.stack((low, halves.bitwise_right_shift(4)), -1).view(n, -1)[:, :k]


# ---------------------------------------------------------------------------------------------- MXFP4

# E2M1 codes 0-15: sign bit 3, then exponent 2 bits (bias 1) and mantissa 1 bit (OCP MX spec).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Bytes of MXFP4 blocks decoded per step (at least one expert): a step's int32 indices and bf16 values take 8x its
# blocks (a gpt-oss-120b expert's gate_up: 8.3 MB of blocks, 66 MB while decoded). One thread decodes ~0.12-0.27 G
# weights/s, 7.7x transformers' _convert_moe_packed_tensors in the same process (one core, 5760 x 2880 experts).
_MXFP4_STEP_BYTES = 1 << 21


def _mxfp4_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """(byte -> its two bf16 values, low nibble first, as one int32 [256]; E8M0 byte -> 2^(s - 127) in bf16 [256])."""
    values = torch.tensor(E2M1_VALUES, dtype=torch.bfloat16)
    codes = torch.arange(256)
    pairs = torch.stack((values[codes & 15], values[codes >> 4]), dim=-1).contiguous()
    powers = torch.ldexp(torch.ones(256, dtype=torch.float64), codes - 127).to(torch.bfloat16)
    return pairs.view(torch.int32).view(256), powers


_MXFP4_PAIRS, _E8M0 = _mxfp4_tables()


def mxfp4_experts_per_step(blocks: torch.Tensor) -> int:
    """Experts of `blocks` [E, N, G, 16] that `decode_mxfp4` callers decode at once (at least one)."""
    return max(1, _MXFP4_STEP_BYTES // max(1, blocks[0].numel()))


def decode_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, cols: int) -> torch.Tensor:
    """W [..., N, cols] in bf16 of MXFP4 `blocks` uint8 [..., N, G, 16] and `scales` uint8 [..., N, G] (G =
    ceil(cols / 32); the last group's values past `cols` are dropped): each byte's two E2M1 values (low nibble the
    even element) times 2^(s - 127), exact in bf16 (at most two significant bits times a power of two; 2^-127 is a
    bf16 subnormal, s = 255, E8M0's NaN, gives non-finite values). Vectorized table lookups: one of 256 entries per
    byte, one per group for the scale."""
    *lead, n, groups, half = blocks.shape
    if half != MXFP4_GROUP // 2 or tuple(scales.shape) != (*lead, n, groups) or -(-cols // MXFP4_GROUP) != groups:
        raise CheckpointFormatError(f"MXFP4 blocks {list(blocks.shape)} / scales {list(scales.shape)} do not hold "
                                    f"[..., {n}, {cols}] weights (groups of {MXFP4_GROUP} along the last dimension)")
    pairs = _MXFP4_PAIRS.index_select(0, blocks.reshape(-1).to(torch.int32))
    values = pairs.view(torch.bfloat16).view(*lead, n, groups, MXFP4_GROUP)
    values.mul_(_E8M0.index_select(0, scales.reshape(-1).to(torch.int32)).view(*lead, n, groups, 1))
    values = values.view(*lead, n, groups * MXFP4_GROUP)
    return values if cols == groups * MXFP4_GROUP else values[..., :cols]

"""`ExpertLayer`: one MoE layer's frozen routed experts, packed in CPU memory for the C++ engine.

Weights come in per expert (`mlp.experts.{e}.gate_proj.weight` as on the Hub) or fused (transformers 5
keeps `gate_up_proj [E, 2I, H]` and `down_proj [E, H, I]` in memory); either way they are converted and
packed straight into the engine's layout, so once the caller drops its tensors only one copy remains.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _engine
from .activations import ActivationLike, get_activation
from .checks import SOURCE_DTYPES, check_lora, check_tensor
from .formats import FORMATS, FormatLike, get_format
from .lora import ExpertLoRA, ExpertLoRAGrads
from .panels import PROJECTIONS, PackedPanels, bias_views, packed_panels
from .retained import RetainedForwards


CUDA_HOST_REGISTER_READ_ONLY = 0x08  # cudaHostRegisterReadOnly (CUDA >= 11.1)
# Encoded checkpoint tensors the engine decodes (set_projection with scale=): e4m3 bytes, int32 words of 8 int4 nibbles.
ENCODED_DTYPES = {torch.float8_e4m3fn: "float8_e4m3fn", torch.int32: "int32"}
_GRID_ADVICE = (": the checkpoint's grid differs from the layer's; build the layer with get_format({name!r}, "
                "block=(rows, columns)) or group=G")


def _checked_block(block) -> tuple[int, int]:
    if not (isinstance(block, (tuple, list)) and len(block) == 2 and
            all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in block)):
        raise ValueError(f"block={block!r}: expected (rows, columns) of weights per scale, integers >= 0 (0: the "
                         "whole dimension)")
    return tuple(block)


def _whole(block: tuple, rows: int, cols: int) -> tuple[int, int]:
    """A block over a [rows, cols] weight with 0 (the whole dimension) and sizes beyond it made the dimension: two
    blocks that cut the weight alike compare equal."""
    return tuple(min(b or d, d) for b, d in zip(block, (rows, cols)))


def _blocks_text(fmt, block: Optional[tuple]) -> str:
    if block is None:
        return f"{fmt.label}: blocks of {fmt.scale_block[0]}x{fmt.scale_block[1]}"
    return f"blocks of {block[0]}x{block[1]}"


def _host_output(shape, dtype: torch.dtype) -> torch.Tensor:
    """A fresh host tensor for an engine output (y, dx, dw, LoRA factor gradients), written in full by the engine.

    Each call returns new tensors (autograd may keep them), 16 MB for y or dx of a 4096-token V2-Lite layer. From
    plain malloc they arrive as fresh pages, and first-touching them cost thousands of page faults per call.
    Where CUDA is present, torch's caching pinned-host allocator hands back blocks a previous call freed instead,
    and the copy to the GPU then reads them directly (kt_sft.engine.autograd)."""
    if torch.cuda.is_available():
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    return torch.empty(shape, dtype=dtype)


class ExpertLayer:
    """Routed experts: y_t = sum_j w_tj * (down_e h + b_down,e), e = topk_ids[t, j], with h = act(gate_e x_t +
    b_gate,e) * (up_e x_t + b_up,e) (gated) or act(up_e x_t + b_up,e) (ungated).

    `activation` (an ExpertActivation of kt_sft.engine.activations, or its name; default silu_glu, with `limit` its
    clamp where the row takes one) says what `act` is: silu / GELU-tanh / gpt-oss's clamped swiglu (gated) or relu^2
    (ungated: no gate projection). `bias`: the experts have gate / up / down biases (`set_bias`; none: all zero).

    `format` (an ExpertFormat of kt_sft.engine.formats, or its name) says how the frozen weights are stored and
    multiplied; its `compute_dtype` is the dtype of x, y, dx and dy (bfloat16 for training; fp32 is the
    exact-arithmetic path of the parity tests). "int8" stores int8 weights with one scale per output channel and
    computes exactly what a bf16 layer holding the dequantized weights bf16(q * scale) would (csrc/common.h,
    INT8); "int8-gemm" runs the GEMMs themselves in int8, activations quantized per row (INT8 GEMMs): AMX's
    tdpbssd, at the cost of activation rounding. "fp8" and "int4" store e4m3 / int4 codes with scales on a grid of
    blocks (the format's `scale_block`) and compute exactly what a bf16 layer holding the decoded weights would
    (csrc/common.h, FP8 / INT4); they keep a checkpoint's own codes and scales (`set_projection` with scale=).
    "int4-gemm" stores int4's codes and runs int8 GEMMs on blocks expanded per task to one scale per output channel
    (INT4 GEMMs). `max_saved` bounds how many forwards may keep activations for a later backward on this layer;
    `retained` holds the forwards kept for a checkpoint recompute (the autograd glue fills it, bounded by the same
    slots).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        format: FormatLike = "bf16",
        activation: ActivationLike = "silu_glu",
        max_saved: int = 4,
        *,
        limit: Optional[float] = None,
        bias: bool = False,
    ) -> None:
        self._pinned: Optional[list[int]] = None  # first: __del__ reads it even when the rest of __init__ failed
        self._all_pinned = False
        self._segment = None  # the shared store this layer's experts live in (use_storage), if any
        self.format = get_format(format)
        self.activation = get_activation(activation, limit)
        self.bias = bool(bias)
        self._layer = _engine.MoELayer(int(num_experts), int(hidden_size), int(intermediate_size), self.format.code,
                                       self.format.scale_block, self.activation.code, self.activation.limit,
                                       self.bias, int(max_saved))
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.retained = RetainedForwards(self._layer)
        self._issued: list[int] = []  # handles of saving forwards, pruned of dead ones (saved_forwards)

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype of forward/backward (the format's compute dtype)."""
        return self.format.compute_dtype

    # ------------------------------------------------------------------ loading
    def set_projection(self, which: str, weight: torch.Tensor, expert_begin: int = 0,
                       scale: Optional[torch.Tensor] = None, block: Optional[tuple] = None) -> None:
        """Pack projection `which` (its [rows, cols]: `projection_shape`) of experts expert_begin..+n.

        weight: [n, rows, cols] fp32 / bf16 / fp16, converted (or quantized) into the layer's format; 2-D is one
        expert; any CPU strides work (slices of a fused tensor need no copy). With `scale`, weight is a checkpoint's
        encoded tensor instead, which the engine decodes itself, W = fl32(value * scale) exactly as
        kt_sft.checkpoint_formats.decode: float8_e4m3fn codes [n, rows, cols], or int32 words [n, rows,
        ceil(cols / 8)] of 8 int4 nibbles (nibble i at bits 4i, lowest first along cols, stored q + 8), with scale
        [n, ceil(rows / Bn), ceil(cols / Bk)] (fp32 / bf16 / fp16) of `block` (Bn, Bk) weights each, 0 = the whole
        dimension (per channel: (1, 0); INT4 groups: (1, G); edge blocks partial; None: the format's own grid).
        Codes of the element type the format stores (FP8 codes in fp8, INT4 in int4 / int4-gemm) are kept exactly
        as they are, which needs the layer's grid (`get_format(..., block=...)` / `group=`). NaN/Inf (a NaN code, a
        non-finite scale) raise ValueError naming the expert.
        """
        rows, cols = self.projection_shape(which)
        weight, scale = (t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 2 else t for t in (weight, scale))
        if scale is not None:
            self._set_encoded(which, weight, scale, expert_begin, block, self._encoded_keeps(weight))
            return
        w = check_tensor(f"{which} weight", weight, dtype=tuple(SOURCE_DTYPES), shape=(None, rows, cols),
                         contiguous=False)
        if self._experts_range(expert_begin, w.shape[0]):
            self._layer.set_weights(PROJECTIONS[which], int(expert_begin), int(w.shape[0]), w.data_ptr(),
                                    SOURCE_DTYPES[w.dtype], list(w.stride()))

    @property
    def projections(self) -> tuple[str, ...]:
        """The projections this layer's experts have: gate, up, down (ungated: up, down)."""
        return tuple(p for p in PROJECTIONS if self.activation.gated or p != "gate")

    def projection_shape(self, which: str) -> tuple[int, int]:
        """(rows, cols) of projection `which`: gate/up [I, H], down [H, I]."""
        if which not in self.projections:
            raise ValueError(f"which={which!r}: expected one of {', '.join(self.projections)}"
                             + (f" ({self.activation.label} experts have no gate)" if which == "gate" else ""))
        return ((self.hidden_size, self.intermediate_size) if which == "down"
                else (self.intermediate_size, self.hidden_size))

    def set_bias(self, which: str, bias: torch.Tensor, expert_begin: int = 0) -> None:
        """Biases of projection `which` (gate / up [n, I], down [n, H]; 1-D: one expert) of experts
        expert_begin..+n, any float dtype and strides (held in fp32). The layer must have been made with bias=True."""
        if not self.bias:
            raise ValueError("set_bias: this layer was made without expert biases (ExpertLayer(..., bias=True))")
        length = self.projection_shape(which)[0]
        bias = bias.unsqueeze(0) if isinstance(bias, torch.Tensor) and bias.dim() == 1 else bias
        b = check_tensor(f"{which} bias", bias, dtype=tuple(SOURCE_DTYPES), shape=(None, length), contiguous=False)
        b = b.float().contiguous()
        if self._experts_range(expert_begin, b.shape[0]):
            self._layer.set_bias(PROJECTIONS[which], int(expert_begin), int(b.shape[0]), b.data_ptr(), length)

    def _experts_range(self, expert_begin: int, n: int) -> bool:
        """Whether there is anything to pack for experts [expert_begin, expert_begin + n); raises outside the layer."""
        if not 0 <= expert_begin or expert_begin + n > self.num_experts:
            raise ValueError(f"experts [{expert_begin}, {expert_begin + n}) are outside [0, {self.num_experts})")
        return n > 0

    def _encoded_keeps(self, codes) -> bool:
        """Whether encoded `codes` are kept as they are: the format stores their element type."""
        return isinstance(codes, torch.Tensor) and codes.dtype == self.format.stored_dtype

    def _set_encoded(self, which: str, codes, scale, expert_begin: int, block: Optional[tuple], keep: bool) -> None:
        """set_projection of encoded codes + scales (3-D), decoded by the engine or (keep) kept as they are."""
        rows, cols = self.projection_shape(which)
        int4 = isinstance(codes, torch.Tensor) and codes.dtype == torch.int32
        check_tensor(f"{which} codes", codes, dtype=tuple(ENCODED_DTYPES), shape=(None, rows, -(-cols // 8) if int4
                                                                                 else cols), contiguous=False)
        fmt, n = self.format, codes.shape[0]
        if block is None and fmt.scales != "block":
            raise ValueError(f"{which}: block=(rows, columns) of weights per scale is needed to decode these codes "
                             f"(expert format {fmt.name} has no scale grid of its own)")
        layer_block = _whole(fmt.scale_block, rows, cols) if fmt.scales == "block" else None
        source_block = layer_block if block is None else _whole(_checked_block(block), rows, cols)
        grid = tuple(-(-d // b) for d, b in zip((rows, cols), source_block))
        if isinstance(scale, torch.Tensor) and scale.dim() == 3 and tuple(scale.shape[1:]) != grid:
            raise ValueError(f"{which} scale: expected [{n}, {grid[0]}, {grid[1]}] ({_blocks_text(fmt, block)} over "
                             f"{rows}x{cols} weights, 0 = all), got {list(scale.shape)}" +
                             (_GRID_ADVICE.format(name=fmt.name) if block is None else ""))
        check_tensor(f"{which} scale", scale, dtype=tuple(SOURCE_DTYPES), shape=(n, *grid), contiguous=False)
        if keep and source_block != layer_block:
            raise ValueError(f"{which}: codes in blocks of {source_block[0]}x{source_block[1]} can be kept only on the "
                             f"layer's own grid ({fmt.label}: blocks of {layer_block[0]}x{layer_block[1]} here)" +
                             _GRID_ADVICE.format(name=fmt.name))
        if self._experts_range(expert_begin, n):
            self._layer.set_weights(PROJECTIONS[which], int(expert_begin), n, codes.data_ptr(),
                                    ENCODED_DTYPES[codes.dtype], list(codes.stride()), scale.data_ptr(),
                                    SOURCE_DTYPES[scale.dtype], list(scale.stride()), source_block, keep)

    def load_stored(self, which: str, codes: torch.Tensor, scale: torch.Tensor, expert_begin: int = 0) -> None:
        """`set_projection(which, codes, expert_begin, scale=scale)` for a format that keeps a checkpoint's codes
        (fp8: float8_e4m3fn codes; int4 / int4-gemm: int32 words), on the layer's own grid; refuses any other."""
        fmt = self.format
        if fmt.stored_dtype is None:
            raise ValueError(f"load_stored: expert format {fmt.name} keeps no checkpoint tensors as they are "
                             "(formats that do: " + ", ".join(n for n, f in FORMATS.items() if f.stored_dtype) +
                             "); pass them to set_projection(which, codes, scale=..., block=...) to decode them")
        codes, scale = (t.unsqueeze(0) if isinstance(t, torch.Tensor) and t.dim() == 2 else t for t in (codes, scale))
        check_tensor(f"{which} codes", codes, dtype=fmt.stored_dtype, shape=(None, None, None), contiguous=False)
        self._set_encoded(which, codes, scale, expert_begin, None, True)

    def load_expert(self, expert: int, gate: Optional[torch.Tensor], up: torch.Tensor, down: torch.Tensor) -> None:
        """One expert from Hub-style per-expert tensors gate/up [I, H] and down [H, I] (gate None: ungated)."""
        for which, w in (("gate", gate), ("up", up), ("down", down)):
            if w is not None or which != "gate":
                self.set_projection(which, w, expert)

    def load_gate_up(self, gate_up_proj: torch.Tensor, expert_begin: int = 0, *, transposed: bool = False,
                     interleaved: bool = False) -> None:
        """transformers 5 fused layout gate_up_proj [n, 2I, H]: gate rows first, then up (`interleaved`: gate rows
        even, up odd, as gpt-oss; `transposed`: [n, H, 2I], gpt-oss's x @ W layout). Read as strided views: no
        copy."""
        I, H = self.intermediate_size, self.hidden_size
        check_tensor("gate_up_proj", gate_up_proj, dtype=tuple(SOURCE_DTYPES),
                     shape=(None, H, 2 * I) if transposed else (None, 2 * I, H), contiguous=False)
        w = gate_up_proj.transpose(1, 2) if transposed else gate_up_proj
        gate, up = (w[:, 0::2], w[:, 1::2]) if interleaved else (w[:, :I], w[:, I:])
        self.set_projection("gate", gate, expert_begin)
        self.set_projection("up", up, expert_begin)

    def load_gate_up_bias(self, bias: torch.Tensor, expert_begin: int = 0, *, interleaved: bool = False) -> None:
        """The fused gate_up biases [n, 2I] (gate first, then up; `interleaved`: gate even, up odd)."""
        I = self.intermediate_size
        check_tensor("gate_up_proj_bias", bias, dtype=tuple(SOURCE_DTYPES), shape=(None, 2 * I), contiguous=False)
        gate, up = (bias[:, 0::2], bias[:, 1::2]) if interleaved else (bias[:, :I], bias[:, I:])
        self.set_bias("gate", gate, expert_begin)
        self.set_bias("up", up, expert_begin)

    def load_fused(self, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, expert_begin: int = 0) -> None:
        """transformers 5 layout: gate_up_proj [n, 2I, H] (gate rows first, then up), down_proj [n, H, I]."""
        self.load_gate_up(gate_up_proj, expert_begin)
        self.set_projection("down", down_proj, expert_begin)

    @classmethod
    def from_fused(cls, gate_up_proj: torch.Tensor, down_proj: torch.Tensor, format: FormatLike = "bf16",
                   **kwargs) -> "ExpertLayer":
        E, two_i, H = gate_up_proj.shape
        layer = cls(E, H, two_i // 2, format, **kwargs)
        layer.load_fused(gate_up_proj, down_proj)
        return layer

    # ------------------------------------------------------------------ shared storage
    @property
    def storage_bytes(self) -> int:
        """Bytes of this layer's piece of a shared store: its packed experts as whole pages (use_storage)."""
        return self._layer.storage_bytes

    def use_storage(self, segment, offset: int, packed: bool) -> None:
        """Hold the packed experts in `segment` (an `_engine.SharedSegment`, kt_sft.engine.shared_store) at
        [offset, offset + storage_bytes) instead of this process's own memory; before any weight is loaded.
        packed: another process packed them there already (the layer is complete; loading into it is refused);
        else the segment is writable and loading packs into it."""
        self._layer.use_storage(segment, int(offset), bool(packed))
        self._segment = segment

    @property
    def shared_store(self) -> Optional[str]:
        """The path of the shared store holding this layer's experts (None: they are in this process's memory)."""
        return None if self._segment is None else self._segment.path

    # ------------------------------------------------------------------ packed panels
    def panels(self) -> PackedPanels:
        """A read-only view of the packed experts in the engine's memory (no copy; valid while this layer lives)."""
        return packed_panels(self._layer, self.format, self.num_experts)

    def biases(self) -> Optional[dict]:
        """{gate, up, down: fp32 [experts, I or H]} read-only views of the biases in the engine's memory (gate None
        for ungated experts; valid while this layer lives), or None for a layer without biases."""
        return bias_views(self._layer, self.num_experts, self.hidden_size, self.intermediate_size)

    def pin_panels(self) -> bool:
        """Page-lock the packed panels and their scales in place, so copies to a GPU run at full PCIe speed (the GPU
        share streams them on every call). Done once per layer: CUDA refuses a second registration of any page.
        False when CUDA refused some of them (their copies then run at pageable speed). __del__ undoes it before
        the engine frees the memory, which malloc may hand out again."""
        if self._pinned is None:
            cudart, self._pinned, self._all_pinned = torch.cuda.cudart(), [], True
            # A shared store another process packed is mapped read-only here: CUDA registers such pages only
            # with cudaHostRegisterReadOnly.
            flags = CUDA_HOST_REGISTER_READ_ONLY if self._segment is not None and not self._segment.writable else 0
            for which in PROJECTIONS.values():
                scales = self._layer.scale_storage(which)
                # Small scale grids (per channel, FP8 blocks) may share a heap page with another registered range,
                # which CUDA refuses; they copy fast enough pageable. Large ones (int4 groups) get their own pages.
                ranges = (self._layer.panel_storage(which),) + ((scales,) if scales[1] >= 1 << 20 else ())
                for address, nbytes in ranges:
                    if nbytes and int(cudart.cudaHostRegister(address, nbytes, flags)) == 0:
                        self._pinned.append(address)
                    elif nbytes:
                        self._all_pinned = False
        return self._all_pinned

    def __del__(self) -> None:
        for address in self._pinned or ():
            torch.cuda.cudart().cudaHostUnregister(address)

    def missing_weights(self) -> list[str]:
        return list(self._layer.missing_weights())

    # ------------------------------------------------------------------ compute
    def _check_routing(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> None:
        check_tensor("x", x, dtype=self.dtype, shape=(None, self.hidden_size))
        T = x.shape[0]
        check_tensor("topk_ids", topk_ids, dtype=torch.int64, shape=(T, None))
        if topk_ids.shape[1] < 1:
            raise ValueError("topk_ids: expected at least one expert per token (k >= 1)")
        check_tensor("topk_weights", topk_weights, dtype=torch.float32, shape=tuple(topk_ids.shape))

    def _lora_args(self, lora: Optional[ExpertLoRA]) -> dict:
        if lora is None:
            return {}
        ranks = check_lora(lora, self.num_experts, self.hidden_size, self.intermediate_size, self.activation.gated)
        ptrs = [0 if t is None else t.data_ptr() for t in lora.factors()]
        return dict(lora_ranks=list(ranks), lora_scales=[float(lora.scale_gu), float(lora.scale_d)],
                    lora_factors=ptrs)

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, save_for_backward: bool = False,
        out: Optional[torch.Tensor] = None, lora: Optional[ExpertLoRA] = None,
    ) -> tuple[torch.Tensor, int]:
        """y [T, H] (engine dtype; written into `out` when given) and a handle for `backward` (0: nothing saved).

        `lora`: per-expert LoRA on gate_up / down (fp32 CPU factors in PEFT's layout, see kt_sft.engine.lora),
        computed in fp32 inside the engine; the same factors must be passed to `backward`.
        """
        self._check_routing(x, topk_ids, topk_weights)
        T, k = topk_ids.shape
        if out is not None:
            check_tensor("out", out, dtype=self.dtype, shape=(T, self.hidden_size))
        largs = self._lora_args(lora)
        y = out if out is not None else _host_output((T, self.hidden_size), self.dtype)
        handle = self._layer.forward(T, k, x.data_ptr(), topk_ids.data_ptr(), topk_weights.data_ptr(), y.data_ptr(),
                                     bool(save_for_backward), **largs)
        if handle:
            self._issued.append(int(handle))
            if len(self._issued) > 2 * self.max_saved:
                self._prune_issued()
        return y, handle

    def backward(self, handle: int, dy: torch.Tensor, lora: Optional[ExpertLoRA] = None):
        """(dx [T, H] engine dtype, d topk_weights [T, k] float32) for the forward that returned `handle`.

        When that forward ran with `lora`, pass the same factors: the result is then (dx, dw, ExpertLoRAGrads)
        with fp32 gradients of A_gu, B_gu, A_d, B_d in their own layouts (zeros for experts no token was routed to).
        """
        T, k = self._layer.saved_shape(int(handle))
        check_tensor("dy", dy, dtype=self.dtype, shape=(T, self.hidden_size))
        largs = self._lora_args(lora)
        saved = tuple(self._layer.saved_lora_ranks(int(handle)))
        if lora is None and saved != (0, 0):
            raise ValueError(f"backward: the forward ran with LoRA (ranks gate_up={saved[0]}, down={saved[1]}); "
                             "pass the same lora= to backward")
        if lora is not None and tuple(largs["lora_ranks"]) != saved:
            raise ValueError(f"backward: lora ranks (gate_up={largs['lora_ranks'][0]}, down={largs['lora_ranks'][1]})"
                             f" differ from the forward's (gate_up={saved[0]}, down={saved[1]})")
        dx = _host_output((T, self.hidden_size), self.dtype)
        dw = _host_output((T, k), torch.float32)
        grads = None
        if lora is not None:
            grads = ExpertLoRAGrads(*(None if t is None else _host_output(t.shape, t.dtype) for t in lora.factors()))
            largs["lora_grads"] = [0 if g is None else g.data_ptr() for g in grads]
        self._layer.backward(int(handle), T, k, dy.data_ptr(), dx.data_ptr(), dw.data_ptr(), **largs)
        return (dx, dw) if grads is None else (dx, dw, grads)

    def grow_saved(self, n: int) -> None:
        """Keep at least `n` saved forwards from now on (engine slots and the retained-forward cache alike)."""
        if n > self.max_saved:
            self._layer.grow_saved(int(n))

    def _live(self, handle: int) -> bool:
        try:
            self._layer.saved_shape(handle)
            return True
        except RuntimeError:  # consumed by its backward, released, or its slot reused by a later forward
            return False

    def _prune_issued(self) -> None:
        self._issued = [h for h in self._issued if self._live(h)]

    @property
    def saved_forwards(self) -> int:
        """How many forwards' activations the engine holds for a backward that has not run yet (0 after every
        backward, and after forwards that saved nothing: inference, a DPO reference forward)."""
        self._prune_issued()
        return len(self._issued)

    @property
    def max_saved(self) -> int:
        """Forwards with save_for_backward this layer keeps at once (the engine's slots; `retained` as many)."""
        return self._layer.max_saved

    def release(self, handle: int) -> None:
        """Drop what a forward saved (its backward will not come)."""
        if handle:
            self._layer.release(int(handle))

    @property
    def packed_bytes(self) -> int:
        return self._layer.packed_bytes

    @property
    def expert_nodes(self) -> list[tuple[int, int, int]]:
        """(first expert, end, memory node) of each NUMA node the layer's experts were placed on when it was made
        (one entry on one node; memory node -1: its pages are not bound, e.g. on one node)."""
        return [tuple(node) for node in self._layer.expert_nodes]

    @property
    def saved_bytes(self) -> int:
        """Host bytes held for backward: the engine's slots plus the inputs/outputs kept for checkpoint reuse."""
        return self._layer.saved_bytes + self.retained.nbytes

    def __repr__(self) -> str:
        return (f"ExpertLayer(experts={self.num_experts}, hidden={self.hidden_size}, "
                f"intermediate={self.intermediate_size}, format={self.format.name}, "
                f"activation={self.activation.label}{', biases' if self.bias else ''}, "
                f"packed={self.packed_bytes / 2**20:.1f} MiB)")

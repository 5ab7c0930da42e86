// NOTE (kt-sft engine, the driver's row for each weight format)
// Layout:    kFormats[WeightFormat]: how a format is stored (activation dtype, panel kind, bits per weight, scale
//            kind: what packing.h writes) and how the driver schedules it (which phases quantize A, which
//            forward tasks expand their weight blocks, backward's transposed block size, task blocking). The
//            kernels of a format are its policy in kernels/ (moe_kernels.inc); Python's row is
//            kt_sft/engine/formats.py (it reads the layout from MoELayer.layout(), packing's descriptor). A layer
//            keeps its own copy of the row, with the scale grid it was built with (format_with_scale_block).
// Algorithm: plain data; the driver reads the layer's row once per call.
// Invariants: rows in WeightFormat order (checked at compile time); blocks per task <= kMaxTaskBlocks.
#pragma once
#include <stdexcept>
#include <string>

#include "kernel_api.h"

namespace kt_sft {

struct FormatInfo {
  WeightFormat format;
  const char* name;         // the _engine.WeightFormat member (kt_sft/engine/formats.py's ExpertFormat.code)
  int act_dtype;            // kF32 or kBF16: x, y, dx, dy and the activations between the GEMMs
  PanelKind panel;          // element order in the panels (common.h)
  int weight_bits;          // bits per packed weight (int4: two weights per byte)
  ScaleKind scales;         // fp32 multipliers beside the panels (common.h)
  int scale_block_n;        // ... one per scale_block_n output rows x scale_block_k reduction columns (0: the whole
  int scale_block_k;        //     padded dimension; per channel: 1 x 0). kBlock: the default a layer may change
  bool channel_scales;      // kBlock formats: also one fp32 scale per output channel, derived from the grid (INT4 GEMMs)
  bool quantized_gemm;      // each GEMM phase quantizes its A first (QuantJob); per-row outputs bf16 (INT8 GEMMs)
  bool expands_blocks;      // forward tasks expand their weight blocks (to bf16, or int8 quads) into Scratch::wdq
  int transposed_bytes;     // bytes per element of backward's transposed blocks (Scratch::packed)
  int transposed_k_align;   // their reduction length is rounded up to a multiple of this (quads: 64)
  int fwd_row_chunk;        // forward rows per task
  int gate_up_blocks;       // column blocks per task: forward gate_up, forward down, backward dz.W_gu (dx)
  int down_blocks;
  int dx_blocks;
};

// ---- task blocking (every format's row takes its values from these) ----
constexpr int kRowChunk = 256;      // forward rows per task: balances skewed experts, keeps A rows in L2
constexpr int kRowChunkInt8 = 1024; // int8 layers: each forward task dequantizes its weight block, so fewer, longer
                                    // (int8-GEMM layers, which read quads in place, use it too: not tuned apart)
// Column blocks per task of each GEMM phase: a task walks each 32-row block of its A rows (x, act, dy, dz)
// across all its blocks, so those rows come from L2 once per task row block instead of once per 32 output
// columns from L3 (measured with bench_moe.py --against: dx 44.6 -> 36.7 ms, dy.W_down 29.7 -> 26.1 ms).
constexpr int kGateUpBlocksPerTask = 2;  // forward gate_up: x rows (32 x Hp) for 2 x this many GEMMs
constexpr int kDownBlocksPerTask = 4;
constexpr int kDxBlocksPerTask = 4;
// Layers with int8 GEMMs read int8 A rows, half the bytes: twice the blocks per task fit the same L2 share (not for
// bwd_act, whose fused LoRA sums are sized by kActBlocksPerTask, schedule.h).
constexpr int kGateUpBlocksPerTaskInt8 = 4;
constexpr int kDownBlocksPerTaskInt8 = 8;
constexpr int kDxBlocksPerTaskInt8 = 8;
// The same for every format:
constexpr int kRowChunkBwd = 2048;  // backward tasks repack their weight block first: fewer, longer tasks
constexpr int kActBlocksPerTask = 4;  // backward dy.W_down + dSiLU-GLU (dy rows: 32 x Hp)
constexpr int kWholeSegment = 1 << 30;  // a row chunk no expert reaches: one task per expert x block group
static_assert(kActBlocksPerTask <= kMaxTaskBlocks, "see Task");

inline constexpr FormatInfo kFormats[kNumFormats] = {
    // format, name, activations, panel, weight bits, scales (kind, block n x k), derived channel scales, quantized
    // GEMM, expands blocks, transposed (bytes, k align), forward rows per task, blocks per task (gate_up, down, dx)
    {WeightFormat::kF32, "f32", kF32, PanelKind::kF32, 32, ScaleKind::kNone, 0, 0, false, false, false, 4, 1, kRowChunk,
     kGateUpBlocksPerTask, kDownBlocksPerTask, kDxBlocksPerTask},
    {WeightFormat::kBF16, "bf16", kBF16, PanelKind::kPairs, 16, ScaleKind::kNone, 0, 0, false, false, false, 2, 1, kRowChunk,
     kGateUpBlocksPerTask, kDownBlocksPerTask, kDxBlocksPerTask},
    {WeightFormat::kInt8, "int8", kBF16, PanelKind::kPairs, 8, ScaleKind::kChannel, 1, 0, false, false, true, 2, 1,
     kRowChunkInt8, kGateUpBlocksPerTask, kDownBlocksPerTask, kDxBlocksPerTask},
    {WeightFormat::kInt8Gemm, "int8_gemm", kBF16, PanelKind::kQuads, 8, ScaleKind::kChannel, 1, 0, false, true, false, 1, 64,
     kRowChunkInt8, kGateUpBlocksPerTaskInt8, kDownBlocksPerTaskInt8, kDxBlocksPerTaskInt8},
    // fp8 and int4 decode their blocks per task like int8 (its row lengths and blocking: not tuned apart)
    {WeightFormat::kFp8, "fp8", kBF16, PanelKind::kPairs, 8, ScaleKind::kBlock, 128, 128, false, false, true, 2, 1,
     kRowChunkInt8, kGateUpBlocksPerTask, kDownBlocksPerTask, kDxBlocksPerTask},
    {WeightFormat::kInt4, "int4", kBF16, PanelKind::kPairs, 4, ScaleKind::kBlock, 1, 32, false, false, true, 2, 1,
     kRowChunkInt8, kGateUpBlocksPerTask, kDownBlocksPerTask, kDxBlocksPerTask},
    // int4 GEMMs: int4's panels, int8 GEMMs on blocks each task expands (int8 GEMMs' blocking: not tuned apart)
    {WeightFormat::kInt4Gemm, "int4_gemm", kBF16, PanelKind::kPairs, 4, ScaleKind::kBlock, 1, 32, true, true, true, 1,
     64, kRowChunkInt8, kGateUpBlocksPerTaskInt8, kDownBlocksPerTaskInt8, kDxBlocksPerTaskInt8},
};

constexpr bool format_rows_valid() {
  for (int f = 0; f < kNumFormats; ++f) {
    const FormatInfo& r = kFormats[f];
    if (int(r.format) != f) return false;
    if (r.gate_up_blocks > kMaxTaskBlocks || r.down_blocks > kMaxTaskBlocks || r.dx_blocks > kMaxTaskBlocks)
      return false;
  }
  return true;
}
static_assert(format_rows_valid(), "kFormats: WeightFormat order, blocks <= kMaxTaskBlocks");

// The row of a format; throws std::invalid_argument for a value outside WeightFormat. (Driver only: formats.h is
// never included by an ISA unit.)
inline const FormatInfo& format_info(WeightFormat f) {
  if (int(f) < 0 || int(f) >= kNumFormats)
    throw std::invalid_argument("unknown weight format " + std::to_string(int(f)));
  return kFormats[int(f)];
}

// The row of format f as one layer uses it: with a scale grid of block_n x block_k weights (0: the whole padded
// dimension, so (1, 0) is per channel and (0, 0) one scale per matrix). Only kBlock formats take a grid other than
// their row's; throws std::invalid_argument naming the sizes otherwise.
inline FormatInfo format_with_scale_block(WeightFormat f, int block_n, int block_k) {
  FormatInfo r = format_info(f);
  if (block_n == r.scale_block_n && block_k == r.scale_block_k) return r;
  const std::string sizes = std::to_string(block_n) + " x " + std::to_string(block_k);
  if (r.scales != ScaleKind::kBlock)
    throw std::invalid_argument(std::string("format ") + r.name + " has no scale grid to choose (got " + sizes + ")");
  if (block_n < 0 || block_k < 0)
    throw std::invalid_argument(std::string("format ") + r.name + ": scale block sizes must be >= 0 (0: the whole "
                                "dimension), got " + sizes);
  r.scale_block_n = block_n;
  r.scale_block_k = block_k;
  return r;
}

}  // namespace kt_sft

// NOTE (kt-sft engine, packing and quantization: the only writer of the panel layout)
// Layout:    PackedWeights owns one layer's packed experts: per projection (gate [I][H], up [I][H], down [H][I])
//            one 64-byte aligned block of E experts' panels (common.h: Np/16 panels of Kp x 16 elements, the
//            format's PanelKind and element bytes) and, for a quantized format, one block of fp32 scales
//            ([E] x the scale grid). ProjectionLayout describes all of it; MoELayer.layout() hands it to Python
//            (kt_sft/engine/gpu_share.py unpacks panels with it instead of re-deriving the layout).
// Algorithm: pack() converts (or quantizes) experts [e0, e0+n) of one projection from a strided float source, one
//            pool task per (expert, panel): plain formats round each element to the panel type (bf16: round to
//            nearest even); per-channel int8 computes s = max_k |w[n][k]| / 127 per output row n and
//            q = clamp(round_half_even(w / s), -127, 127) (common.h, INT8). Block-scaled formats (fp8, int4) first
//            compute their scale grid, one task per (expert, grid row), then code each weight with its block's
//            scale (common.h, FP8 / INT4). pack_stored() keeps a checkpoint's own codes and scales (fp8: e4m3
//            bytes, int4: int32 words of 8 nibbles), when its grid is the layer's. A format with derived channel
//            scales (INT4 GEMMs) then computes them from each packed expert's grid. Padding rows/columns are written
//            as zero weights (code 0; int4: nibble 8), padding-only grid cells as scale 0.
//            The panels live in PlacedMemory (numa.h): each node's experts are bound to its memory node when the
//            storage is made, before packing first touches it.
// Invariants: every byte of an expert's panels (and scales) is written by one pack() of it; NaN/Inf in the source
//            (a NaN code or a non-finite scale of a stored one) is reported (the first such expert), never packed
//            silently.
#pragma once
#include <cstdint>
#include <utility>

#include "buffer.h"
#include "formats.h"
#include "numa.h"

namespace kt_sft {

class ThreadPool;

// One projection's packed storage, as packing writes it.
struct ProjectionLayout {
  Proj proj;
  int N, K;             // the weight's rows (output channels) and columns (reduction): W[N][K]
  int Np, Kp;           // both padded to multiples of kBlock
  PanelKind panel;      // element (n, k) of a panel at panel_index(panel, n % 16, k) (common.h)
  int elem_bits;        // bits per packed element (4: two per byte, the even k in the low nibble)
  size_t expert_bytes;  // one expert's panels: Np * Kp * elem_bits / 8
  ScaleKind scales;     // kNone: no scales below
  int scale_block_n;    // one scale per scale_block_n output rows x scale_block_k reduction columns
  int scale_block_k;
  int scale_rows;       // one expert's scale grid: ceil(Np / block_n) x ceil(Kp / block_k), stored by column
  int scale_cols;       // (common.h: scale (n, k) at [(k / block_k) * scale_rows + n / block_n])
  bool channel;         // kBlock formats: also [Np] channel scales per expert derived from the grid (INT4 GEMMs)
};

// A source tensor: element (e, r, c) of experts e0.. at data[e * s_e + r * s_r + c * s_c], dtype kF32/kBF16/kF16.
struct WeightSource {
  const void* data;
  int dtype;
  int64_t s_e, s_r, s_c;
};

// A checkpoint's own quantized tensors for experts e0..: codes (fp8: e4m3 bytes [n][N][K]; int4: int32 words
// [n][N][ceil(K/8)], nibble i of a word at bits 4i, lowest first along K, stored q + 8) and their fp32/bf16/fp16
// scales [n][rows][cols], element strides for both; rows x cols must be the layer's grid over [N][K].
struct StoredSource {
  const void* codes;
  int64_t s_e, s_r, s_c;
  const void* scales;
  int scale_dtype;
  int64_t ss_e, ss_r, ss_c;
  int scale_rows, scale_cols;
};

struct SourceRow;
struct StoredRow;
// One format's packing (packing.cpp, kPackers): its panel from a float source, the scale grid it computes first
// (block-scaled formats) and its panel from stored codes (formats that keep a checkpoint's codes; else null).
struct Packer {
  bool (*panel)(const ProjectionLayout&, const SourceRow&, int row0, void* dst, float* scales);
  bool (*grid_row)(const ProjectionLayout&, const SourceRow&, int grid_row, float* scales);
  bool (*stored_panel)(const ProjectionLayout&, const StoredRow&, int row0, void* dst);
};

class PackedWeights {
 public:
  // nodes: where each expert's panels are placed (expert_nodes, numa.h).
  PackedWeights(int experts, int hidden, int intermediate, const FormatInfo& format, const ExpertNodes& nodes);
  const ProjectionLayout& layout(Proj p) const { return layout_[int(p)]; }
  // Packs experts [e0, e0 + n) of projection p from src; returns the first of them whose source holds NaN/Inf
  // (its panels are then not to be used), or -1.
  int pack(ThreadPool& pool, Proj p, int e0, int n, const WeightSource& src);
  // The same from a checkpoint's own codes and scales; throws std::invalid_argument when the format keeps no stored
  // codes or the scale grid differs from the layer's.
  int pack_stored(ThreadPool& pool, Proj p, int e0, int n, const StoredSource& src);
  WeightView view(Proj p) const;
  std::pair<const void*, size_t> panel_storage(Proj p) const;  // all experts' panels
  std::pair<const void*, size_t> scale_storage(Proj p) const;  // all experts' scales; (null, 0) without
  size_t bytes() const;  // panels, scales and derived channel scales of all projections
  size_t expert_elems() const { return size_t(layout_[0].Np) * layout_[0].Kp; }

 private:
  // Runs panel(expert, panel index) over experts [e0, e0 + n) of p; returns the first expert it failed on, or -1.
  template <class PanelFn>
  int run_panels(ThreadPool& pool, Proj p, int e0, int n, const PanelFn& panel);
  float* expert_scales(Proj p, int e) const;
  void derive_channel_scales(ThreadPool& pool, Proj p, int e0, int n);  // INT4 GEMMs' S of experts [e0, e0 + n)

  int E_;
  Packer packer_;  // the format's (packing.cpp, kPackers)
  ProjectionLayout layout_[kNumProj];
  PlacedMemory panels_[kNumProj];
  Buffer scales_[kNumProj], channel_[kNumProj];
};

}  // namespace kt_sft

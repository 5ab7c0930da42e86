// NOTE (kt-sft engine, packing and quantization: the only writer of the panel layout)
// Layout:    PackedWeights owns one layer's packed experts: per projection (gate [I][H], up [I][H], down [H][I])
//            one 64-byte aligned block of E experts' panels (common.h: Np/16 panels of Kp x 16 elements, the
//            format's PanelKind and element bytes) and, for a quantized format, one block of fp32 scales
//            ([E] x the scale grid). ProjectionLayout describes all of it; MoELayer.layout() hands it to Python
//            (kt_sft/engine/gpu_share.py unpacks panels with it instead of re-deriving the layout).
// Algorithm: pack() fills experts [e0, e0+n) of one projection from a WeightSource: plain floats (fp32 / bf16 /
//            fp16), or a checkpoint's encoded tensors (e4m3 codes with block scales of any shape, per channel
//            included; int4 pack-quantized words with group scales of any size), which packing decodes itself to
//            W = fl32(value * scale) (the values kt_sft/checkpoint_formats.decode gives: e4m3 / int4 bytes through
//            tables of their exact values, then one multiply per weight). Each pool task decodes a band of rows into
//            its worker's fp32 buffer (Engine::decoded; zeros in the padding) and codes them from there: 16 rows (one
//            panel), or for a format with a scale grid to compute, whole grid rows too (lcm of both; a band above
//            kMaxBandBytes computes the grid in a pass of its own first). Plain formats round each element to the
//            panel type (bf16: round to nearest even); per-channel int8 computes s = max_k |w[n][k]| / 127 per
//            output row n and q = clamp(round_half_even(w / s), -127, 127) (common.h, INT8). Block-scaled formats
//            (fp8, int4) compute each block's scale s = max |w| / 448 (or / 7), then code each weight with it
//            (common.h, FP8 / INT4). The coders are branch-free loops the compiler vectorizes (rounding by adding
//            and subtracting 1.5 * 2^23, clamps and selects as bit masks), bit-identical to the scalar
//            definitions in common.h (checked over all 2^32 floats); each row's codes, in k order, then go to
//            their panel places one unit (panel_group(k) consecutive codes) at a time. keep_codes keeps an
//            encoded source's codes and scales as they are (fp8: e4m3 bytes; int4: the words' bytes, already
//            nibble pairs) when the format stores that element type on the same grid. A format with derived
//            channel scales (INT4 GEMMs) then computes them from each packed expert's grid. Padding rows/columns
//            are written as zero weights (code 0; int4: nibble 8), padding-only grid cells as scale 0.
//            The panels, scales and channel scales live in PlacedMemory (numa.h): each node's experts are bound to
//            its memory node when the storage is made, before packing first touches it. use_storage moves all of
//            them into one caller-given range (a host's shared expert store, shared_segment.h), one page-aligned
//            piece after another (storage_bytes), before anything is packed.
// Invariants: every byte of an expert's panels (and scales) is written by one pack() of it; NaN/Inf in the source
//            (a NaN code or a non-finite scale of an encoded one) is reported (the first such expert), never
//            packed silently; pack() runs under the engine's mutex (its decode buffers are the engine's).
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

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
  bool stored;          // false: the layer has no such projection (an ungated layer's gate, activations.h), no bytes
};

// Where one projection's weights come from (experts e0.., element strides): plain floats, or a checkpoint's encoded
// tensors that packing decodes itself, W(r, c) = fl32(value(code) * scale(r / block_n, c / block_k)) exactly as
// kt_sft/checkpoint_formats.decode does. kE4m3: e4m3 bytes [n][N][K] (0x7f / 0xff NaN); kInt4: int32 words
// [n][N][ceil(K/8)] of 8 nibbles, nibble i of a word at bits 4i, lowest first along K, stored q + 8 (value q).
// Scales: fp32 / bf16 / fp16 [n][ceil(N/block_n)][ceil(K/block_k)]; blocks of any size >= 1, edge blocks partial
// (per channel: 1 x K; int4 groups: 1 x G).
enum class SourceKind : int { kFloat = 0, kE4m3 = 1, kInt4 = 2 };
struct WeightSource {
  SourceKind kind = SourceKind::kFloat;
  const void* data = nullptr;
  int dtype = kF32;  // kFloat: kF32 / kBF16 / kF16
  int64_t s_e = 0, s_r = 0, s_c = 0;  // element strides of data (kInt4: of its words)
  const void* scales = nullptr;       // encoded kinds only
  int scale_dtype = kF32;
  int64_t ss_e = 0, ss_r = 0, ss_c = 0;
  int block_n = 1, block_k = 1;
};

class PackedWeights {
 public:
  // nodes: where each expert's panels are placed (expert_nodes, numa.h); gated false: no gate projection is stored.
  PackedWeights(int experts, int hidden, int intermediate, const FormatInfo& format, const ExpertNodes& nodes,
                bool gated);
  const ProjectionLayout& layout(Proj p) const { return layout_[int(p)]; }
  // Packs experts [e0, e0 + n) of projection p from src, on the pool with one decode buffer per worker in
  // `scratch` (grown as needed). keep_codes: an encoded source's codes and scales are kept as they are (fp8 from
  // kE4m3, int4 formats from kInt4, on the layer's own grid); else every source is decoded and packed. Returns the
  // first expert whose source holds NaN/Inf (its panels are then not to be used), or -1; throws
  // std::invalid_argument for a source the layer cannot take (naming why) before writing anything.
  int pack(ThreadPool& pool, std::vector<Buffer>& scratch, Proj p, int e0, int n, const WeightSource& src,
           bool keep_codes);
  // Bytes of one range holding every piece of this layer's storage (panels, scales, channel scales of each
  // projection), each piece starting on a page.
  size_t storage_bytes() const;
  // Moves every piece into [base, base + storage_bytes()) (page-aligned, owned by the caller, outliving this
  // object); what was packed before is not kept. place: bind each node's experts to its memory (the process that
  // packs; one that maps pages packed elsewhere finds them placed).
  void use_storage(char* base, const ExpertNodes& nodes, bool place);
  WeightView view(Proj p) const;
  std::pair<const void*, size_t> panel_storage(Proj p) const;  // all experts' panels
  std::pair<const void*, size_t> scale_storage(Proj p) const;  // all experts' scales; (null, 0) without
  size_t bytes() const;  // panels, scales and derived channel scales of all projections
  size_t expert_elems() const { return size_t(layout_[0].Np) * layout_[0].Kp; }

 private:
  int pack_decoded(ThreadPool& pool, std::vector<Buffer>& scratch, Proj p, int e0, int n, const WeightSource& src);
  int grid_pass(ThreadPool& pool, std::vector<Buffer>& scratch, Proj p, int e0, int n, const WeightSource& src);
  int pack_kept(ThreadPool& pool, std::vector<Buffer>& scratch, Proj p, int e0, int n, const WeightSource& src);
  // Runs fn(task, worker) for tasks [0, n); returns the first task it returned false for, or -1.
  template <class Fn>
  static int first_failed(ThreadPool& pool, int n, const Fn& fn);
  float* expert_scales(Proj p, int e) const;
  char* expert_panels(Proj p, int e) const;
  void derive_channel_scales(ThreadPool& pool, Proj p, int e0, int n);  // INT4 GEMMs' S of experts [e0, e0 + n)
  // The storage pieces, in storage order: panels, scales, channel scales of each projection (0 bytes: none).
  static constexpr int kPieces = 3 * kNumProj;
  PlacedMemory& piece(int i) { return i % 3 == 0 ? panels_[i / 3] : i % 3 == 1 ? scales_[i / 3] : channel_[i / 3]; }
  size_t piece_bytes(int i) const;

  int E_;
  WeightFormat format_;
  ProjectionLayout layout_[kNumProj];
  PlacedMemory panels_[kNumProj], scales_[kNumProj], channel_[kNumProj];
};

}  // namespace kt_sft

#include "packing.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "thread_pool.h"

namespace kt_sft {
namespace {

// The rows of one grid row, decoded together so that its scales come from them (grid formats), take at most this
// much fp32 buffer per worker; a taller grid row (per-tensor scales, blocks of thousands of rows) is computed in a
// pass of its own instead, decoding a row at a time (and decoding again to code). DeepSeek-V3's fp8 blocks of 128
// rows over K = 7168: 3.5 MiB (1 MiB instead measured no faster: 43 vs 40-49 ms per 2048 x 7168 tensor, one core).
constexpr size_t kMaxBandBytes = size_t(8) << 20;
constexpr uint32_t kAbsMask = 0x7fffffffu, kInfBits = 0x7f800000u;
// 1.5 * 2^23: x + kRound - kRound is x rounded to an integer, half to even, for |x| <= 2^22 (the sum's ulp is 1), in
// plain adds the compiler vectorizes (nearbyint is a library call per element).
constexpr float kRound = 12582912.0f;

// Blocks of `block` elements covering `len` (any positive block: computed without overflow).
int blocks_over(int len, int block) { return int((int64_t(len) + block - 1) / block); }
int block_end(int start, int block, int len) { return int(std::min<int64_t>(len, int64_t(start) + block)); }
// The first of two failing experts (-1: none).
int earliest(int a, int b) { return a < 0 ? b : b < 0 ? a : std::min(a, b); }
uint32_t abs_bits(float v) { return f32_to_bits(v) & kAbsMask; }

ProjectionLayout make_layout(Proj p, int H, int I, const FormatInfo& f) {
  ProjectionLayout l{};
  l.proj = p;
  l.N = p == Proj::kDown ? H : I;
  l.K = p == Proj::kDown ? I : H;
  l.Np = round_up(l.N, kBlock);
  l.Kp = round_up(l.K, kBlock);
  l.panel = f.panel;
  l.elem_bits = f.weight_bits;
  l.expert_bytes = size_t(l.Np) * l.Kp * l.elem_bits / 8;
  l.scales = f.scales;
  if (f.scales != ScaleKind::kNone) {  // block sizes 0: the whole padded dimension
    l.scale_block_n = f.scale_block_n > 0 ? f.scale_block_n : l.Np;
    l.scale_block_k = f.scale_block_k > 0 ? f.scale_block_k : l.Kp;
    l.scale_rows = blocks_over(l.Np, l.scale_block_n);
    l.scale_cols = blocks_over(l.Kp, l.scale_block_k);
    l.channel = f.channel_scales;
  }
  return l;
}

// ---- decoding: one source row into fp32 ----

// c ? a : b as bit masks: the compiler vectorizes loops of these, where it keeps some ternaries (and every float
// comparison, which may trap) as branches.
uint32_t select(bool c, uint32_t a, uint32_t b) {
  const uint32_t m = 0u - uint32_t(c);
  return (a & m) | (b & ~m);
}

// e4m3_to_f32 (common.h) without branches: e4m3 is fp32 with a 4-bit exponent of bias 7 and 3 mantissa bits, so a
// normal code's exponent and mantissa move up by 20 bits and its exponent gains 120; subnormals are m * 2^-9.
float e4m3_value(uint32_t b) {
  const uint32_t em = b & 0x7fu;
  uint32_t v = select(em < 8u, f32_to_bits(float(int(em)) * 0.001953125f), (em << 20) + (120u << 23));
  v = select(em == 0x7fu, 0x7fc00000u, v);  // the NaN codes
  return bits_to_f32(v | ((b & 0x80u) << 24));
}

void float_values(const WeightSource& s, int64_t at, int K, float* out) {
  const int64_t sc = s.s_c;
  if (s.dtype == kF32) {
    const float* p = static_cast<const float*>(s.data) + at;
    if (sc == 1) std::memcpy(out, p, size_t(K) * sizeof(float));
    else for (int k = 0; k < K; ++k) out[k] = p[k * sc];
    return;
  }
  const uint16_t* p = static_cast<const uint16_t*>(s.data) + at;
  if (s.dtype == kF16) for (int k = 0; k < K; ++k) out[k] = f16_to_f32(p[k * sc]);
  else if (sc == 1) for (int k = 0; k < K; ++k) out[k] = bf16_to_f32(p[k]);
  else for (int k = 0; k < K; ++k) out[k] = bf16_to_f32(p[k * sc]);
}

// Each k's scale of source row `row` of expert e: blocks written out per element, so that the decode is one loop
// over the row whatever the block width (INT4's groups of 32 in separate loops: per-group overhead).
void source_k_scales(const WeightSource& s, int e, int row, int K, float* k_scales) {
  const int64_t at = int64_t(e) * s.ss_e + int64_t(row / s.block_n) * s.ss_r;
  for (int c = 0, k0 = 0; k0 < K; ++c, k0 = block_end(k0, s.block_k, K))
    std::fill(k_scales + k0, k_scales + block_end(k0, s.block_k, K),
              load_as_f32(s.scales, size_t(at + int64_t(c) * s.ss_c), s.scale_dtype));
}

// fl32(value * scale) of each e4m3 code of the row.
void e4m3_values(const WeightSource& s, int64_t at, int K, const float* k_scales, float* out) {
  const uint8_t* p = static_cast<const uint8_t*>(s.data) + at;
  if (s.s_c == 1) for (int k = 0; k < K; ++k) out[k] = e4m3_value(p[k]) * k_scales[k];
  else for (int k = 0; k < K; ++k) out[k] = e4m3_value(p[k * s.s_c]) * k_scales[k];
}

// fl32(q * scale) of each int4 code of the row (whole words: 8 * ceil(K / 8) <= Kp values; k_scales past K are
// overwritten after). A little-endian word's byte j holds nibbles 2j and 2j + 1.
void int4_values(const WeightSource& s, int64_t at, int K, const float* k_scales, float* out) {
  const int32_t* p = static_cast<const int32_t*>(s.data) + at;
  const int words = blocks_over(K, 8);
  if (s.s_c == 1) {
    const uint8_t* bytes = reinterpret_cast<const uint8_t*>(p);
    for (int j = 0; j < 4 * words; ++j) {
      out[2 * j] = float(int(bytes[j] & 15u) - 8) * k_scales[2 * j];
      out[2 * j + 1] = float(int(bytes[j] >> 4) - 8) * k_scales[2 * j + 1];
    }
    return;
  }
  for (int w = 0; w < words; ++w)
    for (int i = 0; i < 8; ++i)
      out[8 * w + i] = float(int((uint32_t(p[w * s.s_c]) >> (4 * i)) & 15u) - 8) * k_scales[8 * w + i];
}

// W(row, k) of expert e (relative to the source's first) into out[0, Kp), zeros from K on (rows >= N: all zeros);
// k_scales: Kp floats of room.
void decode_row(const WeightSource& s, int e, int row, const ProjectionLayout& l, float* out, float* k_scales) {
  if (row >= l.N) {
    std::fill(out, out + l.Kp, 0.f);
    return;
  }
  const int64_t at = int64_t(e) * s.s_e + int64_t(row) * s.s_r;
  if (s.kind == SourceKind::kFloat) {
    float_values(s, at, l.K, out);
  } else {
    source_k_scales(s, e, row, l.K, k_scales);
    std::fill(k_scales + l.K, k_scales + l.Kp, 0.f);
    if (s.kind == SourceKind::kE4m3) e4m3_values(s, at, l.K, k_scales, out);
    else int4_values(s, at, l.K, k_scales, out);
  }
  std::fill(out + l.K, out + l.Kp, 0.f);
}

// max |w[k]| over [k0, k1) as fp32 bits, which order as the values do (non-negative: compared as int32); bits of
// kInfBits or more: an Inf or NaN among them.
int32_t max_abs_bits(const float* w, int k0, int k1) {
  int32_t m = 0;
  for (int k = k0; k < k1; ++k) {
    const int32_t a = int32_t(abs_bits(w[k]));
    m = a > m ? a : m;
  }
  return m;
}

// ---- coding one decoded row (Kp values, zeros past K) into its panel codes, in k order ----
// Each returns false if the row holds NaN/Inf; the block-scaled ones (fp8, int4) leave that to their grid's amax.

// fp32: the values are the codes.
bool f32_row(const ProjectionLayout& l, const float* w, int, float*, float*, uint8_t* codes) {
  std::memcpy(codes, w, size_t(l.Kp) * sizeof(float));
  return max_abs_bits(w, 0, l.Kp) < int32_t(kInfBits);
}

// bf16: round to nearest even, NaN kept a (quiet) NaN: f32_to_bf16 without branches.
bool bf16_row(const ProjectionLayout& l, const float* w, int, float*, float*, uint8_t* out) {
  uint16_t* codes = reinterpret_cast<uint16_t*>(out);
  uint32_t special = 0;  // any exponent of all ones: Inf or NaN
  for (int k = 0, Kp = l.Kp; k < Kp; ++k) {
    const uint32_t u = f32_to_bits(w[k]);
    const uint16_t rounded = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    codes[k] = (u & kAbsMask) > kInfBits ? uint16_t((u >> 16) | 0x40u) : rounded;
    special |= uint32_t((u & kInfBits) == kInfBits);
  }
  return !special;
}

// clamp(round_half_even(x), -low, high) for integral low, high > 0, as nearbyint and std::min/max would give it
// (clamping first rounds the same); compared as bits, |x|'s order (NaN: a bound).
int round_clamped(float x, float low, float high) {
  const uint32_t u = f32_to_bits(x), a = u & kAbsMask, bound = select(u >> 31, f32_to_bits(low), f32_to_bits(high));
  const float clamped = bits_to_f32((u & ~kAbsMask) | select(a > bound, bound, a));
  return int((clamped + kRound) - kRound);
}

// Per-channel int8 (common.h, INT8): s = max_k |w| / 127 into scales[row], q = clamp(rne(w / s), -127, 127).
bool int8_row(const ProjectionLayout& l, const float* w, int row, float* scales, float*, uint8_t* out) {
  const int32_t amax = max_abs_bits(w, 0, l.K);
  const float s = bits_to_f32(uint32_t(amax)) / 127.0f;
  scales[row] = s;
  int8_t* q = reinterpret_cast<int8_t*>(out);
  if (!(s > 0.f && amax < int32_t(kInfBits))) {  // an all-zero row, or a non-finite one
    std::fill(q, q + l.Kp, int8_t(0));
    return amax < int32_t(kInfBits);
  }
  for (int k = 0, Kp = l.Kp; k < Kp; ++k) q[k] = int8_t(round_clamped(w[k] / s, 127.f, 127.f));
  return true;
}

// f32_to_e4m3 (common.h) without branches: the same code for every input.
uint8_t e4m3_code(float f) {
  const uint32_t u = f32_to_bits(f), a = u & kAbsMask;
  const uint32_t normal = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
  const bool tiny = a < 0x3c800000u;  // below 2^-6, the subnormals: steps of 2^-9 (exact scaling, RNE)
  const float steps = bits_to_f32(select(tiny, a, 0x3c800000u)) * 512.0f;
  uint32_t code = select(tiny, uint32_t(int((steps + kRound) - kRound)), normal);
  code = select(a >= 0x43e00000u, 0x7eu, code);  // >= 448: the largest finite value
  code = select(a > kInfBits, 0x7fu, code);
  return uint8_t(((u >> 24) & 0x80u) | code);
}

// s > 0 (Inf included, NaN not), as bits: grid scales are never negative.
bool positive(float s) { return f32_to_bits(s) - 1u < kInfBits; }

// Each k's scale of `row` in one expert's grid (stored by column), blocks written out per element as on the source
// side (source_k_scales); `unscaled` in place of a scale that is not positive.
void grid_k_scales(const ProjectionLayout& l, const float* grid, int row, float unscaled, float* k_scales) {
  const float* cells = grid + row / l.scale_block_n;  // the row's cell of each k block, scale_rows apart
  for (int c = 0, k0 = 0; k0 < l.Kp; ++c, k0 = block_end(k0, l.scale_block_k, l.Kp)) {
    const float s = cells[size_t(c) * l.scale_rows];
    std::fill(k_scales + k0, k_scales + block_end(k0, l.scale_block_k, l.Kp), positive(s) ? s : unscaled);
  }
}

// fp8 (common.h, FP8): e4m3(w / s) of each block's scale s, round to nearest even, saturating (s = 0: code 0).
bool fp8_row(const ProjectionLayout& l, const float* w, int row, float* grid, float* k_scales, uint8_t* codes) {
  grid_k_scales(l, grid, row, 0.f, k_scales);
  for (int k = 0, Kp = l.Kp; k < Kp; ++k)
    codes[k] = uint8_t(select(positive(k_scales[k]), e4m3_code(w[k] / k_scales[k]), 0u));
  return true;
}

// int4 (common.h, INT4): q = clamp(rne(w / s), -8, 7) stored q + 8 (s = 0: q = 0), two per byte, even k low. A block
// with s = 0 holds only zeros (of either sign), which s = 1 codes as q = 0 too: no select per weight.
bool int4_row(const ProjectionLayout& l, const float* w, int row, float* grid, float* k_scales, uint8_t* codes) {
  grid_k_scales(l, grid, row, 1.f, k_scales);
  for (int k2 = 0, pairs = l.Kp / 2; k2 < pairs; ++k2) {
    const int lo = round_clamped(w[2 * k2] / k_scales[2 * k2], 8.f, 7.f) + 8;
    const int hi = round_clamped(w[2 * k2 + 1] / k_scales[2 * k2 + 1], 8.f, 7.f) + 8;
    codes[k2] = uint8_t(lo | (hi << 4));
  }
  return true;
}

// ---- panel places ----

// Row nn of a panel from its codes in k order: unit u (the panel_group(panel) consecutive k of one row, `Unit`
// bytes) at panel[u * kPanel + nn] (common.h, panel_index).
template <class Unit>
void scatter_units(const uint8_t* codes, int units, char* panel, int nn) {
  for (int u = 0; u < units; ++u)
    std::memcpy(panel + (size_t(u) * kPanel + nn) * sizeof(Unit), codes + size_t(u) * sizeof(Unit), sizeof(Unit));
}
void scatter_row(const ProjectionLayout& l, const uint8_t* codes, char* panel, int nn) {
  const int unit_bytes = panel_group(l.panel) * l.elem_bits / 8, units = l.Kp / panel_group(l.panel);
  if (unit_bytes == 1) scatter_units<uint8_t>(codes, units, panel, nn);
  else if (unit_bytes == 2) scatter_units<uint16_t>(codes, units, panel, nn);
  else scatter_units<uint32_t>(codes, units, panel, nn);
}

// ---- codes kept as stored (one row of expert e, relative to the source's first, in k order) ----

// e4m3 bytes, zeros past K; false on a NaN code (0x7f, 0xff).
bool kept_e4m3_row(const WeightSource& s, int e, int row, const ProjectionLayout& l, uint8_t* codes) {
  const uint8_t* p = static_cast<const uint8_t*>(s.data) + int64_t(e) * s.s_e + int64_t(row) * s.s_r;
  if (s.s_c == 1) std::memcpy(codes, p, size_t(l.K));
  else for (int k = 0; k < l.K; ++k) codes[k] = p[k * s.s_c];
  uint8_t nan = 0;
  for (int k = 0, K = l.K; k < K; ++k) nan |= uint8_t((codes[k] & 0x7fu) == 0x7fu);
  std::fill(codes + l.K, codes + l.Kp, uint8_t(0));
  return !nan;
}

// Bytes of nibble pairs (a little-endian word's byte j holds nibbles 2j, 2j + 1: already the panel's pair byte),
// weight 0 (nibble 8) past K.
bool kept_int4_row(const WeightSource& s, int e, int row, const ProjectionLayout& l, uint8_t* codes) {
  const int32_t* p = static_cast<const int32_t*>(s.data) + int64_t(e) * s.s_e + int64_t(row) * s.s_r;
  if (s.s_c == 1) {
    std::memcpy(codes, p, size_t(blocks_over(l.K, 8)) * 4);
  } else {
    for (int w = 0; w < blocks_over(l.K, 8); ++w)
      for (int j = 0; j < 4; ++j) codes[4 * w + j] = uint8_t(uint32_t(p[w * s.s_c]) >> (8 * j));
  }
  if (l.K % 2) codes[l.K / 2] = uint8_t((codes[l.K / 2] & 0x0fu) | 0x80u);
  std::fill(codes + (l.K + 1) / 2, codes + l.Kp / 2, uint8_t(0x88));
  return true;
}

// ---- the table ----

// How one format packs (WeightFormat order): a decoded row into its codes (the row, its index, the expert's scales,
// Kp floats of room for per-k scales, the codes out), the largest code magnitude its block scales map a block's
// max |w| to (0: no grid to compute first), and the encoded source kind whose codes and scales it can keep as they
// are, with that kind's row function (kFloat: none).
using RowCoder = bool (*)(const ProjectionLayout&, const float*, int, float*, float*, uint8_t*);
using KeptRow = bool (*)(const WeightSource&, int, int, const ProjectionLayout&, uint8_t*);
struct FormatPacking {
  RowCoder row_codes;
  float grid_qmax;
  SourceKind kept;
  KeptRow kept_row;
};
constexpr FormatPacking kPacking[kNumFormats] = {
    {f32_row, 0.f, SourceKind::kFloat, nullptr},              // kF32
    {bf16_row, 0.f, SourceKind::kFloat, nullptr},             // kBF16: pairs
    {int8_row, 0.f, SourceKind::kFloat, nullptr},             // kInt8: pairs, channel scales
    {int8_row, 0.f, SourceKind::kFloat, nullptr},             // kInt8Gemm: quads, channel scales
    {fp8_row, 448.f, SourceKind::kE4m3, kept_e4m3_row},       // kFp8: e4m3 pairs, block scales
    {int4_row, 7.f, SourceKind::kInt4, kept_int4_row},        // kInt4: nibble pairs, group scales
    {int4_row, 7.f, SourceKind::kInt4, kept_int4_row},        // kInt4Gemm: int4's (channel scales derived after)
};

const char* kind_name(SourceKind k) {
  return k == SourceKind::kE4m3 ? "e4m3 (fp8)" : k == SourceKind::kInt4 ? "int4 (packed int32)" : "float";
}

// Throws std::invalid_argument unless `s` is a source pack() can read (and keep, when asked).
void check_source(const ProjectionLayout& l, const FormatPacking& f, const char* format, const WeightSource& s,
                  bool keep) {
  auto float_dtype = [](int dt) { return dt == kF32 || dt == kBF16 || dt == kF16; };
  if (!s.data) throw std::invalid_argument("source: null data");
  if (s.kind == SourceKind::kFloat) {
    if (!float_dtype(s.dtype)) throw std::invalid_argument("source dtype must be float32, bfloat16 or float16");
  } else {
    if (!s.scales) throw std::invalid_argument("an encoded source needs its scales");
    if (!float_dtype(s.scale_dtype)) throw std::invalid_argument("scale dtype must be float32, bfloat16 or float16");
    if (s.block_n < 1 || s.block_k < 1)
      throw std::invalid_argument("source scale blocks must be >= 1 weights, got " + std::to_string(s.block_n) +
                                  " x " + std::to_string(s.block_k));
  }
  if (!keep) return;
  if (s.kind == SourceKind::kFloat || f.kept != s.kind)
    throw std::invalid_argument(std::string("expert format ") + format + " keeps no " + kind_name(s.kind) +
                                " codes as they are");
  auto same = [](int a, int b, int len) { return std::min(a, len) == std::min(b, len); };
  if (!same(s.block_n, l.scale_block_n, l.N) || !same(s.block_k, l.scale_block_k, l.K))
    throw std::invalid_argument(
        "stored scales: blocks of " + std::to_string(s.block_n) + " x " + std::to_string(s.block_k) +
        ", but the layer's are " + std::to_string(l.scale_block_n) + " x " + std::to_string(l.scale_block_k) +
        " over " + std::to_string(l.N) + " x " + std::to_string(l.K) + " weights: the codes can be kept only on "
        "the layer's own grid");
}

// Rows decoded together: one grid row's (a grid row's scales come from all of its weights), else one; 0 for a grid
// whose rows would pass kMaxBandBytes (its grid is then computed in a pass of its own, a row at a time).
int group_rows(const ProjectionLayout& l, bool grid) {
  if (!grid) return 1;
  const int rows = std::min(l.scale_block_n, l.Np);
  return size_t(rows) * l.Kp * sizeof(float) <= kMaxBandBytes ? rows : 0;
}

// Rows of one task: whole panels and whole groups (their lcm; the whole padded matrix when that is larger).
int band_rows(const ProjectionLayout& l, int group) {
  const int64_t band = std::lcm(int64_t(kPanel), int64_t(group));
  return band >= l.Np ? l.Np : int(band);
}

// amax[c] = max(amax[c], max |w| over the row's k in block column c), as fp32 bits.
void accumulate_block_amax(const ProjectionLayout& l, const float* w, int32_t* amax) {
  for (int c = 0, k0 = 0; k0 < l.Kp; ++c, k0 = block_end(k0, l.scale_block_k, l.Kp))
    amax[c] = std::max(amax[c], max_abs_bits(w, k0, block_end(k0, l.scale_block_k, l.Kp)));
}

// Grid row r's scales s = max |w| / qmax over each block (0: a block of zeros or of padding only) from the amax of
// its rows; false if they hold NaN/Inf.
bool set_grid_row(const ProjectionLayout& l, float qmax, const int32_t* amax, int r, float* grid) {
  int32_t m = 0;
  for (int c = 0; c < l.scale_cols; ++c) {
    grid[size_t(c) * l.scale_rows + r] = bits_to_f32(uint32_t(amax[c])) / qmax;
    m = std::max(m, amax[c]);
  }
  return m < int32_t(kInfBits);
}

}  // namespace

PackedWeights::PackedWeights(int experts, int hidden, int intermediate, const FormatInfo& format,
                             const ExpertNodes& nodes, bool gated)
    : E_(experts), format_(format.format) {
  for (int p = 0; p < kNumProj; ++p) {
    layout_[p] = make_layout(Proj(p), hidden, intermediate, format);
    layout_[p].stored = gated || Proj(p) != Proj::kGate;
  }
  for (int i = 0; i < kPieces; ++i)
    if (piece_bytes(i)) piece(i).reserve(piece_bytes(i));
  for (int p = 0; p < kNumProj; ++p)
    if (layout_[p].stored) panels_[p].place(layout_[p].expert_bytes, nodes);
}

size_t PackedWeights::piece_bytes(int i) const {
  const ProjectionLayout& l = layout_[i / 3];
  if (!l.stored) return 0;
  switch (i % 3) {
    case 0: return size_t(E_) * l.expert_bytes;
    case 1: return l.scales == ScaleKind::kNone ? 0 : size_t(E_) * l.scale_rows * l.scale_cols * sizeof(float);
    default: return l.channel ? size_t(E_) * l.Np * sizeof(float) : 0;
  }
}

size_t PackedWeights::storage_bytes() const {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  size_t b = 0;
  for (int i = 0; i < kPieces; ++i) b += (piece_bytes(i) + page - 1) / page * page;
  return b;
}

void PackedWeights::use_storage(char* base, const ExpertNodes& nodes, bool place) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  for (int i = 0; i < kPieces; ++i) {
    const size_t bytes = piece_bytes(i);
    if (!bytes) continue;
    piece(i).adopt(base, bytes);
    base += (bytes + page - 1) / page * page;
  }
  if (place)
    for (int p = 0; p < kNumProj; ++p)
      if (layout_[p].stored) panels_[p].place(layout_[p].expert_bytes, nodes);
}

void PackedWeights::derive_channel_scales(ThreadPool& pool, Proj p, int e0, int n) {
  const ProjectionLayout& l = layout_[int(p)];
  if (!l.channel) return;
  pool.run(n, [&](int task, int) {
    const float* grid = expert_scales(p, e0 + task);
    float* S = static_cast<float*>(channel_[int(p)].get()) + size_t(e0 + task) * l.Np;
    for (int row = 0; row < l.Np; ++row) {
      const float* cells = grid + row / l.scale_block_n;  // the row's cell of each k block, scale_rows apart
      float m = 0.f;
      for (int c = 0; c < l.scale_cols; ++c) m = std::max(m, std::fabs(cells[size_t(c) * l.scale_rows]));
      S[row] = 8.0f * m / 127.0f;
    }
  });
}

float* PackedWeights::expert_scales(Proj p, int e) const {
  const ProjectionLayout& l = layout_[int(p)];
  float* base = static_cast<float*>(scales_[int(p)].get());
  return base ? base + size_t(e) * l.scale_rows * l.scale_cols : nullptr;
}

char* PackedWeights::expert_panels(Proj p, int e) const {
  return static_cast<char*>(panels_[int(p)].get()) + size_t(e) * layout_[int(p)].expert_bytes;
}

template <class Fn>
int PackedWeights::first_failed(ThreadPool& pool, int n, const Fn& fn) {
  std::vector<uint8_t> bad(size_t(n), 0);
  pool.run(n, [&](int task, int worker) {
    if (!fn(task, worker)) bad[size_t(task)] = 1;
  });
  for (int task = 0; task < n; ++task)
    if (bad[size_t(task)]) return task;
  return -1;
}

int PackedWeights::pack(ThreadPool& pool, std::vector<Buffer>& scratch, Proj proj, int e0, int n,
                        const WeightSource& src, bool keep_codes) {
  check_source(layout_[int(proj)], kPacking[int(format_)], kFormats[int(format_)].name, src, keep_codes);
  if (scratch.size() < size_t(pool.size())) scratch.resize(size_t(pool.size()));
  const int bad = keep_codes ? pack_kept(pool, scratch, proj, e0, n, src)
                             : pack_decoded(pool, scratch, proj, e0, n, src);
  derive_channel_scales(pool, proj, e0, n);
  return bad;
}

// Tasks of whole panels and grid rows (band_rows); each decodes a group of rows (group_rows) at a time into its
// worker's buffer, computes their grid row's scales if the format has a grid, then codes the rows into their panels
// (a row or a grid row stays in L1 / L2 from decode to panel). A grid whose group would be too large is computed
// first, a task per (expert, grid row) decoding a row at a time.
int PackedWeights::pack_decoded(ThreadPool& pool, std::vector<Buffer>& scratch, Proj proj, int e0, int n,
                                const WeightSource& src) {
  const ProjectionLayout& l = layout_[int(proj)];
  const FormatPacking& f = kPacking[int(format_)];
  const bool grid = f.grid_qmax > 0.f;
  const int group_fit = group_rows(l, grid), group = std::max(group_fit, 1);
  const int band = band_rows(l, group), bands = blocks_over(l.Np, band);
  for (Buffer& b : scratch)  // the group's rows, a row of codes, per-k scales, a grid row's amax
    b.reserve((size_t(group) + 2) * l.Kp * sizeof(float) + size_t(l.scale_cols) * sizeof(int32_t));
  const int bad = grid && !group_fit ? grid_pass(pool, scratch, proj, e0, n, src) : -1;
  const size_t panel_bytes = size_t(l.Kp) * kPanel * l.elem_bits / 8;
  const int task = first_failed(pool, n * bands, [&](int task, int worker) {
    const int e = task / bands, row0 = (task % bands) * band, end = std::min(row0 + band, l.Np);
    float* rows = static_cast<float*>(scratch[size_t(worker)].get());
    uint8_t* codes = reinterpret_cast<uint8_t*>(rows + size_t(group) * l.Kp);
    float* k_scales = rows + size_t(group + 1) * l.Kp;
    int32_t* amax = reinterpret_cast<int32_t*>(k_scales + l.Kp);
    float* scales = expert_scales(proj, e0 + e);
    char* panels = expert_panels(proj, e0 + e);
    bool finite = true;
    for (int g0 = row0; g0 < end; g0 += group) {
      const int count = std::min(group, end - g0);
      for (int i = 0; i < count; ++i) decode_row(src, e, g0 + i, l, rows + size_t(i) * l.Kp, k_scales);
      if (grid && group_fit) {
        std::fill(amax, amax + l.scale_cols, 0);
        for (int i = 0; i < count; ++i) accumulate_block_amax(l, rows + size_t(i) * l.Kp, amax);
        finite &= set_grid_row(l, f.grid_qmax, amax, g0 / l.scale_block_n, scales);
      }
      for (int i = 0, row = g0; i < count; ++i, ++row) {
        finite &= f.row_codes(l, rows + size_t(i) * l.Kp, row, scales, k_scales, codes);
        scatter_row(l, codes, panels + size_t(row / kPanel) * panel_bytes, row % kPanel);
      }
    }
    return finite;
  });
  return earliest(bad, task < 0 ? -1 : e0 + task / bands);
}

// The scale grid of experts [e0, e0 + n) on its own, a task per (expert, grid row), decoding a row at a time.
int PackedWeights::grid_pass(ThreadPool& pool, std::vector<Buffer>& scratch, Proj proj, int e0, int n,
                             const WeightSource& src) {
  const ProjectionLayout& l = layout_[int(proj)];
  const float qmax = kPacking[int(format_)].grid_qmax;
  const int task = first_failed(pool, n * l.scale_rows, [&](int task, int worker) {
    const int e = task / l.scale_rows, r = task % l.scale_rows;
    float* row = static_cast<float*>(scratch[size_t(worker)].get());
    int32_t* amax = reinterpret_cast<int32_t*>(row + 2 * size_t(l.Kp));
    std::fill(amax, amax + l.scale_cols, 0);
    for (int i = r * l.scale_block_n, end = block_end(i, l.scale_block_n, l.N); i < end; ++i) {
      decode_row(src, e, i, l, row, row + l.Kp);
      accumulate_block_amax(l, row, amax);
    }
    return set_grid_row(l, qmax, amax, r, expert_scales(proj, e0 + e));
  });
  return task < 0 ? -1 : e0 + task / l.scale_rows;
}

// The source's scales as the layer's grid (padding-only cells 0), its codes row by row into the panels.
int PackedWeights::pack_kept(ThreadPool& pool, std::vector<Buffer>& scratch, Proj proj, int e0, int n,
                             const WeightSource& src) {
  const ProjectionLayout& l = layout_[int(proj)];
  const FormatPacking& f = kPacking[int(format_)];
  const int rows = blocks_over(l.N, l.scale_block_n), cols = blocks_over(l.K, l.scale_block_k);
  int bad = -1;
  for (int e = n - 1; e >= 0; --e) {
    float* scales = expert_scales(proj, e0 + e);
    for (int r = 0; r < l.scale_rows; ++r)
      for (int c = 0; c < l.scale_cols; ++c) {
        const float s = r < rows && c < cols ? load_as_f32(src.scales, size_t(int64_t(e) * src.ss_e +
                                                            int64_t(r) * src.ss_r + int64_t(c) * src.ss_c),
                                                            src.scale_dtype)
                                             : 0.f;
        if (!std::isfinite(s)) bad = e0 + e;
        scales[size_t(c) * l.scale_rows + r] = s;
      }
  }
  for (Buffer& b : scratch) b.reserve(size_t(l.Kp));
  const int panels = l.Np / kPanel;
  const size_t panel_bytes = size_t(l.Kp) * kPanel * l.elem_bits / 8;
  const int task = first_failed(pool, n * panels, [&](int task, int worker) {
    const int e = task / panels, p = task % panels;
    uint8_t* codes = static_cast<uint8_t*>(scratch[size_t(worker)].get());
    char* panel = expert_panels(proj, e0 + e) + size_t(p) * panel_bytes;
    bool ok = true;
    for (int nn = 0; nn < kPanel; ++nn) {
      const int row = p * kPanel + nn;
      if (row < l.N) ok &= f.kept_row(src, e, row, l, codes);
      else std::fill(codes, codes + l.Kp, uint8_t(src.kind == SourceKind::kInt4 ? 0x88 : 0));
      scatter_row(l, codes, panel, nn);
    }
    return ok;
  });
  return earliest(bad, task < 0 ? -1 : e0 + task / panels);
}

WeightView PackedWeights::view(Proj p) const {
  const ProjectionLayout& l = layout_[int(p)];
  const float* scales = static_cast<const float*>(scales_[int(p)].get());
  const float* channel = l.scales == ScaleKind::kChannel ? scales : static_cast<const float*>(channel_[int(p)].get());
  return WeightView{panels_[int(p)].get(), scales, size_t(l.scale_rows) * l.scale_cols, l.scale_block_n,
                    l.scale_block_k, l.scale_rows, channel};
}

std::pair<const void*, size_t> PackedWeights::panel_storage(Proj p) const {
  if (!layout_[int(p)].stored) return {nullptr, 0};
  return {panels_[int(p)].get(), size_t(E_) * layout_[int(p)].expert_bytes};
}

std::pair<const void*, size_t> PackedWeights::scale_storage(Proj p) const {
  const ProjectionLayout& l = layout_[int(p)];
  if (l.scales == ScaleKind::kNone || !l.stored) return {nullptr, 0};
  return {scales_[int(p)].get(), size_t(E_) * l.scale_rows * l.scale_cols * sizeof(float)};
}

size_t PackedWeights::bytes() const {
  size_t b = 0;
  for (int i = 0; i < kPieces; ++i) b += piece_bytes(i);
  return b;
}

}  // namespace kt_sft

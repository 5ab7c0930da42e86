#include "packing.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

#include "thread_pool.h"

namespace kt_sft {

// Element (row, k) of expert e (relative to the source's first expert) as fp32.
struct SourceRow {
  const WeightSource& src;
  int e;
  float operator()(int row, int k) const {
    return load_as_f32(src.data, size_t(int64_t(e) * src.s_e + int64_t(row) * src.s_r + int64_t(k) * src.s_c),
                       src.dtype);
  }
};

// Expert e (relative to the source's first expert) of a checkpoint's stored codes: code (row, k) as a byte (fp8:
// the e4m3 byte; int4: the nibble, q + 8), scale (r, c) of its grid as fp32.
struct StoredRow {
  const StoredSource& src;
  int e;
  uint8_t byte(int row, int k) const {
    return static_cast<const uint8_t*>(src.codes)[int64_t(e) * src.s_e + int64_t(row) * src.s_r + int64_t(k) * src.s_c];
  }
  uint8_t nibble(int row, int k) const {
    const int32_t w = static_cast<const int32_t*>(
        src.codes)[int64_t(e) * src.s_e + int64_t(row) * src.s_r + int64_t(k / 8) * src.s_c];
    return uint8_t((uint32_t(w) >> (4 * (k % 8))) & 0xfu);
  }
  float scale(int r, int c) const {
    return load_as_f32(src.scales, size_t(int64_t(e) * src.ss_e + int64_t(r) * src.ss_r + int64_t(c) * src.ss_c),
                       src.scale_dtype);
  }
};

namespace {

// Blocks of `block` elements covering `len` (any positive block: computed without overflow).
int blocks_over(int len, int block) { return int((int64_t(len) + block - 1) / block); }
// The first of two failing experts (-1: none).
int earliest(int a, int b) { return a < 0 ? b : b < 0 ? a : std::min(a, b); }

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

// One panel (16 output rows from row0) of a plain format: every element converted to Elem at its panel
// position (G: panel_group). Returns false if the source holds NaN/Inf.
template <typename Elem, int G>
bool pack_plain_panel(const ProjectionLayout& l, const SourceRow& value, int row0, Elem* dst) {
  bool finite = true;
  for (int nn = 0; nn < kPanel; ++nn) {
    const int row = row0 + nn;
    for (int k = 0; k < l.Kp; ++k) {
      float v = 0.f;
      if (row < l.N && k < l.K) {
        v = value(row, k);
        if (!std::isfinite(v)) finite = false;
      }
      const size_t at = (size_t(k / G) * kPanel + nn) * G + k % G;
      if constexpr (sizeof(Elem) == 4) dst[at] = v;
      else dst[at] = f32_to_bf16(v);
    }
  }
  return finite;
}

// One panel of per-channel int8 (common.h, INT8): each output row's scale into scales[row], its q at their panel
// positions (G: panel_group). Returns false if the source holds NaN/Inf.
template <int G>
bool pack_channel_int8_panel(const ProjectionLayout& l, const SourceRow& value, int row0, int8_t* q, float* scales) {
  bool finite = true;
  for (int nn = 0; nn < kPanel; ++nn) {
    const int row = row0 + nn;
    float amax = 0.f;
    if (row < l.N)
      for (int k = 0; k < l.K; ++k) {
        const float v = value(row, k);
        if (!std::isfinite(v)) finite = false;
        amax = std::max(amax, std::fabs(v));
      }
    const float sc = amax / 127.0f;
    scales[row] = sc;
    for (int k = 0; k < l.Kp; ++k) {
      float r = 0.f;
      if (row < l.N && k < l.K && sc > 0.f && std::isfinite(sc))
        r = std::min(127.f, std::max(-127.f, std::nearbyint(value(row, k) / sc)));
      q[(size_t(k / G) * kPanel + nn) * G + k % G] = int8_t(r);
    }
  }
  return finite;
}

// ---- block-scaled formats (common.h, FP8 / INT4): codes in the pair order, scales on the layer's grid ----

// Writes code(row, k, s, &c) of every real element of one panel (16 output rows from row0) at its pair-panel
// position, `zero` (the code of weight 0) in the padding; s is the element's scale in `scales` (one expert's grid,
// stored by column; 0 without). Bits 8: a byte per code; 4: two per byte, the even k in the low nibble. Returns false
// if a code did.
template <int Bits, class Code>
bool write_codes(const ProjectionLayout& l, int row0, uint8_t* dst, uint8_t zero, const float* scales,
                 const Code& code) {
  bool ok = true;
  for (int nn = 0; nn < kPanel; ++nn) {
    const int row = row0 + nn;
    const float* scale = scales ? scales + row / l.scale_block_n : nullptr;  // (row, k): scale[(k / block_k) * rows]
    int64_t block_end = l.scale_block_k;
    for (int k = 0; k < l.Kp; ++k) {
      if (k == block_end) {  // the next k block, without a division per element
        scale += scales ? l.scale_rows : 0;
        block_end += l.scale_block_k;
      }
      uint8_t c = zero;
      if (row < l.N && k < l.K && !code(row, k, scale ? *scale : 0.f, &c)) ok = false;
      const size_t at = (size_t(k / 2) * kPanel + nn) * 2 + k % 2;  // panel_index(kPairs, nn, k)
      if (Bits == 8) {
        dst[at] = c;
      } else {
        uint8_t& b = dst[at / 2];
        b = k % 2 ? uint8_t((b & 0x0fu) | (c << 4)) : uint8_t((b & 0xf0u) | c);
      }
    }
  }
  return ok;
}

// Grid row r of one expert from a float source: s = max |w| / QMax over each block's real weights (0 for a block of
// zeros or of padding only). Returns false if the source holds NaN/Inf.
template <int QMax>
bool block_scales(const ProjectionLayout& l, const SourceRow& value, int r, float* scales) {
  std::vector<float> amax(size_t(l.scale_cols), 0.f);
  bool finite = true;
  const int end = int(std::min<int64_t>(l.N, int64_t(r + 1) * l.scale_block_n));
  for (int row = r * l.scale_block_n; row < end; ++row)
    for (int c = 0; c < l.scale_cols; ++c) {
      const int k1 = int(std::min<int64_t>(l.K, int64_t(c + 1) * l.scale_block_k));
      for (int k = c * l.scale_block_k; k < k1; ++k) {
        const float v = value(row, k);
        if (!std::isfinite(v)) finite = false;
        amax[size_t(c)] = std::max(amax[size_t(c)], std::fabs(v));
      }
    }
  for (int c = 0; c < l.scale_cols; ++c) scales[size_t(c) * l.scale_rows + r] = amax[size_t(c)] / float(QMax);
  return finite;
}

// fp8 from a float source: e4m3(w / s), round to nearest even, saturating (s = 0: code 0).
bool fp8_panel(const ProjectionLayout& l, const SourceRow& value, int row0, void* dst, float* scales) {
  return write_codes<8>(l, row0, static_cast<uint8_t*>(dst), 0, scales, [&](int row, int k, float s, uint8_t* c) {
    *c = s > 0.f ? f32_to_e4m3(value(row, k) / s) : 0;
    return true;
  });
}
// int4 from a float source: q = clamp(round_half_even(w / s), -8, 7), stored q + 8 (s = 0: q = 0).
bool int4_panel(const ProjectionLayout& l, const SourceRow& value, int row0, void* dst, float* scales) {
  return write_codes<4>(l, row0, static_cast<uint8_t*>(dst), 8, scales, [&](int row, int k, float s, uint8_t* c) {
    const float q = s > 0.f ? std::min(7.f, std::max(-8.f, std::nearbyint(value(row, k) / s))) : 0.f;
    *c = uint8_t(int(q) + 8);
    return true;
  });
}
// fp8 from stored e4m3 bytes; false on a NaN code (0x7f, 0xff).
bool fp8_stored_panel(const ProjectionLayout& l, const StoredRow& src, int row0, void* dst) {
  return write_codes<8>(l, row0, static_cast<uint8_t*>(dst), 0, nullptr, [&](int row, int k, float, uint8_t* c) {
    *c = src.byte(row, k);
    return (*c & 0x7fu) != 0x7fu;
  });
}
bool int4_stored_panel(const ProjectionLayout& l, const StoredRow& src, int row0, void* dst) {
  return write_codes<4>(l, row0, static_cast<uint8_t*>(dst), 8, nullptr, [&](int row, int k, float, uint8_t* c) {
    *c = src.nibble(row, k);
    return true;
  });
}

// ---- the table ----

// Packs panel p (16 output rows from 16 * p) of one expert: dst = the panel, scales = the expert's scale grid.
// Returns false if the source holds NaN/Inf.
template <typename Elem, int G>
bool plain_packer(const ProjectionLayout& l, const SourceRow& value, int row0, void* dst, float*) {
  return pack_plain_panel<Elem, G>(l, value, row0, static_cast<Elem*>(dst));
}
template <int G>
bool channel_int8_packer(const ProjectionLayout& l, const SourceRow& value, int row0, void* dst, float* scales) {
  return pack_channel_int8_panel<G>(l, value, row0, static_cast<int8_t*>(dst), scales);
}

// One Packer per WeightFormat (formats.h order): a new format's element type / quantization is a new row here.
constexpr Packer kPackers[kNumFormats] = {
    {plain_packer<float, 1>, nullptr, nullptr},     // kF32
    {plain_packer<uint16_t, 2>, nullptr, nullptr},  // kBF16: pairs
    {channel_int8_packer<2>, nullptr, nullptr},     // kInt8: pairs
    {channel_int8_packer<4>, nullptr, nullptr},     // kInt8Gemm: quads
    {fp8_panel, block_scales<448>, fp8_stored_panel},  // kFp8: e4m3 pairs, block scales
    {int4_panel, block_scales<7>, int4_stored_panel},  // kInt4: nibble pairs, group scales
    {int4_panel, block_scales<7>, int4_stored_panel},  // kInt4Gemm: int4's (channel scales derived after)
};

}  // namespace

PackedWeights::PackedWeights(int experts, int hidden, int intermediate, const FormatInfo& format,
                             const ExpertNodes& nodes)
    : E_(experts), packer_(kPackers[int(format.format)]) {
  for (int p = 0; p < kNumProj; ++p) {
    layout_[p] = make_layout(Proj(p), hidden, intermediate, format);
    panels_[p].reserve(size_t(E_) * layout_[p].expert_bytes);
    panels_[p].place(layout_[p].expert_bytes, nodes);
    if (format.scales != ScaleKind::kNone)
      scales_[p].reserve(size_t(E_) * layout_[p].scale_rows * layout_[p].scale_cols * sizeof(float));
    if (format.channel_scales) channel_[p].reserve(size_t(E_) * layout_[p].Np * sizeof(float));
  }
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

template <class PanelFn>
int PackedWeights::run_panels(ThreadPool& pool, Proj proj, int e0, int n, const PanelFn& panel) {
  const int panels = layout_[int(proj)].Np / kPanel;
  std::vector<uint8_t> bad(size_t(n) * panels, 0);
  pool.run(n * panels, [&](int task, int) {
    if (!panel(e0 + task / panels, task % panels)) bad[size_t(task)] = 1;
  });
  for (int task = 0; task < n * panels; ++task)
    if (bad[size_t(task)]) return e0 + task / panels;
  return -1;
}

int PackedWeights::pack(ThreadPool& pool, Proj proj, int e0, int n, const WeightSource& src) {
  const ProjectionLayout& l = layout_[int(proj)];
  const size_t panel_bytes = size_t(l.Kp) * kPanel * l.elem_bits / 8;
  char* base = static_cast<char*>(panels_[int(proj)].get());
  int bad = -1;
  if (packer_.grid_row) {  // the scale grid first: a block spans several panels
    std::vector<uint8_t> bad_rows(size_t(n) * l.scale_rows, 0);
    pool.run(n * l.scale_rows, [&](int task, int) {
      const int e = e0 + task / l.scale_rows;
      if (!packer_.grid_row(l, SourceRow{src, e - e0}, task % l.scale_rows, expert_scales(proj, e)))
        bad_rows[size_t(task)] = 1;
    });
    for (int task = n * l.scale_rows - 1; task >= 0; --task)
      if (bad_rows[size_t(task)]) bad = e0 + task / l.scale_rows;
  }
  const int bad_panel = run_panels(pool, proj, e0, n, [&](int e, int p) {
    void* dst = base + size_t(e) * l.expert_bytes + size_t(p) * panel_bytes;
    return packer_.panel(l, SourceRow{src, e - e0}, p * kPanel, dst, expert_scales(proj, e));
  });
  derive_channel_scales(pool, proj, e0, n);
  return earliest(bad, bad_panel);
}

int PackedWeights::pack_stored(ThreadPool& pool, Proj proj, int e0, int n, const StoredSource& src) {
  const ProjectionLayout& l = layout_[int(proj)];
  if (!packer_.stored_panel) throw std::invalid_argument("this expert format keeps no checkpoint codes as they are");
  const int rows = blocks_over(l.N, l.scale_block_n), cols = blocks_over(l.K, l.scale_block_k);
  if (src.scale_rows != rows || src.scale_cols != cols)
    throw std::invalid_argument("stored scales: a grid of " + std::to_string(src.scale_rows) + " x " +
                                std::to_string(src.scale_cols) + ", but the layer's blocks of " +
                                std::to_string(l.scale_block_n) + " x " + std::to_string(l.scale_block_k) + " over " +
                                std::to_string(l.N) + " x " + std::to_string(l.K) + " weights make " +
                                std::to_string(rows) + " x " + std::to_string(cols));
  int bad = -1;
  for (int e = e0 + n - 1; e >= e0; --e) {  // the grid as stored, padding-only cells 0
    float* scales = expert_scales(proj, e);
    for (int r = 0; r < l.scale_rows; ++r)
      for (int c = 0; c < l.scale_cols; ++c) {
        const float s = r < rows && c < cols ? StoredRow{src, e - e0}.scale(r, c) : 0.f;
        if (!std::isfinite(s)) bad = e;
        scales[size_t(c) * l.scale_rows + r] = s;
      }
  }
  const size_t panel_bytes = size_t(l.Kp) * kPanel * l.elem_bits / 8;
  char* base = static_cast<char*>(panels_[int(proj)].get());
  const int bad_panel = run_panels(pool, proj, e0, n, [&](int e, int p) {
    return packer_.stored_panel(l, StoredRow{src, e - e0}, p * kPanel,
                                base + size_t(e) * l.expert_bytes + size_t(p) * panel_bytes);
  });
  derive_channel_scales(pool, proj, e0, n);
  return earliest(bad, bad_panel);
}
WeightView PackedWeights::view(Proj p) const {
  const ProjectionLayout& l = layout_[int(p)];
  const float* scales = static_cast<const float*>(scales_[int(p)].get());
  const float* channel = l.scales == ScaleKind::kChannel ? scales : static_cast<const float*>(channel_[int(p)].get());
  return WeightView{panels_[int(p)].get(), scales, size_t(l.scale_rows) * l.scale_cols, l.scale_block_n,
                    l.scale_block_k, l.scale_rows, channel};
}

std::pair<const void*, size_t> PackedWeights::panel_storage(Proj p) const {
  return {panels_[int(p)].get(), size_t(E_) * layout_[int(p)].expert_bytes};
}

std::pair<const void*, size_t> PackedWeights::scale_storage(Proj p) const {
  const ProjectionLayout& l = layout_[int(p)];
  if (l.scales == ScaleKind::kNone) return {nullptr, 0};
  return {scales_[int(p)].get(), size_t(E_) * l.scale_rows * l.scale_cols * sizeof(float)};
}

size_t PackedWeights::bytes() const {
  size_t b = 0;
  for (int p = 0; p < kNumProj; ++p)
    b += panel_storage(Proj(p)).second + scale_storage(Proj(p)).second +
         (layout_[p].channel ? size_t(E_) * layout_[p].Np * sizeof(float) : 0);
  return b;
}

}  // namespace kt_sft

#include "packing.h"

#include <algorithm>
#include <cmath>
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

namespace {

ProjectionLayout make_layout(Proj p, int H, int I, const FormatInfo& f) {
  ProjectionLayout l{};
  l.proj = p;
  l.N = p == Proj::kDown ? H : I;
  l.K = p == Proj::kDown ? I : H;
  l.Np = round_up(l.N, kBlock);
  l.Kp = round_up(l.K, kBlock);
  l.panel = f.panel;
  l.elem_bytes = f.weight_bytes;
  l.expert_bytes = size_t(l.Np) * l.Kp * l.elem_bytes;
  l.scales = f.scales;
  if (f.scales != ScaleKind::kNone) {  // block sizes 0: the whole padded dimension
    l.scale_block_n = f.scale_block_n > 0 ? f.scale_block_n : l.Np;
    l.scale_block_k = f.scale_block_k > 0 ? f.scale_block_k : l.Kp;
    l.scale_rows = (l.Np + l.scale_block_n - 1) / l.scale_block_n;
    l.scale_cols = (l.Kp + l.scale_block_k - 1) / l.scale_block_k;
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

// Packs panel p (16 output rows from 16 * p) of one expert: dst = the panel, scales = the expert's scale grid.
// Returns false if the source holds NaN/Inf.
using PanelPacker = bool (*)(const ProjectionLayout&, const SourceRow&, int row0, void* dst, float* scales);

template <typename Elem, int G>
bool plain_packer(const ProjectionLayout& l, const SourceRow& value, int row0, void* dst, float*) {
  return pack_plain_panel<Elem, G>(l, value, row0, static_cast<Elem*>(dst));
}
template <int G>
bool channel_int8_packer(const ProjectionLayout& l, const SourceRow& value, int row0, void* dst, float* scales) {
  return pack_channel_int8_panel<G>(l, value, row0, static_cast<int8_t*>(dst), scales);
}

// One packer per WeightFormat (formats.h order): a new format's element type / quantization is a new row here.
constexpr PanelPacker kPackers[kNumFormats] = {
    plain_packer<float, 1>,     // kF32
    plain_packer<uint16_t, 2>,  // kBF16: pairs
    channel_int8_packer<2>,     // kInt8: pairs
    channel_int8_packer<4>,     // kInt8Gemm: quads
};

}  // namespace

PackedWeights::PackedWeights(int experts, int hidden, int intermediate, const FormatInfo& format)
    : E_(experts), pack_panel_(kPackers[int(format.format)]) {
  for (int p = 0; p < kNumProj; ++p) {
    layout_[p] = make_layout(Proj(p), hidden, intermediate, format);
    panels_[p].reserve(size_t(E_) * layout_[p].expert_bytes);
    if (format.scales != ScaleKind::kNone)
      scales_[p].reserve(size_t(E_) * layout_[p].scale_rows * layout_[p].scale_cols * sizeof(float));
  }
}

int PackedWeights::pack(ThreadPool& pool, Proj proj, int e0, int n, const WeightSource& src) {
  const ProjectionLayout& l = layout_[int(proj)];
  const int panels = l.Np / kPanel;
  const size_t panel_bytes = size_t(l.Kp) * kPanel * l.elem_bytes;
  const size_t expert_scales = size_t(l.scale_rows) * l.scale_cols;
  char* base = static_cast<char*>(panels_[int(proj)].get());
  float* scale_base = static_cast<float*>(scales_[int(proj)].get());
  std::vector<uint8_t> bad(size_t(n) * panels, 0);
  pool.run(n * panels, [&](int task, int) {
    const int e = e0 + task / panels, p = task % panels;
    void* dst = base + size_t(e) * l.expert_bytes + size_t(p) * panel_bytes;
    float* scales = scale_base ? scale_base + size_t(e) * expert_scales : nullptr;
    if (!pack_panel_(l, SourceRow{src, e - e0}, p * kPanel, dst, scales)) bad[size_t(task)] = 1;
  });
  for (int task = 0; task < n * panels; ++task)
    if (bad[size_t(task)]) return e0 + task / panels;
  return -1;
}

WeightView PackedWeights::view(Proj p) const {
  const ProjectionLayout& l = layout_[int(p)];
  return WeightView{panels_[int(p)].get(), static_cast<const float*>(scales_[int(p)].get()),
                    size_t(l.scale_rows) * l.scale_cols};
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
  for (int p = 0; p < kNumProj; ++p) b += panel_storage(Proj(p)).second + scale_storage(Proj(p)).second;
  return b;
}

}  // namespace kt_sft

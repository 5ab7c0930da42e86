#include "moe_layer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>

#include "engine.h"

namespace kt_sft {
namespace {

// The constructor's arguments, checked before anything is allocated; returns experts.
int checked_experts(int experts, int hidden, int intermediate, WeightFormat format, int max_saved) {
  if (experts < 1 || hidden < 1 || intermediate < 1)
    throw std::invalid_argument("experts, hidden and intermediate must be >= 1");
  format_info(format);  // throws for a value outside WeightFormat
  if (max_saved < 1) throw std::invalid_argument("max_saved must be >= 1");
  return experts;
}

Proj checked_proj(int which) {
  if (which < 0 || which >= kNumProj) throw std::invalid_argument("which: expected 0 (gate), 1 (up) or 2 (down)");
  return Proj(which);
}

}  // namespace

MoELayer::MoELayer(int experts, int hidden, int intermediate, WeightFormat format, int scale_block_n,
                   int scale_block_k, Activation activation, float limit, bool bias, int max_saved)
    : E_(checked_experts(experts, hidden, intermediate, format, max_saved)), H_(hidden), I_(intermediate),
      Hp_(round_up(hidden, kBlock)), Ip_(round_up(intermediate, kBlock)),
      fmt_(format_with_scale_block(format, scale_block_n, scale_block_k)),
      act_(activation_with_limit(activation, limit)), nodes_(layer_nodes(experts)),
      weights_(experts, hidden, intermediate, fmt_, nodes_, act_.gated) {
  loaded_.assign(kNumProj * size_t(E_), 0);
  if (!act_.gated)
    for (int e = 0; e < E_; ++e) loaded_[e] = 1;  // no gate projection to load
  if (bias) {
    const size_t gu = size_t(E_) * (act_.gated ? 2 : 1) * Ip_, d = size_t(E_) * Hp_;
    std::memset(bias_gu_.reserve(gu * sizeof(float)), 0, gu * sizeof(float));  // the padding stays zero
    std::memset(bias_d_.reserve(d * sizeof(float)), 0, d * sizeof(float));
    bias_loaded_.assign(loaded_.begin(), loaded_.end());
  }
  slots_.resize(size_t(max_saved));
}

LayerView MoELayer::view(int kchunk) const {
  LayerView L{};
  L.E = E_;
  L.H = H_;
  L.I = I_;
  L.Hp = Hp_;
  L.Ip = Ip_;
  for (int p = 0; p < kNumProj; ++p) L.w[p] = weights_.view(Proj(p));
  L.expert_elems = weights_.expert_elems();
  L.act = act_;
  L.bias_gu = static_cast<const float*>(bias_gu_.get());
  L.bias_d = static_cast<const float*>(bias_d_.get());
  L.kchunk = kchunk;
  L.ldx = padded_row_stride(Hp_);
  L.ld_act = padded_row_stride(Ip_);
  L.ld_dgu = padded_row_stride(2 * Ip_);
  return L;
}

// Experts [e0, e0 + n) inside the layer and projection `which` one it has; throws naming the problem.
static Proj checked_range(int which, int e0, int n, int E, const ActivationInfo& act) {
  const Proj p = checked_proj(which);
  if (e0 < 0 || n < 1 || e0 + n > E)
    throw std::invalid_argument("experts [" + std::to_string(e0) + ", " + std::to_string(e0 + n) +
                                ") outside [0, " + std::to_string(E) + ")");
  if (p == Proj::kGate && !act.gated)
    throw std::invalid_argument(std::string("the ") + act.name + " experts have no gate projection (ungated)");
  return p;
}

void MoELayer::set_weights(int which, int e0, int n, const WeightSource& src, bool keep_codes) {
  const Proj p = checked_range(which, e0, n, E_, act_);
  if (segment_ && !segment_->writable())
    throw std::logic_error(std::string("set_weights: this layer's experts were packed by another process (") +
                           segment_->path() + ", mapped read-only)");
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);  // the pool and the decode buffers are the engine's
  ensure_ready(eng);
  const int bad = weights_.pack(*eng.pool, eng.decoded, p, e0, n, src, keep_codes);
  if (bad >= 0)
    throw std::invalid_argument(std::string("non-finite value (NaN/Inf) in the ") + proj_name(p) +
                                " weights of expert " + std::to_string(bad));
  for (int e = e0; e < e0 + n; ++e) loaded_[size_t(which) * E_ + e] = 1;
}

void MoELayer::use_storage(std::shared_ptr<SharedSegment> segment, size_t offset, bool packed) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  if (!segment) throw std::invalid_argument("use_storage: no segment");
  for (uint8_t done : loaded_)
    if (done) throw std::logic_error("use_storage: weights were packed into this layer already");
  const size_t page = size_t(sysconf(_SC_PAGESIZE)), bytes = storage_bytes();
  if (offset % page || offset > segment->bytes() || segment->bytes() - offset < bytes)
    throw std::invalid_argument("use_storage: [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
                                ") is not a page-aligned range of " + segment->path() + " (" +
                                std::to_string(segment->bytes()) + " bytes)");
  if (!packed && !segment->writable())
    throw std::invalid_argument("use_storage: " + segment->path() + " is mapped read-only; packing needs it writable");
  weights_.use_storage(segment->data() + offset, nodes_, !packed);
  segment_ = std::move(segment);
  if (packed) std::fill(loaded_.begin(), loaded_.end(), uint8_t(1));
}

void MoELayer::set_bias(int which, int e0, int n, const float* src, int64_t ld) {
  const Proj p = checked_range(which, e0, n, E_, act_);
  if (!has_bias()) throw std::invalid_argument("this layer was made without expert biases (bias=False)");
  const int len = p == Proj::kDown ? H_ : I_;
  for (int i = 0; i < n; ++i)
    for (int c = 0; c < len; ++c)
      if (!std::isfinite(src[i * ld + c]))
        throw std::invalid_argument(std::string("non-finite value (NaN/Inf) in the ") + proj_name(p) +
                                    " bias of expert " + std::to_string(e0 + i));
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);  // a call may be reading them
  const size_t gu = size_t(act_.gated ? 2 : 1) * Ip_;
  for (int i = 0; i < n; ++i) {
    float* dst = p == Proj::kDown ? static_cast<float*>(bias_d_.get()) + size_t(e0 + i) * Hp_
                                  : static_cast<float*>(bias_gu_.get()) + size_t(e0 + i) * gu +
                                        (p == Proj::kUp && act_.gated ? Ip_ : 0);
    std::memcpy(dst, src + i * ld, size_t(len) * sizeof(float));
    bias_loaded_[size_t(which) * E_ + e0 + i] = 1;
  }
}

std::vector<std::string> MoELayer::missing_weights() const {
  std::vector<std::string> out;
  for (int w = 0; w < kNumProj; ++w)
    for (int e = 0; e < E_; ++e)
      if (!loaded_[size_t(w) * E_ + e]) out.push_back("expert " + std::to_string(e) + " " + proj_name(Proj(w)));
  for (int w = 0; w < kNumProj && has_bias(); ++w)
    for (int e = 0; e < E_; ++e)
      if (!bias_loaded_[size_t(w) * E_ + e])
        out.push_back("expert " + std::to_string(e) + " " + proj_name(Proj(w)) + " bias");
  return out;
}

size_t MoELayer::saved_bytes() const {
  size_t b = 0;
  for (const auto& s : slots_) b += s.gate.bytes() + s.up.bytes() + s.x.bytes() + s.u_gu.bytes() + s.q_d.bytes();
  return b;
}

std::pair<const void*, size_t> MoELayer::panel_storage(int which) const {
  return weights_.panel_storage(checked_proj(which));
}

std::pair<const void*, size_t> MoELayer::scale_storage(int which) const {
  return weights_.scale_storage(checked_proj(which));
}

const ProjectionLayout& MoELayer::layout(int which) const { return weights_.layout(checked_proj(which)); }

// ---------------------------------------------------------------- saved-forward slots

SavedSlot* MoELayer::find_slot(uint64_t handle) {
  for (auto& s : slots_)
    if (handle != 0 && s.handle == handle) return &s;
  return nullptr;
}

SavedSlot& MoELayer::live_slot(uint64_t handle) {
  SavedSlot* slot = find_slot(handle);
  if (!slot)
    throw std::runtime_error(
        "the activations saved by this forward are gone: either backward already ran for it, or more than "
        "max_saved=" + std::to_string(slots_.size()) +
        " forwards with save_for_backward ran on this layer before its backward (raise max_saved)");
  return *slot;
}

SavedSlot& MoELayer::claim_slot() {
  SavedSlot* slot = nullptr;
  for (auto& s : slots_)
    if (!slot || s.handle < slot->handle) slot = &s;
  slot->handle = 0;  // its plan is overwritten next: the forward it held is gone even if this call fails
  return *slot;
}

void MoELayer::grow_saved(int n) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);  // slot pointers live only inside calls that hold this lock
  if (n > int(slots_.size())) slots_.resize(size_t(n));
}

void MoELayer::release(uint64_t handle) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  if (SavedSlot* s = find_slot(handle)) s->handle = 0;
}

std::pair<int, int> MoELayer::saved_lora_ranks(uint64_t handle) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  const SavedSlot& slot = live_slot(handle);
  return {slot.r_gu, slot.r_d};
}

std::pair<int, int> MoELayer::saved_shape(uint64_t handle) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  const SavedSlot& slot = live_slot(handle);
  return {slot.plan.T, slot.plan.k};
}

}  // namespace kt_sft

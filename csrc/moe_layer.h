// NOTE (kt-sft engine, one MoE layer's frozen routed experts)
// Layout:    gate, up: panels of [Ip][Hp] per expert; down: panels of [Hp][Ip] per expert (common.h), one
//            64-byte aligned allocation per projection, wtype bf16 or f32, or int8 + per-channel fp32 scales
//            (common.h, INT8). No other copy of the weights is kept.
// Algorithm: forward groups the T*k (token, slot) pairs by expert into row segments, runs the per-ISA tasks
//            over (expert x 32-column block x row chunk) on the thread pool, then sums each token's k rows.
//            Backward replays the saved routing plan with dy. See kernels/moe_tasks.inc.
// Invariants: what forward keeps for backward lives in a bounded set of slots (max_saved per layer, reused
//            buffers, LRU); a stale handle is an error, never silently wrong math. Scratch buffers are shared by
//            all layers of the process and guarded by one mutex, so calls are serialised and may run with
//            the Python GIL released.
// LoRA:      optional per-expert LoRA (PEFT layout, docs/expert_lora_format.md) arrives as raw fp32 pointers to
//            caller-owned factors on every call (LoraArgs) and is never kept: each call repacks the factors into
//            shared scratch. A forward that saves with LoRA also keeps in its slot the layer input x [T][H]
//            (for dB_gu), u = x.B_gu [rows][r_gu] and q = h.B_d [rows][r_d] (fp32); its backward must get
//            factors of the same ranks (the same values, which the Python glue enforces) and writes the four
//            factor gradients in PEFT's layouts.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "kernel_api.h"

namespace kt_sft {

// 64-byte aligned, grow-only buffer.
class Buffer {
 public:
  Buffer() = default;
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; o.bytes_ = 0; }
  void* reserve(size_t bytes);  // contents are not kept when it grows
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct RoutingPlan {
  int T = 0, k = 0, rows = 0;        // rows: padded total of all segments
  std::vector<int> seg_start, count; // [E]
  std::vector<int> row_of;           // [T*k] gathered row of (token, slot); -1 for a kNotHere slot
  std::vector<int> row_token;        // [rows] token of each row (-1 for padding)
  std::vector<float> row_weight;     // [rows]
};

// topk_ids value of a (token, slot) this layer leaves out: another device computes it (kt_sft/engine/gpu_share.py).
// It adds nothing to y and gets dw = 0.
constexpr int64_t kNotHere = -1;

struct SavedSlot {
  uint64_t handle = 0;  // 0 = free
  RoutingPlan plan;
  Buffer gate, up;      // [rows][Ip] pre-activations (LoRA-adapted when LoRA ran), wtype
  int r_gu = 0, r_d = 0;  // LoRA ranks of the forward (0 = none)
  Buffer x;             // LoRA only: [T][H] layer input, wtype
  Buffer u_gu, q_d;     // LoRA only: [rows][r_gu] x.B_gu and [rows][r_d] h.B_d, f32
};

// LoRA factors of one call, PEFT flat layouts, fp32, contiguous (r = 0: that projection has no LoRA):
//   A_gu [r_gu*E][2I], B_gu [H][r_gu*E], A_d [r_d*E][H], B_d [I][r_d*E];  s_* = lora_alpha / r.
struct LoraArgs {
  int r_gu = 0, r_d = 0;
  float s_gu = 0.f, s_d = 0.f;
  const float* A_gu = nullptr;
  const float* B_gu = nullptr;
  const float* A_d = nullptr;
  const float* B_d = nullptr;
  bool on() const { return r_gu > 0 || r_d > 0; }
};
// Gradients of the factors above, same layouts; every element is written (zeros for unrouted experts).
struct LoraGrads {
  float* A_gu = nullptr;
  float* B_gu = nullptr;
  float* A_d = nullptr;
  float* B_d = nullptr;
};

class MoELayer {
 public:
  // format: how the experts are stored and multiplied (common.h, WeightFormat; INT8 and INT8 GEMMs notes).
  MoELayer(int experts, int hidden, int intermediate, WeightFormat format, int activation, int max_saved);

  // Packs rows x cols of projection `which` (0 gate [I][H], 1 up [I][H], 2 down [H][I]) for experts
  // [e0, e0+n) from src (dtype src_dtype) with element strides (expert, row, col), quantizing each output
  // row (channel) of an int8 layer. Throws on NaN/Inf.
  void set_weights(int which, int e0, int n, const void* src, int src_dtype, int64_t s_e, int64_t s_r, int64_t s_c);
  // y[T][H] = sum_j w[t][j] * expert_{ids[t][j]}(x[t]) over slots with ids != kNotHere; returns a handle for
  // backward when save is set.
  // lora: optional per-expert LoRA on gate_up / down (null or all ranks 0 = frozen experts only).
  uint64_t forward(int T, int k, const void* x, const int64_t* ids, const float* w, void* y, bool save,
                   const LoraArgs* lora = nullptr);
  // dx[T][H] (wtype) and dw[T][k] (f32) for the forward identified by handle; with LoRA (same ranks as that
  // forward) also the factor gradients into `grads`.
  void backward(uint64_t handle, int T, int k, const void* dy, void* dx, float* dw, const LoraArgs* lora = nullptr,
                const LoraGrads* grads = nullptr);
  // (r_gu, r_d) of the forward behind `handle` (0, 0 without LoRA).
  std::pair<int, int> saved_lora_ranks(uint64_t handle);
  // (T, k) of the forward behind `handle`; throws if its saved activations are gone.
  std::pair<int, int> saved_shape(uint64_t handle);
  void release(uint64_t handle);

  int experts() const { return E_; }
  int hidden() const { return H_; }
  int intermediate() const { return I_; }
  int wtype() const { return wtype_; }
  int max_saved() const { return int(slots_.size()); }
  // At least n slots from now on (never fewer): a caller that splits one batch into n calls saves n forwards.
  void grow_saved(int n);
  // Weight memory: panels plus the int8 scales.
  size_t packed_bytes() const {
    return 3 * size_t(E_) * expert_elems_ * weight_elem_bytes() + (wq_ ? size_t(E_) * (2 * Ip_ + Hp_) * sizeof(float) : 0);
  }
  size_t saved_bytes() const;
  // The packed storage of projection `which` (0 gate, 1 up, 2 down): its panels (all experts, expert-major,
  // expert_elems elements each, weight_elem_bytes() per element) and, int8 only, its scales ([E][Ip] or
  // [E][Hp] fp32; null otherwise). Read-only views for streaming experts to another device.
  std::pair<const void*, size_t> panel_storage(int which) const;
  std::pair<const void*, size_t> scale_storage(int which) const;
  int padded_hidden() const { return Hp_; }
  int padded_intermediate() const { return Ip_; }
  WeightFormat format() const { return format_; }
  std::vector<std::string> missing_weights() const;  // "expert 3 down", ...

 private:
  LayerView view(int kchunk) const;  // kchunk: the engine's K chunk (Engine::kchunk)
  size_t weight_elem_bytes() const { return wq_ ? 1 : size_t(dtype_size(wtype_)); }
  void build_plan(int T, int k, const int64_t* ids, const float* w, RoutingPlan& plan) const;
  SavedSlot* find_slot(uint64_t handle);
  SavedSlot& live_slot(uint64_t handle);  // find_slot or a clear error
  // Bytes per element of the per-row outputs (out_rows, dx_rows): bf16 with int8 GEMMs (common.h), else f32.
  size_t row_out_bytes() const { return aq_ && wtype_ == kBF16 ? 2 : sizeof(float); }

  int E_, H_, I_, Hp_, Ip_, wtype_, activation_;
  WeightFormat format_;
  bool wq_, aq_;  // int8 weights / int8 GEMMs, from format_
  size_t expert_elems_;
  Buffer gate_, up_, down_;
  Buffer gate_s_, up_s_, down_s_;  // int8 only: [E][Ip], [E][Ip], [E][Hp] fp32 scales
  std::vector<uint8_t> loaded_;  // [3][E]
  std::vector<SavedSlot> slots_;
  uint64_t next_handle_ = 1;
};

// Wall time of one phase of forward/backward summed over calls (set_profiling).
struct PhaseStat {
  long calls = 0;
  double seconds = 0.0;
};

// Process-wide engine settings.
std::string select_isa(const std::string& isa);  // "" = best available; returns the chosen name
std::string current_isa();
void set_num_threads(int n);                     // 0 = KT_SFT_THREADS or physical cores
int num_threads();
int worker_spin_us();                            // the pool's current spin before sleeping (thread_pool.h)
void set_worker_spin_us(int us);                 // ignored under KT_SFT_SPIN_US
// Phase profiling (off by default): on/off clears the table; take_profile returns it (by phase name) and clears it.
void set_profiling(bool on);
std::vector<std::pair<std::string, PhaseStat>> take_profile();

}  // namespace kt_sft

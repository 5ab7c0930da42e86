// NOTE (kt-sft engine, one MoE layer's frozen routed experts)
// Layout:    the packed experts (PackedWeights, packing.h: panels per projection, and the int8 formats' scales;
//            no other copy of the weights is kept) and a bounded set of saved-forward slots. The format's row
//            (formats.h) says how they are stored and scheduled; its kernels come from the engine (engine.h).
// Algorithm: forward groups the T*k (token, slot) pairs by expert into row segments (routing.h), runs the per-ISA
//            tasks over (expert x 32-column block x row chunk) on the thread pool, then sums each token's k rows;
//            backward replays the saved routing plan with dy. Both read as a list of named phases (forward.cpp,
//            backward.cpp). With several NUMA nodes (numa.h) the layer's experts are cut into one contiguous range
//            per node when it is made: each range's panels sit in its node's memory and its GEMM tasks run on its
//            node's workers first (schedule.h). use_storage puts the packed experts into a piece of a host's
//            shared expert store (shared_segment.h) instead of private memory: the process that packs writes
//            them there, the host's other processes adopt them as packed (read-only), so the host holds one copy.
// Invariants: what forward keeps for backward lives in a bounded set of slots (max_saved per layer, reused
//            buffers, LRU); a stale handle is an error, never silently wrong math. Scratch buffers are shared by
//            all layers of the process and guarded by the engine's mutex, so calls are serialised and may run
//            with the Python GIL released.
// LoRA:      optional per-expert LoRA (PEFT layout, docs/expert_lora_format.md) arrives as raw fp32 pointers to
//            caller-owned factors on every call (LoraArgs, lora_pack.h) and is never kept: each call repacks the
//            factors into shared scratch. A forward that saves with LoRA also keeps in its slot the layer input
//            x [T][H] (for dB_gu), u = x.B_gu [rows][r_gu] and q = h.B_d [rows][r_d] (fp32); its backward must get
//            factors of the same ranks (the same values, which the Python glue enforces) and writes the four
//            factor gradients in PEFT's layouts.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "buffer.h"
#include "formats.h"
#include "lora_pack.h"
#include "packing.h"
#include "routing.h"
#include "shared_segment.h"

namespace kt_sft {

struct SavedSlot {
  uint64_t handle = 0;  // 0 = free
  RoutingPlan plan;
  Buffer gate, up;      // [rows][Ip] pre-activations (LoRA-adapted when LoRA ran), activation dtype
  int r_gu = 0, r_d = 0;  // LoRA ranks of the forward (0 = none)
  Buffer x;             // LoRA only: [T][H] layer input, activation dtype
  Buffer u_gu, q_d;     // LoRA only: [rows][r_gu] x.B_gu and [rows][r_d] h.B_d, f32
};

class MoELayer {
 public:
  // format: how the experts are stored and multiplied (common.h, WeightFormat; formats.h), with a scale grid of
  // scale_block_n x scale_block_k weights (formats.h, format_with_scale_block). activation: what they compute between
  // the projections (activations.h), limit < 0: the row's own clamp (activation_with_limit). bias: the experts
  // have gate_up and down biases (set_bias), which forward adds before the activation and the routing weight.
  MoELayer(int experts, int hidden, int intermediate, WeightFormat format, int scale_block_n, int scale_block_k,
           Activation activation, float limit, bool bias, int max_saved);

  // Packs projection `which` (0 gate [I][H], 1 up [I][H], 2 down [H][I]) of experts [e0, e0+n) from src (packing.h,
  // WeightSource: floats, or a checkpoint's e4m3 / int4 codes with their scales, decoded by the engine), converted
  // or quantized into the layer's format; keep_codes keeps encoded codes and scales as they are (fp8 from e4m3, int4
  // formats from int4, on the layer's grid). Throws on NaN/Inf, or a source the layer cannot take.
  void set_weights(int which, int e0, int n, const WeightSource& src, bool keep_codes);
  // The biases of projection `which` (0 gate [I], 1 up [I], 2 down [H]) of experts [e0, e0+n) from fp32 src
  // [n][len] with row stride ld (elements). Throws for a layer without biases, an ungated layer's gate, NaN/Inf.
  void set_bias(int which, int e0, int n, const float* src, int64_t ld);
  // y[T][H] = sum_j w[t][j] * expert_{ids[t][j]}(x[t]) over slots with ids != kNotHere; returns a handle for
  // backward when save is set.
  // lora: optional per-expert LoRA on gate_up / down (null or all ranks 0 = frozen experts only).
  uint64_t forward(int T, int k, const void* x, const int64_t* ids, const float* w, void* y, bool save,
                   const LoraArgs* lora = nullptr);
  // dx[T][H] (activation dtype) and dw[T][k] (f32) for the forward identified by handle; with LoRA (same ranks as
  // that forward) also the factor gradients into `grads`.
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
  int max_saved() const { return int(slots_.size()); }
  // At least n slots from now on (never fewer): a caller that splits one batch into n calls saves n forwards.
  void grow_saved(int n);
  size_t packed_bytes() const { return weights_.bytes(); }  // weight memory: panels plus scales
  size_t saved_bytes() const;
  // The packed storage of projection `which` (0 gate, 1 up, 2 down): its panels (all experts, expert-major) and,
  // quantized formats only, its scales (null otherwise). Read-only views for streaming experts to another
  // device; layout(which) says how they are laid out.
  std::pair<const void*, size_t> panel_storage(int which) const;
  std::pair<const void*, size_t> scale_storage(int which) const;
  const ProjectionLayout& layout(int which) const;
  int padded_hidden() const { return Hp_; }
  int padded_intermediate() const { return Ip_; }
  WeightFormat format() const { return fmt_.format; }
  const ActivationInfo& activation() const { return act_; }
  bool has_bias() const { return !bias_loaded_.empty(); }
  // The biases as stored (fp32, zero padded; (null, 0) without): gate_up [E][gate_up columns], down [E][Hp].
  std::pair<const void*, size_t> bias_storage(bool down) const {
    const Buffer& b = down ? bias_d_ : bias_gu_;
    return {b.get(), has_bias() ? size_t(E_) * (down ? Hp_ : (act_.gated ? 2 : 1) * Ip_) * sizeof(float) : 0};
  }
  const ExpertNodes& expert_nodes() const { return nodes_; }
  std::vector<std::string> missing_weights() const;  // "expert 3 down", "expert 0 up bias", ...
  // Bytes of this layer's packed experts as one range of whole pages (use_storage's piece of a segment).
  size_t storage_bytes() const { return weights_.storage_bytes(); }
  // Holds the packed experts in `segment` from `offset` (page-aligned; storage_bytes long) instead of private
  // memory; before any set_weights. packed: another process packed them there already (every expert counts as
  // loaded); else the segment must be writable and set_weights packs into it.
  void use_storage(std::shared_ptr<SharedSegment> segment, size_t offset, bool packed);
  bool shared() const { return segment_ != nullptr; }

 private:
  friend class ForwardPass;
  friend class BackwardPass;
  LayerView view(int kchunk) const;  // kchunk: the engine's K chunk (Engine::kchunk)
  SavedSlot* find_slot(uint64_t handle);
  SavedSlot& live_slot(uint64_t handle);  // find_slot or a clear error
  SavedSlot& claim_slot();                // a free slot, else the oldest (its forward is forgotten)
  // Bytes per element of the per-row outputs (out_rows, dx_rows): bf16 with int8 GEMMs (common.h), else f32.
  size_t row_out_bytes() const { return fmt_.quantized_gemm ? 2 : sizeof(float); }

  int E_, H_, I_, Hp_, Ip_;
  FormatInfo fmt_;  // the format's row with this layer's scale grid
  ActivationInfo act_;  // the activation's row with this layer's limit
  ExpertNodes nodes_;  // where the experts live and run (the engine's layout when the layer was made)
  PackedWeights weights_;
  std::shared_ptr<SharedSegment> segment_;  // where weights_ lives when shared (kept mapped while the layer lives)
  std::vector<uint8_t> loaded_;  // [3][E]
  Buffer bias_gu_, bias_d_;           // [E][gate_up columns], [E][Hp] fp32, zero padded (bias layers only)
  std::vector<uint8_t> bias_loaded_;  // [3][E]; empty: no biases
  std::vector<SavedSlot> slots_;
  uint64_t next_handle_ = 1;
};

}  // namespace kt_sft

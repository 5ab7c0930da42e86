// MoELayer::forward as a list of named phases (ForwardPass: one call's state, one method per phase). Each phase
// ends with a pool barrier and a PhaseClock mark (the names phase_profile reports).
#include <mutex>
#include <stdexcept>

#include "engine.h"
#include "moe_layer.h"
#include "schedule.h"

namespace kt_sft {

class ForwardPass {
 public:
  ForwardPass(MoELayer& layer, Engine& eng, const void* x, const LoraArgs* lora)
      : ly_(layer), eng_(eng), f_(layer.fmt_), kt_(kernels_for(eng, f_.format)), L_(layer.view(eng.kchunk)), x_(x),
        lora_(lora && lora->on() ? lora : nullptr), clock_(eng), pool_(*eng.pool) {}

  uint64_t route(int T, int k, const int64_t* ids, const float* w, bool save);
  void gather();
  void lora_prepare();
  void gate_up_phase();
  void lora_down_input();
  void down_phase();
  void sum(void* y);

 private:
  MoELayer& ly_;
  Engine& eng_;
  const FormatInfo& f_;
  const KernelTable* kt_;
  const LayerView L_;
  const void* x_;
  const LoraArgs* lora_;  // null without LoRA
  PhaseClock clock_;
  ThreadPool& pool_;
  RoutingPlan local_;             // the plan when the forward is not saved
  RoutingPlan* plan_ = nullptr;
  SavedSlot* slot_ = nullptr;     // where the forward is saved, or null
  ForwardBuffers fb_{};
  LoraView lv_{};
};

// The routing plan, in a claimed slot when the forward is saved; the handle (0 when not saved).
uint64_t ForwardPass::route(int T, int k, const int64_t* ids, const float* w, bool save) {
  slot_ = save ? &ly_.claim_slot() : nullptr;
  plan_ = slot_ ? &slot_->plan : &local_;
  build_plan(ly_.E_, T, k, ids, w, *plan_);
  const uint64_t handle = save ? ly_.next_handle_++ : 0;
  if (slot_) {
    slot_->handle = handle;
    slot_->r_gu = lora_ ? lora_->r_gu : 0;
    slot_->r_d = lora_ ? lora_->r_d : 0;
  }
  return handle;
}

// The call's buffers, and x gathered into expert-grouped rows (int8 GEMMs without LoRA quantize straight from the
// token rows instead: the bf16 copy is never written).
void ForwardPass::gather() {
  const size_t es = size_t(dtype_size(f_.act_dtype)), rows = size_t(plan_->rows);
  ensure_scratch(eng_, f_, ly_.Hp_, ly_.Ip_);
  fb_.seg_start = plan_->seg_start.data();
  fb_.row_weight = plan_->row_weight.data();
  const bool gather_rows_too = !f_.quantized_gemm || lora_;  // LoRA's projections read the gathered rows
  fb_.xg = gather_rows_too ? eng_.xg.reserve(rows * L_.ldx * es) : nullptr;
  fb_.act = eng_.act.reserve(rows * L_.ld_dgu * es);  // the backward's dgu reuses this buffer
  fb_.out_rows = static_cast<float*>(eng_.rows_out.reserve(rows * ly_.Hp_ * ly_.row_out_bytes()));
  if (slot_) {  // an ungated layer has no gate to save
    fb_.gate_out = ly_.act_.gated ? slot_->gate.reserve(rows * ly_.Ip_ * es) : nullptr;
    fb_.up_out = slot_->up.reserve(rows * ly_.Ip_ * es);
  }
  if (gather_rows_too) gather_rows(pool_, *plan_, x_, const_cast<void*>(fb_.xg), ly_.H_, ly_.Hp_, L_.ldx, es);
  clock_.mark("forward: plan + gather");
}

// LoRA: the factors repacked, the rows of u = x.B_gu (kept in the slot with x when saved).
void ForwardPass::lora_prepare() {
  if (!lora_) return;
  const size_t es = size_t(dtype_size(f_.act_dtype)), rows = size_t(plan_->rows);
  lv_ = repack_lora(pool_, eng_.lora, *lora_, ly_.E_, ly_.H_, ly_.I_, ly_.Hp_, ly_.Ip_, ly_.act_.gated);
  fb_.lora = &lv_;
  const size_t ub = std::max<size_t>(1, rows * lora_->r_gu * sizeof(float));
  const size_t qb = std::max<size_t>(1, rows * lora_->r_d * sizeof(float));
  fb_.u_gu = static_cast<float*>(slot_ ? slot_->u_gu.reserve(ub) : eng_.l_u.reserve(ub));
  fb_.q_d = static_cast<float*>(slot_ ? slot_->q_d.reserve(qb) : eng_.l_q.reserve(qb));
  const size_t x_bytes = size_t(plan_->T) * ly_.H_ * es;
  if (slot_) parallel_copy(pool_, slot_->x.reserve(x_bytes), x_, x_bytes);
  clock_.mark("forward: LoRA repack + save x");
  if (lora_->r_gu > 0)
    run_proj(pool_, kt_, L_, *plan_, fb_.xg, L_.ldx, ly_.Hp_, lora_->r_gu, lv_.Bt_gu, const_cast<float*>(fb_.u_gu),
             nullptr);
  clock_.mark("forward: LoRA x.B_gu");
}

// act = act(x.W_gate^T + b_gate) * (x.W_up^T + b_up) (with LoRA's terms; activations.h), and the pre-activations
// when saved. (The phase names keep "SiLU-GLU" for every activation: benchmark records compare them.)
void ForwardPass::gate_up_phase() {
  const std::vector<Task> tasks = make_tasks(*plan_, ly_.Ip_ / kBlock, f_.fwd_row_chunk, f_.gate_up_blocks);
  const QuantSource qx{x_, ly_.H_, ly_.H_, ScaleFold::kNone, plan_->row_token.data()};
  run_gemm_phase(eng_, kt_, L_, *plan_, ly_.nodes_, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng_, wk);
    kt_->gate_up(L_, fb_, t, s);
  }, f_.quantized_gemm ? &qx : nullptr, &fb_.qa, &fb_.qs);
  clock_.mark(f_.quantized_gemm ? "forward: quantize x + gate_up GEMM + SiLU-GLU" : "forward: gate_up GEMM + SiLU-GLU");
}

// LoRA on down: the rows of q = h.B_d.
void ForwardPass::lora_down_input() {
  if (!lora_ || lora_->r_d == 0) return;
  run_proj(pool_, kt_, L_, *plan_, fb_.act, L_.ld_act, ly_.Ip_, lora_->r_d, lv_.Bt_d, const_cast<float*>(fb_.q_d),
           nullptr);
  clock_.mark("forward: LoRA h.B_d");
}

// The per-row outputs w * (act.W_down^T) (with LoRA's term).
void ForwardPass::down_phase() {
  const std::vector<Task> tasks = make_tasks(*plan_, ly_.Hp_ / kBlock, f_.fwd_row_chunk, f_.down_blocks);
  const QuantSource qact{fb_.act, L_.ld_act, ly_.Ip_, ScaleFold::kNone, nullptr};
  run_gemm_phase(eng_, kt_, L_, *plan_, ly_.nodes_, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng_, wk);
    kt_->down(L_, fb_, t, s);
  }, f_.quantized_gemm ? &qact : nullptr, &fb_.qa, &fb_.qs);
  clock_.mark(f_.quantized_gemm ? "forward: quantize act + down GEMM" : "forward: down GEMM");
}

// y[t] = the sum of token t's k rows, in slot order.
void ForwardPass::sum(void* y) {
  sum_rows(pool_, *plan_, fb_.out_rows, y, ly_.H_, ly_.Hp_, f_.act_dtype, ly_.row_out_bytes() == 2);
  clock_.mark("forward: sum rows");
}

uint64_t MoELayer::forward(int T, int k, const void* x, const int64_t* ids, const float* w, void* y, bool save,
                           const LoraArgs* lora) {
  if (T < 0 || k < 1) throw std::invalid_argument("need T >= 0 and k >= 1");
  if (lora && lora->on()) check_lora_args(*lora);
  const std::vector<std::string> missing = missing_weights();
  if (!missing.empty())
    throw std::runtime_error("weights were never loaded for " + missing.front() + " (" +
                             std::to_string(missing.size()) + " projections missing)");
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  ForwardPass pass(*this, eng, x, lora);
  const uint64_t handle = pass.route(T, k, ids, w, save);
  if (T == 0) return handle;
  pass.gather();
  pass.lora_prepare();
  pass.gate_up_phase();
  pass.lora_down_input();
  pass.down_phase();
  pass.sum(y);
  return handle;
}

}  // namespace kt_sft

// MoELayer::backward as a list of named phases (BackwardPass: one call's state, one method per phase). Each phase
// ends with a pool barrier and a PhaseClock mark (the names phase_profile reports).
#include <algorithm>
#include <mutex>
#include <stdexcept>

#include "engine.h"
#include "moe_layer.h"
#include "schedule.h"

namespace kt_sft {

class BackwardPass {
 public:
  BackwardPass(MoELayer& layer, Engine& eng, const SavedSlot& slot, const void* dy, const LoraArgs* lora,
               const LoraGrads* grads)
      : ly_(layer), eng_(eng), f_(layer.fmt_), kt_(kernels_for(eng, f_.format)), L_(layer.view(eng.kchunk)),
        slot_(slot), plan_(slot.plan), dy_(dy), lora_(lora && lora->on() ? lora : nullptr), grads_(grads),
        clock_(eng), pool_(*eng.pool) {}

  void gather();
  void lora_prepare();
  void act_phase();
  void lora_dz_proj();
  void input_phase();
  void lora_grads();
  void sum(void* dx, float* dw);

 private:
  float slot_dw(int t, int j) const;
  MoELayer& ly_;
  Engine& eng_;
  const FormatInfo& f_;
  const KernelTable* kt_;
  const LayerView L_;
  const SavedSlot& slot_;
  const RoutingPlan& plan_;
  const void* dy_;
  const LoraArgs* lora_;  // null without LoRA
  const LoraGrads* grads_;
  PhaseClock clock_;
  ThreadPool& pool_;
  BackwardBuffers bb_{};
  LoraView lv_{};
  int rg() const { return lora_ ? lora_->r_gu : 0; }
  int rd() const { return lora_ ? lora_->r_d : 0; }
};

// The call's buffers, and dy gathered into expert-grouped rows (int8 GEMMs without LoRA quantize straight from the
// token rows).
void BackwardPass::gather() {
  const size_t es = size_t(dtype_size(f_.act_dtype)), rows = size_t(plan_.rows);
  ensure_scratch(eng_, f_, ly_.Hp_, ly_.Ip_);
  bb_.seg_start = plan_.seg_start.data();
  bb_.row_weight = plan_.row_weight.data();
  const bool gather_rows_too = !f_.quantized_gemm || lora_;  // as in forward
  bb_.dyg = gather_rows_too ? eng_.xg.reserve(rows * L_.ldx * es) : nullptr;
  bb_.gate_in = ly_.act_.gated ? slot_.gate.get() : nullptr;
  bb_.up_in = slot_.up.get();
  bb_.dw_part = static_cast<float*>(eng_.dw_part.reserve(rows * (ly_.Ip_ / kBlock) * sizeof(float)));
  bb_.dgu = eng_.act.reserve(rows * L_.ld_dgu * es);
  bb_.dx_rows = static_cast<float*>(eng_.rows_out.reserve(rows * ly_.Hp_ * ly_.row_out_bytes()));
  if (gather_rows_too) gather_rows(pool_, plan_, dy_, const_cast<void*>(bb_.dyg), ly_.H_, ly_.Hp_, L_.ldx, es);
  clock_.mark("backward: gather dy");
}

// LoRA: the factors repacked, the saved rows, the gradient sums' scratch, and the rows of dy.A_d^T.
void BackwardPass::lora_prepare() {
  if (!lora_) return;
  const size_t rows = size_t(plan_.rows);
  lv_ = repack_lora(pool_, eng_.lora, *lora_, ly_.E_, ly_.H_, ly_.I_, ly_.Hp_, ly_.Ip_, ly_.act_.gated);
  bb_.lora = &lv_;
  bb_.count = plan_.count.data();
  bb_.row_token = plan_.row_token.data();
  bb_.x = slot_.x.get();
  bb_.dy = dy_;
  bb_.u_gu = static_cast<const float*>(slot_.u_gu.get());
  bb_.q_d = static_cast<const float*>(slot_.q_d.get());
  bb_.dyA = static_cast<float*>(eng_.l_dya.reserve(std::max<size_t>(1, rows * rd() * sizeof(float))));
  bb_.t_gu = static_cast<float*>(eng_.l_tgu.reserve(std::max<size_t>(1, rows * rg() * sizeof(float))));
  // Fused factor gradients (moe_tasks.inc, bwd_act) need all rows of an expert x block in one bwd_act task
  // (kWholeSegment). A forced K chunk (KT_SFT_KCHUNK > 0: experiments, and the engine tester, which pins the fused
  // sums to these) keeps h instead and sums every factor gradient in separate tasks.
  bb_.fuse_grads = eng_.kchunk == 0;
  bb_.h = rd() > 0 && !bb_.fuse_grads ? eng_.l_h.reserve(rows * ly_.Ip_ * dtype_size(f_.act_dtype)) : nullptr;
  bb_.gA_gu = grads_->A_gu;
  bb_.gB_gu = grads_->B_gu;
  bb_.gA_d = grads_->A_d;
  bb_.gB_d = grads_->B_d;
  // [r][32] per lora_grad block, or a fused bwd_act task's [r_gu][64] + [r_d][32] sums per column block
  ensure_lora_acc(eng_, size_t(2 * rg() + rd()) * kBlock * kActBlocksPerTask);
  clock_.mark("backward: LoRA repack");
  if (rd() > 0)
    run_proj(pool_, kt_, L_, plan_, bb_.dyg, L_.ldx, ly_.Hp_, rd(), lv_.At_d, const_cast<float*>(bb_.dyA), nullptr);
  clock_.mark("backward: LoRA dy.A_d");
}

// dz = d(gate) | d(up) from dy.W_down (with LoRA's term) and the activation's derivative; dw's partial sums.
void BackwardPass::act_phase() {
  const std::vector<Task> tasks =
      make_tasks(plan_, ly_.Ip_ / kBlock, bb_.fuse_grads ? kWholeSegment : kRowChunkBwd, kActBlocksPerTask);
  const QuantSource qdy{dy_, ly_.H_, ly_.H_, ScaleFold::kDown, plan_.row_token.data()};  // down's scales fold into dy
  run_gemm_phase(eng_, kt_, L_, plan_, ly_.nodes_, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng_, wk);
    kt_->bwd_act(L_, bb_, t, s);
  }, f_.quantized_gemm ? &qdy : nullptr, &bb_.qa, &bb_.qs);
  clock_.mark(f_.quantized_gemm ? "backward: quantize dy + dy.W_down + dSiLU-GLU + dw"
                                : "backward: dy.W_down + dSiLU-GLU + dw");
}

// LoRA on gate_up: the rows of t = dz.A_gu^T.
void BackwardPass::lora_dz_proj() {
  if (rg() == 0) return;
  run_proj(pool_, kt_, L_, plan_, bb_.dgu, L_.ld_dgu, gate_up_count(L_) * ly_.Ip_, rg(), lv_.At_gu,
           const_cast<float*>(bb_.t_gu), nullptr);
  clock_.mark("backward: LoRA dz.A_gu");
}

// The per-row input gradients dz.W_gu (with LoRA's term).
void BackwardPass::input_phase() {
  const std::vector<Task> tasks = make_tasks(plan_, ly_.Hp_ / kBlock, kRowChunkBwd, f_.dx_blocks);
  // gate's, up's scales into dz
  const QuantSource qdz{bb_.dgu, L_.ld_dgu, gate_up_count(L_) * ly_.Ip_, ScaleFold::kGateUp, nullptr};
  run_gemm_phase(eng_, kt_, L_, plan_, ly_.nodes_, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng_, wk);
    kt_->bwd_input(L_, bb_, t, s);
  }, f_.quantized_gemm ? &qdz : nullptr, &bb_.qa, &bb_.qs);
  clock_.mark(f_.quantized_gemm ? "backward: quantize dz + dz.W_gu (dx)" : "backward: dz.W_gu (dx)");
}

// LoRA factor gradients: one task per (factor, expert, kGradBlocks column blocks), big experts first; the ones
// bwd_act fused are left out (except for experts without rows, which get their zeros here).
void BackwardPass::lora_grads() {
  if (!lora_) return;
  const int E = ly_.E_;
  std::vector<int> order(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) order[size_t(e)] = e;
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return plan_.count[size_t(a)] > plan_.count[size_t(b)]; });
  int nb[kNumGradKinds] = {gate_up_count(L_) * ly_.Ip_ / kBlock, ly_.Hp_ / kBlock, ly_.Hp_ / kBlock, ly_.Ip_ / kBlock};
  for (int& n : nb) n = (n + kGradBlocks - 1) / kGradBlocks;  // tasks cover kGradBlocks column blocks
  std::vector<GradTask> gt;
  for (int e : order)
    for (int k = 0; k < kNumGradKinds; ++k) {
      const GradKind kind = GradKind(k);
      const bool fused = bb_.fuse_grads && (kind == GradKind::kA_gu || kind == GradKind::kB_d);
      if ((is_gate_up(kind) ? rg() : rd()) > 0 && (!fused || plan_.count[size_t(e)] == 0))
        for (int b = 0; b < nb[k]; ++b) gt.push_back(GradTask{kind, e, b});
    }
  pool_.run(int(gt.size()), [&](int i, int wk) {
    Scratch s = scratch_of(eng_, wk);
    kt_->lora_grad(L_, bb_, gt[size_t(i)], s);
  });
  clock_.mark("backward: LoRA factor gradients");
}

// dw of token t's slot j: its row's partial sums (+ LoRA's part, + <dy_t, b_down> with biases).
float BackwardPass::slot_dw(int t, int j) const {
  const int row = plan_.row_of[size_t(t) * plan_.k + j];
  if (row < 0) return 0.f;  // slot computed elsewhere: no gradient from here
  const int ipb = ly_.Ip_ / kBlock, r_d = rd();
  const float* part = bb_.dw_part + size_t(row) * ipb;
  float s = 0.f;
  for (int b = 0; b < ipb; ++b) s += part[b];
  if (r_d > 0) {  // <dy, s_d * q.A_d> = s_d * q . (dy.A_d^T)
    float l = 0.f;
    for (int rho = 0; rho < r_d; ++rho) l += bb_.q_d[size_t(row) * r_d + rho] * bb_.dyA[size_t(row) * r_d + rho];
    s += lora_->s_d * l;
  }
  if (L_.bias_d) {  // the expert's output includes its down bias: <dy_t, b_down[e]>, in h order
    const float* b = L_.bias_d + size_t(row_expert(plan_, row)) * ly_.Hp_;
    float d = 0.f;
    for (int h = 0; h < ly_.H_; ++h) d += load_as_f32(dy_, size_t(t) * ly_.H_ + h, f_.act_dtype) * b[h];
    s += d;
  }
  return s;
}

// dx[t] = the sum of token t's k rows (slot order); dw[t][j] = slot_dw, tokens in chunks on the pool.
void BackwardPass::sum(void* dx, float* dw) {
  sum_rows(pool_, plan_, bb_.dx_rows, dx, ly_.H_, ly_.Hp_, f_.act_dtype, ly_.row_out_bytes() == 2);
  const int T = plan_.T, k = plan_.k, chunks = (T + kTokenChunk - 1) / kTokenChunk;
  pool_.run(chunks, [&](int c, int) {
    for (int t = c * kTokenChunk; t < std::min(T, (c + 1) * kTokenChunk); ++t)
      for (int j = 0; j < k; ++j) dw[size_t(t) * k + j] = slot_dw(t, j);
  });
  clock_.mark("backward: sum rows + dw");
}

// The forward behind the handle ran with this T, k and these LoRA ranks; LoRA's arguments and gradient buffers.
static void check_backward_args(const SavedSlot& slot, int T, int k, const LoraArgs* lora, const LoraGrads* grads) {
  if (slot.plan.T != T || slot.plan.k != k)
    throw std::invalid_argument("backward got T=" + std::to_string(T) + ", k=" + std::to_string(k) +
                                " but the forward had T=" + std::to_string(slot.plan.T) +
                                ", k=" + std::to_string(slot.plan.k));
  const bool lo = lora && lora->on();
  if (lo != (slot.r_gu > 0 || slot.r_d > 0) || (lo && (lora->r_gu != slot.r_gu || lora->r_d != slot.r_d)))
    throw std::invalid_argument("backward got LoRA ranks (gate_up " + std::to_string(lo ? lora->r_gu : 0) + ", down " +
                                std::to_string(lo ? lora->r_d : 0) + ") but the forward ran with (" +
                                std::to_string(slot.r_gu) + ", " + std::to_string(slot.r_d) + ")");
  if (lo) {
    check_lora_args(*lora);
    check_lora_grads(*lora, grads);
  }
}

void MoELayer::backward(uint64_t handle, int T, int k, const void* dy, void* dx, float* dw, const LoraArgs* lora,
                        const LoraGrads* grads) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  SavedSlot& slot = live_slot(handle);
  check_backward_args(slot, T, k, lora, grads);
  slot.handle = 0;  // consumed; buffers stay for the next forward
  if (slot.plan.T == 0) {
    if (lora && lora->on()) zero_lora_grads(*lora, *grads, E_, H_, I_, act_.gated);
    return;
  }
  BackwardPass pass(*this, eng, slot, dy, lora, grads);
  pass.gather();
  pass.lora_prepare();
  pass.act_phase();
  pass.lora_dz_proj();
  pass.input_phase();
  pass.lora_grads();
  pass.sum(dx, dw);
}

}  // namespace kt_sft

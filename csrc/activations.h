// NOTE (kt-sft engine, what an expert computes between its two projections: one row per activation)
// Layout:    kActivations[Activation]: the activation function (ActFn), whether the expert is gated (gate and up
//            projections, h = act(gate) * up) or not (one up projection, h = act(up)), and its constants:
//              alpha     swish: act(x) = x * sigmoid(alpha * x) (silu: 1, gpt-oss: 1.702)
//              limit     gated: the gate is clamped to <= limit and up to [-limit, limit] before the activation
//                        (+inf: no clamp); rows with takes_limit may get the layer's own (DeepSeek-V4's
//                        swiglu_limit; gpt-oss's 7 is a default), and must where the row has none
//              up_shift  gated: h = act(gate) * (up + up_shift) (gpt-oss: 1)
//            Python's rows: kt_sft/engine/activations.py (ExpertActivation.code is the _engine.Activation member).
//            A layer keeps its own copy of its row, with its limit (activation_with_limit), in LayerView.act.
//            An ungated layer stores no gate projection: its "gate_up" is the up projection alone, so the
//            gate_up columns (forward's C, backward's dz, LoRA's A_gu, the gate_up biases) are [0, Ip) = up
//            where a gated layer has [0, Ip) = gate, [Ip, 2 Ip) = up (gate_up_count / up_column, common.h).
// Algorithm: the kernels read the row in two helpers only (kernels/moe_common.inc: act_forward16,
//            act_backward16), so no task body branches on the activation. Backward is the derivative of the
//            forward as torch autograd takes it: a clamped input gets no gradient outside its range (the bound
//            itself inside), relu^2's is 2 relu(u), GELU-tanh's the product rule on its tanh form.
// Invariants: rows in Activation order (checked at compile time); the driver refuses a limit on a row without
//            takes_limit, and a non-positive or NaN one.
#pragma once
#include <cmath>
#include <stdexcept>
#include <string>

namespace kt_sft {

// Values shared with kt_sft/engine/activations.py (one row there per value).
enum class Activation : int {
  kSiluGLU = 0,         // silu(gate) * up (most families)
  kSiluGLUClamped = 1,  // silu(min(gate, limit)) * clamp(up, -limit, limit) (DeepSeek-V4, GLM-5 style swiglu_limit)
  kGptOssSwiGLU = 2,    // swish_1.702(min(gate, 7)) * (clamp(up, -7, 7) + 1) (gpt-oss)
  kGeluTanhGLU = 3,     // gelu_tanh(gate) * up (gemma4)
  kRelu2 = 4,           // relu(up)^2, no gate (nemotron_h)
};
constexpr int kNumActivations = 5;

enum class ActFn : int { kSwish = 0, kGeluTanh = 1, kRelu2 = 2 };

struct ActivationInfo {
  Activation activation;
  const char* name;  // the _engine.Activation member
  ActFn fn;
  bool gated;
  float alpha;
  float limit;       // +inf: no clamp
  float up_shift;
  bool takes_limit;  // the layer gives the limit
};

constexpr float kNoLimit = __builtin_huge_valf();

inline constexpr ActivationInfo kActivations[kNumActivations] = {
    // activation, name, function, gated, alpha, limit, up_shift, takes_limit
    {Activation::kSiluGLU, "silu_glu", ActFn::kSwish, true, 1.0f, kNoLimit, 0.0f, false},
    {Activation::kSiluGLUClamped, "silu_glu_clamped", ActFn::kSwish, true, 1.0f, kNoLimit, 0.0f, true},
    {Activation::kGptOssSwiGLU, "gpt_oss_swiglu", ActFn::kSwish, true, 1.702f, 7.0f, 1.0f, true},
    {Activation::kGeluTanhGLU, "gelu_tanh_glu", ActFn::kGeluTanh, true, 1.0f, kNoLimit, 0.0f, false},
    {Activation::kRelu2, "relu2", ActFn::kRelu2, false, 1.0f, kNoLimit, 0.0f, false},
};

constexpr bool activation_rows_valid() {
  for (int a = 0; a < kNumActivations; ++a)
    if (int(kActivations[a].activation) != a) return false;
  return true;
}
static_assert(activation_rows_valid(), "kActivations: Activation order");

// The row of activation a as one layer uses it: limit < 0 keeps the row's, else the layer's clamp limit (rows with
// takes_limit only; one without a limit of its own needs one). Throws std::invalid_argument naming the problem.
// (Driver only; static: an ISA unit that includes this header never shares a copy.)
static inline ActivationInfo activation_with_limit(Activation a, float limit) {
  if (int(a) < 0 || int(a) >= kNumActivations)
    throw std::invalid_argument("unknown activation " + std::to_string(int(a)));
  ActivationInfo r = kActivations[int(a)];
  if (limit < 0.f) {
    if (r.takes_limit && r.limit == kNoLimit)
      throw std::invalid_argument(std::string("activation ") + r.name + " needs a clamp limit > 0");
    return r;
  }
  if (!r.takes_limit)
    throw std::invalid_argument(std::string("activation ") + r.name + " takes no clamp limit (got " +
                                std::to_string(limit) + ")");
  if (!(limit > 0.f)) throw std::invalid_argument("clamp limit must be > 0, got " + std::to_string(limit));
  r.limit = limit;
  return r;
}

}  // namespace kt_sft

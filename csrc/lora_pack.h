// NOTE (kt-sft engine, expert LoRA arguments and their per-call repack)
// Layout:    LoraArgs: the caller's factors in PEFT's flat layouts, fp32, contiguous:
//              A_gu [r_gu*E][2I] (ungated: [I], activations.h), B_gu [H][r_gu*E], A_d [r_d*E][H], B_d [I][r_d*E];
//              s_* = lora_alpha / r
//            (r = 0: that projection has no LoRA); LoraGrads: their gradients, same layouts. repack_lora turns
//            them into LoraView (kernel_api.h): per-expert, zero-padded, row-major.
// Algorithm: the A factors are already [E][r][...] rows: used in place when no padding is needed (I and H
//            multiples of 32, the usual case), else copied with zero padding. The B factors are transposed
//            (transpose_b_factor) in tiles of 32 source rows, so reads and writes both run along cache lines.
// Invariants: factors are never kept between calls; every element of LoraGrads is written by backward.
#pragma once
#include <cstddef>

#include "buffer.h"
#include "kernel_api.h"

namespace kt_sft {

class ThreadPool;

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

// Scratch the repacked factors live in (when they cannot be used in place).
struct LoraRepackBuffers {
  Buffer at_gu, bt_gu, at_d, bt_d;
};

// Throws std::invalid_argument for negative ranks or a missing factor of a projection with rank > 0.
void check_lora_args(const LoraArgs& a);
// Throws unless every factor with rank > 0 has a gradient buffer.
void check_lora_grads(const LoraArgs& a, const LoraGrads* g);
// gated: A_gu holds gate and up columns (else up's alone).
LoraView repack_lora(ThreadPool& pool, LoraRepackBuffers& buf, const LoraArgs& a, int E, int H, int I, int Hp, int Ip,
                     bool gated);
// All four gradients zero (a backward without routed rows).
void zero_lora_grads(const LoraArgs& a, const LoraGrads& g, int E, int H, int I, bool gated);

}  // namespace kt_sft

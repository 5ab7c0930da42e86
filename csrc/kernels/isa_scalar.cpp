// NOTE (kt-sft engine, scalar path: the executable spec)
// Layout:    panels as in common.h; C[m][0..31] from panels B0 (cols 0..15) and B1 (cols 16..31).
// Algorithm: plain loops, one row at a time, k-pairs outermost so the 32 accumulators stay in registers.
//            Compiled for baseline x86-64 (SSE2), so it runs on every CPU; the other paths must agree with it.
// Invariants: accumulates in the same order as the reference definition sum_k a[k]*w[k] (pairs in k order).
#include "../kernel_api.h"

namespace kt_sft {
namespace {

#define KT_ISA_NAME "scalar"
static inline void task_begin() {}

static void mk(const uint16_t* A, size_t lda, int M, const uint16_t* B0, const uint16_t* B1, int Kp, float* C,
               bool accumulate = false) {
  for (int m = 0; m < M; ++m) {
    const uint16_t* a = A + size_t(m) * lda;
    float acc[kBlock] = {0};
    if (accumulate)
      for (int c = 0; c < kBlock; ++c) acc[c] = C[m * kBlock + c];
    for (int kk = 0; kk < Kp / 2; ++kk) {
      const float a0 = bf16_to_f32(a[2 * kk]), a1 = bf16_to_f32(a[2 * kk + 1]);
      const uint16_t* b0 = B0 + size_t(kk) * kPanel * 2;
      const uint16_t* b1 = B1 + size_t(kk) * kPanel * 2;
      for (int n = 0; n < kPanel; ++n) {
        acc[n] += a0 * bf16_to_f32(b0[2 * n]) + a1 * bf16_to_f32(b0[2 * n + 1]);
        acc[kPanel + n] += a0 * bf16_to_f32(b1[2 * n]) + a1 * bf16_to_f32(b1[2 * n + 1]);
      }
    }
    for (int c = 0; c < kBlock; ++c) C[m * kBlock + c] = acc[c];
  }
}

static void mk(const float* A, size_t lda, int M, const float* B0, const float* B1, int Kp, float* C,
               bool accumulate = false) {
  for (int m = 0; m < M; ++m) {
    const float* a = A + size_t(m) * lda;
    float acc[kBlock] = {0};
    if (accumulate)
      for (int c = 0; c < kBlock; ++c) acc[c] = C[m * kBlock + c];
    for (int k = 0; k < Kp; ++k) {
      const float* b0 = B0 + size_t(k) * kPanel;
      const float* b1 = B1 + size_t(k) * kPanel;
      for (int n = 0; n < kPanel; ++n) {
        acc[n] += a[k] * b0[n];
        acc[kPanel + n] += a[k] * b1[n];
      }
    }
    for (int c = 0; c < kBlock; ++c) C[m * kBlock + c] = acc[c];
  }
}

#include "moe_kernels.inc"

}  // namespace

const IsaKernels* kernels_scalar() { return &kKernels; }

}  // namespace kt_sft

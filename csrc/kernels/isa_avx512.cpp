// NOTE (kt-sft engine, AVX512-BF16 path: Cooper Lake, Zen 4/5, Sapphire Rapids without AMX use)
// Layout / algorithm: see avx512_microkernels.h (vdpbf16ps on VNNI panel rows, 12x32 register blocks).
// Invariants: compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16; selected only when
//            CPUID reports all of them and XCR0 enables the ZMM state.
#include <immintrin.h>
#include "../kernel_api.h"

namespace kt_sft {
namespace {

#define KT_ISA_NAME "avx512"
static inline void task_begin() {}
#include "avx512_microkernels.h"
static inline void mk(const uint16_t* A, size_t lda, int M, const uint16_t* B0, const uint16_t* B1, int Kp, float* C,
                      bool accumulate = false) {
  mk_avx512(A, lda, M, B0, B1, Kp, C, accumulate);
}
static inline void mk(const float* A, size_t lda, int M, const float* B0, const float* B1, int Kp, float* C,
                      bool accumulate = false) {
  mk_avx512(A, lda, M, B0, B1, Kp, C, accumulate);
}
#include "moe_kernels.inc"

}  // namespace

const IsaKernels* kernels_avx512() { return &kKernels; }

}  // namespace kt_sft

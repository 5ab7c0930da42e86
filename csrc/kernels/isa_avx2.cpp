// NOTE (kt-sft engine, AVX2+FMA path; also the path for AVX512 CPUs without BF16, e.g. Skylake-SP)
// Layout:    panels as in common.h. A 64-byte BF16 panel row holds 16 (k, k+1) pairs; one 256-bit load
//            covers 8 columns, and `<< 16` / `& 0xffff0000` split it into the even-k and odd-k floats.
// Algorithm: register block of 4 rows x 16 columns (8 accumulators), one panel at a time; A elements are
//            broadcast, B rows are streamed from L1/L2. Compiled with -mavx2 -mfma only.
// Invariants: fp32 accumulation; rows beyond M are never read.
#include <immintrin.h>
#include "../kernel_api.h"

namespace kt_sft {
namespace {

#define KT_ISA_NAME "avx2"
static inline void task_begin() {}

template <int R>
static inline void block_bf16(const uint16_t* A, size_t lda, const uint16_t* Bp, int Kp, float* C, bool accumulate) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate ? _mm256_loadu_ps(C + r * kBlock) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? _mm256_loadu_ps(C + r * kBlock + 8) : _mm256_setzero_ps();
  }
  const __m256i hi_mask = _mm256_set1_epi32(int(0xffff0000u));
  for (int kk = 0; kk < Kp / 2; ++kk) {
    const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Bp + size_t(kk) * 32));
    const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Bp + size_t(kk) * 32 + 16));
    const __m256 b0e = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
    const __m256 b0o = _mm256_castsi256_ps(_mm256_and_si256(v0, hi_mask));
    const __m256 b1e = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
    const __m256 b1o = _mm256_castsi256_ps(_mm256_and_si256(v1, hi_mask));
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, A + size_t(r) * lda + 2 * kk, 4);
      const __m256 ae = _mm256_castsi256_ps(_mm256_set1_epi32(int(pair << 16)));
      const __m256 ao = _mm256_castsi256_ps(_mm256_set1_epi32(int(pair & 0xffff0000u)));
      acc[r][0] = _mm256_fmadd_ps(ae, b0e, acc[r][0]);
      acc[r][0] = _mm256_fmadd_ps(ao, b0o, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(ae, b1e, acc[r][1]);
      acc[r][1] = _mm256_fmadd_ps(ao, b1o, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(C + r * kBlock, acc[r][0]);
    _mm256_storeu_ps(C + r * kBlock + 8, acc[r][1]);
  }
}

template <int R>
static inline void block_f32(const float* A, size_t lda, const float* Bp, int Kp, float* C, bool accumulate) {
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate ? _mm256_loadu_ps(C + r * kBlock) : _mm256_setzero_ps();
    acc[r][1] = accumulate ? _mm256_loadu_ps(C + r * kBlock + 8) : _mm256_setzero_ps();
  }
  for (int k = 0; k < Kp; ++k) {
    const __m256 b0 = _mm256_loadu_ps(Bp + size_t(k) * kPanel);
    const __m256 b1 = _mm256_loadu_ps(Bp + size_t(k) * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 a = _mm256_set1_ps(A[size_t(r) * lda + k]);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm256_storeu_ps(C + r * kBlock, acc[r][0]);
    _mm256_storeu_ps(C + r * kBlock + 8, acc[r][1]);
  }
}

// One 16-column panel: rows in blocks of 4, then a 1..3-row tail.
template <typename T, void (*B4)(const T*, size_t, const T*, int, float*, bool),
          void (*B1)(const T*, size_t, const T*, int, float*, bool), void (*B2)(const T*, size_t, const T*, int, float*, bool),
          void (*B3)(const T*, size_t, const T*, int, float*, bool)>
static inline void panel_rows(const T* A, size_t lda, int M, const T* Bp, int Kp, float* C, bool acc) {
  int m = 0;
  for (; m + 4 <= M; m += 4) B4(A + size_t(m) * lda, lda, Bp, Kp, C + m * kBlock, acc);
  switch (M - m) {
    case 3: B3(A + size_t(m) * lda, lda, Bp, Kp, C + m * kBlock, acc); break;
    case 2: B2(A + size_t(m) * lda, lda, Bp, Kp, C + m * kBlock, acc); break;
    case 1: B1(A + size_t(m) * lda, lda, Bp, Kp, C + m * kBlock, acc); break;
    default: break;
  }
}

static void mk(const uint16_t* A, size_t lda, int M, const uint16_t* B0, const uint16_t* B1, int Kp, float* C,
               bool accumulate = false) {
  panel_rows<uint16_t, block_bf16<4>, block_bf16<1>, block_bf16<2>, block_bf16<3>>(A, lda, M, B0, Kp, C, accumulate);
  panel_rows<uint16_t, block_bf16<4>, block_bf16<1>, block_bf16<2>, block_bf16<3>>(A, lda, M, B1, Kp, C + kPanel, accumulate);
}

static void mk(const float* A, size_t lda, int M, const float* B0, const float* B1, int Kp, float* C,
               bool accumulate = false) {
  panel_rows<float, block_f32<4>, block_f32<1>, block_f32<2>, block_f32<3>>(A, lda, M, B0, Kp, C, accumulate);
  panel_rows<float, block_f32<4>, block_f32<1>, block_f32<2>, block_f32<3>>(A, lda, M, B1, Kp, C + kPanel, accumulate);
}

#include "moe_kernels.inc"

}  // namespace

const IsaKernels* kernels_avx2() { return &kKernels; }

}  // namespace kt_sft

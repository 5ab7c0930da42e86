// NOTE (kt-sft engine, AVX512 micro-kernels; included by the avx512 and amx units only)
// Layout:    a BF16 panel row is 16 (k, k+1) pairs = one zmm, exactly the vdpbf16ps operand; an F32 panel
//            row is 16 floats = one zmm. Both panels of a 32-column block are read together.
// Algorithm: register block of R <= 12 rows x 32 columns (24 zmm accumulators), A pairs broadcast.
// Invariants: needs AVX512F/BW/VL/DQ + AVX512_BF16; fp32 accumulation.
// INT8:      dequant_row_avx512 expands one 32-element VNNI row of an int8 panel to bf16(q * s) with
//            vcvtne2ps2bf16 (round to nearest even, as f32_to_bf16; it treats denormal products as zero, which
//            only a channel with max |w| < 1.5e-36 could produce).
// Transpose: transpose_slice_avx512 turns one 16 x 32 bf16 slice of a panel (16 pair rows x 16 columns) into
//            the 8 pair rows x 2 panels of the transposed B operand: a 16x16 transpose of 32-bit pairs
//            (unpack / shuffle, 64 ops), then one vpermt2w per output row to pair rows n, n+1 per column.
// Quads:     transpose_quads_avx512 is the int8 GEMMs' transposed repack (moe_int8_gemm.inc, pack_transposed_quads):
//            one 512-byte slice (8 quad rows x 16 channels x 4 bytes) -> 4 quad rows of each of the 2 panels:
//            a 4x4 byte transpose inside every 16-byte lane, then a 4x4 transpose of 128-bit lanes.
// Included inside an anonymous namespace, after <immintrin.h>.

template <int R>
static inline void block_bf16(const uint16_t* A, size_t lda, const uint16_t* B0, const uint16_t* B1, int Kp, float* C,
                              bool accumulate) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate ? _mm512_loadu_ps(C + r * kBlock) : _mm512_setzero_ps();
    acc[r][1] = accumulate ? _mm512_loadu_ps(C + r * kBlock + kPanel) : _mm512_setzero_ps();
  }
  for (int kk = 0; kk < Kp / 2; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(B0 + size_t(kk) * 32);
    const __m512bh b1 = (__m512bh)_mm512_loadu_si512(B1 + size_t(kk) * 32);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, A + size_t(r) * lda + 2 * kk, 4);
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(pair));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(C + r * kBlock, acc[r][0]);
    _mm512_storeu_ps(C + r * kBlock + kPanel, acc[r][1]);
  }
}

template <int R>
static inline void block_f32(const float* A, size_t lda, const float* B0, const float* B1, int Kp, float* C,
                             bool accumulate) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) {
    acc[r][0] = accumulate ? _mm512_loadu_ps(C + r * kBlock) : _mm512_setzero_ps();
    acc[r][1] = accumulate ? _mm512_loadu_ps(C + r * kBlock + kPanel) : _mm512_setzero_ps();
  }
  for (int k = 0; k < Kp; ++k) {
    const __m512 b0 = _mm512_loadu_ps(B0 + size_t(k) * kPanel);
    const __m512 b1 = _mm512_loadu_ps(B1 + size_t(k) * kPanel);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(A[size_t(r) * lda + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(C + r * kBlock, acc[r][0]);
    _mm512_storeu_ps(C + r * kBlock + kPanel, acc[r][1]);
  }
}

// Rows in blocks of 12, then one smaller block for the tail (R is a compile-time register count).
#define KT_AVX512_ROWS(NAME, T, BLOCK)                                                                   \
  static void NAME(const T* A, size_t lda, int M, const T* B0, const T* B1, int Kp, float* C, bool acc) { \
    int m = 0;                                                                                         \
    for (; m + 12 <= M; m += 12) BLOCK<12>(A + size_t(m) * lda, lda, B0, B1, Kp, C + m * kBlock, acc);  \
    const T* a = A + size_t(m) * lda;                                                                  \
    float* c = C + m * kBlock;                                                                         \
    switch (M - m) {                                                                                   \
      case 11: BLOCK<11>(a, lda, B0, B1, Kp, c, acc); break;                                                \
      case 10: BLOCK<10>(a, lda, B0, B1, Kp, c, acc); break;                                                \
      case 9: BLOCK<9>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 8: BLOCK<8>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 7: BLOCK<7>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 6: BLOCK<6>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 5: BLOCK<5>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 4: BLOCK<4>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 3: BLOCK<3>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 2: BLOCK<2>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      case 1: BLOCK<1>(a, lda, B0, B1, Kp, c, acc); break;                                                  \
      default: break;                                                                                  \
    }                                                                                                  \
  }

KT_AVX512_ROWS(mk_avx512, uint16_t, block_bf16)
KT_AVX512_ROWS(mk_avx512, float, block_f32)
#undef KT_AVX512_ROWS

#define KT_DEQUANT_ROW dequant_row_avx512
static inline void dequant_row_avx512(const int8_t* q, const float* sv, uint16_t* dst) {
  // maskz forms: the unmasked intrinsics start from _mm512_undefined_*, which GCC 12 warns about.
  const __m512i i0 = _mm512_maskz_cvtepi8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512i i1 = _mm512_maskz_cvtepi8_epi32(0xffff, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
  const __m512 f0 = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xffff, i0), _mm512_loadu_ps(sv));
  const __m512 f1 = _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xffff, i1), _mm512_loadu_ps(sv + 16));
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(f1, f0));  // low half from f0
}

// 4x4 transpose of 128-bit lanes: out[l] = lane l of a, b, c, d, in that order.
static inline void transpose_lanes_4x4(__m512i a, __m512i b, __m512i c, __m512i d, __m512i out[4]) {
  const __m512i u0 = _mm512_maskz_shuffle_i64x2(0xff, a, b, 0x44);  // lanes 0, 1 of a, then of b
  const __m512i u1 = _mm512_maskz_shuffle_i64x2(0xff, a, b, 0xee);  // lanes 2, 3
  const __m512i u2 = _mm512_maskz_shuffle_i64x2(0xff, c, d, 0x44);
  const __m512i u3 = _mm512_maskz_shuffle_i64x2(0xff, c, d, 0xee);
  out[0] = _mm512_maskz_shuffle_i64x2(0xff, u0, u2, 0x88);
  out[1] = _mm512_maskz_shuffle_i64x2(0xff, u0, u2, 0xdd);
  out[2] = _mm512_maskz_shuffle_i64x2(0xff, u1, u3, 0x88);
  out[3] = _mm512_maskz_shuffle_i64x2(0xff, u1, u3, 0xdd);
}

// src: 16 pair rows of one panel slice (src[kk][n] = (W[n][k0+2kk], W[n][k0+2kk+1]) as uint32, 64 bytes per kk);
// d0/d1: the first of 8 consecutive pair rows (32 uint16 each) of the two transposed panels: pair row p gets
// (W[2p][k0+c], W[2p+1][k0+c]) for c < 16 in d0 and c >= 16 in d1. The same bytes as the plain loop of
// pack_transposed_pairs (moe_common.inc).
#define KT_TRANSPOSE_SLICE transpose_slice_avx512
static inline void transpose_slice_avx512(const uint32_t* src, uint16_t* d0, uint16_t* d1) {
  // Output pair row q of panel P (c < 16: W[2q][k0 + 16P + c], W[2q+1][...]) is the 64-bit word q of the source's
  // rows 8P .. 8P+7 in order (each row's word q holds n = 2q, 2q+1 at k0 + 2kk, k0 + 2kk + 1), with the middle two
  // bf16 of every word swapped: an 8x8 transpose of 64-bit words per panel. 32 shuffles per panel (8 in-lane byte
  // shuffles, 8 unpacks, 16 lane shuffles) where the 16x16 transpose of 32-bit pairs and the bf16 interleave took
  // 80 for the slice; shuffles bound this repack (~17 GB/s per AMX core, backward's `operands` in BENCHMARKS.md).
  // maskz forms throughout: GCC 12 warns on the unmasked ones (they start from an undefined vector).
  alignas(16) static const int8_t swap_mid[16] = {0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15};
  const __m512i sw =
      _mm512_maskz_broadcast_i32x4(0xffff, _mm_load_si128(reinterpret_cast<const __m128i*>(swap_mid)));
  for (int P = 0; P < 2; ++P) {
    __m512i r[8], t[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm512_shuffle_epi8(_mm512_loadu_si512(src + 16 * (8 * P + i)), sw);
    // t[2j + b], lane l: rows 2j, 2j+1 of word q = 2l + b
    for (int j = 0; j < 4; ++j) {
      t[2 * j] = _mm512_maskz_unpacklo_epi64(0xff, r[2 * j], r[2 * j + 1]);
      t[2 * j + 1] = _mm512_maskz_unpackhi_epi64(0xff, r[2 * j], r[2 * j + 1]);
    }
    uint16_t* d = P ? d1 : d0;
    for (int b = 0; b < 2; ++b) {  // lane l of t[b], t[2+b], t[4+b], t[6+b] -> pair row 2l + b
      __m512i row[4];
      transpose_lanes_4x4(t[b], t[2 + b], t[4 + b], t[6 + b], row);
      for (int l = 0; l < 4; ++l) _mm512_storeu_si512(d + 32 * (2 * l + b), row[l]);
    }
  }
}

// src: 512 bytes, src[k4][n][j] = W[n][k0 + 4k4 + j] (k4 < 8, n < 16, j < 4); d0 / d1: the first of 4 consecutive
// quad rows (64 bytes each) of the two transposed panels: quad row q of d_P, column c, byte i = W[4q + i][k0 + 16P + c].
#define KT_TRANSPOSE_QUADS transpose_quads_avx512
static inline void transpose_quads_avx512(const int8_t* src, int8_t* d0, int8_t* d1) {
  // Each 16-byte lane (quad row k4, channels 4q .. 4q+3) is a 4x4 byte matrix [channel][j]: transposed in place it
  // holds columns 4k4 .. 4k4+3, 4 channel bytes each, which is one quarter of output row (q, P = k4 / 4).
  alignas(16) static const int8_t t4x4[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const __m512i sh =
      _mm512_maskz_broadcast_i32x4(0xffff, _mm_load_si128(reinterpret_cast<const __m128i*>(t4x4)));
  for (int P = 0; P < 2; ++P) {
    __m512i r[4];
    for (int i = 0; i < 4; ++i) r[i] = _mm512_shuffle_epi8(_mm512_loadu_si512(src + 64 * (4 * P + i)), sh);
    __m512i row[4];  // output row q = lane q of r[0], r[1], r[2], r[3]
    transpose_lanes_4x4(r[0], r[1], r[2], r[3], row);
    int8_t* d = P ? d1 : d0;
    for (int q = 0; q < 4; ++q) _mm512_storeu_si512(d + 64 * q, row[q]);
  }
}

#include "avx512_int4.h"  // the int4-GEMM expansion's tables and (with AVX512-VBMI: the amx unit) lookups

// NOTE (kt-sft engine, AVX512 micro-kernels; included by the avx512 and amx units only)
// Layout:    a BF16 panel row is 16 (k, k+1) pairs = one zmm, exactly the vdpbf16ps operand; an F32 panel
//            row is 16 floats = one zmm. Both panels of a 32-column block are read together.
// Algorithm: register block of R <= 12 rows x 32 columns (24 zmm accumulators), A pairs broadcast.
// Invariants: needs AVX512F/BW/VL/DQ + AVX512_BF16; fp32 accumulation.
// INT8:      dequant_row_avx512 expands one 32-element VNNI row of an int8 panel to bf16(q * s) with
//            vcvtne2ps2bf16 (round to nearest even, as f32_to_bf16; it treats denormal products as zero, which
//            only a channel with max |w| < 1.5e-36 could produce).
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

// NOTE (kt-sft engine, AVX512 kernels of the int4-GEMM expansion; included by avx512_microkernels.h)
// Layout:    a code table (moe_int4_gemm.inc, table_at) is 256 bytes: 64 per 4 columns (4q .. 4q+3), in them byte
//            4 code + i is column 4q + i's int8 weight of that int4 code. Codes come as int4 pair rows (16 bytes:
//            column n's rows k, k+1 in the low, high nibble of byte n).
// Algorithm: tables: the ratios of columns 4q .. 4q+3 broadcast to the 4 lanes times (4a + d - 8) in lane a (code
//            4a + d), rounded to int32 for d = 0..3, then packssdw / packsswb (saturating: with a max at -127 that
//            is the clamp to +-127) leave columns 4q.. in exactly their 64 table bytes. Lookups (amx unit,
//            AVX512-VBMI): every output byte gets its table index: vpermb (forward) or vpermt2b (transposed) moves
//            the byte holding its code into its qword, vpmultishiftqb moves the nibble into bits 2..5, vpternlogd
//            keeps them and ors the column's bits in. A transposed output row (4 channels x 16 rows) is then one
//            vpermb of its channels' 64 table bytes; a forward quad row (16 columns x 4 rows) two masked vpermi2b,
//            columns 0..7 from the table's first 128 bytes, 8..15 from the rest. One 64-byte output vector per
//            5 (transposed) or 7 (forward) instructions.
// Invariants: the tables hold exactly moe_int4_gemm.inc's plain fill_code_table (the same products, rounded to
//            nearest even by the instruction, the same clamp), the lookups its plain loops' bytes
//            (tests/kernels/int4_simde_check.cpp checks both on SIMDe's emulation of these instructions).

#define KT_INT4_TABLE(r, t) code_table_avx512((__m512)(r), t)
static inline void code_table_avx512(__m512 r, int8_t* t) {
  const __m512i floor = _mm512_set1_epi8(-127);
  for (int q = 0; q < 4; ++q) {
    const __m512 rq = _mm512_maskz_shuffle_f32x4(0xffff, r, r, 0x55 * q);  // columns 4q .. 4q+3 in each lane
    __m512i v[4];
    for (int d = 0; d < 4; ++d) {  // lane a: code 4a + d
      const __m512 code = _mm512_setr_ps(d - 8, d - 8, d - 8, d - 8, d - 4, d - 4, d - 4, d - 4, d, d, d, d, d + 4,
                                         d + 4, d + 4, d + 4);
      v[d] = _mm512_maskz_cvt_roundps_epi32(0xffff, _mm512_mul_ps(rq, code),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    // lane a, byte 4d + i: code 4a + d, column 4q + i
    const __m512i b = _mm512_packs_epi16(_mm512_packs_epi32(v[0], v[1]), _mm512_packs_epi32(v[2], v[3]));
    _mm512_storeu_si512(t + 64 * q, _mm512_max_epi8(b, floor));
  }
}

#if defined(__AVX512VBMI__)
// Per output byte p of a lookup: where its code byte comes from, the multishift count that puts its nibble into bits
// 2..5, and its column's bits of the table index, for a forward quad row and for a transposed output row q = 0.
struct Int4Lanes {
  alignas(64) uint8_t spread[64];  // quad row, qword m (columns 2m, 2m+1): pr0[2m], pr1[2m], pr0[2m+1], pr1[2m+1]
  alignas(64) uint8_t shifts[64];
  alignas(64) uint8_t column[64];  // column n: n % 4, and (n / 4) % 2 in bit 6 (vpermi2b's 128 bytes)
  alignas(64) uint8_t gather[64];  // transposed, qword m (rows 2m, 2m+1): pair row m's bytes 4q .. 4q+3
  alignas(64) uint8_t tshifts[64];
  alignas(64) uint8_t tcolumn[64];  // channel 4q + i: i
};
static constexpr Int4Lanes int4_lanes() {
  Int4Lanes l{};
  const int src[4] = {0, 16, 1, 17};  // + 2m
  for (int p = 0; p < 64; ++p) {
    const int m = p / 8, a = p % 8 / 4, j = p % 4;  // quad row: column n = 2m + a, row j; transposed: row 2m + a
    const int n = p / 4;
    l.spread[p] = uint8_t(2 * m + src[p % 4]);
    l.shifts[p] = uint8_t((8 * (2 * a + j / 2) + 4 * (j % 2) - 2) & 63);
    l.column[p] = uint8_t(n % 4 + 64 * (n / 4 % 2));
    l.gather[p] = uint8_t(16 * m + p % 4);  // channel i = p % 4
    l.tshifts[p] = uint8_t((8 * (p % 4) + 4 * a - 2) & 63);
    l.tcolumn[p] = uint8_t(p % 4);
  }
  return l;
}
static constexpr Int4Lanes kInt4Lanes = int4_lanes();

// The table index of each byte: its nibble of x (multishift counts sh) in bits 2..5, or the column's bits.
static inline __m512i int4_index(__m512i x, __m512i sh, __m512i column) {
  const __m512i y = _mm512_maskz_multishift_epi64_epi8(~0ull, sh, x);
  return _mm512_ternarylogic_epi32(y, _mm512_set1_epi8(0x3c), column, 0xea);  // (y & 0x3c) | column
}

// moe_int4_gemm.inc, lookup_quads: `quads` quad rows (32 bytes of codes each) through table t into dst (64 each).
#define KT_INT4_QUADS int4_quads_vbmi
static inline void int4_quads_vbmi(const int8_t* t, const uint8_t* codes, int quads, int8_t* dst) {
  const __m512i t0 = _mm512_loadu_si512(t), t1 = _mm512_loadu_si512(t + 64), t2 = _mm512_loadu_si512(t + 128),
                t3 = _mm512_loadu_si512(t + 192);
  const __m512i spread = _mm512_load_si512(kInt4Lanes.spread), sh = _mm512_load_si512(kInt4Lanes.shifts);
  const __m512i column = _mm512_load_si512(kInt4Lanes.column);
  constexpr __mmask64 kLow = 0xffffffffull;  // bytes of columns 0..7
  for (int i = 0; i < quads; ++i) {
    const __m512i c = _mm512_maskz_loadu_epi8(kLow, codes + 32 * i);  // the quad row's 32 bytes
    const __m512i idx = int4_index(_mm512_maskz_permutexvar_epi8(~0ull, spread, c), sh, column);
    // columns 0..7 looked up in t0:t1, the others keep their index for t2:t3
    const __m512i low = _mm512_mask2_permutex2var_epi8(t0, idx, kLow, t1);
    _mm512_storeu_si512(dst + 64 * i, _mm512_mask2_permutex2var_epi8(t2, low, ~kLow, t3));
  }
}

// moe_int4_gemm.inc, lookup_transposed: 8 pair rows of codes (128 bytes) through table t into 4 transposed quad rows.
#define KT_INT4_TRANSPOSED int4_transposed_vbmi
static inline void int4_transposed_vbmi(const int8_t* t, const uint8_t* codes, int8_t* dst) {
  const __m512i z0 = _mm512_loadu_si512(codes), z1 = _mm512_loadu_si512(codes + 64);
  const __m512i gather = _mm512_load_si512(kInt4Lanes.gather), sh = _mm512_load_si512(kInt4Lanes.tshifts);
  const __m512i column = _mm512_load_si512(kInt4Lanes.tcolumn);
  for (int q = 0; q < 4; ++q) {  // channels 4q .. 4q+3: their 64 table bytes
    const __m512i x = _mm512_permutex2var_epi8(z0, _mm512_add_epi8(gather, _mm512_set1_epi8(int8_t(4 * q))), z1);
    const __m512i idx = int4_index(x, sh, column);
    _mm512_storeu_si512(dst + 64 * q, _mm512_maskz_permutexvar_epi8(~0ull, idx, _mm512_loadu_si512(t + 64 * q)));
  }
}
#endif

// The AVX512 int4-GEMM expansion kernels (csrc/kernels/avx512_int4.h) on SIMDe's portable emulation of their
// instructions, against the plain definitions of moe_int4_gemm.inc: code tables (w8 = clamp(round_half_even(fl(q *
// r)), +-127) for q = code - 8), forward quad-row lookups and transposed lookups. Built and run by
// tests/test_int4_kernels_simde.py on any x86 host with g++ and libsimde-dev (the CPU needs no AVX512). Prints
// "N passed, 0 failed" or the first mismatch.
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>

// What SIMDe 0.7 lacks of the instructions the kernels use, from their definitions (round: to nearest even under
// the default mode; out of range or NaN: the integer indefinite 0x80000000).
static __m512i cvt_round_nearest(__m512 v) {
  float f[16];
  int32_t o[16];
  std::memcpy(f, &v, 64);
  for (int i = 0; i < 16; ++i) {
    const float r = std::nearbyint(f[i]);
    o[i] = (r >= -2147483648.0f && r < 2147483648.0f) ? int32_t(r) : INT32_MIN;
  }
  __m512i out;
  std::memcpy(&out, o, 64);
  return out;
}
#undef _mm512_maskz_cvt_roundps_epi32
#define _mm512_maskz_cvt_roundps_epi32(k, v, mode) cvt_round_nearest(v)
static __m512i load_low_bytes(uint64_t k, const void* p) {  // the first popcount(k) bytes (k: low bits set)
  alignas(64) uint8_t b[64] = {};
  std::memcpy(b, p, size_t(__builtin_popcountll(k)));
  return _mm512_load_si512(b);
}
#define _mm512_maskz_loadu_epi8(k, p) load_low_bytes(k, p)
#define _mm512_maskz_shuffle_f32x4(k, a, b, imm) \
  _mm512_castsi512_ps(_mm512_shuffle_i32x4(_mm512_castps_si512(a), _mm512_castps_si512(b), imm))
#undef _mm512_maskz_multishift_epi64_epi8  // SIMDe 0.7's alias takes 4 arguments, the instruction's form 3
#define _mm512_maskz_multishift_epi64_epi8(k, a, b) simde_mm512_maskz_multishift_epi64_epi8(k, a, b)
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC 8
#endif

#define __AVX512VBMI__ 1  // after SIMDe: the kernels' VBMI part, emulated
namespace {
constexpr int kPanel = 16;
#include "../../csrc/kernels/avx512_int4.h"

int8_t w8(int code, float r) {  // moe_int4_gemm.inc's definition, one weight
  const float p = float(code - 8) * r;
  const float n = std::nearbyint(p);
  const int32_t v = (n >= -2147483648.0f && n < 2147483648.0f) ? int32_t(n) : INT32_MIN;
  return int8_t(v > 127 ? 127 : (v < -127 ? -127 : v));
}
}  // namespace

int main() {
  std::mt19937 gen(7);
  std::uniform_real_distribution<float> u(-1.5f, 1.5f);
  const float special[] = {0.f, -0.f, NAN, INFINITY, -INFINITY, 1e30f, 15.875f, 15.9375f, 16.f, 0.5f, 1.5f,
                           2.5f / 7, 1e-40f, -15.9375f, 127.f / 8, 127.f / 7};
  int passed = 0, failed = 0;
  auto check = [&](bool ok, const char* what, int round) {
    if (ok) return ++passed, true;
    if (++failed == 1) std::printf("mismatch: %s, round %d\n", what, round);
    return false;
  };
  for (int round = 0; round < 2000; ++round) {
    alignas(64) float r[16];
    for (int c = 0; c < 16; ++c) r[c] = round == 0 ? special[c] : u(gen) * (round % 3 == 0 ? 16.f : 1.f);
    alignas(64) int8_t t[256];
    code_table_avx512(_mm512_load_ps(r), t);
    bool ok = true;
    for (int code = 0; code < 16; ++code)
      for (int c = 0; c < 16; ++c) ok &= t[64 * (c / 4) + 4 * code + c % 4] == w8(code, r[c]);
    check(ok, "code table", round);
    uint8_t codes[256];
    for (auto& b : codes) b = uint8_t(gen());
    int8_t got[256];
    const int quads = 1 + round % 4;
    int4_quads_vbmi(t, codes, quads, got);
    ok = true;
    for (int i = 0; i < quads; ++i)
      for (int n = 0; n < 16; ++n)
        for (int j = 0; j < 4; ++j) {
          const int code = (codes[32 * i + (j / 2) * 16 + n] >> (4 * (j % 2))) & 15;
          ok &= got[64 * i + 4 * n + j] == t[64 * (n / 4) + 4 * code + n % 4];
        }
    check(ok, "quad rows", round);
    int4_transposed_vbmi(t, codes, got);
    ok = true;
    for (int q = 0; q < 4; ++q)
      for (int c = 0; c < 16; ++c)
        for (int i = 0; i < 4; ++i) {
          const int n = 4 * q + i, code = (codes[(c / 2) * 16 + n] >> (4 * (c % 2))) & 15;
          ok &= got[64 * q + 4 * c + i] == t[64 * (n / 4) + 4 * code + n % 4];
        }
    check(ok, "transposed rows", round);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed != 0;
}

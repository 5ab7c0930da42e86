// NOTE (kt-sft engine, shared definitions)
// Layout:    one MoE layer's frozen experts are stored as *panels*: a weight W[N][K] (out N, reduce K) is
//            padded to Np = roundup(N, 32), Kp = roundup(K, 32) with zeros and cut into Np/16 panels of 16
//            output columns. BF16 panels are VNNI pairs, panel[k/2][n][k%2] (the AMX B-tile and
//            AVX512-BF16 vdpbf16ps layout); F32 panels are panel[k][n]. One panel = Kp*16 elements.
//            packing.h writes every panel (the only writer) and describes them (ProjectionLayout).
// Algorithm: every kernel is "C[M][32] = A[M][Kp] x (two panels)"; tasks wrap it with gathers and fused
//            epilogues (activation, routing weight, saved activations). kernel_api.h is what the driver hands
//            the kernels; kernels/moe_kernels.inc lists the kernel files (one per weight format).
// Invariants: padded weight rows/cols are zero, activation buffers have zero K-padding columns, per-expert
//            row segments start at multiples of kRowAlign so a 32-row AMX block never leaves the buffer.
//            Everything in this header has internal linkage (static inline): it is compiled once per ISA
//            translation unit with that unit's flags, and no out-of-line copy can leak across units.
// INT8:      a layer may store its weights as int8 panels (same element order as the BF16 VNNI panels, one
//            byte each) with one fp32 scale per output channel n: q = clamp(round_half_even(w / s), -127, 127),
//            s = max_k |w[n][k]| / 127 (0 for an all-zero channel, q = 0). The kernels never multiply int8
//            (kernels/moe_int8.inc): an int8 layer computes exactly what a bf16 layer holding the dequantized
//            weights bf16(q * s) computes, at half the weight memory and bandwidth. Activations stay bf16;
//            f32 layers have no int8 form.
// INT8 GEMMs (WeightFormat::kInt8Gemm, kt_backend AMXINT8; kernels/moe_int8_gemm.inc): the GEMMs themselves
//            run in int8 with int32 sums (AMX tdpbssd; exact, so every unit gets the same sums). The A rows are
//            quantized per row: v[k] = a[k] * cs[k], where cs are the weight scales of the reduction dimension in
//            backward (they fold into A there) and 1 in forward; m = max_k |v[k]|, s = m / 127,
//            q = round_half_even(v * (127 / m)) clamped to [-127, 127], all fp32 (the reciprocal rounded once per
//            row, then one multiply per element; a row with m < 127 / FLT_MAX, where that overflows, uses
//            round_half_even(v / s); m = 0: q = 0; a row holding Inf/NaN gets s = NaN, so it stays NaN).
//            C[m][n] = float(sum_k q_a[m][k] q_w[n][k]) * s[m] * s_w[n] (forward; backward: * s[m]). Each GEMM
//            phase's A is quantized once (QuantJob; x and dy straight from the token rows), its rows zero-padded
//            to K64 = roundup(K, 64), by tasks queued in the GEMM phase's own pool run ahead of the GEMM tasks
//            of their expert, which wait for them (schedule.h, run_gemm_phase). Such a layer stores its
//            int8 panels as VNNI quads, panel[k/4][n][k%4] (the tdpbssd B layout, used in place by forward; same
//            bytes as the pairs); backward repacks each transposed block into quads of K64 rows. Its per-row
//            outputs (the routing-weighted y rows, the dx rows) are rounded to bf16 before the driver sums a
//            token's k rows (fp32, slot order): half the bytes, an error far below the activations' quantization.
// LoRA:      optional per-expert LoRA on gate_up / down (docs/expert_lora_format.md) reaches the tasks as
//            LoraView: fp32 factors repacked per call into per-expert, zero-padded, row-major scratch
//            (At_gu [E][r_gu][2Ip], Bt_gu [E][r_gu][Hp], At_d [E][r_d][Hp], Bt_d [E][r_d][Ip]); a null view or
//            r = 0 means no LoRA on that projection.
// FP8 / INT4 (WeightFormat::kFp8, kInt4; kernels/moe_fp8.inc, moe_int4.inc): codes in the bf16 pair order (fp8: one
//            e4m3 byte per weight; int4: two weights per byte, the even k in the low nibble, stored q + 8) with fp32
//            scales on a grid of block_n x block_k weights (ScaleKind::kBlock; the layer picks the sizes: fp8
//            128 x 128 blocks, int4 groups of 1 x 32 by default). W(n, k) = bf16(fl32(value * scale)) with value the
//            e4m3 number or q - 8: the kernels expand each block they use to those bf16 values and run the bf16
//            GEMMs, so such a layer computes exactly what a bf16 layer holding them computes. From float sources
//            the packer quantizes per block: s = max |w| / 448 (fp8) or / 7 (int4) over the block's weights,
//            q = e4m3_rne_sat(w / s) or clamp(round_half_even(w / s), -8, 7) (s = 0: q = 0); from a checkpoint's
//            own tensors it keeps codes and scales as they are (packing.h, pack_stored).
// INT4 GEMMs (WeightFormat::kInt4Gemm, kt_backend AMXINT4; kernels/moe_int4_gemm.inc): the int4 format's codes and
//            group scales s as they are, plus one fp32 channel scale per output row, S[n] = fl(8 * m[n] / 127) with
//            m[n] = max |s| over the row's grid cells, computed at load. Each task expands the int4 block it uses to
//            int8 weights on that channel scale, w8 = clamp(round_half_even(fl(q * fl(s / S[n]))), -127, 127)
//            (S = 0: w8 = 0), and runs INT8 GEMMs on them with S as the channel scales: group scales cannot leave an
//            int32 sum over several groups, a channel scale can. w8 * S is q * s to half an int8 step of the row's
//            largest group (2-3 % of an int4 step), coarser only for groups 16x below the row's largest.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

#include "activations.h"

namespace kt_sft {

constexpr int kPanel = 16;     // output columns per panel
constexpr int kBlock = 32;     // output columns per kernel call (two panels) and padding unit
constexpr int kRowAlign = 32;  // per-expert row segments start at multiples of this

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
// How a layer stores and multiplies its experts; mirrors kt_sft/engine/formats.py (one row per value). The
// driver's row for each is in formats.h (kFormats), its kernels in kernels/moe_kernels.inc (one table each).
enum class WeightFormat : int {
  kF32 = 0,       // fp32 panels, fp32 activations and GEMMs (the exact path)
  kBF16 = 1,      // bf16 VNNI-pair panels, bf16 activations
  kInt8 = 2,      // int8 pair panels + per-channel scales, GEMMs in bf16 on the dequantized weights (INT8)
  kInt8Gemm = 3,  // int8 quad panels + per-channel scales, GEMMs in int8 (INT8 GEMMs)
  kFp8 = 4,       // e4m3 pair panels + block scales, GEMMs in bf16 on the decoded weights (FP8 / INT4)
  kInt4 = 5,      // int4 pair panels (two per byte) + group scales along K, GEMMs in bf16 likewise
  kInt4Gemm = 6,  // the same int4 panels + derived channel scales, GEMMs in int8 (INT4 GEMMs)
};
constexpr int kNumFormats = 7;

// The three projections of an expert: gate and up are [I][H], down is [H][I] (out x reduce).
enum class Proj : int { kGate = 0, kUp = 1, kDown = 2 };
constexpr int kNumProj = 3;
static inline const char* proj_name(Proj p) { return p == Proj::kGate ? "gate" : p == Proj::kUp ? "up" : "down"; }

// Element order inside a panel of 16 output columns: element (n, k) of the panel sits at
// (k / g * 16 + n) * g + k % g for g = panel_group(kind) (f32: g = 1, panel[k][n]).
enum class PanelKind : int { kF32 = 0, kPairs = 1, kQuads = 2 };
static inline int panel_group(PanelKind kind) {
  return kind == PanelKind::kF32 ? 1 : kind == PanelKind::kPairs ? 2 : 4;
}
static inline size_t panel_index(PanelKind kind, int n, int k) {
  const int g = panel_group(kind);
  return (size_t(k / g) * kPanel + n) * g + k % g;
}

// Where a quantized projection's fp32 multipliers apply: scale (n, k) of one expert is
// scales[(k / block_k) * rows + n / block_n], a grid of rows = ceil(Np / block_n) x cols = ceil(Kp / block_k) stored
// column by column (the scales of a panel's 16 rows in one k block are adjacent: one cache line for a task or a
// transposed slice to read; per channel, cols = 1, it is just one scale per row).
// Per channel (int8): block_n = 1, block_k = Kp, so one scale per output channel n. kBlock is any grid the layer
// asks for (formats.h, format_with_scale_block): block-FP8's Bn x Bk blocks, INT4's groups along K (1 x G); partial
// edge blocks, and grid cells holding only padding have scale 0.
enum class ScaleKind : int { kNone = 0, kChannel = 1, kBlock = 2 };
static inline const char* scale_kind_name(ScaleKind k) {
  return k == ScaleKind::kNone ? "none" : k == ScaleKind::kChannel ? "channel" : "block";
}

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }
static inline int dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

// ---- scalar conversions (bit-exact round-to-nearest-even, NaN stays NaN) ----
static inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
static inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}
static inline float f16_to_f32(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {  // zero or subnormal: value = man * 2^-24
    float v = float(man) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}
static inline float load_as_f32(const void* p, size_t i, int dt) {
  if (dt == kF32) return static_cast<const float*>(p)[i];
  if (dt == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// e4m3 (float8_e4m3fn: 1 sign, 4 exponent bits of bias 7, 3 mantissa bits, no Inf, 0x7f / 0xff NaN) of f: round to
// nearest even, saturating at +-448 (as torch's .to(torch.float8_e4m3fn)); NaN gives NaN.
static inline uint8_t f32_to_e4m3(float f) {
  uint32_t u = f32_to_bits(f);
  const uint8_t sign = uint8_t((u >> 24) & 0x80u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return sign | 0x7f;
  if (u >= 0x43e00000u) return sign | 0x7e;  // >= 448: the largest finite value (ties at 464 go to its even code)
  if (u < 0x3c800000u)                       // below 2^-6, the subnormals: steps of 2^-9 (exact scaling, RNE)
    return sign | uint8_t(__builtin_nearbyintf(bits_to_f32(u) * 512.0f));
  u += 0x7ffffu + ((u >> 20) & 1u);  // round the 23-bit mantissa to 3 bits, half to even (a carry bumps the exponent)
  return sign | uint8_t((u >> 20) - (120u << 3));  // exponent bias 127 -> 7
}
static inline float e4m3_to_f32(uint8_t b) {
  const uint32_t sign = uint32_t(b & 0x80u) << 24, em = b & 0x7fu;
  if (em == 0x7fu) return bits_to_f32(sign | 0x7fc00000u);
  if (em < 8u) return bits_to_f32(sign | f32_to_bits(float(em) * 0.001953125f));  // subnormal: m * 2^-9
  return bits_to_f32(sign | ((em << 20) + (120u << 23)));
}

// exp(x) to ~2 ulp on [-87, 88], written as plain arithmetic so each ISA unit auto-vectorises it.
static inline float exp_approx(float x) {
  x = x < -87.3f ? -87.3f : (x > 88.7f ? 88.7f : x);
  float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693145751953125f - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = int32_t(n) + 127;
  return p * bits_to_f32(uint32_t(e) << 23);
}
static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

// Row stride for a gathered [rows][K] GEMM input (K a multiple of kBlock): K, plus one 32-element unit when
// K / 32 is even. With an even number of 64-byte lines per bf16 row (K = 2048: 64 lines, exactly 4 KiB),
// the 16 or 32 rows a tile load touches map to a few L1 sets (all to one for 4 KiB) and evict each other;
// with an odd number they fall in distinct sets (1.01-1.04x on AMX, BENCHMARKS.md).
inline int padded_row_stride(int K) { return (K / kBlock) % 2 == 0 ? K + kBlock : K; }

// Row stride (bytes) of quantized A rows of K columns (a multiple of 32), zero-padded to K64 = roundup(K, 64):
// K64 plus one line when K64 / 64 is even, so the rows span an odd number of 64-byte lines (see padded_row_stride).
inline int qa_stride(int K) {
  const int K64 = round_up(K, 64);
  return (K64 / 64) % 2 == 0 ? K64 + 64 : K64;
}

}  // namespace kt_sft

// NOTE (kt-sft engine, shared definitions)
// Layout:    one MoE layer's frozen experts are stored as *panels*: a weight W[N][K] (out N, reduce K) is
//            padded to Np = roundup(N, 32), Kp = roundup(K, 32) with zeros and cut into Np/16 panels of 16
//            output columns. BF16 panels are VNNI pairs, panel[k/2][n][k%2] (the AMX B-tile and
//            AVX512-BF16 vdpbf16ps layout); F32 panels are panel[k][n]. One panel = Kp*16 elements.
// Algorithm: every kernel is "C[M][32] = A[M][Kp] x (two panels)"; tasks wrap it with gathers and fused
//            epilogues (activation, routing weight, saved activations).
// Invariants: padded weight rows/cols are zero, activation buffers have zero K-padding columns, per-expert
//            row segments start at multiples of kRowAlign so a 32-row AMX block never leaves the buffer.
//            Everything in this header has internal linkage (static inline): it is compiled once per ISA
//            translation unit with that unit's flags, and no out-of-line copy can leak across units.
// INT8:      a layer may store its weights as int8 panels (same element order as the BF16 VNNI panels, one
//            byte each) with one fp32 scale per output channel n: q = clamp(round_half_even(w / s), -127, 127),
//            s = max_k |w[n][k]| / 127 (0 for an all-zero channel, q = 0). The kernels never multiply int8: each
//            task first expands the weight block it uses to bf16(q * s) (forward: a per-worker copy of its two
//            panels; backward: inside the transposed repack), so an int8 layer computes exactly what a bf16
//            layer holding those dequantized weights computes, at half the weight memory and bandwidth.
//            Activations stay bf16 (wtype kBF16); f32 layers have no int8 form.
// INT8 GEMMs (LayerView.aq, "int8 compute", kt_backend AMXINT8): the GEMMs themselves run in int8 with int32
//            sums (AMX tdpbssd; exact, so every unit gets the same sums). The A rows are quantized per row:
//            v[k] = a[k] * cs[k], where cs are the weight scales of the reduction dimension in backward (they
//            fold into A there) and 1 in forward; m = max_k |v[k]|, s = m / 127,
//            q = round_half_even(v * (127 / m)) clamped to [-127, 127], all fp32 (the reciprocal rounded once per
//            row, then one multiply per element; a row with m < 127 / FLT_MAX, where that overflows, uses
//            round_half_even(v / s); m = 0: q = 0; a row holding Inf/NaN gets s = NaN, so it stays NaN).
//            C[m][n] = float(sum_k q_a[m][k] q_w[n][k]) * s[m] * s_w[n] (forward; backward: * s[m]). Each GEMM
//            phase's A is quantized once (QuantJob; x and dy straight from the token rows), its rows zero-padded
//            to K64 = roundup(K, 64), by tasks queued in the GEMM phase's own pool run ahead of the GEMM tasks
//            of their expert, which wait for them (moe_layer.cpp, run_gemm_phase). Such a layer stores its
//            int8 panels as VNNI quads, panel[k/4][n][k%4] (the tdpbssd B layout, used in place by forward; same
//            bytes as the pairs); backward repacks each transposed block into quads of K64 rows. Its per-row
//            outputs (the routing-weighted y rows, the dx rows) are rounded to bf16 before the driver sums a
//            token's k rows (fp32, slot order): half the bytes, an error far below the activations' quantization.
// LoRA:      optional per-expert LoRA on gate_up / down (docs/expert_lora_format.md) reaches the tasks as
//            LoraView: fp32 factors repacked per call into per-expert, zero-padded, row-major scratch
//            (At_gu [E][r_gu][2Ip], Bt_gu [E][r_gu][Hp], At_d [E][r_d][Hp], Bt_d [E][r_d][Ip]); a null view or
//            r = 0 means no LoRA on that projection.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kt_sft {

constexpr int kPanel = 16;     // output columns per panel
constexpr int kBlock = 32;     // output columns per kernel call (two panels) and padding unit
constexpr int kRowAlign = 32;  // per-expert row segments start at multiples of this
constexpr int kMaxTaskRows = 2048;  // most rows of one task (the driver's row chunks never exceed it)

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
// How a layer stores and multiplies its experts; mirrors kt_sft/engine/formats.py (one row per value).
enum class WeightFormat : int {
  kF32 = 0,       // fp32 panels, fp32 activations and GEMMs (the exact path)
  kBF16 = 1,      // bf16 VNNI-pair panels, bf16 activations
  kInt8 = 2,      // int8 pair panels + per-channel scales, GEMMs in bf16 on the dequantized weights (INT8)
  kInt8Gemm = 3,  // int8 quad panels + per-channel scales, GEMMs in int8 (INT8 GEMMs)
};
enum Activation : int { kSiluGLU = 0 };

static inline int round_up(int x, int m) { return (x + m - 1) / m * m; }
static inline int imin(int a, int b) { return a < b ? a : b; }
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

// ---- what the driver hands to the per-ISA kernels ----
struct LayerView {
  int E, H, I, Hp, Ip, wtype;           // wtype: kF32 or kBF16, also the activation dtype
  const void* gate;                     // [E] x panels of W_gate[Ip][Hp]
  const void* up;                       // [E] x panels of W_up[Ip][Hp]
  const void* down;                     // [E] x panels of W_down[Hp][Ip]
  size_t expert_elems;                  // Ip*Hp: elements of one expert's gate (= up = down) panels
  int wq;                               // 1: gate/up/down are int8 panels with the scales below (INT8 note)
  const float* gate_s;                  // [E][Ip] per-output-channel scales (int8 only)
  const float* up_s;                    // [E][Ip]
  const float* down_s;                  // [E][Hp]
  int kchunk;                           // K chunk of the task GEMMs (0 = one pass; moe_tasks.inc, gemm_rows)
  int aq;                               // 1: int8 GEMMs (needs wq; see INT8 GEMMs above); kchunk is then unused
  // Row strides (elements) of the gathered GEMM inputs: xg and dyg (K = Hp), act (Ip), dgu (2*Ip). See
  // padded_row_stride: a 32-row tile of A then spans 32 different L1 sets.
  int ldx, ld_act, ld_dgu;
};

// Row stride for a gathered [rows][K] GEMM input (K a multiple of kBlock): K, plus one 32-element unit when
// K / 32 is even. With an even number of 64-byte lines per bf16 row (K = 2048: 64 lines, exactly 4 KiB),
// the 16 or 32 rows a tile load touches map to a few L1 sets (all to one for 4 KiB) and evict each other;
// with an odd number they fall in distinct sets (1.01-1.04x on AMX, BENCHMARKS.md).
inline int padded_row_stride(int K) { return (K / kBlock) % 2 == 0 ? K + kBlock : K; }

// Rows [row0, row0+rows) of the expert's segment x column blocks [block, block+nblk). Tasks of several blocks
// walk each 32-row block of A across all of them, so A comes from L2 once per nblk GEMMs instead of once each.
constexpr int kMaxTaskBlocks = 8;  // int8-GEMM layers take up to 8 (their A rows are half the bytes)
struct Task { int expert, block, row0, rows, nblk = 1; };

// Per-expert LoRA factors for one call, repacked by the driver (see the LoRA note above). Row rho of
// At_gu[e] is A_gu,e[rho] with gate columns at [0, I) and up columns at [Ip, Ip+I); Bt_*[e][rho] is column
// rho of B_*,e (the input-side factor) laid along the reduction dimension. Padding is zero.
struct LoraView {
  int r_gu, r_d;
  float s_gu, s_d;
  const float* At_gu;  // [E][r_gu][2*Ip]
  const float* Bt_gu;  // [E][r_gu][Hp]
  const float* At_d;   // [E][r_d][Hp]
  const float* Bt_d;   // [E][r_d][Ip]
};

// out[row][rho] = scale_row * sum_k src[row][k] * mat[e][rho][k] for the rows of one task (the rank-r
// projections x.B_gu, h.B_d, dy.A_d^T, dz.A_gu^T). K is a multiple of kBlock; fp32 accumulation.
struct LoraProj {
  const int* seg_start;
  const void* src;           // [rows][ld] wtype
  int ld, K, r;
  const float* mat;          // [E][r][K]
  float* out;                // [rows][r]
  const float* row_scale;    // [rows] or null (= 1)
};

// Factor-gradient task: kind 0 dA_gu, 1 dB_gu, 2 dA_d, 3 dB_d for column blocks [block*kGradBlocks,
// (block+1)*kGradBlocks) of 32 columns of one expert.
constexpr int kGradBlocks = 4;
struct GradTask { int kind, expert, block; };

// int8 GEMMs: quantize the rows of one expert's task (Task.row0/rows) of a GEMM input (INT8 GEMMs above) into
// dst [rows][qa_stride(K)] and dst_scale [rows]. which: the projection whose scales fold into A
// (-1 none: forward; 2 down: dy; 0 gate | up: dz, gate scales for columns < Ip, up scales after).
// src is gathered ([rows][ld], row_token null) or token-major ([T][ld], row r reads token row_token[r]).
struct QuantJob {
  const int* seg_start;
  const int* row_token;
  const void* src;
  int ld, K, which;
  int8_t* dst;
  float* dst_scale;
};

struct ForwardBuffers {
  const int* seg_start;      // [E] first row of each expert's segment in the gathered buffers
  const float* row_weight;   // [rows] routing weight of each gathered row
  const void* xg;            // [rows][ldx] gathered input (wtype), K = Hp
  void* act;                 // [rows][ld_act] silu(gate)*up (wtype), input of the down GEMM
  void* gate_out;            // [rows][Ip] saved gate pre-activation (wtype) or null
  void* up_out;              // [rows][Ip] saved up pre-activation (wtype) or null
  float* out_rows;           // [rows][Hp] routing-weighted expert outputs (f32; bf16 with int8 GEMMs)
  const LoraView* lora;      // null: frozen experts only
  const float* u_gu;         // [rows][r_gu] x.B_gu (LoRA only)
  const float* q_d;          // [rows][r_d]  h.B_d (LoRA only)
  const int8_t* qa;          // int8 GEMMs: the current phase's A (x, then act) quantized (QuantJob)
  const float* qs;           // int8 GEMMs: its row scales
};

struct BackwardBuffers {
  const int* seg_start;
  const float* row_weight;
  const void* dyg;           // [rows][ldx] gathered output gradient (wtype), unweighted
  const void* gate_in;       // [rows][Ip] saved gate pre-activation
  const void* up_in;         // [rows][Ip] saved up pre-activation
  float* dw_part;            // [rows][Ip/32] partial <dy, expert_out> per output block
  void* dgu;                 // [rows][ld_dgu] (d gate | d up) (wtype), 2*Ip used
  float* dx_rows;            // [rows][Hp] input gradient per gathered row (f32; bf16 with int8 GEMMs)
  // LoRA only (lora == null otherwise):
  const LoraView* lora;
  const int* count;          // [E] routed rows per expert
  const int* row_token;      // [rows] token of each gathered row
  const void* x;             // [T][H] saved layer input (wtype)
  const void* dy;            // [T][H] output gradient as passed in (wtype)
  const float* u_gu;         // [rows][r_gu] saved x.B_gu
  const float* q_d;          // [rows][r_d]  saved h.B_d
  const float* dyA;          // [rows][r_d]  dy.A_d^T (unweighted)
  const float* t_gu;         // [rows][r_gu] dz.A_gu^T
  void* h;                   // [rows][Ip] silu(g)*u as the down GEMM consumed it (wtype), from bwd_act; null
                             // when fuse_grads (bwd_act then uses it in place)
  bool fuse_grads;           // bwd_act also writes dA_gu and dB_d (kinds 0 and 3) of its expert x column blocks:
                             // set when each bwd_act task holds all rows of its expert and K is not chunked
  float* gA_gu;              // [r_gu*E][2I]  PEFT layouts, every element written
  float* gB_gu;              // [H][r_gu*E]
  float* gA_d;               // [r_d*E][H]
  float* gB_d;               // [I][r_d*E]
  const int8_t* qa;          // int8 GEMMs: the current phase's A (dy * s_down, then dz * s_gu) quantized
  const float* qs;           // int8 GEMMs: its row scales
};

// Per-worker scratch: C tiles and one transposed weight block for backward.
struct Scratch {
  float* c0;     // [rows][kBlock]: kRowAlign rows, or a whole task's rows when K is chunked (kMaxTaskRows)
  float* c1;     // [rows][kBlock]
  void* packed;  // one slot per column block of a task: 2 transposed panels of Hp (bwd_act) or 2*Ip rows, wtype
  float* acc;    // LoRA gradient sums: [r][kBlock] (lora_grad) or per column block (fused bwd_act)
  void* wdq;     // int8 layers with bf16 GEMMs: dequantized weight blocks, one slot per column block of a task
  int32_t* ci;   // int8 GEMMs: int32 sums [kRowAlign][kBlock]
};

// Row stride (bytes) of quantized A rows of K columns (a multiple of 32), zero-padded to K64 = roundup(K, 64):
// K64 plus one line when K64 / 64 is even, so the rows span an odd number of 64-byte lines (see padded_row_stride).
inline int qa_stride(int K) {
  const int K64 = round_up(K, 64);
  return (K64 / 64) % 2 == 0 ? K64 + 64 : K64;
}

struct KernelTable {
  const char* name;
  void (*gate_up)(const LayerView&, const ForwardBuffers&, const Task&, Scratch&);
  void (*down)(const LayerView&, const ForwardBuffers&, const Task&, Scratch&);
  void (*bwd_act)(const LayerView&, const BackwardBuffers&, const Task&, Scratch&);
  void (*bwd_input)(const LayerView&, const BackwardBuffers&, const Task&, Scratch&);
  void (*lora_proj)(const LayerView&, const LoraProj&, const Task&);
  void (*lora_grad)(const LayerView&, const BackwardBuffers&, const GradTask&, Scratch&);
  void (*quantize)(const LayerView&, const QuantJob&, const Task&);
  int kchunk;  // the unit's default K chunk (0 = none); KT_SFT_KCHUNK overrides it
};

// One table per ISA translation unit; call only after cpu_features says the ISA runs here.
const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
const KernelTable* kernels_amx();

}  // namespace kt_sft

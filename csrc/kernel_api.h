// NOTE (kt-sft engine, what the driver hands to the per-ISA kernels)
// Layout:    LayerView: one layer's sizes and packed weights (WeightView per projection, written by packing.h);
//            Task / GradTask / QuantJob: one unit of work of a pool run; ForwardBuffers / BackwardBuffers: the
//            call's buffers; Scratch: one worker's scratch. Each ISA unit exports IsaKernels: its name and one
//            KernelTable per WeightFormat (kernels/moe_kernels.inc builds them).
// Invariants: plain structs and function pointers only, no member functions (this header is compiled into every
//            ISA unit and the driver alike, and an inline function emitted by a unit with wider flags could be
//            the copy the linker keeps); the driver picks a layer's KernelTable once per call, so no task body
//            branches on the format.
#pragma once
#include <chrono>
#include <cstddef>
#include <cstdint>

#include "common.h"

namespace kt_sft {

// One projection's packed storage (packing.h is its only writer).
struct WeightView {
  const void* panels;    // [E] x expert_elems elements (the format's element type and PanelKind)
  const float* scales;   // null, or [E] x expert_scales fp32 multipliers (ScaleKind; per channel: [E][Np])
  size_t expert_scales;  // scales of one expert
  int block_n, block_k;  // scale (n, k) of an expert at [(k / block_k) * scale_rows + n / block_n] (common.h)
  int scale_rows;
  const float* channel;  // [E] x the padded output length: one scale per output channel (the int8 formats' scales
                         // themselves, INT4 GEMMs' derived ones), else null
};

struct LayerView {
  int E, H, I, Hp, Ip;
  WeightView w[kNumProj];  // indexed by Proj: gate, up [Ip][Hp]; down [Hp][Ip] (panels, common.h); an ungated
                           // layer has no gate panels (activations.h)
  ActivationInfo act;      // the layer's activation row (activations.h), with its limit
  const float* bias_gu;    // [E][gate_up_count * Ip] gate_up biases in the gate_up columns (zero padded), or null
  const float* bias_d;     // [E][Hp] down biases, or null
  size_t expert_elems;     // Ip*Hp: elements of one expert's gate (= up = down) panels
  int kchunk;              // K chunk of the task GEMMs (0: each task chooses; moe_tasks.inc, plan_k)
  // Row strides (elements) of the gathered GEMM inputs: xg and dyg (K = Hp), act (Ip), dgu (2*Ip). See
  // padded_row_stride: a 32-row tile of A then spans 32 different L1 sets.
  int ldx, ld_act, ld_dgu;
};

// The gate_up columns of a layer (activations.h): gated [gate | up] of Ip each, ungated [up]: how many projections,
// the first, and where up starts.
static inline int gate_up_count(const LayerView& L) { return L.act.gated ? 2 : 1; }
static inline Proj gate_up_first(const LayerView& L) { return L.act.gated ? Proj::kGate : Proj::kUp; }
static inline int up_column(const LayerView& L) { return L.act.gated ? L.Ip : 0; }

// Rows [row0, row0+rows) of the expert's segment x column blocks [block, block+nblk). Tasks of several blocks
// walk each 32-row block of A across all of them, so A comes from L2 once per nblk GEMMs instead of once each.
constexpr int kMaxTaskBlocks = 8;  // int8-GEMM layers take up to 8 (their A rows are half the bytes)
struct Task { int expert, block, row0, rows, nblk = 1; };

// Per-expert LoRA factors for one call, repacked by the driver (see the LoRA note in common.h). Row rho of
// At_gu[e] is A_gu,e[rho] in the gate_up columns (gate at [0, I), up at [Ip, Ip+I); ungated: up at [0, I));
// Bt_*[e][rho] is column rho of B_*,e (the input-side factor) laid along the reduction dimension. Padding is zero.
struct LoraView {
  int r_gu, r_d;
  float s_gu, s_d;
  const float* At_gu;  // [E][r_gu][gate_up_count * Ip]
  const float* Bt_gu;  // [E][r_gu][Hp]
  const float* At_d;   // [E][r_d][Hp]
  const float* Bt_d;   // [E][r_d][Ip]
};

// out[row][rho] = scale_row * sum_k src[row][k] * mat[e][rho][k] for the rows of one task (the rank-r
// projections x.B_gu, h.B_d, dy.A_d^T, dz.A_gu^T). K is a multiple of kBlock; fp32 accumulation.
struct LoraProj {
  const int* seg_start;
  const void* src;           // [rows][ld], the activation dtype
  int ld, K, r;
  const float* mat;          // [E][r][K]
  float* out;                // [rows][r]
  const float* row_scale;    // [rows] or null (= 1)
};

// The four LoRA factor gradients, in the order of the factors (A_gu, B_gu, A_d, B_d).
enum class GradKind : int { kA_gu = 0, kB_gu = 1, kA_d = 2, kB_d = 3 };
constexpr int kNumGradKinds = 4;
static inline bool is_gate_up(GradKind k) { return k == GradKind::kA_gu || k == GradKind::kB_gu; }

// Factor-gradient task: one GradKind for column blocks [block*kGradBlocks, (block+1)*kGradBlocks) of 32 columns
// of one expert.
constexpr int kGradBlocks = 4;
struct GradTask { GradKind kind; int expert, block; };

// Which weight scales fold into a quantized GEMM input (INT8 GEMMs, common.h): none (forward's x and act), the
// down projection's (backward's dy), or gate's and up's (backward's dz: gate scales for columns < Ip, up after).
enum class ScaleFold : int { kNone = 0, kGateUp = 1, kDown = 2 };

// int8 GEMMs: quantize the rows of one expert's task (Task.row0/rows) of a GEMM input (INT8 GEMMs, common.h) into
// dst [rows][qa_stride(K)] and dst_scale [rows], with the `fold` scales folded in first.
// src is gathered ([rows][ld], row_token null) or token-major ([T][ld], row r reads token row_token[r]).
struct QuantJob {
  const int* seg_start;
  const int* row_token;
  const void* src;
  int ld, K;
  ScaleFold fold;
  int8_t* dst;
  float* dst_scale;
};

struct ForwardBuffers {
  const int* seg_start;      // [E] first row of each expert's segment in the gathered buffers
  const float* row_weight;   // [rows] routing weight of each gathered row
  const void* xg;            // [rows][ldx] gathered input (activation dtype), K = Hp
  void* act;                 // [rows][ld_act] h = act(gate) * up (activation dtype), input of the down GEMM
  void* gate_out;            // [rows][Ip] saved gate pre-activation or null (not saved, or ungated)
  void* up_out;              // [rows][Ip] saved up pre-activation or null
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
  const void* dyg;           // [rows][ldx] gathered output gradient, unweighted
  const void* gate_in;       // [rows][Ip] saved gate pre-activation (null: ungated)
  const void* up_in;         // [rows][Ip] saved up pre-activation
  float* dw_part;            // [rows][Ip/32] partial <dy, expert_out> per output block
  void* dgu;                 // [rows][ld_dgu] (d gate | d up), the gate_up columns (gate_up_count * Ip) used
  float* dx_rows;            // [rows][Hp] input gradient per gathered row (f32; bf16 with int8 GEMMs)
  // LoRA only (lora == null otherwise):
  const LoraView* lora;
  const int* count;          // [E] routed rows per expert
  const int* row_token;      // [rows] token of each gathered row
  const void* x;             // [T][H] saved layer input
  const void* dy;            // [T][H] output gradient as passed in
  const float* u_gu;         // [rows][r_gu] saved x.B_gu
  const float* q_d;          // [rows][r_d]  saved h.B_d
  const float* dyA;          // [rows][r_d]  dy.A_d^T (unweighted)
  const float* t_gu;         // [rows][r_gu] dz.A_gu^T
  void* h;                   // [rows][Ip] silu(g)*u as the down GEMM consumed it, from bwd_act; null
                             // when fuse_grads (bwd_act then uses it in place)
  bool fuse_grads;           // bwd_act also writes dA_gu and dB_d of its expert x column blocks: set when each
                             // bwd_act task holds all rows of its expert and K is not chunked
  float* gA_gu;              // [r_gu*E][2I] (ungated: [I])  PEFT layouts, every element written
  float* gB_gu;              // [H][r_gu*E]
  float* gA_d;               // [r_d*E][H]
  float* gB_d;               // [I][r_d*E]
  const int8_t* qa;          // int8 GEMMs: the current phase's A (dy * s_down, then dz * s_gu) quantized
  const float* qs;           // int8 GEMMs: its row scales
};

// Bytes of a worker's C sums (Scratch.c): a K-chunked task sweeps as many row groups as theirs fit (moe_tasks.inc,
// plan_k); one row group's C tiles for every block of a task (kMaxTaskBlocks x gate and up: 64 KiB) always fit.
constexpr size_t kTaskCBytes = size_t(256) << 10;

// Per-worker scratch: C sums and the weight blocks a task makes (transposed for backward, expanded for forward).
struct Scratch {
  float* c;      // kTaskCBytes: C tiles [row group][column block][projection][kRowAlign][kBlock], f32 or (int8
                 // GEMMs, until finish) int32
  void* packed;  // one slot per column block of a task: 2 transposed panels of Hp (bwd_act) or 2*Ip rows
  float* acc;    // LoRA gradient sums: [r][kBlock] (lora_grad) or per column block (fused bwd_act)
  void* wdq;     // formats that expand their weight blocks (int8, fp8, int4: to bf16; int4 GEMMs: to int8 quads): one
                 // slot per column block (and projection)
  uint64_t* clock;  // profiling: this worker's TaskClock ticks (null when off)
};

// Where a worker's time inside a GEMM phase goes (phase profiling: engine.h, PhaseClock), in time-stamp-counter
// ticks: the micro-kernel calls, making their B operands (backward's repack, forward's expansion), the next
// chunk's prefetch, the epilogues (finish + fused activation / LoRA / stores), quantizing A (int8 GEMMs), waiting
// for an expert's quantized rows, and whole tasks (the rest of a task is its set-up).
enum TaskPart { kPartTiles, kPartOperands, kPartPrefetch, kPartEpilogue, kPartQuantize, kPartWait, kPartTask,
                kTaskParts };
struct alignas(64) TaskClock {
  uint64_t ticks[kTaskParts];
};
// The time-stamp counter where the CPU has one (every x86-64 does); elsewhere nanoseconds, which work the same.
inline uint64_t clock_ticks() {
#if defined(__x86_64__)
  return __builtin_ia32_rdtsc();
#else
  return uint64_t(std::chrono::steady_clock::now().time_since_epoch().count());
#endif
}
// Adds the ticks since `since` to part p of `clock` (null: profiling off) and returns now.
inline uint64_t clock_add(uint64_t* clock, TaskPart p, uint64_t since) {
  if (!clock) return 0;
  const uint64_t now = clock_ticks();
  clock[p] += now - since;
  return now;
}

// One format's kernels on one ISA. Every entry is a direct instantiation for that format: no run-time dispatch.
struct KernelTable {
  WeightFormat format;
  void (*gate_up)(const LayerView&, const ForwardBuffers&, const Task&, Scratch&);
  void (*down)(const LayerView&, const ForwardBuffers&, const Task&, Scratch&);
  void (*bwd_act)(const LayerView&, const BackwardBuffers&, const Task&, Scratch&);
  void (*bwd_input)(const LayerView&, const BackwardBuffers&, const Task&, Scratch&);
  void (*lora_proj)(const LayerView&, const LoraProj&, const Task&);
  void (*lora_grad)(const LayerView&, const BackwardBuffers&, const GradTask&, Scratch&);
  void (*quantize)(const LayerView&, const QuantJob&, const Task&);  // null: the GEMMs read A as stored
};

struct IsaKernels {
  const char* name;
  KernelTable formats[kNumFormats];    // indexed by WeightFormat
};

// One set per ISA translation unit; call only after cpu_features says the ISA runs here.
const IsaKernels* kernels_scalar();
const IsaKernels* kernels_avx2();
const IsaKernels* kernels_avx512();
const IsaKernels* kernels_amx();

}  // namespace kt_sft

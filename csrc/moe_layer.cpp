#include "moe_layer.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "cpu_features.h"
#include "thread_pool.h"

namespace kt_sft {
namespace {

constexpr int kRowChunk = 256;      // forward rows per task: balances skewed experts, keeps A rows in L2
constexpr int kRowChunkInt8 = 1024; // int8 layers: each forward task dequantizes its weight block, so fewer, longer
                                    // (int8-GEMM layers, which read quads in place, use it too: not tuned apart)
constexpr int kRowChunkBwd = 2048;  // backward tasks repack their weight block first: fewer, longer tasks
static_assert(kRowChunk <= kMaxTaskRows && kRowChunkInt8 <= kMaxTaskRows && kRowChunkBwd <= kMaxTaskRows,
              "K-chunked tasks keep all their rows' C in the per-worker scratch");
constexpr int kWholeSegment = 1 << 30;  // a row chunk no expert reaches: one task per expert x block group
// Column blocks per task of each GEMM phase: a task walks each 32-row block of its A rows (x, act, dy, dz)
// across all its blocks, so those rows come from L2 once per task row block instead of once per 32 output
// columns from L3 (measured with bench_moe.py --against: dx 44.6 -> 36.7 ms, dy.W_down 29.7 -> 26.1 ms).
constexpr int kGateUpBlocksPerTask = 2;  // forward gate_up: x rows (32 x Hp) for 2 x this many GEMMs
constexpr int kDownBlocksPerTask = 4;
constexpr int kDxBlocksPerTask = 4;
constexpr int kActBlocksPerTask = 4;  // backward dy.W_down + dSiLU-GLU (dy rows: 32 x Hp)
// Layers with int8 GEMMs read int8 A rows, half the bytes: twice the blocks per task fit the same L2 share (not for
// bwd_act, whose fused LoRA sums are sized by kActBlocksPerTask).
constexpr int kGateUpBlocksPerTaskInt8 = 4;
constexpr int kDownBlocksPerTaskInt8 = 8;
constexpr int kDxBlocksPerTaskInt8 = 8;
static_assert(kGateUpBlocksPerTask <= kMaxTaskBlocks && kDownBlocksPerTask <= kMaxTaskBlocks &&
              kDxBlocksPerTask <= kMaxTaskBlocks && kActBlocksPerTask <= kMaxTaskBlocks &&
              kGateUpBlocksPerTaskInt8 <= kMaxTaskBlocks && kDownBlocksPerTaskInt8 <= kMaxTaskBlocks &&
              kDxBlocksPerTaskInt8 <= kMaxTaskBlocks, "see Task");
constexpr int kTokenChunk = 32;   // tokens per gather / reduce task

struct Engine {
  std::mutex mu;  // serialises compute calls: the scratch below is shared by every layer
  const IsaKernels* kt = nullptr;
  std::string isa;
  int kchunk = 0;  // K chunk of the task GEMMs: KT_SFT_KCHUNK, else the ISA unit's default
  std::unique_ptr<ThreadPool> pool;
  Buffer xg, act, rows_f32, dw_part;
  std::vector<Buffer> c0, c1, packed, acc, wdq, ci;
  Buffer q8, q8_scale;  // int8 GEMMs: the current GEMM phase's A quantized (QuantJob), and its row scales
  // LoRA: repacked factors (LoraView), rank-r projections of unsaved forwards / backward, h for dB_d.
  Buffer l_at_gu, l_bt_gu, l_at_d, l_bt_d, l_u, l_q, l_dya, l_tgu, l_h;
  bool profiling = false;                          // set_profiling: wall time per phase of every call
  std::vector<std::pair<std::string, PhaseStat>> profile;  // (phase, calls + seconds) in first-seen order
};

// Wall-clock stamps between the phases of one forward/backward (each phase ends with a pool barrier, so the
// stamps split the call exactly). Free when profiling is off.
class PhaseClock {
 public:
  explicit PhaseClock(Engine& eng) : eng_(eng), t_(eng.profiling ? now() : Clock::time_point{}) {}
  void mark(const char* phase) {
    if (!eng_.profiling) return;
    const Clock::time_point t = now();
    auto it = std::find_if(eng_.profile.begin(), eng_.profile.end(), [&](const auto& e) { return e.first == phase; });
    if (it == eng_.profile.end()) it = eng_.profile.insert(it, {phase, PhaseStat{}});
    PhaseStat& p = it->second;
    p.calls += 1;
    p.seconds += std::chrono::duration<double>(t - t_).count();
    t_ = t;
  }

 private:
  using Clock = std::chrono::steady_clock;
  static Clock::time_point now() { return Clock::now(); }
  Engine& eng_;
  Clock::time_point t_;
};

Engine& engine() {
  static Engine* e = new Engine();  // never destroyed: worker threads must not outlive a static destructor
  return *e;
}

const IsaKernels* table_for(const std::string& isa) {
  if (isa == "scalar") return kernels_scalar();
  if (isa == "avx2") return kernels_avx2();
  if (isa == "avx512") return kernels_avx512();
  return kernels_amx();
}

int default_threads() {
  if (const char* env = std::getenv("KT_SFT_THREADS")) {
    char* end = nullptr;
    long n = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || n < 1 || n > 4096)
      throw std::invalid_argument(std::string("KT_SFT_THREADS='") + env + "' is not a positive integer");
    return int(n);
  }
  return std::max(1, physical_cores());
}

// KT_SFT_KCHUNK (a multiple of 32; 0 = one pass) overrides the unit's K chunk: for tests and tuning.
int kchunk_for(const IsaKernels* kt) {
  if (const char* env = std::getenv("KT_SFT_KCHUNK")) {
    char* end = nullptr;
    const long v = std::strtol(env, &end, 10);
    if (end == env || *end != '\0' || v < 0 || v % kBlock != 0 || v > (1 << 20))
      throw std::invalid_argument(std::string("KT_SFT_KCHUNK='") + env + "' is not 0 or a positive multiple of 32");
    return int(v);
  }
  return kt->kchunk;
}

// Called with engine().mu held.
void ensure_ready(Engine& eng) {
  if (!eng.kt) {
    const char* env = std::getenv("KT_SFT_ISA");
    std::string want = env ? env : "";
    std::string why;
    if (!want.empty() && !isa_supported(want, &why))
      throw std::runtime_error("KT_SFT_ISA=" + want + " cannot run on this CPU: " + why);
    eng.isa = want.empty() ? supported_isas().back() : want;
    eng.kt = table_for(eng.isa);
    eng.kchunk = kchunk_for(eng.kt);
  }
  if (!eng.pool) eng.pool.reset(new ThreadPool(default_threads()));
}

void ensure_scratch(Engine& eng, int Hp, int Ip, int wtype, bool wq, bool aq) {
  const size_t n = size_t(eng.pool->size());
  const size_t es = size_t(dtype_size(wtype));
  // one transposed block (2 panels) per column block of a task: bwd_act's of Hp rows, bwd_input's of 2*Ip rows
  // (int8 GEMMs: bytes, K rounded up to 64)
  const size_t packed =
      aq ? 2 * size_t(std::max(kActBlocksPerTask * round_up(Hp, 64), kDxBlocksPerTaskInt8 * round_up(2 * Ip, 64))) *
               kPanel
         : 2 * size_t(std::max(kActBlocksPerTask * Hp, kDxBlocksPerTask * 2 * Ip)) * kPanel * es;
  eng.c0.resize(n);
  eng.c1.resize(n);
  eng.packed.resize(n);
  eng.wdq.resize(n);
  eng.ci.resize(n);
  for (size_t w = 0; w < n; ++w) {
    const size_t c_rows = eng.kchunk > 0 ? kMaxTaskRows : kRowAlign;  // gemm_rows in moe_tasks.inc
    eng.c0[w].reserve(c_rows * kBlock * sizeof(float));
    eng.c1[w].reserve(c_rows * kBlock * sizeof(float));
    eng.packed[w].reserve(packed);
    // per column block of a task: gate_up's gate and up blocks (2 x 2 panels of Hp), down's 2 panels of Ip
    if (wq && !aq)  // int8 GEMMs read their quads in place
      eng.wdq[w].reserve(size_t(std::max(4 * kGateUpBlocksPerTask * Hp, 2 * kDownBlocksPerTask * Ip)) * kPanel *
                         sizeof(uint16_t));
    if (aq) eng.ci[w].reserve(kRowAlign * kBlock * sizeof(int32_t));  // int8 GEMMs: one 32-row block's sums
  }
}

Scratch scratch_of(Engine& eng, int worker) {
  return Scratch{static_cast<float*>(eng.c0[worker].get()), static_cast<float*>(eng.c1[worker].get()),
                 eng.packed[worker].get(), worker < int(eng.acc.size()) ? static_cast<float*>(eng.acc[worker].get())
                                                                        : nullptr,
                 eng.wdq[worker].get(), static_cast<int32_t*>(eng.ci[worker].get())};
}

// dst[e][rho][c] (row length ldd, zero past n) = src[c][rho * E + e] (PEFT's B layout [n][r*E]) for all e, rho:
// a transpose of [n][r*E] done in tiles of 32 source rows, so reads and writes both run along cache lines.
void transpose_b_factor(ThreadPool& pool, const float* src, int n, int rE, float* dst, int ldd, int E, int r) {
  constexpr int kTile = 32;
  const int tiles = (ldd + kTile - 1) / kTile;
  pool.run(tiles, [&](int tile, int) {
    const int c0 = tile * kTile, c1 = std::min(ldd, c0 + kTile);
    for (int j = 0; j < rE; ++j) {  // j = rho * E + e -> destination row e * r + rho
      const int rho = j / E, e = j % E;
      float* d = dst + (size_t(e) * r + rho) * ldd;
      for (int c = c0; c < c1; ++c) d[c] = c < n ? src[size_t(c) * rE + j] : 0.f;
    }
  });
}

// PEFT flat factors -> the per-expert, zero-padded LoraView layout (common.h). The A factors are already
// [E][r][...] rows: used in place when no padding is needed (I and H multiples of 32, the usual case), else
// copied with zero padding. The B factors are transposed (transpose_b_factor).
LoraView repack_lora(Engine& eng, const LoraArgs& a, int E, int H, int I, int Hp, int Ip) {
  LoraView v{};
  v.r_gu = a.r_gu;
  v.r_d = a.r_d;
  v.s_gu = a.s_gu;
  v.s_d = a.s_d;
  const size_t f = sizeof(float);
  ThreadPool& pool = *eng.pool;
  const size_t rg = size_t(a.r_gu), rd = size_t(a.r_d);
  if (rg > 0) {
    if (I == Ip) {
      v.At_gu = a.A_gu;
    } else {
      float* at_gu = static_cast<float*>(eng.l_at_gu.reserve(size_t(E) * rg * 2 * Ip * f));
      pool.run(E, [&](int e, int) {
        for (size_t rho = 0; rho < rg; ++rho) {
          const float* src = a.A_gu + (size_t(e) * rg + rho) * 2 * I;
          float* d = at_gu + (size_t(e) * rg + rho) * 2 * Ip;
          std::memset(d, 0, size_t(2) * Ip * f);
          std::memcpy(d, src, size_t(I) * f);
          std::memcpy(d + Ip, src + I, size_t(I) * f);
        }
      });
      v.At_gu = at_gu;
    }
    float* bt_gu = static_cast<float*>(eng.l_bt_gu.reserve(size_t(E) * rg * Hp * f));
    transpose_b_factor(pool, a.B_gu, H, int(rg) * E, bt_gu, Hp, E, int(rg));
    v.Bt_gu = bt_gu;
  }
  if (rd > 0) {
    if (H == Hp) {
      v.At_d = a.A_d;
    } else {
      float* at_d = static_cast<float*>(eng.l_at_d.reserve(size_t(E) * rd * Hp * f));
      pool.run(E, [&](int e, int) {
        for (size_t rho = 0; rho < rd; ++rho) {
          float* d = at_d + (size_t(e) * rd + rho) * Hp;
          std::memcpy(d, a.A_d + (size_t(e) * rd + rho) * H, size_t(H) * f);
          std::memset(d + H, 0, size_t(Hp - H) * f);
        }
      });
      v.At_d = at_d;
    }
    float* bt_d = static_cast<float*>(eng.l_bt_d.reserve(size_t(E) * rd * Ip * f));
    transpose_b_factor(pool, a.B_d, I, int(rd) * E, bt_d, Ip, E, int(rd));
    v.Bt_d = bt_d;
  }
  return v;
}

void check_lora_args(const LoraArgs& a) {
  if (a.r_gu < 0 || a.r_d < 0) throw std::invalid_argument("LoRA ranks must be >= 0");
  if (a.r_gu > 0 && (!a.A_gu || !a.B_gu)) throw std::invalid_argument("LoRA gate_up rank > 0 but a factor is null");
  if (a.r_d > 0 && (!a.A_d || !a.B_d)) throw std::invalid_argument("LoRA down rank > 0 but a factor is null");
}


// One task per expert x row chunk x group of `per_task` column blocks (<= kMaxTaskBlocks; the last group of an
// expert may hold fewer).
std::vector<Task> make_tasks(const RoutingPlan& plan, int blocks, int chunk, int per_task = 1) {
  std::vector<Task> tasks;
  for (int e = 0; e < int(plan.count.size()); ++e)
    for (int b = 0; b < blocks; b += per_task)
      for (int r0 = 0; r0 < plan.count[e]; r0 += chunk)
        tasks.push_back(Task{e, b, r0, std::min(chunk, plan.count[e] - r0), std::min(per_task, blocks - b)});
  return tasks;
}

// Rank-r row projections out[row][rho] = scale_row * src[row] . mat[e][rho] over every routed row.
void run_proj(ThreadPool& pool, const KernelTable* kt, const LayerView& L, const RoutingPlan& plan,
              const void* src, int ld, int K, int r, const float* mat, float* out, const float* row_scale) {
  LoraProj P{plan.seg_start.data(), src, ld, K, r, mat, out, row_scale};
  std::vector<Task> tasks = make_tasks(plan, 1, kRowChunk);
  pool.run(int(tasks.size()), [&](int i, int) { kt->lora_proj(L, P, tasks[size_t(i)]); });
}

// The A of an int8-GEMM phase before quantization (QuantJob): the gathered rows [rows][ld] (row_token null) or the
// token rows [T][ld], K columns, with the scales of projection `which` folded in.
struct QuantSource {
  const void* src;
  int ld, K;
  ScaleFold fold;
  const int* row_token;
};

constexpr int kQuantLead = 2;  // experts by which a phase's quantize tasks run ahead of its GEMM tasks

// One GEMM phase: gemm(task, worker) for every task. With `quant` (a layer with int8 GEMMs) the phase's A is
// quantized per row into the engine's q8 buffers, returned in (qa, qs), in the same pool run: expert e's quantize
// tasks are queued kQuantLead experts ahead of its GEMM tasks, and a GEMM task spins until its expert's rows are
// all quantized. The memory-bound quantization then runs beside other workers' AMX GEMMs instead of alone between
// two barriers. Tasks are taken in queue order and every quantize task comes before the GEMM tasks that wait for
// it, so a waiting worker only waits for workers that are running.
template <typename Gemm>
void run_gemm_phase(Engine& eng, const KernelTable* kt, const LayerView& L, const RoutingPlan& plan, const std::vector<Task>& gemm_tasks,
                    Gemm gemm, const QuantSource* quant, const int8_t** qa, const float** qs) {
  if (!quant) {
    eng.pool->run(int(gemm_tasks.size()), [&](int i, int wk) { gemm(gemm_tasks[size_t(i)], wk); });
    return;
  }
  int8_t* dst = static_cast<int8_t*>(eng.q8.reserve(size_t(plan.rows) * qa_stride(quant->K)));
  float* ds = static_cast<float*>(eng.q8_scale.reserve(size_t(plan.rows) * sizeof(float)));
  *qa = dst;
  *qs = ds;
  const QuantJob J{plan.seg_start.data(), quant->row_token, quant->src, quant->ld, quant->K, quant->fold, dst, ds};
  const std::vector<Task> qtasks = make_tasks(plan, 1, 64);
  const int E = int(plan.count.size());
  std::vector<int> need(size_t(E), 0);
  for (const Task& t : qtasks) ++need[size_t(t.expert)];
  std::unique_ptr<std::atomic<int>[]> done(new std::atomic<int>[size_t(E)]);
  for (int e = 0; e < E; ++e) done[size_t(e)].store(0, std::memory_order_relaxed);
  std::vector<int> queue;  // >= 0: GEMM task; < 0: quantize task -1 - i
  queue.reserve(qtasks.size() + gemm_tasks.size());
  size_t qi = 0, gi = 0;
  for (int e = 0; e < E; ++e) {
    for (; qi < qtasks.size() && qtasks[qi].expert <= e + kQuantLead; ++qi) queue.push_back(-1 - int(qi));
    for (; gi < gemm_tasks.size() && gemm_tasks[gi].expert == e; ++gi) queue.push_back(int(gi));
  }
  if (qi != qtasks.size() || gi != gemm_tasks.size())  // make_tasks orders by expert; anything else would skip tasks
    throw std::logic_error("run_gemm_phase: tasks not in expert order");
  eng.pool->run(int(queue.size()), [&](int i, int wk) {
    const int q = queue[size_t(i)];
    if (q < 0) {
      const Task& t = qtasks[size_t(-1 - q)];
      kt->quantize(L, J, t);
      done[size_t(t.expert)].fetch_add(1, std::memory_order_release);
      return;
    }
    const int e = gemm_tasks[size_t(q)].expert;
    while (done[size_t(e)].load(std::memory_order_acquire) < need[size_t(e)]) _mm_pause();
    gemm(gemm_tasks[size_t(q)], wk);
  });
}

// memcpy split over the pool (one thread copies ~10 GB/s; a 4096-token layer input is 16 MB).
void parallel_copy(ThreadPool& pool, void* dst, const void* src, size_t bytes) {
  constexpr size_t kPiece = size_t(1) << 20;
  const int pieces = int((bytes + kPiece - 1) / kPiece);
  pool.run(pieces, [&](int i, int) {
    const size_t at = size_t(i) * kPiece;
    std::memcpy(static_cast<char*>(dst) + at, static_cast<const char*>(src) + at, std::min(kPiece, bytes - at));
  });
}

// Copies token rows (H elements, wtype) into their k gathered rows (ld elements apart), zeroing the K padding
// up to Hp (the stride padding past Hp is never read).
void gather_rows(ThreadPool& pool, const RoutingPlan& plan, const void* src, void* dst, int H, int Hp, int ld,
                 size_t es) {
  const int chunks = (plan.T + kTokenChunk - 1) / kTokenChunk;
  pool.run(chunks, [&](int chunk, int) {
    const int t1 = std::min(plan.T, (chunk + 1) * kTokenChunk);
    for (int t = chunk * kTokenChunk; t < t1; ++t)
      for (int j = 0; j < plan.k; ++j) {
        const int row = plan.row_of[size_t(t) * plan.k + j];
        if (row < 0) continue;  // slot computed elsewhere
        char* d = static_cast<char*>(dst) + size_t(row) * ld * es;
        std::memcpy(d, static_cast<const char*>(src) + size_t(t) * H * es, size_t(H) * es);
        std::memset(d + size_t(H) * es, 0, size_t(Hp - H) * es);
      }
  });
}

// dst[t][0..H) = sum_j rows[row_of[t][j]][0..H), in slot order (fp32), stored as wtype. rows: f32, or bf16 when
// rows16 (int8 GEMMs).
void sum_rows(ThreadPool& pool, const RoutingPlan& plan, const void* rows, void* dst, int H, int Hp, int wtype,
              bool rows16) {
  const int chunks = (plan.T + kTokenChunk - 1) / kTokenChunk;
  pool.run(chunks, [&](int chunk, int) {
    std::vector<float> acc(static_cast<size_t>(H));
    const int t1 = std::min(plan.T, (chunk + 1) * kTokenChunk);
    for (int t = chunk * kTokenChunk; t < t1; ++t) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int j = 0; j < plan.k; ++j) {
        const int row = plan.row_of[size_t(t) * plan.k + j];
        if (row < 0) continue;
        if (rows16) {
          const uint16_t* r = static_cast<const uint16_t*>(rows) + size_t(row) * Hp;
          for (int c = 0; c < H; ++c) acc[c] += bf16_to_f32(r[c]);
        } else {
          const float* r = static_cast<const float*>(rows) + size_t(row) * Hp;
          for (int c = 0; c < H; ++c) acc[c] += r[c];
        }
      }
      if (wtype == kF32) {
        std::memcpy(static_cast<float*>(dst) + size_t(t) * H, acc.data(), size_t(H) * sizeof(float));
      } else {
        uint16_t* d = static_cast<uint16_t*>(dst) + size_t(t) * H;
        for (int c = 0; c < H; ++c) d[c] = f32_to_bf16(acc[c]);
      }
    }
  });
}

const char* kWhich[3] = {"gate", "up", "down"};

}  // namespace

// ---------------------------------------------------------------- Buffer

Buffer::~Buffer() { std::free(ptr_); }

void* Buffer::reserve(size_t bytes) {
  if (bytes <= bytes_) return ptr_;
  std::free(ptr_);
  ptr_ = nullptr;
  bytes_ = 0;
  const size_t rounded = (bytes + 63) / 64 * 64;
  ptr_ = std::aligned_alloc(64, rounded);
  if (!ptr_) throw std::bad_alloc();
  bytes_ = rounded;
  return ptr_;
}

// ---------------------------------------------------------------- engine settings

std::string select_isa(const std::string& isa) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  std::string want = isa;
  if (want.empty()) {
    const char* env = std::getenv("KT_SFT_ISA");
    want = env ? env : "";
  }
  std::string why;
  if (want.empty()) {
    want = supported_isas().back();
  } else if (!isa_supported(want, &why)) {
    throw std::runtime_error("ISA '" + want + "' cannot run on this CPU: " + why);
  }
  eng.isa = want;
  eng.kt = table_for(want);
  eng.kchunk = kchunk_for(eng.kt);
  return want;
}

std::string current_isa() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return eng.isa;
}

void set_num_threads(int n) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  if (n < 0 || n > 4096) throw std::invalid_argument("num_threads must be in [0, 4096], got " + std::to_string(n));
  eng.pool.reset();
  eng.pool.reset(new ThreadPool(n == 0 ? default_threads() : n));
}

int num_threads() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return eng.pool->size();
}

int worker_spin_us() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return eng.pool->spin_us();
}

void set_worker_spin_us(int us) {
  if (us < 0) throw std::invalid_argument("worker spin must be >= 0 microseconds, got " + std::to_string(us));
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  eng.pool->set_spin_us(us);
}

// ---------------------------------------------------------------- MoELayer

MoELayer::MoELayer(int experts, int hidden, int intermediate, WeightFormat format, int activation, int max_saved)
    : E_(experts), H_(hidden), I_(intermediate), wtype_(format == WeightFormat::kF32 ? kF32 : kBF16),
      activation_(activation), format_(format),
      wq_(format == WeightFormat::kInt8 || format == WeightFormat::kInt8Gemm), aq_(format == WeightFormat::kInt8Gemm) {
  if (E_ < 1 || H_ < 1 || I_ < 1) throw std::invalid_argument("experts, hidden and intermediate must be >= 1");
  if (int(format) < 0 || int(format) > int(WeightFormat::kInt8Gemm)) throw std::invalid_argument("unknown weight format");
  if (activation != kSiluGLU) throw std::invalid_argument("only the SiLU-gated (silu_glu) expert is implemented");
  if (max_saved < 1) throw std::invalid_argument("max_saved must be >= 1");
  Hp_ = round_up(H_, kBlock);
  Ip_ = round_up(I_, kBlock);
  expert_elems_ = size_t(Ip_) * Hp_;
  const size_t bytes = size_t(E_) * expert_elems_ * weight_elem_bytes();
  gate_.reserve(bytes);
  up_.reserve(bytes);
  down_.reserve(bytes);
  if (wq_) {
    gate_s_.reserve(size_t(E_) * Ip_ * sizeof(float));
    up_s_.reserve(size_t(E_) * Ip_ * sizeof(float));
    down_s_.reserve(size_t(E_) * Hp_ * sizeof(float));
  }
  loaded_.assign(3 * size_t(E_), 0);
  slots_.resize(size_t(max_saved));
}

LayerView MoELayer::view(int kchunk) const {
  LayerView L{};
  L.E = E_; L.H = H_; L.I = I_; L.Hp = Hp_; L.Ip = Ip_;
  L.w[0] = WeightView{gate_.get(), static_cast<const float*>(gate_s_.get()), size_t(Ip_)};
  L.w[1] = WeightView{up_.get(), static_cast<const float*>(up_s_.get()), size_t(Ip_)};
  L.w[2] = WeightView{down_.get(), static_cast<const float*>(down_s_.get()), size_t(Hp_)};
  L.expert_elems = expert_elems_;
  L.kchunk = kchunk;
  L.ldx = padded_row_stride(Hp_);
  L.ld_act = padded_row_stride(Ip_);
  L.ld_dgu = padded_row_stride(2 * Ip_);
  return L;
}

void MoELayer::set_weights(int which, int e0, int n, const void* src, int src_dtype, int64_t s_e, int64_t s_r,
                           int64_t s_c) {
  if (which < 0 || which > 2) throw std::invalid_argument("which must be 0 (gate), 1 (up) or 2 (down)");
  if (e0 < 0 || n < 1 || e0 + n > E_)
    throw std::invalid_argument("experts [" + std::to_string(e0) + ", " + std::to_string(e0 + n) +
                                ") outside [0, " + std::to_string(E_) + ")");
  if (src_dtype != kF32 && src_dtype != kBF16 && src_dtype != kF16)
    throw std::invalid_argument("source dtype must be float32, bfloat16 or float16");
  const int N = which == 2 ? H_ : I_, K = which == 2 ? I_ : H_;
  const int Np = which == 2 ? Hp_ : Ip_, Kp = which == 2 ? Ip_ : Hp_;
  const int panels = Np / kPanel;
  char* base = static_cast<char*>(which == 0 ? gate_.get() : which == 1 ? up_.get() : down_.get());
  std::vector<int> bad(size_t(n) * panels, 0);

  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  float* scales = !wq_ ? nullptr : static_cast<float*>(which == 0 ? gate_s_.get() : which == 1 ? up_s_.get()
                                                                                                  : down_s_.get());
  eng.pool->run(n * panels, [&](int task, int) {
    const int e = e0 + task / panels, p = task % panels;
    char* dst = base + (size_t(e) * expert_elems_ + size_t(p) * Kp * kPanel) * weight_elem_bytes();
    for (int nn = 0; nn < kPanel; ++nn) {
      const int row = p * kPanel + nn;
      if (wq_) {  // per-channel symmetric int8 (common.h, INT8)
        const auto value = [&](int k) {
          return load_as_f32(src, size_t(int64_t(e - e0) * s_e + int64_t(row) * s_r + int64_t(k) * s_c), src_dtype);
        };
        float amax = 0.f;
        if (row < N)
          for (int k = 0; k < K; ++k) {
            const float v = value(k);
            if (!std::isfinite(v)) bad[size_t(task)] = 1;
            amax = std::max(amax, std::fabs(v));
          }
        const float sc = amax / 127.0f;
        scales[size_t(e) * Np + row] = sc;
        int8_t* q = reinterpret_cast<int8_t*>(dst);
        for (int k = 0; k < Kp; ++k) {
          float r = 0.f;
          if (row < N && k < K && sc > 0.f && std::isfinite(sc))
            r = std::min(127.f, std::max(-127.f, std::nearbyint(value(k) / sc)));
          q[aq_ ? (size_t(k / 4) * kPanel + nn) * 4 + (k & 3) : (size_t(k / 2) * kPanel + nn) * 2 + (k & 1)] =
              int8_t(r);
        }
        continue;
      }
      for (int k = 0; k < Kp; ++k) {
        float v = 0.f;
        if (row < N && k < K) {
          v = load_as_f32(src, size_t(int64_t(e - e0) * s_e + int64_t(row) * s_r + int64_t(k) * s_c), src_dtype);
          if (!std::isfinite(v)) bad[size_t(task)] = 1;
        }
        if (wtype_ == kF32)
          reinterpret_cast<float*>(dst)[size_t(k) * kPanel + nn] = v;
        else
          reinterpret_cast<uint16_t*>(dst)[(size_t(k / 2) * kPanel + nn) * 2 + (k & 1)] = f32_to_bf16(v);
      }
    }
  });
  for (int task = 0; task < n * panels; ++task)
    if (bad[size_t(task)])
      throw std::invalid_argument(std::string("non-finite value (NaN/Inf) in the ") + kWhich[which] +
                                  " weights of expert " + std::to_string(e0 + task / panels));
  for (int e = e0; e < e0 + n; ++e) loaded_[size_t(which) * E_ + e] = 1;
}

std::vector<std::string> MoELayer::missing_weights() const {
  std::vector<std::string> out;
  for (int w = 0; w < 3; ++w)
    for (int e = 0; e < E_; ++e)
      if (!loaded_[size_t(w) * E_ + e]) out.push_back("expert " + std::to_string(e) + " " + kWhich[w]);
  return out;
}

size_t MoELayer::saved_bytes() const {
  size_t b = 0;
  for (const auto& s : slots_) b += s.gate.bytes() + s.up.bytes() + s.x.bytes() + s.u_gu.bytes() + s.q_d.bytes();
  return b;
}

void MoELayer::build_plan(int T, int k, const int64_t* ids, const float* w, RoutingPlan& plan) const {
  plan.T = T;
  plan.k = k;
  plan.count.assign(size_t(E_), 0);
  for (size_t i = 0; i < size_t(T) * k; ++i) {
    const int64_t e = ids[i];
    if (e == kNotHere) continue;
    if (e < 0 || e >= E_)
      throw std::invalid_argument("topk_ids[" + std::to_string(i / k) + "][" + std::to_string(i % k) + "] = " +
                                  std::to_string(e) + " is outside [0, " + std::to_string(E_) +
                                  ") (-1: slot computed elsewhere)");
    ++plan.count[size_t(e)];
  }
  plan.seg_start.assign(size_t(E_), 0);
  int rows = 0;
  for (int e = 0; e < E_; ++e) {
    plan.seg_start[size_t(e)] = rows;
    rows += round_up(plan.count[size_t(e)], kRowAlign);
  }
  plan.rows = rows;
  plan.row_of.resize(size_t(T) * k);
  plan.row_token.assign(size_t(rows), -1);
  plan.row_weight.assign(size_t(rows), 0.f);
  std::vector<int> cursor(plan.seg_start);
  for (size_t i = 0; i < size_t(T) * k; ++i) {
    if (ids[i] == kNotHere) {
      plan.row_of[i] = -1;
      continue;
    }
    const int row = cursor[size_t(ids[i])]++;
    plan.row_of[i] = row;
    plan.row_token[size_t(row)] = int(i / k);
    plan.row_weight[size_t(row)] = w[i];
  }
}

SavedSlot* MoELayer::find_slot(uint64_t handle) {
  for (auto& s : slots_)
    if (handle != 0 && s.handle == handle) return &s;
  return nullptr;
}

std::pair<const void*, size_t> MoELayer::panel_storage(int which) const {
  if (which < 0 || which > 2) throw std::invalid_argument("which: expected 0 (gate), 1 (up) or 2 (down)");
  const Buffer& b = which == 0 ? gate_ : which == 1 ? up_ : down_;
  return {b.get(), size_t(E_) * expert_elems_ * weight_elem_bytes()};
}

std::pair<const void*, size_t> MoELayer::scale_storage(int which) const {
  if (which < 0 || which > 2) throw std::invalid_argument("which: expected 0 (gate), 1 (up) or 2 (down)");
  if (!wq_) return {nullptr, 0};
  const Buffer& b = which == 0 ? gate_s_ : which == 1 ? up_s_ : down_s_;
  return {b.get(), size_t(E_) * (which == 2 ? Hp_ : Ip_) * sizeof(float)};
}

void MoELayer::grow_saved(int n) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);  // slot pointers live only inside calls that hold this lock
  if (n > int(slots_.size())) slots_.resize(size_t(n));
}

void MoELayer::release(uint64_t handle) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  if (SavedSlot* s = find_slot(handle)) s->handle = 0;
}

uint64_t MoELayer::forward(int T, int k, const void* x, const int64_t* ids, const float* w, void* y, bool save,
                           const LoraArgs* lora) {
  if (T < 0 || k < 1) throw std::invalid_argument("need T >= 0 and k >= 1");
  const bool lo = lora && lora->on();
  if (lo) check_lora_args(*lora);
  const std::vector<std::string> missing = missing_weights();
  if (!missing.empty())
    throw std::runtime_error("weights were never loaded for " + missing.front() + " (" +
                             std::to_string(missing.size()) + " projections missing)");
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  RoutingPlan local;
  SavedSlot* slot = nullptr;
  if (save) {  // a free slot, else the oldest
    for (auto& s : slots_)
      if (!slot || s.handle < slot->handle) slot = &s;
  }
  RoutingPlan& plan = slot ? slot->plan : local;
  build_plan(T, k, ids, w, plan);
  const uint64_t handle = save ? next_handle_++ : 0;
  if (slot) {
    slot->handle = handle;
    slot->r_gu = lo ? lora->r_gu : 0;
    slot->r_d = lo ? lora->r_d : 0;
  }
  if (T == 0) return handle;

  const size_t es = size_t(dtype_size(wtype_));
  const size_t rows = size_t(plan.rows);
  PhaseClock clock(eng);
  ensure_scratch(eng, Hp_, Ip_, wtype_, wq_, aq_);
  ForwardBuffers fb{};
  fb.seg_start = plan.seg_start.data();
  fb.row_weight = plan.row_weight.data();
  const LayerView L = view(eng.kchunk);
  const bool gather_bf16 = !aq_ || lo;  // int8 GEMMs quantize from the token rows; LoRA's projections need the copy
  fb.xg = gather_bf16 ? eng.xg.reserve(rows * L.ldx * es) : nullptr;
  fb.act = eng.act.reserve(rows * L.ld_dgu * es);  // the backward's dgu reuses this buffer
  fb.out_rows = static_cast<float*>(eng.rows_f32.reserve(rows * Hp_ * row_out_bytes()));
  if (slot) {
    fb.gate_out = slot->gate.reserve(rows * Ip_ * es);
    fb.up_out = slot->up.reserve(rows * Ip_ * es);
  }
  ThreadPool& pool = *eng.pool;
  const KernelTable* kt = &eng.kt->formats[int(format_)];
  if (gather_bf16) gather_rows(pool, plan, x, const_cast<void*>(fb.xg), H_, Hp_, L.ldx, es);
  clock.mark("forward: plan + gather");
  LoraView lv{};
  if (lo) {
    lv = repack_lora(eng, *lora, E_, H_, I_, Hp_, Ip_);
    fb.lora = &lv;
    const size_t ub = std::max<size_t>(1, rows * lora->r_gu * sizeof(float));
    const size_t qb = std::max<size_t>(1, rows * lora->r_d * sizeof(float));
    fb.u_gu = static_cast<float*>(slot ? slot->u_gu.reserve(ub) : eng.l_u.reserve(ub));
    fb.q_d = static_cast<float*>(slot ? slot->q_d.reserve(qb) : eng.l_q.reserve(qb));
    if (slot) parallel_copy(pool, slot->x.reserve(size_t(T) * H_ * es), x, size_t(T) * H_ * es);
    clock.mark("forward: LoRA repack + save x");
    if (lora->r_gu > 0)
      run_proj(pool, kt, L, plan, fb.xg, L.ldx, Hp_, lora->r_gu, lv.Bt_gu, const_cast<float*>(fb.u_gu), nullptr);
    clock.mark("forward: LoRA x.B_gu");
  }
  std::vector<Task> tasks = make_tasks(plan, Ip_ / kBlock, wq_ ? kRowChunkInt8 : kRowChunk,
                                       aq_ ? kGateUpBlocksPerTaskInt8 : kGateUpBlocksPerTask);
  const QuantSource qx{x, H_, H_, ScaleFold::kNone, plan.row_token.data()};
  run_gemm_phase(eng, kt, L, plan, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng, wk);
    kt->gate_up(L, fb, t, s);
  }, aq_ ? &qx : nullptr, &fb.qa, &fb.qs);
  clock.mark(aq_ ? "forward: quantize x + gate_up GEMM + SiLU-GLU" : "forward: gate_up GEMM + SiLU-GLU");
  if (lo && lora->r_d > 0) {
    run_proj(pool, kt, L, plan, fb.act, L.ld_act, Ip_, lora->r_d, lv.Bt_d, const_cast<float*>(fb.q_d), nullptr);
    clock.mark("forward: LoRA h.B_d");
  }
  tasks = make_tasks(plan, Hp_ / kBlock, wq_ ? kRowChunkInt8 : kRowChunk,
                     aq_ ? kDownBlocksPerTaskInt8 : kDownBlocksPerTask);
  const QuantSource qact{fb.act, L.ld_act, Ip_, ScaleFold::kNone, nullptr};
  run_gemm_phase(eng, kt, L, plan, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng, wk);
    kt->down(L, fb, t, s);
  }, aq_ ? &qact : nullptr, &fb.qa, &fb.qs);
  clock.mark(aq_ ? "forward: quantize act + down GEMM" : "forward: down GEMM");
  sum_rows(pool, plan, fb.out_rows, y, H_, Hp_, wtype_, row_out_bytes() == 2);
  clock.mark("forward: sum rows");
  return handle;
}

SavedSlot& MoELayer::live_slot(uint64_t handle) {
  SavedSlot* slot = find_slot(handle);
  if (!slot)
    throw std::runtime_error(
        "the activations saved by this forward are gone: either backward already ran for it, or more than "
        "max_saved=" + std::to_string(slots_.size()) +
        " forwards with save_for_backward ran on this layer before its backward (raise max_saved)");
  return *slot;
}

std::pair<int, int> MoELayer::saved_lora_ranks(uint64_t handle) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  const SavedSlot& slot = live_slot(handle);
  return {slot.r_gu, slot.r_d};
}

std::pair<int, int> MoELayer::saved_shape(uint64_t handle) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  const SavedSlot& slot = live_slot(handle);
  return {slot.plan.T, slot.plan.k};
}

void MoELayer::backward(uint64_t handle, int T, int k, const void* dy, void* dx, float* dw, const LoraArgs* lora,
                        const LoraGrads* grads) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  SavedSlot* slot = &live_slot(handle);
  if (slot->plan.T != T || slot->plan.k != k)
    throw std::invalid_argument("backward got T=" + std::to_string(T) + ", k=" + std::to_string(k) +
                                " but the forward had T=" + std::to_string(slot->plan.T) +
                                ", k=" + std::to_string(slot->plan.k));
  const bool lo = lora && lora->on();
  const int saved_rgu = slot->r_gu, saved_rd = slot->r_d;
  if (lo != (saved_rgu > 0 || saved_rd > 0) || (lo && (lora->r_gu != saved_rgu || lora->r_d != saved_rd)))
    throw std::invalid_argument("backward got LoRA ranks (gate_up " + std::to_string(lo ? lora->r_gu : 0) + ", down " +
                                std::to_string(lo ? lora->r_d : 0) + ") but the forward ran with (" +
                                std::to_string(saved_rgu) + ", " + std::to_string(saved_rd) + ")");
  if (lo) {
    check_lora_args(*lora);
    if (!grads || (lora->r_gu > 0 && (!grads->A_gu || !grads->B_gu)) || (lora->r_d > 0 && (!grads->A_d || !grads->B_d)))
      throw std::invalid_argument("backward with LoRA needs gradient buffers for every targeted factor");
  }
  const RoutingPlan& plan = slot->plan;
  slot->handle = 0;  // consumed; buffers stay for the next forward
  if (plan.T == 0) {
    if (lo) {
      const size_t f = sizeof(float);
      if (lora->r_gu > 0) {
        std::memset(grads->A_gu, 0, size_t(lora->r_gu) * E_ * 2 * I_ * f);
        std::memset(grads->B_gu, 0, size_t(lora->r_gu) * E_ * H_ * f);
      }
      if (lora->r_d > 0) {
        std::memset(grads->A_d, 0, size_t(lora->r_d) * E_ * H_ * f);
        std::memset(grads->B_d, 0, size_t(lora->r_d) * E_ * I_ * f);
      }
    }
    return;
  }

  const size_t es = size_t(dtype_size(wtype_));
  const size_t rows = size_t(plan.rows);
  const int ipb = Ip_ / kBlock;
  PhaseClock clock(eng);
  ensure_scratch(eng, Hp_, Ip_, wtype_, wq_, aq_);
  BackwardBuffers bb{};
  bb.seg_start = plan.seg_start.data();
  bb.row_weight = plan.row_weight.data();
  const LayerView L = view(eng.kchunk);
  const bool gather_bf16 = !aq_ || lo;  // as in forward
  bb.dyg = gather_bf16 ? eng.xg.reserve(rows * L.ldx * es) : nullptr;
  bb.gate_in = slot->gate.get();
  bb.up_in = slot->up.get();
  bb.dw_part = static_cast<float*>(eng.dw_part.reserve(rows * ipb * sizeof(float)));
  bb.dgu = eng.act.reserve(rows * L.ld_dgu * es);
  bb.dx_rows = static_cast<float*>(eng.rows_f32.reserve(rows * Hp_ * row_out_bytes()));
  ThreadPool& pool = *eng.pool;
  const KernelTable* kt = &eng.kt->formats[int(format_)];
  if (gather_bf16) gather_rows(pool, plan, dy, const_cast<void*>(bb.dyg), H_, Hp_, L.ldx, es);
  clock.mark("backward: gather dy");
  LoraView lv{};
  const int rg = lo ? lora->r_gu : 0, rd = lo ? lora->r_d : 0;
  if (lo) {
    lv = repack_lora(eng, *lora, E_, H_, I_, Hp_, Ip_);
    bb.lora = &lv;
    bb.count = plan.count.data();
    bb.row_token = plan.row_token.data();
    bb.x = slot->x.get();
    bb.dy = dy;
    bb.u_gu = static_cast<const float*>(slot->u_gu.get());
    bb.q_d = static_cast<const float*>(slot->q_d.get());
    bb.dyA = static_cast<float*>(eng.l_dya.reserve(std::max<size_t>(1, rows * rd * sizeof(float))));
    bb.t_gu = static_cast<float*>(eng.l_tgu.reserve(std::max<size_t>(1, rows * rg * sizeof(float))));
    // Fused factor gradients (moe_tasks.inc, bwd_act) need all rows of an expert x block in one bwd_act task
    // (kWholeSegment), and 32-row groups (K not chunked); otherwise bwd_act keeps h and separate tasks sum
    // every factor gradient.
    bb.fuse_grads = eng.kchunk == 0;
    bb.h = rd > 0 && !bb.fuse_grads ? eng.l_h.reserve(rows * Ip_ * es) : nullptr;
    bb.gA_gu = grads->A_gu;
    bb.gB_gu = grads->B_gu;
    bb.gA_d = grads->A_d;
    bb.gB_d = grads->B_d;
    const size_t n = size_t(pool.size());
    eng.acc.resize(n);
    // [r][32] per lora_grad block, or a fused bwd_act task's [r_gu][64] + [r_d][32] sums per column block
    for (size_t wk = 0; wk < n; ++wk)
      eng.acc[wk].reserve(size_t(2 * rg + rd) * kBlock * kActBlocksPerTask * sizeof(float));
    clock.mark("backward: LoRA repack");
    if (rd > 0) run_proj(pool, kt, L, plan, bb.dyg, L.ldx, Hp_, rd, lv.At_d, const_cast<float*>(bb.dyA), nullptr);
    clock.mark("backward: LoRA dy.A_d");
  }
  std::vector<Task> tasks = make_tasks(plan, ipb, bb.fuse_grads ? kWholeSegment : kRowChunkBwd, kActBlocksPerTask);
  const QuantSource qdy{dy, H_, H_, ScaleFold::kDown, plan.row_token.data()};  // down's scales fold into dy
  run_gemm_phase(eng, kt, L, plan, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng, wk);
    kt->bwd_act(L, bb, t, s);
  }, aq_ ? &qdy : nullptr, &bb.qa, &bb.qs);
  clock.mark(aq_ ? "backward: quantize dy + dy.W_down + dSiLU-GLU + dw" : "backward: dy.W_down + dSiLU-GLU + dw");
  if (rg > 0) {
    run_proj(pool, kt, L, plan, bb.dgu, L.ld_dgu, 2 * Ip_, rg, lv.At_gu, const_cast<float*>(bb.t_gu), nullptr);
    clock.mark("backward: LoRA dz.A_gu");
  }
  tasks = make_tasks(plan, Hp_ / kBlock, kRowChunkBwd, aq_ ? kDxBlocksPerTaskInt8 : kDxBlocksPerTask);
  const QuantSource qdz{bb.dgu, L.ld_dgu, 2 * Ip_, ScaleFold::kGateUp, nullptr};  // gate's and up's scales fold into dz
  run_gemm_phase(eng, kt, L, plan, tasks, [&](const Task& t, int wk) {
    Scratch s = scratch_of(eng, wk);
    kt->bwd_input(L, bb, t, s);
  }, aq_ ? &qdz : nullptr, &bb.qa, &bb.qs);
  clock.mark(aq_ ? "backward: quantize dz + dz.W_gu (dx)" : "backward: dz.W_gu (dx)");
  if (lo) {  // factor gradients: one task per (factor, expert, 32 columns); big experts first
    std::vector<GradTask> gt;
    std::vector<int> order(static_cast<size_t>(E_));
    for (int e = 0; e < E_; ++e) order[size_t(e)] = e;
    std::stable_sort(order.begin(), order.end(),
                     [&](int a, int b) { return plan.count[size_t(a)] > plan.count[size_t(b)]; });
    int nb[4] = {2 * Ip_ / kBlock, Hp_ / kBlock, Hp_ / kBlock, Ip_ / kBlock};
    for (int& n : nb) n = (n + kGradBlocks - 1) / kGradBlocks;  // tasks cover kGradBlocks column blocks
    for (int e : order)
      for (int kind = 0; kind < 4; ++kind)
        if ((kind < 2 ? rg : rd) > 0)
          if (!bb.fuse_grads || kind == 1 || kind == 2 || plan.count[size_t(e)] == 0)  // empty experts: zeros
            for (int b = 0; b < nb[kind]; ++b) gt.push_back(GradTask{GradKind(kind), e, b});
    pool.run(int(gt.size()), [&](int i, int wk) {
      Scratch s = scratch_of(eng, wk);
      kt->lora_grad(L, bb, gt[size_t(i)], s);
    });
    clock.mark("backward: LoRA factor gradients");
  }
  sum_rows(pool, plan, bb.dx_rows, dx, H_, Hp_, wtype_, row_out_bytes() == 2);
  for (size_t i = 0; i < size_t(plan.T) * plan.k; ++i) {
    if (plan.row_of[i] < 0) {  // slot computed elsewhere: no gradient from here
      dw[i] = 0.f;
      continue;
    }
    const size_t row = size_t(plan.row_of[i]);
    const float* part = bb.dw_part + row * ipb;
    float s = 0.f;
    for (int b = 0; b < ipb; ++b) s += part[b];
    if (rd > 0) {  // <dy, s_d * q.A_d> = s_d * q . (dy.A_d^T)
      float l = 0.f;
      for (int rho = 0; rho < rd; ++rho) l += bb.q_d[row * rd + rho] * bb.dyA[row * rd + rho];
      s += lora->s_d * l;
    }
    dw[i] = s;
  }
  clock.mark("backward: sum rows + dw");
}

void set_profiling(bool on) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  eng.profiling = on;
  eng.profile.clear();
}

std::vector<std::pair<std::string, PhaseStat>> take_profile() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  std::vector<std::pair<std::string, PhaseStat>> out;
  out.swap(eng.profile);
  return out;
}

}  // namespace kt_sft

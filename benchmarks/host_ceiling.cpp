// NOTE (kt-sft benchmark: this host's ceilings; standalone, no engine, no torch; loaded by host_ceiling.py)
// What:      the compute ceiling of the engine's GEMM micro-kernels and the DRAM read bandwidth, measured in
//            the calling process with its threads, so bench_moe.py --shapes can say how close a layer runs to
//            what this host can do at all.
// Compute:   kernel-shaped loops with every operand in L1 (the instruction mix of the engine's inner loop, minus
//            its cache misses; benchmarks/amx_gemm_probe.cpp's ceil_L1 variants): AMX bf16 = the 2x2-tile block
//            (C tiles 0-3, A tiles 4-5, B tiles 6-7) reloading its 4 operand tiles each 32-k step before 4
//            tdpbf16ps, the A rows at the engine's padded stride (K + 32 elements: an odd number of cache lines);
//            AMX int8 = the same with tdpbssd (64 k per step); avx512 = the 12-row x 32-column
//            vdpbf16ps register block of csrc/kernels/avx512_microkernels.h (A pairs broadcast, 2 B rows per k
//            pair); avx2 = the 4-row x 16-column fp32 FMA block of isa_avx2.cpp (its bf16 widening left out).
//            FLOPs count 2 per multiply-add (int8: ops alike). Each thread runs its own block on its own data.
//            Operands hold random non-zero values, as the engine's do: on the device (2026-12-05) the AMX loop
//            on zeroed tiles (and A rows 64 bytes apart) ran 53-61 TF/s bf16, several times the 8-11 TF/s of
//            amx_gemm_probe's ceil_L1 on data, which made every layer look like < 20 % of its ceiling.
// Bandwidth: every thread reads its slice of one buffer (first touched by that thread) with 4 independent
//            accumulators; a pass lasts from the barrier to the last thread's end; best pass of several.
// ISA guard: each probe checks CPUID and the OS state (XCR0; AMX also the arch_prctl permission Linux hands
//            out on request, as csrc/cpu_features.cpp does) and returns -1 when this CPU cannot run it: the file
//            is compiled once with no target flags and each probe carries its own target attribute, so loading
//            it never executes an instruction the CPU lacks.
// Threads:   not pinned (the engine's pool is not pinned either).
#include <cpuid.h>
#include <immintrin.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

// ------------------------------------------------------------------ CPU checks (as csrc/cpu_features.cpp)
unsigned long long xcr0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

struct Cpu {
  bool avx2_fma = false, avx512_bf16 = false, amx = false;
};

Cpu detect() {
  Cpu c;
  unsigned a, b, cx, d;
  __cpuid_count(1, 0, a, b, cx, d);
  const bool fma = cx & (1u << 12), osxsave = cx & (1u << 27);
  if (!osxsave || __get_cpuid_max(0, nullptr) < 7) return c;
  const unsigned long long x = xcr0();
  const bool os_ymm = (x & 0x6) == 0x6, os_zmm = os_ymm && (x & 0xe0) == 0xe0;
  const bool os_amx = (x & (3ull << 17)) == (3ull << 17);
  __cpuid_count(7, 0, a, b, cx, d);
  const unsigned max_sub = a;
  const bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30);
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24), amx_int8 = d & (1u << 25);
  bool bf16 = false;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, cx, d);
    bf16 = a & (1u << 5);
  }
  c.avx2_fma = avx2 && fma && os_ymm;
  c.avx512_bf16 = c.avx2_fma && avx512f && avx512bw && bf16 && os_zmm;
  // Linux hands out the tile state only on request (ARCH_REQ_XCOMP_PERM = 0x1023, XTILEDATA = 18)
  c.amx = c.avx512_bf16 && amx_bf16 && amx_tile && amx_int8 && os_amx && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return c;
}

const Cpu& cpu() {
  static const Cpu c = detect();
  return c;
}

// ------------------------------------------------------------------ threads
// A spinning barrier: the threads of one probe start each timed pass together.
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void wait() {
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_acq_rel);
    } else {
      while (gen_.load(std::memory_order_acquire) == gen) _mm_pause();
    }
  }

 private:
  const int n_;
  std::atomic<int> count_{0}, gen_{0};
};

// Runs body(thread, pass) on `threads` threads for `passes` passes, each pass started together; returns the
// seconds of the fastest pass (barrier to the last thread's end). init(thread) runs once per thread first.
double best_pass(int threads, int passes, const std::function<void(int)>& init,
                 const std::function<void(int, int)>& body) {
  Barrier barrier(threads);
  std::vector<Clock::time_point> start(passes);
  std::vector<std::atomic<int64_t>> end_ns(passes);
  for (auto& e : end_ns) e.store(0);
  auto worker = [&](int t) {
    init(t);
    for (int p = 0; p < passes; ++p) {
      barrier.wait();
      if (t == 0) start[p] = Clock::now();
      body(t, p);
      const int64_t now = Clock::now().time_since_epoch().count();
      int64_t seen = end_ns[p].load();
      while (now > seen && !end_ns[p].compare_exchange_weak(seen, now)) {
      }
      barrier.wait();
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
  double best = 1e30;
  for (int p = 0; p < passes; ++p) {
    const Clock::time_point end{Clock::duration(end_ns[p].load())};
    best = std::min(best, std::chrono::duration<double>(end - start[p]).count());
  }
  return best;
}

// Fills an operand block with random small values: every 16-bit half is a bf16 in +-[2^-4, 2^-3) and every
// byte an int8 in [-64, 63] (the same bits read either way), so no sum overflows or goes denormal.
template <typename Ops>
Ops* fill_random(Ops* o) {
  uint16_t* h = reinterpret_cast<uint16_t*>(o);
  uint32_t x = 0x9e3779b9u;
  for (size_t i = 0; i < sizeof(Ops) / 2; ++i) {
    x = x * 1664525u + 1013904223u;                                   // LCG: cheap and deterministic
    h[i] = uint16_t(0x3d80u | ((x >> 16) & 0x7fu) | ((x >> 8) & 0x8000u));  // sign, exponent 2^-4, mantissa
  }
  return o;
}

// Operations per second of `kernel` (`ops_per_call` operations a call) on all threads, each thread on its own
// randomly filled, 64-byte aligned Ops (heap, not thread_local: a dlopen'ed library's TLS need not honour the alignment)
// after `setup` ran on that thread; the call count is sized from one timed call so a pass lasts about `seconds`.
template <typename Ops>
double rate(int threads, double seconds, double ops_per_call, void (*setup)(), void (*kernel)(Ops*)) {
  std::vector<Ops*> ops(threads);
  for (Ops*& o : ops) o = fill_random(static_cast<Ops*>(std::aligned_alloc(64, sizeof(Ops))));
  setup();
  kernel(ops[0]);
  const auto t0 = Clock::now();
  kernel(ops[0]);
  const double once = std::max(1e-7, std::chrono::duration<double>(Clock::now() - t0).count());
  const long calls = std::max(1L, long(seconds / once));
  const double s = best_pass(threads, 3, [&](int) { setup(); }, [&](int t, int) {
    for (long i = 0; i < calls; ++i) kernel(ops[t]);
  });
  for (Ops* o : ops) std::free(o);
  return double(calls) * ops_per_call * threads / s;
}

// ------------------------------------------------------------------ AMX (2x2 tiles, operands in L1)
constexpr int kAmxK = 2048;  // k per block: the block's C stays in tiles 0-3 across 64 bf16 / 32 int8 steps

struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

__attribute__((target("amx-tile"))) void amx_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  // GCC's _tile_loadconfig names only the first 8 bytes as its operand: without this barrier the stores to
  // rows / colsb are dead to the optimizer, and the first tile instruction faults (SIGILL) on unset tiles
  __asm__ volatile("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

// A rows kAmxRowBytes apart as the engine's gathered rows (common.h padded_row_stride: K + 32 bf16, 65 lines for
// K = 2048); only each row's first 64 bytes are read (the ceiling: every tile load hits L1).
constexpr int kAmxRowBytes = (kAmxK + 32) * 2;

struct alignas(64) AmxOperands {
  uint8_t a[32 * kAmxRowBytes], b0[16 * 64], b1[16 * 64];  // one k step: 32 A rows, 2 B tiles (64 bytes a row)
  float c[32 * 32];
};

__attribute__((target("amx-tile,amx-bf16"))) void amx_bf16_block(AmxOperands* op) {
  AmxOperands& o = *op;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int k = 0; k < kAmxK; k += 32) {
    _tile_loadd(4, o.a, kAmxRowBytes); _tile_loadd(5, o.a + 16 * kAmxRowBytes, kAmxRowBytes);
    _tile_loadd(6, o.b0, 64); _tile_loadd(7, o.b1, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, o.c, 128); _tile_stored(1, o.c + 16, 128);
  _tile_stored(2, o.c + 512, 128); _tile_stored(3, o.c + 528, 128);
}

__attribute__((target("amx-tile,amx-int8"))) void amx_int8_block(AmxOperands* op) {
  AmxOperands& o = *op;
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  for (int k = 0; k < kAmxK; k += 64) {
    _tile_loadd(4, o.a, kAmxRowBytes); _tile_loadd(5, o.a + 16 * kAmxRowBytes, kAmxRowBytes);
    _tile_loadd(6, o.b0, 64); _tile_loadd(7, o.b1, 64);
    _tile_dpbssd(0, 4, 6); _tile_dpbssd(1, 4, 7); _tile_dpbssd(2, 5, 6); _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, o.c, 128); _tile_stored(1, o.c + 16, 128);
  _tile_stored(2, o.c + 512, 128); _tile_stored(3, o.c + 528, 128);
}

// The calling thread gives its tile state back (the engine configures its own before each use).
__attribute__((target("amx-tile"))) void amx_release() { _tile_release(); }

// ------------------------------------------------------------------ avx512-bf16 (12 rows x 32 columns)
constexpr int kVecRows = 12, kVecPairs = 128;  // A 12 x 256 bf16 (6 KiB) + B 2 x 128 x 64 bytes (16 KiB): L1

struct alignas(64) VecOperands {
  uint32_t a[kVecRows][kVecPairs];      // bf16 (k, k+1) pairs of 12 rows
  uint32_t b[kVecPairs][2][16];         // per k pair: the 32 columns' pairs as two zmm rows
  float c[kVecRows][32];
};

__attribute__((target("avx512f,avx512bw,avx512bf16"))) void avx512_bf16_block(VecOperands* op) {
  VecOperands& o = *op;
  __m512 acc[kVecRows][2];
  for (int r = 0; r < kVecRows; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int kk = 0; kk < kVecPairs; ++kk) {
    const __m512bh b0 = (__m512bh)_mm512_load_si512(o.b[kk][0]);
    const __m512bh b1 = (__m512bh)_mm512_load_si512(o.b[kk][1]);
#pragma GCC unroll 12  // the accumulators stay in registers only when the row loop is unrolled
    for (int r = 0; r < kVecRows; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(int(o.a[r][kk]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
    }
  }
  for (int r = 0; r < kVecRows; ++r) {
    _mm512_store_ps(o.c[r], acc[r][0]);
    _mm512_store_ps(o.c[r] + 16, acc[r][1]);
  }
}

// ------------------------------------------------------------------ avx2 fp32 FMA (4 rows x 16 columns)
constexpr int kAvx2Rows = 4, kAvx2K = 512;  // A 4 x 512 fp32 (8 KiB) + B 512 x 16 fp32 (32 KiB): L1

struct alignas(64) Avx2Operands {
  float a[kAvx2Rows][kAvx2K], b[kAvx2K][16], c[kAvx2Rows][16];
};

__attribute__((target("avx2,fma"))) void avx2_fma_block(Avx2Operands* op) {
  Avx2Operands& o = *op;
  __m256 acc[kAvx2Rows][2];
  for (int r = 0; r < kAvx2Rows; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int k = 0; k < kAvx2K; ++k) {
    const __m256 b0 = _mm256_load_ps(o.b[k]), b1 = _mm256_load_ps(o.b[k] + 8);
#pragma GCC unroll 4
    for (int r = 0; r < kAvx2Rows; ++r) {
      const __m256 a = _mm256_broadcast_ss(&o.a[r][k]);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
  }
  for (int r = 0; r < kAvx2Rows; ++r) {
    _mm256_store_ps(o.c[r], acc[r][0]);
    _mm256_store_ps(o.c[r] + 8, acc[r][1]);
  }
}

// ------------------------------------------------------------------ read bandwidth
__attribute__((target("avx2"))) uint64_t read_slice_avx2(const uint8_t* p, size_t bytes) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i + 128 <= bytes; i += 128) {
    s0 = _mm256_add_epi64(s0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i)));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 32)));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 64)));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + i + 96)));
  }
  const __m256i s = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  return uint64_t(_mm256_extract_epi64(s, 0) + _mm256_extract_epi64(s, 1) + _mm256_extract_epi64(s, 2) +
                  _mm256_extract_epi64(s, 3));
}

uint64_t read_slice_plain(const uint8_t* p, size_t bytes) {
  const uint64_t* q = reinterpret_cast<const uint64_t*>(p);
  uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 4 <= bytes / 8; i += 4) s0 += q[i], s1 += q[i + 1], s2 += q[i + 2], s3 += q[i + 3];
  return s0 + s1 + s2 + s3;
}

void no_setup() {}

}  // namespace

extern "C" {

// TFLOPS of each ceiling loop on `threads` threads, passes of about `seconds`; -1 where this CPU lacks the ISA.
double hc_amx_bf16_tflops(int threads, double seconds) {
  if (!cpu().amx) return -1;
  const double r = rate(threads, seconds, 2.0 * 32 * 32 * kAmxK, amx_config, amx_bf16_block);
  amx_release();
  return r / 1e12;
}

double hc_amx_int8_tflops(int threads, double seconds) {
  if (!cpu().amx) return -1;
  const double r = rate(threads, seconds, 2.0 * 32 * 32 * kAmxK, amx_config, amx_int8_block);
  amx_release();
  return r / 1e12;
}

double hc_avx512_bf16_tflops(int threads, double seconds) {
  if (!cpu().avx512_bf16) return -1;
  return rate(threads, seconds, 2.0 * kVecRows * 32 * 2 * kVecPairs, no_setup, avx512_bf16_block) / 1e12;
}

double hc_avx2_fma_tflops(int threads, double seconds) {
  if (!cpu().avx2_fma) return -1;
  return rate(threads, seconds, 2.0 * kAvx2Rows * 16 * kAvx2K, no_setup, avx2_fma_block) / 1e12;
}

// GB/s of all threads reading one `bytes` buffer (each thread its slice, first touched by itself), best of
// `passes`; -1 when the buffer cannot be allocated.
double hc_read_gbs(int threads, double bytes, int passes) {
  const size_t slice = (size_t(bytes) / threads) & ~size_t(4095);
  if (slice == 0) return -1;
  void* mem = nullptr;
  if (posix_memalign(&mem, 1 << 21, slice * threads) != 0) return -1;
  madvise(mem, slice * threads, MADV_HUGEPAGE);  // DRAM, not page walks (a hint; ignored where unsupported)
  uint8_t* buf = static_cast<uint8_t*>(mem);
  const bool avx2 = cpu().avx2_fma;
  std::vector<uint64_t> sink(size_t(threads) * 8);  // one cache line per thread: the sums stay live
  const double s = best_pass(
      threads, passes, [&](int t) { std::memset(buf + size_t(t) * slice, t + 1, slice); },
      [&](int t, int) {
        const uint8_t* p = buf + size_t(t) * slice;
        sink[size_t(t) * 8] += avx2 ? read_slice_avx2(p, slice) : read_slice_plain(p, slice);
      });
  free(mem);
  return double(slice) * threads / s / 1e9;
}

}  // extern "C"

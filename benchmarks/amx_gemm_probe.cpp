// NOTE (kt-sft benchmark: AMX GEMM schedule probe; standalone, no engine, no torch)
// What:      the forward gate_up and down GEMMs of a DeepSeek-V2-Lite MoE layer (64 experts, 384 routed rows
//            each = 4096 tokens x top-6, H=2048, I=1408) with the engine's task schedule (per task: 1 or 2
//            32-column blocks x 256 rows, each 32-row block a 2x2-tile kernel over all of K), the operand
//            layouts varied; all variants interleaved round by round in one process, medians, ratio to `base`.
// Layout:    A = gathered rows [rows][lda] bf16 (lda = K, or K + 32 so a tile's rows fall in distinct L1
//            sets: "pad"), or tile-major ("tileA": [32-row block][k step][32 rows x 64 bytes]); B = the
//            engine's panels (16 columns x K as (k, k+1) pairs, 64 bytes per pair row).
// Variants:  base, pad, pfAB1 (pad + prefetcht0 of the next k step's A rows and B slices), nopad_pfAB1,
//            tileA, tileA_pf1, and two ceilings of the same instruction mix: ceil_L1 (every step reloads the
//            first step's tiles: all loads hit L1) and ceil_reg (no loads in the loop: tdpbf16ps alone).
//            pad_il / pad_pipe and their ceil_L1_ twins: the same step in other instruction orders (mk_order).
//            int8 / int8_L1: the same schedule with int8 A rows and (k..k+3)-quad int8 panels (tdpbssd, 64 k
//            per step); TFLOPS counts its multiply-adds like the bf16 ones. int8_pf1, int8_tileA, int8_tileA_pf1:
//            its A lines prefetched a step ahead, or A tile-major (mk_i8's TILED / PF). Every bf16 variant must write the
//            baseline's bits, and one int8 block must equal plain int32 sums over the quad layout (both checked,
//            the latter added after the last device run: it prints "int8 quad layout checked").
// Findings:  BENCHMARKS.md ("AMX GEMM ceiling"). The engine itself is A/B-tested with bench_moe.py --against.
// Build/run: g++ -O2 -std=c++17 -mavx512f -mavx512bf16 -mamx-tile -mamx-bf16 -mamx-int8 -pthread
//              benchmarks/amx_gemm_probe.cpp -o /tmp/probe && /tmp/probe [threads] [rounds]
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

namespace {

constexpr int kPanel = 16, kBlock = 32;

struct alignas(64) TileConfig {
  uint8_t palette_id, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
void tile_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// The 2x2 block's pieces: C tiles 0-3 (rows 0-15 / 16-31 x columns 0-15 / 16-31), A tiles 4-5, B tiles 6-7.
inline void zero_c() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}
template <typename T>
inline void store_c(T* C) {  // float or int32 accumulators, 32 per row
  _tile_stored(0, C, kBlock * 4);
  _tile_stored(1, C + kPanel, kBlock * 4);
  _tile_stored(2, C + 16 * kBlock, kBlock * 4);
  _tile_stored(3, C + 16 * kBlock + kPanel, kBlock * 4);
}
inline void dp_2x2() {
  _tile_dpbf16ps(0, 4, 6);
  _tile_dpbf16ps(1, 4, 7);
  _tile_dpbf16ps(2, 5, 6);
  _tile_dpbf16ps(3, 5, 7);
}

struct Variant {
  std::string name;
  bool pad;
  int pf_dist;   // k-steps ahead, 0 = none
  bool pf_a, pf_b;
  bool tiled = false;          // A stored as tiles: [32-row block][k step][32 rows x 64 bytes], loads 64 B apart
  int ceiling = 0;             // 1: every k step reloads the first step's tiles (L1 hits); 2: no loads in the loop
  int order = 0;               // 1 / 2: mk_order's interleaved / pipelined step (ceiling 1: L1 only)
  int int8 = 0;                // 1: int8 A rows x int8 panels in (k..k+3) quads, tdpbssd, int32 -> scaled bf16;
                               // 2: its L1 ceiling (as ceiling 1)
};

// C[32][32] (int32) = A[32][K] (int8, lda bytes apart) x quad panels B0 | B1 (K/4 rows of 16 columns x 4 k).
// L1ONLY: every step reloads the first step's tiles. TILED: A tile-major ([32-row block][64-k step][32 rows x 64
// bytes], 2 KiB contiguous per step: two streams of A instead of 32; lda unused). PF: prefetcht0 of the next
// step's A lines and B slices.
template <bool L1ONLY, bool TILED = false, bool PF = false>
inline void mk_i8(const int8_t* A, size_t lda, const int8_t* B0, const int8_t* B1, int K, int32_t* C) {
  zero_c();
  for (int k0 = 0; k0 < K; k0 += 64) {
    const int k = L1ONLY ? 0 : k0;
    if (PF && k0 + 64 < K) {
      const int kp = k0 + 64;
      if (TILED)
        for (int l = 0; l < 32; ++l) _mm_prefetch(reinterpret_cast<const char*>(A + size_t(kp) * 32) + 64 * l, _MM_HINT_T0);
      else
        for (int r = 0; r < 32; ++r) _mm_prefetch(reinterpret_cast<const char*>(A + r * lda + kp), _MM_HINT_T0);
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(B0 + size_t(kp) * 16) + 64 * l, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(B1 + size_t(kp) * 16) + 64 * l, _MM_HINT_T0);
      }
    }
    if (TILED) {
      _tile_loadd(4, A + size_t(k) * 32, 64);
      _tile_loadd(5, A + size_t(k) * 32 + 1024, 64);
    } else {
      _tile_loadd(4, A + k, lda);
      _tile_loadd(5, A + 16 * lda + k, lda);
    }
    _tile_loadd(6, B0 + size_t(k) * 16, 64);
    _tile_loadd(7, B1 + size_t(k) * 16, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  store_c(C);
}

// Ceilings of the 2x2 schedule (wrong results, same instruction mix): loads that always hit L1, or none at all.
template <int KIND>
inline void mk_ceiling(const uint16_t* A, size_t lda, const uint16_t* B0, const uint16_t* B1, int K, float* C) {
  zero_c();
  const size_t sa = lda * 2;
  _tile_loadd(4, A, sa);
  _tile_loadd(5, A + 16 * lda, sa);
  _tile_loadd(6, B0, 64);
  _tile_loadd(7, B1, 64);
  for (int k0 = 0; k0 < K; k0 += 32) {
    if (KIND == 1) {
      _tile_loadd(4, A, sa);
      _tile_loadd(5, A + 16 * lda, sa);
      _tile_loadd(6, B0, 64);
      _tile_loadd(7, B1, 64);
    }
    dp_2x2();
  }
  store_c(C);
}

// Instruction orders of the same 2x2 step (tile registers are not renamed, so a load into a tile waits until
// the last tdpbf16ps reading it has read it): ORDER 1 interleaves each load just before its first use
// (A0 B0 d00 B1 d01 A1 d10 d11); ORDER 2 software-pipelines, loading the next step's tile right after the last
// use of the current one (d00 d01 A0' d10 B0' d11 A1' B1'). L1ONLY: every step reloads the first step's tiles.
template <int ORDER, bool L1ONLY>
inline void mk_order(const uint16_t* A, size_t lda, const uint16_t* B0, const uint16_t* B1, int K, float* C) {
  const size_t sa = lda * 2;
  const uint16_t* A1 = A + 16 * lda;
  zero_c();
  if (ORDER == 1) {
    for (int k0 = 0; k0 < K; k0 += 32) {
      const int k = L1ONLY ? 0 : k0;
      _tile_loadd(4, A + k, sa);
      _tile_loadd(6, B0 + size_t(k) * kPanel, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_loadd(7, B1 + size_t(k) * kPanel, 64);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(5, A1 + k, sa);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  } else {
    _tile_loadd(4, A, sa);
    _tile_loadd(6, B0, 64);
    _tile_loadd(7, B1, 64);
    _tile_loadd(5, A1, sa);
    for (int k0 = 0; k0 < K; k0 += 32) {
      const int kn = L1ONLY ? 0 : std::min(k0 + 32, K - 32);  // the last step reloads itself (harmless)
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_loadd(4, A + kn, sa);
      _tile_dpbf16ps(2, 5, 6);
      _tile_loadd(6, B0 + size_t(kn) * kPanel, 64);
      _tile_dpbf16ps(3, 5, 7);
      _tile_loadd(5, A1 + kn, sa);
      _tile_loadd(7, B1 + size_t(kn) * kPanel, 64);
    }
  }
  store_c(C);
}

// A in tile layout: rows of a 32-row block, per 32-k step, 2 KiB contiguous (16-row tiles of 1 KiB each).
template <bool PF>
inline void mk_tiled(const uint16_t* A, const uint16_t* B0, const uint16_t* B1, int K, float* C) {
  zero_c();
  for (int k0 = 0; k0 < K; k0 += 32) {
    const uint16_t* a = A + size_t(k0) * 32;  // 32 rows x 32 k per step
    if (PF && k0 + 32 < K) {
      for (int l = 0; l < 32; ++l) _mm_prefetch(reinterpret_cast<const char*>(a + 32 * 32) + 64 * l, _MM_HINT_T0);
      for (int l = 0; l < 16; ++l) {
        _mm_prefetch(reinterpret_cast<const char*>(B0 + size_t(k0 + 32) * kPanel) + 64 * l, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(B1 + size_t(k0 + 32) * kPanel) + 64 * l, _MM_HINT_T0);
      }
    }
    _tile_loadd(4, a, 64);
    _tile_loadd(5, a + 16 * 32, 64);
    _tile_loadd(6, B0 + size_t(k0) * kPanel, 64);
    _tile_loadd(7, B1 + size_t(k0) * kPanel, 64);
    dp_2x2();
  }
  store_c(C);
}

// C[32][32] = A[32][K] x (B0 | B1), the engine's 2x2-tile micro-kernel, with optional L1 prefetch.
template <bool PA, bool PB>
inline void mk(const uint16_t* A, size_t lda, const uint16_t* B0, const uint16_t* B1, int K, float* C, int dist) {
  const size_t sa = lda * 2;
  zero_c();
  for (int k0 = 0; k0 < K; k0 += 32) {
    if (PA || PB) {
      const int kp = k0 + dist * 32;
      if (kp < K) {
        if (PA)
          for (int r = 0; r < 32; ++r) _mm_prefetch(reinterpret_cast<const char*>(A + r * lda + kp), _MM_HINT_T0);
        if (PB)
          for (int l = 0; l < 16; ++l) {
            _mm_prefetch(reinterpret_cast<const char*>(B0 + size_t(kp) * kPanel) + 64 * l, _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(B1 + size_t(kp) * kPanel) + 64 * l, _MM_HINT_T0);
          }
      }
    }
    _tile_loadd(4, A + k0, sa);
    _tile_loadd(5, A + 16 * lda + k0, sa);
    _tile_loadd(6, B0 + size_t(k0) * kPanel, 64);
    _tile_loadd(7, B1 + size_t(k0) * kPanel, 64);
    dp_2x2();
  }
  store_c(C);
}

using MkFn = void (*)(const uint16_t*, size_t, const uint16_t*, const uint16_t*, int, float*, int);
MkFn pick(const Variant& v) {
  if (v.pf_dist == 0) return mk<false, false>;
  if (v.pf_a && v.pf_b) return mk<true, true>;
  return v.pf_a ? mk<true, false> : mk<false, true>;
}

struct Problem {
  const char* name;
  int E, M, K, N;  // experts, rows per expert, reduction, output columns
  int blocks_per_task;
};

struct Data {
  std::vector<uint16_t> a_plain, a_pad, a_tiled, w;
  std::vector<int8_t> a_i8;  // [rows][K + 64]
  std::vector<int8_t> a_i8_tiled;  // [32-row block][K / 64][32 rows x 64]
  std::vector<uint16_t> out;  // [E*M][N] bf16
};

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

Data make_data(const Problem& p) {
  Data d;
  const size_t rows = size_t(p.E) * p.M;
  d.a_plain.resize(rows * p.K);
  d.a_pad.resize(rows * (p.K + 32));
  d.a_tiled.resize(rows * p.K);
  d.a_i8.resize(rows * (p.K + 64));
  d.w.resize(size_t(p.E) * p.N * p.K);
  d.out.resize(rows * p.N);
  uint32_t s = 12345;
  auto rnd = [&]() { s = s * 1664525u + 1013904223u; return float(int(s >> 9) - (1 << 22)) / float(1 << 24); };
  for (size_t r = 0; r < rows; ++r)
    for (int k = 0; k < p.K; ++k) {
      const uint16_t v = to_bf16(rnd());
      d.a_plain[r * p.K + k] = v;
      d.a_pad[r * (p.K + 32) + k] = v;
    }
  for (size_t r = 0; r < rows; ++r)  // rows is a multiple of 32 here
    for (int k = 0; k < p.K; ++k)
      d.a_tiled[(r / 32) * 32 * p.K + size_t(k / 32) * 1024 + (r % 32) * 32 + k % 32] = d.a_plain[r * p.K + k];
  for (auto& x : d.w) x = to_bf16(rnd() * 0.05f);
  for (auto& x : d.a_i8) x = int8_t(int(rnd() * 200));
  d.a_i8_tiled.resize(rows * p.K);
  for (size_t r = 0; r < rows; ++r)
    for (int k = 0; k < p.K; ++k)
      d.a_i8_tiled[(r / 32) * 32 * p.K + size_t(k / 64) * 2048 + (r % 32) * 64 + k % 64] = d.a_i8[r * (p.K + 64) + k];
  return d;
}

// The engine's pool shape: n-1 workers plus the calling thread (no core is oversubscribed).
struct Pool {
  int n;
  std::vector<std::thread> th;
  std::atomic<int> gen{0}, done{0}, next{0};
  std::atomic<bool> stop{false};
  int ntasks = 0;
  std::function<void(int, int)>* job = nullptr;
  explicit Pool(int n_) : n(n_) {
    for (int w = 1; w < n; ++w)
      th.emplace_back([this, w] {
        syscall(SYS_arch_prctl, 0x1023, 18);  // ARCH_REQ_XCOMP_PERM, XTILEDATA
        tile_config();
        int seen = 0;
        while (true) {
          while (gen.load(std::memory_order_acquire) == seen) {
            if (stop.load()) return;
            _mm_pause();
          }
          seen = gen.load();
          for (int i; (i = next.fetch_add(1)) < ntasks;) (*job)(i, w);
          done.fetch_add(1);
        }
      });
  }
  void run(int tasks, std::function<void(int, int)> f) {
    job = &f;
    ntasks = tasks;
    next = 0;
    done = 0;
    gen.fetch_add(1, std::memory_order_release);
    tile_config();
    for (int i; (i = next.fetch_add(1)) < ntasks;) f(i, 0);
    while (done.load() < n - 1) _mm_pause();
  }
  ~Pool() {
    stop = true;
    for (auto& t : th) t.join();
  }
};

double run_variant(Pool& pool, const Problem& p, Data& d, const Variant& v) {
  const int lda = v.pad ? p.K + 32 : p.K;
  const uint16_t* A = v.pad ? d.a_pad.data() : d.a_plain.data();
  const int nb = p.N / kBlock, tpb = p.blocks_per_task;
  const int row_chunk = 256, chunks = (p.M + row_chunk - 1) / row_chunk;
  const int ntask = p.E * (nb / tpb) * chunks;
  MkFn f = pick(v);
  static thread_local float C[32 * 32];
  auto t0 = std::chrono::steady_clock::now();
  pool.run(ntask, [&](int i, int) {
    const int e = i / ((nb / tpb) * chunks), rest = i % ((nb / tpb) * chunks);
    const int bg = rest / chunks, ch = rest % chunks;
    const int r0 = ch * row_chunk, r1 = std::min(p.M, r0 + row_chunk);
    for (int m0 = r0; m0 < r1; m0 += 32)
      for (int j = 0; j < tpb; ++j) {
        const int b = bg * tpb + j;
        const uint16_t* B0 = d.w.data() + (size_t(e) * p.N + size_t(2 * b) * kPanel) * p.K;
        const size_t row = size_t(e) * p.M + m0;
        if (v.int8) {
          static thread_local int32_t Ci[32 * 32];
          const int8_t* W8 = reinterpret_cast<const int8_t*>(d.w.data()) + (size_t(e) * p.N + size_t(2 * b) * kPanel) * p.K;
          const int8_t* A8 = d.a_i8.data() + row * (p.K + 64);
          const int8_t* W1 = W8 + size_t(p.K) * kPanel;
          const int8_t* T8 = d.a_i8_tiled.data() + row * p.K;
          if (v.int8 == 1) mk_i8<false>(A8, p.K + 64, W8, W1, p.K, Ci);
          else if (v.int8 == 2) mk_i8<true>(A8, p.K + 64, W8, W1, p.K, Ci);
          else if (v.int8 == 3) mk_i8<false, false, true>(A8, p.K + 64, W8, W1, p.K, Ci);
          else if (v.int8 == 4) mk_i8<false, true, false>(T8, 0, W8, W1, p.K, Ci);
          else mk_i8<false, true, true>(T8, 0, W8, W1, p.K, Ci);
          for (int m = 0; m < 32 * 32; m += 16)  // int32 -> float x (row scale x column scale), as an engine would
            _mm512_storeu_ps(C + m, _mm512_mul_ps(_mm512_maskz_cvtepi32_ps(0xffff, _mm512_loadu_si512(Ci + m)), _mm512_set1_ps(1e-3f)));
        } else if (v.order) {
          const uint16_t* b1 = B0 + size_t(p.K) * kPanel;
          if (v.order == 1) (v.ceiling ? mk_order<1, true> : mk_order<1, false>)(A + row * lda, lda, B0, b1, p.K, C);
          else (v.ceiling ? mk_order<2, true> : mk_order<2, false>)(A + row * lda, lda, B0, b1, p.K, C);
        } else if (v.ceiling) {
          if (v.ceiling == 1) mk_ceiling<1>(A + row * lda, lda, B0, B0 + size_t(p.K) * kPanel, p.K, C);
          else mk_ceiling<2>(A + row * lda, lda, B0, B0 + size_t(p.K) * kPanel, p.K, C);
        } else if (v.tiled) {
          const uint16_t* At = d.a_tiled.data() + row * p.K;
          if (v.pf_dist) mk_tiled<true>(At, B0, B0 + size_t(p.K) * kPanel, p.K, C);
          else mk_tiled<false>(At, B0, B0 + size_t(p.K) * kPanel, p.K, C);
        } else {
          f(A + row * lda, lda, B0, B0 + size_t(p.K) * kPanel, p.K, C, v.pf_dist);
        }
        for (int m = 0; m < std::min(32, r1 - m0); ++m) {  // the engine's epilogue cost: 32 values per row, vectorised
          const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(C + m * 32 + 16), _mm512_loadu_ps(C + m * 32));
          _mm512_storeu_si512(d.out.data() + (row + m) * p.N + b * 32, (__m512i)h);
        }
      }
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * p.E * p.M * double(p.K) * p.N / s / 1e12;
}

}  // namespace

// The int8 layout an engine would use, checked once: tdpbssd over (k..k+3) quads must give the plain int32 sums
// C[m][c] = sum_k A[m][k] * W(c, k), with W(c, k) at panel (c / 16), quad row k / 4, byte (c % 16) * 4 + k % 4.
bool int8_layout_holds(const Problem& p, const Data& d) {
  alignas(64) static int32_t C[32 * 32];
  const int8_t* W8 = reinterpret_cast<const int8_t*>(d.w.data());  // expert 0, column block 0
  const size_t lda = p.K + 64;
  tile_config();
  mk_i8<false>(d.a_i8.data(), lda, W8, W8 + size_t(p.K) * kPanel, p.K, C);
  for (int m = 0; m < 32; ++m)
    for (int c = 0; c < 32; ++c) {
      const int8_t* panel = W8 + size_t(c / kPanel) * p.K * kPanel;
      int32_t want = 0;
      for (int k = 0; k < p.K; ++k)
        want += int32_t(d.a_i8[m * lda + k]) * int32_t(panel[size_t(k / 4) * 64 + (c % kPanel) * 4 + k % 4]);
      if (C[m * 32 + c] != want) return false;
    }
  return true;
}

int main(int argc, char** argv) {
  const int threads = argc > 1 ? std::atoi(argv[1]) : int(std::thread::hardware_concurrency());
  const int rounds = argc > 2 ? std::atoi(argv[2]) : 7;
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) {
    std::printf("no AMX permission\n");
    return 1;
  }
  std::vector<Variant> vs = {{"base", false, 0, false, false}, {"pad", true, 0, false, false},
                             {"pfAB1", true, 1, true, true}, {"nopad_pfAB1", false, 1, true, true}};
  vs.push_back({"tileA", false, 0, false, false});
  vs.back().tiled = true;
  vs.push_back({"tileA_pf1", false, 1, false, false});
  vs.back().tiled = true;
  vs.push_back({"ceil_L1", true, 0, false, false});
  vs.back().ceiling = 1;
  vs.push_back({"ceil_reg", true, 0, false, false});
  vs.back().ceiling = 2;
  for (int o = 1; o <= 2; ++o) {
    vs.push_back({o == 1 ? "pad_il" : "pad_pipe", true, 0, false, false});
    vs.back().order = o;
    vs.push_back({o == 1 ? "ceil_L1_il" : "ceil_L1_pipe", true, 0, false, false});
    vs.back().order = o;
    vs.back().ceiling = 1;
  }
  vs.push_back({"int8", true, 0, false, false});
  vs.back().int8 = 1;
  vs.push_back({"int8_L1", true, 0, false, false});
  vs.back().int8 = 2;
  const char* i8names[] = {"int8_pf1", "int8_tileA", "int8_tileA_pf1"};
  for (int k = 0; k < 3; ++k) {
    vs.push_back({i8names[k], true, 0, false, false});
    vs.back().int8 = 3 + k;
  }
  Pool pool(threads);
  const Problem probs[] = {{"gate_up", 64, 384, 2048, 2816, 2}, {"down", 64, 384, 1408, 2048, 1}};
  for (const Problem& p : probs) {
    Data d = make_data(p);
    std::printf("%s: int8 quad layout %s\n", p.name, int8_layout_holds(p, d) ? "checked" : "WRONG");
    std::vector<std::vector<double>> tf(vs.size());
    uint64_t want = 0, want8 = 0;  // every variant must write the baseline's bits (same sums in the same order)
    for (size_t i = 0; i < vs.size(); ++i) {  // warm-up: first touch
      std::fill(d.out.begin(), d.out.end(), uint16_t(0));
      run_variant(pool, p, d, vs[i]);
      uint64_t h = 1469598103934665603ull;
      for (uint16_t x : d.out) h = (h ^ x) * 1099511628211ull;
      if (i == 0) want = h;
      if (vs[i].int8 == 1) want8 = h;
      if (vs[i].int8 > 2 && h != want8) std::printf("  %s: OUTPUT DIFFERS from int8\n", vs[i].name.c_str());
      if (h != want && !vs[i].ceiling && !vs[i].int8) std::printf("  %s: OUTPUT DIFFERS from base\n", vs[i].name.c_str());
    }
    for (int r = 0; r < rounds; ++r)
      for (size_t i = 0; i < vs.size(); ++i) tf[i].push_back(run_variant(pool, p, d, vs[i]));
    auto med = [](std::vector<double> x) { std::sort(x.begin(), x.end()); return x[x.size() / 2]; };
    const double b = med(tf[0]);
    std::printf("%s (E=%d M=%d K=%d N=%d, %d threads, %d rounds, medians)\n", p.name, p.E, p.M, p.K, p.N, threads,
                rounds);
    for (size_t i = 0; i < vs.size(); ++i)
      std::printf("  %-12s %6.2f TFLOPS  %.3fx base\n", vs[i].name.c_str(), med(tf[i]), med(tf[i]) / b);
  }
  return 0;
}

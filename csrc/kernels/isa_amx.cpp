// NOTE (kt-sft engine, AMX-BF16 / AMX-INT8 path: Sapphire Rapids and later)
// Layout:    tiles 0-3 = C (2x2 blocks of 16 rows x 16 fp32), 4-5 = A (16 rows x 32 bf16 each, rows 0-15 and
//            16-31 of the block), 6-7 = B (16 k-pair rows x 16 columns x 2 = one 1 KiB slice of a panel, so a
//            B tile is 16 consecutive panel rows and loads with a 64-byte stride).
// Algorithm: per 32-k step: 2 A loads, 2 B loads, 4 tdpbf16ps; a 32x32 fp32 block leaves through the
//            scratch C buffer. Ceiling (benchmarks/amx_gemm_probe.cpp, 16 threads): this 2x2 schedule with
//            every tile load hitting L1 runs at 9.1-9.5 TFLOPS against 20.6 with no loads at all, so the tile
//            loads (one per tdpbf16ps, the fewest 8 tiles allow) bound it, not the cache level they come from:
//            software prefetch and other blockings measured no gain in the engine. Blocks of 4 rows or
//            fewer (decode) and F32 layers use the AVX512 kernels, which are bandwidth-bound there anyway.
// Invariants: row segments are padded to 32 rows and K to 32, so the 16-row tile loads never leave the
//            buffers (rows beyond M are computed and discarded). Tile configuration is thread state and
//            other libraries (oneDNN) may change it, so every task loads ours first. The kernel process must
//            hold the XTILEDATA permission (cpu_features.cpp asks the kernel for it before selecting amx).
//            GCC's tile intrinsics are asm statements that declare no memory operands (tileloadd, tilestored) or
//            only the first 8 bytes of the configuration (_tile_loadconfig), so the compiler may move plain loads
//            and stores across them, or drop the configuration's stores as dead: every kernel is fenced with
//            compiler barriers on both sides, and the configuration is loaded by our own asm that reads all of it.
//            The unit is also built with AVX512-VBMI (avx512_int4.h's lookups): every AMX CPU has it, and amx is
//            selected only where CPUID reports it.
#include <immintrin.h>
#include "../kernel_api.h"

namespace kt_sft {
namespace {

#define KT_ISA_NAME "amx"
#include "avx512_microkernels.h"

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

static inline void task_begin() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  // the whole configuration as the asm's input (see the note: _tile_loadconfig declares 8 bytes of it); volatile
  // asm statements keep their order, so every later tile instruction runs after it
  __asm__ __volatile__("ldtilecfg %0" ::"m"(cfg));
}

// After a kernel's tile stores: the C they wrote is visible to the plain loads that follow.
static inline void tiles_stored() { __asm__ __volatile__("" ::: "memory"); }

// accumulate: C += A x B (the C tiles start from the stored fp32 values: K chunks, moe_tasks.inc).
static void mk(const uint16_t* A, size_t lda, int M, const uint16_t* B0, const uint16_t* B1, int Kp, float* C,
               bool accumulate = false) {
  if (M <= 4) {
    mk_avx512(A, lda, M, B0, B1, Kp, C, accumulate);
    return;
  }
  // tileloadd's inline asm declares no memory input: make the caller's plain stores to A, B (packed scratch)
  // and C visible before the first tile load.
  __asm__ __volatile__("" ::: "memory");
  const size_t sa = lda * sizeof(uint16_t);
  constexpr size_t sc = kBlock * sizeof(float);
  if (accumulate) {
    _tile_loadd(0, C, sc);
    _tile_loadd(1, C + kPanel, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
  }
  if (M <= 16) {
    for (int k0 = 0; k0 < Kp; k0 += 32) {
      _tile_loadd(4, A + k0, sa);
      _tile_loadd(6, B0 + size_t(k0) * kPanel, 64);
      _tile_loadd(7, B1 + size_t(k0) * kPanel, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
    }
    _tile_stored(0, C, kBlock * sizeof(float));
    _tile_stored(1, C + kPanel, kBlock * sizeof(float));
    tiles_stored();
    return;
  }
  if (accumulate) {
    _tile_loadd(2, C + 16 * kBlock, sc);
    _tile_loadd(3, C + 16 * kBlock + kPanel, sc);
  } else {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int k0 = 0; k0 < Kp; k0 += 32) {
    _tile_loadd(4, A + k0, sa);
    _tile_loadd(5, A + 16 * lda + k0, sa);
    _tile_loadd(6, B0 + size_t(k0) * kPanel, 64);
    _tile_loadd(7, B1 + size_t(k0) * kPanel, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, C, kBlock * sizeof(float));
  _tile_stored(1, C + kPanel, kBlock * sizeof(float));
  _tile_stored(2, C + 16 * kBlock, kBlock * sizeof(float));
  _tile_stored(3, C + 16 * kBlock + kPanel, kBlock * sizeof(float));
  tiles_stored();
}

// INT8 GEMMs: C (int32) (+)= A x B over quad panels of Kp rows, the same 2x2 tile schedule per 64-k step with
// tdpbssd (rows past M read the other rows of the quantized buffer and are discarded); accumulate: the C tiles
// start from the stored sums (K chunks). A Kp that is not a multiple of 64 ends with 32 k: that step's B slices
// (512 bytes each) go through a zero-padded copy, and A holds zeros there. Exact int32 sums, so the plain loop of
// moe_int8_gemm.inc agrees.
static void mk_i8_amx(const int8_t* A, size_t lda, int M, const int8_t* B0, const int8_t* B1, int Kp, int32_t* C,
                      bool accumulate) {
  __asm__ __volatile__("" ::: "memory");  // see mk
  constexpr size_t sc = kBlock * sizeof(int32_t);
  const int Kf = Kp & ~63;
  alignas(64) int8_t tail[2][1024];
  if (Kf < Kp) {
    for (int p = 0; p < 2; ++p) {
      std::memcpy(tail[p], (p ? B1 : B0) + size_t(Kf) * kPanel, 512);
      std::memset(tail[p] + 512, 0, 512);
    }
    __asm__ __volatile__("" ::: "memory");
  }
  const int steps = (Kp + 63) / 64;
  if (accumulate) {
    _tile_loadd(0, C, sc);
    _tile_loadd(1, C + kPanel, sc);
  } else {
    _tile_zero(0);
    _tile_zero(1);
  }
  if (M <= 16) {
    for (int s = 0; s < steps; ++s) {
      const int k0 = 64 * s;
      const bool t = k0 == Kf;
      _tile_loadd(4, A + k0, lda);
      _tile_loadd(6, t ? tail[0] : B0 + size_t(k0) * kPanel, 64);
      _tile_loadd(7, t ? tail[1] : B1 + size_t(k0) * kPanel, 64);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
    }
    _tile_stored(0, C, sc);
    _tile_stored(1, C + kPanel, sc);
    tiles_stored();
    return;
  }
  if (accumulate) {
    _tile_loadd(2, C + 16 * kBlock, sc);
    _tile_loadd(3, C + 16 * kBlock + kPanel, sc);
  } else {
    _tile_zero(2);
    _tile_zero(3);
  }
  for (int s = 0; s < steps; ++s) {
    const int k0 = 64 * s;
    const bool t = k0 == Kf;
    _tile_loadd(4, A + k0, lda);
    _tile_loadd(5, A + 16 * lda + k0, lda);
    _tile_loadd(6, t ? tail[0] : B0 + size_t(k0) * kPanel, 64);
    _tile_loadd(7, t ? tail[1] : B1 + size_t(k0) * kPanel, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  }
  _tile_stored(0, C, sc);
  _tile_stored(1, C + kPanel, sc);
  _tile_stored(2, C + 16 * kBlock, sc);
  _tile_stored(3, C + 16 * kBlock + kPanel, sc);
  tiles_stored();
}
#define KT_MK_I8 mk_i8_amx

static inline void mk(const float* A, size_t lda, int M, const float* B0, const float* B1, int Kp, float* C,
                      bool accumulate = false) {
  mk_avx512(A, lda, M, B0, B1, Kp, C, accumulate);
}

#include "moe_kernels.inc"

}  // namespace

const IsaKernels* kernels_amx() { return &kKernels; }

}  // namespace kt_sft

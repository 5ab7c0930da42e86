#include "lora_pack.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

#include "thread_pool.h"

namespace kt_sft {
namespace {

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

// At_gu [E][r][2Ip]: gate columns at [0, I), up columns at [Ip, Ip + I), zeros elsewhere.
const float* pad_a_gate_up(ThreadPool& pool, Buffer& buf, const float* A, int E, int r, int I, int Ip) {
  if (I == Ip) return A;
  const size_t f = sizeof(float), rg = size_t(r);
  float* at = static_cast<float*>(buf.reserve(size_t(E) * rg * 2 * Ip * f));
  pool.run(E, [&](int e, int) {
    for (size_t rho = 0; rho < rg; ++rho) {
      const float* src = A + (size_t(e) * rg + rho) * 2 * I;
      float* d = at + (size_t(e) * rg + rho) * 2 * Ip;
      std::memset(d, 0, size_t(2) * Ip * f);
      std::memcpy(d, src, size_t(I) * f);
      std::memcpy(d + Ip, src + I, size_t(I) * f);
    }
  });
  return at;
}

// At_d [E][r][Hp]: rows of H columns, zero padded (an ungated layer's At_gu: rows of I columns, to Ip).
const float* pad_a_rows(ThreadPool& pool, Buffer& buf, const float* A, int E, int r, int H, int Hp) {
  if (H == Hp) return A;
  const size_t f = sizeof(float), rd = size_t(r);
  float* at = static_cast<float*>(buf.reserve(size_t(E) * rd * Hp * f));
  pool.run(E, [&](int e, int) {
    for (size_t rho = 0; rho < rd; ++rho) {
      float* d = at + (size_t(e) * rd + rho) * Hp;
      std::memcpy(d, A + (size_t(e) * rd + rho) * H, size_t(H) * f);
      std::memset(d + H, 0, size_t(Hp - H) * f);
    }
  });
  return at;
}

// Bt [E][r][Kp] from PEFT's B [K][r*E].
const float* transpose_b(ThreadPool& pool, Buffer& buf, const float* B, int E, int r, int K, int Kp) {
  float* bt = static_cast<float*>(buf.reserve(size_t(E) * r * Kp * sizeof(float)));
  transpose_b_factor(pool, B, K, r * E, bt, Kp, E, r);
  return bt;
}

}  // namespace

void check_lora_args(const LoraArgs& a) {
  if (a.r_gu < 0 || a.r_d < 0) throw std::invalid_argument("LoRA ranks must be >= 0");
  if (a.r_gu > 0 && (!a.A_gu || !a.B_gu)) throw std::invalid_argument("LoRA gate_up rank > 0 but a factor is null");
  if (a.r_d > 0 && (!a.A_d || !a.B_d)) throw std::invalid_argument("LoRA down rank > 0 but a factor is null");
}

void check_lora_grads(const LoraArgs& a, const LoraGrads* g) {
  if (!g || (a.r_gu > 0 && (!g->A_gu || !g->B_gu)) || (a.r_d > 0 && (!g->A_d || !g->B_d)))
    throw std::invalid_argument("backward with LoRA needs gradient buffers for every targeted factor");
}

LoraView repack_lora(ThreadPool& pool, LoraRepackBuffers& buf, const LoraArgs& a, int E, int H, int I, int Hp,
                     int Ip, bool gated) {
  LoraView v{};
  v.r_gu = a.r_gu;
  v.r_d = a.r_d;
  v.s_gu = a.s_gu;
  v.s_d = a.s_d;
  if (a.r_gu > 0) {
    v.At_gu = gated ? pad_a_gate_up(pool, buf.at_gu, a.A_gu, E, a.r_gu, I, Ip)
                    : pad_a_rows(pool, buf.at_gu, a.A_gu, E, a.r_gu, I, Ip);
    v.Bt_gu = transpose_b(pool, buf.bt_gu, a.B_gu, E, a.r_gu, H, Hp);
  }
  if (a.r_d > 0) {
    v.At_d = pad_a_rows(pool, buf.at_d, a.A_d, E, a.r_d, H, Hp);
    v.Bt_d = transpose_b(pool, buf.bt_d, a.B_d, E, a.r_d, I, Ip);
  }
  return v;
}

void zero_lora_grads(const LoraArgs& a, const LoraGrads& g, int E, int H, int I, bool gated) {
  const size_t f = sizeof(float);
  if (a.r_gu > 0) {
    std::memset(g.A_gu, 0, size_t(a.r_gu) * E * (gated ? 2 : 1) * I * f);
    std::memset(g.B_gu, 0, size_t(a.r_gu) * E * H * f);
  }
  if (a.r_d > 0) {
    std::memset(g.A_d, 0, size_t(a.r_d) * E * H * f);
    std::memset(g.B_d, 0, size_t(a.r_d) * E * I * f);
  }
}

}  // namespace kt_sft

#include "routing.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common.h"
#include "thread_pool.h"

namespace kt_sft {

void build_plan(int E, int T, int k, const int64_t* ids, const float* w, RoutingPlan& plan) {
  plan.T = T;
  plan.k = k;
  plan.count.assign(size_t(E), 0);
  for (size_t i = 0; i < size_t(T) * k; ++i) {
    const int64_t e = ids[i];
    if (e == kNotHere) continue;
    if (e < 0 || e >= E)
      throw std::invalid_argument("topk_ids[" + std::to_string(i / k) + "][" + std::to_string(i % k) + "] = " +
                                  std::to_string(e) + " is outside [0, " + std::to_string(E) +
                                  ") (-1: slot computed elsewhere)");
    ++plan.count[size_t(e)];
  }
  plan.seg_start.assign(size_t(E), 0);
  int rows = 0;
  for (int e = 0; e < E; ++e) {
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

int row_expert(const RoutingPlan& plan, int row) {
  // the last segment starting at or before row: empty segments before it start at the same row
  return int(std::upper_bound(plan.seg_start.begin(), plan.seg_start.end(), row) - plan.seg_start.begin()) - 1;
}

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

void sum_rows(ThreadPool& pool, const RoutingPlan& plan, const void* rows, void* dst, int H, int Hp, int dtype,
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
      if (dtype == kF32) {
        std::memcpy(static_cast<float*>(dst) + size_t(t) * H, acc.data(), size_t(H) * sizeof(float));
      } else {
        uint16_t* d = static_cast<uint16_t*>(dst) + size_t(t) * H;
        for (int c = 0; c < H; ++c) d[c] = f32_to_bf16(acc[c]);
      }
    }
  });
}

void parallel_copy(ThreadPool& pool, void* dst, const void* src, size_t bytes) {
  constexpr size_t kPiece = size_t(1) << 20;
  const int pieces = int((bytes + kPiece - 1) / kPiece);
  pool.run(pieces, [&](int i, int) {
    const size_t at = size_t(i) * kPiece;
    std::memcpy(static_cast<char*>(dst) + at, static_cast<const char*>(src) + at, std::min(kPiece, bytes - at));
  });
}

}  // namespace kt_sft

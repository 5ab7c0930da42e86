// NOTE (kt-sft engine, routing: which rows each expert computes, and the moves in and out of them)
// Layout:    RoutingPlan groups a call's T*k (token, slot) pairs by expert into row segments: expert e owns rows
//            [seg_start[e], seg_start[e] + count[e]) of every gathered buffer, segments padded to kRowAlign.
//            row_of maps (token, slot) to its row (-1: a kNotHere slot), row_token a row to its token.
// Algorithm: build_plan counts, lays out the segments and places the pairs in (token, slot) order;
//            gather_rows copies token rows into their rows; sum_rows adds each token's k rows in slot order
//            (fp32), so the output is bitwise the same for any thread count.
// Invariants: rows past a segment's count are padding: never a routed pair's.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace kt_sft {

class ThreadPool;

struct RoutingPlan {
  int T = 0, k = 0, rows = 0;        // rows: padded total of all segments
  std::vector<int> seg_start, count; // [E]
  std::vector<int> row_of;           // [T*k] gathered row of (token, slot); -1 for a kNotHere slot
  std::vector<int> row_token;        // [rows] token of each row (-1 for padding)
  std::vector<float> row_weight;     // [rows]
};

// topk_ids value of a (token, slot) this layer leaves out: another device computes it (kt_sft/engine/gpu_share.py).
// It adds nothing to y and gets dw = 0.
constexpr int64_t kNotHere = -1;

constexpr int kTokenChunk = 32;  // tokens per gather / reduce task

// plan = the routing of ids/w [T][k] over E experts; throws std::invalid_argument for an id outside [0, E) other
// than kNotHere.
void build_plan(int E, int T, int k, const int64_t* ids, const float* w, RoutingPlan& plan);
// The expert whose segment holds gathered row `row` (a routed row).
int row_expert(const RoutingPlan& plan, int row);
// Copies token rows (H elements of es bytes) into their k gathered rows (ld elements apart), zeroing the K padding
// up to Hp (the stride padding past Hp is never read).
void gather_rows(ThreadPool& pool, const RoutingPlan& plan, const void* src, void* dst, int H, int Hp, int ld,
                 size_t es);
// dst[t][0..H) = sum_j rows[row_of[t][j]][0..H), in slot order (fp32), stored as dtype (kF32 / kBF16). rows: f32,
// or bf16 when rows16 (int8 GEMMs).
void sum_rows(ThreadPool& pool, const RoutingPlan& plan, const void* rows, void* dst, int H, int Hp, int dtype,
              bool rows16);
// memcpy split over the pool (one thread copies ~10 GB/s; a 4096-token layer input is 16 MB).
void parallel_copy(ThreadPool& pool, void* dst, const void* src, size_t bytes);

}  // namespace kt_sft

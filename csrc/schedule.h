// NOTE (kt-sft engine, scheduling a phase's tasks on the pool)
// Layout:    make_tasks cuts a phase into Tasks (kernel_api.h): expert x row chunk x group of column blocks, in
//            expert order; run_proj runs LoRA's rank-r projections; run_gemm_phase runs one GEMM phase.
// Algorithm: with int8 GEMMs a GEMM phase's A is quantized per row into the engine's q8 buffers in the same pool
//            run: expert e's quantize tasks are queued kQuantLead experts ahead of its GEMM tasks, and a GEMM task
//            spins until its expert's rows are all quantized. The memory-bound quantization then runs beside other
//            workers' AMX GEMMs instead of alone between two barriers.
//            NUMA (numa.h): a GEMM phase runs with ThreadPool::run_by_node, one range of tasks per node of the
//            layer's experts (ExpertNodes: contiguous experts, so tasks in expert order split at node boundaries);
//            a node's workers take its range first, then help the others. The quantize queue is built node by node,
//            its lead never crossing into the next node's experts.
// Invariants: tasks are taken in queue order and every quantize task comes before the GEMM tasks that wait for
//            it in the same node's range, so a waiting worker only waits for workers that are running. Which worker
//            runs a task never changes what it computes.
#pragma once
#include <immintrin.h>

#include <atomic>
#include <memory>
#include <vector>

#include "engine.h"
#include "numa.h"
#include "routing.h"

namespace kt_sft {

// One task per expert x row chunk x group of `per_task` column blocks (<= kMaxTaskBlocks; the last group of an
// expert may hold fewer).
std::vector<Task> make_tasks(const RoutingPlan& plan, int blocks, int chunk, int per_task = 1);
// Where each node's tasks start in a list in expert order ([nodes + 1] offsets for ThreadPool::run_by_node).
std::vector<int> node_begin(const std::vector<Task>& tasks, const ExpertNodes& nodes);

// Rank-r row projections out[row][rho] = scale_row * src[row] . mat[e][rho] over every routed row.
void run_proj(ThreadPool& pool, const KernelTable* kt, const LayerView& L, const RoutingPlan& plan, const void* src,
              int ld, int K, int r, const float* mat, float* out, const float* row_scale);

// The A of an int8-GEMM phase before quantization (QuantJob): the gathered rows [rows][ld] (row_token null) or the
// token rows [T][ld], K columns, with the `fold` scales folded in.
struct QuantSource {
  const void* src;
  int ld, K;
  ScaleFold fold;
  const int* row_token;
};

constexpr int kQuantLead = 2;  // experts by which a phase's quantize tasks run ahead of its GEMM tasks

// The queue of one quantized GEMM phase (see the note above).
struct QuantQueue {
  QuantJob job;
  std::vector<Task> qtasks;                  // quantize tasks (64 rows each)
  std::vector<int> need;                     // [E] quantize tasks of each expert
  std::unique_ptr<std::atomic<int>[]> done;  // [E] of them finished
  std::vector<int> order;                    // >= 0: GEMM task; < 0: quantize task -1 - i
  std::vector<int> begin;                    // [nodes + 1] where each node's part of `order` starts
};
// Reserves the engine's q8 buffers for the phase's A and builds its queue.
void build_quant_queue(Engine& eng, const RoutingPlan& plan, const ExpertNodes& nodes,
                       const std::vector<Task>& gemm_tasks, const QuantSource& src, QuantQueue& q);

// One GEMM phase: gemm(task, worker) for every task, each node's experts' tasks on that node's workers first. With
// `quant` (a format with quantized GEMM inputs) the phase's A is quantized in the same run, returned in (qa, qs)
// before any GEMM task starts.
template <typename Gemm>
void run_gemm_phase(Engine& eng, const KernelTable* kt, const LayerView& L, const RoutingPlan& plan,
                    const ExpertNodes& nodes, const std::vector<Task>& gemm_tasks, Gemm gemm,
                    const QuantSource* quant, const int8_t** qa, const float** qs) {
  auto timed_gemm = [&](const Task& t, int wk) {  // a whole task's ticks (profiling)
    uint64_t* clk = worker_clock(eng, wk);
    const uint64_t t0 = clk ? clock_ticks() : 0;
    gemm(t, wk);
    clock_add(clk, kPartTask, t0);
  };
  if (!quant) {
    eng.pool->run_by_node(node_begin(gemm_tasks, nodes), [&](int i, int wk) { timed_gemm(gemm_tasks[size_t(i)], wk); });
    return;
  }
  QuantQueue q;
  build_quant_queue(eng, plan, nodes, gemm_tasks, *quant, q);
  *qa = q.job.dst;
  *qs = q.job.dst_scale;
  eng.pool->run_by_node(q.begin, [&](int i, int wk) {
    const int o = q.order[size_t(i)];
    uint64_t* clk = worker_clock(eng, wk);
    const uint64_t t0 = clk ? clock_ticks() : 0;
    if (o < 0) {
      const Task& t = q.qtasks[size_t(-1 - o)];
      kt->quantize(L, q.job, t);
      q.done[size_t(t.expert)].fetch_add(1, std::memory_order_release);
      clock_add(clk, kPartQuantize, t0);
      return;
    }
    const int e = gemm_tasks[size_t(o)].expert;
    while (q.done[size_t(e)].load(std::memory_order_acquire) < q.need[size_t(e)]) _mm_pause();
    clock_add(clk, kPartWait, t0);
    timed_gemm(gemm_tasks[size_t(o)], wk);
  });
}

}  // namespace kt_sft

#include "schedule.h"

#include <algorithm>
#include <stdexcept>

namespace kt_sft {

std::vector<Task> make_tasks(const RoutingPlan& plan, int blocks, int chunk, int per_task) {
  std::vector<Task> tasks;
  for (int e = 0; e < int(plan.count.size()); ++e)
    for (int b = 0; b < blocks; b += per_task)
      for (int r0 = 0; r0 < plan.count[e]; r0 += chunk)
        tasks.push_back(Task{e, b, r0, std::min(chunk, plan.count[e] - r0), std::min(per_task, blocks - b)});
  return tasks;
}

std::vector<int> node_begin(const std::vector<Task>& tasks, const ExpertNodes& nodes) {
  std::vector<int> begin;
  size_t i = 0;
  for (int n = 0; n < nodes.count(); ++n) {
    begin.push_back(int(i));
    while (i < tasks.size() && tasks[i].expert < nodes.first[size_t(n) + 1]) ++i;
  }
  begin.push_back(int(tasks.size()));
  return begin;
}

void run_proj(ThreadPool& pool, const KernelTable* kt, const LayerView& L, const RoutingPlan& plan, const void* src,
              int ld, int K, int r, const float* mat, float* out, const float* row_scale) {
  LoraProj P{plan.seg_start.data(), src, ld, K, r, mat, out, row_scale};
  std::vector<Task> tasks = make_tasks(plan, 1, kRowChunk);
  pool.run(int(tasks.size()), [&](int i, int) { kt->lora_proj(L, P, tasks[size_t(i)]); });
}

void build_quant_queue(Engine& eng, const RoutingPlan& plan, const ExpertNodes& nodes,
                       const std::vector<Task>& gemm_tasks, const QuantSource& src, QuantQueue& q) {
  int8_t* dst = static_cast<int8_t*>(eng.q8.reserve(size_t(plan.rows) * qa_stride(src.K)));
  float* ds = static_cast<float*>(eng.q8_scale.reserve(size_t(plan.rows) * sizeof(float)));
  q.job = QuantJob{plan.seg_start.data(), src.row_token, src.src, src.ld, src.K, src.fold, dst, ds};
  q.qtasks = make_tasks(plan, 1, 64);
  const int E = int(plan.count.size());
  q.need.assign(size_t(E), 0);
  for (const Task& t : q.qtasks) ++q.need[size_t(t.expert)];
  q.done.reset(new std::atomic<int>[size_t(E)]);
  for (int e = 0; e < E; ++e) q.done[size_t(e)].store(0, std::memory_order_relaxed);
  q.order.reserve(q.qtasks.size() + gemm_tasks.size());
  size_t qi = 0, gi = 0;
  for (int n = 0; n < nodes.count(); ++n) {  // node by node: each node's range holds its experts' quantize tasks
    q.begin.push_back(int(q.order.size()));
    const int last = nodes.first[size_t(n) + 1] - 1;
    for (int e = nodes.first[size_t(n)]; e <= last; ++e) {
      for (; qi < q.qtasks.size() && q.qtasks[qi].expert <= std::min(e + kQuantLead, last); ++qi)
        q.order.push_back(-1 - int(qi));
      for (; gi < gemm_tasks.size() && gemm_tasks[gi].expert == e; ++gi) q.order.push_back(int(gi));
    }
  }
  q.begin.push_back(int(q.order.size()));
  if (qi != q.qtasks.size() || gi != gemm_tasks.size())  // make_tasks orders by expert; anything else would skip tasks
    throw std::logic_error("run_gemm_phase: tasks not in expert order");
}

}  // namespace kt_sft

// NOTE (kt-sft engine, persistent worker pool)
// One pool per process, sized by KT_SFT_THREADS (default: physical cores). `run(n, fn)` executes fn(task,
// worker) for task = 0..n-1 on the calling thread plus the workers; tasks are handed out one at a time from
// an atomic counter, so a skewed task list (one busy expert) still balances. Workers spin before sleeping so
// the phases of a call and back-to-back calls do not pay a futex wake-up (and the cores' climb out of idle
// states) each time: briefly by default (100 us), so a Python thread that runs between inference calls gets the
// cores back soon after; the autograd glue asks for a long spin while it trains with the rest of the model on
// a GPU (set_spin_us; kt_sft/engine/autograd.py). KT_SFT_SPIN_US fixes the spin (0 = sleep at once) and then
// set_spin_us is ignored.
// NUMA (numa.h): with a layout of several nodes, the workers are split over the nodes by their cores and each is
// pinned to its node's cpus (the calling thread, worker 0, stays unpinned: its node is the one of the cpu it runs
// on). `run_by_node(begin, fn)` gives every node its own range of tasks, [begin[n], begin[n+1]), taken in order
// from that node's counter by its workers; a worker whose node has none left takes the next node's in the same
// order (work stealing), so a skewed routing does not idle a socket. A task may wait for tasks earlier in its own
// range (the int8-GEMM queue, schedule.h): every range is taken front to back, so those were taken by workers that
// are running. With one node (or a `begin` of another node count) it is `run`: one range, no pinning, as before.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "numa.h"

namespace kt_sft {

class ThreadPool {
 public:
  // fixed_spin_us >= 0: the spin KT_SFT_SPIN_US fixed (set_spin_us is then ignored); -1: 100 us, settable.
  // numa: the nodes to split the workers over (one node: no pinning).
  ThreadPool(int threads, int fixed_spin_us, const NumaLayout& numa);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }
  // How long idle workers spin before sleeping, from their next idle period on (ignored under KT_SFT_SPIN_US).
  void set_spin_us(int us) {
    if (!spin_fixed_) spin_us_.store(us, std::memory_order_relaxed);
  }
  int spin_us() const { return spin_us_.load(std::memory_order_relaxed); }
  // Blocks until all n tasks have run. Not reentrant: callers serialise (the engine holds a mutex).
  void run(int n, const std::function<void(int task, int worker)>& fn);
  // The same for tasks [0, begin.back()) cut into one range per node (begin: nodes() + 1 ascending offsets).
  void run_by_node(const std::vector<int>& begin, const std::function<void(int task, int worker)>& fn);
  int nodes() const { return int(node_cpus_.size()); }
  std::vector<int> workers_per_node() const;  // the calling thread counted on node 0

 private:
  // Tasks [begin[r], begin[r+1]) of range r, taken from its counter (own cache line: workers of different nodes
  // take from different ranges).
  struct alignas(64) Range {
    std::atomic<int> next{0};
    int end = 0;
  };
  void worker_loop(int worker);
  void drain(int worker);
  void start(const int* begin, int ranges, const std::function<void(int, int)>& fn);
  int home_range(int worker) const;  // the range a worker takes from first

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<unsigned> generation_{0};
  std::vector<std::vector<int>> node_cpus_;  // [nodes] the cpus each node's workers are pinned to (one node: none)
  std::vector<int> node_of_worker_;          // [workers + 1] (worker 0: by the cpu it runs on)
  std::vector<int> node_of_cpu_;             // [cpu] node, -1 for a cpu of no node
  std::unique_ptr<Range[]> ranges_;          // [max(1, nodes)]
  int n_ranges_ = 1;
  std::atomic<int> active_{0};
  const std::function<void(int, int)>* fn_ = nullptr;
  bool stop_ = false;
  bool spin_fixed_ = false;  // KT_SFT_SPIN_US was set
  std::atomic<int> spin_us_;
};

}  // namespace kt_sft

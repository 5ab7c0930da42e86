#include "thread_pool.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <chrono>

namespace kt_sft {

// The spin is measured in time, not pause instructions: `pause` costs ~10 cycles on older cores but ~140 on
// Sapphire Rapids, so a fixed count spun 20x longer there. The default (100 us) bridges the phases of one call
// and back-to-back calls, and leaves the cores to the Python/CUDA thread between decode layers.
constexpr int kDefaultSpinUs = 100;

namespace {

// Each node's share of `threads` in proportion to its cores (largest remainder, ties to the lower node), less
// the calling thread's slot, taken from the node with the most.
std::vector<int> workers_by_node(int threads, const NumaLayout& numa) {
  const int N = int(numa.nodes.size());
  long cores = 0;
  for (const NumaNode& n : numa.nodes) cores += std::max(1, n.cores);
  std::vector<int> count(static_cast<size_t>(N), 0);
  std::vector<std::pair<long, int>> remainder;  // (-remainder, node): sorted, the largest first
  int given = 0;
  for (int n = 0; n < N; ++n) {
    const long share = long(threads) * std::max(1, numa.nodes[size_t(n)].cores);
    count[size_t(n)] = int(share / cores);
    given += count[size_t(n)];
    remainder.push_back({-(share % cores), n});
  }
  std::sort(remainder.begin(), remainder.end());
  for (int i = 0; given < threads; ++i, ++given) ++count[size_t(remainder[size_t(i % N)].second)];
  --*std::max_element(count.begin(), count.end());
  return count;
}

void pin_to(const std::vector<int>& cpus) {
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int cpu : cpus)
    if (cpu < CPU_SETSIZE) CPU_SET(cpu, &set);
  pthread_setaffinity_np(pthread_self(), sizeof(set), &set);  // a refusal leaves the worker unpinned: still correct
}

}  // namespace

ThreadPool::ThreadPool(int threads, int fixed_spin_us, const NumaLayout& numa)
    : ranges_(new Range[std::max<size_t>(1, numa.nodes.size())]), spin_fixed_(fixed_spin_us >= 0),
      spin_us_(fixed_spin_us >= 0 ? fixed_spin_us : kDefaultSpinUs) {
  for (const NumaNode& n : numa.nodes) node_cpus_.push_back(n.cpus);
  if (node_cpus_.empty()) node_cpus_.emplace_back();
  node_of_worker_.assign(1, -1);
  if (nodes() > 1) {
    const std::vector<int> count = workers_by_node(threads, numa);
    for (int n = 0; n < nodes(); ++n) {
      node_of_worker_.insert(node_of_worker_.end(), size_t(count[size_t(n)]), n);
      for (int cpu : node_cpus_[size_t(n)]) {
        if (cpu >= int(node_of_cpu_.size())) node_of_cpu_.resize(size_t(cpu) + 1, -1);
        if (node_of_cpu_[size_t(cpu)] < 0) node_of_cpu_[size_t(cpu)] = n;
      }
    }
  } else {
    node_of_worker_.resize(size_t(std::max(1, threads)), 0);
  }
  for (int w = 1; w < int(node_of_worker_.size()); ++w) workers_.emplace_back([this, w] { worker_loop(w); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  for (auto& t : workers_) t.join();
}

std::vector<int> ThreadPool::workers_per_node() const {
  std::vector<int> count(size_t(nodes()), 0);
  for (int n : node_of_worker_) ++count[size_t(std::max(n, 0))];
  return count;
}

int ThreadPool::home_range(int worker) const {
  if (n_ranges_ == 1) return 0;
  if (worker > 0) return node_of_worker_[size_t(worker)];
  const int cpu = sched_getcpu();
  return cpu >= 0 && cpu < int(node_of_cpu_.size()) && node_of_cpu_[size_t(cpu)] >= 0 ? node_of_cpu_[size_t(cpu)] : 0;
}

void ThreadPool::drain(int worker) {
  const int home = home_range(worker);
  for (int i = 0; i < n_ranges_; ++i) {  // the own node's range, then the others' (stealing), each front to back
    Range& r = ranges_[(home + i) % n_ranges_];
    for (int task = r.next.fetch_add(1); task < r.end; task = r.next.fetch_add(1)) (*fn_)(task, worker);
  }
}

void ThreadPool::start(const int* begin, int ranges, const std::function<void(int, int)>& fn) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ranges_ = ranges;
    for (int r = 0; r < ranges; ++r) {
      ranges_[r].next.store(begin[r]);
      ranges_[r].end = begin[r + 1];
    }
    active_.store(int(workers_.size()));
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  drain(0);
  while (active_.load(std::memory_order_acquire) != 0) _mm_pause();
}

void ThreadPool::run(int n, const std::function<void(int, int)>& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    for (int t = 0; t < n; ++t) fn(t, 0);
    return;
  }
  const int begin[2] = {0, n};
  start(begin, 1, fn);
}

void ThreadPool::run_by_node(const std::vector<int>& begin, const std::function<void(int, int)>& fn) {
  const int n = begin.empty() ? 0 : begin.back();
  if (nodes() == 1 || int(begin.size()) != nodes() + 1 || workers_.empty() || n <= 1) return run(n, fn);
  start(begin.data(), nodes(), fn);
}

void ThreadPool::worker_loop(int worker) {
  if (nodes() > 1) pin_to(node_cpus_[size_t(node_of_worker_[size_t(worker)])]);
  unsigned seen = 0;
  for (;;) {
    // Spin spin_us() for the next call, then sleep.
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us());
    while (generation_.load(std::memory_order_acquire) == seen) {
      for (int i = 0; i < 32 && generation_.load(std::memory_order_acquire) == seen; ++i) _mm_pause();
      if (std::chrono::steady_clock::now() >= until) break;
    }
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return generation_.load() != seen; });
    }
    std::unique_lock<std::mutex> lock(mu_);
    seen = generation_.load();
    if (stop_) return;
    lock.unlock();
    drain(worker);
    active_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace kt_sft

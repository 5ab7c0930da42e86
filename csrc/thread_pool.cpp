#include "thread_pool.h"

#include <immintrin.h>

#include <chrono>

namespace kt_sft {

// The spin is measured in time, not pause instructions: `pause` costs ~10 cycles on older cores but ~140 on
// Sapphire Rapids, so a fixed count spun 20x longer there. The default (100 us) bridges the phases of one call
// and back-to-back calls, and leaves the cores to the Python/CUDA thread between decode layers.
constexpr int kDefaultSpinUs = 100;

ThreadPool::ThreadPool(int threads, int fixed_spin_us)
    : spin_fixed_(fixed_spin_us >= 0), spin_us_(fixed_spin_us >= 0 ? fixed_spin_us : kDefaultSpinUs) {
  for (int w = 1; w < threads; ++w) workers_.emplace_back([this, w] { worker_loop(w); });
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

void ThreadPool::drain(int worker) {
  for (int task = next_.fetch_add(1); task < n_; task = next_.fetch_add(1)) (*fn_)(task, worker);
}

void ThreadPool::run(int n, const std::function<void(int, int)>& fn) {
  if (n <= 0) return;
  if (workers_.empty() || n == 1) {
    for (int t = 0; t < n; ++t) fn(t, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0);
    active_.store(int(workers_.size()));
    generation_.fetch_add(1);
  }
  wake_.notify_all();
  drain(0);
  while (active_.load(std::memory_order_acquire) != 0) _mm_pause();
}

void ThreadPool::worker_loop(int worker) {
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

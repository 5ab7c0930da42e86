#include "thread_pool.h"

#include <immintrin.h>

namespace kt_sft {

ThreadPool::ThreadPool(int threads) {
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
    // Spin ~50 us for the next call, then sleep.
    for (int spin = 0; spin < 20000 && generation_.load(std::memory_order_acquire) == seen; ++spin) _mm_pause();
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

// NOTE (kt-sft engine, persistent worker pool)
// One pool per process, sized by KT_SFT_THREADS (default: physical cores). `run(n, fn)` executes fn(task,
// worker) for task = 0..n-1 on the calling thread plus the workers; tasks are handed out one at a time from
// an atomic counter, so a skewed task list (one busy expert) still balances. Workers spin briefly before
// sleeping (KT_SFT_SPIN_US, default 100 us) so the phases of a call and back-to-back calls do not pay a futex
// wake-up each time, while a Python thread that runs between calls gets the cores back soon after.
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace kt_sft {

class ThreadPool {
 public:
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return int(workers_.size()) + 1; }
  // Blocks until all n tasks have run. Not reentrant: callers serialise (the engine holds a mutex).
  void run(int n, const std::function<void(int task, int worker)>& fn);

 private:
  void worker_loop(int worker);
  void drain(int worker);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable wake_;
  std::atomic<unsigned> generation_{0};
  std::atomic<int> next_{0};
  std::atomic<int> active_{0};
  int n_ = 0;
  const std::function<void(int, int)>* fn_ = nullptr;
  bool stop_ = false;
  const int spin_us_;
};

}  // namespace kt_sft

// NOTE (kt-sft engine, persistent worker pool)
// One pool per process, sized by KT_SFT_THREADS (default: physical cores). `run(n, fn)` executes fn(task,
// worker) for task = 0..n-1 on the calling thread plus the workers; tasks are handed out one at a time from
// an atomic counter, so a skewed task list (one busy expert) still balances. Workers spin before sleeping so
// the phases of a call and back-to-back calls do not pay a futex wake-up (and the cores' climb out of idle
// states) each time: briefly by default (100 us), so a Python thread that runs between inference calls gets the
// cores back soon after; the autograd glue asks for a long spin while it trains with the rest of the model on
// a GPU (set_spin_us; kt_sft/engine/autograd.py). KT_SFT_SPIN_US fixes the spin (0 = sleep at once) and then
// set_spin_us is ignored.
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
  // fixed_spin_us >= 0: the spin KT_SFT_SPIN_US fixed (set_spin_us is then ignored); -1: 100 us, settable.
  ThreadPool(int threads, int fixed_spin_us);
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
  bool spin_fixed_ = false;  // KT_SFT_SPIN_US was set
  std::atomic<int> spin_us_;
};

}  // namespace kt_sft

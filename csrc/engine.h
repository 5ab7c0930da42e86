// NOTE (kt-sft engine, the process-wide engine: ISA choice, thread pool, shared scratch, phase profiler)
// Layout:    one Engine per process (engine()), never destroyed (worker threads must not outlive a static
//            destructor). It holds the chosen ISA's kernels (IsaKernels: one KernelTable per weight format), the
//            K chunk in effect, the worker pool, every scratch buffer a call needs (shared by all layers) and
//            the phase profile.
// Algorithm: start_engine() (kt_sft/engine/runtime.py calls it at import) parses the KT_SFT_* variables
//            (env.h) and makes the ISA choice once: KT_SFT_ISA, else the best path this CPU runs; select_isa
//            changes it explicitly. The pool is created on first use (KT_SFT_THREADS, else the physical cores),
//            over the NUMA layout (numa.h) of KT_SFT_NUMA or set_numa, detected with the pool; a layer takes its
//            experts' nodes from the layout in effect when it is made (layer_nodes).
//            The K chunk is set_kchunk's value, else KT_SFT_KCHUNK, else 0 (each task chooses: moe_tasks.inc).
// Invariants: every compute call and every setting change holds Engine::mu, so calls are serialised (the scratch
//            is shared) and may run with the Python GIL released. Buffers only grow.
#pragma once
#include <chrono>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "buffer.h"
#include "formats.h"
#include "lora_pack.h"
#include "numa.h"
#include "thread_pool.h"

namespace kt_sft {

// Wall time of one phase of forward/backward summed over calls (set_profiling).
struct PhaseStat {
  long calls = 0;
  double seconds = 0.0;
};

struct Engine {
  std::mutex mu;  // serialises compute calls: the scratch below is shared by every layer
  const IsaKernels* kernels = nullptr;  // the chosen ISA path
  std::string isa;
  int kchunk_setting = -1;  // set_kchunk / KT_SFT_KCHUNK (-1: unset, 0)
  int kchunk = 0;           // the K chunk of the task GEMMs in effect
  std::unique_ptr<ThreadPool> pool;
  NumaLayout numa;  // the pool's nodes (empty until the pool exists)
  // per call: gathered rows (x or dy), act / dgu, per-row outputs (y or dx rows), dw partial sums
  Buffer xg, act, rows_out, dw_part;
  std::vector<Buffer> c, packed, acc, wdq;  // per worker (Scratch)
  std::vector<Buffer> decoded;  // per worker: packing's decoded source rows and codes (packing.h, pack)
  Buffer q8, q8_scale;  // int8 GEMMs: the current GEMM phase's A quantized (QuantJob), and its row scales
  // LoRA: repacked factors (LoraView), rank-r projections of unsaved forwards / backward, h for dB_d.
  LoraRepackBuffers lora;
  Buffer l_u, l_q, l_dya, l_tgu, l_h;
  bool profiling = false;                                  // set_profiling: wall time per phase of every call
  std::vector<std::pair<std::string, PhaseStat>> profile;  // (phase, calls + seconds) in first-seen order
  std::vector<TaskClock> task_clock;  // profiling: per worker, its GEMM phase's ticks by part (kernel_api.h)
};

Engine& engine();
// With mu held: the ISA choice (once) and the pool.
void ensure_ready(Engine& eng);
// With mu held: the per-worker scratch of a call on a layer of format f and padded sizes Hp, Ip.
void ensure_scratch(Engine& eng, const FormatInfo& f, int Hp, int Ip);
// With mu held: each worker's LoRA gradient sums, `floats` each (backward with LoRA).
void ensure_lora_acc(Engine& eng, size_t floats);
Scratch scratch_of(Engine& eng, int worker);
// Profiling: the worker's TaskClock ticks for the current GEMM phase (null when off).
inline uint64_t* worker_clock(Engine& eng, int worker) {
  return eng.profiling && worker < int(eng.task_clock.size()) ? eng.task_clock[size_t(worker)].ticks : nullptr;
}
// The kernels of format f on the chosen ISA.
inline const KernelTable* kernels_for(const Engine& eng, WeightFormat f) { return &eng.kernels->formats[int(f)]; }

// Wall-clock stamps between the phases of one forward/backward (each phase ends with a pool barrier, so the
// stamps split the call exactly). Free when profiling is off. A GEMM phase also reports where its workers' time
// went, as entries "<phase> | <part>" right after it: the workers' mean of each TaskPart (ticks converted with the
// rate the phase's own wall time and time-stamp counter give), and "idle" = wall - the mean of whole tasks,
// quantize tasks and waits (barrier imbalance, the pool's hand-out).
class PhaseClock {
 public:
  explicit PhaseClock(Engine& eng);
  void mark(const char* phase);

 private:
  using Clock = std::chrono::steady_clock;
  Engine& eng_;
  Clock::time_point t_;
  uint64_t ticks_ = 0;  // clock_ticks() at t_
};

// ---- process-wide settings (the bindings' module functions) ----
void start_engine();                             // parse KT_SFT_* and choose the ISA; throws on a bad value
std::string select_isa(const std::string& isa);  // "" = KT_SFT_ISA, else the best available; returns the name
std::string current_isa();
void set_num_threads(int n);                     // 0 = KT_SFT_THREADS or physical cores
int num_threads();
int worker_spin_us();                            // the pool's current spin before sleeping (thread_pool.h)
void set_worker_spin_us(int us);                 // ignored under KT_SFT_SPIN_US
int set_kchunk(int n);                           // -1 = KT_SFT_KCHUNK, else 0; returns the old setting
int kchunk();                                    // the K chunk in effect
// NUMA (numa.h): set_numa(kNumaAuto | kNumaOff | nodes, or kNumaFromEnv) re-detects the layout and rebuilds the pool
// with as many threads; layers made before keep their experts' nodes (run on one range when the counts differ).
constexpr int kNumaFromEnv = -2;
void set_numa(int setting);
// The layout in effect and the pool's workers on each of its nodes.
std::pair<NumaLayout, std::vector<int>> numa_info();
ExpertNodes layer_nodes(int experts);  // a new layer's experts over the layout in effect
// Phase profiling (off by default): on/off clears the table; take_profile returns it (by phase name) and clears it.
void set_profiling(bool on);
std::vector<std::pair<std::string, PhaseStat>> take_profile();

}  // namespace kt_sft

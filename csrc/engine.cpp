#include "engine.h"

#include <algorithm>
#include <stdexcept>

#include "cpu_features.h"
#include "env.h"

namespace kt_sft {
namespace {

const IsaKernels* kernels_of(const std::string& isa) {
  if (isa == "scalar") return kernels_scalar();
  if (isa == "avx2") return kernels_avx2();
  if (isa == "avx512") return kernels_avx512();
  return kernels_amx();
}

// With mu held. want: an ISA name or "" for the best available; from_env: it came from KT_SFT_ISA (env.h checked
// the name).
void choose_isa(Engine& eng, std::string want, bool from_env) {
  std::string why;
  if (want.empty()) {
    want = supported_isas().back();
  } else if (!isa_supported(want, &why)) {
    throw std::runtime_error((from_env ? "KT_SFT_ISA=" + want : "ISA '" + want + "'") + " cannot run on this CPU: " +
                             why);
  }
  eng.isa = want;
  eng.kernels = kernels_of(want);
  eng.kchunk = std::max(eng.kchunk_setting, 0);
}

int default_threads() {
  const int env = env_settings().threads;
  return env > 0 ? env : std::max(1, physical_cores());
}

// With mu held: a pool of `threads` over the layout in effect (detected first when there is none).
void make_pool(Engine& eng, int threads) {
  eng.pool.reset();
  if (eng.numa.nodes.empty()) eng.numa = detect_numa(env_settings().numa);
  eng.pool.reset(new ThreadPool(threads, env_settings().spin_us, eng.numa));
}

}  // namespace

Engine& engine() {
  static Engine* e = new Engine();  // never destroyed: worker threads must not outlive a static destructor
  return *e;
}

void ensure_ready(Engine& eng) {
  if (!eng.kernels) {
    const EnvSettings& env = env_settings();
    eng.kchunk_setting = env.kchunk;
    choose_isa(eng, env.isa, true);
  }
  if (!eng.pool) make_pool(eng, default_threads());
}

void ensure_scratch(Engine& eng, const FormatInfo& f, int Hp, int Ip) {
  const size_t n = size_t(eng.pool->size());
  // one transposed block (2 panels) per column block of a task: bwd_act's of Hp rows, bwd_input's of 2*Ip rows
  const size_t packed = 2 * size_t(std::max(kActBlocksPerTask * round_up(Hp, f.transposed_k_align),
                                            f.dx_blocks * round_up(2 * Ip, f.transposed_k_align))) *
                        kPanel * f.transposed_bytes;
  eng.c.resize(n);
  eng.packed.resize(n);
  eng.wdq.resize(n);
  for (size_t w = 0; w < n; ++w) {
    eng.c[w].reserve(kTaskCBytes);
    eng.packed[w].reserve(packed);
    // per column block of a task: gate_up's gate and up blocks (2 x 2 panels of Hp), down's 2 panels of Ip
    if (f.expands_blocks)
      eng.wdq[w].reserve(size_t(std::max(4 * f.gate_up_blocks * Hp, 2 * f.down_blocks * Ip)) * kPanel *
                         dtype_size(f.act_dtype));
  }
}

void ensure_lora_acc(Engine& eng, size_t floats) {
  const size_t n = size_t(eng.pool->size());
  eng.acc.resize(n);
  for (size_t w = 0; w < n; ++w) eng.acc[w].reserve(floats * sizeof(float));
}

Scratch scratch_of(Engine& eng, int worker) {
  return Scratch{static_cast<float*>(eng.c[worker].get()), eng.packed[worker].get(),
                 worker < int(eng.acc.size()) ? static_cast<float*>(eng.acc[worker].get()) : nullptr,
                 eng.wdq[worker].get(), worker_clock(eng, worker)};
}

namespace {

// Adds `seconds` (one call) to the profile entry `name`, made after `after` if new; returns the entry.
std::vector<std::pair<std::string, PhaseStat>>::iterator add_stat(Engine& eng, const std::string& name,
                                                                 double seconds, long after) {
  auto it = std::find_if(eng.profile.begin(), eng.profile.end(), [&](const auto& e) { return e.first == name; });
  if (it == eng.profile.end()) it = eng.profile.insert(eng.profile.begin() + after, {name, PhaseStat{}});
  it->second.calls += 1;
  it->second.seconds += seconds;
  return it;
}

const char* const kPartNames[kTaskParts] = {"tiles", "operands", "prefetch", "epilogue", "quantize A", "wait for A",
                                            "task"};

// The workers' mean seconds of each TaskPart since the last mark, as entries after the phase's (none if no task ran);
// the counters are cleared.
void add_task_parts(Engine& eng, const std::string& phase, long at, double wall, uint64_t wall_ticks) {
  double mean[kTaskParts] = {};
  const double n = double(std::max<size_t>(1, eng.task_clock.size()));
  for (TaskClock& c : eng.task_clock)
    for (int p = 0; p < kTaskParts; ++p) {
      mean[p] += double(c.ticks[p]) / n;
      c.ticks[p] = 0;
    }
  if (mean[kPartTask] + mean[kPartQuantize] == 0 || wall_ticks == 0) return;
  const double s_per_tick = wall / double(wall_ticks);
  double inside = 0;  // the parts timed inside task_gemms
  for (int p = kPartTiles; p <= kPartEpilogue; ++p) inside += mean[p];
  long after = at;
  for (int p = 0; p < kPartTask; ++p)
    if (mean[p] > 0) add_stat(eng, phase + " | " + kPartNames[p], mean[p] * s_per_tick, ++after);
  add_stat(eng, phase + " | task set-up", std::max(0.0, mean[kPartTask] - inside) * s_per_tick, ++after);
  const double busy = mean[kPartTask] + mean[kPartQuantize] + mean[kPartWait];
  add_stat(eng, phase + " | idle", std::max(0.0, double(wall_ticks) - busy) * s_per_tick, ++after);
}

}  // namespace

PhaseClock::PhaseClock(Engine& eng) : eng_(eng) {
  if (!eng.profiling) return;
  t_ = Clock::now();
  ticks_ = clock_ticks();
  eng.task_clock.resize(size_t(eng.pool->size()));
  for (TaskClock& c : eng.task_clock) c = TaskClock{};
}

void PhaseClock::mark(const char* phase) {
  if (!eng_.profiling) return;
  const Clock::time_point t = Clock::now();
  const uint64_t ticks = clock_ticks();
  const double wall = std::chrono::duration<double>(t - t_).count();
  auto it = add_stat(eng_, phase, wall, long(eng_.profile.size()));
  add_task_parts(eng_, phase, long(it - eng_.profile.begin()), wall, ticks - ticks_);
  t_ = t;
  ticks_ = ticks;
}

// ---------------------------------------------------------------- settings

void start_engine() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  if (!eng.kernels) {
    const EnvSettings& env = env_settings();
    eng.kchunk_setting = env.kchunk;
    choose_isa(eng, env.isa, true);
  }
}

std::string select_isa(const std::string& isa) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  if (!eng.kernels) eng.kchunk_setting = env_settings().kchunk;
  const bool from_env = isa.empty();
  choose_isa(eng, from_env ? env_settings().isa : isa, from_env);
  return eng.isa;
}

std::string current_isa() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return eng.isa;
}

void set_num_threads(int n) {
  if (n != 0 && !threads_ok(n))
    throw std::invalid_argument("num_threads must be 0 or " + std::string(kThreadsRule) + ", got " + std::to_string(n));
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  make_pool(eng, n == 0 ? default_threads() : n);
}

void set_numa(int setting) {
  if (setting != kNumaFromEnv && setting != kNumaAuto && setting != kNumaOff && !numa_nodes_ok(setting))
    throw std::invalid_argument(std::string("numa must be ") + kNumaRule + ", got " + std::to_string(setting));
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  const int threads = eng.pool ? eng.pool->size() : default_threads();
  eng.numa = detect_numa(setting == kNumaFromEnv ? env_settings().numa : setting);
  make_pool(eng, threads);
}

std::pair<NumaLayout, std::vector<int>> numa_info() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return {eng.numa, eng.pool->workers_per_node()};
}

ExpertNodes layer_nodes(int experts) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return expert_nodes(experts, eng.numa);
}

int num_threads() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return eng.pool->size();
}

int worker_spin_us() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return eng.pool->spin_us();
}

void set_worker_spin_us(int us) {
  if (!spin_us_ok(us))
    throw std::invalid_argument("worker spin must be >= 0 microseconds (at most " + std::to_string(kMaxSpinUs) +
                                "), got " + std::to_string(us));
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  eng.pool->set_spin_us(us);
}

int set_kchunk(int n) {
  if (n != -1 && !kchunk_ok(n))
    throw std::invalid_argument("kchunk must be " + std::string(kKChunkRule) + " (or None: the default), got " +
                                std::to_string(n));
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  const int before = eng.kchunk_setting;
  eng.kchunk_setting = n == -1 ? env_settings().kchunk : n;
  eng.kchunk = std::max(eng.kchunk_setting, 0);
  return before;
}

int kchunk() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  ensure_ready(eng);
  return eng.kchunk;
}

void set_profiling(bool on) {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  eng.profiling = on;
  eng.profile.clear();
}

std::vector<std::pair<std::string, PhaseStat>> take_profile() {
  Engine& eng = engine();
  std::lock_guard<std::mutex> lock(eng.mu);
  std::vector<std::pair<std::string, PhaseStat>> out;
  out.swap(eng.profile);
  return out;
}

}  // namespace kt_sft

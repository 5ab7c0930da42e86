// NOTE (kt-sft engine, the KT_SFT_* environment variables: one strict parser)
// Layout:    EnvSettings holds every variable the engine reads: KT_SFT_ISA, KT_SFT_THREADS, KT_SFT_KCHUNK,
//            KT_SFT_SPIN_US, KT_SFT_NUMA and the test double KT_SFT_CPU_FLAGS_FOR_TESTS (cpu_features.h). Nothing
//            else in csrc/ calls getenv.
// Algorithm: env_settings() parses all of them the first time it is called (kt_sft/engine/runtime.py calls it at
//            import, through start_engine) and keeps the result. An unset or empty variable means "not set";
//            any other value must be exactly a valid one (no trailing characters, no out-of-range numbers; strtol
//            with ERANGE and range checks, never atoi). Words (KT_SFT_ISA, KT_SFT_NUMA's auto/off) are
//            case-insensitive; KT_SFT_THREADS=0 means auto, as kt_num_threads: 0 does.
// Invariants: a bad value throws std::invalid_argument (Python ValueError) naming the variable, the value and
//            the allowed values, at import, before any layer or checkpoint is touched; until the environment is
//            fixed every later call throws the same error. The in-process setters (set_kchunk,
//            set_worker_spin_us, set_num_threads, set_numa) check their argument with the same rules (the *_ok
//            functions).
#pragma once
#include <string>
#include <vector>

namespace kt_sft {

struct EnvSettings {
  std::string isa;   // KT_SFT_ISA: "" (unset: the best path this CPU runs) or one of kIsaNames (cpu_features.h)
  int threads = 0;   // KT_SFT_THREADS: 0 unset or 0 (auto), else threads_ok
  int kchunk = -1;   // KT_SFT_KCHUNK: -1 unset, else kchunk_ok
  int spin_us = -1;  // KT_SFT_SPIN_US: -1 unset, else spin_us_ok
  int numa = -1;     // KT_SFT_NUMA: kNumaAuto (unset, "auto"), kNumaOff ("off") or a node count (numa.h)
  // KT_SFT_CPU_FLAGS_FOR_TESTS: "none" or comma-separated names of kCpuFlags, the only flags the engine may see
  bool cpu_flags_set = false;
  std::vector<std::string> cpu_flags;
};

const EnvSettings& env_settings();

// The value rules and their wording (kThreadsRule ...: what a valid value is, for error messages).
constexpr int kMaxThreads = 4096;
constexpr int kMaxKChunk = 1 << 20;
constexpr int kMaxSpinUs = 10000000;  // 10 s
inline bool threads_ok(long v) { return v >= 1 && v <= kMaxThreads; }
inline bool threads_env_ok(long v) { return v == 0 || threads_ok(v); }  // KT_SFT_THREADS=0: auto
inline bool kchunk_ok(long v) { return v >= 0 && v % 32 == 0 && v <= kMaxKChunk; }
inline bool spin_us_ok(long v) { return v >= 0 && v <= kMaxSpinUs; }
extern const char* const kThreadsRule;
extern const char* const kThreadsEnvRule;
extern const char* const kKChunkRule;
extern const char* const kSpinUsRule;
extern const char* const kNumaRule;

}  // namespace kt_sft

#include "env.h"

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdlib>
#include <stdexcept>

#include "cpu_features.h"
#include "numa.h"

namespace kt_sft {

const char* const kThreadsRule = "an integer from 1 to 4096";
const char* const kThreadsEnvRule = "0 (the physical cores of this process's CPU set, as kt_num_threads: 0) or an integer from 1 to 4096";
const char* const kKChunkRule = "0 (each task chooses) or a positive multiple of 32 up to 1048576";
const char* const kSpinUsRule = "an integer from 0 to 10000000 microseconds";
const char* const kNumaRule =
    "auto (the host's nodes), off, or a number of nodes from 1 to 64 (N > 1 on a one-node host: N virtual nodes, "
    "for testing)";

namespace {

// The value of `name`, or null when it is unset or empty.
const char* value_of(const char* name) {
  const char* v = std::getenv(name);
  return v && *v ? v : nullptr;
}

// Variable `name` holds a whole decimal integer (optional sign, no spaces or trailing characters) for which
// ok(v) holds: returns it, else throws "<name>='<text>': expected <rule> (unset or empty: <unset>)".
int parse_int(const char* name, const char* text, bool (*ok)(long), const char* rule, const char* unset) {
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text, &end, 10);
  const bool whole = end != text && *end == '\0' && errno != ERANGE && *text != ' ' && *text != '\t';
  if (!whole || !ok(v))
    throw std::invalid_argument(std::string(name) + "='" + text + "': expected " + rule + " (unset or empty: " +
                                unset + ")");
  return int(v);
}

// `text` in lower case: the ISA and NUMA words are case-insensitive (KT_SFT_ISA=AMX is amx, as kt_backend: amxbf16
// is AMXBF16).
std::string lower(const char* text) {
  std::string s(text);
  for (char& c : s) c = char(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

std::string parse_isa(const char* text) {
  const std::string want = lower(text);
  for (const char* name : kIsaNames)
    if (want == name) return want;
  throw std::invalid_argument(std::string("KT_SFT_ISA='") + text + "': unknown ISA '" + text +
                              "'; expected one of scalar, avx2, avx512, amx (unset or empty: the best path this "
                              "CPU runs)");
}

int parse_numa(const char* text) {
  if (lower(text) == "auto") return kNumaAuto;
  if (lower(text) == "off") return kNumaOff;
  if (*text >= '0' && *text <= '9') {  // digits only: "-1" and "+2" are refused like "abc"
    char* end = nullptr;
    errno = 0;
    const long v = std::strtol(text, &end, 10);
    if (*end == '\0' && errno != ERANGE && numa_nodes_ok(v)) return int(v);
  }
  throw std::invalid_argument(std::string("KT_SFT_NUMA='") + text + "': expected " + kNumaRule +
                              " (unset or empty: auto)");
}

// KT_SFT_CPU_FLAGS_FOR_TESTS: "none" or flag names of kCpuFlags separated by commas.
std::vector<std::string> parse_cpu_flags(const std::string& text) {
  std::vector<std::string> names;
  if (text == "none") return names;
  for (size_t start = 0; start <= text.size();) {
    const size_t comma = std::min(text.find(',', start), text.size());
    const std::string name = text.substr(start, comma - start);
    bool known = false;
    for (const CpuFlag& flag : kCpuFlags) known = known || name == flag.name;
    if (!known) {
      std::string all;
      for (const CpuFlag& flag : kCpuFlags) all += std::string(all.empty() ? "" : ", ") + flag.name;
      throw std::invalid_argument("KT_SFT_CPU_FLAGS_FOR_TESTS='" + text + "': unknown flag '" + name +
                                  "'; expected none or a comma-separated list of " + all +
                                  " (unset or empty: the flags this CPU has)");
    }
    names.push_back(name);
    start = comma + 1;
  }
  return names;
}

EnvSettings parse_env() {
  EnvSettings s;
  if (const char* v = value_of("KT_SFT_ISA")) s.isa = parse_isa(v);
  if (const char* v = value_of("KT_SFT_THREADS"))
    s.threads = parse_int("KT_SFT_THREADS", v, threads_env_ok, kThreadsEnvRule,
                          "the physical cores of this process's CPU set");
  if (const char* v = value_of("KT_SFT_KCHUNK"))
    s.kchunk = parse_int("KT_SFT_KCHUNK", v, kchunk_ok, kKChunkRule, "each task chooses");
  if (const char* v = value_of("KT_SFT_SPIN_US"))
    s.spin_us = parse_int("KT_SFT_SPIN_US", v, spin_us_ok, kSpinUsRule,
                          "the engine sets it, 100 or 20000 while training on a GPU");
  if (const char* v = value_of("KT_SFT_NUMA")) s.numa = parse_numa(v);
  if (const char* v = value_of("KT_SFT_CPU_FLAGS_FOR_TESTS")) {
    s.cpu_flags = parse_cpu_flags(v);
    s.cpu_flags_set = true;
  }
  return s;
}

}  // namespace

const EnvSettings& env_settings() {
  static const EnvSettings s = parse_env();  // a throw leaves it unset: the next call parses (and throws) again
  return s;
}

}  // namespace kt_sft

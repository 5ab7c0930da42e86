#include "cpu_features.h"

#include <cpuid.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <thread>
#include <utility>

#include "env.h"

namespace kt_sft {
namespace {

constexpr int kArchReqXcompPerm = 0x1023;  // <asm/prctl.h>, Linux 5.16+
constexpr int kXfeatureXtiledata = 18;

void cpuid(unsigned leaf, unsigned sub, unsigned r[4]) { __cpuid_count(leaf, sub, r[0], r[1], r[2], r[3]); }

unsigned long long xgetbv0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned r[4];
  cpuid(0, 0, r);
  const unsigned max_leaf = r[0];
  char vendor[13] = {0};
  std::memcpy(vendor, &r[1], 4);
  std::memcpy(vendor + 4, &r[3], 4);
  std::memcpy(vendor + 8, &r[2], 4);
  f.vendor = vendor;
  cpuid(0x80000000u, 0, r);
  if (r[0] >= 0x80000004u) {
    char brand[49] = {0};
    for (unsigned i = 0; i < 3; ++i) {
      cpuid(0x80000002u + i, 0, r);
      std::memcpy(brand + 16 * i, r, 16);
    }
    f.model = brand;
    while (!f.model.empty() && f.model.back() == ' ') f.model.pop_back();
    while (!f.model.empty() && f.model.front() == ' ') f.model.erase(0, 1);
  }
  if (max_leaf < 1) return f;
  cpuid(1, 0, r);
  const bool osxsave = r[2] & (1u << 27);
  f.sse42 = r[2] & (1u << 20);
  f.fma = r[2] & (1u << 12);
  f.avx = r[2] & (1u << 28);
  f.f16c = r[2] & (1u << 29);
  if (osxsave) {
    const unsigned long long xcr0 = xgetbv0();
    f.os_ymm = (xcr0 & 0x6) == 0x6;
    f.os_zmm = f.os_ymm && (xcr0 & 0xe0) == 0xe0;
    f.os_amx = (xcr0 & (3ull << 17)) == (3ull << 17);
  }
  if (max_leaf >= 7) {
    cpuid(7, 0, r);
    const unsigned max_sub = r[0];
    f.avx2 = r[1] & (1u << 5);
    f.avx512f = r[1] & (1u << 16);
    f.avx512dq = r[1] & (1u << 17);
    f.avx512bw = r[1] & (1u << 30);
    f.avx512vl = r[1] & (1u << 31);
    f.avx512vbmi = r[2] & (1u << 1);
    f.amx_bf16 = r[3] & (1u << 22);
    f.amx_tile = r[3] & (1u << 24);
    f.amx_int8 = r[3] & (1u << 25);
    if (max_sub >= 1) {
      cpuid(7, 1, r);
      f.avx512_bf16 = r[0] & (1u << 5);
    }
  }
  if (!(f.amx_tile && f.amx_bf16)) {
    f.amx_note = "CPU has no AMX-BF16";
  } else if (!f.amx_int8) {  // the amx unit's int8 GEMMs (tdpbssd); every AMX CPU so far has both
    f.amx_note = "CPU has AMX-BF16 but no AMX-INT8";
  } else if (!f.os_amx) {
    f.amx_note = "OS has not enabled the AMX tile state in XCR0";
  } else {
    // Linux hands out the 8 KiB tile state only on request; without it the first tile instruction faults.
    long rc = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata);
    if (rc == 0) {
      f.amx_permitted = true;
    } else {
      f.amx_note = std::string("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA) failed: ") + std::strerror(errno) +
                   " (Linux >= 5.16 needed)";
    }
  }
  return f;
}

// KT_SFT_CPU_FLAGS_FOR_TESTS: clear every flag of kCpuFlags not in `keep` (AMX is then unusable unless all of its
// flags stay).
CpuFeatures hide_flags(CpuFeatures f, const std::vector<std::string>& keep) {
  for (const CpuFlag& flag : kCpuFlags)
    if (std::find(keep.begin(), keep.end(), flag.name) == keep.end()) f.*flag.member = false;
  if (f.amx_permitted && !(f.amx_tile && f.amx_bf16 && f.amx_int8)) {
    f.amx_permitted = false;
    f.amx_note = "KT_SFT_CPU_FLAGS_FOR_TESTS hides the AMX flags";
  }
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = [] {
    const EnvSettings& env = env_settings();
    return env.cpu_flags_set ? hide_flags(detect(), env.cpu_flags) : detect();
  }();
  return f;
}

bool isa_supported(const std::string& isa, std::string* why) {
  const CpuFeatures& f = cpu_features();
  auto fail = [&](const std::string& m) {
    if (why) *why = m;
    return false;
  };
  // every flag the units are compiled with (setup.py): the fp8 kernels use F16C's vcvtph2ps
  const bool avx2_ok = f.avx2 && f.fma && f.f16c && f.os_ymm;
  const bool avx512_ok = avx2_ok && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_bf16 && f.os_zmm;
  if (isa == "scalar") return true;
  if (isa == "avx2")
    return avx2_ok ? true : fail(!f.os_ymm ? "OS has not enabled the YMM state" : "CPU lacks avx2/fma/f16c");
  if (isa == "avx512") {
    if (avx512_ok) return true;
    if (!f.avx512f) return fail("CPU lacks avx512f");
    if (!f.avx512_bf16) return fail("CPU lacks avx512_bf16 (e.g. Skylake/Cascade Lake: use avx2)");
    if (!f.os_zmm) return fail("OS has not enabled the ZMM state");
    return fail("CPU lacks avx512bw/vl/dq");
  }
  if (isa == "amx") {
    if (!avx512_ok) return fail("amx path also needs avx512 with avx512_bf16");
    if (!f.avx512vbmi) return fail("amx path also needs avx512vbmi (its int4-GEMM lookups; every AMX CPU has it)");
    return f.amx_permitted ? true : fail(f.amx_note);
  }
  return fail("unknown ISA '" + isa + "' (expected scalar, avx2, avx512 or amx)");
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const char* isa : kIsaNames)
    if (isa_supported(isa, nullptr)) out.push_back(isa);
  return out;
}

std::vector<int> allowed_cpus() {
  cpu_set_t set;
  CPU_ZERO(&set);
  std::vector<int> cpus;
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu)
    if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
  return cpus;
}

bool core_of(int cpu, std::string* key) {
  const std::string base = "/sys/devices/system/cpu/cpu" + std::to_string(cpu) + "/topology/";
  std::ifstream pkg(base + "physical_package_id"), core(base + "core_id");
  std::string p, c;
  if (!(pkg >> p) || !(core >> c)) return false;
  *key = p + ":" + c;
  return true;
}

int physical_cores() {
  const std::vector<int> cpus = allowed_cpus();
  if (cpus.empty()) return std::max(1, int(std::thread::hardware_concurrency()));
  std::set<std::string> cores;
  for (int cpu : cpus) {
    std::string key;
    if (!core_of(cpu, &key)) return int(cpus.size());
    cores.insert(key);
  }
  return int(cores.size());
}

}  // namespace kt_sft

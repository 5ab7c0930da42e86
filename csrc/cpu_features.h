// NOTE (kt-sft engine, run-time ISA detection)
// Detection = CPUID feature bits + the OS state the kernel enabled in XCR0 (XGETBV) + for AMX the Linux
// ARCH_REQ_XCOMP_PERM permission for XTILEDATA. Compiled with baseline flags only: this code runs before
// any ISA is known to work.
#pragma once
#include <string>
#include <vector>

namespace kt_sft {

// The kernel paths, slowest first (KT_SFT_ISA takes one of these names).
inline constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "amx"};

struct CpuFeatures {
  std::string vendor, model;
  bool sse42 = false, avx = false, avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512_bf16 = false, avx512vbmi = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_ymm = false, os_zmm = false, os_amx = false;  // XCR0 state enabled by the OS
  bool amx_permitted = false;                          // arch_prctl(ARCH_REQ_XCOMP_PERM) granted
  std::string amx_note;                                // why AMX is unusable, if it is
};

const CpuFeatures& cpu_features();                       // detected once
bool isa_supported(const std::string& isa, std::string* why);  // "scalar" | "avx2" | "avx512" | "amx"
std::vector<std::string> supported_isas();               // best last
int physical_cores();                                    // cores in this process's affinity mask
std::vector<int> allowed_cpus();                         // this process's affinity mask (empty: unknown)
bool core_of(int cpu, std::string* key);                 // "package:core" of a cpu from sysfs; false: unknown

}  // namespace kt_sft

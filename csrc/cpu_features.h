// NOTE (kt-sft engine, run-time ISA detection)
// Detection = CPUID feature bits + the OS state the kernel enabled in XCR0 (XGETBV) + for AMX the Linux
// ARCH_REQ_XCOMP_PERM permission for XTILEDATA. Compiled with baseline flags only: this code runs before
// any ISA is known to work.
// Test double: KT_SFT_CPU_FLAGS_FOR_TESTS (env.h) names the only feature flags of kCpuFlags the engine may see
// (e.g. "avx2,fma,f16c": a CPU without AVX512 or AMX). It can only hide flags the CPU has, never add one, so it
// cannot lead to an instruction the CPU lacks; tests use it to check dispatch on hosts that have more.
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

// The CPUID feature flags the kernel paths depend on, by name (cpu_info(), KT_SFT_CPU_FLAGS_FOR_TESTS).
struct CpuFlag {
  const char* name;
  bool CpuFeatures::*member;
};
inline constexpr CpuFlag kCpuFlags[] = {
    {"avx2", &CpuFeatures::avx2},           {"fma", &CpuFeatures::fma},
    {"f16c", &CpuFeatures::f16c},           {"avx512f", &CpuFeatures::avx512f},
    {"avx512bw", &CpuFeatures::avx512bw},   {"avx512vl", &CpuFeatures::avx512vl},
    {"avx512dq", &CpuFeatures::avx512dq},   {"avx512_bf16", &CpuFeatures::avx512_bf16},
    {"avx512vbmi", &CpuFeatures::avx512vbmi}, {"amx_tile", &CpuFeatures::amx_tile},
    {"amx_bf16", &CpuFeatures::amx_bf16},   {"amx_int8", &CpuFeatures::amx_int8},
};

const CpuFeatures& cpu_features();                       // detected once (KT_SFT_CPU_FLAGS_FOR_TESTS applied)
bool isa_supported(const std::string& isa, std::string* why);  // "scalar" | "avx2" | "avx512" | "amx"
std::vector<std::string> supported_isas();               // best last
int physical_cores();                                    // cores in this process's affinity mask
std::vector<int> allowed_cpus();                         // this process's affinity mask (empty: unknown)
bool core_of(int cpu, std::string* key);                 // "package:core" of a cpu from sysfs; false: unknown

}  // namespace kt_sft

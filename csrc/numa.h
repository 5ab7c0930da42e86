// NOTE (kt-sft engine, NUMA: the nodes the engine uses, the experts' places on them, memory bound to a node)
// Layout:    NumaLayout: the nodes the engine runs on (at least one), each with the cpus of this process's CPU set
//            on it, their physical cores, and the kernel node whose memory holds its experts (-1: memory is not
//            bound). ExpertNodes: one layer's experts cut into contiguous ranges, expert e on node e * N / E (every
//            expert of a layer weighs the same, so equal counts are equal bytes). PlacedMemory: page-aligned
//            anonymous memory that nothing touches before packing writes it, so the policy set on a range decides
//            where its pages land; or a caller's memory adopted in its place (a host's shared expert store,
//            shared_segment.h), which it then neither owns nor unmaps.
// Algorithm: detect_numa reads /sys/devices/system/node (online nodes, each node's cpulist, has_memory; no libnuma)
//            and this process's CPU set. The setting (KT_SFT_NUMA, env.h; set_numa): auto uses the host's nodes when
//            the CPU set spans more than one; off (or 1) one node; N > 1 on a host (or CPU set) of one node splits
//            its cores into N virtual nodes, for testing the split (their memory stays on the one node; cores are
//            shared when there are fewer than N). bind_range sets MPOL_PREFERRED through the raw mbind syscall:
//            a node short of memory spills to another instead of the OOM killer taking the run (MPOL_BIND would).
// Invariants: nothing here throws or aborts: a failure (no sysfs, an unreadable list, mbind refused) degrades to
//            one node, or to unbound memory, with the reason in NumaLayout::reason / placement_failure(), which
//            `python -m kt_sft env` prints. The split never changes results: a task computes the same wherever it
//            runs (tests/test_engine_numa.py checks bitwise equality).
#pragma once
#include <cstddef>
#include <string>
#include <vector>

namespace kt_sft {

// Settings (EnvSettings::numa, set_numa): kNumaAuto, kNumaOff, or a node count 1..kMaxNumaNodes.
constexpr int kNumaAuto = -1;
constexpr int kNumaOff = 0;
constexpr int kMaxNumaNodes = 64;
inline bool numa_nodes_ok(long v) { return v >= 1 && v <= kMaxNumaNodes; }
std::string numa_setting_name(int setting);  // "auto", "off" or the count

struct NumaNode {
  int memory_node = -1;   // kernel node its experts' pages are bound to (-1: not bound)
  std::vector<int> cpus;  // this process's cpus on it (virtual nodes with fewer cores than nodes share some)
  int cores = 0;          // physical cores among them (what the pool's workers are split by)
};

struct NumaLayout {
  int setting = kNumaAuto;
  std::vector<NumaNode> nodes;  // at least one
  bool virtual_nodes = false;   // nodes split from one node's cores
  std::string reason;           // why the layout is not the setting taken at its word ("" when it is)
};

// The layout for a setting on this host; never throws.
NumaLayout detect_numa(int setting);

// A layer's experts over the nodes of a layout.
struct ExpertNodes {
  std::vector<int> first;        // [N + 1]: node n holds experts [first[n], first[n + 1])
  std::vector<int> memory_node;  // [N]: the kernel node its experts' weights are bound to (-1: not bound)
  int count() const { return int(memory_node.size()); }
};
ExpertNodes expert_nodes(int experts, const NumaLayout& layout);

// Sets MPOL_PREFERRED for `node` on the pages of [addr, addr + bytes) (addr page-aligned); false with why on failure.
bool bind_range(void* addr, size_t bytes, int node, std::string* why);
// The first failure of a binding since the process started ("" when none).
std::string placement_failure();

// Page-aligned memory from mmap, untouched until first written (the interface of Buffer, buffer.h), or adopted.
class PlacedMemory {
 public:
  PlacedMemory() = default;
  ~PlacedMemory();
  PlacedMemory(const PlacedMemory&) = delete;
  PlacedMemory& operator=(const PlacedMemory&) = delete;
  void* reserve(size_t bytes);  // contents are not kept when it grows
  // Uses [ptr, ptr + bytes) (page-aligned, owned by the caller and outliving this object) from now on; its own
  // mapping, if any, is given back. reserve() on adopted memory refuses to grow it.
  void adopt(void* ptr, size_t bytes);
  void* get() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  // Binds each node's experts ([first[n], first[n + 1]) x unit bytes from the start) to its memory node; a page
  // shared by two ranges goes with the lower node. Failures are recorded (placement_failure), never thrown.
  void place(size_t unit, const ExpertNodes& nodes);

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;  // mapped length (whole pages)
  bool owned_ = true;  // false: adopted, never unmapped here
};

}  // namespace kt_sft

#include "numa.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <new>
#include <stdexcept>

#include "cpu_features.h"

namespace kt_sft {
namespace {

constexpr int kMpolPreferred = 1;  // <linux/mempolicy.h>
const char* const kNodeDir = "/sys/devices/system/node/";

// "0-3,8,10-11" -> {0, 1, 2, 3, 8, 10, 11}; false for anything else ("" is the empty list).
bool parse_list(const std::string& text, std::vector<int>* out) {
  out->clear();
  size_t at = 0;
  while (at < text.size()) {
    size_t end = text.find(',', at);
    if (end == std::string::npos) end = text.size();
    const std::string item = text.substr(at, end - at);
    const size_t dash = item.find('-');
    char* stop = nullptr;
    const long lo = std::strtol(item.c_str(), &stop, 10);
    const long hi = dash == std::string::npos ? lo : std::strtol(item.c_str() + dash + 1, &stop, 10);
    if (item.empty() || *stop != '\0' || lo < 0 || hi < lo || hi > (1 << 20)) return false;
    for (long v = lo; v <= hi; ++v) out->push_back(int(v));
    at = end + 1;
  }
  return true;
}

// The list in file `name` of the node directory; false (why set) when it cannot be read or parsed.
bool read_list(const std::string& name, std::vector<int>* out, std::string* why) {
  std::ifstream f(kNodeDir + name);
  std::string text;
  if (!f || !std::getline(f, text) || !parse_list(text, out)) {
    *why = "cannot read " + std::string(kNodeDir) + name;
    return false;
  }
  return true;
}

// cpus grouped by physical core (hyperthreads together), cores in order of their first cpu.
std::vector<std::vector<int>> cores_of(const std::vector<int>& cpus) {
  std::vector<std::vector<int>> cores;
  std::map<std::string, size_t> index;
  for (int cpu : cpus) {
    std::string key;
    if (!core_of(cpu, &key)) key = "cpu" + std::to_string(cpu);
    auto it = index.find(key);
    if (it == index.end()) it = index.emplace(key, cores.size()).first, cores.emplace_back();
    cores[it->second].push_back(cpu);
  }
  return cores;
}

NumaNode make_node(int memory_node, std::vector<int> cpus) {
  NumaNode n;
  n.memory_node = memory_node;
  n.cores = int(cores_of(cpus).size());
  n.cpus = std::move(cpus);
  return n;
}

// The host's nodes that hold cpus of this process (with memory_node -1 for a node without memory); empty and why
// when sysfs does not say.
std::vector<NumaNode> host_nodes(const std::vector<int>& allowed, std::string* why) {
  std::vector<int> online, with_memory, cpus;
  if (!read_list("online", &online, why)) return {};
  if (!read_list("has_memory", &with_memory, why)) with_memory = online;  // older kernels: assume all have memory
  std::vector<NumaNode> nodes;
  for (int id : online) {
    if (!read_list("node" + std::to_string(id) + "/cpulist", &cpus, why)) return {};
    std::vector<int> mine;
    for (int cpu : cpus)
      if (std::find(allowed.begin(), allowed.end(), cpu) != allowed.end()) mine.push_back(cpu);
    const bool memory = std::find(with_memory.begin(), with_memory.end(), id) != with_memory.end();
    if (!mine.empty()) nodes.push_back(make_node(memory ? id : -1, std::move(mine)));
  }
  if (nodes.empty()) *why = "no online node holds a cpu of this process";
  return nodes;
}

// n virtual nodes over the cores of `node`: contiguous core ranges, or one core each round-robin when fewer cores.
std::vector<NumaNode> split_node(const NumaNode& node, int n) {
  const std::vector<std::vector<int>> cores = cores_of(node.cpus);
  const int C = int(cores.size());
  std::vector<NumaNode> out;
  for (int i = 0; i < n; ++i) {
    std::vector<int> cpus;
    const int c0 = C >= n ? i * C / n : i % C, c1 = C >= n ? (i + 1) * C / n : c0 + 1;
    for (int c = c0; c < c1; ++c) cpus.insert(cpus.end(), cores[size_t(c)].begin(), cores[size_t(c)].end());
    out.push_back(make_node(node.memory_node, std::move(cpus)));
  }
  return out;
}

// Can this process bind memory to `node`? (Containers may refuse mbind: seccomp, no CAP_SYS_NICE for some policies.)
bool binding_works(int node, std::string* why) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  void* p = mmap(nullptr, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    *why = std::string("mmap failed: ") + std::strerror(errno);
    return false;
  }
  const bool ok = bind_range(p, page, node, why);
  munmap(p, page);
  return ok;
}

// The kernel node of the first node that has memory (-1: none has).
int first_memory_node(const std::vector<NumaNode>& nodes) {
  for (const NumaNode& n : nodes)
    if (n.memory_node >= 0) return n.memory_node;
  return -1;
}

std::mutex failure_mu;
std::string first_failure;

void record_failure(const std::string& why) {
  std::lock_guard<std::mutex> lock(failure_mu);
  if (first_failure.empty()) first_failure = why;
}

}  // namespace

std::string numa_setting_name(int setting) {
  return setting == kNumaAuto ? "auto" : setting == kNumaOff ? "off" : std::to_string(setting);
}

NumaLayout detect_numa(int setting) {
  NumaLayout l;
  l.setting = setting;
  const std::vector<int> allowed = allowed_cpus();
  std::string why;
  std::vector<NumaNode> host = allowed.empty() ? std::vector<NumaNode>{} : host_nodes(allowed, &why);
  if (allowed.empty()) why = "this process's CPU set is unknown (sched_getaffinity failed)";
  const int want = setting == kNumaAuto ? int(host.size()) : std::max(setting, 1);
  const NumaNode one = make_node(host.size() == 1 ? host[0].memory_node : -1, allowed);
  if (setting == kNumaOff || setting == 1) {
    l.reason = "the setting is " + numa_setting_name(setting);
  } else if (host.size() > 1 && first_memory_node(host) >= 0 && !binding_works(first_memory_node(host), &why)) {
    l.reason = why + ": one node";
  } else if (host.size() > 1) {
    l.nodes = host;
    if (setting != kNumaAuto && want != int(host.size()))
      l.reason = "the setting is " + std::to_string(want) + " but this process's cpus span " +
                 std::to_string(host.size()) + " nodes of the host: those are used (virtual nodes split one node)";
  } else if (setting == kNumaAuto) {
    l.reason = host.empty() ? why + ": one node" : "this process's cpus lie on one node (node " +
                                                       std::to_string(host[0].memory_node) + ")";
  } else if (allowed.empty()) {  // nothing to split
    l.reason = why + ": one node";
  } else {  // N > 1 virtual nodes of one
    l.nodes = split_node(one, want);
    l.virtual_nodes = true;
    l.reason = std::to_string(want) + " virtual nodes over the " + std::to_string(one.cores) +
               " cores of one node (for testing)" + (one.cores < want ? ", sharing cores" : "");
    if (one.memory_node >= 0 && !binding_works(one.memory_node, &why)) {
      for (NumaNode& n : l.nodes) n.memory_node = -1;
      l.reason += "; memory not bound (" + why + ")";
    }
  }
  if (l.nodes.empty()) l.nodes.push_back(one);  // one node: expert_nodes binds nothing
  return l;
}

ExpertNodes expert_nodes(int experts, const NumaLayout& layout) {
  ExpertNodes en;
  const int N = int(layout.nodes.size());
  for (int n = 0; n <= N; ++n) en.first.push_back(int((int64_t(n) * experts + N - 1) / N));  // e on e * N / E
  for (const NumaNode& node : layout.nodes) en.memory_node.push_back(N > 1 ? node.memory_node : -1);
  return en;
}

bool bind_range(void* addr, size_t bytes, int node, std::string* why) {
  if (node < 0 || node >= 64 * 16) {
    *why = "node " + std::to_string(node) + " is outside the mask";
    return false;
  }
  unsigned long mask[16] = {};
  mask[node / 64] = 1ul << (node % 64);
  if (syscall(SYS_mbind, addr, bytes, kMpolPreferred, mask, 64 * 16 + 1, 0u) == 0) return true;
  *why = "mbind to node " + std::to_string(node) + " failed: " + std::strerror(errno);
  return false;
}

std::string placement_failure() {
  std::lock_guard<std::mutex> lock(failure_mu);
  return first_failure;
}

PlacedMemory::~PlacedMemory() {
  if (ptr_ && owned_) munmap(ptr_, bytes_);
}

void* PlacedMemory::reserve(size_t bytes) {
  if (bytes <= bytes_) return ptr_;
  if (!owned_) throw std::logic_error("PlacedMemory: adopted memory cannot grow");
  if (ptr_) munmap(ptr_, bytes_);
  ptr_ = nullptr;
  bytes_ = 0;
  const size_t page = size_t(sysconf(_SC_PAGESIZE)), mapped = (bytes + page - 1) / page * page;
  void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
  ptr_ = p;
  bytes_ = mapped;
  return ptr_;
}

void PlacedMemory::adopt(void* ptr, size_t bytes) {
  if (ptr_ && owned_) munmap(ptr_, bytes_);
  ptr_ = ptr;
  bytes_ = bytes;
  owned_ = false;
}

void PlacedMemory::place(size_t unit, const ExpertNodes& nodes) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const auto page_up = [&](size_t b) { return std::min(bytes_, (b + page - 1) / page * page); };
  for (int n = 0; n < nodes.count(); ++n) {
    const size_t begin = page_up(size_t(nodes.first[size_t(n)]) * unit);
    const size_t end = page_up(size_t(nodes.first[size_t(n) + 1]) * unit);
    std::string why;
    if (nodes.memory_node[size_t(n)] >= 0 && end > begin &&
        !bind_range(static_cast<char*>(ptr_) + begin, end - begin, nodes.memory_node[size_t(n)], &why))
      record_failure(why);
  }
}

}  // namespace kt_sft

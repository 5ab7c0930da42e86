// NOTE (kt-sft engine, Python bindings)
// The module never sees torch: tensors arrive as integer data pointers plus sizes, and kt_sft/engine checks
// dtype, shape, device and contiguity before every call. Compute calls release the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>

#include "build_info.h"
#include "cpu_features.h"
#include "engine.h"
#include "env.h"
#include "moe_layer.h"

namespace py = pybind11;
using namespace kt_sft;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

int dtype_code(const std::string& name) {
  if (name == "float32") return kF32;
  if (name == "bfloat16") return kBF16;
  if (name == "float16") return kF16;
  throw std::invalid_argument("unsupported dtype '" + name + "' (expected float32, bfloat16 or float16)");
}

// LoRA arguments from Python: ranks (r_gu, r_d), scales (s_gu, s_d), factor pointers (A_gu, B_gu, A_d, B_d);
// kt_sft/engine/checks.py has validated dtype (fp32), device, contiguity and shapes.
LoraArgs lora_args(const std::vector<int>& ranks, const std::vector<double>& scales,
                   const std::vector<uintptr_t>& ptrs) {
  if (ranks.size() != 2 || scales.size() != 2 || ptrs.size() != 4)
    throw std::invalid_argument("lora: expected 2 ranks, 2 scales and 4 factor pointers");
  LoraArgs a;
  a.r_gu = ranks[0];
  a.r_d = ranks[1];
  a.s_gu = float(scales[0]);
  a.s_d = float(scales[1]);
  a.A_gu = ptr<const float>(ptrs[0]);
  a.B_gu = ptr<const float>(ptrs[1]);
  a.A_d = ptr<const float>(ptrs[2]);
  a.B_d = ptr<const float>(ptrs[3]);
  return a;
}

py::dict cpu_info() {
  const CpuFeatures& f = cpu_features();
  py::dict d;
  d["vendor"] = f.vendor;
  d["model"] = f.model;
  py::dict flags;
  for (const CpuFlag& flag : kCpuFlags) flags[flag.name] = f.*flag.member;
  d["flags"] = flags;
  py::dict os;
  os["ymm"] = f.os_ymm;
  os["zmm"] = f.os_zmm;
  os["amx_tiles"] = f.os_amx;
  os["amx_permitted"] = f.amx_permitted;
  d["os"] = os;
  d["amx_note"] = f.amx_note;
  d["physical_cores"] = physical_cores();
  const EnvSettings& env = env_settings();  // cpu_features() parsed it already
  d["flags_for_tests"] = env.cpu_flags_set ? py::cast(env.cpu_flags) : py::none();
  return d;
}

// numa_info(): the layout in effect (numa.h) and the pool's workers on each node.
py::dict numa_dict() {
  const std::pair<NumaLayout, std::vector<int>> info = numa_info();
  const NumaLayout& l = info.first;
  py::list nodes;
  for (size_t n = 0; n < l.nodes.size(); ++n) {
    py::dict d;
    d["memory_node"] = l.nodes[n].memory_node;
    d["cpus"] = l.nodes[n].cpus;
    d["cores"] = l.nodes[n].cores;
    d["workers"] = info.second[n];
    nodes.append(d);
  }
  py::dict d;
  d["setting"] = numa_setting_name(l.setting);
  d["virtual"] = l.virtual_nodes;
  d["reason"] = l.reason;
  d["placement_failure"] = placement_failure();
  d["nodes"] = nodes;
  return d;
}

// [(first expert, end, memory node or -1)] per node (ExpertNodes).
py::list node_ranges(const ExpertNodes& en) {
  py::list out;
  for (int n = 0; n < en.count(); ++n)
    out.append(py::make_tuple(en.first[size_t(n)], en.first[size_t(n) + 1], en.memory_node[size_t(n)]));
  return out;
}

const char* panel_name(PanelKind k) {
  return k == PanelKind::kF32 ? "f32" : k == PanelKind::kPairs ? "pairs" : "quads";
}

// packing.h's ProjectionLayout of each projection, by name: what kt_sft/engine/gpu_share.py unpacks panels with.
py::dict layout_dict(const MoELayer& layer) {
  py::dict out;
  for (int p = 0; p < kNumProj; ++p) {
    const ProjectionLayout& l = layer.layout(p);
    py::dict d;
    d["rows"] = l.N;
    d["cols"] = l.K;
    d["padded_rows"] = l.Np;
    d["padded_cols"] = l.Kp;
    d["panel"] = panel_name(l.panel);
    d["panel_group"] = panel_group(l.panel);  // k elements per (panel row, column) unit: 1, 2 (pairs), 4 (quads)
    d["panel_width"] = kPanel;
    d["elem_bits"] = l.elem_bits;  // 4: two weights per byte, the even k in the low nibble
    d["expert_bytes"] = l.expert_bytes;
    d["scales"] = scale_kind_name(l.scales);
    d["scale_block"] = py::make_tuple(l.scale_block_n, l.scale_block_k);
    d["scale_grid"] = py::make_tuple(l.scale_rows, l.scale_cols);  // one expert's scales, stored by column
    d["channel_scales"] = l.channel;  // also [Np] derived channel scales per expert (INT4 GEMMs; engine-only)
    d["stored"] = l.stored;  // false: the layer has no such projection (an ungated layer's gate), nothing stored
    out[proj_name(Proj(p))] = d;
  }
  return out;
}

// Module functions: CPU features and the process-wide engine settings (engine.h).
void bind_engine(py::module_& m) {
  m.def("cpu_info", &cpu_info, "CPUID / OS-state features relevant to the kernels");
  m.def("build_info_json", &build_info_json, "how this binary was built (JSON; csrc/build_info.h)");
  m.def("supported_isas", &supported_isas, "ISA paths this CPU and OS can run, best last");
  m.def(
      "isa_supported",
      [](const std::string& isa) {
        std::string why;
        bool ok = isa_supported(isa, &why);
        return py::make_tuple(ok, why);
      },
      "(ok, reason) for one ISA path");
  m.def("start", &start_engine,
        "Parse the KT_SFT_* variables and choose the ISA path; raises ValueError naming a bad variable "
        "(kt_sft.engine calls it at import)");
  m.def("select_isa", &select_isa, py::arg("isa") = "",
        "Choose the kernel path ('' = KT_SFT_ISA or the best supported); raises if the CPU cannot run it");
  m.def("current_isa", &current_isa);
  m.def("set_num_threads", &set_num_threads, py::arg("n"), "0 = KT_SFT_THREADS or physical cores");
  m.def("num_threads", &num_threads);
  m.def("set_numa", &set_numa, py::arg("setting"),
        "NUMA layout for the pool and layers made from now on: -1 auto, 0 off, N nodes, -2 KT_SFT_NUMA");
  m.def(
      "expert_nodes", [](int experts) { return node_ranges(layer_nodes(experts)); }, py::arg("experts"),
      "[(first expert, end, memory node or -1)] per node: where a layer of this many experts made now would go");
  m.def("numa_info", &numa_dict,
        "{setting, virtual, reason, placement_failure, nodes: [{memory_node, cpus, cores, workers}]}");
  m.def("worker_spin_us", &worker_spin_us, "microseconds idle workers spin before sleeping");
  m.def("set_worker_spin_us", &set_worker_spin_us, py::arg("us"), "ignored when KT_SFT_SPIN_US is set");
  m.def("set_kchunk", &set_kchunk, py::arg("n"),
        "K chunk of the task GEMMs (0 = each task chooses, else a multiple of 32; -1 = KT_SFT_KCHUNK, else 0); "
        "returns the previous setting");
  m.def("kchunk", &kchunk, "the K chunk in effect");
  m.def("set_profiling", &set_profiling, py::arg("on"), "wall time per phase of every forward/backward (clears)");
  m.def(
      "take_profile",
      [] {
        py::dict d;
        for (const auto& p : take_profile()) d[py::str(p.first)] = py::make_tuple(p.second.calls, p.second.seconds);
        return d;
      },
      "{phase: (calls, seconds)} since set_profiling / the last take_profile, then cleared");
}

// A source from Python's arguments (kt_sft/engine/layer.py has checked dtypes, shapes and strides): float rows, or
// e4m3 / int4 codes with their scales (packing.h, WeightSource).
WeightSource weight_source(uintptr_t src, const std::string& dtype, const std::vector<int64_t>& strides,
                           uintptr_t scales, const std::string& scale_dtype, const std::vector<int64_t>& scale_strides,
                           std::pair<int, int> block) {
  if (strides.size() != 3) throw std::invalid_argument("strides: expected 3 element strides (expert, row, col)");
  WeightSource s;
  s.data = ptr<const void>(src);
  s.s_e = strides[0], s.s_r = strides[1], s.s_c = strides[2];
  if (dtype != "float8_e4m3fn" && dtype != "int32") {
    s.dtype = dtype_code(dtype);
    return s;
  }
  if (scale_strides.size() != 3) throw std::invalid_argument("scale_strides: expected 3 element strides");
  s.kind = dtype == "int32" ? SourceKind::kInt4 : SourceKind::kE4m3;
  s.scales = ptr<const void>(scales);
  s.scale_dtype = dtype_code(scale_dtype);
  s.ss_e = scale_strides[0], s.ss_r = scale_strides[1], s.ss_c = scale_strides[2];
  s.block_n = block.first, s.block_k = block.second;
  return s;
}

void set_weights(MoELayer& self, int which, int e0, int n, uintptr_t src, const std::string& dtype,
                 const std::vector<int64_t>& strides, uintptr_t scales, const std::string& scale_dtype,
                 const std::vector<int64_t>& scale_strides, std::pair<int, int> block, bool keep_codes) {
  const WeightSource source = weight_source(src, dtype, strides, scales, scale_dtype, scale_strides, block);
  py::gil_scoped_release nogil;
  self.set_weights(which, e0, n, source, keep_codes);
}

using PyLayer = py::class_<MoELayer>;

// A host's shared expert store (shared_segment.h): layers that adopt a piece of it keep it mapped.
void bind_segment(py::module_& m) {
  py::class_<SharedSegment, std::shared_ptr<SharedSegment>>(m, "SharedSegment", py::module_local())
      .def(py::init<const std::string&, size_t, bool>(), py::arg("path"), py::arg("bytes"), py::arg("create"),
           "create: a new file of `bytes` mapped read-write; else the existing one (of `bytes`) mapped read-only")
      .def_property_readonly("path", &SharedSegment::path)
      .def_property_readonly("bytes", &SharedSegment::bytes)
      .def_property_readonly("writable", &SharedSegment::writable)
      .def_property_readonly("address", [](const SharedSegment& s) { return reinterpret_cast<uintptr_t>(s.data()); })
      .def("unlink", &SharedSegment::unlink, "remove the file's name (mappings stay); True when this call did");
}

// MoELayer's compute calls: forward and backward release the GIL.
void bind_compute(PyLayer& c) {
  c.def(
      "forward",
      [](MoELayer& self, int T, int k, uintptr_t x, uintptr_t ids, uintptr_t w, uintptr_t y, bool save,
         const std::vector<int>& lora_ranks, const std::vector<double>& lora_scales,
         const std::vector<uintptr_t>& lora_factors) {
        const bool lo = !lora_ranks.empty();
        const LoraArgs la = lo ? lora_args(lora_ranks, lora_scales, lora_factors) : LoraArgs{};
        py::gil_scoped_release nogil;
        return self.forward(T, k, ptr<const void>(x), ptr<const int64_t>(ids), ptr<const float>(w), ptr<void>(y),
                            save, lo ? &la : nullptr);
      },
      py::arg("T"), py::arg("k"), py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("y"),
      py::arg("save_for_backward"), py::arg("lora_ranks") = std::vector<int>{},
      py::arg("lora_scales") = std::vector<double>{}, py::arg("lora_factors") = std::vector<uintptr_t>{},
      "lora_*: empty = no LoRA; else (r_gu, r_d), (s_gu, s_d), fp32 (A_gu, B_gu, A_d, B_d) pointers (PEFT layout)")
      .def(
      "backward",
      [](MoELayer& self, uint64_t handle, int T, int k, uintptr_t dy, uintptr_t dx, uintptr_t dw,
         const std::vector<int>& lora_ranks, const std::vector<double>& lora_scales,
         const std::vector<uintptr_t>& lora_factors, const std::vector<uintptr_t>& lora_grads) {
        const bool lo = !lora_ranks.empty();
        const LoraArgs la = lo ? lora_args(lora_ranks, lora_scales, lora_factors) : LoraArgs{};
        LoraGrads lg;
        if (lo) {
          if (lora_grads.size() != 4) throw std::invalid_argument("lora_grads: expected 4 pointers");
          lg = LoraGrads{ptr<float>(lora_grads[0]), ptr<float>(lora_grads[1]), ptr<float>(lora_grads[2]),
                         ptr<float>(lora_grads[3])};
        }
        py::gil_scoped_release nogil;
        self.backward(handle, T, k, ptr<const void>(dy), ptr<void>(dx), ptr<float>(dw), lo ? &la : nullptr,
                      lo ? &lg : nullptr);
      },
      py::arg("handle"), py::arg("T"), py::arg("k"), py::arg("dy"), py::arg("dx"), py::arg("dw"),
      py::arg("lora_ranks") = std::vector<int>{}, py::arg("lora_scales") = std::vector<double>{},
      py::arg("lora_factors") = std::vector<uintptr_t>{}, py::arg("lora_grads") = std::vector<uintptr_t>{},
      "with the forward's LoRA: also writes the factor gradients (PEFT layouts, fp32) into lora_grads")
      .def("saved_lora_ranks", &MoELayer::saved_lora_ranks, py::arg("handle"))
      .def("saved_shape", &MoELayer::saved_shape, py::arg("handle"))
      .def("release", &MoELayer::release, py::arg("handle"));
}

// The MoELayer class and the WeightFormat enum (one member per formats.h row; kt_sft/engine/formats.py has one row
// per value). module_local: two builds of the engine can live in one process (benchmarks/bench_moe.py --against).
void bind_layer(py::module_& m) {
  py::enum_<WeightFormat> formats(m, "WeightFormat", py::module_local());
  for (const FormatInfo& f : kFormats) formats.value(f.name, f.format);
  py::enum_<Activation> activations(m, "Activation", py::module_local());
  for (const ActivationInfo& a : kActivations) activations.value(a.name, a.activation);
  PyLayer c(m, "MoELayer", py::module_local());
  c.def(py::init([](int E, int H, int I, WeightFormat format, std::optional<std::pair<int, int>> scale_block,
                    Activation activation, std::optional<double> limit, bool bias, int max_saved) {
         const FormatInfo& row = format_info(format);
         const std::pair<int, int> block = scale_block.value_or(std::make_pair(row.scale_block_n, row.scale_block_k));
         return new MoELayer(E, H, I, format, block.first, block.second, activation, float(limit.value_or(-1.0)),
                             bias, max_saved);
       }),
       py::arg("experts"), py::arg("hidden"), py::arg("intermediate"), py::arg("format"),
       py::arg("scale_block") = py::none(), py::arg("activation") = Activation::kSiluGLU,
       py::arg("limit") = py::none(), py::arg("bias") = false, py::arg("max_saved") = 4,
       "scale_block: (rows, columns) of weights per scale, 0 = the whole dimension (None: the format's own); "
       "activation: an Activation (csrc/activations.h), limit: its clamp limit where the row takes one; bias: "
       "gate_up and down biases (set_bias)")
      .def("set_weights", &set_weights, py::arg("which"), py::arg("expert_begin"), py::arg("n_experts"),
           py::arg("src"), py::arg("src_dtype"), py::arg("strides"), py::arg("scales") = 0,
           py::arg("scale_dtype") = "float32", py::arg("scale_strides") = std::vector<int64_t>{},
           py::arg("scale_block") = std::make_pair(1, 1), py::arg("keep_codes") = false,
           "src [n][rows][cols] of src_dtype float32 / bfloat16 / float16, or a checkpoint's codes: float8_e4m3fn "
           "bytes [n][rows][cols] or int32 words [n][rows][ceil(cols/8)] of 8 int4 nibbles (q + 8, lowest first) "
           "with scales [n][ceil(rows/bn)][ceil(cols/bk)] of scale_block (bn, bk), decoded by the engine; element "
           "strides (expert, row, col) for both. keep_codes: codes and scales kept as they are (fp8 / int4 formats, "
           "on the layer's grid)")
      .def("set_bias", [](MoELayer& self, int which, int e0, int n, uintptr_t src, int64_t ld) {
             self.set_bias(which, e0, n, ptr<const float>(src), ld);
           }, py::arg("which"), py::arg("expert_begin"), py::arg("n_experts"), py::arg("src"), py::arg("ld"),
           "src: fp32 [n][len] (len: I for gate / up, H for down) with row stride ld elements")
      .def_property_readonly("activation", [](const MoELayer& l) { return l.activation().activation; })
      .def_property_readonly("limit", [](const MoELayer& l) { return l.activation().limit; })
      .def_property_readonly("has_bias", &MoELayer::has_bias)
      .def("bias_storage", [](const MoELayer& l, bool down) {
             auto s = l.bias_storage(down);
             return std::make_pair(reinterpret_cast<uintptr_t>(s.first), s.second);
           }, py::arg("down"),
           "(address, bytes) of the fp32 biases: gate_up [E][gate_up columns: gate Ip | up Ip, ungated: up Ip] or "
           "down [E][Hp] ((0, 0) without biases)")
      .def("missing_weights", &MoELayer::missing_weights)
      // (address, bytes) of a projection's packed panels / int8 scales ((0, 0) without): read-only storage that
      // lives as long as the layer; kt_sft/engine/gpu_share.py wraps it without a copy.
      .def("panel_storage", [](const MoELayer& l, int which) {
             auto s = l.panel_storage(which);
             return std::make_pair(reinterpret_cast<uintptr_t>(s.first), s.second);
           }, py::arg("which"))
      .def("scale_storage", [](const MoELayer& l, int which) {
             auto s = l.scale_storage(which);
             return std::make_pair(reinterpret_cast<uintptr_t>(s.first), s.second);
           }, py::arg("which"))
      .def("layout", &layout_dict,
           "{gate|up|down: {rows, cols, padded_rows, padded_cols, panel, panel_group, panel_width, elem_bits, "
           "expert_bytes, scales, scale_block, scale_grid}}: how panel_storage / scale_storage are laid out")
      .def_property_readonly("padded_hidden", &MoELayer::padded_hidden)
      .def_property_readonly("padded_intermediate", &MoELayer::padded_intermediate)
      .def_property_readonly("format", &MoELayer::format)
      .def_property_readonly("experts", &MoELayer::experts)
      .def_property_readonly("hidden", &MoELayer::hidden)
      .def_property_readonly("intermediate", &MoELayer::intermediate)
      .def_property_readonly("max_saved", &MoELayer::max_saved)
      .def("grow_saved", &MoELayer::grow_saved, py::arg("n"), "at least n saved-forward slots (never fewer)")
      .def_property_readonly(
          "expert_nodes", [](const MoELayer& l) { return node_ranges(l.expert_nodes()); },
          "[(first expert, end, memory node or -1)] per NUMA node, in node order")
      .def_property_readonly("storage_bytes", &MoELayer::storage_bytes,
                             "bytes of the layer's piece of a shared segment (use_storage)")
      .def("use_storage", &MoELayer::use_storage, py::arg("segment"), py::arg("offset"), py::arg("packed"),
           "hold the packed experts in segment[offset:offset + storage_bytes] (before any set_weights); packed: "
           "another process packed them there")
      .def_property_readonly("shared", &MoELayer::shared)
      .def_property_readonly("packed_bytes", &MoELayer::packed_bytes)
      .def_property_readonly("saved_bytes", &MoELayer::saved_bytes);
  bind_compute(c);
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "kt-sft CPU MoE engine (no torch inside: raw pointers, checked by kt_sft.engine)";
  bind_engine(m);
  bind_segment(m);
  bind_layer(m);
}

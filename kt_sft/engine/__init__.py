"""Python side of the CPU MoE engine: checked wrappers and autograd glue over `kt_sft._engine`.

`ExpertLayer` owns one MoE layer's frozen routed experts (with the forwards it keeps for a checkpoint recompute
and the page-locking of its panels); `moe_experts` is the differentiable call; `GpuShare` (gpu_share.py, on top
of the core: the core never imports it) computes part of a layer's experts on a GPU when passed as `share=`.
ISA selection: `KT_SFT_ISA=scalar|avx2|avx512|amx` (default: best this CPU runs), threads: `KT_SFT_THREADS`, NUMA
nodes: `KT_SFT_NUMA` / `set_numa`.
"""
from .activations import ACTIVATIONS, ExpertActivation, get_activation
from .autograd import MoEExpertsFunction, moe_experts
from .formats import FORMATS, ExpertFormat, for_model_dtype, get_format
from .gpu_share import GpuShare
from .layer import ExpertLayer
from .lora import ExpertLoRA, ExpertLoRAGrads
from .panels import PackedPanels, ProjectionPanels
from .runtime import (available_isas, build_info, cpu_info, current_isa, expert_nodes, isa_supported, kchunk,
                      num_threads, numa_layout, phase_profile, select_isa, set_kchunk, set_num_threads, set_numa,
                      set_worker_spin_us, threads_for_cpus, usable_cpus, use_isa, use_kchunk, use_numa,
                      worker_spin_us)

__all__ = [
    "ACTIVATIONS", "ExpertActivation", "get_activation",
    "FORMATS", "ExpertFormat", "ExpertLayer", "ExpertLoRA", "for_model_dtype", "get_format", "GpuShare",
    "ExpertLoRAGrads", "MoEExpertsFunction", "moe_experts", "PackedPanels", "ProjectionPanels", "available_isas",
    "build_info", "cpu_info", "current_isa", "expert_nodes", "isa_supported", "kchunk", "num_threads",
    "numa_layout", "phase_profile", "select_isa", "set_kchunk", "set_num_threads", "set_numa", "set_worker_spin_us",
    "threads_for_cpus", "usable_cpus", "use_isa", "use_kchunk", "use_numa", "worker_spin_us",
]

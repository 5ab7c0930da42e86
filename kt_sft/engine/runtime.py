"""Process-wide engine settings: which ISA path runs, how many threads it uses, the K chunk of its GEMMs, the NUMA
nodes it runs on.

Importing this module starts the engine: it parses KT_SFT_ISA, KT_SFT_THREADS, KT_SFT_KCHUNK, KT_SFT_SPIN_US and
KT_SFT_NUMA (csrc/env.h) and chooses the ISA path, so a bad value fails here, naming the variable and what it
accepts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from typing import Iterator, Optional, Union

from .. import _engine

ISA_ORDER = ("scalar", "avx2", "avx512", "amx")

_engine.start()


def cpu_info() -> dict:
    """CPU model, the feature flags the kernels care about, and the OS state for them."""
    return _engine.cpu_info()


def build_info() -> dict:
    """How this binary was built (compiled into it by setup.py): commit, compiler, Python ABI, pybind11, base / link
    flags and each ISA unit's target flags."""
    return json.loads(_engine.build_info_json())


def available_isas() -> list[str]:
    """ISA paths this CPU and OS can run, slowest first."""
    return list(_engine.supported_isas())


def isa_supported(isa: str) -> tuple[bool, str]:
    """(True, "") when this CPU and OS can run the path, else (False, why)."""
    ok, why = _engine.isa_supported(isa)
    return bool(ok), str(why)


def select_isa(isa: str | None = None) -> str:
    """Pick the kernel path (None: `KT_SFT_ISA`, else the best available). Raises if the CPU cannot run it."""
    if isa is not None and isa not in ISA_ORDER:
        raise ValueError(f"isa={isa!r}: expected one of {', '.join(ISA_ORDER)}")
    return _engine.select_isa(isa or "")


def current_isa() -> str:
    return _engine.current_isa()


@contextlib.contextmanager
def use_isa(isa: str) -> Iterator[str]:
    """Run a block on one ISA path (tests use it to compare every path with the reference)."""
    before = current_isa()
    select_isa(isa)
    try:
        yield isa
    finally:
        select_isa(before)


def kchunk() -> int:
    """The K chunk of the engine's task GEMMs (0 = each task chooses; csrc/kernels/moe_tasks.inc, plan_k)."""
    return _engine.kchunk()


def set_kchunk(n: Optional[int]) -> Optional[int]:
    """Run the task GEMMs in K chunks of `n` (0 = each task chooses: one pass while its weight blocks fit L2, else
    chunks of about 512 KiB of weights; else a multiple of 32, int8 GEMMs rounding it up to 64, and n >= K is one
    pass; None = back to `KT_SFT_KCHUNK`, else 0). The results are bitwise the same; an experiment knob. Returns the
    previous setting."""
    if n is not None and int(n) < 0:
        raise ValueError(f"kchunk must be 0 (each task chooses) or a positive multiple of 32 (None: the default), "
                         f"got {n}")
    before = _engine.set_kchunk(-1 if n is None else int(n))
    return None if before < 0 else before


@contextlib.contextmanager
def use_kchunk(n: Optional[int]) -> Iterator[int]:
    """Run a block with the K chunk set to `n` (set_kchunk), then restore the previous setting."""
    before = set_kchunk(n)
    try:
        yield kchunk()
    finally:
        set_kchunk(before)


def set_num_threads(n: int = 0) -> None:
    """Resize the worker pool (0: `KT_SFT_THREADS`, else the physical cores of this process's CPU set)."""
    _engine.set_num_threads(int(n))


def num_threads() -> int:
    return _engine.num_threads()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity set: cpuset, taskset), SMT siblings included."""
    return len(os.sched_getaffinity(0))


def threads_for_cpus(threads: int, name: str) -> int:
    """`threads` engine threads asked for by `name` (kt_num_threads, KT_SFT_THREADS, ...), at most `usable_cpus()`.

    More threads than CPUs only time-share them, and a worker descheduled mid-phase holds up the phase's barrier for
    all the others: 3 demo training steps on 2 CPUs took 9.2 s with 999 threads against 1.0 s with 2 (issue 23).
    So a setting copied from a larger machine is clamped with a warning rather than refused: the run goes on at
    this machine's best speed. (The engine's own setters, `set_num_threads`, still take any count, for tests.)"""
    cpus = usable_cpus()
    if threads <= cpus:
        return threads
    logging.getLogger("kt_sft").warning(
        "kt-sft: %s=%d but this process may run on %d CPUs: the engine uses %d threads (more would only time-share "
        "them, several times slower); set %s to %d or less, or 0 for auto, to silence this", name, threads, cpus,
        cpus, name, cpus)
    return cpus


NumaSetting = Union[str, int]  # "auto", "off" or a number of nodes
NUMA_RULE = ("auto (the host's nodes), off, or a number of nodes from 1 to 64 (N > 1 on a one-node host: N virtual "
             "nodes, for testing)")
_NUMA_CODES = {"auto": -1, "off": 0}  # csrc/numa.h: kNumaAuto, kNumaOff


def numa_setting(value: NumaSetting, name: str = "numa") -> NumaSetting:
    """A NUMA setting as "auto", "off" or an int: those words, or a node count (an int or a string of digits); anything
    else is a ValueError naming `name` (the rule of KT_SFT_NUMA, csrc/env.cpp)."""
    text = str(value).strip()
    if not isinstance(value, bool) and text in _NUMA_CODES:
        return text
    if not isinstance(value, bool) and re.fullmatch(r"\d+", text) and 1 <= int(text) <= 64:
        return int(text)
    raise ValueError(f"{name}: expected {NUMA_RULE}, got {value!r}")


def set_numa(setting: Optional[NumaSetting]) -> None:
    """Run the engine on these NUMA nodes (None: back to `KT_SFT_NUMA`, default auto): re-detects the layout and
    rebuilds the worker pool with as many threads. Layers made afterwards place their experts on the new nodes;
    earlier ones keep theirs (correct either way: the split never changes results)."""
    code = -2 if setting is None else numa_setting(setting)
    _engine.set_numa(_NUMA_CODES.get(code, code) if isinstance(code, str) else code)


@contextlib.contextmanager
def use_numa(setting: Optional[NumaSetting]) -> Iterator[dict]:
    """Run a block on this NUMA setting (set_numa; layers made inside place their experts by it), then restore the
    previous setting (re-detected, with the pool's thread count kept)."""
    before = numa_layout()["setting"]
    set_numa(setting)
    try:
        yield numa_layout()
    finally:
        set_numa(before)


def expert_nodes(experts: int) -> list[tuple[int, int, int]]:
    """(first expert, end, memory node or -1) per NUMA node: where a layer of `experts` experts made now would go."""
    return [tuple(node) for node in _engine.expert_nodes(int(experts))]


def numa_layout() -> dict:
    """The NUMA layout in effect: {setting, virtual, reason, placement_failure, nodes: [{memory_node, cpus, cores,
    workers}]} (reason: why it is not the setting taken at its word; placement_failure: the first refused binding of
    expert memory to a node, "" when none)."""
    return _engine.numa_info()


def worker_spin_us() -> int:
    """How long idle engine workers spin before sleeping (microseconds); see `set_worker_spin_us`."""
    return _engine.worker_spin_us()


def set_worker_spin_us(us: int) -> None:
    """Idle workers spin `us` microseconds before sleeping (default 100). `moe_experts` sets 20 ms while it
    trains with its inputs on a GPU and 100 us otherwise. Ignored when `KT_SFT_SPIN_US` is set."""
    _engine.set_worker_spin_us(int(us))


@contextlib.contextmanager
def phase_profile() -> Iterator[dict]:
    """Time the engine's phases (gather, each GEMM pass, LoRA pieces, sums) of every call inside the block.

    Yields a dict that is filled at exit: {phase: (calls, seconds)}. Benchmarks use it for their breakdown."""
    result: dict = {}
    _engine.set_profiling(True)
    try:
        yield result
    finally:
        result.update({k: (int(c), float(t)) for k, (c, t) in _engine.take_profile().items()})
        _engine.set_profiling(False)

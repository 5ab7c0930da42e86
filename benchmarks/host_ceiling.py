"""This host's ceilings, measured in the calling process: the compute ceiling of the engine's GEMM micro-kernels
(bf16 and int8, with their operands in L1) and the DRAM read bandwidth (benchmarks/host_ceiling.cpp).

    python benchmarks/host_ceiling.py [--threads N] [--isa amx|avx512|avx2]

bench_moe.py --shapes measures them at the start of its run, with the engine's ISA and thread count, and puts
every row next to them. The probes are compiled here with the system g++ into a shared library (cached under
/tmp, keyed by the source's and the compiler's hash) and loaded with ctypes: the engine's own module does not
carry them. Without g++ the ceilings are n/a. Each probe checks CPUID itself and answers -1 (n/a) where this CPU
lacks its instructions, so nothing here can SIGILL.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SOURCE = Path(__file__).resolve().with_name("host_ceiling.cpp")
FLAGS = ["-O2", "-std=c++17", "-shared", "-fPIC", "-pthread"]  # no target flags: each probe carries its own
# The engine ISA's GEMM loops: bf16 GEMMs (bf16, int8, fp8, int4 decode to bf16) and int8 GEMMs (int8-gemm,
# int4-gemm). Off AMX the engine runs int8 GEMMs as plain loops (no ceiling to compare with), fp32 everywhere.
PROBES = {"amx": ("hc_amx_bf16_tflops", "hc_amx_int8_tflops"), "avx512": ("hc_avx512_bf16_tflops", None),
          "avx2": ("hc_avx2_fma_tflops", None), "scalar": (None, None)}


@dataclass(frozen=True)
class Ceilings:
    """What this host can do at most, measured once per run (None: n/a, `note` says why)."""
    isa: str
    bf16_tflops: Optional[float]   # the bf16 GEMM loop of the engine's ISA (avx2: its fp32 FMA loop)
    int8_tflops: Optional[float]   # the int8 GEMM loop (tdpbssd; TOPS counted like TFLOPS)
    bandwidth_gbs: Optional[float]  # all threads reading a buffer much larger than the last-level cache
    note: str = ""

    def compute_tflops(self, fmt) -> Optional[float]:
        """The compute ceiling of an expert format's GEMMs (an ExpertFormat of kt_sft.engine.formats)."""
        if fmt.name == "fp32":
            return None
        return self.int8_tflops if fmt.quantized_gemm else self.bf16_tflops


def compiler() -> tuple[Optional[str], str]:
    """The C++ compiler ($CXX, else g++ on PATH) and its version line, or None."""
    cxx = os.environ.get("CXX") or shutil.which("g++")
    try:
        return cxx, subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (TypeError, OSError, subprocess.SubprocessError):
        return None, ""


def library() -> tuple[Optional[ctypes.CDLL], str]:
    """The compiled probes (built on first use, then taken from /tmp) and, when there are none, why."""
    cxx, version = compiler()
    if cxx is None:
        return None, "no C++ compiler ($CXX or g++ on PATH)"
    key = hashlib.sha256(SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"kt_sft_host_ceiling-{key}.so"
    if not path.is_file():
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # concurrent runs: each writes its own, then renames
        proc = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            return None, f"{cxx} failed on {SOURCE.name}: {proc.stderr.strip()[-300:]}"
        os.replace(tmp, path)
    lib = ctypes.CDLL(str(path))
    for name in ("hc_amx_bf16_tflops", "hc_amx_int8_tflops", "hc_avx512_bf16_tflops", "hc_avx2_fma_tflops"):
        getattr(lib, name).argtypes, getattr(lib, name).restype = [ctypes.c_int, ctypes.c_double], ctypes.c_double
    lib.hc_read_gbs.argtypes, lib.hc_read_gbs.restype = [ctypes.c_int, ctypes.c_double, ctypes.c_int], ctypes.c_double
    return lib, ""


def last_level_cache_bytes() -> int:
    """The largest cache of cpu0 (sysfs), 0 when unknown."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        m = re.fullmatch(r"(\d+)([KMG]?)", f.read_text().strip())
        if m:
            sizes.append(int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    return max(sizes, default=0)


def default_read_bytes() -> int:
    """4x the last-level cache and at least 1 GiB, at most a quarter of the available memory."""
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(min(max(4 * last_level_cache_bytes(), 2**30), available // 4))


def measure(isa: str, threads: int, seconds: float = 0.2, read_bytes: int = 0) -> Ceilings:
    """The ceilings of engine ISA `isa` on `threads` threads: each compute loop in 3 passes of about `seconds`,
    the read bandwidth in 8 passes over `read_bytes` (0: default_read_bytes()); the best pass of each."""
    lib, why = library()
    if lib is None:
        return Ceilings(isa, None, None, None, why)

    def probe(name: Optional[str]) -> Optional[float]:
        value = getattr(lib, name)(threads, seconds) if name else -1.0
        return value if value > 0 else None

    bf16_name, int8_name = PROBES[isa]
    bf16, int8 = probe(bf16_name), probe(int8_name)
    gbs = lib.hc_read_gbs(threads, float(read_bytes or default_read_bytes()), 8)
    note = "" if bf16 else f"no {isa} compute ceiling"
    return Ceilings(isa, bf16, int8, gbs if gbs > 0 else None, note)


def describe(c: Ceilings) -> str:
    show = lambda v, unit: "n/a" if v is None else f"{v:.2f} {unit}"  # noqa: E731
    return (f"ceiling ({c.isa}): bf16 GEMM loop {show(c.bf16_tflops, 'TF/s')}, int8 GEMM loop "
            f"{show(c.int8_tflops, 'TOP/s')}, DRAM read {show(c.bandwidth_gbs, 'GB/s')}"
            + (f" ({c.note})" if c.note else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--isa", default="amx", choices=list(PROBES))
    p.add_argument("--seconds", type=float, default=0.2)
    p.add_argument("--read-mb", type=int, default=0, help="bandwidth buffer (default: 4x LLC, >= 1 GiB)")
    a = p.parse_args()
    print(describe(measure(a.isa, a.threads, a.seconds, a.read_mb * 2**20)))


if __name__ == "__main__":
    main()

"""One binary for every torch and every x86-64 CPU (README "Install"; scripts/build_wheel.sh, scripts/check_wheel.sh):
- the loaded engine .so (the source build here; the installed wheel's under scripts/check_wheel.sh and
  benchmarks/device_wheel.sh, which run this file against it) needs only libc and libgcc_s: no torch, CUDA, Python
  or libstdc++ library in its ELF dynamic section, read here without any tool;
- it says how it was built (compiled-in build info: commit, compiler, every ISA unit's flags, none -march=native);
- with the CPU-flags test double showing only AVX2 (a machine without AVX512 or AMX), a fresh interpreter imports
  it with KT_SFT_ISA=avx2 and trains a layer step without SIGILL, and the AVX512 path is refused by name.
"""
import os
import struct
import subprocess
import sys

import pytest

import kt_sft
import kt_sft._engine
import kt_sft.engine as ke

# What a manylinux .so may need from the system (PEP 600 policies), minus what our LINK_FLAGS link in.
ALLOWED_NEEDED = {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                  "ld-linux-x86-64.so.2"}
AVX2_ONLY = "avx2,fma,f16c"
SHT_DYNAMIC, DT_NEEDED = 6, 1


def elf_needed(path: str) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared object: the SHT_DYNAMIC section's NEEDED tags, named in the
    string table its sh_link points to."""
    data = open(path, "rb").read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path}: not an ELF64 little-endian file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    needed = []
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type != SHT_DYNAMIC:
            continue
        strtab = sections[link][4]
        for pos in range(offset, offset + size, entsize):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == DT_NEEDED:
                end = data.index(b"\0", strtab + value)
                needed.append(data[strtab + value:end].decode())
    return needed


def test_engine_needs_no_torch_cuda_python_or_libstdcxx():
    needed = elf_needed(kt_sft._engine.__file__)
    assert "libc.so.6" in needed, needed
    assert set(needed) <= ALLOWED_NEEDED, f"{kt_sft._engine.__file__} needs {sorted(set(needed) - ALLOWED_NEEDED)}"


def test_elf_reader_finds_the_needed_libraries_of_a_known_binary():
    """The reader itself, on this interpreter's own extension modules (which link libc at least)."""
    import _ctypes  # a C extension shipped with CPython

    assert "libc.so.6" in elf_needed(_ctypes.__file__)


def test_build_info_names_commit_compiler_and_every_isa_unit():
    info = ke.build_info()
    assert info["commit"] and info["compiler"] and info["pybind11"]
    assert list(info["isa_units"]) == list(ke.runtime.ISA_ORDER)
    assert info["isa_units"]["scalar"] == [] and "-mavx2" in info["isa_units"]["avx2"]
    assert "-mamx-tile" in info["isa_units"]["amx"] and "-march=x86-64" in info["base_flags"]
    flags = info["base_flags"] + info["link_flags"] + [f for unit in info["isa_units"].values() for f in unit]
    assert not [f for f in flags if "native" in f], flags


def _fresh_interpreter(code: str, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KT_SFT_")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=300)


TRAIN_STEP = """
import torch, kt_sft.engine as ke
print("isas", ",".join(ke.available_isas()), "chosen", ke.current_isa())
torch.manual_seed(0)
E, H, I, T, K = 5, 40, 24, 7, 2
layer = ke.ExpertLayer.from_fused(torch.randn(E, 2 * I, H) / 8, torch.randn(E, H, I) / 8, "fp32")
x = torch.randn(T, H, requires_grad=True)
ids = torch.randint(0, E, (T, K))
w = torch.rand(T, K, requires_grad=True)
ke.moe_experts(x, ids, w, layer).square().sum().backward()
assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
print("step ok")
"""


@pytest.mark.slow  # fresh interpreters
def test_no_avx512_cpu_imports_and_trains_on_avx2_without_sigill():
    proc = _fresh_interpreter(TRAIN_STEP, KT_SFT_ISA="avx2", KT_SFT_CPU_FLAGS_FOR_TESTS=AVX2_ONLY)
    assert proc.returncode == 0, f"returncode {proc.returncode} (SIGILL is -4)\n{proc.stderr[-2000:]}"
    assert "isas scalar,avx2 chosen avx2" in proc.stdout and "step ok" in proc.stdout


@pytest.mark.slow  # fresh interpreters
def test_flags_double_refuses_the_hidden_paths_by_name():
    proc = _fresh_interpreter("import kt_sft.engine", KT_SFT_ISA="avx512", KT_SFT_CPU_FLAGS_FOR_TESTS=AVX2_ONLY)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "KT_SFT_ISA=avx512 cannot run on this CPU: CPU lacks avx512f" in proc.stderr
    proc = _fresh_interpreter(TRAIN_STEP, KT_SFT_CPU_FLAGS_FOR_TESTS="none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "isas scalar chosen scalar" in proc.stdout

"""The AVX512 int4-GEMM expansion kernels (csrc/kernels/avx512_int4.h: code tables with packs, VBMI lookups) on any
x86 host: tests/kernels/int4_simde_check.cpp builds them on SIMDe's emulation of their instructions and checks them
against the plain definitions (moe_int4_gemm.inc), special ratios (NaN, inf, +-0, ties, clamps) included. Hosts with
AVX512 run the real instructions in the engine tests besides; this one needs g++ and libsimde-dev (Debian: apt-get
install libsimde-dev), and skips without them."""
from __future__ import annotations

import pathlib
import platform
import shutil
import subprocess

import pytest

HERE = pathlib.Path(__file__).parent
SIMDE = pathlib.Path("/usr/include/simde/x86/avx512.h")


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None
                    or not SIMDE.is_file(), reason="needs x86-64, g++ and SIMDe's headers (libsimde-dev)")
def test_avx512_int4_kernels_match_their_definitions(tmp_path):
    exe = tmp_path / "int4_simde_check"
    subprocess.run(["g++", "-std=c++17", "-O1", "-mavx2", "-mfma", "-Wall", "-Werror", "-o", str(exe),
                    str(HERE / "kernels" / "int4_simde_check.cpp")], check=True, capture_output=True, timeout=600)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith(" 0 failed"), out.stdout

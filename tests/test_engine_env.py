"""The engine's KT_SFT_* variables (csrc/env.h): a bad value makes `import kt_sft.engine` fail at once with a message
naming the variable and what it accepts (never later, inside a checkpoint load); good values work."""
import os
import subprocess
import sys

import pytest

import kt_sft.engine as ke

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # a fresh interpreter per case


def _import_engine(**env):
    """`import kt_sft.engine` in a fresh interpreter with these variables set (the others cleared)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KT_SFT_")}
    code = ("import kt_sft.engine as ke; "
            "print('threads', ke.num_threads(), 'kchunk', ke.kchunk(), 'spin', ke.worker_spin_us())")
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


@pytest.mark.parametrize("name, value, expected", [
    ("KT_SFT_ISA", "avx9", "expected one of scalar, avx2, avx512, amx"),
    ("KT_SFT_THREADS", "-1", "expected 0 (the physical cores of this process's CPU set, as kt_num_threads: 0) or "
                             "an integer from 1 to 4096"),
    ("KT_SFT_THREADS", "abc", "or an integer from 1 to 4096"),
    ("KT_SFT_THREADS", "99999999999999999999", "or an integer from 1 to 4096"),  # strtol's ERANGE, not atoi's wrap
    ("KT_SFT_THREADS", "4097", "or an integer from 1 to 4096"),
    ("KT_SFT_KCHUNK", "33", "expected 0 (each task chooses) or a positive multiple of 32"),
    ("KT_SFT_SPIN_US", "-1", "expected an integer from 0 to 10000000"),
    ("KT_SFT_SPIN_US", "abc", "expected an integer from 0 to 10000000"),
    ("KT_SFT_SPIN_US", "99999999999", "expected an integer from 0 to 10000000"),  # atoi read 1,215,752,191 us
    ("KT_SFT_SPIN_US", "5 ", "expected an integer from 0 to 10000000"),
    ("KT_SFT_NUMA", "-1", "expected auto (the host's nodes), off, or a number of nodes"),
    ("KT_SFT_CPU_FLAGS_FOR_TESTS", "avx2,avx3", "unknown flag 'avx3'; expected none or a comma-separated list of"),
    ("KT_SFT_CPU_FLAGS_FOR_TESTS", "avx2,", "unknown flag ''"),
])
def test_bad_value_fails_at_import_naming_the_variable(name, value, expected):
    proc = _import_engine(**{name: value})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ValueError: {name}='{value}': "), proc.stderr[-2000:]
    assert expected in last


def test_good_values_work():
    proc = _import_engine(KT_SFT_ISA="scalar", KT_SFT_THREADS="3", KT_SFT_KCHUNK="64", KT_SFT_SPIN_US="0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "threads 3 kchunk 64 spin 0" in proc.stdout


def test_threads_zero_means_auto_and_words_ignore_case():
    """KT_SFT_THREADS=0 is auto, as kt_num_threads: 0 is; KT_SFT_ISA / KT_SFT_NUMA words in any case."""
    auto = _import_engine()
    proc = _import_engine(KT_SFT_THREADS="0", KT_SFT_ISA="SCALAR", KT_SFT_NUMA="Off")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split("kchunk")[0] == auto.stdout.split("kchunk")[0]


def test_isa_this_cpu_cannot_run_fails_at_import():
    missing = [isa for isa in ("avx2", "avx512", "amx") if not ke.isa_supported(isa)[0]]
    if not missing:
        pytest.skip("this CPU runs every path")
    proc = _import_engine(KT_SFT_ISA=missing[-1])
    assert proc.returncode != 0
    assert f"KT_SFT_ISA={missing[-1]} cannot run on this CPU" in proc.stderr

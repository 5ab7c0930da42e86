"""The benchmark scripts still run (tiny sizes, CPU) and what they compare agrees, so a device session never
starts with a broken script: bench_moe's engine rows match its naive torch loop, bench_e2e's smoke mode trains."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    # A clean environment, except that kt_sft must import as it does here (installed, or on PYTHONPATH as on
    # the device, where the checkout is not installed).
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={"KT_SFT_THREADS": "2", "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
                               "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_bench_moe_small_rows_agree_with_the_naive_loop():
    out = _run("benchmarks/bench_moe.py", "--small", "--int8", "--lora-rank", "4", "--iters", "1")
    for name in ("kt-sft (", "kt-sft + LoRA r=4", "kt-sft int8 weights", "kt-sft int8 GEMMs", "naive torch loop"):
        assert re.search(rf"^{re.escape(name)}.*\s\d+\s*$", out, re.M), (name, out)
    y, dx = map(float, re.search(r"rel diff y ([\d.e-]+), dx ([\d.e-]+)", out).groups())
    assert y < 2e-2 and dx < 2e-2, out  # bf16 engine vs bf16 torch loop: same math
    assert re.search(r"weight memory 0\.\d+ GiB vs 0\.\d+ GiB", out)
    assert re.search(r"^ratio \(ours / naive tokens/s\): [\d.]+x", out, re.M)


def test_bench_moe_against_another_build_runs_both_in_one_process():
    """--against loads a second copy of the engine (here: this same checkout) under another package name; both
    rows and their ratio are printed, for the bf16 layer and (--int8) the int8-GEMM one, each against ours of the
    same kind. --evict-mb rewrites memory between pairs without changing the results."""
    out = _run("benchmarks/bench_moe.py", "--small", "--iters", "1", "--no-baseline", "--evict-mb", "8", "--int8",
               "--against", str(REPO))
    name = re.escape(REPO.name[:12])
    assert re.search(rf"^{name} \(\w+\)\s.*\s\d+\s*$", out, re.M), out
    assert re.search(rf"^{name} int8 GEMMs\s.*\s\d+\s*$", out, re.M), out
    assert re.search(rf"^kt-sft \(\w+\) / {name} \(\w+\) tokens/s: [\d.]+x", out, re.M), out
    assert re.search(rf"^kt-sft int8 GEMMs / {name} int8 GEMMs tokens/s: [\d.]+x", out, re.M), out
    assert "8 MB rewritten before each pair" in out


@pytest.mark.parametrize("engine_dtype", ["bf16", "int8-gemm"])
def test_bench_e2e_smoke_mode_trains(tmp_path, engine_dtype):
    out = _run("benchmarks/bench_e2e.py", "--tiny", "--dir", str(tmp_path / "ckpt"), "--engine-dtype", engine_dtype)
    if engine_dtype != "bf16":
        assert "kt-sft (ours, int8-gemm" in out and "int8 GEMMs" in out, out
    row = re.search(r"^kt-sft \(ours[^)]*\)\s+(\d+)\s.*\s([\d.]+)\s*$", out, re.M)
    assert row, out
    tokens_per_s, loss = int(row.group(1)), float(row.group(2))
    assert tokens_per_s > 0 and 3 < loss < 12, out  # a random model's loss is about ln(vocab)
    assert "target tokens/s >= 1,500" in out

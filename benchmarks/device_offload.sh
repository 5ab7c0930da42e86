#!/usr/bin/env bash
# Offload check on the device (AMX + H100): pinned LF stack, engine + offload tests on the AMX path with the
# dense layers on the GPU where a test asks for it, then the V2-Lite-shaped load/train benchmark.
# Usage there, from the repo root with .whl and .dev carried: KT_SFT_COMMIT=<rev> bash benchmarks/device_offload.sh
# [outdir]   (rows in outdir/results: add them here with `python benchmarks/report.py --add`)
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"
source .dev/prelude.sh || exit 1
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
KT_SFT_ISA=amx python3 -m pytest -q -p no:cacheprovider tests > "$out/tests_amx.log" 2>&1
echo "tests[amx, all]: $(tail -1 "$out/tests_amx.log")"; grep -E "^FAILED" "$out/tests_amx.log" | head
python3 benchmarks/bench_load.py --layers "${LAYERS:-11}" --record --results-dir "$out/results" 2>&1 | grep -v Warning | tee "$out/bench_load.log" | tail -8

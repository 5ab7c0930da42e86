#!/usr/bin/env bash
# Serving on the device (AMX + H100): generation/offload/serving tests with the dense layers on the GPU, then
# bench_decode.py (prefill + decode, ours vs stock transformers with the whole model on the H100, same run).
# Usage there, from the repo root with .whl and .dev carried: KT_SFT_COMMIT=<rev> bash benchmarks/device_serving.sh
# [outdir] [layers]   (rows in outdir/results: add them here with `python benchmarks/report.py --add`)
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; layers="${2:-27}"; mkdir -p "$out"
source .dev/prelude.sh || exit 1
export PYTHONUNBUFFERED=1
KT_SFT_BUILD_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { tail -30 "$out/install.log"; exit 1; }
KT_SFT_ISA=amx python3 -m pytest -q -p no:cacheprovider tests/test_generate_parity.py tests/test_offload_device.py \
  tests/test_llamafactory_serving.py > "$out/tests_serving.log" 2>&1
echo "tests[amx, serving]: $(tail -1 "$out/tests_serving.log")"; grep -E "^(FAILED|ERROR)" "$out/tests_serving.log" | head
python3 benchmarks/bench_decode.py --dir /tmp/v2lite-rand --layers "$layers" --record --results-dir "$out/results" 2>&1 | grep -v Warning \
  | tee "$out/bench_decode.log" | tail -12

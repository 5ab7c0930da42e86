#!/usr/bin/env bash
# Expert LoRA and int8 experts on the device (AMX): the engine LoRA / int8 tests and the PEFT-format tests on the
# AMX path, then the V2-Lite layer frozen, with expert LoRA r=8 and with int8 weights (same run; the ratios are
# LoRA's overhead and int8's speed relative to bf16), and a sweep of the GEMMs' K chunk (KT_SFT_KCHUNK).
# Usage there, from the repo root with .whl and .dev carried: KT_SFT_COMMIT=<rev> bash benchmarks/device_expert_lora.sh
# [outdir]   (rows in outdir/results: add them here with `python benchmarks/report.py --add`)
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"
source .dev/prelude.sh >/dev/null || exit 1
KT_SFT_BUILD_JOBS=16 python3 setup.py build_ext --inplace -q > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
KT_SFT_ISA=amx python3 -m pytest -q -p no:cacheprovider tests/test_engine_lora.py tests/test_expert_lora_peft.py \
  tests/test_engine_parity.py tests/test_engine_int8.py tests/test_engine_kchunk.py 2>&1 | tail -3
# K-chunked GEMMs (moe_tasks.inc gemm_rows): frozen bf16 layer at a few chunk sizes, to pick the AMX default
for kc in 0 256 384 768; do
  echo "KT_SFT_KCHUNK=$kc"; KT_SFT_KCHUNK=$kc python3 benchmarks/bench_moe.py --isa amx --tokens 4096 --no-baseline --record --results-dir "$out/results" 2>&1 | tail -2
done
python3 benchmarks/bench_moe.py --isa amx --tokens 4096 --lora-rank 8 --int8 --no-baseline --record --results-dir "$out/results" 2>&1 | tail -11

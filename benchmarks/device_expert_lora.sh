#!/usr/bin/env bash
# Expert LoRA and int8 experts on the device (AMX): the engine LoRA / int8 tests and the PEFT-format tests on the
# AMX path, then the V2-Lite layer frozen, with expert LoRA r=8 and with int8 weights (same run; the ratios are
# LoRA's overhead and int8's speed relative to bf16).
# Usage there, from the repo root with .whl and .dev carried: bash benchmarks/device_expert_lora.sh
set -uo pipefail
source .dev/prelude.sh >/dev/null || exit 1
KT_SFT_BUILD_JOBS=16 python3 setup.py build_ext --inplace -q > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
KT_SFT_ISA=amx python3 -m pytest -q -p no:cacheprovider tests/test_engine_lora.py tests/test_expert_lora_peft.py \
  tests/test_engine_parity.py tests/test_engine_int8.py 2>&1 | tail -3
python3 benchmarks/bench_moe.py --isa amx --tokens 4096 --lora-rank 8 --int8 --no-baseline 2>&1 | tail -10

#!/usr/bin/env bash
# End-to-end LoRA training on the device (AMX + H100): build in place, then bench_e2e.py on the full
# DeepSeek-V2-Lite shape (27 layers), ours (experts on the AMX engine) and stock transformers + PEFT with the whole
# model on the H100 in the same run. Fits one 10-minute call: build ~1-2 min, writing the 31 GB random checkpoint
# ~2 min, each side ~2 min. A second call reuses /tmp/v2lite-rand only if the machine stayed warm (a fresh one
# starts with an empty /tmp and writes it again).
# Usage there, from the repo root with .whl and .dev carried:
#   KT_SFT_COMMIT=<rev> bash benchmarks/device_e2e.sh [outdir] [more bench_e2e.py args, e.g. --expert-lora or
#   --format int8]   (rows in outdir/results: add them here with `python benchmarks/report.py --add`)
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"; shift $(( $# > 0 ? 1 : 0 ))
source .dev/prelude.sh || exit 1
KT_SFT_BUILD_JOBS=16 python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# --line-buffered: if the call runs out of time, what was printed so far still comes back
python3 benchmarks/bench_e2e.py --dir /tmp/v2lite-rand --layers 27 --record --results-dir "$out/results" "$@" 2>&1 | grep --line-buffered -v Warning \
  | tee "$out/bench_e2e.log"

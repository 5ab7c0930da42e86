#!/usr/bin/env bash
# Issue 25 on the device (16 AMX cores + H200): the CPU engine and the GPU share together. Builds in place, then
#   1. bench_overlap.py: one V2-Lite layer's engine part of a 0.7 split with int8 GEMMs (the case; more:
#      OVERLAP_FORMATS="int8-gemm bf16"), alone and under each interference (DMA, a launching thread with the pool
#      at N and N-1, a torch op before, the real split call) (~30 s)
#   2. bench_e2e.py on the V2-Lite shape (27 layers, 2 x 2048 tokens, gradient checkpointing), per expert format
#      one load and the variants engine only (0), all streamed (1.0) and auto, each from the same LoRA init
#      (~1.5 min per format), printing tokens/s, step ms, CPU experts ms, GPU share ms, GPU idle, peak GPU and
#      the share's breakdown (CPU waits for GPU / GPU waits for the engine, experts per call).
# Budget (estimated from the device_e2e runs): build ~1.5 min, writing the 31 GB random checkpoint ~2 min (reused
# while /tmp/v2lite-rand stays), then ~3.5 min: about 7 min in one call from a fresh machine. Shorter: LAYERS=14
# (16 GB: halves writing and loading; tokens/s then covers 14 layers, ~5 min), FORMATS=int8-gemm, OVERLAP=0.
# Usage there, from the repo root with .whl and .dev carried:
#   KT_SFT_COMMIT=<rev> bash benchmarks/device_hybrid.sh [outdir]
#   (rows in outdir/results: add them here with `python benchmarks/report.py --add`)
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"
LAYERS="${LAYERS:-27}" STEPS="${STEPS:-3}" FORMATS="${FORMATS:-bf16 int8-gemm}" VARIANTS="${VARIANTS:-0 1.0 auto}"
source .dev/prelude.sh || exit 1
KT_SFT_BUILD_JOBS=16 python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${OVERLAP:-1}" = 1 ]; then
  python3 benchmarks/bench_overlap.py --formats ${OVERLAP_FORMATS:-int8-gemm} 2>&1 | grep --line-buffered -v Warning \
    | tee "$out/bench_overlap.log"
fi
for fmt in $FORMATS; do
  echo "=== $fmt experts: gpu_experts $VARIANTS ==="
  # --line-buffered: if the call runs out of time, what was printed so far still comes back
  python3 benchmarks/bench_e2e.py --dir /tmp/v2lite-rand --layers "$LAYERS" --format "$fmt" --gpu-experts $VARIANTS \
      --steps "$STEPS" --warmup 1 --no-baseline --record --results-dir "$out/results" 2>&1 \
    | grep --line-buffered -v Warning | tee "$out/bench_e2e_$fmt.log" \
    | grep --line-buffered -E "^(kt-sft|  GPU share|  per step|target|device|LoRA|reusing|wrote|---|  step| {20,}tokens)"
done

#!/usr/bin/env bash
# Issue 25 on the device (16 AMX cores + H200 or H100): the CPU engine and the GPU share together. Builds in place, then
#   1. bench_e2e.py on the V2-Lite shape (LAYERS=14 of its 27 layers by default: 1 dense + 13 MoE, 2 x 2048 tokens,
#      gradient checkpointing), per expert format one load and the variants engine only (0), all streamed (1.0)
#      and auto, each share variant once per staging ring size (RINGS: 140 MiB = the 2 slots of before, 560 =
#      the shipped ring), each from the same LoRA init, printing tokens/s, step ms, CPU experts ms, GPU share ms,
#      GPU idle, peak GPU, the share's breakdown (CPU waits for GPU / GPU waits for the engine, experts per call)
#      and the profiled step's busy breakdown (GPU kernels alone / copies alone / both / idle; the engine's calls
#      with the GPU busy or alone) and the targets (int8 >= 8,000 tokens/s, bf16 >= 6,000, GPU idle < 20 %).
#   CHUNKS="8 16": each share variant once per number of experts per streamed chunk (default: the share's own).
#   SWEEP=1 instead: per format the tokens-per-step sweep (SHAPES, default 2x2048 4x2048 8x4096, gradient
#      checkpointing) with `auto` only: tokens/s, peak GPU and idle per size, how the stream's fixed cost amortizes
#      (~2 min per format: each size loads once; 8 x 4096 steps take a few seconds each).
#   2. with OVERLAP=1 first: bench_overlap.py, one layer's engine part of a 0.7 split alone and under each
#      interference (DMA, a launching thread, a torch op, the real split call) (~30 s; measured 2026-12-05).
# Budget from a fresh machine: build ~1.5 min, writing the 16 GB random checkpoint ~1 min (reused while
# /tmp/v2lite-rand stays), then per format ~20 s of start-up and load + the engine-only variant (~5 steps of 1.7-2.6
# s) + 4 share variants (~5 steps of ~0.8 s each, page-locking the panels once): ~6 min in one call. LAYERS=27
# doubles the load and checkpoint; FORMATS=int8-gemm, VARIANTS="1.0 auto" or RINGS=560 shorten it.
# Usage there, from the repo root with .whl and .dev carried:
#   KT_SFT_COMMIT=<rev> bash benchmarks/device_hybrid.sh [outdir]
#   (rows in outdir/results: add them here with `python benchmarks/report.py --add`)
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"
LAYERS="${LAYERS:-14}" STEPS="${STEPS:-3}" FORMATS="${FORMATS:-bf16 int8-gemm}" VARIANTS="${VARIANTS:-0 1.0 auto}"
RINGS="${RINGS:-140 560}"
source .dev/prelude.sh || exit 1
KT_SFT_BUILD_JOBS=16 python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "${OVERLAP:-0}" = 1 ]; then
  python3 benchmarks/bench_overlap.py --formats ${OVERLAP_FORMATS:-int8-gemm} 2>&1 | grep --line-buffered -v Warning \
    | tee "$out/bench_overlap.log"
fi
if [ "${SWEEP:-0}" = 1 ]; then
  for fmt in $FORMATS; do
    echo "=== $fmt experts: sweep ${SHAPES:-2x2048 4x2048 8x4096}, gpu_experts auto ==="
    python3 benchmarks/bench_e2e.py --dir /tmp/v2lite-rand --layers "$LAYERS" --format "$fmt" --gpu-experts auto \
        --sweep ${SHAPES:-2x2048 4x2048 8x4096} --steps "$STEPS" --warmup 1 --no-baseline --record \
        --results-dir "$out/results" 2>&1 | grep --line-buffered -v Warning | tee "$out/bench_e2e_sweep_$fmt.log" \
      | grep --line-buffered -E "^(  profiled step|sweep| *batch x seq| +[0-9]+ x [0-9]+|target tokens|wrote|reusing)"
  done
  exit 0
fi
for fmt in $FORMATS; do
  echo "=== $fmt experts: gpu_experts $VARIANTS, staging rings $RINGS MiB${CHUNKS:+, chunks of $CHUNKS experts} ==="
  # --line-buffered: if the call runs out of time, what was printed so far still comes back
  python3 benchmarks/bench_e2e.py --dir /tmp/v2lite-rand --layers "$LAYERS" --format "$fmt" --gpu-experts $VARIANTS \
      --ring-mb $RINGS ${CHUNKS:+--share-chunk $CHUNKS} --steps "$STEPS" --warmup 1 --no-baseline --record --results-dir "$out/results" 2>&1 \
    | grep --line-buffered -v Warning | tee "$out/bench_e2e_$fmt.log" \
    | grep --line-buffered -E "^(kt-sft|  GPU share|  profiled step|  per step|target|device|LoRA|reusing|wrote|---|  step| {20,}tokens)"
done

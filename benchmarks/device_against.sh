#!/usr/bin/env bash
# A/B of this checkout's engine against another build on the device (16-core AMX host), in one process per shape:
# build both, the AMX engine tests (and the int4 ones on avx512), then bench_moe --against at the V2-Lite and
# DeepSeek-V3 shapes, bf16, int8 GEMMs and int4 GEMMs, each line saying whether the two builds' outputs are bitwise
# equal (ours/old >= 0.97 is the no-regression bar of a refactor).
# Usage there, from the repo root: KT_SFT_COMMIT=<rev> bash benchmarks/device_against.sh BASE_CHECKOUT [outdir]
#   BASE_CHECKOUT: another kt-sft source tree, e.g. `git archive <rev> kt_sft csrc setup.py pyproject.toml` unpacked
#   into an ignored folder here and carried. Rows land in outdir/results (add them with report.py --add).
set -uo pipefail
base="$1"; out="${2:-/tmp/kt-sft-device}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
(cd "$base" && python3 setup.py build_ext --inplace -q > "$out/build_base.log" 2>&1) &
python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
wait || { tail -30 "$out/build_base.log"; exit 1; }
python3 -m kt_sft env > "$out/env.txt" 2>&1
KT_SFT_ISA=amx python3 -m pytest -q -p no:cacheprovider -m "not slow" tests/test_engine_parity.py \
  tests/test_engine_lora.py tests/test_engine_int8.py tests/test_engine_int8_compute.py tests/test_engine_kchunk.py \
  tests/test_engine_autograd.py tests/test_engine_inputs.py tests/test_gpu_share.py tests/test_engine_fp8_int4.py \
  > "$out/tests_amx.log" 2>&1
echo "tests[amx]: $(tail -1 "$out/tests_amx.log")"
KT_SFT_ISA=avx512 python3 -m pytest -q -p no:cacheprovider tests/test_engine_fp8_int4.py tests/test_engine_parity.py \
  -k int4 > "$out/tests_avx512_int4.log" 2>&1
echo "tests[avx512, int4]: $(tail -1 "$out/tests_avx512_int4.log")"
bench() {
  python3 benchmarks/bench_moe.py --isa amx --no-baseline --iters 5 --against "$base" \
    --record --results-dir "$out/results" "$@" 2>&1 | tee -a "$out/bench.log" | grep -E "tokens/s|^kt-sft|^\S+ \(amx\)|GEMMs|gemm"
}
echo "== V2-Lite shape"; bench --int8 --formats int4-gemm
echo "== DeepSeek-V3 shape"; bench --int8 --experts 256 --topk 8 --hidden 7168 --intermediate 2048
# int4 GEMMs against int8 GEMMs at V3's dimensions and rows per expert (T 4096 x k 8 / 256 = 128), 64 experts: all
# four layers of both builds fit the host's RAM
echo "== DeepSeek-V3 dimensions, 64 experts"
bench --formats int8-gemm int4-gemm --experts 64 --topk 8 --hidden 7168 --intermediate 2048 --tokens 1024

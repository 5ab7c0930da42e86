#!/usr/bin/env bash
# The engine's device check (16-core AMX host): build, parity tests on every ISA path, layer benchmarks.
# Usage there, from the repo root: KT_SFT_COMMIT=<rev> bash benchmarks/device_engine.sh [outdir]   (logs land in
# outdir, the benchmark rows in outdir/results: add them here with `python benchmarks/report.py --add`)
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
lscpu | grep -E 'Model name|^CPU\(s\)|Thread|Core|Socket|NUMA node\(s\)|L2|L3' > "$out/lscpu.txt"
python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
python3 -m kt_sft env | tee "$out/env.txt"
for isa in amx avx512 avx2 scalar; do
  KT_SFT_ISA=$isa python3 -m pytest -q -p no:cacheprovider tests/test_engine_parity.py tests/test_engine_autograd.py \
    > "$out/tests_$isa.log" 2>&1
  echo "tests[$isa]: $(tail -1 "$out/tests_$isa.log")"
done
python3 -m pytest -q -p no:cacheprovider tests > "$out/tests_all.log" 2>&1; echo "tests[all]: $(tail -1 "$out/tests_all.log")"
for args in "--isa amx" "--isa avx512" "--isa amx --tokens 1024" "--isa amx --skewed" "--isa amx --tokens 32 --no-baseline"; do
  echo "== bench_moe.py $args"; python3 benchmarks/bench_moe.py $args --record --results-dir "$out/results" 2>&1 | tee -a "$out/bench.log" | tail -7
done

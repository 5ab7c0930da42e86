#!/usr/bin/env bash
# The wheel's device check: the same wheel file CI checks (built on the dev box by `make wheel`, carried byte for byte),
# installed without a compiler into a fresh venv over the image's python3 (3.12, torch 2.11 CUDA), imports, reports
# its build, and passes the engine tests on the AMX path, then on the AVX512 path, plus tests/test_wheel.py (ELF,
# the CPU-flags double: no SIGILL with only AVX2 shown on an AMX host) and uninstalls cleanly:
# scripts/check_wheel.sh, run twice. The image has no LLaMA-Factory: the prelude's pinned stack (/tmp/site, carried
# .whl) goes first on the fresh venv's path (STACK_SITE), and the demo trains through the wheel's hook with the
# losses of this checkout's source build (built in place here), on the GPU as users run it.
# Usage there, from the repo root (carry the wheel, .whl and .dev):
#   bash benchmarks/device_wheel.sh dist/kt_sft-0.1.0-cp312-cp312-manylinux_2_34_x86_64.whl [outdir]
set -uo pipefail
wheel=${1:?usage: bash benchmarks/device_wheel.sh WHEEL [outdir]}
out="${2:-/tmp/kt-sft-device-wheel}"; mkdir -p "$out"
source .dev/prelude.sh || exit 1
KT_SFT_BUILD_JOBS=16 python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export PYTHONUNBUFFERED=1 VENV STACK_SITE=/tmp/site
VENV=$(python3 -c "import sys; print(sys.prefix)")
sha256sum "$wheel" | tee "$out/wheel.sha256"
python3 -c "import sys, torch; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda',
torch.version.cuda, torch.cuda.is_available(), '| env', sys.prefix)" | tee "$out/torch.txt"
lscpu | grep -E 'Model name|^CPU\(s\)' | tee "$out/lscpu.txt"
rc=0
for isa in amx avx512; do
  KT_SFT_ISA=$isa bash scripts/check_wheel.sh "$wheel" "$out/$isa" > "$out/check_$isa.log" 2>&1 || rc=1
  echo "== check_wheel [KT_SFT_ISA=$isa] (exit $rc so far)"; grep -E '^\[check_wheel|^kt-sft build|^  engine|FAILED' \
    "$out/check_$isa.log"
  cp "$out/$isa/tests.log" "$out/tests_$isa.log" 2>/dev/null
done
exit $rc

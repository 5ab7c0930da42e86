#!/usr/bin/env bash
# LLaMA-Factory hook on the device (AMX + H100): the pinned LF stack from the carried wheels, kt-sft installed
# the way users install it (pip, which places the USE_KT hook .pth), the hook tests on the AMX path, then the
# embedded demo through the real CLI with the dense layers on the GPU and the experts on the AMX engine.
# Usage there, from the repo root with .whl and .dev carried: bash benchmarks/device_llamafactory.sh [outdir]
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"
source .dev/prelude.sh || exit 1
export PYTHONUNBUFFERED=1
# Into the image's site-packages, a site directory, so the hook .pth is processed (PYTHONPATH entries are not).
KT_SFT_BUILD_JOBS=16 python3 -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1 \
  || { tail -30 "$out/install.log"; exit 1; }
ls "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/kt_sft-llamafactory-hook.pth || exit 1
KT_SFT_ISA=amx python3 -m pytest -q -p no:cacheprovider tests/test_llamafactory_config.py tests/test_llamafactory_cli.py \
  > "$out/tests_lf.log" 2>&1
echo "tests[amx, llamafactory hook]: $(tail -1 "$out/tests_lf.log")"; grep -E "^(FAILED|ERROR)" "$out/tests_lf.log" | head
start=$SECONDS
USE_KT=1 llamafactory-cli train examples/train_lora/demo_lora_sft_kt.yaml output_dir=/tmp/kt-sft-demo > "$out/demo.log" 2>&1
echo "demo: rc=$? wall=$((SECONDS - start))s"
grep -E "kt-sft: [0-9]+ MoE layers|train_runtime|train_loss|Figure saved" "$out/demo.log" | sed 's/.*>> //'
python3 - /tmp/kt-sft-demo <<'PY'
import json, sys
h = [e for e in json.load(open(f"{sys.argv[1]}/trainer_state.json"))["log_history"] if "loss" in e]
print(f"demo loss {h[0]['loss']} (step {h[0]['step']}) -> {h[-1]['loss']} (step {h[-1]['step']})")
cfg = json.load(open(f"{sys.argv[1]}/adapter_config.json"))
print("adapter:", cfg["peft_type"], "r", cfg["r"], "targets", sorted(cfg["target_modules"]))
PY
nvidia-smi --query-gpu=name,memory.used --format=csv,noheader

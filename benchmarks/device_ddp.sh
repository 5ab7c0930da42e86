#!/usr/bin/env bash
# Data parallel on the one-GPU device (issue 22): 1 rank, then 2 ranks sharing the GPU (gloo; NCCL refuses two ranks
# on one GPU) and the host's cores (8 engine threads each of 16), on the DeepSeek-V2-Lite shape (27 layers, bf16
# experts 28.8 GB in one shared store in /dev/shm): tokens/s of all ranks and each rank's memory, to show that the
# host holds the experts once (store Pss adds up to one copy; private RSS does not grow by 28.8 GB per rank).
# Usage there, from the repo root with .whl and .dev carried:
#   bash benchmarks/device_ddp.sh [outdir] [rank counts, default "1 2"] [-- more bench_ddp.py args, e.g. --expert-lora]
# Budget: build ~1-2 min, the random checkpoint ~2 min (reused while /tmp/v2lite-rand holds it), each rank count
# ~2-3 min (load ~30-60 s, 6 steps of 2 x 2048 tokens per rank). If one call runs short, give one rank count per call.
set -uo pipefail
out="${1:-/tmp/kt-sft-device}"; mkdir -p "$out"; shift $(( $# > 0 ? 1 : 0 ))
counts=(); while (( $# )) && [[ "$1" != "--" ]]; do counts+=("$1"); shift; done; (( $# )) && shift
(( ${#counts[@]} )) || counts=(1 2)
source .dev/prelude.sh || exit 1
KT_SFT_BUILD_JOBS=16 python3 setup.py build_ext --inplace -q > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
export PYTHONPATH="$PWD:$PYTHONPATH" PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc; free -g | head -2
# The store needs the experts' bytes in a memory file system: /dev/shm when it is large enough (containers often
# give it 64 MB), else a directory on the disk (page cache; slower to write, same to read once cached).
need=$((31 * 1024 * 1024 * 1024)); have=$(df --output=avail -B1 /dev/shm | tail -1)
if (( have < need )); then export KT_SFT_SHM_DIR=/tmp/kt-sft-store; mkdir -p "$KT_SFT_SHM_DIR"; fi
echo "store directory: ${KT_SFT_SHM_DIR:-/dev/shm} ($(df -h --output=avail "${KT_SFT_SHM_DIR:-/dev/shm}" | tail -1) free)"
for n in "${counts[@]}"; do
  echo "== $n rank(s)"
  torchrun --nproc_per_node "$n" benchmarks/bench_ddp.py --dir /tmp/v2lite-rand --same-gpu --json "$@" \
    > "$out/ddp_$n.json" 2> >(grep --line-buffered -v Warning | tee "$out/ddp_$n.log" >&2)
  ls "${KT_SFT_SHM_DIR:-/dev/shm}" | grep kt-sft-experts && echo "LEFT BEHIND: a store file" || echo "store files left: none"
done

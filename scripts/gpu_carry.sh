#!/usr/bin/env bash
# What bench/gpu_suite.py needs on the lent GPU machine (bare, offline: Python 3.12 with its own torch, timm,
# onnxruntime, transformers...; no ComfyUI, no diffusers, no insightface), made here in one ignored folder .gpu/:
#   .gpu/ComfyUI-0.33.0.tar.xz   ComfyUI 0.33.0 from ../shared/comfyui, without what no suite path reads
#                               (tokenizer data, blueprints, API nodes), carried compressed, unpacked there
#   .gpu/whl/*.whl               wheels for Python 3.12 of what that machine lacks
#
#   scripts/gpu_carry.sh          prepare .gpu/ here, print its size and the device command (carry [".gpu"])
#   scripts/gpu_carry.sh run ...  on the device: unpack, install the wheels offline, run the suite (args passed on)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
ARCHIVE_NAME=ComfyUI-0.33.0.tar.xz

# What the device lacks on the suite's paths, checked against its package list (KINDS.md): ComfyUI 0.33's in-process
# import needs comfy-aimdo, comfy-kitchen (its pure-Python wheel: the CUDA build is 58 MB), torchsde (+ trampoline)
# and av (comfy_api.latest imports it); CogVideoX needs diffusers (+ importlib_metadata); the face nodes insightface
# and kornia (+ kornia_rs). Other ComfyUI requirements (sqlalchemy, spandrel, simpleeval...) only fail optional
# comfy_extras nodes, which ComfyUI reports and skips.
WHEELS=(
  "diffusers==0.42.1" "importlib_metadata==10.2.0" "insightface==2.1" "kornia==0.9.0" "kornia_rs==0.2.0"
  "comfy-aimdo==0.4.13" "comfy-kitchen==0.2.31" "torchsde==0.2.6" "trampoline==0.1.2" "av==18.1.0"
)

prepare() {
  local src="${LIKENESS_COMFYUI_ARCHIVE:-$REPO/../shared/comfyui/$ARCHIVE_NAME}"
  [ -f "$src" ] || src="/work/shared/comfyui/$ARCHIVE_NAME"
  [ -f "$src" ] || { echo "No $ARCHIVE_NAME found (set LIKENESS_COMFYUI_ARCHIVE)" >&2; exit 1; }
  mkdir -p .gpu/whl
  grep -qx '/.gpu/' .gitignore 2>/dev/null || echo '/.gpu/' >> .gitignore
  local tmp
  tmp="$(mktemp -d)"
  tar xJf "$src" -C "$tmp"
  (cd "$tmp/ComfyUI" && rm -rf blueprints comfy_api_nodes openapi.yaml \
     && find comfy -type f \( -name '*.json' -o -name '*.txt' -o -name '*.model' \) -path '*tokenizer*' -delete)
  tar cJf ".gpu/$ARCHIVE_NAME" -C "$tmp" ComfyUI
  rm -rf "$tmp"
  local py="${PYTHON:-python3}"
  # comfy-kitchen: the pure-Python wheel (the --platform any pass); the rest: CPython 3.12 x86-64 builds
  for spec in "${WHEELS[@]}"; do
    local name="${spec%%==*}"
    if [ "$name" = "comfy-kitchen" ]; then
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform any -d .gpu/whl "$spec"
    else
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl "$spec"
    fi
  done
  rm -f .gpu/whl/comfy_kitchen-*-abi3-*.whl  # never both builds of one package
  local tree gpu
  tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
  gpu=$(du -cb .gpu | tail -1 | cut -f1)
  echo "prepared .gpu/: $(ls .gpu/whl | wc -l) wheels + ComfyUI archive = $((gpu / 1024)) KiB;" \
       "tracked files $((tree / 1024)) KiB; together $(((gpu + tree) / 1048576)) MiB of the 64 MiB a call may carry"
  echo
  echo 'device command (run tool: carry [".gpu"], timeout_s 600):'
  echo '  bash scripts/gpu_carry.sh run'
}

run_on_device() {
  [ -f ".gpu/$ARCHIVE_NAME" ] || { echo "no .gpu/ here: name .gpu in carry" >&2; exit 1; }
  local py="${PYTHON:-python3}" out="${OUT:-$REPO/bench/results}" site=/tmp/likeness-site
  mkdir -p "$out" /tmp/likeness-comfyui
  tar xJf ".gpu/$ARCHIVE_NAME" -C /tmp/likeness-comfyui
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" LIKENESS_COMFYUI=/tmp/likeness-comfyui/ComfyUI PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  set -o pipefail
  # the suite caps each part itself; this outer cap keeps the call inside the run tool's 600 s
  timeout 560 "$py" bench/gpu_suite.py --out "$out/gpu_suite.json" "$@" 2>&1 | tee "$out/gpu_suite.log"
}

case "${1:-prepare}" in
  prepare) prepare ;;
  run) shift; run_on_device "$@" ;;
  *) echo "usage: $0 [prepare | run [gpu_suite.py args]]" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Runs the whole test suite once per ComfyUI version, each with its own venv (made by setup_comfyui.sh):
# the pinned 0.3.75 always, then every other ComfyUI in LIKENESS_TEST_COMFYUIS (space-separated archives or
# folders; default: the 0.33.0 archive in ../shared/comfyui/ when it is there). Extra arguments go to pytest.
#   LIKENESS_TEST_COMFYUIS   other ComfyUIs to test, e.g. "/path/to/your/ComfyUI"
#   LIKENESS_REQUIRE_COMFYUIS=N  fail unless N ComfyUI versions were tested (CI: 2)
# Exit status: non-zero if any version's suite failed.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
log() { printf '[tests] %s\n' "$*" >&2; }

default_extra=""
[ -f "$ROOT/../shared/comfyui/ComfyUI-0.33.0.tar.xz" ] && default_extra="$ROOT/../shared/comfyui/ComfyUI-0.33.0.tar.xz"
EXTRA="${LIKENESS_TEST_COMFYUIS-$default_extra}"

declare -a names=() venvs=() dirs=()
names+=("0.3.75"); venvs+=("${LIKENESS_VENV:-$ROOT/.venv}"); dirs+=("${LIKENESS_COMFYUI:-$ROOT/.comfyui/ComfyUI}")
for src in $EXTRA; do
  dir="$(bash scripts/setup_comfyui.sh "$src")" || { log "setting up $src failed"; exit 1; }
  ver="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$dir/comfyui_version.py")"
  names+=("$ver"); venvs+=("$ROOT/.venv-$ver"); dirs+=("$dir")
done
if [ -z "$EXTRA" ]; then
  log "only ComfyUI 0.3.75 is tested: no ../shared/comfyui/ComfyUI-0.33.0.tar.xz here. To test a current ComfyUI"
  log "too, run: LIKENESS_TEST_COMFYUIS=/path/to/ComfyUI-or-archive make test"
fi
if [ -n "${LIKENESS_REQUIRE_COMFYUIS:-}" ] && [ "${#names[@]}" -lt "$LIKENESS_REQUIRE_COMFYUIS" ]; then
  log "LIKENESS_REQUIRE_COMFYUIS=$LIKENESS_REQUIRE_COMFYUIS but only ${#names[@]} ComfyUI version(s) are set up"
  exit 1
fi

status=0
summary=""
for i in "${!names[@]}"; do
  log "=== ComfyUI ${names[$i]} (${dirs[$i]}) ==="
  start=$(date +%s)
  LIKENESS_COMFYUI="${dirs[$i]}" "${venvs[$i]}/bin/python" -m pytest -q -p no:cacheprovider "$@"
  rc=$?
  took=$(( $(date +%s) - start ))
  summary+="ComfyUI ${names[$i]}: exit $rc in ${took} s"$'\n'
  [ $rc -eq 0 ] || status=1
done
printf '%s' "$summary" | sed 's/^/[tests] /' >&2
exit $status

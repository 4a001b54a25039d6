#!/usr/bin/env bash
# One call on a bare GPU box: install the carried wheels (bench/fetch-wheels.sh), time the views
# (bench/views.sh), run the matrix (bench/gpu.sh), and pack everything into $OUT/results.tgz with
# the two tables beside it (the device tool brings back at most 8 files).
#   run: bash bench/device-run.sh      (carry: .whl; about 7 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R="${OUT:?OUT must name the folder that comes back}"
WORK=/tmp/leoclr-bench
rm -rf "$WORK" && mkdir -p "$WORK/views" "$WORK/matrix"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
OUT="$WORK/views" LIMIT_R50_S="${LIMIT_R50_S:-70}" LIMIT_R18_S="${LIMIT_R18_S:-45}" bash bench/views.sh \
  >"$WORK/views.log" 2>&1
grep -hv '^\[bench-views\] \(stage\|whole\|input\)' "$WORK/views.log"
OUT="$WORK/matrix" BENCH_BUDGET_S="${BENCH_BUDGET_S:-370}" timeout "${MATRIX_LIMIT_S:-400}" bash bench/gpu.sh \
  >"$WORK/gpu.log" 2>&1
echo "gpu.sh exit $?"
grep -E '^===|^\[bench|WARNING' "$WORK/gpu.log" | cut -c1-200
cat "$WORK/matrix/table.md" 2>/dev/null
cp "$WORK/matrix/table.md" "$R/" 2>/dev/null
tar czf "$R/results.tgz" -C "$WORK" .

#!/usr/bin/env bash
# One call on a bare GPU box: install the carried wheels (bench/fetch-wheels.sh), check for the
# nvJPEG decode race (bench/decode_check.py), run the matrix (bench/gpu.sh), then,
# while DEADLINE_S allows, two probes: first the compiled ResNet-50 LeOCLR row with JPEGs decoded
# by the loader workers instead of nvJPEG (the A/B of where decoding belongs), then the ResNet-50
# views alone (each stage, and ours compiled; measured once before, so it goes last). Everything is
# packed into $OUT/results.tgz with the matrix table beside it (the device tool brings back at most
# 8 files).
#   run: bash bench/device-run.sh      (carry: .whl; ends within DEADLINE_S plus the install and a probe's limit)
# kornia against ours was measured on 2026-11-26 (docs/bench/h200-2026-11-26/); IMPLS adds it back.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
R="${OUT:?OUT must name the folder that comes back}"
DEADLINE_S="${DEADLINE_S:-520}"  # no probe starts that could end past this many seconds
WORK=/tmp/leoclr-bench
rm -rf "$WORK" && mkdir -p "$WORK/views" "$WORK/matrix" "$WORK/probe"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
left() { echo $((DEADLINE_S - SECONDS)); }

# First, as it decides how to read the rest: does a decode on the GPU land under queued kernels
# (plain), and does the feeds' decode (quiet) stay clear of them?
timeout -k 5 "${CHECK_LIMIT_S:-60}" python3 -m bench.decode_check --device cuda \
  --json "$WORK/decode-check.json" >"$WORK/decode-check.log" 2>&1
echo "decode check exit $? after ${SECONDS}s"
grep -h '^\[decode-check\]' "$WORK/decode-check.log" | cut -c1-240

OUT="$WORK/matrix" BENCH_BUDGET_S="${BENCH_BUDGET_S:-360}" timeout "${MATRIX_LIMIT_S:-390}" bash bench/gpu.sh \
  >"$WORK/gpu.log" 2>&1
echo "gpu.sh exit $? after ${SECONDS}s"
grep -E '^===|^\[bench|WARNING' "$WORK/gpu.log" | cut -c1-240
cat "$WORK/matrix/table.md" 2>/dev/null
cp "$WORK/matrix/table.md" "$R/" 2>/dev/null

# The inductor cache is warm now: these compile in seconds, not a minute.
export TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
IMPL_ARGS=()
for impl in ${IMPLS:-ours-fp16 ours-fp16-compiled}; do IMPL_ARGS+=(--impl "$impl"); done
if (($(left) > 60)); then
  timeout -k 5 $(($(left) > 120 ? 120 : $(left))) python3 -m bench.engine bench/r50-224.yaml --device cuda \
    --data jpeg --decode workers --compile --steps 30 --warmup 8 --loader-workers "${LOADER_WORKERS:-12}" \
    --max-images 1024 --json "$WORK/probe/r50-leoclr-compiled-workers-decode.json" \
    >"$WORK/probe/r50-leoclr-compiled-workers-decode.log" 2>&1
  echo "probe exit $? after ${SECONDS}s"
  grep -E '^\[bench|^\|' "$WORK/probe/r50-leoclr-compiled-workers-decode.log" | cut -c1-240
fi
if (($(left) > 45)); then
  timeout -k 5 $(($(left) > 60 ? 60 : $(left))) python3 -m bench.views bench/r50-224.yaml \
    --device cuda --jpeg "${IMPL_ARGS[@]}" --json "$WORK/views/views-r50.json" \
    >"$WORK/views/views-r50.log" 2>&1
  echo "views exit $? after ${SECONDS}s"
  grep -h '^\[bench-views\]' "$WORK/views/views-r50.log" | cut -c1-200
fi
tar czf "$R/results.tgz" -C "$WORK" .
echo "done after ${SECONDS}s"

#!/usr/bin/env bash
# Why did the compiled ResNet-18 rows run slower inside the one-process matrix (H200, 2026-11-27:
# compute-only 21,149 and 22,715 instances/s) than each in its own process the run before (30,331
# and 28,944)? Side by side on one machine, the compiled ResNet-18 LeOCLR row (06):
#   d1: matrix process of rows 05 (eager R18), 06, 08 (cold inductor cache)
#   d2: 06 alone, `python -m bench.engine` (a process of its own, warm cache)
#   d3: matrix process of rows 01 (eager R50) then 06
#   d4: matrix process of rows 02 (compiled R50) then 06, while DEADLINE_S allows
# All in one process each (`--processes one`: since this ran, the matrix gives each config its own
# process on a GPU). Each matrix row's header says what the process held when it started. Results: $OUT/diag.log
# as it goes, $OUT/diag.tgz at the end.
#   run: bash bench/device-diag.sh      (carry: .whl)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_FX_GRAPH_CACHE=1 TORCHINDUCTOR_AUTOGRAD_CACHE=1
export TORCH_LOGS="recompiles,dynamic"
R="${OUT:?OUT must name the folder that comes back}"
DEADLINE_S="${DEADLINE_S:-350}"
W=/tmp/leoclr-diag
rm -rf "$W" && mkdir -p "$W"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH="/tmp/site:$PWD"
fi
left() { echo $((DEADLINE_S - SECONDS)); }
say() { echo "$*" | tee -a "$R/diag.log"; }
show() {  # the lines that matter of one step's log
  grep -hE '^===|instances/s|as dynamic|size mismatch|Error' "$1" | grep -v '^=== .*: python' | cut -c1-260 | tee -a "$R/diag.log"
  say "dynamic marks: $(grep -c 'as dynamic' "$1")"
}
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader) $(nproc) cores"
M=(python3 -m bench.matrix --budget 600 --device cuda --loader-workers 12 --processes one)

say "--- d1: matrix 05 06 08 (cold cache) at ${SECONDS}s"
timeout -k 5 $(left) "${M[@]}" --out "$W/d1" --only 05-r18-leoclr-eager 06-r18-leoclr-compiled 08-r18-mocov2-compiled >"$W/d1.log" 2>&1
say "d1 exit $?"; show "$W/d1.log"

if (($(left) > 40)); then
  say "--- d2: bench alone, row 06's arguments, at ${SECONDS}s"
  timeout -k 5 $(left) python3 -m bench.engine bench/r18-cifar.yaml --device cuda --data synthetic --steps 60 \
    --warmup 8 --set method=leoclr --loader-workers 12 --prefetch 2 --compile-views auto --compile >"$W/d2.log" 2>&1
  say "d2 exit $?"; show "$W/d2.log"
fi
if (($(left) > 60)); then
  say "--- d3: matrix 01 06 at ${SECONDS}s"
  timeout -k 5 $(left) "${M[@]}" --out "$W/d3" --only 01-r50-leoclr-eager 06-r18-leoclr-compiled >"$W/d3.log" 2>&1
  say "d3 exit $?"; show "$W/d3.log"
fi
if (($(left) > 150)); then
  say "--- d4: matrix 02 06 at ${SECONDS}s"
  timeout -k 5 $(left) "${M[@]}" --out "$W/d4" --only 02-r50-leoclr-compiled 06-r18-leoclr-compiled >"$W/d4.log" 2>&1
  say "d4 exit $?"; show "$W/d4.log"
fi
tar czf "$R/diag.tgz" -C "$W" .
say "done after ${SECONDS}s"

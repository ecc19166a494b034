#!/bin/bash
# Issue 14's whole table in one GPU call (about 5 minutes on one H200, 2026-11-30): bench_serve.py on the 135M config (1 and 64
# streams, the static-cache + compile generate() baseline at 64, the shared-prefix workload with the prefix cache
# on and off) and on the ~1B config (1 and 64 streams and the same baseline), with the engine's step profiles.
#
# Run from a copy of the repository (the device's python3 with torch; our wheels on PYTHONPATH), e.g.
#   OUT=/tmp/out GPU_SECONDS=540 bash tests/bench/gpu_serve.sh
# Results: $OUT/serve/serve-1-135m.json and serve-2-1b.json (whole runs, rewritten after every row, so a part cut
# short by its time still renders), section.md (the rendered section; `bench_serve.py --from-json
# serve-1-135m.json serve-2-1b.json` writes it into docs/benchmarks.md), the logs, steps-*.jsonl. stdout: a summary.
#
# The generate() baselines compile while the server starts (bench_serve.py BaselineThread) and are measured
# before the server's loads, so they are in the run even when a later part is cut (SERVE_ARGS=--baselines-first
# runs them before the server instead: first in the run too, but a start's time later).
#
# Settings (environment): SERVE_TOKENIZER (a tokenizer directory; default the bundled SmolLM2 tokenizer, which
# needs the bundled GGUF), SERVE_MODEL_SMALL / SERVE_MODEL_LARGE (135m / 1b), SERVE_CONCURRENCY ("1 64"),
# SERVE_BASELINE_CONCURRENCY (64), SERVE_LARGE_ROUNDS (requests per client in the ~1B part: 2), SERVE_SHARED (64
# streams of the shared-prefix workload; SERVE_SHARED_LARGE for
# the ~1B part, the same by default), SERVE_ROUNDS (3), SERVE_PARTS ("small large": which parts run),
# SERVE_LARGE_SECONDS (the time kept for the ~1B part: 240), SERVE_ARGS (more bench_serve.py flags; on a CPU,
# e.g. "--device cpu --engine process --new-tokens 16" with tiny models checks the script itself), PY (python3).
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
R=${OUT:?set OUT to the results folder}/serve
mkdir -p "$R"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$ROOT/workers:$ROOT/operator${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
BUDGET=${GPU_SECONDS:-540}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) - ${1:-8} )); }
# On a host shared with another GPU's job, keep to the half of the cores beside our GPU.
NCPU=$(nproc)
if [ "$NCPU" -ge 32 ]; then
  case "${CUDA_VISIBLE_DEVICES:-0}" in 0*) CORES=0-$((NCPU / 2 - 1));; *) CORES=$((NCPU / 2))-$((NCPU - 1));; esac
else
  CORES=0-$((NCPU - 1))
fi
PIN="taskset -c $CORES"; command -v taskset > /dev/null || PIN=""
(nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>&1 || echo "no GPU") > "$R/gpu.txt"
echo "serve: $(head -1 "$R/gpu.txt"); cores $CORES of $NCPU; budget ${BUDGET}s"
TOK=${SERVE_TOKENIZER:+--tokenizer $SERVE_TOKENIZER}
BENCH="$PIN $PY tests/bench/bench_serve.py $TOK --concurrency ${SERVE_CONCURRENCY:-1 64} --baselines compile
  --baseline-concurrency ${SERVE_BASELINE_CONCURRENCY:-64} --rounds ${SERVE_ROUNDS:-3} --no-write ${SERVE_ARGS:-}"
SMALL=${SERVE_MODEL_SMALL:-135m}
LARGE=${SERVE_MODEL_LARGE:-1b}

PARTS=${SERVE_PARTS:-small large}
if [[ " $PARTS " == *" small "* ]]; then
  echo "== $SMALL ($(( $(date +%s) - T0 ))s)"
  timeout $(( $(left) - ${SERVE_LARGE_SECONDS:-240} )) $BENCH --models "$SMALL" --shared-concurrency "${SERVE_SHARED:-64}" \
    --profile "$R/steps-1-$SMALL.jsonl" --json "$R/serve-1-$SMALL.json" > "$R/serve-1-$SMALL.log" 2>&1
  echo "  exit $? after $(( $(date +%s) - T0 ))s"
  grep -E "up in|baselines|decode step|Error|Traceback" "$R/serve-1-$SMALL.log" | cut -c1-220 | head -8
fi
if [[ " $PARTS " == *" large "* ]]; then
  echo "== $LARGE ($(( $(date +%s) - T0 ))s)"
  timeout "$(left 12)" $BENCH --models "$LARGE" --shared-concurrency "${SERVE_SHARED_LARGE:-${SERVE_SHARED:-64}}" \
    --rounds "${SERVE_LARGE_ROUNDS:-2}" --profile "$R/steps-2-$LARGE.jsonl" --json "$R/serve-2-$LARGE.json" > "$R/serve-2-$LARGE.log" 2>&1
  echo "  exit $? after $(( $(date +%s) - T0 ))s"
  grep -E "up in|baselines|decode step|Error|Traceback" "$R/serve-2-$LARGE.log" | cut -c1-220 | head -8
fi

JSONS=$(ls "$R"/serve-*.json 2> /dev/null)
if [ -n "$JSONS" ]; then
  $PY tests/bench/bench_serve.py --from-json $JSONS --summary
  $PY tests/bench/bench_serve.py --from-json $JSONS --no-write > "$R/section.md" 2>&1
  grep -E "^- |^  \(" "$R/section.md"
fi
echo "== done ($(( $(date +%s) - T0 ))s)"

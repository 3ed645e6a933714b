#!/usr/bin/env bash
# One device call: the decode step that computes full hits and prefetched experts during the layer's copies
# ("early", decode.READY_FFNS_DURING_COPIES = True) against the default, which computes them after the copies'
# wait, at full size on one GPU: Qwen3-30B-A3B at 25 %, calibrated routing, batch 1; lru and moepic with the
# planner's choices, each also with :early.
#   bash benchmarks/experiments/direct/early_late_gpu.sh OUT_DIR [MODEL] [FRACTION]
set -u
OUT="${1:?results folder}"
MODEL="${2:-qwen3}"
F="${3:-0.25}"
SKIP_EXACT=1 NO_RESIDENT=1 BENCH_TIMEOUT=540 BENCH_LIMIT=510 bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" \
  "$MODEL" "$F" lru,moepic "lru:$F:early,moepic:$F:early"
python -m benchmarks.experiments.rows "$OUT"/*.json

#!/usr/bin/env bash
# One device call: Qwen3-30B-A3B with the default decode step (moepic at 10 / 25 / 50 %, lru at 25 %), then
# Qwen3-30B-A3B with int4 experts at the 25 % point's VRAM budget, then Mixtral-8x7B with int4 experts at a budget
# that fits a 24 GB card (0.65 of the int4 experts' bytes). Calibrated routing, batch 1.
#   bash benchmarks/experiments/quant/qwen3_mixtral_gpu.sh OUT_DIR      (carry wheels/ for qwix)
set -u
OUT="${1:?results folder}"
pip install --no-deps --no-index -q wheels/qwix-*.whl 2>&1 | tail -1
SKIP_EXACT=1 NO_RESIDENT=1 BENCH_TIMEOUT=290 BENCH_LIMIT=275 bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" \
  qwen3 0.1,0.25,0.5 moepic "lru:0.25" > "$OUT/qwen3_log.txt" 2>&1
EXPERTS=int4 SKIP_EXACT=1 NO_RESIDENT=1 BENCH_TIMEOUT=120 BENCH_LIMIT=110 \
  bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" qwen3 0.89 moepic "" > "$OUT/qwen3_int4_log.txt" 2>&1
EXPERTS=int4 SKIP_EXACT=1 NO_RESIDENT=1 BENCH_TIMEOUT=150 BENCH_LIMIT=140 \
  bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" mixtral 0.65 moepic "" > "$OUT/mixtral_int4_log.txt" 2>&1
tail -2 "$OUT"/*_log.txt
python -m benchmarks.experiments.rows "$OUT"/*.json

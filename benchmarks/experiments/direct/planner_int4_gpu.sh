#!/usr/bin/env bash
# One GPU call: does the planner turn prefetch on where it pays (Qwen1.5-MoE-A2.7B, 25 %, calibrated routing; rows
# without an option are the planner's choice), then where the int4 decode's time goes (device profile of 4 layers,
# int4 against bf16 experts, the models' own high-hit routing).
#   bash benchmarks/experiments/direct/planner_int4_gpu.sh OUT_DIR
set -u
OUT="${1:?results folder}"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
BENCH_TIMEOUT=290 BENCH_LIMIT=250 NO_RESIDENT=1 bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" qwen15 0.25 \
  lru,moepic "moepic:0.25:pf,moepic:0.25:nopf,lru:0.25:nopf"
for e in int4 none; do
  timeout 95 python -m benchmarks.experiments.probe_step --model qwen15 --layers 4 --experts $e \
    --variants moepic:0.5 --steps 5 --time-limit 80 --out-dir "$OUT" --name probe_step_qwen15_l4_$e 2>&1 \
    | grep -E "TPOT| ms  |rror" | head -12
done

#!/usr/bin/env bash
# Direct copies vs the conditional copy step on the GPU (Qwen1.5-MoE-A2.7B shapes, random weights, calibrated
# routing, 25 % of the expert bytes, batch 1), after an exactness check on the embedded model. One process builds
# the model once; `direct` rows use direct copies, the others the conditional copy step; `pf` rows force prefetch
# on. (The 2026-12-07 run, direct_ab.json, ran when direct copies were the default: its unlabelled rows are direct
# copies, its `cond` rows the conditional copy step.)
#   bash benchmarks/experiments/direct/run_gpu.sh OUT_DIR [PAIRS]
set -u
OUT="${1:?results folder}"
PAIRS="${2:-lru:0.25:direct,lru:0.25,static:0.25:direct,static:0.25,moepic:0.25:pf:direct,ondemand:0.25:direct,moepic:0.25:direct}"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout 150 python -m benchmarks.experiments.direct.check_exact 2>&1 | grep -v Warning | tail -7 | tee "$OUT/check_exact.txt"
grep -q "ALL EXACT" "$OUT/check_exact.txt" || { echo "not exact: no timing"; exit 1; }
timeout "${BENCH_TIMEOUT:-420}" python -m benchmarks.bench_policies --model qwen15 --routing calibrated \
  --pairs "$PAIRS" --out-dir "$OUT" --name direct_ab --time-limit "${BENCH_LIMIT:-400}" 2>&1 \
  | grep -v "^  layer" | grep -E "^#|^model|^H2D|^routing|^fixed|TPOT|ERROR|Error|error|skip|^\|" | tail -40

#!/usr/bin/env bash
# One GPU command: quantized experts against bfloat16 (Qwen1.5-MoE-A2.7B shapes, random weights, calibrated routing,
# lru and static with the same cache bytes: 25 % of the bfloat16 experts' bytes, which is 48.5 % of the int8 and
# 89 % of the int4 experts' packed bytes), then the high-hit A/B of direct copies vs the conditional copy step (the
# random weights' own routing: a stress case).
# qwix is not on the GPU machine: a wheel in wheels/ (git-ignored; `pip download qwix --no-deps -d wheels`, and
# pass carry=["wheels"] to the device call) is installed first.
#   bash benchmarks/experiments/quant_and_direct.sh OUT_DIR [POLICIES] [quant-only]
set -u
OUT="${1:?results folder}"
POL="${2:-lru,static}"
export PYTHONPATH=.
pip install --no-deps --no-index -q wheels/qwix-*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
for run in none:0.25 int8:0.485 int4:0.89; do
  ex=${run%%:*} f=${run##*:}
  pairs=$(echo "$POL" | tr ',' '\n' | sed "s/\$/:$f/" | paste -sd, -)
  timeout 150 python -m benchmarks.bench_policies --model qwen15 --routing calibrated --policies "$POL" --pairs "$pairs" \
    --experts "$ex" --out-dir "$OUT" --name "quant_qwen15_$ex" --time-limit 130 2>&1 \
    | grep -E "^model|TPOT|ERROR|rror" | tail -4
done
[ "${3:-}" = quant-only ] && exit 0
timeout 140 python -m benchmarks.bench_policies --model qwen15 --routing own --policies lru --pairs "lru:0.25:direct,lru:0.25" \
  --out-dir "$OUT" --name direct_ab_own --time-limit 120 2>&1 | grep -E "TPOT|ERROR|rror" | tail -4

#!/usr/bin/env bash
# One GPU command: retrain the embedded model on the installed Python corpus (tools/train_embedded.py, 4 minutes of
# training), then the high-hit A/B of direct copies vs the conditional copy step (Qwen1.5-MoE-A2.7B shapes, random
# weights with their own, highly cacheable routing: a stress case, not a user's regime).
#   bash benchmarks/experiments/retrain_and_high_hit.sh OUT_DIR
set -u
OUT="${1:?results folder}"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 400 python tools/train_embedded.py --run-dir "$OUT/run" --corpus installed --max-corpus-mb 250 \
  --tokenizer checkpoints/stdlib_moe --baseline checkpoints/stdlib_moe --steps 20000 --minutes 4 \
  --patience 4 --lr 1.5e-3 --warmup 200 --eval-every 250 --test-tokens 1000000 2>&1 | grep -v Warning | tail -25
timeout 170 python -m benchmarks.bench_policies --model qwen15 --routing own --pairs "lru:0.25:direct,lru:0.25,moepic:0.25,moepic:0.25:direct" \
  --out-dir "$OUT" --name direct_ab_own --time-limit 150 2>&1 | grep -E "TPOT|ERROR|rror|^\|" | tail -12

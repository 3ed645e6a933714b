#!/usr/bin/env bash
# One GPU command: retrain the embedded model on the installed Python corpus (tools/train_embedded.py, 4 minutes of
# training), then the high-hit A/B of direct copies vs the conditional copy step (Qwen1.5-MoE-A2.7B shapes, random
# weights with their own, highly cacheable routing: a stress case, not a user's regime).
#   bash benchmarks/experiments/retrain_and_high_hit.sh OUT_DIR
# env: MINUTES (default 4) of training at most; AB=0 leaves out the A/B (MINUTES=7 AB=0 fills one 10-minute call
# with training). SCHEDULE=plateau trains until the validation loss stops improving (learning rate halved after 3
# flat evaluations, stop when flat at 1/8 of it; "stopped by plateau" in the log), or until MINUTES if it does not.
set -u
OUT="${1:?results folder}"
export PYTHONPATH=.
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
MINUTES="${MINUTES:-4}"
timeout "$(python3 -c "print(int(float('$MINUTES') * 60 + 150))")" python tools/train_embedded.py --run-dir "$OUT/run" --corpus installed --max-corpus-mb 250 \
  --tokenizer checkpoints/stdlib_moe --baseline checkpoints/stdlib_moe --steps 60000 --minutes "$MINUTES" \
  --lr 1.5e-3 --warmup 200 --eval-every 250 --test-tokens 1000000 --schedule "${SCHEDULE:-cosine}" \
  $([ "${SCHEDULE:-cosine}" = plateau ] && echo "--patience 3 --min-delta 0.002" || echo "--patience 4") \
  2>&1 | grep -v Warning | tail -25
[ "${AB:-1}" = 0 ] && exit 0
timeout 170 python -m benchmarks.bench_policies --model qwen15 --routing own --pairs "lru:0.25:direct,lru:0.25,moepic:0.25,moepic:0.25:direct" \
  --out-dir "$OUT" --name direct_ab_own --time-limit 150 2>&1 | grep -E "TPOT|ERROR|rror|^\|" | tail -12

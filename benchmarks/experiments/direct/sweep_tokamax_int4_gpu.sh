#!/usr/bin/env bash
# One device call (under 600 s): exactness of direct copies on the embedded model, the Qwen1.5-MoE-A2.7B budget
# sweep with the default decode step (direct/sweep_gpu.sh), tokamax's ragged_dot against the Mosaic-GPU grouped
# matmul (tokamax/ab.py), then int4 experts at the 25 % point's VRAM budget, each while time is left.
#   bash benchmarks/experiments/direct/sweep_tokamax_int4_gpu.sh OUT_DIR      (carry wheels/: qwix, tokamax and their dependencies)
set -u
OUT="${1:?results folder}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/*.whl 2>&1 | tail -1
BENCH_TIMEOUT=400 BENCH_LIMIT=385 bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" qwen15 0.1,0.25,0.5 \
  ondemand,lru,static,moepic "lru:0.25:cond,moepic:0.25:pf" > "$OUT/sweep_log.txt" 2>&1
tail -3 "$OUT/sweep_log.txt"
grep -q "not exact" "$OUT/sweep_log.txt" && { cat "$OUT/sweep_log.txt"; exit 1; }
left=$((575 - SECONDS))
[ $left -gt 40 ] && PYTHONPATH=.:/tmp/site timeout $((left < 80 ? left - 10 : 70)) python -m benchmarks.experiments.tokamax.ab \
  --tokens 512,2048 --repeats 10 --out "$OUT/tokamax_ab.json" > "$OUT/tokamax_log.txt" 2>&1
tail -12 "$OUT/tokamax_log.txt"
left=$((580 - SECONDS))
[ $left -gt 60 ] && PYTHONPATH=.:/tmp/site EXPERTS=int4 SKIP_EXACT=1 NO_RESIDENT=1 BENCH_TIMEOUT=$left \
  BENCH_LIMIT=$((left - 10)) bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" qwen15 0.89 moepic "" \
  > "$OUT/int4_log.txt" 2>&1
cat "$OUT/check_exact.txt"
python -m benchmarks.experiments.rows "$OUT"/*.json

#!/usr/bin/env bash
# One device call: where the int4 decode's time goes, then Qwen3-30B-A3B with int4 experts. First the expert FFN
# alone at batch 1 (ffn_probe: bf16 / int8 / int4, einsum against multiply-reduce); the faster int4 form on the
# Qwen3 shape then runs moepic at 10 / 25 / 50 % and lru at 25 % (calibrated routing, batch 1), and the other
# form at 25 % as its A/B.
#   bash benchmarks/experiments/quant/int4_decode_gpu.sh OUT_DIR      (carry wheels/ for qwix)
set -u
OUT="${1:?results folder}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python -m benchmarks.experiments.quant.ffn_probe --out "$OUT" 2>&1 | grep -v Warning | tail -17
read -r Q OTHER < <(python3 - "$OUT/ffn_probe.json" <<'PY'
import json, sys
try:
    rows = {(r["model"], r["variant"]): r["us_per_expert"] for r in json.load(open(sys.argv[1]))["rows"]}
    fast = rows[("qwen3", "int4 reduce")] < rows[("qwen3", "int4 einsum")]
except (OSError, KeyError, ValueError):
    fast = False
print(":qreduce -" if fast else "- :qreduce")
PY
)
Q=${Q#-}; OTHER=${OTHER#-}
echo "int4 form for the sweep: ${Q:-einsum}"
timeout 440 python -m benchmarks.bench_policies --model qwen3 --routing calibrated --experts int4 --policies moepic \
  --pairs "moepic:0.25$Q,moepic:0.25$OTHER,moepic:0.1$Q,moepic:0.5$Q,lru:0.25$Q" --out-dir "$OUT" \
  --name qwen3_calibrated_int4 --time-limit 420 2>&1 | grep -E "TPOT|ERROR|rror|skip" | tail -12
python -m benchmarks.experiments.rows "$OUT"/qwen3_calibrated_int4.json

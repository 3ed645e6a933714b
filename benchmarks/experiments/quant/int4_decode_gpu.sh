#!/usr/bin/env bash
# One device call: the quantized expert FFN alone at batch 1 (ffn_probe: bf16 / int8 / int4, einsum against
# multiply-reduce), then Qwen3-30B-A3B with int4 experts (the GPU default, the multiply-reduce FFN): moepic at
# 10 / 25 / 50 % and lru at 25 %, and the einsum form at 25 % as its A/B (calibrated routing, batch 1).
#   bash benchmarks/experiments/quant/int4_decode_gpu.sh OUT_DIR [MODEL]     (carry wheels/ for qwix)
set -u
OUT="${1:?results folder}"
MODEL="${2:-qwen3}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/*.whl 2>&1 | tail -1
export PYTHONPATH=.:/tmp/site
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 120 python -m benchmarks.experiments.quant.ffn_probe --out "$OUT" 2>&1 | grep -v Warning | tail -17
timeout 440 python -m benchmarks.bench_policies --model "$MODEL" --routing calibrated --experts int4 --policies moepic \
  --pairs "moepic:0.25,moepic:0.25:qeinsum,moepic:0.1,moepic:0.5,lru:0.25" --out-dir "$OUT" \
  --name "${MODEL}_calibrated_int4" --time-limit 420 2>&1 | grep -E "TPOT|ERROR|rror|skip" | tail -12
python -m benchmarks.experiments.rows "$OUT/${MODEL}_calibrated_int4.json"

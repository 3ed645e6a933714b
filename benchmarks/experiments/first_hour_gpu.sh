#!/usr/bin/env bash
# One GPU command: the cold start of a Qwen1.5-MoE-A2.7B-shaped checkpoint on disk (and of the embedded model),
# then the peak host memory of loading that checkpoint with bfloat16 and int4 experts.
# qwix (for int4) travels as a wheel: `pip download qwix --no-deps -d wheels` here, carry=["wheels"].
#   bash benchmarks/experiments/first_hour_gpu.sh OUT_DIR [LAYERS]
set -u
OUT="${1:?results folder}"
LAYERS="${2:-12}"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site wheels/qwix-*.whl || exit 1
export PYTHONPATH=.:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
rm -rf /tmp/cold && mkdir -p /tmp/cold
timeout 300 python -m benchmarks.cold_start --work-dir /tmp/cold --keep --timeout 200 --layers "$LAYERS" \
  --out "$OUT/cold_start_qwen15_${LAYERS}l.json" 2>&1 | grep -v -i warning | tail -12
CK=$(ls -d /tmp/cold/moepic_cold_*/ckpt | head -1)
timeout 200 python -m benchmarks.experiments.quant.load_rss "$CK" --formats none,int4 \
  --out "$OUT/load_rss_qwen15_${LAYERS}l.json" 2>&1 | grep -v -i warning | tail -6

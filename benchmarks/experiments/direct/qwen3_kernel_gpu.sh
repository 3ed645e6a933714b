#!/usr/bin/env bash
# One GPU call: Qwen3-30B-A3B (48 MoE layers, where a per-layer copy latency costs most) at 25 % of the expert bytes,
# calibrated routing, the copy kernel (lru, moepic, moepic with prefetch forced on), then DMA copies (moepic) on the
# same machine as the baseline.
#   bash benchmarks/experiments/direct/qwen3_kernel_gpu.sh OUT_DIR
set -u
OUT="${1:?results folder}"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
MOEPIC_JAX_COPY_KERNEL=1 SKIP_EXACT=1 NO_RESIDENT=1 BENCH_TIMEOUT="${K_TIMEOUT:-390}" BENCH_LIMIT="${K_LIMIT:-370}" \
  bash benchmarks/experiments/direct/sweep_gpu.sh "$OUT" qwen3 0.25 lru,moepic "moepic:0.25:pf"
MOEPIC_JAX_COPY_KERNEL=0 timeout "${D_TIMEOUT:-180}" python -m benchmarks.bench_policies --model qwen3 \
  --routing calibrated --policies moepic --pairs moepic:0.25 --out-dir "$OUT" --name qwen3_dma \
  --time-limit "${D_LIMIT:-170}" 2>&1 | grep -E "^fixed|TPOT|rror|skip" | tail -4

#!/usr/bin/env bash
# One GPU call: the copy kernel (gather.cu) against DMA copies. Tests of the copy library in kernel mode, the probe
# (bandwidth, overlap, per-layer latency of dependent copies), the embedded model's exactness, then Qwen1.5-MoE-A2.7B
# at 25 % with calibrated routing, kernel mode (the planner's choice and prefetch forced on) and DMA mode.
#   bash benchmarks/experiments/direct/kernel_gpu.sh OUT_DIR
set -u
OUT="${1:?results folder}"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
export MOEPIC_JAX_COPY_KERNEL=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
nvcc --version 2>/dev/null | tail -1
python -c "from moepic_jax.offload import transfer as t; p, w = t.kernel_ptx(); print('ptx from', w, len(p or b''))"
cp ~/.cache/moepic_jax/ffi/gather_*.ptx "$OUT/" 2>/dev/null
timeout 90 python -m pytest -q -x tests/test_transfer.py 2>&1 | tail -3
timeout 200 python -m benchmarks.experiments.direct.probe_copy_kernel --blocks 32,128 --out "$OUT" 2>&1 | grep -E "^\||rror" | tail -8
timeout 100 python -m benchmarks.experiments.direct.check_exact 2>&1 | grep -v Warning | tail -4 | tee "$OUT/check_exact_kernel.txt"
grep -q "ALL EXACT" "$OUT/check_exact_kernel.txt" || { echo "not exact: no timing"; exit 1; }
for m in 1 0; do
  PAIRS="lru:0.25,moepic:0.25,moepic:0.25:pf"; [ $m = 0 ] && PAIRS="lru:0.25,moepic:0.25:pf"
  MOEPIC_JAX_COPY_KERNEL=$m timeout "${BENCH_TIMEOUT:-200}" python -m benchmarks.bench_policies --model qwen15 \
    --routing calibrated --policies lru,moepic --pairs "$PAIRS" --out-dir "$OUT" --name qwen15_kernel$m \
    --time-limit "${BENCH_LIMIT:-180}" 2>&1 | grep -E "^fixed|TPOT|rror|skip" | tail -6
done

#!/usr/bin/env bash
# The budget sweep with the default decode step on one GPU (direct copies): random weights of a real model's shapes
# (default Qwen1.5-MoE-A2.7B), calibrated routing, each policy at each budget (fractions of the expert bytes), batch
# 1, the resident model last, and EXTRA pairs (default: the conditional copy step and forced prefetch at 25 %, on
# the same machine). An exactness check on the embedded model runs first; no timing when it fails.
#   bash benchmarks/experiments/direct/sweep_gpu.sh OUT_DIR [MODEL] [BUDGETS] [POLICIES] [EXTRA_PAIRS]
# env: SKIP_EXACT=1 skips the check; NO_RESIDENT=1 leaves out the resident row; EXPERTS=int8|int4 quantizes the
# experts; BENCH_TIMEOUT / BENCH_LIMIT bound the bench (seconds).
set -u
OUT="${1:?results folder}"
MODEL="${2:-qwen15}"
BUDGETS="${3-0.1,0.25,0.5}"  # an empty BUDGETS or POLICIES (""): only the EXTRA pairs
POL="${4-ondemand,lru,static,moepic}"
EXTRA="${5-lru:0.25:cond,lru:0.25:pf,moepic:0.25:pf}"
EXPERTS="${EXPERTS:-none}"
RES=",resident"; [ -n "${NO_RESIDENT:-}" ] && RES=""
NAME="${MODEL}_calibrated"; [ "$EXPERTS" != none ] && NAME="${NAME}_$EXPERTS"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
python -c "import jax; print('jax', jax.__version__, jax.devices())"
if [ -z "${SKIP_EXACT:-}" ]; then
  timeout 150 python -m benchmarks.experiments.direct.check_exact 2>&1 | grep -v Warning | tail -7 | tee "$OUT/check_exact.txt"
  grep -q "ALL EXACT" "$OUT/check_exact.txt" || { echo "not exact: no timing"; exit 1; }
fi
# ondemand caches nothing: it runs at the first budget only
PAIRS=$(first=1; for f in ${BUDGETS//,/ }; do for p in ${POL//,/ }; do
  [ "$p" = ondemand ] && [ $first = 0 ] && continue; printf '%s:%s,' "$p" "$f"; done; first=0; done)${EXTRA}
POLARG="${POL}${RES}"; [ -z "$POLARG" ] && POLARG=lru  # with --pairs, --policies only adds the resident row
timeout "${BENCH_TIMEOUT:-420}" python -m benchmarks.bench_policies --model "$MODEL" --routing calibrated \
  --policies "$POLARG" --pairs "${PAIRS%,}" --experts "$EXPERTS" --out-dir "$OUT" --name "$NAME" \
  --time-limit "${BENCH_LIMIT:-400}" 2>&1 \
  | grep -v "^  layer" | grep -E "^#|^model|^H2D|^routing|^fixed|TPOT|ERROR|Error|error|skip|^\|" | tail -40

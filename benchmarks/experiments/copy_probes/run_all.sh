#!/usr/bin/env bash
# Runs the four copy/compute overlap probes in one GPU call, each under its own `timeout`, all under one overall
# deadline so that a hang cannot eat the call. Logs go to the folder given as the first argument (default ./out_copy_probes):
#   header.txt  - date, nvidia-smi, jax version/devices, g++, CPU
#   probes.log  - every probe's stdout+stderr, one section each (with its exact command, rc and seconds)
#   summary.txt - the key result lines of each probe, printed last as well
# Usage (repo root): bash benchmarks/experiments/copy_probes/run_all.sh      [DEADLINE=seconds, default 500]
set -u
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-$PWD/out_copy_probes}"; mkdir -p "$OUT"
LOG="$OUT/probes.log"; HDR="$OUT/header.txt"; SUM="$OUT/summary.txt"
: >"$LOG"; : >"$SUM"
DEADLINE="${DEADLINE:-500}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
unset XLA_FLAGS

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi 2>&1 | head -20
  $PY -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tail -3
  g++ --version 2>&1 | head -1
  echo "nproc $(nproc)"; grep -m1 "model name" /proc/cpuinfo
  $PY -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1
} >"$HDR" 2>&1
cat "$HDR"

# run NAME TIMEOUT ENV... -- ARGS...   (ENV as VAR=value; an empty XLA_FLAGS= means default flags)
run() {
  local name="$1" tmo="$2"; shift 2
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: SKIPPED (overall deadline, ${SECONDS}s used)" | tee -a "$LOG" "$SUM"; return; fi
  [ "$tmo" -gt "$left" ] && tmo=$left
  local t0=$SECONDS
  {
    echo; echo "=================================================================="
    echo "=== $name"; echo "=== cmd: env ${envs[*]} timeout ${tmo} $PY $*"
  } >>"$LOG"
  env "${envs[@]}" timeout -k 5 "$tmo" "$PY" "$@" >"$OUT/.cur" 2>&1
  local rc=$?
  cat "$OUT/.cur" >>"$LOG"
  echo "=== $name: rc=$rc, $((SECONDS - t0)) s" >>"$LOG"
  {
    echo "--- $name (rc=$rc, $((SECONDS - t0)) s)"
    grep -E "^[0-9]+\.[0-9]+\.[0-9]+ |^(slice|args) |HLO of both|^[ABC] |^[ABCD] |copy .* ms|FAILED|failed|values ok|^cpu:|Error|error:" "$OUT/.cur" \
      | grep -v "^  File" | cut -c1-400 | head -20
    [ "$rc" = 124 ] && echo "TIMEOUT after ${tmo}s"
  } >>"$SUM"
  rm -f "$OUT/.cur"
}

P="$HERE"
# the most important runs first, so that a deadline cuts the variants rather than the baselines
run "async_slice gemm (default flags)"  80 XLA_FLAGS= -- "$P/probe_async_slice.py" gemm
run "async_slice gemv (default flags)"  80 XLA_FLAGS= -- "$P/probe_async_slice.py" gemv
run "stream_annotation"                 90 -- "$P/probe_stream_annotation.py"
run "ffi_memcpy"                        90 XLA_FLAGS= -- "$P/probe_ffi_memcpy.py"
run "host_compute K=4"                 110 XLA_FLAGS= K=4 -- "$P/host_compute_probe.py"
for m in gemm gemv; do
  run "async_slice $m (latency_hiding_scheduler=true)" 70 \
      XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true -- "$P/probe_async_slice.py" $m
  run "async_slice $m (highest_priority_async_stream=false)" 70 \
      XLA_FLAGS=--xla_gpu_enable_highest_priority_async_stream=false -- "$P/probe_async_slice.py" $m
done
run "host_compute K=1"                  70 XLA_FLAGS= K=1 -- "$P/host_compute_probe.py"

echo; echo "################ SUMMARY (${SECONDS}s total) ################"; cat "$SUM"

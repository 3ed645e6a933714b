#!/usr/bin/env bash
# One device call: where the direct decode step's time goes under calibrated routing, 8 layers of Qwen1.5-MoE-A2.7B
# and of Qwen3-30B-A3B at 25 %: TPOT per variant and a device profile with every kernel and copy of 5 traced
# steps (<name>_events.json), prefetch forced on and off, and the FFNs of full hits (read from their slots) and
# prefetched experts computed while this layer's copies stream (`early`; the default is `late`) against after the wait
# (`late`, the default when this ran: the results name those variants without an option).
#   bash benchmarks/experiments/direct/profile_gpu.sh OUT_DIR
set -u
OUT="${1:?results folder}"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null
timeout 280 python -m benchmarks.experiments.probe_step --model qwen15 --layers 8 --routing calibrated \
  --variants lru:0.25:late,lru:0.25:early,lru:0.25:pf:late,lru:0.25:pf:early,moepic:0.25:pf:late --time-limit 250 \
  --out-dir "$OUT" > "$OUT/qwen15_log.txt" 2>&1
timeout 250 python -m benchmarks.experiments.probe_step --model qwen3 --layers 8 --routing calibrated \
  --variants lru:0.25:late,lru:0.25:early,lru:0.25:pf:late,lru:0.25:pf:early --time-limit 220 \
  --out-dir "$OUT" > "$OUT/qwen3_log.txt" 2>&1
grep -E "TPOT|ms  " "$OUT"/qwen15_log.txt "$OUT"/qwen3_log.txt | cut -c1-220

#!/usr/bin/env bash
# A/B of the package layout on the GPU: the same bench_policies run (Qwen1.5-MoE-A2.7B, random weights, 25 % of the
# expert bytes, lru and moepic, default hardware profile so both plan alike) with the tree before the layout change
# (baseline/, a `git archive` of it, still in the old script layout) and with the current tree, one after the other
# on the same machine.
#   bash benchmarks/experiments/layout_ab.sh [RESULTS_DIR]     (from the repo root; default ./layout_ab)
set -u
DIR="${1:-layout_ab}"
mkdir -p "$DIR" && DIR="$(cd "$DIR" && pwd)"  # absolute: the baseline run starts in baseline/
ARGS="--model qwen15 --policies lru,moepic --budgets 0.25 --hw default --time-limit 280"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"
(cd baseline && PYTHONPATH=. timeout 290 python benchmarks/bench_policies.py $ARGS --out-dir "$DIR" --name before) 2>&1 | grep -v "^  layer" | tail -25
timeout 290 python -m benchmarks.bench_policies $ARGS --out-dir "$DIR" --name after 2>&1 | grep -v "^  layer" | tail -25
rm -f "$DIR"/*.png
python - "$DIR" <<'PY'
import json, os, sys
for n in ("before", "after"):
    try:
        j = json.load(open(os.path.join(sys.argv[1], n + ".json")))
    except OSError as e:
        print(n, "missing", e); continue
    for r in j["rows"]:
        print(f"{n:7s} {r['policy']:7s} TPOT {r.get('tpot_ms', float('nan')):7.2f} ms  H2D {r.get('h2d_bytes_per_token', 0)/1e6:8.2f} MB/tok  "
              f"full {r.get('full_hit_rate', float('nan')):.4f} top {r.get('top_only_hit_rate', float('nan')):.4f}")
PY

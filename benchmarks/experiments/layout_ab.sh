#!/usr/bin/env bash
# A/B of the package layout on the GPU: the same bench_policies run (Qwen1.5-MoE-A2.7B, random weights, 25 % of the
# expert bytes, lru and moepic, default hardware profile so both plan alike) with the tree before the layout change
# (baseline/, a `git archive` of it) and with the current tree, one after the other on the same machine.
set -u
ARGS="--model qwen15 --policies lru,moepic --budgets 0.25 --hw default --time-limit 280"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"
(cd baseline && PYTHONPATH=. timeout 290 python benchmarks/bench_policies.py $ARGS --out-dir "$OUT" --name before) 2>&1 | grep -v "^  layer" | tail -25
PYTHONPATH=. timeout 290 python benchmarks/bench_policies.py $ARGS --out-dir "$OUT" --name after 2>&1 | grep -v "^  layer" | tail -25
rm -f "$OUT"/*.png
python - <<'PY'
import json, os
for n in ("before", "after"):
    try:
        j = json.load(open(os.path.join(os.environ["OUT"], n + ".json")))
    except OSError as e:
        print(n, "missing", e); continue
    for r in j["rows"]:
        print(f"{n:7s} {r['policy']:7s} TPOT {r.get('tpot_ms', float('nan')):7.2f} ms  H2D {r.get('h2d_bytes_per_token', 0)/1e6:8.2f} MB/tok  "
              f"full {r.get('full_hit_rate', float('nan')):.4f} top {r.get('top_only_hit_rate', float('nan')):.4f}")
PY

"""Re-evaluate the planner's cost model on saved H200 runs, with no GPU.

`benchmarks.bench_policies` saves, for each static / moepic / ondemand row, the plan it ran, the measured hardware
profile (meta) and the profile of the routing the run decoded (`run_profile_json`). This script re-predicts each
row's TPOT with the current `planner.plan_stats`, so a change to the cost model can be checked against the same
measurements.

Rows saved with the add-0.5 smoothing of `profile_model` (before the bench switched to raw counts) are unsmoothed
first: counts = freq * (n k + 0.5 E) / k - 0.5, with n = --run-tokens scored tokens.

  python -m benchmarks.experiments.revalidate_planner \
      benchmarks/results/archive/bench_policies_qwen15_validation2.json --run-tokens 32
Prints a markdown table: measured TPOT, predicted TPOT and error, measured and predicted miss rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from moepic_jax.planning.planner import plan_stats
from moepic_jax.planning.profiles import CachePlan, HardwareProfile, ModelProfile


def unsmooth(mp: ModelProfile, n_tokens: int, alpha: float = 0.5) -> ModelProfile:
    """Raw routed fractions from a profile smoothed with pseudo-count alpha over n_tokens scored tokens."""
    k, e = mp.top_k, mp.n_experts
    moe = np.array(mp.moe_layers)
    counts = mp.freq * (n_tokens * k + alpha * e) / k - alpha
    if np.abs(counts[moe] - np.round(counts[moe])).max() > 1e-6:
        raise ValueError("the profile's frequencies are not add-alpha smoothed counts of n_tokens tokens")
    counts[~moe] = 0.0
    return dataclasses.replace(mp, freq=np.round(counts) / n_tokens)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a bench_policies JSON with plan_json / run_profile_json per row")
    ap.add_argument("--run-tokens", type=int, default=None,
                    help="scored tokens of a smoothed run profile (omit for rows saved with raw counts)")
    args = ap.parse_args(argv)
    d = json.loads(Path(args.results).read_text())
    hw = HardwareProfile.from_json(d["meta"]["hardware_profile"]["json"])
    print("| policy | budget | measured TPOT ms | predicted ms | error | miss measured | miss predicted |\n"
          "|---|---|---|---|---|---|---|")
    for r in d["rows"]:
        if "run_profile_json" not in r:
            continue
        mp = ModelProfile.from_json(r["run_profile_json"])
        if args.run_tokens:
            mp = unsmooth(mp, args.run_tokens)
        plan = CachePlan.from_json(r["plan_json"])
        st = plan_stats(plan, mp, hw)
        moe = np.array(mp.moe_layers)
        pred = st["tpot_s"] * 1e3
        print(f"| {r['policy']} | {r['budget_frac']:.0%} | {r['tpot_ms']:.2f} | {pred:.2f} | "
              f"{pred / r['tpot_ms'] - 1:+.1%} | {r['miss_rate']:.1%} | {float(np.mean(st['miss_rate'][moe])):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

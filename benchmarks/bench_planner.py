"""Time `planner.solve` on a large instance: 64 layers x 256 experts x 32 split points, k = 8, Zipf-like popularity.

Usage: python -m benchmarks.bench_planner [--repeats 3] [--out benchmarks/results/archive/planner_speed.json]
Target: < 2 s per solve on a 2-core CPU. Prints a table and writes JSON (date, versions, machine, timings).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from moepic_jax.planning.planner import plan_bytes, plan_stats, predicted_tpot, solve
from moepic_jax.planning.profiles import HardwareProfile, ModelProfile

N_LAYERS, N_EXPERTS, TOP_K, D_MODEL, D_FF, GRANULE, DTYPE_BYTES = 64, 256, 8, 2048, 4096, 128, 2


def zipf_freq(rng: np.random.Generator, n_experts: int, k: int, exponent: float) -> np.ndarray:
    """[n_experts] routing probabilities: Zipf weights in random order, scaled to sum to k, each capped at 1."""
    w = rng.permutation(1.0 / np.arange(1, n_experts + 1) ** exponent)
    lo, hi = 0.0, k / w.min()
    for _ in range(100):  # water-filling: find c with sum(min(1, c * w)) == k
        c = 0.5 * (lo + hi)
        lo, hi = (c, hi) if np.minimum(1.0, c * w).sum() < k else (lo, c)
    p = np.minimum(1.0, hi * w)
    return p * (k / p.sum())


def make_instance(seed: int = 0):
    rng = np.random.default_rng(seed)
    freq = np.stack([zipf_freq(rng, N_EXPERTS, TOP_K, rng.uniform(0.8, 1.2)) for _ in range(N_LAYERS)])
    recall = rng.uniform(0.6, 0.95, N_LAYERS)
    recall[0] = np.nan
    mp = ModelProfile(freq, recall, recall.copy(), D_MODEL, D_FF, TOP_K, N_EXPERTS, DTYPE_BYTES, "bench")
    hw = HardwareProfile(h2d_latency_s=30e-6, h2d_bandwidth_Bps=45e9,
                         layer_compute_s=rng.uniform(0.2e-3, 0.4e-3, N_LAYERS), device="synthetic H200-like")
    return mp, hw


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "archive"
                                         / "planner_speed.json"))
    args = ap.parse_args(argv)
    mp, hw = make_instance()
    rows = []
    for frac in (0.0, 0.02, 0.05, 0.1, 0.25, 0.5, 0.9, 1.0):
        budget = int(frac * mp.full_cache_bytes)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            plan = solve(mp, hw, budget, granule=GRANULE)
            times.append(time.perf_counter() - t0)
        st = plan_stats(plan, mp, hw)
        rows.append({
            "budget_frac": frac, "budget_bytes": budget, "solve_s_min": min(times), "solve_s_max": max(times),
            "plan_bytes": plan_bytes(plan, mp), "predicted_tpot_s": predicted_tpot(plan, mp, hw),
            "slots": int(sum(plan.n_slots())), "distinct_splits": len({lp.split for lp in plan.layers}),
            "h2d_bytes_per_token": float(st["h2d_bytes"].sum()),
        })
    worst = max(r["solve_s_max"] for r in rows)
    result = {
        "benchmark": "planner.solve speed",
        "instance": {"n_layers": N_LAYERS, "n_experts": N_EXPERTS, "top_k": TOP_K, "d_model": D_MODEL, "d_ff": D_FF,
                     "granule": GRANULE, "split_points": D_FF // GRANULE, "dtype_bytes": DTYPE_BYTES},
        "command": " ".join([Path(sys.executable).name, "-m", __spec__.name if __spec__ else __file__] + sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(), "numpy": np.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count()},
        "repeats": args.repeats, "worst_solve_s": worst, "target_s": 2.0, "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'budget':>7} {'solve s (min/max)':>18} {'plan GiB':>9} {'slots':>6} {'splits':>6} "
          f"{'H2D MB/tok':>10} {'TPOT ms':>8}")
    for r in rows:
        print(f"{r['budget_frac']:>7.0%} {r['solve_s_min']:>8.3f} / {r['solve_s_max']:<7.3f} "
              f"{r['plan_bytes'] / 2**30:>9.2f} {r['slots']:>6} {r['distinct_splits']:>6} "
              f"{r['h2d_bytes_per_token'] / 1e6:>10.1f} {r['predicted_tpot_s'] * 1e3:>8.2f}")
    print(f"worst solve {worst:.3f} s (target < 2 s) on {os.cpu_count()} CPUs; wrote {out}")


if __name__ == "__main__":
    main()

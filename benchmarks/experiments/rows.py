"""Print the rows of bench_policies result files as one short table (what a device call shows last).

  python -m benchmarks.experiments.rows OUT_DIR/*.json
"""
import json
import pathlib
import sys


def main(paths):
    print("| file | policy | options | budget | GiB | TPOT ms | floor ms | floor/TPOT | MB/tok | wasted | hits | recall |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for p in paths:
        try:
            rows = json.load(open(p))["rows"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        name = pathlib.Path(p).stem
        for r in rows:
            if r.get("tpot_ms") is None:
                print(f"| {name} | {r.get('policy')} | {r.get('options', '')} | {r.get('budget_frac')} "
                      f"| - | {r.get('error', 'no time')} |")
                continue
            f = lambda k, fmt: "-" if r.get(k) is None else format(r[k], fmt)  # noqa: E731
            hits = None if r.get("miss_rate") is None else 1 - r["miss_rate"]
            print(f"| {name} | {r['policy']} | {r.get('options', '')} | {f('budget_frac', '.0%')} "
                  f"| {f('budget_gib', '.1f')} | {r['tpot_ms']:.2f} | {f('floor_ms', '.2f')} | {f('efficiency', '.2f')} "
                  f"| {f('h2d_mb_per_token', '.0f')} | {f('prefetch_wasted_mb_per_token', '.0f')} "
                  f"| {'-' if hits is None else format(hits, '.1%')} | {f('predictor_recall', '.2f')} |")


if __name__ == "__main__":
    main(sys.argv[1:])

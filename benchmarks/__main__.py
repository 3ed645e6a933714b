"""The benchmark suite of one model: every policy x VRAM budget (with resident and the floor), then the peer.

  python -m benchmarks --model qwen15                                   # GPU: the whole suite of Qwen1.5-MoE-A2.7B
  python -m benchmarks --model olmoe --routing own                      # the random routers (a stress case)
  python -m benchmarks --model qwen15 --tiny --budgets 0.25 --no-peer   # CPU smoke run (tiny config)
  python -m benchmarks --model qwen15 --hw default --time-limit 300     # unknown options go to bench_policies

Into one results folder (--out-dir, default benchmarks/results/<model>/), each step writing JSON + markdown + PNG:
  1. `benchmarks.bench_policies`: the model's policies at each budget (fixed part + frac x expert bytes), resident
     last; every row has TTFT, TPOT, H2D bytes per token, the floor (H2D bytes per token / peak H2D bandwidth of the
     run) and floor / TPOT. File bench_policies_<model>[_tiny]_<routing>.
  2. `benchmarks.bench_peer_hf`, when transformers and torch import (skip it with --no-peer): the same config in
     transformers, fully on the GPU and with accelerate offloading at the budgets of step 1, step 1's rows beside
     it. File bench_peer_hf_<model>[_tiny]_<routing> (<routing> names step 1's rows: the peer runs its own random
     routers, and accelerate copies every offloaded layer whatever the routing). It runs in a fresh process (its
     `main` in a spawned child): JAX keeps the device memory step 1 used, which torch would then lack.
Routing of step 1: `calibrated` (default; a trace drawn to the published routing statistics of the model,
`benchmarks.routing_traces`), `own` (the random routers: a stress case, labelled `own_stress` in the file names), or
a trace .npz to replay. A short table is printed last.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import sys
from pathlib import Path

MODELS = ("qwen15", "olmoe", "qwen3", "mixtral")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0],
                                 epilog="Options not listed here are passed to benchmarks.bench_policies "
                                        "(python -m benchmarks.bench_policies --help).")
    ap.add_argument("--model", default="qwen15", choices=MODELS, help="configuration (default: qwen15)")
    ap.add_argument("--routing", default="calibrated",
                    help="calibrated (a trace drawn to the model's published routing statistics), own (the random "
                         "routers: a stress case), or a trace .npz to replay (default: calibrated)")
    ap.add_argument("--budgets", default="0.25,0.5",
                    help="fractions of the expert bytes added to the fixed part (default: 0.25,0.5)")
    ap.add_argument("--tiny", action="store_true", help="tiny config of the same family (CPU smoke run)")
    ap.add_argument("--no-peer", action="store_true", help="skip the transformers peer (bench_peer_hf)")
    ap.add_argument("--out-dir", default=None, help="results folder (default: benchmarks/results/<model>/)")
    return ap.parse_known_args(argv)


def routing_label(routing: str) -> str:
    if routing == "calibrated":
        return "calibrated"
    if routing == "own":
        return "own_stress"
    return "replayed_" + Path(routing).stem


def peer_available() -> str | None:
    """None when transformers and torch can be imported, else why not."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


def summary(policies_json: Path, peer_json: Path | None) -> str:
    """Short markdown tables of what the suite wrote."""
    from benchmarks import common as C

    def table(rows, columns):  # the error / skipped columns only where a row has one
        return C.markdown_table(rows, [c for c in columns
                                       if c[0] not in ("error", "skipped") or any(c[0] in r for r in rows)])

    out = []
    if policies_json.exists():
        d = json.loads(policies_json.read_text())
        out += [f"## {d['meta'].get('model')}: policies x budgets ({d['meta'].get('routing_source')})", "",
                table(d["rows"], [
                    ("policy", "policy", ""), ("budget_frac", "experts in budget", ".0%"),
                    ("budget_gib", "budget GiB", ".2f"), ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"),
                    ("floor_ms", "floor ms", ".2f"), ("efficiency", "floor/TPOT", ".2f"),
                    ("h2d_mb_per_token", "H2D MB/tok", ".1f"), ("full_hit_rate", "full hit", ".1%"),
                    ("error", "error", ""), ("skipped", "skipped", "")]), ""]
    if peer_json is not None and peer_json.exists():
        d = json.loads(peer_json.read_text())
        out += ["## transformers peer (same budgets)", "", table(d["rows"], [
            ("impl", "implementation", ""), ("policy", "policy", ""), ("budget_gib", "budget GiB", ".2f"),
            ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"), ("speedup_vs_hf", "HF TPOT / this", ".1f"),
            ("error", "error", ""), ("skipped", "skipped", "")]), ""]
    return "\n".join(out)


def main(argv=None) -> int:
    args, rest = parse_args(argv)
    from benchmarks import bench_policies
    from benchmarks.common import RESULTS_DIR

    out_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR / args.model
    tag = f"{args.model}{'_tiny' if args.tiny else ''}_{routing_label(args.routing)}"
    common_argv = ["--model", args.model, "--budgets", args.budgets, "--out-dir", str(out_dir)]
    common_argv += ["--tiny"] if args.tiny else []
    policies_name = f"bench_policies_{tag}"
    print(f"# suite {tag} -> {out_dir}", flush=True)
    if args.routing == "own":
        print("routing: the random routers of the random weights (a stress case: near-uniform, prompt-driven)",
              flush=True)

    rc = bench_policies.main(rest + common_argv + ["--routing", args.routing, "--name", policies_name])
    policies_json = out_dir / f"{policies_name}.json"

    peer_json = None
    why_not = "--no-peer" if args.no_peer else peer_available()
    if why_not:
        print(f"\npeer (bench_peer_hf) skipped: {why_not}", flush=True)
    else:
        from benchmarks import bench_peer_hf

        peer_name = f"bench_peer_hf_{tag}"
        peer_json = out_dir / f"{peer_name}.json"
        print(f"\n# peer: {peer_name}", flush=True)
        compare = ["--compare", str(policies_json)] if policies_json.exists() else []
        child = multiprocessing.get_context("spawn").Process(
            target=bench_peer_hf.main, args=(common_argv + compare + ["--name", peer_name],))
        child.start()
        child.join()
        if child.exitcode:  # the policies' results stand
            print(f"peer failed (exit code {child.exitcode})", flush=True)
            rc = rc or 1

    print(f"\n# suite {tag}: files in {out_dir}\n")
    print(summary(policies_json, peer_json))
    return rc


if __name__ == "__main__":
    sys.exit(main())

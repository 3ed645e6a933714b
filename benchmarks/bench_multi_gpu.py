"""Several GPUs of one host: TPOT with the experts split over 2 (or 4) GPUs against 1 GPU at the
same per-device VRAM budget, for `lru` and `moepic` on the Qwen1.5-MoE-A2.7B configuration (random weights).

With n GPUs each one holds 1/n of every layer's experts in its pinned host buffer, caches the hottest of them
within its own budget and copies its own misses over its own PCIe link, so at equal per-device budget the cache
covers n times more experts and the copies of one token spread over n links.

  python -m benchmarks.bench_multi_gpu [--devices 1,2] [--policies lru,moepic] [--frac 0.25] [--tiny] [--out-dir DIR]
Prints a short table last; JSON and markdown to --out-dir when given.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common as C  # noqa: E402
import moepic_jax  # noqa: E402
from moepic_jax.generate import generate  # noqa: E402
from moepic_jax.runtime.factory import make_engine  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen15", choices=sorted(C.REAL_CONFIGS))
    ap.add_argument("--devices", default="1,2", help="device counts to compare")
    ap.add_argument("--policies", default="lru,moepic")
    ap.add_argument("--frac", type=float, default=0.25,
                    help="per-device budget = fixed part + frac x (expert bytes / devices of the largest count)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke run)")
    ap.add_argument("--out-dir", default=None, help="results folder (default: print only)")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.devices.split(",")]
    if max(counts) > jax.device_count():
        print(f"only {jax.device_count()} device(s) here; need {max(counts)}", file=sys.stderr)
        return 2
    cfg = C.get_config(args.model, tiny=args.tiny)
    model = C.random_model(cfg, progress=not args.tiny)
    expert_bytes = cfg.total_expert_bytes(model.dtype_bytes)
    kw = dict(max_batch=1, max_seq_len=256, granule=16 if args.tiny else 128)
    # One per-device budget for every row: the largest fixed part of the runs plus a share of one device's experts.
    cache = moepic_jax.EngineCache().for_model(model)  # placed weights and the profile, kept between engines
    fixed = max(make_engine(model, policy="lru", devices=n, cache=cache, **kw).fixed_bytes for n in counts)
    budget = int(fixed + args.frac * expert_bytes / max(counts))
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, 128).tolist()
    warm = rng.integers(0, cfg.vocab_size, 128).tolist()
    rows = []
    import gc

    for n in counts:  # device count outermost: the pinned store is re-laid out once per count
        for policy in args.policies.split(","):
            t0 = time.perf_counter()
            eng = make_engine(model, policy=policy, vram_budget=budget, devices=n, cache=cache, **kw)
            generate([warm], model=model, engine=eng, max_new_tokens=8, temperature=1.0)
            res = generate([prompt], model=model, engine=eng, max_new_tokens=args.new_tokens, temperature=1.0)
            s = res.stats
            peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in eng.devices]
            rows.append(dict(policy=policy, devices=n, budget_gib_per_device=budget / 2**30,
                             cache_gib_per_device=eng.cache_bytes() / 2**30, ttft_ms=s.ttft_s * 1e3,
                             tpot_ms=s.tpot_s * 1e3, h2d_mb_per_token=s.h2d_bytes_per_token / 1e6,
                             full_hit_rate=s.full_hit_rate, miss_rate=s.miss_rate,
                             peak_gib_max=None if None in peaks else max(peaks) / 2**30,  # so far, not reset
                             wall_s=time.perf_counter() - t0))
            print(rows[-1], flush=True)
            del eng, res
            moepic_jax.ENGINES.clear()
            gc.collect()  # free this engine's caches before the next is built (peak_bytes_in_use is process-wide)
    cols = [("policy", "policy", ""), ("devices", "GPUs", ""), ("budget_gib_per_device", "budget GiB/GPU", ".2f"),
            ("cache_gib_per_device", "cache GiB/GPU", ".2f"), ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"),
            ("h2d_mb_per_token", "H2D MB/tok", ".1f"), ("full_hit_rate", "full hit", ".1%"),
            ("peak_gib_max", "peak GiB (max GPU)", ".2f")]
    meta = {"benchmark": "1 vs several GPUs at equal per-device budget", "model": C.MODEL_NAMES[args.model],
            "tiny": args.tiny, "env": C.env_info(), "frac": args.frac}
    if args.out_dir:
        C.write_results("bench_multi_gpu_" + args.model + ("_tiny" if args.tiny else ""), rows, meta, args.out_dir)
    print(C.markdown_table(rows, cols))
    return 0


if __name__ == "__main__":
    sys.exit(main())

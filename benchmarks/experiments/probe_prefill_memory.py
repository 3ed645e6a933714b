"""Where does prefill's device peak go past the engine's own estimate? (invariant 3)

The GPU runs (docs/notes/2026-11-30-benchmark-diary.md) measured the cached policies 0.07 GiB (Qwen1.5-MoE) to 0.22 GiB
(Qwen3-30B-A3B, 24 layers) over `OffloadEngine.device_bytes_needed`, with the excess in prefill. This script builds
one engine per policy, one policy per process (the device peak cannot be reset), and records after each step, each
waited for:
`bytes_in_use` and `peak_bytes_in_use` from the allocator and the bytes of live jax arrays on the device; the
estimate's parts beside them. The first prefill runs with every compiled program and stack copy waited for (per
step peaks), the second as the engine runs it (programs queued ahead). Prints a table, writes JSON to --out-dir.

  python -m benchmarks.experiments.probe_prefill_memory --model qwen3 --layers 24 --policy lru --frac 0.25 \
      --out-dir DIR
"""

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3", choices=("qwen15", "olmoe", "qwen3", "mixtral"))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--frac", type=float, default=0.25)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test: no allocator stats)")
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import common as C
    C.set_gpu_env(args.model, args.tiny)
    from moepic_jax.generate import bucket as _bucket
    from moepic_jax.offload.memory import tree_bytes
    from moepic_jax.runtime.engine import device_memory_stats
    from moepic_jax.runtime.factory import make_engine

    GiB = 2**30
    cfg = C.get_config(args.model, tiny=args.tiny, n_layers=args.layers)
    model = C.random_model(cfg, progress=not args.tiny)
    T = _bucket(args.prompt_len)
    max_len = _bucket(T + 32)
    # The budget as bench_policies sets it, computed without building anything on the device.
    sizing = make_engine(model, policy="ondemand", vram_budget=None, max_batch=1, max_seq_len=max_len)
    fixed = sizing.fixed_bytes_for(1, max_len, prefetch=True)
    del sizing
    C.release_engine(model, None)
    budget = int(fixed + args.frac * cfg.total_expert_bytes(model.dtype_bytes))
    log = []

    def mark(what):
        st = device_memory_stats() or {}
        row = {"step": what, "in_use_gib": st.get("bytes_in_use", 0) / GiB,
               "peak_gib": st.get("peak_bytes_in_use", 0) / GiB, "live_arrays_gib": C.live_device_bytes() / GiB}
        log.append(row)
        gap_mib = (row["in_use_gib"] - row["live_arrays_gib"]) * 1024
        print(f"  {what:28s} in use {row['in_use_gib']:8.3f}  peak {row['peak_gib']:8.3f}  live arrays "
              f"{row['live_arrays_gib']:8.3f} GiB, in use - live {gap_mib:7.1f} MiB", flush=True)

    mark("model built")
    eng = make_engine(model, args.policy, vram_budget=budget, granule=16 if args.tiny else 128,
                      max_batch=1, max_seq_len=max_len)
    mark("engine made")
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
    mask = jnp.ones((1, T), bool)
    state = eng.new_state(1, max_len)
    mark("KV cache made")
    # Each compile (warm-up) and every program and stack copy of the first prefill waited for and marked
    # (instance attributes shadow the methods; the engine's code is unchanged).
    get, stack = eng.compiles.get, eng._prefill_stack

    def waited(name, fn):
        def run(*a, **k):
            out = jax.block_until_ready(fn(*a, **k))
            mark(name)
            return out
        return run

    def get_marked(name, *a, **k):
        n = len(eng.compiles._fns)
        exe = get(name, *a, **k)
        if len(eng.compiles._fns) > n:
            mark(f"compiled {name}")
        return waited(name, exe)

    eng.compiles.get = get_marked
    # The cache build (end of warm-up): a mark after each layer's zeroed slots and after its filled cache
    # (`_build_caches` makes the first with jnp.zeros(..., device=) and hands the second to jax.device_put).
    zeros, put = jnp.zeros, jax.device_put

    def zeros_marked(*a, **k):
        out = zeros(*a, **k)
        if "device" in k:
            jax.block_until_ready(out)
            mark(f"zeroed slots {out.shape}")
        return out

    def put_marked(x, *a, **k):
        out = put(x, *a, **k)
        if hasattr(x, "slot_of"):
            jax.block_until_ready(out)
            mark("cache filled")
        return out

    jnp.zeros, jax.device_put = zeros_marked, put_marked
    eng.warmup(state, tokens, mask, jnp.zeros((1,), jnp.int32))
    jnp.zeros, jax.device_put = zeros, put
    mark("warm-up (compiles, caches)")
    parts = {"resident": tree_bytes(eng.resident), "kv_state": tree_bytes(state),
             "caches (all fields)": tree_bytes(eng.caches), "tops (cache_bytes)": eng.cache_bytes(),
             "two stacks": 2 * eng.stack_bytes,
             **{f"temps {n}": eng.compiles.temp_bytes_of(n) for n in eng.compiles.seconds_by_name},
             "workspace (margin + allocator slack)": eng.workspace_bytes(),
             "needed (estimate)": eng.device_bytes_needed(state), "budget": budget}
    eng._prefill_stack = lambda l, src: waited(f"stack {l}", stack)(l, src)
    jax.block_until_ready(eng.prefill(state, tokens, mask))
    mark("prefill 1 (each step waited)")
    eng.compiles.get, eng._prefill_stack = get, stack
    del eng.compiles.get, eng._prefill_stack
    state = eng.new_state(1, max_len)
    logits, state, _ = eng.prefill(state, tokens, mask)
    jax.block_until_ready(logits)
    mark("prefill 2 (queued)")
    jax.block_until_ready(eng.decode(state, jnp.argmax(logits, -1).astype(jnp.int32)))
    mark("one decode step")
    peak = max(r["peak_gib"] for r in log)
    result = {"command": C.command_line(), "model": C.MODEL_NAMES[args.model],
              "n_layers": cfg.n_layers, "policy": args.policy, "frac": args.frac, "env": C.env_info(),
              "estimate_parts_gib": {k: v / GiB for k, v in parts.items()},
              "peak_gib": peak, "over_estimate_gib": peak - parts["needed (estimate)"] / GiB, "log": log}
    print("\nestimate parts (GiB): " + ", ".join(f"{k} {v / GiB:.3f}" for k, v in parts.items()))
    print(f"peak {peak:.3f} GiB, over the estimate by {result['over_estimate_gib']:+.3f} GiB")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        path = os.path.join(args.out_dir, f"probe_prefill_memory_{args.model}_{args.policy}.json")
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What does a conditional cost in the decode step? Per policy at one VRAM budget: decode time per token with
steps queued back to back (`engine.decode` in a loop, no host read), with a host read after every step, and the
`generate` TPOT; H2D bytes per token and the floor they imply. Run it once with default XLA flags and once with
`XLA_FLAGS=--xla_gpu_enable_command_buffer=...,CONDITIONAL,WHILE` (CUDA-graph conditional nodes, no host sync
per `lax.cond`) to see whether the syncs or the copies themselves cost the time.

  python -m benchmarks.experiments.probe_cond --tag default [--tiny] [--out-dir DIR]
Prints a short table; JSON to DIR/probe_cond_<tag>.json when --out-dir is given.
"""
import argparse
import dataclasses
import json
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
import moepic_jax  # noqa: E402
from moepic_jax.generate import generate  # noqa: E402
from moepic_jax.offload import copy_step  # noqa: E402
from moepic_jax.planning.calibrate import default_hardware, profile_model  # noqa: E402
from moepic_jax.runtime.factory import make_engine  # noqa: E402


def time_steps(engine, state, tok, steps, sync_each):
    h2d = 0.0
    t0 = time.perf_counter()
    cs = []
    for _ in range(steps):
        logits, state, c = engine.decode(state, tok)
        cs.append(c)
        if sync_each:
            np.asarray(logits[:, :1])
    jax.block_until_ready(logits)
    dt = (time.perf_counter() - t0) / steps
    if cs and cs[0]:
        h2d = float(np.mean([np.sum(np.asarray(c["h2d_bytes"])) for c in cs]))
    return dt * 1e3, h2d, state


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--tag", default="default")
    ap.add_argument("--frac", type=float, default=0.5, help="fraction of the expert bytes added to the fixed part")
    ap.add_argument("--policies", default="resident,ondemand,lru,static,moepic")
    ap.add_argument("--groups", default="", help="comma list of copy_step.COPY_GROUP values to try (default: as is)")
    ap.add_argument("--variants", default="base",
                    help="comma list: base; noprefetch (the policy without its prefetch). A third variant, the prefetch "
                         "on GPU stream 1 (compute_on('gpu_stream:1')), was refused by XLA 0.11.2: "
                         "probe_cond_stream.json")
    ap.add_argument("--out-dir", default=None, help="folder of the JSON result (default: print only)")
    args = ap.parse_args()
    cfg = common.get_config("qwen15", tiny=args.tiny)
    model = common.random_model(cfg, progress=False)
    F = cfg.d_ff
    stack0 = model.params.layers[cfg.moe_layer_ids[0]].moe.experts
    bw = common.measure_peak_h2d(stack0, split=F // 2, k=cfg.top_k)["peak_Bps"]
    T, L = 128, 256
    base = make_engine(model, policy="ondemand", max_batch=1, max_seq_len=L)
    fixed = base.fixed_bytes
    mp = profile_model(base.weights)
    del base
    hw = default_hardware(cfg.n_layers)
    budget = int(fixed + args.frac * cfg.total_expert_bytes(model.dtype_bytes))
    rng = np.random.RandomState(0)
    toks = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, T)), jnp.int32)
    mask = jnp.ones((1, T), bool)
    rows = {}
    groups = [int(g) for g in args.groups.split(",")] if args.groups else [None]
    runs = [(p, g, v) for p in args.policies.split(",") for g in groups for v in args.variants.split(",")
            if p != "resident" or v == "base"]
    for policy, group, variant in runs:
        policy_key = policy
        if group is not None:
            copy_step.COPY_GROUP = group  # read when the decode step is traced
            policy_key = f"{policy} group={group}"
        if variant != "base":
            policy_key = f"{policy_key} {variant}"
        try:
            t0 = time.perf_counter()
            if policy == "resident":
                eng = make_engine(model, "resident")
            else:
                eng = make_engine(model, policy, vram_budget=budget, max_batch=1, max_seq_len=L, profile=mp, hardware=hw,
                                  granule=128 if not args.tiny else 16)
                if variant == "noprefetch":
                    eng.spec = dataclasses.replace(eng.spec, predicts=False)
            state = eng.new_state(1, L)
            tok = jnp.zeros((1,), jnp.int32)
            eng.warmup(state, toks, mask, tok)
            build = time.perf_counter() - t0
            _, state, _ = eng.prefill(state, toks, mask)
            _, _, state = time_steps(eng, state, tok, 3, True)
            a, h2d, state = time_steps(eng, state, tok, 20, False)
            b, _, state = time_steps(eng, state, tok, 10, True)
            del state
            res = generate([rng.randint(0, cfg.vocab_size, T).tolist()], model=model, engine=eng, max_new_tokens=32,
                           temperature=1.0)
            rows[policy_key] = {"ms_queued": a, "ms_sync_each": b, "generate_tpot_ms": res.stats.tpot_s * 1e3,
                            "h2d_mb_per_token": h2d / 1e6, "floor_ms": h2d / bw * 1e3, "build_s": build,
                            "full_hit_rate": res.stats.full_hit_rate, "miss_rate": res.stats.miss_rate,
                            "splits": sorted({lp.split for lp in eng.cache_plan.layers}) if eng.cache_plan else None}
            print(policy_key, json.dumps(rows[policy_key]), flush=True)
            del eng, res
            moepic_jax.ENGINES.clear()
        except Exception as e:  # a variant XLA refuses is a result too; go on with the others
            rows[policy_key] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(policy_key, "FAILED", rows[policy_key]["error"], flush=True)
            eng = res = None
            moepic_jax.ENGINES.clear()
    env = common.env_info()
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, f"probe_cond_{args.tag}.json"), "w") as f:
            json.dump({"rows": rows, "peak_h2d_Bps": bw, "budget_bytes": budget, "env": env,
                       "xla_flags": os.environ.get("XLA_FLAGS", "")}, f, indent=1)
    print(f"\n{args.tag}: XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, budget {budget / 2**30:.2f} GiB, "
          f"peak H2D {bw / 1e9:.1f} GB/s")
    print("| policy | ms queued | ms sync each | generate TPOT ms | H2D MB/tok | floor ms | full hit | miss |\n"
          "|---|---|---|---|---|---|---|---|")
    for k, v in rows.items():
        if "error" in v:
            print(f"| {k} | failed: {v['error'][:80]} |")
            continue
        print(f"| {k} | {v['ms_queued']:.2f} | {v['ms_sync_each']:.2f} | {v['generate_tpot_ms']:.2f} | "
              f"{v['h2d_mb_per_token']:.1f} | {v['floor_ms']:.2f} | {v['full_hit_rate']:.1%} | {v['miss_rate']:.1%} |")


if __name__ == "__main__":
    main()

"""Refill rules for `adapt_to_prompt`, evaluated offline on the trained embedded model and random weights.

The engine is exact, so the tokens a decode produces, and therefore the routing it sees, do not depend on the
policy: one resident `generate` gives every rule's decode routing. For each variant ("trained": the embedded
checkpoint; "random" / "zipf": random weights of its config, zipf with the labelled router bias), each budget and
each rule, this script picks each layer's slots from the prompt's routing with the engine's rule
(`offload.prefill.prompt_refill`, the one `OffloadEngine._refill_from_prompt` applies) at the prior under test, or
by a blend with the calibration profile, and reports the hit rate of those slots on the decode's routing. The rule
"prompt, prior 1 token" is the engine's (PROMPT_PRIOR_TOKENS = 1) and "plan" is the static cache without refill;
both reproduce the engine's measured hit rates (`benchmarks/results/embedded/bench_routing_embedded.md`). Hit rates
only; CPU is enough.

Usage (from the repo root):
  python -m benchmarks.experiments.sweep_refill            # ~4 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", default="0.25,0.5", help="fractions of the expert bytes added to the fixed part")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--name", default="sweep_refill")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results/")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    import numpy as np

    from benchmarks import common as C
    import moepic_jax
    from moepic_jax.generate import bucket as _bucket, generate
    from moepic_jax.io.checkpoint import default_checkpoint_dir
    from moepic_jax.offload.prefill import PROMPT_PRIOR_TOKENS, prompt_refill
    from moepic_jax.planning.calibrate import default_hardware, profile_model
    from moepic_jax.runtime.factory import make_engine

    trained = moepic_jax.load(dtype="float32")
    cfg = trained.cfg
    ids = np.asarray(trained.tokenizer.encode((default_checkpoint_dir() / "heldout_sample.txt").read_text()), np.int32)
    calib, prompt = ids[: args.calib_tokens], ids[len(ids) - args.prompt_tokens:].tolist()  # two distant parts
    max_len = _bucket(args.prompt_tokens + args.new_tokens)
    hw = default_hardware(cfg.n_layers)
    moe = np.array(cfg.moe_layers)
    E, k, T = cfg.n_experts, cfg.top_k, len(prompt)
    mean = T * k / E  # the prompt's routed tokens per expert, on average
    rules = {"plan (no refill)": None, f"prompt, prior {PROMPT_PRIOR_TOKENS:g} token (engine)": ("prior", PROMPT_PRIOR_TOKENS)}
    rules.update({f"prompt, prior {a:g} x mean count": ("prior", a * mean) for a in (1, 2, 4)})
    rules.update({f"blend, calibration weight {b:g}": ("blend", b) for b in (0.25, 0.5, 0.75)})
    rows = []
    for variant in ("trained", "random", "zipf"):
        model = trained if variant == "trained" else C.random_model(
            cfg, dtype="float32", seed=0, zipf_bias=args.zipf if variant == "zipf" else None, progress=False)
        base = make_engine(model, policy="ondemand", vram_budget=None, max_batch=1, max_seq_len=max_len)
        fixed = base.fixed_bytes_for(1, max_len, prefetch=True)
        mp = profile_model(base.weights, tokens=calib)
        pm = profile_model(base.weights, tokens=np.asarray(prompt, np.int32), smoothing=0.0)
        res = generate([prompt], model=model, max_new_tokens=args.new_tokens, policy="resident")  # greedy
        run = profile_model(base.weights, np.asarray(prompt + res.token_ids[0][:-1], np.int32), score_from=T,
                            smoothing=0.0)
        for frac in sorted(float(x) for x in args.budgets.split(",")):
            eng = make_engine(model, "static", vram_budget=int(fixed + frac * cfg.total_expert_bytes(model.dtype_bytes)),
                              granule=16, profile=mp, hardware=hw, max_batch=1, max_seq_len=max_len)
            row = {"variant": variant, "budget_frac": frac}
            for name, rule in rules.items():
                hits = []
                for l, lp in enumerate(eng.cache_plan.layers):
                    if not moe[l]:
                        continue
                    owner = np.array(lp.cached, np.int64)
                    if rule is None or not len(owner):
                        keep = owner.tolist()
                    elif rule[0] == "prior":
                        keep = prompt_refill(np.rint(pm.freq[l] * T), owner, rule[1]).tolist()  # the engine's rule
                    else:  # shares of routed pairs: (1 - b) x the prompt's + b x the calibration profile's
                        score = (1 - rule[1]) * pm.freq[l] / k + rule[1] * mp.freq[l] / k
                        keep = np.argsort(-score, kind="stable")[:len(owner)].tolist()
                    hits.append(run.freq[l, keep].sum() / k)  # share of the decode's routed pairs on these slots
                row[name] = float(np.mean(hits))
            rows.append(row)
            print(variant, f"{frac:.0%}", " | ".join(f"{n}: {row[n]:.1%}" for n in rules), flush=True)
            del eng
        del base
    env = C.env_info()
    meta = {"benchmark": "adapt_to_prompt refill rules, offline", "env": env, "settings": dict(vars(args)),
            "total_s": round(time.perf_counter() - t0, 1),
            "notes": ["hit rate = share of the decode's routed (token, expert) pairs whose expert the rule keeps "
                      "cached (whole experts, static plan); the decode's routing is the resident model's greedy "
                      "continuation, which every exact policy reproduces",
                      f"mean count = the prompt's routed tokens per expert ({mean:g}); blend = share of routed pairs "
                      "in the prompt and in the calibration profile, mixed with the given calibration weight"]}
    columns = [("variant", "variant", ""), ("budget_frac", "experts in budget", ".0%")] + [(n, n, ".1%") for n in rules]
    paths = C.write_results(args.name, rows, meta, out_dir=args.out_dir, columns=columns, plot=False,
                            title="adapt_to_prompt: refill rules, hit rates on the decode's routing (offline)")
    print(f"\nwrote {', '.join(paths)}\n")
    print(C.markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Routing realism: the trained embedded model's learned routing beside random weights of the
same configuration, with and without the Zipf router bias.

Random weights route almost uniformly and by prompt, a trained model does not; cache hit rates and predictor
recall depend on that, so every random-weight result should be read beside a trained model's. For each variant
("trained": `moepic_jax.load()`, the embedded checkpoint; "random": `common.random_model` of the same config;
"zipf": the same with the labelled Zipf router bias of `--zipf`):
  * the planner's model profile on calibration text (held-out Python source, `checkpoints/*/heldout_sample.txt`,
    one part) and the routing of the timed prompt (another part): normalised routing entropy (1 = uniform), share
    of routed pairs on the top quarter of experts, predictor recall (layer l+1's router on layer l's hidden state);
  * for each policy and budget (fixed part + frac x expert bytes): one `generate` of the prompt, and what the
    decode saw: full / top-only hit rates, misses, H2D bytes per token, predictor recall, TPOT on this device;
    the planner's expected hit rate of the plan on the calibration profile and on the prompt's own routing.
Plans are solved with `calibrate.default_hardware` (the H200 figures), so they are the plans an H200 would run.
TPOT is only meaningful on a GPU; on a CPU the hit rates, bytes and recall are the result.

Usage (from the repo root):
  python -m benchmarks.bench_routing                 # CPU or GPU, ~3 minutes on 2 CPU cores
  python -m benchmarks.bench_routing --variants trained --budgets 0.25
"""

from __future__ import annotations

import argparse
import time


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="trained,random,zipf", help="comma list of trained, random, zipf")
    ap.add_argument("--policies", default="lru,static,moepic")
    ap.add_argument("--adapt", default="both", choices=("on", "off", "both"),
                    help="static/moepic: refill the cache from the prompt's routing (adapt_to_prompt), keep the plan's "
                         "hot set, or run both")
    ap.add_argument("--budgets", default="0.1,0.25,0.5", help="fractions of the expert bytes added to the fixed part")
    ap.add_argument("--zipf", type=float, default=1.0, help="alpha of the Zipf router bias of the 'zipf' variant")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the trained model's own text)")
    ap.add_argument("--granule", type=int, default=16)
    ap.add_argument("--dtype", default="float32",
                    help="weights (default float32: on the CPU backend a bfloat16 decode step's XLA temporaries hold "
                         "float32 upcasts of its experts, which the GPU does not make; they count against the budget "
                         "and would leave the small model's LRU cache no slots)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="bench_routing_embedded")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results/embedded/")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    import numpy as np

    from benchmarks import common as C
    import moepic_jax
    from moepic_jax.generate import bucket as _bucket, generate
    from moepic_jax.io.checkpoint import default_checkpoint_dir
    from moepic_jax.planning.calibrate import default_hardware, profile_model
    from moepic_jax.planning.planner import plan_stats
    from moepic_jax.runtime.factory import make_engine

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("trained", "random", "zipf")]
    if bad:
        raise SystemExit(f"unknown variants {bad}; choose from trained, random, zipf")
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    fracs = sorted(float(x) for x in args.budgets.split(",") if x.strip())
    env = C.env_info()
    trained = moepic_jax.load(dtype=args.dtype)
    cfg = trained.cfg
    text = (default_checkpoint_dir() / "heldout_sample.txt").read_text()
    ids = np.asarray(trained.tokenizer.encode(text), np.int32)
    need = args.calib_tokens + args.prompt_tokens
    if len(ids) < need:
        raise SystemExit(f"the held-out sample has {len(ids)} tokens; --calib-tokens + --prompt-tokens must be <= that")
    calib, prompt = ids[: args.calib_tokens], ids[len(ids) - args.prompt_tokens:].tolist()  # two distant parts
    max_len = _bucket(args.prompt_tokens + args.new_tokens)
    hw = default_hardware(cfg.n_layers)
    moe = np.array(cfg.moe_layers)
    print(f"# {args.name}: {env['device']} ({env['platform']}), jax {env['versions'].get('jax')}; "
          f"{cfg.n_layers} layers x {cfg.n_experts} experts, top-{cfg.top_k}", flush=True)

    rows, summary = [], {}
    for variant in variants:
        if variant == "trained":
            model = trained
        else:
            model = C.random_model(cfg, dtype=trained.dtype, seed=args.seed,
                                   zipf_bias=args.zipf if variant == "zipf" else None, progress=False)
        base = make_engine(model, policy="ondemand", vram_budget=None, max_batch=1, max_seq_len=max_len)
        fixed = base.fixed_bytes_for(1, max_len, prefetch=True)
        mp = profile_model(base.weights, tokens=calib)
        prompt_mp = profile_model(base.weights, tokens=np.asarray(prompt, np.int32), smoothing=0.0)
        del base
        r_cal = C.routing_entropy(mp.freq, cfg.top_k, cfg.moe_layers)
        r_prompt = C.routing_entropy(prompt_mp.freq, cfg.top_k, cfg.moe_layers)
        summary[variant] = {
            "calibration_entropy": r_cal["norm_entropy_mean"], "calibration_top25_share": r_cal["top25pct_share_mean"],
            "prompt_entropy": r_prompt["norm_entropy_mean"], "prompt_top25_share": r_prompt["top25pct_share_mean"],
            "profiled_recall": float(np.nanmean(mp.recall)), "prompt_recall": float(np.nanmean(prompt_mp.recall)),
            "routing_calibration": r_cal, "routing_prompt": r_prompt}
        s = summary[variant]
        print(f"{variant}: entropy {s['calibration_entropy']:.3f} (calibration) / {s['prompt_entropy']:.3f} (prompt), "
              f"top-25% share {s['calibration_top25_share']:.1%} / {s['prompt_top25_share']:.1%}, "
              f"predictor recall {s['profiled_recall']:.1%} / {s['prompt_recall']:.1%}", flush=True)
        expert_bytes = cfg.total_expert_bytes(model.dtype_bytes)
        adapts = {"on": (True,), "off": (False,), "both": (False, True)}[args.adapt]
        for frac in fracs:
            for policy, adapt in [(p, a) for p in policies for a in (adapts if p in ("static", "moepic") else (True,))]:
                eng = make_engine(model, policy, vram_budget=int(fixed + frac * expert_bytes), granule=args.granule,
                                  profile=mp, hardware=hw, max_batch=1, max_seq_len=max_len, adapt_to_prompt=adapt)
                res = generate([prompt], model=model, engine=eng, max_new_tokens=args.new_tokens,
                               temperature=args.temperature, seed=args.seed)
                st = res.stats
                row = {"variant": variant, "policy": policy, "budget_frac": frac,
                       "adapt": adapt if policy in ("static", "moepic") else None,
                       "full_hit_rate": st.full_hit_rate, "top_only_hit_rate": st.top_only_hit_rate,
                       "miss_rate": st.miss_rate, "h2d_mb_per_token": st.h2d_bytes_per_token / 1e6,
                       "predictor_recall": None if np.isnan(st.predictor_recall) else st.predictor_recall,
                       "prefetch": bool(eng.prefetches), "tpot_ms": st.tpot_s * 1e3,
                       "cache_experts_frac": eng.cache_bytes() / expert_bytes}
                if policy in ("static", "moepic"):
                    plan = eng.cache_plan
                    row["plan_splits"] = sorted({lp.split for lp, m in zip(plan.layers, moe) if m})
                    hit = lambda p: float(np.mean((p["full_hit_rate"] + p["top_only_hit_rate"])[moe]))  # noqa: E731
                    row["planned_hit_rate"] = hit(plan_stats(plan, mp))
                    # the slots as the decode used them, on the routing this run decoded (raw counts)
                    run_mp = profile_model(eng.weights, np.asarray(prompt + res.token_ids[0][:-1], np.int32),
                                           score_from=len(prompt), smoothing=0.0)
                    row["run_routing_hit_rate"] = hit(plan_stats(eng.plan_in_use(), run_mp))
                rows.append(row)
                label = policy + ("+adapt" if row["adapt"] else "")
                print(f"  {label:>12} @ {frac:.0%}: hit {st.full_hit_rate + st.top_only_hit_rate:.1%} "
                      f"(top-only {st.top_only_hit_rate:.1%}), H2D {row['h2d_mb_per_token']:.3f} MB/tok, "
                      f"prefetch {row['prefetch']}, recall {st.predictor_recall:.1%}, TPOT {row['tpot_ms']:.2f} ms"
                      + (f", planned hit {row['planned_hit_rate']:.1%} (run routing {row['run_routing_hit_rate']:.1%})"
                         if "planned_hit_rate" in row else ""), flush=True)
                del eng

    meta = {"benchmark": "routing realism", "model": "embedded (checkpoints/stdlib_moe)",
            "config": cfg.to_hf_dict(), "env": env, "routing": summary,
            "settings": dict(vars(args)),
            "notes": [
                "trained = the embedded checkpoint; random / zipf = random weights of the same config (zipf: Zipf "
                f"router bias alpha {args.zipf:g}, labelled); calibration and prompt: two distant parts of the "
                "held-out Python source",
                "routing: " + "; ".join(f"{v} entropy {s['calibration_entropy']:.3f}/{s['prompt_entropy']:.3f}, top-25% "
                                        f"share {s['calibration_top25_share']:.1%}/{s['prompt_top25_share']:.1%}, "
                                        f"recall {s['profiled_recall']:.1%}/{s['prompt_recall']:.1%} "
                                        "(calibration/prompt)" for v, s in summary.items()),
                "plans solved with calibrate.default_hardware (H200 figures); TPOT is this device's "
                f"({env['device']}), meaningful on a GPU only",
            ],
            "total_s": round(time.perf_counter() - t_start, 1)}
    columns = [("variant", "variant", ""), ("policy", "policy", ""), ("adapt", "adapt to prompt", ""),
               ("budget_frac", "experts in budget", ".0%"),
               ("cache_experts_frac", "cache / expert bytes", ".0%"), ("full_hit_rate", "full hit", ".1%"),
               ("top_only_hit_rate", "top-only hit", ".1%"), ("miss_rate", "miss", ".1%"),
               ("planned_hit_rate", "planned hit (calibration)", ".1%"),
               ("run_routing_hit_rate", "slots' hit on run routing", ".1%"),
               ("h2d_mb_per_token", "H2D MB/tok", ".3f"), ("prefetch", "prefetch", ""),
               ("predictor_recall", "recall", ".1%"), ("tpot_ms", "TPOT ms (this device)", ".2f")]
    out_dir = args.out_dir or C.RESULTS_DIR / "embedded"
    paths = C.write_results(args.name, rows, meta, out_dir=out_dir, columns=columns, plot=False,
                            title="Routing realism: trained embedded model vs random weights of its config")
    print("\nwrote " + ", ".join(paths))
    print("\n" + C.markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

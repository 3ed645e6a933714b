"""Every policy at several VRAM budgets on one random-weight model with a real configuration.

For the model (default: Qwen1.5-MoE-A2.7B, bf16, weights drawn on the GPU, experts in pinned host memory):
  * the peak pinned_host -> device bandwidth of this run (`common.measure_peak_h2d`);
  * the fixed part of an offloading engine (`make_engine(model, "ondemand", max_batch=1, max_seq_len=...)`),
    one model profile (expert frequencies, predictor recall) and one hardware profile, shared by all engines;
  * for each budget = fixed part + frac * expert bytes (default frac 0.25, 0.5), in ascending order, and each
    offloading policy (ondemand, lru, static, moepic): one engine, a warm-up generate on another prompt (compiles;
    compile time reported apart), then one timed generate: 128-token prompt of random ids, 32 new tokens, batch 1
    (ondemand, which caches nothing, only at the smallest budget: the others would repeat it);
  * `resident` (all weights on the device) last, so the process-wide device peak of the offloading rows is not
    polluted by it (the peak cannot be reset: each row's "peak" is the running maximum up to that row).
Reports TTFT, TPOT median / p90, H2D bytes per token, hit rates, predictor recall, compile seconds, peak device
bytes, floor = H2D bytes per token / peak H2D bandwidth, efficiency = floor / TPOT. Results are written after every
row (JSON + markdown + PNG) into --out-dir (default benchmarks/results/<model>/); a markdown table is printed last.

Usage (from the repo root; `python -m benchmarks` runs it with the rest of a model's suite):
  python -m benchmarks.bench_policies                       # Qwen1.5-MoE-A2.7B, all policies
  python -m benchmarks.bench_policies --zipf 1.0            # with the Zipf router bias
  python -m benchmarks.bench_policies --routing calibrated  # a trace drawn to the model's published routing
  python -m benchmarks.bench_policies --tiny                # CPU smoke test (tiny config)
  python -m benchmarks.bench_policies --policies lru,moepic --batch 4      # batch 4
  python -m benchmarks.bench_policies --pairs lru:0.5:b4,moepic:0.5:b16,static:0.25:adapt  # one model
  python -m benchmarks.bench_policies --policies lru,moepic --prompt-len 1024  # TTFT of long prompts
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
import weakref
from pathlib import Path

ALL_POLICIES = ("ondemand", "lru", "static", "moepic", "resident")
ADAPTS = ("static", "moepic")  # the policies that take adapt_to_prompt
DEFAULT_POLICIES = {"qwen15": ALL_POLICIES, "olmoe": ("lru", "static", "moepic"), "qwen3": ("lru", "static", "moepic"),
                    "mixtral": ("static", "moepic")}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen15", choices=("qwen15", "olmoe", "qwen3", "mixtral"))
    ap.add_argument("--policies", default=None,
                    help=f"comma list from {','.join(ALL_POLICIES)} (default: all for qwen15; lru,static,moepic for "
                         "olmoe and qwen3; static,moepic for mixtral)")
    ap.add_argument("--budgets", default="0.25,0.5", help="fractions of the expert bytes added to the fixed part")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of the warm-up call (compiles)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batch", default="1", help="prompts decoded together, a comma list (e.g. 1,4,16)")
    ap.add_argument("--zipf", type=float, default=None, help="alpha of the Zipf router bias (default: own routing)")
    ap.add_argument("--tiny", action="store_true", help="tiny config of the same family (CPU smoke test)")
    ap.add_argument("--temperature", type=float, default=1.0,
                    help="sampling temperature of the decode (0 = greedy; a random model's greedy output tends to "
                         "repeat one token, which gives LRU free hits)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--experts", default="none", choices=("none", "int8", "int4"),
                    help="quantized experts (weight-only, group-wise; README 'Quantized experts')")
    ap.add_argument("--quant-group", type=int, default=None, help="elements per scale (default 128 int8, 64 int4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--granule", type=int, default=None, help="split granule in neurons (default 128; tiny 16)")
    ap.add_argument("--hw", default="measured", choices=("measured", "default"),
                    help="hardware profile given to the planner: measured in this run, or profile.default_hardware")
    ap.add_argument("--direct", default="auto", type=lambda v: {"auto": "auto", "on": True, "off": False}[v],
                    help="auto (default, as make_engine): direct copies (offload/transfer.py) on one GPU, the "
                         "conditional copy step elsewhere; on / off force either")
    ap.add_argument("--prefetch", default="auto", choices=("auto", "on", "off"),
                    help="next-layer prefetch: as the plan says (auto), or forced on / off")
    ap.add_argument("--adapt", default="off", choices=("on", "off"),
                    help="static/moepic: refill the cache from each prompt's routing (adapt_to_prompt)")
    ap.add_argument("--pairs", default=None,
                    help="run only these policy:fraction[:bN][:adapt][:direct|:cond][:pf|:nopf] runs (comma list), e.g."
                         " lru:0.5:b4,static:0.25:adapt,moepic:0.25:pf; bN = batch N (default: each --batch), adapt ="
                         " --adapt on for that run, direct / cond = that copy step, pf / nopf = prefetch forced on / off,"
                         " early / late = ready FFNs computed during / after the layer's copies, qreduce / qeinsum = quantized"
                         " experts' FFN at decode in its multiply-reduce / einsum form (layers.QUANT_REDUCE_MAX_TOKENS)")
    ap.add_argument("--time-limit", type=float, default=510.0,
                    help="seconds; a (policy, budget) run that would likely end past it is skipped")
    ap.add_argument("--routing", default="own",
                    help="own (the random routers; a stress case), calibrated (a trace drawn to match the published "
                         "routing statistics of --model: benchmarks.routing_traces), or a trace .npz to replay; "
                         "with a trace the planner profiles its first --trace-tokens rows and decode replays the next")
    ap.add_argument("--trace-tokens", type=int, default=512, help="rows of a calibrated trace for each half")
    ap.add_argument("--name", default=None, help="result file name (default bench_policies_<model>[_zipf..])")
    ap.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/<model>/)")
    return ap.parse_args(argv)


PAIR_OPTIONS = {"direct": {"direct": True}, "cond": {"direct": False}, "pf": {"prefetch": True},
                "nopf": {"prefetch": False}, "early": {"early": True}, "late": {"early": False},
                "qreduce": {"qreduce": 1}, "qeinsum": {"qreduce": 0}}


def parse_pair(item: str, batches: list[int], args) -> list[tuple]:
    """One --pairs item "policy:fraction[:bN][:adapt][:direct|:cond][:pf|:nopf][:early|:late][:qreduce|:qeinsum]" -> runs (policy, fraction,
    batch, adapt, options). direct / cond: direct copies / the conditional copy step (default: --direct); pf / nopf:
    prefetch forced on / off; early / late: `decode.READY_FFNS_DURING_COPIES` True / False for that row (full hits
    and prefetched experts computed during the layer's copies, or after their wait); qreduce /
    qeinsum: quantized experts' FFN on one token in its multiply-reduce form, or always the einsum form, for that
    row on every backend (`layers.QUANT_REDUCE_MAX_TOKENS`).
    Raises SystemExit on a bad item."""
    parts = item.split(":")
    if len(parts) < 2 or parts[0] not in ALL_POLICIES or parts[0] == "resident":
        raise SystemExit(f"--pairs item {item!r}: want policy:fraction[:bN][:adapt] with a policy of "
                         f"{', '.join(p for p in ALL_POLICIES if p != 'resident')} (resident: add it to --policies)")
    try:
        frac = float(parts[1])
        bs = [int(o[1:]) for o in parts[2:] if o.startswith("b")] or batches
    except ValueError:
        raise SystemExit(f"--pairs item {item!r}: the fraction must be a number and a batch bN an integer") from None
    bad = [o for o in parts[2:] if not (o in ("adapt", *PAIR_OPTIONS) or (o.startswith("b") and o[1:].isdigit()))]
    adapt = "adapt" in parts[2:] or args.adapt == "on"
    if bad or min(bs) < 1 or ("adapt" in parts[2:] and parts[0] not in ADAPTS):
        raise SystemExit(f"--pairs item {item!r}: options are bN (batch N >= 1), adapt (static/moepic only), "
                         f"{', '.join(PAIR_OPTIONS)}")
    opts = tuple(o for o in parts[2:] if o in PAIR_OPTIONS)
    return [(parts[0], frac, b, adapt and parts[0] in ADAPTS, opts) for b in bs]


def load_trace(args, cfg, RoutingTrace):
    """(RoutingTrace of 2 x --trace-tokens rows, a description) for --routing calibrated or a file."""
    if args.routing != "calibrated":
        return RoutingTrace.load(args.routing), f"replayed from {args.routing}"
    from benchmarks import routing_traces as RT

    n = 2 * args.trace_tokens
    if args.tiny:  # the tiny stand-in has fewer experts: the model's shares, its own shapes, no coverage target
        E, k, L, shares, reuse, _ = RT.MODELS[args.model]
        tr = RT.generate_trace(cfg.n_experts, cfg.top_k, cfg.n_layers, n, args.seed, top_shares=shares, reuse=reuse,
                               coverage=None)
    else:
        tr, _ = RT.model_trace(args.model, n, args.seed)
    st = RT.trace_stats(tr["ids"], tr["predicted"], cfg.n_experts)
    desc = (f"calibrated trace ({args.model}, seed {args.seed}): top 10/25/50 % of experts take "
            f"{st['top10']:.2f}/{st['top25']:.2f}/{st['top50']:.2f} of routed pairs, reuse {st['reuse']:.2f}, "
            f"recall {st['recall']:.2f}")
    return RoutingTrace(tr["ids"], tr["weights"], tr["predicted"]), desc


def main(argv=None) -> int:
    args = parse_args(argv)
    # the engine logs its warm-up re-plans (how far the compiled steps were over the estimated fixed part)
    logging.basicConfig(format="  %(name)s: %(message)s")
    logging.getLogger("moepic_jax").setLevel(logging.INFO)
    t_start = time.perf_counter()
    import numpy as np

    from benchmarks import common as C
    C.set_gpu_env(args.model, args.tiny)  # before the first device use
    from moepic_jax.runtime.engine import device_memory_stats
    from moepic_jax.runtime.factory import make_engine, uses_direct
    from moepic_jax.generate import bucket as _bucket, generate
    import jax

    from moepic_jax.offload import transfer
    from moepic_jax.model import layers as layers_mod
    from moepic_jax.offload import decode as decode_mod
    from moepic_jax.offload.decode import RoutingTrace
    from moepic_jax.planning.calibrate import default_hardware, measure_hardware, profile_from_trace, profile_model
    from moepic_jax.planning.planner import plan_stats, predicted_tpot

    policies = tuple(p.strip() for p in (args.policies.split(",") if args.policies else DEFAULT_POLICIES[args.model])
                     if p.strip())
    bad = [p for p in policies if p not in ALL_POLICIES]
    if bad:
        raise SystemExit(f"unknown policies {bad}; choose from {', '.join(ALL_POLICIES)}")
    fracs = sorted(float(x) for x in args.budgets.split(",") if x.strip())
    batches = sorted(int(x) for x in args.batch.split(",") if x.strip())
    granule = args.granule or (16 if args.tiny else 128)
    # ondemand caches nothing, so its budget changes nothing it runs: one row per batch, at the smallest budget
    runs = [(p, f, b, args.adapt == "on" and p in ADAPTS, ())
            for b in batches for f in fracs for p in policies if p != "resident" and (p != "ondemand" or f == fracs[0])]
    if args.pairs:  # only these runs, e.g. "static:0.1,lru:0.75:b4,static:0.25:adapt"
        runs = [r for item in args.pairs.split(",") if item.strip() for r in parse_pair(item.strip(), batches, args)]
    if "resident" in policies:
        runs += [("resident", None, b, False, ()) for b in sorted({r[2] for r in runs} or set(batches))]
    if not runs:
        raise SystemExit("nothing to run: give --policies and --budgets (or --pairs)")
    run_batches = sorted({r[2] for r in runs})
    name = args.name or ("bench_policies_" + args.model + ("_tiny" if args.tiny else "")
                         + (f"_zipf{args.zipf:g}" if args.zipf else "") + "".join(f"_b{b}" for b in run_batches if b > 1)
                         + (f"_p{args.prompt_len}" if args.prompt_len != 128 else "")
                         + (f"_{args.experts}" if args.experts != "none" else ""))
    out_dir = Path(args.out_dir) if args.out_dir else C.RESULTS_DIR / args.model
    env = C.env_info()
    print(f"# {name}: {env['device']} ({env['platform']}), jax {env['versions'].get('jax')}", flush=True)

    cfg = C.get_config(args.model, tiny=args.tiny, experts=args.experts,
                       quant_group=args.quant_group if args.experts != "none" else None)
    model = C.random_model(cfg, dtype=args.dtype, seed=args.seed, zipf_bias=args.zipf, progress=not args.tiny)
    info = model.random_info
    print(f"model {C.MODEL_NAMES[args.model]}{' (tiny)' if args.tiny else ''}: experts "
          f"{info['expert_bytes'] / 2**30:.2f} GiB pinned_host, resident {info['resident_bytes'] / 2**30:.2f} GiB, "
          f"built in {info['build_s']:.1f} s (pinning {info['pin_s']:.1f} s)", flush=True)

    F = cfg.d_ff
    l0 = cfg.moe_layer_ids[0]
    stack0 = model.params.layers[l0].moe.experts
    h2d = C.measure_peak_h2d(stack0, split=(F // 2 // granule) * granule or F // 2, k=cfg.top_k)
    peak_bw = h2d["peak_Bps"]
    print(f"H2D: stack {h2d['stack_bytes'] / 1e6:.0f} MB at {h2d['stack_GBps_best']:.1f} GB/s (best), expert "
          f"{h2d['expert_bytes'] / 1e6:.1f} MB at {h2d['expert_GBps']:.1f} GB/s, {h2d['k_experts']} experts in one jit at "
          f"{h2d['k_experts_GBps']:.1f} GB/s; peak {peak_bw / 1e9:.1f} GB/s ({h2d['peak_source']})", flush=True)

    T = _bucket(args.prompt_len)
    max_len = _bucket(T + args.new_tokens)
    warm_tokens = args.warmup_tokens if _bucket(T + args.warmup_tokens) == max_len else args.new_tokens
    max_batch = max(r[2] for r in runs)
    ekw = dict(max_seq_len=max_len)
    prefetch = {"auto": None, "on": True, "off": False}[args.prefetch]

    t0 = time.perf_counter()
    base = make_engine(model, policy="ondemand", vram_budget=None, max_batch=max_batch, **ekw)
    # The largest fixed part of the policies, per batch size: budgets are fixed(batch) + frac x expert bytes.
    expert_bytes = cfg.total_expert_bytes(model.dtype_bytes)
    fixed_of = {b: base.fixed_bytes_for(b, max_len, prefetch=True) for b in sorted({r[2] for r in runs})}
    fixed = fixed_of[min(fixed_of)]
    # Ascending budgets, resident last: each row's peak is the process-wide running maximum (it cannot be reset).
    runs.sort(key=lambda r: (r[0] == "resident", 0 if r[1] is None else fixed_of[r[2]] + r[1] * expert_bytes))
    trace = None
    if args.routing != "own":
        trace, trace_info = load_trace(args, cfg, RoutingTrace)
        half = trace.ids.shape[0] // 2  # the planner profiles the first half; decode replays the second
        mp = profile_from_trace(RoutingTrace(*(x[:half] for x in trace)), cfg, model.dtype_bytes)
        trace = RoutingTrace(*(x[half:] for x in trace))
        print(f"routing: {trace_info}; {half} rows profiled, {trace.ids.shape[0]} replayed", flush=True)
    else:
        mp = profile_model(base.weights)
    # The planner prices the copy step each row runs: one hardware profile per step the rows use.
    base_place = base.place
    run_direct = uses_direct(args.direct, base_place)
    modes = {run_direct} | {PAIR_OPTIONS[o]["direct"] for r in runs for o in r[4] if "direct" in PAIR_OPTIONS[o]}
    hw_error, hws = None, {}
    for mode in sorted(modes, key=lambda m: m != run_direct):
        try:
            hws[mode] = (measure_hardware(base.weights, direct=mode) if args.hw == "measured"
                         else default_hardware(cfg.n_layers, direct=mode))
        except Exception as e:  # noqa: BLE001 - the planner can still run on the default profile
            hw_error = f"{type(e).__name__}: {e}"
            print(f"measure_hardware failed ({hw_error}); the planner uses profile.default_hardware", flush=True)
            hws[mode] = default_hardware(cfg.n_layers, direct=mode)
    hw = hws[run_direct]
    routing = C.routing_entropy(mp.freq, cfg.top_k, cfg.moe_layers)
    recall_prof = float(np.nanmean(mp.recall)) if np.isfinite(mp.recall).any() else float("nan")
    ref = weakref.ref(base)
    del base
    freed = C.release_engine(model, ref)
    setup_s = time.perf_counter() - t0
    print(f"fixed part {fixed / 2**30:.2f} GiB; routing: normalised entropy {routing['norm_entropy_mean']:.3f} "
          f"(1 = uniform), top-25% experts take {routing.get('top25pct_share_mean', float('nan')):.1%} of routed pairs; "
          f"profiled recall {recall_prof:.1%}; hardware fit: latency {hw.h2d_latency_s * 1e6:.0f} us, "
          f"{hw.h2d_bandwidth_Bps / 1e9:.1f} GB/s, layer compute {float(np.mean(hw.layer_compute_s)) * 1e3:.3f} ms, "
          f"{'direct copy call' if hw.direct else 'conditional copy step'} {hw.cond_overhead_s * 1e3:.3f} ms "
          f"(window fraction {hw.cond_window_fraction:.2f}) "
          f"({setup_s:.1f} s)", flush=True)

    rng = np.random.default_rng(args.seed + 1)
    all_prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(max_batch)]
    all_warm = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()  # different: no free LRU hits
                for _ in range(max_batch)]
    prompt = all_prompts[0]
    rows: list[dict] = []
    meta = {
        "benchmark": "policies x VRAM budgets", "model": C.MODEL_NAMES[args.model],
        "tiny": args.tiny, "config": cfg.to_hf_dict(), "random_model": info, "env": env, "h2d": h2d,
        "fixed_bytes": fixed, "fixed_bytes_per_batch": fixed_of, "expert_bytes": expert_bytes, "routing_profile": routing,
        "profiled_recall_mean": recall_prof,
        "routing_source": args.routing if trace is None else trace_info,
        "hardware_profile": {"source": args.hw if hw_error is None else "default (measure failed)",
                             "error": hw_error, "h2d_latency_s": hw.h2d_latency_s,
                             "h2d_bandwidth_Bps": hw.h2d_bandwidth_Bps,
                             "layer_compute_s_mean": float(np.mean(hw.layer_compute_s)),
                             "cond_overhead_s": hw.cond_overhead_s, "cond_window_fraction": hw.cond_window_fraction,
                             "window_fraction": hw.window_fraction, "json": hw.to_json(),
                             "by_step": {("direct" if m else "conditional"): h.to_json() for m, h in hws.items()}},
        "settings": {"temperature": args.temperature, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                     "warmup_tokens": warm_tokens,
                     "batch": run_batches, "max_seq_len": max_len, "granule": granule, "dtype": args.dtype,
                     "experts": args.experts, "quant_group": cfg.expert_quant and cfg.expert_quant.group,
                     "budgets_frac_of_experts": fracs, "policies": list(policies)},
        "notes": [
            f"{C.MODEL_NAMES[args.model]}{' (tiny stand-in)' if args.tiny else ''} config, random weights "
            f"({info['routing'] if trace is None else 'routers replaced by the replayed trace: ' + trace_info}); "
            f"routing normalised entropy {routing['norm_entropy_mean']:.3f}, "
            f"top-25% experts' share {routing.get('top25pct_share_mean', float('nan')):.1%}",
            f"budget = fixed part ({fixed / 2**30:.2f} GiB at batch {min(fixed_of)}) + frac x expert bytes ({expert_bytes / 2**30:.2f} GiB)",
            f"floor = H2D bytes per token / peak H2D bandwidth of this run ({peak_bw / 1e9:.1f} GB/s, "
            f"{h2d['peak_source']}); efficiency = floor / TPOT",
            f"TTFT/TPOT exclude compilation (compile_s is apart); batch {', '.join(map(str, run_batches))} (TPOT = time per decode step, "
            "one token for every prompt); warm-up on other prompts first; "
            f"decode sampling temperature {args.temperature:g} (a random model's greedy output repeats itself)",
            "peak = process-wide peak_bytes_in_use so far (cannot be reset; rows run in ascending budget order, "
            "resident last)",
        ],
        "setup_s": round(setup_s, 2), "free_check_after_setup": freed,
        "device_memory_after_setup": device_memory_stats(),
    }
    columns = [("policy", "policy", ""), ("options", "options", ""), ("batch", "batch", ""), ("adapt", "adapt", ""), ("budget_frac", "experts in budget", ".0%"),
               ("budget_gib", "budget GiB", ".2f"), ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"),
               ("tpot_p90_ms", "p90 ms", ".2f"), ("floor_ms", "floor ms", ".2f"), ("efficiency", "floor/TPOT", ".2f"),
               ("efficiency_target", "max(floor, resident)/TPOT", ".2f"),
               ("h2d_mb_per_token", "H2D MB/tok", ".1f"), ("prefetch_wasted_mb_per_token", "wasted MB/tok", ".1f"),
               ("full_hit_rate", "full hit", ".1%"),
               ("top_only_hit_rate", "top hit", ".1%"), ("miss_rate", "miss", ".1%"),
               ("prefetch", "prefetch", ""), ("predictor_recall", "recall", ".1%"),
               ("planner_tpot_ms", "planner ms", ".2f"), ("planner_run_tpot_ms", "model ms (run routing)", ".2f"),
               ("distinct_new_tokens", "distinct tok", ""), ("cache_gib", "cache GiB", ".2f"), ("compile_s", "compile s", ".1f"), ("peak_gib", "peak GiB", ".2f"), ("peak_le_budget", "peak<=budget", "")]
    own = f"{'Zipf bias ' + format(args.zipf, 'g') if args.zipf else 'own routing (stress case)'}"
    title = (f"{C.MODEL_NAMES[args.model]}{' (tiny)' if args.tiny else ''}, random weights, "
             f"{own if trace is None else 'calibrated routing' if args.routing == 'calibrated' else 'replayed routing'}"
             ": policies x VRAM budgets")

    def save():
        return C.write_results(name, rows, meta, out_dir=out_dir, columns=columns, title=title)

    def measure(policy, frac, budget, batch, adapt, opts, refs) -> dict:
        """Build one engine, warm up, run the timed generate, and return the row (the engine dies on return)."""
        row = {"policy": policy, "batch": batch, "adapt": adapt, "budget_frac": frac,
               "budget_gib": None if budget is None else budget / 2**30, "options": ":".join(opts),
               "series": policy + (f" b{batch}" if len(run_batches) > 1 else "") + (" +adapt" if adapt else "")
               + "".join(" " + o for o in opts)}
        over = {"prefetch": prefetch, "direct": args.direct}
        for o in opts:
            over.update(PAIR_OPTIONS[o])
        # module constants read whenever a step is traced: held for the whole row, restored after it
        consts = {(decode_mod, "READY_FFNS_DURING_COPIES"): over.pop("early", None),
                  (layers_mod, "QUANT_REDUCE_MAX_TOKENS"): None if (n := over.pop("qreduce", None)) is None
                  else {"default": n}}
        real = {k: getattr(*k) for k in consts}
        prompts, warm_prompts = all_prompts[:batch], all_warm[:batch]
        eng = None
        try:
            for (mod, attr), v in consts.items():
                if v is not None:
                    setattr(mod, attr, v)
            tb = time.perf_counter()
            if policy == "resident":
                eng = make_engine(model, "resident")
            else:
                row_hw = hws[uses_direct(over["direct"], base_place)]
                eng = make_engine(model, policy, vram_budget=budget, granule=granule, profile=mp, hardware=row_hw,
                                  adapt_to_prompt=adapt, max_batch=batch, routing=trace, **over, **ekw)
                row["direct"] = bool(eng.direct)
            row["engine_build_s"] = time.perf_counter() - tb
            print(f"  {row['series']} @ {frac}: engine built in {row['engine_build_s']:.1f} s", flush=True)
            refs.append(weakref.ref(eng))
            if policy != "resident":  # the engine may re-plan in its warm-up if XLA needs more than estimated
                row["cache_gib_planned"] = eng.cache_bytes() / 2**30
            gkw = dict(model=model, engine=eng, temperature=args.temperature, seed=args.seed)
            tw = time.perf_counter()
            warm = generate(warm_prompts, max_new_tokens=warm_tokens, **gkw)
            # a row that runs out of time still leaves where its time went in the log
            print(f"  warm-up {time.perf_counter() - tw:.1f} s, compile s (XLA temp GiB) by program: "
                  + ", ".join(f"{k} {v:.1f} ({eng.compiles.temp_bytes_of(k) / 2**30:.2f})"
                              for k, v in eng.compiles.seconds_by_name.items()), flush=True)
            res = generate(prompts, max_new_tokens=args.new_tokens, **gkw)
            s = res.stats
            mem = device_memory_stats() or {}
            floor = s.h2d_bytes_per_token / peak_bw if policy != "resident" else 0.0
            row.update(
                ttft_ms=s.ttft_s * 1e3, tpot_ms=s.tpot_s * 1e3, tpot_p90_ms=s.tpot_p90_s * 1e3,
                tokens_per_s=s.tokens_per_s, h2d_mb_per_token=s.h2d_bytes_per_token / 1e6,
                prefetch_wasted_mb_per_token=s.prefetch_wasted_bytes_per_token / 1e6,
                h2d_bytes_per_token=s.h2d_bytes_per_token, prefill_h2d_gb=s.prefill_h2d_bytes / 1e9,
                floor_ms=floor * 1e3 if policy != "resident" else None,
                efficiency=(floor / s.tpot_s) if policy != "resident" and s.tpot_s > 0 else None,
                full_hit_rate=s.full_hit_rate, top_only_hit_rate=s.top_only_hit_rate, miss_rate=s.miss_rate,
                predictor_recall=s.predictor_recall if policy not in ("ondemand", "resident") else None,
                compile_count=warm.stats.compile_count + s.compile_count,
                compile_s=warm.stats.compile_s + s.compile_s,
                peak_device_bytes=s.peak_device_bytes,
                peak_gib=None if s.peak_device_bytes is None else s.peak_device_bytes / 2**30,
                peak_le_budget=None if (s.peak_device_bytes is None or budget is None)
                else bool(s.peak_device_bytes <= budget),
                bytes_in_use_gib=mem.get("bytes_in_use", 0) / 2**30 if mem else None,
                live_device_gib=C.live_device_bytes() / 2**30,
                new_tokens=s.new_tokens, prompt_tokens=s.prompt_tokens,
                distinct_new_tokens=len(set(res.token_ids[0])),
                per_layer=[dict(layer=p.layer, full=p.full_hit_rate, top=p.top_only_hit_rate, miss=p.miss_rate,
                                h2d_mb=p.h2d_bytes_per_token / 1e6, recall=p.predictor_recall) for p in s.per_layer],
            )
            if row.get("direct"):  # async (worker + device-side waits) or sync (a host round trip per layer)
                row["direct_mode"] = transfer.mode(jax.devices()[0].platform)
            row["xla_temp_gib"] = getattr(eng.compiles, "temp_bytes", 0) / 2**30
            row["compile_s_by_program"] = dict(eng.compiles.seconds_by_name)
            row["temp_gib_by_program"] = {k: eng.compiles.temp_bytes_of(k) / 2**30
                                          for k in eng.compiles.seconds_by_name}
            if policy != "resident":
                row["fixed_gib"] = eng.fixed_bytes / 2**30
                row["cache_gib"] = eng.cache_bytes() / 2**30
                row["replanned"] = abs(row["cache_gib"] - row["cache_gib_planned"]) > 1e-9
                plan = dataclasses.replace(eng.cache_plan, prefetch=eng.prefetches)  # as planned
                used = eng.plan_in_use()  # as the engine ran it: the slots' experts after the timed prompt's prefill
                row["plan_splits"] = sorted({lp.split for lp, m in zip(plan.layers, cfg.moe_layers) if m})
                row["plan_slots"] = int(sum(plan.n_slots()))
                row["prefetch"] = bool(eng.prefetches)
                if policy in ("ondemand", "static", "moepic") and batch == 1 and trace is None:  # batch-1 model
                    try:
                        row["planner_tpot_ms"] = predicted_tpot(plan, mp, row_hw) * 1e3
                        # The cost model alone, without the calibration's error on which experts are hot: the
                        # same prediction from the routing of the very tokens this run decoded.
                        # (decode steps fed the prompt's last prediction and all but the last new token; raw
                        # counts, no smoothing: this is the routing that happened)
                        run_mp = profile_model(eng.weights, np.asarray(prompt + res.token_ids[0][:-1], np.int32),
                                               score_from=len(prompt), smoothing=0.0)
                        st = plan_stats(used, run_mp, row_hw)
                        row["planner_run_tpot_ms"] = st["tpot_s"] * 1e3
                        moe = np.array(cfg.moe_layers)
                        row["planner_run_miss_rate"] = float(np.mean(st["miss_rate"][moe]))
                        row["planner_run_h2d_mb"] = float(st["h2d_bytes"].sum()) / 1e6
                        row["plan_json"], row["run_profile_json"] = used.to_json(), run_mp.to_json()  # re-evaluable
                    except Exception as e:  # noqa: BLE001 - informational only
                        row["planner_error"] = repr(e)
        except Exception as e:  # noqa: BLE001 - record the failure, keep the other rows
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        finally:
            for (mod, attr), v in real.items():
                setattr(mod, attr, v)
        return row

    longest = 0.0
    for i, (policy, frac, batch, adapt, opts) in enumerate(runs):
        elapsed = time.perf_counter() - t_start
        # the resident rows (last) keep their time: every row's max(floor, resident)/TPOT needs them
        reserve = 0 if policy == "resident" else 1.2 * longest * sum(r[0] == "resident" for r in runs[i + 1:])
        if rows and elapsed + 1.2 * longest + reserve > args.time_limit:
            print(f"skip {policy} @ {frac}: {elapsed:.0f} s elapsed, a run takes up to {longest:.0f} s "
                  f"(--time-limit {args.time_limit:.0f})", flush=True)
            rows.append({"policy": policy, "batch": batch, "adapt": adapt, "budget_frac": frac, "skipped": "time limit"})
            continue
        t_run = time.perf_counter()
        budget = None if frac is None else int(fixed_of[batch] + frac * expert_bytes)
        refs: list = []
        row = measure(policy, frac, budget, batch, adapt, opts, refs)  # the engine lives only inside measure()
        row.update(C.release_engine(model, refs[0] if refs else None))
        row["run_s"] = time.perf_counter() - t_run
        longest = max(longest, row["run_s"])
        rows.append(row)
        if "error" in row:
            print(f"{policy} @ {frac}: ERROR {row['error']}", flush=True)
        else:
            print(f"{row['series']:>12} @ {'-' if frac is None else format(frac, '.0%')} b{batch}: TTFT {row['ttft_ms']:.1f} ms, "
                  f"TPOT {row['tpot_ms']:.2f} ms (p90 {row['tpot_p90_ms']:.2f}), H2D {row['h2d_mb_per_token']:.1f} MB/tok, "
                  f"floor {row['floor_ms'] if row['floor_ms'] is not None else float('nan'):.2f} ms, "
                  f"compile {row['compile_s']:.1f} s, run {row['run_s']:.1f} s, engine freed {row['engine_freed']}",
                  flush=True)
        meta["total_s"] = round(time.perf_counter() - t_start, 1)
        save()

    meta["total_s"] = round(time.perf_counter() - t_start, 1)
    add_target_efficiency(rows)
    paths = save()
    print(f"\nwrote {', '.join(paths)}; total {meta['total_s']:.0f} s\n")
    print(f"## {title}\n")
    print(C.markdown_table(rows, columns))
    return 0


def add_target_efficiency(rows: list[dict]) -> None:
    """Each offloading row's `efficiency_target` = max(floor, the resident TPOT at its batch) / TPOT: how close it
    runs to what the link or the compute allows, 1 at best; only where the run has a resident row of that batch."""
    resident = {r["batch"]: r["tpot_ms"] for r in rows if r.get("policy") == "resident" and r.get("tpot_ms")}
    for r in rows:
        ref = resident.get(r.get("batch"))
        if r.get("policy") != "resident" and ref and r.get("tpot_ms") and r.get("floor_ms") is not None:
            r["efficiency_target"] = max(r["floor_ms"], ref) / r["tpot_ms"]


if __name__ == "__main__":
    sys.exit(main())

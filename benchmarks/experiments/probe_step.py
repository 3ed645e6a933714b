"""Where does a decode step's time go? TPOT per engine variant, then a device profile of a few decode steps.

Questions from earlier GPU runs (docs/notes/2026-11-30-benchmark-diary.md): why Qwen3-30B-A3B `lru` decoded at
59.6 ms with the shared copy-loop buffer against 43.0 ms before, why `static` + adapt_to_prompt is either ~10 ms or
17-25 ms per token at the same hits and bytes, and why the byte-bound `static` rows reach only 0.75-0.78 of the PCIe
floor. All variants run in one process on one model build, so machine-to-machine spread is out of the comparison.

A variant is `policy:fraction[:option...]`, options:
  adapt     static/moepic refill the cache from the prompt (adapt_to_prompt)
  unrollN   `copy_step.COPY_UNROLL_GROUPS = N` while the engine compiles (copy groups unrolled, no loop, up to N)
  rule=R    the policy's cache replacement rule replaced by R (`cache.RULES`: static, lru, freq), in
            `policies.POLICY_SPECS` while the engine is built
  pf, nopf  prefetch forced on / off (default: as the plan says)
  early, late  `decode.READY_FFNS_DURING_COPIES` True / False while the engine compiles (full hits and prefetched
            experts computed while the copies stream, the default / every FFN after the copies' wait)

`--routing calibrated` replays a trace drawn to the model's published routing statistics
(`benchmarks/routing_traces.py`, its first --layers layers): the planner profiles its first half, the decode replays
the second. Every GPU kernel and copy of the traced steps, and every CUDA API call of the host threads (the
CUPTI plane: XLA's kernel launches, the copy worker's `cudaMemcpyAsync`), is written to `<name>_events.json`
(stream or "host <thread>", name, start and duration in microseconds from the first GPU event), so a layer's
critical path can be read off the timeline.

Per variant: a warm-up on another prompt (compiles, prefill, 3 decode steps; the device peak after each phase, which
only the process's first variant has to itself), the timed `generate`, then a prefill of a third prompt, 3 untraced
decode steps (greedy) and --steps decode steps, each waited for, under `jax.profiler`. From the device plane: busy
time (union of the streams' activity), idle time (mean step wall - busy: the device waits for the host, e.g. for a
conditional's predicate), dynamic-slice kernels (on this stack the H2D copies of routed experts run as kernels that
read pinned host memory; the count includes dynamic slices of device arrays too, so it is an upper bound), memcpys,
other kernels.

Usage (GPU):
  python -m benchmarks.experiments.probe_step --model qwen3 --layers 24 \
      --variants lru:0.25,static:0.25,static:0.25:unroll2 --out-dir DIR

(The `noshare` rows of benchmarks/results/archive/probe_step_qwen3_l24*.json come from an option of commits
2ed5836-6a2f5d5, when the copy loops of all layers shared one result buffer: it gave each layer its own. The engine
now does that.)
"""

import argparse
import collections
import dataclasses
import glob
import os
import sys
import tempfile
import time
import weakref

def parse_variant(item: str) -> dict:
    parts = item.split(":")
    try:
        v = dict(policy=parts[0], frac=float(parts[1]), adapt=False, unroll=None, rule=None, prefetch=None,
                 early=None, label=item)
    except (IndexError, ValueError):
        raise SystemExit(f"--variants item {item!r}: want policy:fraction[:option...], options "
                         "adapt, unrollN, rule=R, pf, nopf, early, late") from None
    for o in parts[2:]:
        if o == "adapt":
            v["adapt"] = True
        elif o in ("pf", "nopf"):
            v["prefetch"] = o == "pf"
        elif o in ("early", "late"):
            v["early"] = o == "early"
        elif o.startswith("unroll") and o[6:].isdigit():
            v["unroll"] = int(o[6:])
        elif o.startswith("rule="):
            v["rule"] = o[5:]
        else:
            raise SystemExit(f"--variants item {item!r}: unknown option {o!r}; options: adapt, unrollN, rule=R, "
                             "pf, nopf, early, late")
    return v


def summarize_trace(log_dir: str, steps: int) -> dict:
    """Per-step device activity from the newest xplane.pb under log_dir: GPU stream lines only (the derived
    "XLA Ops"/"XLA Modules" lines repeat them). Times in ms per step."""
    import jax

    files = sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return {"error": "no xplane.pb written"}
    pd = jax.profiler.ProfileData.from_file(files[-1])
    spans, by_name, events = [], collections.Counter(), []
    out = collections.Counter()
    lines = {}
    host_events = []  # the CUDA API calls of every host thread (CUPTI): kernel launches, the worker's copies
    for plane in pd.planes:
        if plane.name == "/host:CUPTI":
            for line in plane.lines:
                host_events += [(f"host {line.name}", ev.name[:120], ev.start_ns, ev.duration_ns) for ev in line.events]
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if not line.name.lower().startswith("stream"):
                continue
            n = t = 0
            for ev in line.events:
                name = ev.name
                low = name.lower().replace(" ", "")
                kind = ("h2d" if any(s in low for s in ("htod", "h2d")) else
                        "d2h" if any(s in low for s in ("dtoh", "d2h")) else
                        "d2d" if any(s in low for s in ("dtod", "d2d")) else
                        "memset" if "memset" in low else
                        # a data-dependent slice of a pinned_host stack: a kernel that reads host memory
                        "slice" if "dynamic_slice" in low else "kernel")
                out[kind + "_n"] += 1
                out[kind + "_ms"] += ev.duration_ns / 1e6
                by_name[name[:90]] += ev.duration_ns / 1e6
                spans.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                events.append((line.name, name[:120], ev.start_ns, ev.duration_ns))
                n, t = n + 1, t + ev.duration_ns / 1e6
            lines[f"{plane.name} {line.name}"] = {"events_per_step": n / steps, "ms_per_step": t / steps}
    if not spans:
        return {"error": "no GPU stream events (CPU run?)", "planes": [p.name for p in pd.planes]}
    spans.sort()
    busy, (a, b) = 0.0, spans[0]
    for s, e in spans[1:]:  # union of the intervals: time with any stream active
        if s > b:
            busy, a, b = busy + (b - a), s, e
        else:
            b = max(b, e)
    busy += b - a
    res = {k: v / steps for k, v in out.items()}
    res["busy_ms"] = busy / 1e6 / steps
    res["lines"] = lines
    res["top_ops_ms_per_step"] = {k: v / steps for k, v in by_name.most_common(25)}
    t0 = min(e[2] for e in events)
    res["events"] = [(ln, nm, round((st - t0) / 1e3, 2), round(d / 1e3, 2)) for ln, nm, st, d in sorted(
        events + [e for e in host_events if e[2] >= t0], key=lambda e: e[2])]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3", choices=("qwen15", "olmoe", "qwen3", "mixtral"))
    ap.add_argument("--layers", type=int, default=None, help="keep the first N layers (faster compiles)")
    ap.add_argument("--variants", required=True, help="comma list of policy:fraction[:adapt][:unrollN]")
    ap.add_argument("--steps", type=int, default=5, help="decode steps traced per variant")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test: no device plane)")
    ap.add_argument("--experts", default="none", choices=("none", "int8", "int4"),
                    help="quantized experts (weight-only, group-wise; README 'Quantized experts')")
    ap.add_argument("--routing", default="own", choices=("own", "calibrated"),
                    help="own: the random routers (stress case); calibrated: a trace drawn to the model's published "
                         "routing statistics (benchmarks/routing_traces.py)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=540.0, help="skip variants after this many seconds")
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results/")
    args = ap.parse_args(argv)
    variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    t_start = time.perf_counter()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import common as C
    C.set_gpu_env(args.model, args.tiny)  # before the first device use
    from moepic_jax.generate import bucket as _bucket, generate
    from moepic_jax.offload import copy_step, policies
    from moepic_jax.offload import decode as decode_mod
    from moepic_jax.planning.calibrate import measure_hardware, profile_model
    from moepic_jax.runtime.engine import device_memory_stats
    from moepic_jax.runtime.factory import make_engine

    name = args.name or f"probe_step_{args.model}" + (f"_l{args.layers}" if args.layers else "")
    env = C.env_info()
    print(f"# {name}: {env['device']} ({env['platform']}), jax {env['versions'].get('jax')}", flush=True)
    cfg = C.get_config(args.model, tiny=args.tiny, n_layers=args.layers, experts=args.experts)
    if args.experts != "none":
        name += f"_{args.experts}"
    model = C.random_model(cfg, seed=args.seed, progress=not args.tiny)
    granule = 16 if args.tiny else 128
    T = _bucket(args.prompt_len)
    max_len = _bucket(T + args.new_tokens)
    base = make_engine(model, policy="ondemand", vram_budget=None, max_batch=1, max_seq_len=max_len)
    fixed = base.fixed_bytes_for(1, max_len, prefetch=True)
    expert_bytes = cfg.total_expert_bytes(model.dtype_bytes)
    hw, trace = measure_hardware(base.weights), None
    if args.routing == "calibrated":
        from benchmarks.bench_policies import load_trace
        from moepic_jax.offload.decode import RoutingTrace
        from moepic_jax.planning.calibrate import profile_from_trace

        trace = load_trace(argparse.Namespace(routing="calibrated", trace_tokens=512, tiny=args.tiny, model=args.model,
                                              seed=args.seed), cfg, RoutingTrace)[0]
        L = cfg.n_layers  # the trace's first L layers (a shortened model)
        trace = RoutingTrace(*(x[:, :L] for x in trace))
        half = trace.ids.shape[0] // 2  # the planner profiles the first half; decode replays the second
        mp = profile_from_trace(RoutingTrace(*(x[:half] for x in trace)), cfg, model.dtype_bytes)
        trace = RoutingTrace(*(x[half:] for x in trace))
        name += "_calibrated"
    else:
        mp = profile_model(base.weights)
    ref = weakref.ref(base)
    del base
    C.release_engine(model, ref)
    h2d = C.measure_peak_h2d(model.params.layers[cfg.moe_layer_ids[0]].moe.experts, split=cfg.d_ff // 2,
                             k=cfg.top_k)
    print(f"model {C.MODEL_NAMES[args.model]}, {cfg.n_layers} layers: experts {expert_bytes / 2**30:.2f} GiB, fixed "
          f"{fixed / 2**30:.2f} GiB; H2D peak {h2d['peak_Bps'] / 1e9:.1f} GB/s; conditional copy step "
          f"{hw.cond_overhead_s * 1e3:.3f} ms ({time.perf_counter() - t_start:.0f} s)", flush=True)
    rng = np.random.default_rng(args.seed + 1)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
    warm_prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
    trace_prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()  # no LRU hits left by `generate`
    rows = []

    def peak():
        return (device_memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**30

    real_unroll, real_specs = copy_step.COPY_UNROLL_GROUPS, dict(policies.POLICY_SPECS)
    real_early = decode_mod.READY_FFNS_DURING_COPIES

    meta = {"benchmark": "probe_step: decode step time by variant, with a device profile", "env": env,
            "model": C.MODEL_NAMES[args.model], "n_layers": cfg.n_layers, "h2d": h2d,
            "fixed_bytes": fixed, "expert_bytes": expert_bytes, "cond_overhead_s": hw.cond_overhead_s,
            "notes": ["TPOT from generate (steps queued ahead); step wall = one traced decode step waited for; "
                      "busy = union of the GPU streams' activity per step; idle = mean step wall - busy"]}
    columns = [("variant", "variant", ""), ("tpot_ms", "TPOT ms", ".2f"), ("floor_ms", "floor ms", ".2f"),
               ("h2d_mb_per_token", "H2D MB/tok", ".1f"), ("full_hit_rate", "full hit", ".1%"),
               ("step_wall_ms", "traced step ms", ".2f"), ("busy_ms", "busy ms", ".2f"),
               ("idle_ms", "idle ms", ".2f"), ("slice_n", "dynamic-slice kernels", ".1f"),
               ("slice_ms", "dynamic-slice ms", ".2f"), ("h2d_n", "H2D memcpys", ".1f"),
               ("h2d_ms", "H2D memcpy ms", ".2f"), ("d2h_n", "D2H copies", ".1f"), ("kernel_n", "other kernels", ".0f"),
               ("kernel_ms", "other kernel ms", ".2f"),
               ("decode_temp_gib", "decode temp GiB", ".2f"), ("cache_gib", "cache GiB", ".2f"),
               ("needed_gib", "needed GiB", ".3f"), ("budget_gib", "budget GiB", ".3f"),
               ("peaks", "peak GiB after warm-up / prefill / decode", ""), ("error", "error", "")]

    events = {}  # variant -> the traced steps' GPU events

    def save():
        if events:
            import json

            os.makedirs(args.out_dir or C.RESULTS_DIR, exist_ok=True)
            with open(os.path.join(args.out_dir or C.RESULTS_DIR, f"{name}_events.json"), "w") as f:
                json.dump(events, f)
        return C.write_results(name, rows, meta, out_dir=args.out_dir, columns=columns, plot=False,
                               title=f"{C.MODEL_NAMES[args.model]} ({cfg.n_layers} layers): decode step by variant")

    for v in variants:
        if time.perf_counter() - t_start > args.time_limit:
            print(f"  {v['label']}: skipped (time limit)", flush=True)
            rows.append({"variant": v["label"], "error": "skipped: time limit"})
            continue
        row = {"variant": v["label"], "policy": v["policy"], "budget_frac": v["frac"]}
        budget = fixed + v["frac"] * expert_bytes
        eng = state = tok = None
        try:
            if v["unroll"] is not None:
                copy_step.COPY_UNROLL_GROUPS = v["unroll"]  # read when the copy step is traced (warm-up)
            if v["early"] is not None:  # read when the decode step is traced (warm-up)
                decode_mod.READY_FFNS_DURING_COPIES = v["early"]
            if v["rule"] is not None:  # read when the engine is built (`policies.policy_spec` in make_engine)
                policies.POLICY_SPECS[v["policy"]] = dataclasses.replace(real_specs[v["policy"]], rule=v["rule"])
            eng = make_engine(model, v["policy"], vram_budget=int(budget), granule=granule, profile=mp, hardware=hw,
                              adapt_to_prompt=v["adapt"], max_batch=1, max_seq_len=max_len, routing=trace,
                              prefetch=v["prefetch"])
            row["cache_gib_planned"] = eng.cache_bytes() / 2**30

            def step(state, tok):  # one decode step, greedy
                logits, state, _ = eng.decode(state, tok)
                return state, jnp.argmax(logits, -1).astype(jnp.int32)

            def start(p):  # a fresh KV cache with prompt p prefilled; the device's peak so far after each phase
                state = eng.new_state(1, max_len)
                tokens, mask = np.zeros((1, T), np.int32), np.zeros((1, T), bool)
                tokens[0, T - len(p):], mask[0, T - len(p):] = p, True
                tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
                eng.warmup(state, tokens, mask, jnp.zeros((1,), jnp.int32))  # compiles, once per engine
                peaks = {"warmup": peak()}
                logits, state, _ = eng.prefill(state, tokens, mask)
                tok = jnp.argmax(logits, -1).astype(jnp.int32)
                tok.block_until_ready()
                peaks["prefill"] = peak()
                for _ in range(3):
                    state, tok = step(state, tok)
                tok.block_until_ready()
                peaks["decode"] = peak()
                return state, tok, peaks

            # The warm-up on another prompt (no free LRU hits). The device peak cannot be reset: only the first
            # variant's phase peaks are its own.
            pk = start(warm_prompt)[2]
            row["peak_gib_after"], row["peaks"] = pk, " / ".join(f"{x:.3f}" for x in pk.values())
            res = generate([prompt], max_new_tokens=args.new_tokens, model=model, engine=eng, temperature=1.0,
                           seed=args.seed)
            s = res.stats
            row.update(tpot_ms=s.tpot_s * 1e3, h2d_mb_per_token=s.h2d_bytes_per_token / 1e6,
                       floor_ms=s.h2d_bytes_per_token / h2d["peak_Bps"] * 1e3, full_hit_rate=s.full_hit_rate,
                       top_only_hit_rate=s.top_only_hit_rate, cache_gib=eng.cache_bytes() / 2**30,
                       budget_gib=budget / 2**30, fixed_gib=eng.fixed_bytes / 2**30,
                       needed_gib=eng.device_bytes_needed(eng.new_state(1, max_len)) / 2**30,
                       compile_s_by_program=dict(eng.compiles.seconds_by_name),
                       temp_gib_by_program={k: eng.compiles.temp_bytes_of(k) / 2**30
                                            for k in eng.compiles.seconds_by_name},
                       decode_temp_gib=eng.compiles.temp_bytes_of("decode") / 2**30,
                       splits=sorted({lp.split for lp in eng.cache_plan.layers}))
            state, tok, _ = start(trace_prompt)
            log_dir = tempfile.mkdtemp(prefix="probe_step_")
            walls = []
            jax.profiler.start_trace(log_dir)
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, tok = step(state, tok)
                tok.block_until_ready()
                walls.append((time.perf_counter() - t0) * 1e3)
            jax.profiler.stop_trace()
            row["step_wall_ms"] = float(np.mean(walls))
            prof = summarize_trace(log_dir, args.steps)
            events[v["label"]] = prof.pop("events", [])
            row["profile"] = prof
            for k in ("busy_ms", "kernel_n", "kernel_ms", "slice_n", "slice_ms", "h2d_n", "h2d_ms", "d2h_n", "d2d_n",
                      "d2d_ms"):
                row[k] = prof.get(k, 0.0) if "error" not in prof else None
            if row["busy_ms"] is not None:
                row["idle_ms"] = row["step_wall_ms"] - row["busy_ms"]
            print(f"  {v['label']}: TPOT {row['tpot_ms']:.2f} ms, floor {row['floor_ms']:.2f}, hits "
                  f"{s.full_hit_rate:.1%}, traced step {row['step_wall_ms']:.2f} ms, busy {row['busy_ms']} ms, "
                  f"dynamic-slice kernels {row['slice_n']} ({row['slice_ms']} ms), H2D memcpys {row['h2d_n']}, "
                  f"D2H {row['d2h_n']}, other kernels {row['kernel_n']} "
                  f"({time.perf_counter() - t_start:.0f} s)", flush=True)
            if "error" not in prof:
                for k, ms in list(prof["top_ops_ms_per_step"].items())[:8]:
                    print(f"      {ms:8.3f} ms  {k}", flush=True)
        except Exception as e:  # noqa: BLE001 - record the failure, keep the other variants
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        finally:  # a failed engine too: its caches would skew the next variants' memory
            copy_step.COPY_UNROLL_GROUPS = real_unroll
            decode_mod.READY_FFNS_DURING_COPIES = real_early
            policies.POLICY_SPECS.update(real_specs)
            ref = weakref.ref(eng) if eng is not None else None
            eng = state = tok = None
            row["engine_freed"] = C.release_engine(model, ref)["engine_freed"]
        rows.append(row)
        paths = save()
    paths = save()  # also when every variant was skipped
    print(f"\nwrote {', '.join(paths)}; total {time.perf_counter() - t_start:.0f} s\n")
    print(C.markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`moepic-jax` command: generate | profile | plan | convert | export-hf | bench.

This entry point (and benchmarks/tests) sets the environment variables that must be set before JAX starts and
that only a whole program may choose (XLA_PYTHON_CLIENT_PREALLOCATE, XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB, XLA_FLAGS);
`import moepic_jax` sets one that direct copies need (CUDA_DEVICE_MAX_CONNECTIONS).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time


class HELP(argparse.HelpFormatter):
    """--help shows every option's default (argparse's own formatter skips options without a help text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        return text + " (default: %(default)s)" if shown and "%(default)" not in text else text


def _env_before_jax(args) -> None:
    # The VRAM budget is enforced by the engine; JAX's default preallocation of 75 % of the GPU would
    # make the process look like it uses far more than the budget.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    # Exactness in bfloat16: XLA may otherwise keep intermediates in float32 where fusion allows ("excess
    # precision"), so two programs with the same math (resident vs offloaded) round differently and greedy
    # tokens can diverge. With the flag every op rounds as written and all policies give identical tokens.
    if "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()
    if getattr(args, "host_memory_gb", None):
        os.environ["XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"] = str(args.host_memory_gb)
    # transformers advises that PyTorch is missing on every import; this package needs only its tokenizers.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _compile_cache(args) -> None:
    """JAX's persistent compilation cache (`runtime.compile_cache`), unless --no-compile-cache."""
    if getattr(args, "no_compile_cache", True):
        return
    from moepic_jax.runtime.compile_cache import use_compile_cache

    use_compile_cache()


def _budget(s: str | None):
    if s is None or s.lower() == "none":
        return None
    try:
        return int(s)
    except ValueError:
        pass
    try:
        return float(s)
    except ValueError:
        return s


def _add_model_args(p):
    p.add_argument("--model", default=None, help="HF directory or moepic checkpoint (none: the embedded model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="weights' dtype")
    p.add_argument("--experts", default="none", choices=["none", "int8", "int4"],
                   help="store the routed experts quantized (weight-only, group-wise; dequantized on the device): "
                        "2x (int8) or 3.6x (int4) fewer bytes per copy and per cached expert; other weights keep "
                        "--dtype")
    p.add_argument("--quant-group", type=int, default=None,
                   help="elements of d_model per scale with --experts (default 128 for int8, 64 for int4)")
    p.add_argument("--host-memory-gb", type=int, default=None,
                   help="pinned host memory limit for JAX (needed above 64 GiB of experts)")


def _add_engine_args(p, default_policy="moepic", default_budget="auto"):
    from moepic_jax.offload.policies import POLICIES

    p.add_argument("--policy", default=default_policy, choices=POLICIES, help="what stays on the device (README)")
    p.add_argument("--vram-budget", default=default_budget,
                   help="everything the engine may hold on the device: 'auto' (a GPU's free memory less a margin, "
                        "resident when the model fits; on the CPU the minimum plus 25%% of the expert bytes), "
                        "'6GiB', '500MB', bytes, a share of the expert bytes on top of the minimum ('40%%' or 0.4), "
                        "or 'none'")
    p.add_argument("--no-compile-cache", action="store_true",
                   help="do not keep compiled steps in ~/.cache/moepic_jax/xla between runs")
    p.add_argument("--plan", default=None, help="a CachePlan JSON file (static/moepic)")
    p.add_argument("--granule", type=int, default=32, help="split granularity in neurons")
    p.add_argument("--devices", type=int, default=1,
                   help="GPUs to spread the experts over (an 'expert' mesh axis; the VRAM budget is then per device)")
    p.add_argument("--prefetch", default="auto", choices=["auto", "on", "off"],
                   help="next-layer prediction and prefetch: as the plan decides (auto), or forced on/off")
    p.add_argument("--direct", default="auto", choices=["auto", "on", "off"],
                   help="how the decode step copies experts: direct copies (DMA on a side stream, no conditional) on "
                        "one GPU and the conditional copy step elsewhere (auto), or forced on/off")
    p.add_argument("--adapt-to-prompt", action="store_true",
                   help="static/moepic: refill the cache slots with the experts each prompt routes to most "
                        "(adapt_to_prompt=True; helps when routing follows the prompt, see the README)")


def _progress() -> bool:
    """Progress bars (loading, pinning, profiling) when stderr is a terminal; none in logs and pipes."""
    return sys.stderr.isatty()


def _load(args):
    import moepic_jax

    experts = None if args.experts == "none" else args.experts
    return moepic_jax.load(args.model, dtype=args.dtype, progress=_progress(), experts=experts, group=args.quant_group)


DIRECT = {"auto": "auto", "on": True, "off": False}  # --direct -> make_engine(direct=)


def _engine_kw(args):
    from moepic_jax.planning.profiles import CachePlan

    kw = {}
    from moepic_jax.offload.policies import POLICY_SPECS

    offloads = POLICY_SPECS[args.policy].offloads
    if offloads:
        kw["granule"] = args.granule
        kw["progress"] = _progress()
        kw["direct"] = DIRECT[args.direct]
    if args.devices != 1:
        kw["devices"] = args.devices
    if args.prefetch != "auto" and offloads:
        kw["prefetch"] = args.prefetch == "on"
    if args.adapt_to_prompt and offloads:
        kw["adapt_to_prompt"] = True
    plan = CachePlan.load(args.plan) if args.plan else None
    return plan, kw


def cmd_generate(args) -> int:
    import moepic_jax

    from moepic_jax.io.loading import peek

    cfg, tok = peek(args.model)  # the request is checked before the weights are read
    n_prompt = len(tok.encode(args.prompt)) if tok is not None else len(args.prompt.split())
    if n_prompt + args.max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"the prompt ({n_prompt} tokens) + --max-new-tokens {args.max_new_tokens} exceeds the "
                         f"model's context of {cfg.max_position_embeddings} tokens; shorten the prompt or lower "
                         "--max-new-tokens")
    t0 = time.perf_counter()
    model = _load(args)
    load_s = time.perf_counter() - t0
    t_call = time.perf_counter()
    plan, kw = _engine_kw(args)
    prompt = args.prompt
    if model.tokenizer is None:
        prompt = [int(t) for t in prompt.split()]
    print(f"[{args.policy}, VRAM budget {args.vram_budget}: placing the model and compiling the steps ...]",
          file=sys.stderr, flush=True)

    _PENDING_LINE.clear()

    def stream(i, s):  # the prompt is echoed with the first new text: a budget error or a log line comes before it
        if not _PENDING_LINE:
            print(args.prompt, end="")
            _PENDING_LINE.append(True)
        print(s, end="", flush=True)

    res = moepic_jax.generate(prompt, model=model, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop or None,
                              policy=args.policy, vram_budget=_budget(args.vram_budget), plan=plan,
                              stream=stream, **kw)
    if not _PENDING_LINE:  # nothing was streamed (token ids only)
        print(args.prompt, end="")
    if model.tokenizer is None:
        print(" " + " ".join(map(str, res.token_ids[0])), end="")
    print()
    _PENDING_LINE.clear()
    print(res.stats.summary(), file=sys.stderr)
    print(f"load {load_s:.1f} s, " + res.stats.timing(), file=sys.stderr)
    if args.stats_json:
        # load_s: reading the weights; first_token_s: from the start of main() to the first new token;
        # first_token_unix_s: that instant on the wall clock (a caller that started the process can subtract)
        t_first = t_call + res.stats.setup_s + res.stats.ttft_s
        extra = {"load_s": load_s, "first_token_s": t_first - args.t_start,
                 "first_token_unix_s": time.time() - (time.perf_counter() - t_first)}
        with open(args.stats_json, "w") as f:
            json.dump({**res.stats.to_dict(), **extra}, f, indent=2, default=float)
    return 0


def _offload_engine(args, model, **kw):
    from moepic_jax.runtime.factory import make_engine

    from moepic_jax.offload.policies import POLICY_SPECS

    policy = args.policy if POLICY_SPECS[args.policy].plan != "none" else "moepic"  # a policy that plans
    return make_engine(model, policy=policy, vram_budget=_budget(args.vram_budget), granule=args.granule,
                       max_batch=args.max_batch, max_seq_len=args.max_seq_len, devices=args.devices,
                       direct=DIRECT[args.direct], progress=_progress(), **kw)


def _direct(args, model) -> bool:
    """Whether the engine of these arguments decodes with direct copies (--direct; "auto": on one GPU): the copy
    step whose costs `profile` measures and `plan` prices."""
    from moepic_jax.offload.placement import make_placement
    from moepic_jax.runtime.factory import uses_direct

    return uses_direct(DIRECT[args.direct], make_placement(args.devices, model.cfg.n_experts))


def _placed_and_profiled(args, model):
    """(an EngineCache holding the model's placed weights and its profile, the placed weights, the profile): one
    placement and one calibration for everything the command builds."""
    from moepic_jax.offload.placement import make_placement
    from moepic_jax.runtime.factory import EngineCache

    cache = EngineCache().for_model(model)
    weights = cache.weights(make_placement(args.devices, model.cfg.n_experts), _progress())
    return cache, weights, cache.profile(weights, model.cfg.top_k, _progress())


def cmd_profile(args) -> int:
    from moepic_jax.planning import calibrate

    model = _load(args)
    _, weights, mp = _placed_and_profiled(args, model)
    hw = calibrate.measure_hardware(weights, direct=_direct(args, model), progress=_progress())
    if args.out:
        mp.save(args.out + ".model.json")
        hw.save(args.out + ".hardware.json")
        print(f"wrote {args.out}.model.json and {args.out}.hardware.json", file=sys.stderr)
    print(f"H2D: latency {hw.h2d_latency_s * 1e6:.1f} us, bandwidth {hw.h2d_bandwidth_Bps / 1e9:.2f} GB/s on "
          f"{hw.device}; decode compute per layer {hw.layer_compute_s.mean() * 1e3:.3f} ms")
    print(f"{'layer':>5} {'recall':>7} {'precision':>9}  hottest experts (freq)")
    for l in range(mp.n_layers):
        hot = sorted(range(mp.n_experts), key=lambda e: -mp.freq[l, e])[:4]
        print(f"{l:>5} {mp.recall[l]:>7.2f} {mp.precision[l]:>9.2f}  " +
              " ".join(f"{e}({mp.freq[l, e]:.2f})" for e in hot))
    return 0


def print_plan(plan, mp=None, hw=None, out=None) -> None:
    """A readable per-layer table of a CachePlan (and its predicted costs when profiles are given)."""
    out = out or sys.stdout
    from moepic_jax.planning.planner import plan_bytes, plan_stats, predicted_tpot

    stats = plan_stats(plan, mp, hw) if mp is not None else None
    print(f"expert cache budget {plan.budget_bytes / 2**30:.3f} GiB (the VRAM budget less the fixed part)" +
          (f", plan uses {plan_bytes(plan, mp) / 2**30:.3f} GiB" if mp is not None else "") +
          f", next-layer prefetch {'on' if plan.prefetch else 'off'}", file=out)
    print(f"{'layer':>5} {'split':>6} {'slots':>5}  cached experts", file=out)
    for l, lp in enumerate(plan.layers):
        ids = ",".join(map(str, lp.cached[:12])) + (" ..." if len(lp.cached) > 12 else "")
        print(f"{l:>5} {lp.split:>6} {len(lp.cached):>5}  {ids}", file=out)
    if stats is not None and hw is not None:
        step = "direct copies" if hw.direct else "the conditional copy step"
        from moepic_jax.planning.calibrate import DEFAULT_DEVICE

        where = (f"on {hw.device}" if hw.device != DEFAULT_DEVICE else "on unmeasured H200 defaults; `moepic-jax profile --out P` "
                 "measures this machine and `plan --hardware P.hardware.json` uses it")
        print(f"predicted TPOT {predicted_tpot(plan, mp, hw) * 1e3:.2f} ms (decoding with {step}, {where})", file=out)


def cmd_plan(args) -> int:
    from moepic_jax.planning import calibrate
    from moepic_jax.planning.profiles import HardwareProfile, ModelProfile

    model = _load(args)
    hw = (HardwareProfile.load(args.hardware) if args.hardware
          else calibrate.default_hardware(model.cfg.n_layers, direct=_direct(args, model)))
    if args.profile:
        mp, cache = ModelProfile.load(args.profile), None
    else:
        cache, _, mp = _placed_and_profiled(args, model)
    plan = _offload_engine(args, model, profile=mp, hardware=hw, cache=cache).cache_plan
    if args.prefetch != "auto":
        plan = dataclasses.replace(plan, prefetch=args.prefetch == "on")
    print_plan(plan, mp, hw)
    if args.out:
        plan.save(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def cmd_convert(args) -> int:
    from moepic_jax.io import checkpoint
    from moepic_jax.io.loading import load

    model = load(args.hf_dir, dtype=args.dtype, progress=_progress())
    checkpoint.save(args.out_dir, model.cfg, model.params, args.dtype, model.tokenizer)
    print(f"wrote {args.out_dir}")
    return 0


def cmd_export_hf(args) -> int:
    from moepic_jax.io import checkpoint

    model = _load(args)
    checkpoint.export_hf(model, args.out_dir)
    print(f"wrote {args.out_dir}")
    return 0


def cmd_bench(args) -> int:
    import moepic_jax
    from moepic_jax.generate import bucket
    from moepic_jax.offload.policies import POLICY_SPECS

    model = _load(args)
    prompt = args.prompt if model.tokenizer is not None else [1, 2, 3, 4]

    n_prompt = len(model.tokenizer.encode(prompt)) if model.tokenizer is not None else len(prompt)
    seq = bucket(bucket(n_prompt) + args.max_new_tokens)  # the KV cache generate() will reserve
    routing = None
    if args.routing:
        from moepic_jax.offload.decode import RoutingTrace

        routing = RoutingTrace.load(args.routing)
    rows = []
    for frac in [float(x) for x in args.budgets.split(",")]:
        for pol in args.policies.split(","):
            offloads = POLICY_SPECS[pol].offloads
            kw = {"granule": args.granule, "max_batch": 1, "max_seq_len": seq, "routing": routing} if offloads else {}
            b = frac if offloads else None  # each policy's own minimum plus that share of the expert bytes
            moepic_jax.generate(prompt, model=model, max_new_tokens=4, policy=pol, vram_budget=b, **kw)  # warm-up
            r = moepic_jax.generate(prompt, model=model, max_new_tokens=args.max_new_tokens, policy=pol,
                                    vram_budget=b, **kw)
            rows.append((frac, r.stats))
    print("| experts cached | policy | TTFT ms | TPOT ms | H2D MB/tok | full hit | top hit | miss | recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for frac, s in rows:
        print(f"| {frac:.0%} | {s.policy} | {s.ttft_s * 1e3:.1f} | {s.tpot_s * 1e3:.2f} | "
              f"{s.h2d_bytes_per_token / 1e6:.2f} | {s.full_hit_rate:.2f} | {s.top_only_hit_rate:.2f} | "
              f"{s.miss_rate:.2f} | {'-' if math.isnan(s.predictor_recall) else f'{s.predictor_recall:.2f}'} |")
    return 0


def main(argv=None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(prog="moepic-jax", description=__doc__.splitlines()[0],
                                 formatter_class=HELP)
    ap.add_argument("-v", "--verbose", action="store_true", help="log the engine's plan and re-plans")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", formatter_class=HELP,
                       help="generate text (streams it)")
    p.add_argument("prompt", help="text (token ids separated by spaces for a model without a tokenizer)")
    _add_model_args(p)
    _add_engine_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1 = off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stats-json", default=None,
                   help="write the stats to this JSON file (GenerateStats, plus load_s, first_token_s: seconds "
                        "from the start of the command to the first new token, and first_token_unix_s)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("profile", formatter_class=HELP,
                       help="measure expert frequencies, predictor recall and the H2D copy curve")
    _add_model_args(p)
    _add_engine_args(p)
    p.add_argument("--out", default=None, help="prefix of the JSON files to write")
    p.add_argument("--max-batch", type=int, default=1, help="batch the engine's KV cache is sized for")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens the engine's KV cache is sized for")
    p.set_defaults(fn=cmd_profile)

    p = sub.add_parser("plan", formatter_class=HELP,
                       help="solve and print the cache plan (per layer split and cached experts)")
    _add_model_args(p)
    _add_engine_args(p)
    p.add_argument("--profile", default=None, help="ModelProfile JSON (default: profile now)")
    p.add_argument("--hardware", default=None, help="HardwareProfile JSON (default: unmeasured H200 defaults)")
    p.add_argument("--out", default=None, help="write the plan JSON here")
    p.add_argument("--max-batch", type=int, default=1, help="batch the engine's KV cache is sized for")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens the engine's KV cache is sized for")
    p.set_defaults(fn=cmd_plan)

    p = sub.add_parser("convert", formatter_class=HELP,
                       help="convert a Hugging Face directory to a moepic_jax (orbax) checkpoint")
    p.add_argument("hf_dir", help="a Hugging Face model directory")
    p.add_argument("out_dir", help="where to write the checkpoint")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"], help="stored dtype")
    p.set_defaults(fn=cmd_convert)

    p = sub.add_parser("export-hf", formatter_class=HELP,
                       help="write a model as a Hugging Face directory (config + safetensors)")
    p.add_argument("out_dir")
    _add_model_args(p)
    p.set_defaults(fn=cmd_export_hf)

    p = sub.add_parser("bench", formatter_class=HELP,
                       help="TTFT/TPOT/hit rates of several policies and budgets on this machine")
    _add_model_args(p)
    p.add_argument("--prompt", default="def fibonacci(n):", help="the prompt of every run")
    p.add_argument("--policies", default="resident,ondemand,lru,static,moepic", help="comma list")
    p.add_argument("--budgets", default="0.25,0.5", help="shares of the expert bytes cached, above the fixed part")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens per timed run")
    p.add_argument("--granule", type=int, default=32, help="split granularity in neurons")
    p.add_argument("--routing", default=None,
                   help="a routing trace .npz (benchmarks/routing_traces.py, or recorded from your model) that the "
                        "offloading policies' decode replays instead of the model's own routing (the text is then "
                        "meaningless; the costs are those of that routing)")
    p.set_defaults(fn=cmd_bench)

    args = ap.parse_args(argv)
    args.t_start = t_start  # first_token_s (generate --stats-json) counts from here
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    _env_before_jax(args)
    try:
        _check_args(args)  # before anything is loaded
        _compile_cache(args)
        return args.fn(args)
    except BrokenPipeError:  # the reader went away (`| head`): no traceback; status 1 as Python's own advice
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        _PENDING_LINE.clear()
        return 1
    except (ValueError, FileNotFoundError) as e:
        sys.stdout.flush()
        print(f"\nerror: {e}" if _PENDING_LINE else f"error: {e}", file=sys.stderr)
        _PENDING_LINE.clear()
        return 2


_PENDING_LINE = []  # non-empty while generate has printed text without a newline (an error then starts a new line)


def _check_args(args) -> None:
    """The checks that need no model: the budget's form, sampling arguments, token counts."""
    from moepic_jax import sampling
    from moepic_jax.offload.memory import parse_budget

    if hasattr(args, "vram_budget"):
        parse_budget(_budget(args.vram_budget))
    if hasattr(args, "temperature"):
        sampling.check_sampling_args(args.temperature, args.top_k, args.top_p)
    if getattr(args, "max_new_tokens", 1) < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")


if __name__ == "__main__":
    sys.exit(main())

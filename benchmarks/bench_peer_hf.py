"""The peer: the same configuration in PyTorch transformers, fully on the GPU and with accelerate
offloading (`device_map` from `infer_auto_device_map(max_memory={0: budget, "cpu": ...})`, what
`from_pretrained(device_map="auto", max_memory=...)` does), TTFT and TPOT at batch 1, random weights.

Random weights are drawn on the GPU (the model is built under `torch.device("cuda")`, transformers' own init:
N(0, 0.02), norms 1), never on the CPU. For an offloaded run the modules that the device map sends to "cpu" are
moved there and `accelerate.dispatch_model` attaches its hooks: at every forward the offloaded decoder layers are
copied from (pageable) CPU memory to the GPU, exactly as after `from_pretrained(device_map="auto")`.

Budgets: by default the VRAM budgets of the moepic_jax run of the same model (bench_policies_<model>[_tiny].json
in --out-dir or benchmarks/results/<model>/, the first found; rows of budget fraction 0.25 / 0.5), else the same
formula (fixed part + frac x expert bytes). The table puts the moepic_jax rows at the same budget beside it
(speed-up = HF TPOT / ours).

Usage (from the repo root, on the GPU machine with torch, transformers and accelerate; `python -m benchmarks`
runs it after bench_policies when they are installed):
  python -m benchmarks.bench_peer_hf --model qwen15
  python -m benchmarks.bench_peer_hf --model olmoe
  python -m benchmarks.bench_peer_hf --tiny            # CPU smoke test (no offloaded run)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen15", choices=("qwen15", "olmoe", "qwen3", "mixtral"))
    ap.add_argument("--budgets", default="0.25,0.5", help="fractions of the expert bytes (as bench_policies)")
    ap.add_argument("--budget-gib", default=None, help="explicit comma list of budgets in GiB (overrides --budgets)")
    ap.add_argument("--compare", default=None,
                    help="bench_policies JSON to take budgets from and compare with (default: the model's, if any)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32, help="new tokens, model fully on the GPU")
    ap.add_argument("--offload-new-tokens", type=int, default=5, help="new tokens of an offloaded run")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--experts-impl", default=None, help="transformers experts_implementation (default: its own)")
    ap.add_argument("--no-gpu-run", action="store_true", help="skip the fully-on-GPU run")
    ap.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=500.0)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results/<model>/)")
    return ap.parse_args(argv)


class TimingStreamer:
    """`generate(streamer=...)`: a timestamp per `put` (the prompt first, then one per new token)."""

    def __init__(self, sync):
        self.sync, self.times = sync, []

    def put(self, value):
        self.sync()
        self.times.append(time.perf_counter())

    def end(self):
        pass


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # jax is imported (common.py) but never started
    import numpy as np
    import torch
    import transformers

    from benchmarks import common as C
    from moepic_jax import model as M

    cuda = torch.cuda.is_available() and not args.tiny
    dev = torch.device("cuda:0") if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    gpu_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    env = C.env_info(device=gpu_name)
    name = args.name or f"bench_peer_hf_{args.model}{'_tiny' if args.tiny else ''}"
    cfg = C.get_config(args.model, tiny=args.tiny)
    hf_dict = dict(C.REAL_CONFIGS[args.model])
    if args.tiny:
        hf_dict.update(C.TINY_OVERRIDES[args.model])
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            hf_dict[k] = None
    model_type = hf_dict.pop("model_type")
    for k in ("architectures", "torch_dtype"):
        hf_dict.pop(k, None)
    if args.experts_impl:
        hf_dict["experts_implementation"] = args.experts_impl
    hf_cfg = transformers.AutoConfig.for_model(model_type, **hf_dict)
    print(f"# {name}: {gpu_name}, torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    expert_bytes = cfg.total_expert_bytes(2)
    ours_name = f"bench_policies_{args.model}{'_tiny' if args.tiny else ''}.json"
    compare_path = Path(args.compare) if args.compare else next(
        (p for d in ([Path(args.out_dir)] if args.out_dir else []) + [C.RESULTS_DIR / args.model]
         if (p := d / ours_name).exists()), C.RESULTS_DIR / args.model / ours_name)
    ours = json.loads(compare_path.read_text()) if compare_path.exists() else None

    def build():
        """The HF model in bf16, built (and randomly initialised) directly on `dev`."""
        torch.manual_seed(args.seed)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(dev):
                m = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        finally:
            torch.set_default_dtype(old)
        return m.eval()

    def resident_bytes_of(m) -> int:
        return sum(p.numel() * p.element_size() for p in m.parameters()) - expert_bytes

    # Budgets: those of our run of the same model (same fixed part), else the same formula.
    fracs = sorted(float(x) for x in args.budgets.split(",") if x.strip())
    budgets: list[tuple[float | None, int]] = []
    if args.budget_gib:
        budgets = [(None, int(float(x) * 2**30)) for x in args.budget_gib.split(",") if x.strip()]
    elif ours is not None:
        for f in fracs:
            r = next((r for r in ours["rows"] if r.get("budget_frac") == f and r.get("budget_gib")), None)
            if r is not None:
                budgets.append((f, int(r["budget_gib"] * 2**30)))
    rows: list[dict] = []
    meta = {"benchmark": "Hugging Face transformers (+ accelerate offload) peer", "model": C.MODEL_NAMES[args.model],
            "tiny": args.tiny, "env": env, "compare_with": str(compare_path) if ours else None,
            "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                         "offload_new_tokens": args.offload_new_tokens, "temperature": args.temperature},
            "notes": [f"{C.MODEL_NAMES[args.model]} config, random weights drawn on the {dev.type} by transformers' "
                      f"init (N(0, 0.02), norms 1), bf16, batch 1, prompt {args.prompt_len} random ids",
                      "hf_accelerate: infer_auto_device_map(max_memory={0: budget, 'cpu': rest}) + dispatch_model "
                      "(the offloaded layers are copied from pageable CPU memory at every forward)",
                      "TTFT/TPOT after one warm-up call; TPOT = median over new tokens; peak = "
                      "torch.cuda.max_memory_allocated during the timed call"]}

    def timed_generate(m, n_new, ids):
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=args.temperature > 0,
                  pad_token_id=0, eos_token_id=None)
        if args.temperature > 0:
            kw.update(temperature=args.temperature, top_k=0, top_p=1.0)
        st = TimingStreamer(sync)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            out = m.generate(ids, streamer=st, **kw)
            sync()
        t_end = time.perf_counter()
        ts = st.times  # ts[0]: prompt put (before the forward), ts[1]: first new token, ...
        ttft = ts[1] - t0 if len(ts) > 1 else t_end - t0
        steps = np.diff(ts[1:]) if len(ts) > 2 else np.array([])
        peak = torch.cuda.max_memory_allocated() if cuda else None
        return dict(ttft_ms=ttft * 1e3, tpot_ms=float(np.median(steps)) * 1e3 if steps.size else None,
                    tpot_p90_ms=float(np.percentile(steps, 90)) * 1e3 if steps.size else None,
                    new_tokens=int(out.shape[1] - ids.shape[1]), peak_gib=None if peak is None else peak / 2**30,
                    distinct_new_tokens=len(set(out[0, ids.shape[1]:].tolist())))

    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(dev)
    warm_ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_len), generator=g).to(dev)

    def save():
        meta["total_s"] = round(time.perf_counter() - t_start, 1)
        return C.write_results(name, rows, meta, out_dir=args.out_dir or C.RESULTS_DIR / args.model,
                               columns=columns,
                               title=f"{C.MODEL_NAMES[args.model]}{' (tiny)' if args.tiny else ''}: transformers "
                                     "(+ accelerate offload) vs moepic_jax at the same VRAM budget")

    columns = [("impl", "implementation", ""), ("policy", "policy", ""), ("budget_frac", "experts in budget", ".0%"),
               ("budget_gib", "budget GiB", ".2f"), ("gpu_weights_gib", "weights on GPU GiB", ".2f"),
               ("ttft_ms", "TTFT ms", ".1f"), ("tpot_ms", "TPOT ms", ".2f"), ("tpot_p90_ms", "p90 ms", ".2f"),
               ("new_tokens", "tokens", ""), ("peak_gib", "peak GiB", ".2f"),
               ("speedup_vs_hf", "HF TPOT / this", ".1f")]

    # 1. Fully on the GPU (transformers' own speed ceiling), against our `resident`.
    m = build()
    meta["experts_implementation"] = str(getattr(m.config, "_experts_implementation", None))
    meta["attn_implementation"] = str(getattr(m.config, "_attn_implementation", None))
    res_b = resident_bytes_of(m)
    meta["resident_bytes"], meta["expert_bytes"] = res_b, expert_bytes
    if not budgets:  # OffloadEngine.fixed_bytes_for of the 'ondemand' engine bench_policies.py sizes budgets with
        from moepic_jax.offload.memory import WORKSPACE_MARGIN_BYTES, activation_bytes

        T = 1 << max(3, math.ceil(math.log2(args.prompt_len)))
        max_len = 1 << math.ceil(math.log2(T + 32))  # bench_policies: 32 new tokens
        expert = cfg.d_ff * 3 * cfg.d_model * 2
        U = min(cfg.top_k, cfg.n_experts)
        fixed = (res_b + M.kv_cache_bytes(cfg, 1, max_len, 2) + max(2 * U * expert, 2 * cfg.n_experts * expert)
                 + activation_bytes(cfg, 1, max_len, 2) + WORKSPACE_MARGIN_BYTES)
        budgets = [(f, int(fixed + f * expert_bytes)) for f in fracs]
        meta["fixed_bytes"] = fixed
        meta["budgets_from"] = "formula of OffloadEngine.fixed_bytes_for"
    else:
        meta["budgets_from"] = "explicit --budget-gib" if args.budget_gib else str(compare_path)
    if not args.no_gpu_run:
        timed_generate(m, 2, warm_ids)
        r = timed_generate(m, args.new_tokens, ids)
        rows.append({"impl": "transformers", "policy": "hf_gpu (all on the device)", "budget_frac": None,
                     "budget_gib": None, "gpu_weights_gib": (res_b + expert_bytes) / 2**30, **r})
        print(f"transformers on {dev.type}: TTFT {r['ttft_ms']:.1f} ms, TPOT {r['tpot_ms']:.2f} ms", flush=True)
        save()

    # 2. accelerate offloading at each budget (needs a GPU).
    longest = 0.0
    for frac, budget in budgets:
        if not cuda:
            print("accelerate offload needs a CUDA GPU: skipped (tiny / CPU run)", flush=True)
            break
        if time.perf_counter() - t_start + 1.3 * longest > args.time_limit:
            rows.append({"impl": "transformers+accelerate", "policy": "hf_accelerate", "budget_frac": frac,
                         "budget_gib": budget / 2**30, "skipped": "time limit"})
            continue
        t_run = time.perf_counter()
        row = {"impl": "transformers+accelerate", "policy": "hf_accelerate", "budget_frac": frac,
               "budget_gib": budget / 2**30}
        try:
            if m is None:
                m = build()
            import accelerate

            meta["accelerate"] = accelerate.__version__
            host_free = 100 * 2**30
            dmap = accelerate.infer_auto_device_map(m, max_memory={0: budget, "cpu": host_free},
                                                    no_split_module_classes=m._no_split_modules, dtype=torch.bfloat16)
            on_cpu = [k for k, v in dmap.items() if v == "cpu"]
            if any(v == "disk" for v in dmap.values()):
                raise RuntimeError("device map needs disk offload; raise the cpu memory limit")
            for k in on_cpu:
                m.get_submodule(k).to("cpu")
            torch.cuda.empty_cache()
            m = accelerate.dispatch_model(m, device_map=dmap, main_device=dev)
            gpu_w = sum(p.numel() * p.element_size() for p in m.parameters() if p.device.type == "cuda")
            row.update(gpu_weights_gib=gpu_w / 2**30, modules_on_cpu=len(on_cpu),
                       layers_on_gpu=sum(1 for k, v in dmap.items() if ".layers." in k and v != "cpu"))
            timed_generate(m, 1, warm_ids)
            row.update(timed_generate(m, args.offload_new_tokens, ids))
        except Exception as e:  # noqa: BLE001 - keep the other rows
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"
        m = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        row["run_s"] = time.perf_counter() - t_run
        longest = max(longest, row["run_s"])
        rows.append(row)
        print(f"accelerate @ {budget / 2**30:.2f} GiB: " + (row.get("error") or
              f"TTFT {row['ttft_ms']:.0f} ms, TPOT {row['tpot_ms']:.0f} ms, {row['layers_on_gpu']} layers on the GPU, "
              f"run {row['run_s']:.0f} s"), flush=True)
        save()
    m = None

    # 3. Our rows at the same budgets, and the speed-ups.
    if ours is not None:
        hf_gpu = next((r for r in rows if r["policy"].startswith("hf_gpu") and r.get("tpot_ms")), None)
        for r in ours["rows"]:
            if r.get("tpot_ms") is None:
                continue
            same = r["policy"] == "resident" or any(
                b is not None and r.get("budget_gib") and abs(r["budget_gib"] * 2**30 - b) < 2**20
                for _, b in budgets)
            if not same:
                continue
            hf = hf_gpu if r["policy"] == "resident" else next(
                (h for h in rows if h["policy"] == "hf_accelerate" and h.get("tpot_ms") and h.get("budget_gib")
                 and abs(h["budget_gib"] - r["budget_gib"]) < 1e-3), None)
            rows.append({"impl": "moepic_jax", "policy": r["policy"], "budget_frac": r.get("budget_frac"),
                         "budget_gib": r.get("budget_gib"), "ttft_ms": r.get("ttft_ms"), "tpot_ms": r["tpot_ms"],
                         "tpot_p90_ms": r.get("tpot_p90_ms"), "new_tokens": r.get("new_tokens"),
                         "peak_gib": r.get("peak_gib"),
                         "speedup_vs_hf": hf["tpot_ms"] / r["tpot_ms"] if hf else None})
        meta["ours_env"] = ours.get("meta", {}).get("env")
    paths = save()
    print(f"\nwrote {', '.join(paths)}; total {meta['total_s']:.0f} s\n")
    print(C.markdown_table(rows, columns))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Prefill's routed experts grouped by expert (Mosaic-GPU grouped matmul) against the scan over all experts.

Part 1, one MoE layer's experts on the device (random bf16 stack, random top-k routing): time per call of
`model.experts_scan` (every expert over every token) and `grouped.experts_grouped` with the Mosaic-GPU kernel, for
several token counts; the largest difference of the grouped result from the scan and from the grouped path with
`jax.lax.ragged_dot` (the reference, dense on this stack: small N only).
Part 2, `generate` on a random-weight model with a long prompt: TTFT with the grouped prefill (what the engines
pick on Hopper) and with the scan, per policy, in one process on one model build; the greedy tokens of both must
be the same.

  python -m benchmarks.experiments.probe_grouped_prefill --out-dir DIR [--models qwen15,qwen3]
      [--tokens 128,1024,4096] [--e2e-model qwen15] [--prompt-len 1024] [--policies resident,lru:0.25]
"""
import argparse
import datetime
import json
import sys
import time
from pathlib import Path


def timed(fn, *args, repeats: int = 10) -> float:
    """Median seconds of `fn(*args)` (compiled first, each call waited for)."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def kernel_rows(model_names, token_counts, check_tokens: int) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from benchmarks import common as C
    from moepic_jax import model as M
    from moepic_jax.model import grouped

    dev = jax.devices()[0]
    rows = []
    for name in model_names:
        cfg = C.get_config(name)
        E, F, D, K = cfg.n_experts, cfg.d_ff, cfg.d_model, cfg.top_k
        matmul = grouped.matmul_for(dev, D, F, jnp.bfloat16)
        key = jax.random.key(0)
        stack = (jax.random.normal(key, (E, F, 3, D), jnp.float32) * 0.02).astype(jnp.bfloat16)
        scan = jax.jit(M.experts_scan)
        grp = jax.jit(lambda x, s, i, w: grouped.experts_grouped(x, s, i, w, matmul))
        ref = jax.jit(lambda x, s, i, w: grouped.experts_grouped(x, s, i, w, grouped.ragged_matmul_lax))
        for n in token_counts:
            kx, kr = jax.random.split(jax.random.fold_in(key, n))
            x = jax.random.normal(kx, (n, D), jnp.bfloat16)
            ids = jnp.argsort(jax.random.uniform(kr, (n, E)), axis=1)[:, :K].astype(jnp.int32)  # distinct top-k
            w = jax.nn.softmax(jax.random.normal(kr, (n, K)), axis=-1)
            ys = scan(x, stack, ids, w)
            row = {"model": C.MODEL_NAMES[name], "tokens": n, "E": E, "top_k": K,
                   "scan_ms": timed(scan, x, stack, ids, w) * 1e3}
            if matmul is not None:
                yg = grp(x, stack, ids, w)
                row["grouped_ms"] = timed(grp, x, stack, ids, w) * 1e3
                row["speedup"] = row["scan_ms"] / row["grouped_ms"]
                row["max_abs_vs_scan"] = float(jnp.max(jnp.abs(yg - ys)))
                row["max_abs_scan"] = float(jnp.max(jnp.abs(ys)))
                if n <= check_tokens:
                    row["max_abs_vs_lax_ref"] = float(jnp.max(jnp.abs(yg - ref(x, stack, ids, w))))
            rows.append(row)
            print(json.dumps(row), flush=True)
        del stack
    return rows


def e2e_rows(model_name: str, prompt_len: int, policies: list[str], new_tokens: int) -> list[dict]:
    import numpy as np

    from benchmarks import common as C
    from moepic_jax.generate import generate
    from moepic_jax.runtime.factory import make_engine

    cfg = C.get_config(model_name)
    model = C.random_model(cfg, seed=0)
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, prompt_len).tolist()
    rows = []
    for item in policies:
        policy, _, frac = item.partition(":")
        budget = None if policy == "resident" else f"{float(frac) * 100:g}%"
        tokens = {}
        for variant in ("grouped", "scan"):
            eng = make_engine(model, policy=policy, vram_budget=budget) if policy == "resident" else make_engine(
                model, policy=policy, vram_budget=budget, max_batch=1, max_seq_len=prompt_len + new_tokens + 64)
            if variant == "scan":
                eng.matmul = None  # before anything compiles: the engine's prefill then uses experts_scan
            elif eng.matmul is None:
                print(f"{item}: no grouped matmul on this device; skipped", flush=True)
                break
            generate([prompt], max_new_tokens=new_tokens, model=model, engine=eng)  # compiles; warm
            r = generate([prompt], max_new_tokens=new_tokens, model=model, engine=eng)  # greedy
            tokens[variant] = list(r.token_ids[0])
            row = {"model": C.MODEL_NAMES[model_name], "policy": item, "variant": variant, "prompt_len": prompt_len,
                   "ttft_ms": r.stats.ttft_s * 1e3, "tpot_ms": r.stats.tpot_s * 1e3,
                   "compile_s": r.stats.compile_s, "peak_device_GiB": (r.stats.peak_device_bytes or 0) / 2**30}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del eng
        if len(tokens) == 2:
            rows[-1]["same_tokens_as_grouped"] = tokens["scan"] == tokens["grouped"]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen15,qwen3")
    ap.add_argument("--tokens", default="128,1024,4096")
    ap.add_argument("--check-tokens", type=int, default=1024, help="compare with lax.ragged_dot up to this N")
    ap.add_argument("--e2e-model", default="qwen15")
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--policies", default="resident,lru:0.25")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args()
    from benchmarks import common as C

    C.set_gpu_env(a.e2e_model)
    env = C.env_info()
    print(f"# {env['device']}, jax {env['versions'].get('jax')}", flush=True)
    kr = kernel_rows(a.models.split(","), [int(t) for t in a.tokens.split(",")], a.check_tokens)
    er = e2e_rows(a.e2e_model, a.prompt_len, a.policies.split(","), a.new_tokens) if a.e2e_model else []
    out = {"command": C.command_line(), "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "env": env, "kernel": kr, "generate": er}
    if a.out_dir:
        Path(a.out_dir).mkdir(parents=True, exist_ok=True)
        Path(a.out_dir, "probe_grouped_prefill.json").write_text(json.dumps(out, indent=1))
    print("\n| model | tokens | scan ms | grouped ms | speedup | max abs diff vs scan (max abs) | vs lax ref |")
    print("|---|---|---|---|---|---|---|")
    for r in kr:
        print(f"| {r['model']} | {r['tokens']} | {r['scan_ms']:.2f} | {r.get('grouped_ms', float('nan')):.2f} | "
              f"{r.get('speedup', float('nan')):.1f}x | {r.get('max_abs_vs_scan', float('nan')):.2e} "
              f"({r.get('max_abs_scan', float('nan')):.2e}) | {r.get('max_abs_vs_lax_ref', float('nan')):.2e} |")
    print("\n| model | policy | prefill | prompt | TTFT ms | TPOT ms | same tokens |\n|---|---|---|---|---|---|---|")
    for r in er:
        print(f"| {r['model']} | {r['policy']} | {r['variant']} | {r['prompt_len']} | {r['ttft_ms']:.1f} | "
              f"{r['tpot_ms']:.2f} | {r.get('same_tokens_as_grouped', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

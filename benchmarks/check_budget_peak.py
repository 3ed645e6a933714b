"""Invariant 3 on a GPU: the device peak (`peak_bytes_in_use`) of a whole `generate` stays under the VRAM budget.

Each policy runs in a fresh process (the peak cannot be reset) with XLA_PYTHON_CLIENT_PREALLOCATE=false. The
model (the Qwen1.5-MoE-A2.7B layer shapes, fewer layers to keep the run short) is built in host NumPy and its
experts go straight to pinned_host, so nothing touches the device before the engine does.

  PYTHONPATH=. python benchmarks/check_budget_peak.py [--layers 4] [--policies ondemand,moepic] [--frac 0.25]
"""
import argparse
import json
import os
import subprocess
import sys


def child(policy: str, layers: int, frac: float) -> dict:
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    sys.path.insert(0, os.path.dirname(__file__))
    import numpy as np

    import common
    from moepic_jax import generate
    from moepic_jax.config import from_hf_config
    from moepic_jax.offload import OffloadEngine
    from moepic_jax.weights import Model, empty_params

    d = dict(common.REAL_CONFIGS["qwen15"]) if hasattr(common, "REAL_CONFIGS") else None
    d["num_hidden_layers"] = layers
    cfg = from_hf_config(d)
    params = empty_params(cfg, "bfloat16")
    rng = np.random.default_rng(0)
    import jax

    for leaf in jax.tree_util.tree_leaves(params):
        leaf[...] = (rng.standard_normal(leaf.shape, dtype=np.float32) * 0.02).astype(leaf.dtype)
    model = Model(cfg=cfg, params=params, dtype="bfloat16")
    fixed = OffloadEngine(model, policy="ondemand", max_batch=1, max_seq_len=256).fixed_bytes
    budget = fixed + int(frac * model.expert_bytes())
    import gc

    gc.collect()  # the sizing engine above must be gone before the measured one is built (reference cycles)
    ids = rng.integers(0, cfg.vocab_size, 128).tolist()
    r = generate(ids, model=model, max_new_tokens=32, policy=policy, vram_budget=budget, granule=128)
    st = jax.devices()[0].memory_stats() or {}
    return {"policy": policy, "budget_bytes": budget, "fixed_bytes": fixed,
            "peak_bytes_in_use": st.get("peak_bytes_in_use"), "tpot_ms": r.stats.tpot_s * 1e3,
            "h2d_MB_per_token": r.stats.h2d_bytes_per_token / 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--policies", default="ondemand,moepic")
    ap.add_argument("--frac", type=float, default=0.25)
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.layers, a.frac)))
        return
    rows = []
    for pol in a.policies.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", pol, "--layers", str(a.layers), "--frac",
                              str(a.frac)], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        rows.append(json.loads(line[0][7:]) if line else {"policy": pol, "error": out.stderr[-800:]})
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "check_budget_peak.json"), "w") as f:
            json.dump(rows, f, indent=1)
    print("| policy | budget GiB | peak GiB | peak <= budget | TPOT ms |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['policy']} | error: {r['error'][-300:]} |")
            continue
        p = r["peak_bytes_in_use"]
        print(f"| {r['policy']} | {r['budget_bytes'] / 2**30:.3f} | {p / 2**30 if p else float('nan'):.3f} | "
              f"{'yes' if p and p <= r['budget_bytes'] else 'no'} | {r['tpot_ms']:.2f} |")


if __name__ == "__main__":
    main()

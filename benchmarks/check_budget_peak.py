"""Invariant 3 on a GPU: the device peak (`peak_bytes_in_use`) of a whole `generate` stays under the VRAM budget.

The parent writes a random-weight model with a real layer shape (fewer layers, to keep the run short) as a
moepic_jax orbax checkpoint. Each policy then runs in a fresh process (the peak cannot be reset) with
XLA_PYTHON_CLIENT_PREALLOCATE=false, restores that checkpoint into host memory (`moepic_jax.io.loading.load`) and
calls `generate`: the experts go straight to pinned_host, nothing touches the device before the engine does.

  python -m benchmarks.check_budget_peak [--model qwen15] [--layers 4] [--policies ondemand,moepic]
      [--frac 0.25] [--ckpt DIR] [--out-dir DIR]
Prints a table; JSON to --out-dir when given.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

ROOT = Path(__file__).resolve().parents[1]  # the repo root: `python -m benchmarks...` runs from there


def write_checkpoint(model: str, layers: int, path: str) -> None:
    """A random bfloat16 model of `model`'s layer shapes, drawn in host NumPy (the big expert stacks from one shared
    pool at random offsets: drawing every element would take minutes), saved with `moepic_jax.io.checkpoint.save`."""
    import jax
    import numpy as np

    from moepic_jax.config import from_hf_config
    from moepic_jax.io import checkpoint
    from moepic_jax.model.params import empty_params

    d = dict(common.REAL_CONFIGS[model], num_hidden_layers=layers)
    cfg = from_hf_config(d)
    params = empty_params(cfg, "bfloat16")
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 25, dtype=np.float32) * 0.02).astype(params.embed.dtype)
    for leaf in jax.tree_util.tree_leaves(params):
        if leaf.size <= pool.size // 2:
            leaf[...] = (rng.standard_normal(leaf.shape, dtype=np.float32) * 0.02).astype(leaf.dtype)
            continue
        flat = leaf.reshape(leaf.shape[0], -1)  # a view: experts [E, F, 3, D], embed / lm_head rows
        n = flat.shape[1]
        for i in range(0, flat.shape[0]):
            o = int(rng.integers(0, pool.size - n)) if n < pool.size else 0
            flat[i] = np.resize(pool[o:o + n], n)
    checkpoint.save(path, cfg, params, "bfloat16")


def child(policy: str, ckpt: str, frac: float) -> dict:
    os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    import gc

    import jax
    import numpy as np

    from moepic_jax import generate
    from moepic_jax.io.loading import load
    from moepic_jax.runtime.factory import make_engine

    t = time.perf_counter()
    model = load(ckpt)
    restore_s = time.perf_counter() - t
    fixed = make_engine(model, policy="ondemand", max_batch=1, max_seq_len=256).fixed_bytes
    budget = fixed + int(frac * model.expert_bytes())
    gc.collect()  # the sizing engine above must be gone before the measured one is built (reference cycles)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, 128).tolist()
    r = generate(ids, model=model, max_new_tokens=32, policy=policy, vram_budget=budget, granule=128)
    st = jax.devices()[0].memory_stats() or {}
    return {"policy": policy, "budget_bytes": budget, "fixed_bytes": fixed, "restore_s": restore_s,
            "peak_bytes_in_use": st.get("peak_bytes_in_use"), "stats_peak_bytes": r.stats.peak_device_bytes,
            "tpot_ms": r.stats.tpot_s * 1e3, "h2d_MB_per_token": r.stats.h2d_bytes_per_token / 1e6,
            "env": common.env_info()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen15", choices=tuple(common.REAL_CONFIGS))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--policies", default="ondemand,moepic")
    ap.add_argument("--frac", type=float, default=0.25, help="cache budget as a fraction of the expert bytes")
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (written when missing; default: a temp dir)")
    ap.add_argument("--out-dir", default=None, help="folder of the JSON result (default: print only)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a.child, a.ckpt, a.frac)))
        return
    # Writing the checkpoint starts a JAX backend (orbax): in the parent, the CPU's. On a GPU it would preallocate
    # most of the memory the children measure. Set in the config, not the environment, which the children inherit.
    import jax

    jax.config.update("jax_platforms", "cpu")
    tmp = tempfile.TemporaryDirectory() if a.ckpt is None else None
    ckpt = os.path.abspath(a.ckpt or os.path.join(tmp.name, "ckpt"))  # the children run from the repo root
    t = time.perf_counter()
    if not os.path.exists(ckpt):
        write_checkpoint(a.model, a.layers, ckpt)
    with open(os.path.join(ckpt, "config.json")) as f:
        stored = json.load(f)
    if (stored.get("model_type"), stored.get("num_hidden_layers")) != (common.REAL_CONFIGS[a.model]["model_type"],
                                                                      a.layers):
        raise SystemExit(f"--ckpt {ckpt} holds a {stored.get('model_type')} model of {stored.get('num_hidden_layers')} "
                         f"layers, not --model {a.model} --layers {a.layers}; pass another directory")
    print(f"checkpoint {ckpt} ready in {time.perf_counter() - t:.1f} s", flush=True)
    rows = []
    for pol in a.policies.split(","):
        out = subprocess.run([sys.executable, "-m", "benchmarks.check_budget_peak", "--child", pol, "--ckpt", ckpt,
                              "--frac", str(a.frac)], capture_output=True, text=True, cwd=ROOT)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        rows.append(json.loads(line[0][7:]) if line else {"policy": pol, "error": out.stderr[-800:]})
    result = {"command": common.command_line(), "date": datetime.datetime.now(
        datetime.timezone.utc).isoformat(timespec="seconds"), "model": a.model, "layers": a.layers, "frac": a.frac,
        "env": next((r.pop("env") for r in rows if "env" in r), None), "rows": rows}
    if a.out_dir:
        os.makedirs(a.out_dir, exist_ok=True)
        with open(os.path.join(a.out_dir, f"check_budget_peak_{a.model}_l{a.layers}.json"), "w") as f:
            json.dump(result, f, indent=1)
    print(f"{common.MODEL_NAMES[a.model]}, {a.layers} layers, cache budget {a.frac:.0%} of the expert bytes")
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

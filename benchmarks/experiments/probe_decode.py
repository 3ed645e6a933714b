"""Where does decode time go? Device time vs host overhead of the resident and ondemand decode steps, and two
formulations of the resident MoE (gather of the routed experts vs one dynamic index per routed expert).

  python -m benchmarks.experiments.probe_decode [--tiny] [--out-dir DIR]
Prints a short table; JSON to DIR/probe_decode.json when --out-dir is given.
"""
import argparse
import json
import os
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
import moepic_jax  # noqa: E402
from moepic_jax import model as M  # noqa: E402
from moepic_jax.model import layers as ML  # noqa: E402
from moepic_jax.runtime.engine import ResidentEngine  # noqa: E402
from moepic_jax.runtime.factory import make_engine  # noqa: E402


def experts_indexed(x, experts, ids, w):
    """Routed experts read by one dynamic index each (no gather)."""
    y = jnp.zeros(x.shape, jnp.float32)
    for n in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            ex = jax.lax.dynamic_index_in_dim(experts, ids[n, k], keepdims=False)
            y = y.at[n].add(w[n, k] * M.segment_ffn(x[n:n + 1], ex)[0].astype(jnp.float32))
    return y


def time_steps(engine, state, tok, steps, sync_each):
    t0 = time.perf_counter()
    for _ in range(steps):
        logits, state, c = engine.decode(state, tok)
        if sync_each:
            np.asarray(logits[:, :1])
    jax.block_until_ready(logits)
    return (time.perf_counter() - t0) / steps * 1e3, state


def run(engine, cfg, steps=20):
    T, L = 128, 256
    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, T)), jnp.int32)
    mask = jnp.ones((1, T), bool)
    state = engine.new_state(1, L)
    tok = jnp.zeros((1,), jnp.int32)
    engine.warmup(state, toks, mask, tok)
    _, state, _ = engine.prefill(state, toks, mask)
    _, state = time_steps(engine, state, tok, 3, True)
    a, state = time_steps(engine, state, tok, steps, False)
    b, state = time_steps(engine, state, tok, steps, True)
    return {"ms_pipelined": a, "ms_sync_each": b}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out-dir", default=None, help="folder of the JSON result (default: print only)")
    args = ap.parse_args()
    cfg = common.get_config("qwen15", tiny=args.tiny)
    model = common.random_model(cfg, progress=False)
    rows = {}
    e = ResidentEngine(model)
    rows["resident gather"] = run(e, cfg)
    del e
    orig = ML.experts_gathered
    ML.experts_gathered = experts_indexed  # moe_resident reads it from model/layers.py when the step is traced
    e = ResidentEngine(model)
    rows["resident indexed"] = run(e, cfg)
    del e
    ML.experts_gathered = orig
    moepic_jax.ENGINES.clear()
    e = make_engine(model, policy="ondemand", max_batch=1, max_seq_len=256)
    rows["ondemand"] = run(e, cfg)
    del e
    print(json.dumps(rows, indent=1))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        with open(os.path.join(args.out_dir, "probe_decode.json"), "w") as f:
            json.dump({"rows": rows, "env": common.env_info()}, f, indent=1)
    print("| step | ms/token pipelined | ms/token with a sync each step |\n|---|---|---|")
    for k, v in rows.items():
        print(f"| {k} | {v['ms_pipelined']:.2f} | {v['ms_sync_each']:.2f} |")


if __name__ == "__main__":
    main()

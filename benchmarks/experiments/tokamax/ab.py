"""Prefill's grouped expert matmul: `model.grouped` (JAX's Pallas Mosaic-GPU `ragged_dot_mgpu`) against tokamax's
`ragged_dot_general` (its own choice of kernel: Mosaic GPU, then Triton, then XLA), on real models' shapes.

Both run inside `grouped.experts_grouped` (the same sort, view of the [E, F, 3, D] stack and scatter back), so the
only difference is the RaggedMatmul. Routing is drawn uniformly (each token's top-k distinct experts). Times are the
median of `--repeats` jitted calls; the error is the largest |difference| relative to the largest |reference|.

  python -m benchmarks.experiments.tokamax.ab --out ab.json       # Hopper GPU; needs tokamax installed
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.experiments.probe_grouped_prefill import timed
from moepic_jax.model import grouped

SHAPES = {  # name: (E, top_k, d_model, d_ff)
    "qwen15": (60, 4, 2048, 1408),
    "qwen3": (128, 8, 2048, 768),
    "mixtral": (8, 2, 4096, 14336),
}


def tokamax_matmul(lhs, rhs, group_sizes, transpose_rhs):
    """`grouped.RaggedMatmul` by tokamax (default implementation order)."""
    import sys

    from absl import flags

    if not flags.FLAGS.is_parsed():  # tokamax's config would parse this script's own arguments as absl flags
        flags.FLAGS(sys.argv[:1])
    import tokamax
    from tokamax._src.ops.ragged_dot import base

    dims = base.TRANS_RHS_RAGGED_DOT_DIM_NUMS if transpose_rhs else base.DEFAULT_RAGGED_DOT_DIM_NUMS
    out = tokamax.ragged_dot_general(lhs, rhs, group_sizes.astype(jnp.int32), dims,
                                     preferred_element_type=jnp.float32)
    return out.astype(lhs.dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="128,512,2048")
    ap.add_argument("--models", default="qwen15,qwen3,mixtral")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    rows = []
    rng = np.random.default_rng(0)
    for name in a.models.split(","):
        E, K, D, F = SHAPES[name]
        stack = (jax.random.normal(jax.random.key(1), (E, F, 3, D), jnp.float32) * 0.02).astype(jnp.bfloat16)
        for n in [int(t) for t in a.tokens.split(",")]:
            x = (jax.random.normal(jax.random.key(2), (n, D), jnp.float32)).astype(jnp.bfloat16)
            ids = jnp.asarray(np.argsort(rng.random((n, E)), axis=1)[:, :K].astype(np.int32))
            w = jnp.full((n, K), 1.0 / K, jnp.float32)
            row = dict(model=name, tokens=n)
            outs = {}
            for label, mm in (("mgpu", grouped.ragged_matmul_mosaic), ("tokamax", tokamax_matmul)):
                fn = jax.jit(lambda x, s, i, w, mm=mm: grouped.experts_grouped(x, s, i, w, mm))
                try:
                    row[f"{label}_ms"] = round(timed(fn, x, stack, ids, w, repeats=a.repeats) * 1e3, 3)
                    outs[label] = np.asarray(fn(x, stack, ids, w))
                except Exception as e:  # a kernel that refuses these shapes is a result, not a crash
                    row[f"{label}_ms"] = None
                    row[f"{label}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if len(outs) == 2:
                row["rel_diff"] = float(np.abs(outs["mgpu"] - outs["tokamax"]).max() / np.abs(outs["mgpu"]).max())
            rows.append(row)
            print(row, flush=True)
    for r in rows:
        if "tokamax_error" in r or "mgpu_error" in r:
            print(r["model"], r["tokens"], r.get("mgpu_error", ""), r.get("tokamax_error", ""))
    print("\n| model | tokens | mgpu ms | tokamax ms | tokamax/mgpu | rel diff |\n|---|---|---|---|---|---|")
    for r in rows:
        ratio = (f"{r['tokamax_ms'] / r['mgpu_ms']:.2f}" if r.get("mgpu_ms") and r.get("tokamax_ms") else "-")
        print(f"| {r['model']} | {r['tokens']} | {r.get('mgpu_ms')} | {r.get('tokamax_ms')} | {ratio} | "
              f"{r.get('rel_diff', '-')} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

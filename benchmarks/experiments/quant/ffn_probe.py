"""Where the quantized expert FFN's time goes at decode (batch 1): bf16 against int8 / int4 rows, the einsum form
(`layers.segment_ffn`, dequantize then dot) against a multiply-reduce form that XLA can fuse with the dequantization.

For each expert shape (Qwen1.5-MoE-A2.7B, Qwen3-30B-A3B, Mixtral-8x7B) it times U experts' FFNs on one token, as
the decode step computes its routed experts (one `segment_ffn` per expert, outputs stacked), and reports the time per
expert and the weight bytes read per second. It also counts the compiled program's kernels by kind (fusions,
cuBLAS / Triton GEMMs) and the largest temporary, which shows whether a full-precision copy of the weights is
written. Random weights; the numbers compare forms, they are not model results.

  python -m benchmarks.experiments.quant.ffn_probe [--iters 200] [--out OUT_DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax.config import ExpertQuant
from moepic_jax.model import layers as M
from moepic_jax.model.quant import quantize_rows_jax

SHAPES = {"qwen15": (1408, 2048), "qwen3": (768, 2048), "mixtral": (14336, 4096)}


def ffn_form(x, seg, quant, form):
    """`layers.segment_ffn` in one form ("einsum" or "reduce"): x [N, D] -> [N, D]."""
    return M.segment_ffn(x, seg, quant, reduce=quant is not None and form == "reduce")


def kernel_counts(compiled) -> dict:
    text = compiled.as_text()
    calls = re.findall(r'custom_call_target="([^"]+)"', text)
    return {"fusions": len(re.findall(r"^\s*\S+ = \S+ fusion\(", text, re.M)),
            "custom_calls": {c: calls.count(c) for c in sorted(set(calls))},
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--experts", type=int, default=4, help="experts per call (U, as in one layer's step)")
    ap.add_argument("--models", default=",".join(SHAPES), help="comma list of " + ", ".join(SHAPES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for model in args.models.split(","):
        S, D = SHAPES[model]
        U = args.experts if model != "mixtral" else 2
        x = jnp.asarray(rng.standard_normal((1, D)), jnp.bfloat16)
        w16 = jnp.asarray(rng.standard_normal((U, S, 3, D)) * 0.02, jnp.bfloat16)
        variants = {"bf16 einsum": (w16, None, "einsum")}
        for bits, group in ((8, 128), (4, 64)):
            q = ExpertQuant(bits, group)
            wq = jax.jit(quantize_rows_jax, static_argnums=1)(w16, q)
            variants[f"int{bits} einsum"] = (wq, q, "einsum")
            variants[f"int{bits} reduce"] = (wq, q, "reduce")
        ref = None
        for name, (w, q, form) in variants.items():
            one = lambda x, s, q=q, form=form: ffn_form(x, s, q, form)  # noqa: E731
            f = jax.jit(lambda x, w, one=one: jnp.stack([one(x, w[u]).astype(jnp.float32) for u in range(U)]))
            compiled = f.lower(x, w).compile()
            out = np.asarray(f(x, w))
            if ref is None:
                ref = out
            err = float(np.max(np.abs(out - ref)) / (np.max(np.abs(ref)) + 1e-30))
            for _ in range(5):
                f(x, w).block_until_ready()
            t = time.perf_counter()
            for _ in range(args.iters):
                y = f(x, w)
            y.block_until_ready()
            dt = (time.perf_counter() - t) / args.iters
            nbytes = w.size * w.dtype.itemsize
            rows.append({"model": model, "S": S, "D": D, "U": U, "variant": name, "us_per_expert": dt / U * 1e6,
                         "weight_mb_per_expert": nbytes / U / 1e6, "gb_per_s": nbytes / dt / 1e9,
                         "rel_err_vs_bf16": err, **kernel_counts(compiled)})
            r = rows[-1]
            print(f"{model:8s} {name:12s} {r['us_per_expert']:8.1f} us/expert {r['gb_per_s']:7.1f} GB/s "
                  f"fusions {r['fusions']:3d} calls {r['custom_calls']} temp {r['temp_bytes'] / 1e6:.1f} MB "
                  f"err {err:.3f}", flush=True)
    print("\n| model | variant | us/expert | MB/expert | GB/s | fusions | temp MB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['us_per_expert']:.1f} | {r['weight_mb_per_expert']:.2f} | "
              f"{r['gb_per_s']:.0f} | {r['fusions']} | {r['temp_bytes'] / 1e6:.1f} |")
    if args.out:
        meta = {"jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "iters": args.iters}
        with open(f"{args.out}/ffn_probe.json", "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()

"""Direct copies by DMA (a worker queues cudaMemcpyAsync) against the copy kernel (gather.cu reads the plan on the
device): bandwidth, overlap with compute, and the per-layer latency of a chain in which each layer's copy depends on
the previous layer's result, as in a decode step without prefetch.

Each configuration runs in its own process (the copy mode is per process): `dma` (MOEPIC_JAX_COPY_KERNEL=0) and
`kernel/B` (B blocks of 512 threads, MOEPIC_JAX_GATHER_BLOCKS). Shapes: Qwen1.5-MoE-A2.7B experts, [F=1408, 3,
D=2048] bf16 rows, 17.3 MB each; K = 4 experts per copy.

  python -m benchmarks.experiments.direct.probe_copy_kernel --out DIR     (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

E, F, D, K = 16, 1408, 2048, 4


def child() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    from moepic_jax.offload import transfer

    dev = jax.devices()[0]
    plat = dev.platform
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    stack = jax.device_put(jax.random.normal(k0, (E, F, 3, D), jnp.bfloat16),
                           jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host"))
    src = jnp.asarray(transfer.host_address(stack))
    tops = jnp.zeros((0, 1, 3, D), jnp.bfloat16)
    empty = jnp.zeros((0, 1, transfer.PLAN_COLS), jnp.int32)

    def copy(ids, n_rows, tag):
        plan = jnp.stack([jnp.zeros_like(ids), ids, jnp.zeros_like(ids), jnp.full_like(ids, n_rows)], -1)[:, None]
        groups = (transfer.Group(plan, src, tops), transfer.Group(empty, src, tops))
        d0, _ = transfer.start(plat, groups, F, (3, D), E, jnp.bfloat16, tag=tag)
        return d0, groups[0]

    def bench(f, *args, n=30):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(n):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - t)
        return 1e3 * float(np.median(ts))

    ids = jnp.array([3, 7, 11, 2], jnp.int32)
    f_copy = jax.jit(lambda i: transfer.wait(plat, *copy(i, F, 0), 0, 0))
    out = np.asarray(f_copy(ids).astype(jnp.float32))
    ref = np.asarray(jax.device_get(stack)).astype(np.float32)
    ok = bool(np.array_equal(out, ref[np.asarray(ids)]))
    n = int(os.environ.get("PROBE_COMPUTE_N", "4096"))  # smaller for a CPU smoke run
    c = jax.random.normal(k1, (n, n), jnp.bfloat16)
    w = jax.random.normal(k2, (n, n), jnp.bfloat16)

    def compute(c, w):
        for _ in range(8):
            c = jnp.tanh(c @ w) * 0.5
        return c

    def both(i, c, w):
        dst, g = copy(i, F, 1)
        dst, c = lax.optimization_barrier((dst, c))  # the start before the compute ...
        y = compute(c, w)
        dst, y = lax.optimization_barrier((dst, y))  # ... and its wait after it
        return transfer.wait(plat, dst, g, 1, 0), y

    t_copy, t_comp = bench(f_copy, ids), bench(jax.jit(compute), c, w)
    t_both = bench(jax.jit(both), ids, c, w)

    # a chain of L layers: each layer's expert ids come from the previous layer's output (no prefetch possible)
    L = 24
    wl = jax.random.normal(k2, (D, D), jnp.bfloat16) * 0.02

    def chain(x, n_rows, with_copy):
        for l in range(L):
            h = jnp.tanh(x @ wl)
            e = (jnp.argmax(h[0]).astype(jnp.int32) + jnp.arange(K, dtype=jnp.int32)) % E
            if with_copy:
                dst, g = copy(e, n_rows, 10 + l)
                dst = transfer.wait(plat, dst, g, 10 + l, 0)
                x = h + dst[:, 0, 0, :].astype(h.dtype).sum(0, keepdims=True) * 1e-3
            else:
                x = h + e.sum().astype(h.dtype) * 1e-3
        return x

    x0 = jax.random.normal(k1, (1, D), jnp.bfloat16)
    t_chain0 = bench(jax.jit(lambda x: chain(x, 0, False)), x0)
    t_chain_small = bench(jax.jit(lambda x: chain(x, 16, True)), x0)
    t_chain_full = bench(jax.jit(lambda x: chain(x, F, True)), x0)
    row_mb = F * 3 * D * 2 / 1e6
    return dict(mode=transfer.mode(plat), kernel_why=transfer.kernel_why(plat), values_ok=ok, copy_ms=t_copy, copy_GBps=K * row_mb / t_copy,
                compute_ms=t_comp, both_ms=t_both, overlap=(t_copy + t_comp - t_both) / min(t_copy, t_comp),
                chain_layers=L, chain_compute_ms=t_chain0,
                chain_small_ms_per_layer=(t_chain_small - t_chain0) / L,
                chain_full_ms_per_layer=(t_chain_full - t_chain0) / L,
                chain_full_GBps=L * K * row_mb / (t_chain_full - t_chain0),
                device=dev.device_kind, jax=jax.__version__)


def main() -> int:
    if os.environ.get("PROBE_COPY_KERNEL_CHILD"):
        print("RESULT " + json.dumps(child()), flush=True)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--blocks", default="16,32,64,132", help="kernel grid sizes to try")
    ap.add_argument("--out", default=None, help="folder for probe_copy_kernel.json")
    args = ap.parse_args()
    configs = [("dma", {"MOEPIC_JAX_COPY_KERNEL": "0"})]
    configs += [(f"kernel/{b}", {"MOEPIC_JAX_COPY_KERNEL": "1", "MOEPIC_JAX_GATHER_BLOCKS": b})
                for b in args.blocks.split(",")]
    rows = []
    for name, env in configs:
        res = subprocess.run([sys.executable, "-m", "benchmarks.experiments.direct.probe_copy_kernel"],
                             env={**os.environ, **env, "PROBE_COPY_KERNEL_CHILD": "1"}, capture_output=True,
                             text=True, timeout=240)
        line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
        row = json.loads(line[-1][7:]) if line else {"error": res.stderr[-1500:]}
        row["config"] = name
        rows.append(row)
        print(name, json.dumps(row)[:600], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_copy_kernel.json"), "w") as f:
            json.dump(rows, f, indent=1)
    cols = ["config", "mode", "values_ok", "copy_ms", "copy_GBps", "overlap", "chain_compute_ms",
            "chain_small_ms_per_layer", "chain_full_ms_per_layer", "chain_full_GBps"]
    print("| " + " | ".join(cols) + " |")
    for r in rows:
        print("| " + " | ".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols)
              + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

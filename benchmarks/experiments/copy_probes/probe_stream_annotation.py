"""Probe 2: the prefetch copy inside compute_on('gpu_stream:1') (explicit stream annotation).

XLA path (jax 0.11): the annotated call is not inlined (CallInliner InlineStreamAnnotation),
ExplicitStreamAnnotationAsyncWrapper makes it call-start/call-done when
--xla_gpu_experimental_stream_annotation is on, ExecutionStreamAssignment takes the stream from
_xla_stream_annotation, ThunkEmitter::EmitAsyncComputation runs the body in an AsyncStartThunk.
 A zero-copy: dynamic slices of one pinned_host stack by traced ids inside the region. The
   HostMemoryTransferAsyncifier rewrites them as dynamic-slice-start, an async op nested in the
   call body, which the stream assigner does not walk: "No ExecutionStreamId found" is likely.
 B dma: lax.switch over E whole per-expert pinned buffers inside the region: each branch is a
   plain H2D copy (cudaMemcpyAsync on the side stream); each switch blocks the host on its index.
 C dma, main stream: B without the annotation (gives the DMA bandwidth; no overlap expected).
Usage: python probe_stream_annotation.py   (prints copy alone / compute alone / both)
"""
import os, time
os.environ.setdefault("XLA_FLAGS", "--xla_gpu_experimental_stream_annotation=true")
import numpy as np, jax, jax.numpy as jnp
from jax import lax
from jax.experimental import compute_on as co

E, F, D, K = 16, 1408, 2048, 4
dev = jax.devices()[0]
HOST = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
DEV = jax.memory.Space.Device
deco = getattr(co, "compute_on2", None) or co.compute_on      # 0.10.1+ name / 0.11.2 name
on_side = lambda f: deco(f, compute_type="gpu_stream:1", out_memory_spaces=DEV)
k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
src = jax.random.normal(k0, (E, F, 3, D), jnp.bfloat16)
stack = jax.device_put(src, HOST)
bufs = tuple(jax.device_put(src[e], HOST) for e in range(E))
del src
ids = jnp.array([3, 7, 11, 2], jnp.int32)
c = jax.random.normal(k1, (4096, 4096), jnp.bfloat16); w = jax.random.normal(k2, (4096, 4096), jnp.bfloat16)

def compute(c, w):
    for _ in range(8):
        c = jnp.tanh(c @ w) * 0.5
    return c

def copy_slice(ids, st):
    return tuple(jax.device_put(lax.dynamic_index_in_dim(st, ids[i], keepdims=False), DEV) for i in range(K))

def copy_switch(ids, *bs):
    branches = [lambda b=b: jax.device_put(b, DEV) for b in bs]
    return tuple(lax.switch(ids[i], branches) for i in range(K))

variants = {  # name: (copy fn, host operands)
    "A zero-copy, stream 1": (on_side(copy_slice), (stack,)),
    "B dma switch, stream 1": (on_side(copy_switch), bufs),
    "C dma switch, main": (copy_switch, bufs),
}

def bench(f, args, n=30):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts))

print(jax.__version__, dev.device_kind, os.environ["XLA_FLAGS"])
t_comp = bench(jax.jit(compute), (c, w))
for name, (cp, hs) in variants.items():
    try:
        f_copy = jax.jit(lambda ids, *hs: cp(ids, *hs))
        f_both = jax.jit(lambda c, w, ids, *hs: (cp(ids, *hs), compute(c, w)))
        txt = f_both.lower(c, w, ids, *hs).compile().as_text()
        t_copy, t_both = bench(f_copy, (ids, *hs)), bench(f_both, (c, w, ids, *hs))
    except Exception as e:                                 # refusals are results too
        print(f"{name}: FAILED {type(e).__name__}: {str(e)[:400]}"); continue
    hidden = (t_copy + t_comp - t_both) / min(t_copy, t_comp)
    print(f"{name}: copy {t_copy:.3f} ms ({K*F*3*D*2/t_copy/1e6:.1f} GB/s) compute {t_comp:.3f}"
          f" both {t_both:.3f} overlap {hidden:.2f} | call-start {txt.count('call-start')}"
          f" copy-start {txt.count('copy-start')} conditional {txt.count('conditional(')}")

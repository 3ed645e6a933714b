"""Can the host compute a missed expert faster than PCIe brings it? Qwen1.5-MoE expert shape [F=1408, 3, D=2048] bf16.
A: H2D copy of one expert (in jit, dynamic slice of a pinned stack) + GPU SwiGLU.
B: XLA host compute (compute_on('device_host')) of the SwiGLU on the pinned stack, result back to the device.
C: the same on the CPU backend alone (XLA:CPU, 16 threads), bf16 and f32, to see XLA:CPU's matvec bandwidth.
"""
import time, os
import numpy as np
import jax, jax.numpy as jnp
from jax.experimental.compute_on import compute_on

E, F, D = 60, 1408, 2048
K = int(os.environ.get("K", "4"))
gpu = jax.devices("gpu")[0] if jax.default_backend() == "gpu" else jax.devices()[0]
host = jax.sharding.SingleDeviceSharding(gpu, memory_kind="pinned_host")
dev = jax.sharding.SingleDeviceSharding(gpu, memory_kind="device")
w = jax.device_put(jax.random.normal(jax.random.key(0), (E, F, 3, D), jnp.bfloat16) * 0.02, host)
x = jax.device_put(jax.random.normal(jax.random.key(1), (1, D), jnp.bfloat16), dev)
ids = jax.device_put(jnp.array([3, 17, 29, 44][:K], jnp.int32), dev)

def ffn(x, we):  # we [F, 3, D]
    g = x @ we[:, 0].T; u = x @ we[:, 1].T
    return (jax.nn.silu(g.astype(jnp.float32)) * u.astype(jnp.float32)).astype(x.dtype) @ we[:, 2]

def bench(f, *a, n=20):
    r = f(*a); jax.block_until_ready(r)
    t = time.perf_counter()
    for _ in range(n): r = f(*a)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / n * 1e3

@jax.jit
def copy_then_gpu(x, w, ids):
    y = jnp.zeros_like(x)
    for i in range(K):
        we = jax.device_put(jax.lax.dynamic_index_in_dim(w, ids[i], 0, keepdims=False), jax.memory.Space.Device)
        y = y + ffn(x, we)
    return y
print(f"A copy {K} experts + gpu ffn: {bench(copy_then_gpu, x, w, ids):.3f} ms  ({K*F*3*D*2/1e6:.1f} MB)", flush=True)

try:
    # FIX: jax 0.11 compute_on(f=None, *, compute_type, out_memory_spaces); the old compute_on("device_host")
    # form passes the string as `f` and raises TypeError before anything is compiled.
    @compute_on(compute_type="device_host", out_memory_spaces=jax.memory.Space.Host)
    @jax.jit
    def host_part(xh, w, idsh):
        y = None  # FIX: a jnp.zeros start lands in device memory and `add` refuses device + host operands
        for i in range(K):
            we = jax.lax.dynamic_index_in_dim(w, idsh[i], 0, keepdims=False)
            t = ffn(xh, we).astype(jnp.float32)
            y = t if y is None else y + t
        return y
    @jax.jit
    def host_ffn(x, w, ids):
        xh = jax.device_put(x, jax.memory.Space.Host); ih = jax.device_put(ids, jax.memory.Space.Host)
        return jax.device_put(host_part(xh, w, ih), jax.memory.Space.Device)
    print(f"B host compute {K} experts: {bench(host_ffn, x, w, ids, n=5):.3f} ms", flush=True)
except Exception as e:
    print("B failed:", type(e).__name__, str(e)[:400], flush=True)

cpu = jax.devices("cpu")[0]
w8 = np.asarray(jax.device_get(w))[:8]   # FIX (precaution): slice in NumPy, not an eager w[:8] op on a pinned_host array
for dt in (jnp.bfloat16, jnp.float32):
    wc = jax.device_put(w8.astype(dt), cpu)
    xc = jax.device_put(np.asarray(jax.device_get(x)).astype(dt), cpu)
    ic = jax.device_put(np.arange(K, dtype=np.int32), cpu)
    @jax.jit
    def cpu_ffn(x, w, ids):
        y = jnp.zeros(x.shape, jnp.float32)
        for i in range(K):
            y = y + ffn(x, jax.lax.dynamic_index_in_dim(w, ids[i], 0, keepdims=False)).astype(jnp.float32)
        return y
    ms = bench(cpu_ffn, xc, wc, ic, n=10)
    print(f"C XLA:CPU {jnp.dtype(dt).name} {K} experts: {ms:.3f} ms = {K*F*3*D*jnp.dtype(dt).itemsize/ms/1e6:.1f} GB/s", flush=True)

try:
    import torch
    torch.set_num_threads(int(os.environ.get("THREADS", "16")))
    for dt in (torch.bfloat16, torch.float32):
        wt = torch.randn(8, 3, F, D, dtype=dt) * 0.02
        xt = torch.randn(1, D, dtype=dt)
        def tffn():
            y = 0
            for i in range(K):
                g = xt @ wt[i, 0].T; u = xt @ wt[i, 1].T
                y = y + (torch.nn.functional.silu(g) * u) @ wt[i, 2]
            return y
        tffn(); t = time.perf_counter()
        for _ in range(10): tffn()
        ms = (time.perf_counter() - t) / 10 * 1e3
        print(f"D torch CPU {dt} {K} experts ({torch.get_num_threads()} threads): {ms:.3f} ms = {K*F*3*D*wt.element_size()/ms/1e6:.1f} GB/s", flush=True)
except Exception as e:
    print("D failed:", e)
print("cpu:", os.cpu_count(), open("/proc/cpuinfo").read().count("avx512_bf16") > 0 and "avx512_bf16" or "no avx512_bf16", flush=True)

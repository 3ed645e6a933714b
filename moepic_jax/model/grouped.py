"""Prefill's routed experts with the (token, expert) pairs grouped by expert: one grouped matmul per projection.

Prefill has many tokens per expert. `model.experts_scan` runs every expert over every token: E / top_k times the
work that routing asks for (15x for Qwen1.5-MoE, 16x for Qwen3-30B-A3B). Sorting the N * top_k pairs by expert
and multiplying each expert's rows by that expert only (a "grouped GEMM", as in MegaBlocks) does the routed work.
`jax.lax.ragged_dot` is that operation, but XLA turns it into a dense matmul over all groups on this stack (GPU
and CPU; JAX_NOTES.md §6), so on Hopper GPUs prefill calls the Pallas Mosaic-GPU kernel
(`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, wgmma); elsewhere it keeps `experts_scan` (`matmul_for`).

The expert stack keeps its neuron-major layout [E, F, 3, D] (per neuron: gate column, up column, down row), which
makes a split segment one contiguous copy. Viewed as [E, 3F, D] it feeds both products without a copy:
  gate and up: x [M, D] @ stack[e]^T -> [M, 3F]; columns 3f and 3f+1 are neuron f's gate and up (3f+2 is unused);
  down: [0, 0, silu(g) * u] interleaved per neuron [M, 3F] @ stack[e] [3F, D] -> [M, D].
That is twice the minimal FLOPs (against E / top_k for the scan) and no temporary copy of the stack.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

# (lhs [M, K], rhs [G, K, N] (or [G, N, K] with transpose_rhs), group_sizes [G] int32, transpose_rhs) -> [M, N].
# Rows of lhs are sorted by group; rows past sum(group_sizes) may hold anything (the caller masks them).
RaggedMatmul = Callable[[jax.Array, jax.Array, jax.Array, bool], jax.Array]

# Mosaic-GPU tile sizes: the fastest setting on the H200 for decode-, prefill- and Mixtral-like shapes
# (JAX_NOTES.md §6). The kernel needs K % BLOCK_K == 0 and N % BLOCK_N == 0.
BLOCK_M, BLOCK_N, BLOCK_K, MAX_CONCURRENT_STEPS = 128, 128, 64, 4


def ragged_matmul_lax(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> jax.Array:
    """`RaggedMatmul` by `jax.lax.ragged_dot`: the reference for tests (dense over all groups on GPU and CPU, so
    only for small shapes). Rows past sum(group_sizes) come out as zeros."""
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32))


def _mosaic_fits(k: int, n: int) -> bool:
    return k % BLOCK_K == 0 and n % BLOCK_N == 0


def ragged_matmul_mosaic(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs: bool) -> jax.Array:
    """`RaggedMatmul` by the Pallas Mosaic-GPU kernel (Hopper, bf16/f16, f32 accumulation, result in lhs.dtype).

    Raises:
      ValueError: K or N is not a multiple of the tile (`BLOCK_K`, `BLOCK_N`); `matmul_for` checks this first.
    """
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    k = lhs.shape[1]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if not _mosaic_fits(k, n):
        raise ValueError(f"Mosaic-GPU ragged matmul needs K % {BLOCK_K} == 0 and N % {BLOCK_N} == 0, got K={k}, "
                         f"N={n}; prefill falls back to experts_scan for such shapes")
    tiles_n = n // BLOCK_N
    grid_block_n = next(g for g in (4, 2, 1) if tiles_n % g == 0)  # column tiles walked together (L2 reuse)
    return ragged_dot_mgpu.ragged_dot(lhs, rhs, group_sizes=group_sizes.astype(jnp.int32), block_m=BLOCK_M,
                                      block_n=BLOCK_N, block_k=BLOCK_K, max_concurrent_steps=MAX_CONCURRENT_STEPS,
                                      grid_block_n=grid_block_n, transpose_rhs=transpose_rhs)


def matmul_for(device, d_model: int, d_ff: int, dtype) -> RaggedMatmul | None:
    """The grouped matmul prefill uses on `device`, or None to keep `model.experts_scan`.

    The Mosaic-GPU kernel on a Hopper GPU (compute capability 9.0) with bf16/f16 weights whose projections fit its
    tiles (d_model and 3 * d_ff multiples of `BLOCK_N`; true of every supported real model); None elsewhere (CPU,
    other GPUs: `jax.lax.ragged_dot` would be dense there, JAX_NOTES.md §6)."""
    if getattr(device, "platform", None) != "gpu" or getattr(device, "compute_capability", None) != "9.0":
        return None
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return None
    if not (_mosaic_fits(d_model, 3 * d_ff) and _mosaic_fits(3 * d_ff, d_model)):
        return None
    return ragged_matmul_mosaic


def experts_grouped(x: jax.Array, experts: jax.Array, ids: jax.Array, w: jax.Array, matmul: RaggedMatmul) -> jax.Array:
    """Routed-expert output with the (token, expert) pairs sorted by expert: the same sum as `model.experts_scan`.

    Args:
      x: [N, D] tokens; experts: [E, F, 3, D] neuron-major stack (`io/hf.py`); ids, w: [N, K] routed experts and
        their weights (`model.route`). An id outside [0, E) contributes nothing (an expert another device holds).
      matmul: a `RaggedMatmul` (`matmul_for`, or `ragged_matmul_lax` in tests).
    Returns:
      [N, D] float32.
    """
    N, K = ids.shape
    E, F, _, D = experts.shape
    flat = ids.reshape(-1)
    key = jnp.where((flat >= 0) & (flat < E), flat, E)  # pairs of no local expert sort last
    order = jnp.argsort(key, stable=True)  # [N*K] pair index by expert
    sizes = jnp.zeros((E + 1,), jnp.int32).at[key].add(1)[:E]
    rows = x[order // K]  # [N*K, D]
    view = experts.reshape(E, 3 * F, D)  # free: the layout is contiguous
    gu = matmul(rows, view, sizes, True).reshape(N * K, F, 3)
    act = jax.nn.silu(gu[..., 0]) * gu[..., 1]  # [N*K, F]
    act3 = jnp.stack([jnp.zeros_like(act), jnp.zeros_like(act), act], axis=-1).reshape(N * K, 3 * F)
    y = matmul(act3, view, sizes, False)  # [N*K, D], sorted by expert
    y = jnp.where((jnp.arange(N * K) < jnp.sum(sizes))[:, None], y, 0)  # rows past the groups are not written
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(N * K, dtype=order.dtype))
    y = y[inverse].reshape(N, K, D).astype(jnp.float32)
    return jnp.einsum("nkd,nk->nd", y, w.astype(jnp.float32))

"""The KV cache of the decoder: a preallocated pytree, its size, and the bookkeeping of new tokens."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from moepic_jax.config import MoEConfig


@flax.struct.dataclass
class KVCache:
    """Preallocated KV cache. Slots are in time order for every row; left padding fills leading slots.

    k, v: [L, B, S, G, hd]; valid: [B, S] bool, slot holds a real token; pos: [B] int32, number of
    real tokens seen per row (the RoPE position of the next token); length: [] int32, slots written.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    pos: jax.Array
    length: jax.Array


def init_kv_cache(cfg: MoEConfig, batch: int, max_len: int, dtype) -> KVCache:
    """An empty cache for `batch` rows of `max_len` slots (zeros; `jnp.empty` is uninitialised on jax 0.11)."""
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), valid=jnp.zeros((batch, max_len), bool),
        pos=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32),
    )


def kv_cache_bytes(cfg: MoEConfig, batch: int, max_len: int, dtype_bytes: int) -> int:
    """Device bytes of `init_kv_cache(cfg, batch, max_len)`."""
    return 2 * cfg.n_layers * batch * max_len * cfg.n_kv_heads * cfg.head_dim * dtype_bytes + batch * (max_len + 4) + 4

def cache_positions(cache: KVCache, mask: jax.Array) -> tuple[jax.Array, jax.Array, KVCache]:
    """Positions of T new tokens and the cache bookkeeping after writing them.

    mask: [B, T] bool, real tokens. Returns (positions [B, T], valid [B, S], cache with valid/pos/length
    advanced; k/v untouched).
    """
    positions = cache.pos[:, None] + jnp.cumsum(mask, axis=1) - 1
    positions = jnp.maximum(positions, 0).astype(jnp.int32)
    valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, mask, cache.length, axis=1)
    new = cache.replace(valid=valid, pos=cache.pos + jnp.sum(mask, axis=1, dtype=jnp.int32),
                        length=cache.length + mask.shape[1])
    return positions, valid, new

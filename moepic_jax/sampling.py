"""Token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions of an explicit PRNG key.

Semantics follow transformers' `TemperatureLogitsWarper`, `TopKLogitsWarper`, `TopPLogitsWarper`
(generation/logits_process.py): temperature first, then top-k, then top-p keeping the smallest set
whose probability reaches `top_p` (the most likely token is always kept).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    """Raise ValueError for arguments that cannot define a distribution."""
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")


@functools.partial(jax.jit, static_argnames=("top_k", "use_top_p"))
def sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_k: int, top_p: jax.Array,
           use_top_p: bool = True) -> jax.Array:
    """Draw one token per row.

    Args:
      logits: [B, V] float32; key: a PRNG key; temperature: [] > 0; top_k: static, 0 = off; top_p: [] in (0, 1].
      use_top_p: static; False skips the nucleus filter (and its sort over the vocabulary) when top_p == 1.
    Returns:
      [B] int32 token ids.
    """
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if not use_top_p:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep_sorted = before < top_p
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.jit
def greedy(logits: jax.Array) -> jax.Array:
    """[B, V] -> [B] int32 argmax."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

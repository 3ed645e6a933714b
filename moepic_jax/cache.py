"""Device side: per-layer slots of top segments, the slot map, and replacement rules as pure JAX functions.

State of one MoE layer (shapes fixed by the plan, so a different occupant never recompiles):
  tops:     [N, s, 3, D]  top segments (neurons [0, s)) of the cached experts
  slot_of:  [E] int32     slot holding expert e, or -1
  owner:    [N] int32     expert held by each slot, or -1
  last_use: [N] int32     step of the last use of each slot (LRU)

A routed expert is a *full hit* (cached and s == F), a *top-only hit* (cached, s < F: the bottom is
copied) or a *miss* (everything copied). Rules (DESIGN.md, Policies):
  static: the plan's hot set, never replaced (`static`, `moepic`);
  lru:    admit every miss, evict the least recently used slot (`lru`; Mixtral-offloading's rule).
Each rule is `(state, routed experts, their assembled buffers, step) -> state`, testable on a
scripted trace without a model (tests/test_cache.py).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

RULES = ("static", "lru")


@flax.struct.dataclass
class LayerCache:
    tops: jax.Array  # [N, s, 3, D]
    slot_of: jax.Array  # [E] int32
    owner: jax.Array  # [N] int32
    last_use: jax.Array  # [N] int32


def init_layer_cache(tops: jax.Array, cached: list[int] | tuple[int, ...], n_experts: int) -> LayerCache:
    """A cache whose slot i holds expert `cached[i]` (tops already filled by the caller)."""
    n = tops.shape[0]
    owner = np.full((n,), -1, np.int32)
    owner[: len(cached)] = cached
    slot_of = np.full((n_experts,), -1, np.int32)
    for i, e in enumerate(cached):
        slot_of[e] = i
    return LayerCache(tops=tops, slot_of=jnp.asarray(slot_of), owner=jnp.asarray(owner),
                      last_use=jnp.zeros((n,), jnp.int32))


def classify(cache: LayerCache, experts: jax.Array, split: int, d_ff: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hit class of routed experts. experts: [...] int32 (-1 = none). Returns bool masks (full, top_only, miss)."""
    valid = experts >= 0
    if cache.tops.shape[0] == 0 or split == 0:
        cached = jnp.zeros(experts.shape, bool)
    else:
        cached = (cache.slot_of[jnp.maximum(experts, 0)] >= 0) & valid
    full = cached & (split == d_ff)
    return full, cached & (split < d_ff), valid & ~cached


def lru_update(cache: LayerCache, experts: jax.Array, buffers: jax.Array, step: jax.Array) -> LayerCache:
    """LRU admission of the experts used at `step`, in order.

    Args:
      experts: [U] int32 distinct experts used this step (-1 = padding); buffers: [U, >=s, 3, D] their
        assembled weights on the device (the first s rows are what a slot keeps).
    A hit refreshes its slot's last use; a miss takes the least recently used slot (empty slots first,
    lowest slot among them) and evicts its owner. Within a step the hits (against the cache as the step began)
    are taken first, then the misses, each in their order in `experts` (time stamp step * E + position), so a
    miss never evicts an expert the same step uses; the rule is exact LRU over that sequence of uses. The slot
    bookkeeping ([E] and [N] int32 arrays) runs use by use; the tops are then written by one scatter of the
    admitted experts only (a write per use would rewrite every hit's slot, and XLA may copy the whole cache
    for each write that is not the last use of the old array).
    """
    n, s = cache.tops.shape[0], cache.tops.shape[1]
    if n == 0 or s == 0:
        return cache
    U, E = experts.shape[0], cache.slot_of.shape[0]
    slot_of, owner, last_use = cache.slot_of, cache.owner, cache.last_use
    hit0 = (experts >= 0) & (slot_of[jnp.maximum(experts, 0)] >= 0)
    order = jnp.argsort(~hit0, stable=True)  # hits first
    targets, admits = [], []
    for u in range(U):
        e = experts[order[u]]
        stamp = step * E + u + 1  # stride E >= U whatever the batch size, so stamps only grow
        valid = e >= 0
        slot = slot_of[jnp.maximum(e, 0)]
        hit = valid & (slot >= 0)
        victim = jnp.argmin(last_use).astype(jnp.int32)
        target = jnp.where(hit, slot, victim)
        admit = valid & ~hit
        old = owner[target]
        slot_of = jnp.where(admit & (old >= 0), slot_of.at[jnp.maximum(old, 0)].set(-1), slot_of)
        slot_of = jnp.where(admit, slot_of.at[jnp.maximum(e, 0)].set(target), slot_of)
        owner = jnp.where(admit, owner.at[target].set(e), owner)
        last_use = jnp.where(valid, last_use.at[target].set(stamp), last_use)
        targets.append(target)
        admits.append(admit)
    targets, admits = jnp.stack(targets), jnp.stack(admits)
    # An admission evicted again later in the same step (more misses than slots) is not written; the remaining
    # targets are distinct, and the rows not written get distinct out-of-bounds indices (dropped).
    later = jnp.triu(jnp.ones((U, U), bool), k=1)
    overwritten = jnp.any(later & admits[None, :] & (targets[None, :] == targets[:, None]), axis=1)
    idx = jnp.where(admits & ~overwritten, targets, n + jnp.arange(U))
    idx = jnp.zeros((U,), idx.dtype).at[order].set(idx)  # back to the order of `buffers` (no copy of the buffers)
    tops = cache.tops.at[idx].set(buffers[:, :s].astype(cache.tops.dtype), mode="drop", unique_indices=True)
    return LayerCache(tops=tops, slot_of=slot_of, owner=owner, last_use=last_use)


def update(rule: str, cache: LayerCache, experts: jax.Array, buffers: jax.Array, step: jax.Array) -> LayerCache:
    """Apply replacement rule `rule` ("static" keeps the plan's hot set; "lru")."""
    if rule == "static":
        return cache
    if rule == "lru":
        return lru_update(cache, experts, buffers, step)
    raise ValueError(f"unknown replacement rule {rule!r}; choose one of {RULES}")

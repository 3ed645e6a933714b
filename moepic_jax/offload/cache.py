"""Device side: per-layer slots of top segments, the slot map, and replacement rules as pure JAX functions.

State of one MoE layer (shapes fixed by the plan, so a different occupant never recompiles):
  tops:     [N, s, 3, D]  top segments (neurons [0, s)) of the cached experts ([N, s, 3, W] uint8 packed rows
                          when the experts are quantized, `model/quant.py`)
  slot_of:  [E] int32     slot holding expert e, or -1
  owner:    [N] int32     expert held by each slot, or -1
  last_use: [N] int32     step of the last use of each slot (LRU)
  score:    [E] float32   decayed use count of each expert (the frequency rule)

A routed expert is a *full hit* (cached and s == F), a *top-only hit* (cached, s < F: the bottom is
copied) or a *miss* (everything copied). Rules (DESIGN.md, Policies):
  static: the plan's hot set, never replaced (`static`; `ondemand` has no slots);
  lru:    admit every miss, evict the least recently used slot (`lru`; Mixtral-offloading's rule);
  freq:   a decayed use count per expert; a miss takes the slot of the coldest expert not used this step, only if
          it is hotter than that expert (TinyLFU's admission filter over a sliding frequency) (`moepic`).
Each rule is `(state, routed experts, their assembled buffers, step) -> state` (`update`), testable on a
scripted trace without a model (tests/test_cache.py).

Why `freq` for `moepic` (kept because it measured better): replayed on the trained embedded
model's routing of held-out text, at 10 / 25 / 50 % of the experts it finds 28.0 / 47.5 / 73.5 % of the routed
experts in the cache, LRU 22.4 / 40.8 / 67.6 %, the static hot set 16.9 / 29.3 / 54.6 %
(benchmarks/experiments/sim_replacement.py; decay 0.9-0.99 all within 1.5 points). On random weights, which route
by prompt, it matches or beats LRU. On the H200 (Qwen3-30B-A3B shapes, 24 layers, 25 %) `moepic` decoded at 17.0 ms per token with it against 33.6 ms with the
static hot set (96.3 % against 26.3 % hits; benchmarks/results/archive/probe_step_qwen3_l24_freq.md).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

RULES = ("static", "lru", "freq")
ADMITTING_RULES = ("lru", "freq")  # the rules that write slots during decode (in the copy step)
FREQ_DECAY = 0.95  # the frequency rule's scores are multiplied by this every decode step


@flax.struct.dataclass
class LayerCache:
    tops: jax.Array  # [N, s, 3, D]
    slot_of: jax.Array  # [E] int32
    owner: jax.Array  # [N] int32
    last_use: jax.Array  # [N] int32
    score: jax.Array  # [E] float32


def init_layer_cache(tops: jax.Array, cached: list[int] | tuple[int, ...], n_experts: int) -> LayerCache:
    """A cache whose slot i holds expert `cached[i]` (tops already filled by the caller)."""
    n = tops.shape[0]
    owner = np.full((n,), -1, np.int32)
    owner[: len(cached)] = cached
    slot_of = np.full((n_experts,), -1, np.int32)
    for i, e in enumerate(cached):
        slot_of[e] = i
    return LayerCache(tops=tops, slot_of=jnp.asarray(slot_of), owner=jnp.asarray(owner),
                      last_use=jnp.zeros((n,), jnp.int32), score=jnp.zeros((n_experts,), jnp.float32))


def lookup(cache: LayerCache, experts: jax.Array, split: int) -> tuple[jax.Array, jax.Array]:
    """Where routed experts sit. experts: [...] int32 (-1 = none); split: the layer's plan split s.

    Returns (slot [...] int32: the slot holding the expert's top, -1 when not cached; cached [...] bool). An empty
    cache (no slots, or s == 0) caches nothing.
    """
    if cache.tops.shape[0] == 0 or split == 0:
        return jnp.full(experts.shape, -1, jnp.int32), jnp.zeros(experts.shape, bool)
    slot = cache.slot_of[jnp.maximum(experts, 0)]
    return slot, (slot >= 0) & (experts >= 0)


def classify(cache: LayerCache, experts: jax.Array, split: int, d_ff: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Hit class of routed experts. experts: [...] int32 (-1 = none). Returns bool masks (full, top_only, miss)."""
    _, cached = lookup(cache, experts, split)
    full = cached & (split == d_ff)
    return full, cached & (split < d_ff), (experts >= 0) & ~cached


def lru_slots(cache: LayerCache, experts: jax.Array, step: jax.Array) -> tuple[LayerCache, jax.Array]:
    """LRU admission of the experts [U] used at `step`, without the write of the rows: the slot map, owners and
    last uses after the step, and the slot each one is admitted to ([U] int32; distinct values >= N for those not
    written). The engine writes each admitted expert's rows where its copy arrives (`copy_step.copy_step`), so
    that no [U, s, 3, D] buffer of rows to admit is assembled. Requires a cache with slots (N > 0, s > 0).

    A hit refreshes its slot's last use; a miss takes the least recently used slot (empty slots first, lowest slot
    among them) and evicts its owner. Within a step the hits (against the cache as the step began) are used first,
    then the misses, each in their order in `experts` (time stamp step * E + use position + 1), so a miss never
    evicts an expert the same step uses while an older slot is left; the rule is exact LRU over that sequence of
    uses (tests/test_cache.py replays traces against an OrderedDict).

    The sequence is applied in one vectorised update, not use by use: on the GPU every small op of a per-use loop is
    a kernel launch, which made LRU's step slower than the static rule's at equal bytes (benchmarks/results/archive, the
    LRU benchmark rows). After the hits are refreshed, the i-th miss takes the i-th oldest slot (the slots sorted by
    last use, stable, so empty slots come first, lowest first); with more misses than slots the order wraps around,
    and an
    admission that a later miss of the same step overwrites is not written."""
    n = cache.tops.shape[0]
    E = cache.slot_of.shape[0]
    i32 = jnp.int32
    valid = experts >= 0
    slot = cache.slot_of[jnp.maximum(experts, 0)]
    hit = valid & (slot >= 0)
    miss = valid & ~hit
    n_hit, n_miss = jnp.sum(hit, dtype=i32), jnp.sum(miss, dtype=i32)
    rank = jnp.cumsum(miss, dtype=i32) - 1  # a miss's position among the step's misses
    pos = jnp.where(hit, jnp.cumsum(hit, dtype=i32) - 1, n_hit + rank)  # use position: hits first
    stamp = step * E + pos + 1  # stride E >= U whatever the batch size, so stamps only grow
    last_use = cache.last_use.at[jnp.where(hit, slot, n)].set(stamp, mode="drop")
    oldest = jnp.argsort(last_use, stable=True).astype(i32)  # [n] victims in order
    target = oldest[jnp.maximum(rank, 0) % n]
    final = miss & (rank + n >= n_miss)  # not overwritten by a later miss of this step (rank + n)
    # The owners of the slots taken this step are evicted (at most min(n_miss, n) slots, each once).
    taken = jnp.arange(n) < jnp.minimum(n_miss, n)
    old = cache.owner[oldest]
    slot_of = cache.slot_of.at[jnp.where(taken & (old >= 0), old, E)].set(-1, mode="drop")
    slot_of = slot_of.at[jnp.where(final, experts, E)].set(target, mode="drop")
    idx = jnp.where(final, target, n)
    owner = cache.owner.at[idx].set(experts, mode="drop")
    last_use = last_use.at[idx].set(stamp, mode="drop")
    # The finals' targets are distinct (their ranks are n_miss - n .. n_miss - 1 at most); the rows not written
    # get distinct out-of-bounds indices (dropped).
    rows = jnp.where(final, target, n + jnp.arange(experts.shape[0]))
    return cache.replace(slot_of=slot_of, owner=owner, last_use=last_use), rows


def freq_slots(cache: LayerCache, experts: jax.Array) -> tuple[LayerCache, jax.Array]:
    """The frequency rule's admission of the experts [U] used this step (same contract as `lru_slots`).

    Every score is multiplied by FREQ_DECAY, then each used expert's score grows by 1. The misses, hottest first
    (ties: their order in `experts`), are paired with the slots no hit of this step uses, coldest owner first (empty
    slots first; ties: lowest slot). The i-th miss takes the i-th slot while it is hotter than that slot's owner;
    both lists are sorted, so the admitted misses are a prefix. One vectorised update, as in `lru_slots`.
    """
    n, U = cache.tops.shape[0], experts.shape[0]
    E = cache.slot_of.shape[0]
    valid = experts >= 0
    e0 = jnp.maximum(experts, 0)
    score = (cache.score * jnp.float32(FREQ_DECAY)).at[jnp.where(valid, experts, E)].add(1.0, mode="drop")
    used_score = score[e0]  # [U]
    slot = cache.slot_of[e0]
    hit = valid & (slot >= 0)
    miss = valid & ~hit
    used = jnp.zeros((n,), bool).at[jnp.where(hit, slot, n)].set(True, mode="drop")
    owner_score = jnp.where(cache.owner >= 0, score[jnp.maximum(cache.owner, 0)], -1.0)
    m = min(U, n)
    mi = jnp.argsort(jnp.where(miss, -used_score, jnp.inf), stable=True)[:m].astype(jnp.int32)  # hottest misses
    vi = jnp.argsort(jnp.where(used, jnp.inf, owner_score), stable=True)[:m].astype(jnp.int32)  # coldest free slots
    ok = miss[mi] & ~used[vi] & (used_score[mi] > owner_score[vi])
    ok = jnp.cumprod(ok.astype(jnp.int32)).astype(bool)  # a prefix (both lists sorted); cumprod guards ties
    old = cache.owner[vi]
    slot_of = cache.slot_of.at[jnp.where(ok & (old >= 0), old, E)].set(-1, mode="drop")
    slot_of = slot_of.at[jnp.where(ok, experts[mi], E)].set(vi, mode="drop")
    owner = cache.owner.at[jnp.where(ok, vi, n)].set(experts[mi], mode="drop")
    rows = (n + jnp.arange(U, dtype=jnp.int32)).at[mi].set(jnp.where(ok, vi, n + mi))
    return cache.replace(slot_of=slot_of, owner=owner, score=score), rows


def update(rule: str, cache: LayerCache, experts: jax.Array, buffers: jax.Array, step: jax.Array) -> LayerCache:
    """Apply replacement rule `rule` to the experts used at `step` (the rule's whole form; the decode step uses
    `admit_slots` and writes each admitted expert's rows where its copy lands).

    Args:
      experts: [U] int32 distinct experts used this step (-1 = padding); buffers: [U, >=s, 3, D] the rows to admit
        (the first s rows are what a slot keeps; only the misses' rows are read).
    Raises:
      ValueError: an unknown rule.
    """
    if rule not in RULES:
        raise ValueError(f"unknown replacement rule {rule!r}; choose one of {RULES}")
    n, s = cache.tops.shape[0], cache.tops.shape[1]
    if rule == "static" or n == 0 or s == 0:
        return cache
    cache, rows = admit_slots(rule, cache, experts, step)
    return cache.replace(tops=write_rows(cache.tops, rows, buffers[:, :s]))


def write_rows(tops: jax.Array, slots: jax.Array, rows: jax.Array) -> jax.Array:
    """`tops` [N, s, 3, W] with `rows` [U, s, 3, W] written at the distinct `slots` [U] (a slot >= N is dropped).

    On the CPU backend a 16-bit float cache is written with one dynamic-update-slice per row instead of a scatter:
    XLA:CPU has no bfloat16 scatter and widens the whole cache to float32 and back around it, several passes over
    the cache per layer and step, which made the admitting policies' decode 4-8x slower as the budget grew. It
    still widens the cache once around the updates (64 slots of 256 x 3 x 256: 3.4 ms against 18.8 for the
    scatter); an integer view does not help, its bitcasts are copies there. The GPU scatters, in place.
    """
    rows = rows.astype(tops.dtype)
    if jax.default_backend() != "cpu" or tops.dtype.itemsize != 2:
        return tops.at[slots].set(rows, mode="drop", unique_indices=True)
    n = tops.shape[0]
    for u in range(slots.shape[0]):  # U is static and small (the layer's distinct routed experts)
        at = jnp.minimum(slots[u], n - 1)
        row = jnp.where(slots[u] < n, rows[u], jax.lax.dynamic_index_in_dim(tops, at, keepdims=False))
        tops = jax.lax.dynamic_update_index_in_dim(tops, row, at, 0)
    return tops


def admit_slots(rule: str, cache: LayerCache, experts: jax.Array, step: jax.Array) -> tuple[LayerCache, jax.Array]:
    """The state after the step and the slot each of `experts` [U] is admitted to ([U] int32; distinct values >= N
    for those not written), under "lru" (`lru_slots`) or "freq" (`freq_slots`)."""
    if rule == "lru":
        return lru_slots(cache, experts, step)
    if rule == "freq":
        return freq_slots(cache, experts)
    raise ValueError(f"rule {rule!r} admits nothing; admitting rules: {', '.join(ADMITTING_RULES)}")

"""One layer's copy step: bring routed (or predicted) experts to the device and hand each to a consumer.

Copies are `jax.device_put(lax.dynamic_slice(host_stack, ...), Space.Device)` with a traced expert id: only that
slice moves (JAX_NOTES.md §2b). A needed expert costs at most one copy (the planner's cost model): a miss is copied
whole, a cached expert's top rows [0, s) come from its slot and, when s < F, its bottom rows [s, F) are copied.

How many copies a step makes depends on the data, so it takes a conditional, and on the GPU every conditional costs
a host round trip (~50 us per `lax.cond` on the H200, benchmarks/results/archive/probe_cond_*.json): experts are sorted
so that the ones not copied come first, then top-only hits, then misses, and one `lax.switch` per group of
COPY_GROUP experts picks the counts for that group. Every read of a slot therefore comes before any admission writes
one. The consumer (`emit`) runs inside the branch, so a caller that only needs each expert's output never
materialises the [U, F, 3, D] weights.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax.config import MoEConfig
from moepic_jax.offload import cache as C
from moepic_jax.offload.placement import Placement

COPY_GROUP = 4  # experts per lax.switch in `copy_step`: 5 branches (15 with bottoms), at most 20 copies per group
# Up to this many groups the switches are unrolled; beyond, one switch runs in a `lax.scan` over the groups. Unrolled,
# every branch computes its experts, so the program grows as (groups x branches x COPY_GROUP) FFNs: 235 s to compile
# Qwen1.5-MoE lru at batch 4 (4 groups) on the H200, 67 s with the loop at the same TPOT (55.1 vs 54.5 ms,
# benchmarks/results/archive/bench_policies_qwen15_2026-11-30a.json); Qwen3-30B-A3B (top-8, 2 groups, 48 layers)
# compiled for over 250 s unrolled.
COPY_UNROLL_GROUPS = 1


@dataclasses.dataclass(frozen=True, eq=False)
class StepSpec:
    """What the offloaded steps read that never changes while they run: the model's shapes, the plan's splits (one
    per layer), the policy's cache rule and prediction, and the devices."""

    cfg: MoEConfig
    dtype: Any  # the weights' jnp.dtype
    splits: tuple[int, ...]  # [n_layers] the plan's split s_l (0: nothing cached)
    rule: str  # the cache's replacement rule (`cache.RULES`)
    n_predicted: int  # k': experts predicted per token for the next layer
    prefetch: bool  # the decode step predicts and prefetches
    place: Placement
    direct: bool = False  # decode copies by DMA on a private stream (`transfer`), not in conditionals

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored neuron of one expert (its gate column, up column and down row; packed when the
        experts are quantized)."""
        return self.cfg.expert_row_bytes(jnp.dtype(self.dtype).itemsize)

    @property
    def store_dtype(self):
        """dtype of the expert stacks, copies and cache slots: the weights', or uint8 for quantized experts."""
        return self.cfg.expert_store_dtype(self.dtype)

    @property
    def admits(self) -> bool:
        """Whether the rule writes slots during decode (`cache.ADMITTING_RULES`), in the copy step."""
        return self.rule in C.ADMITTING_RULES


class CopyResult(NamedTuple):
    """What a copy step returns. ids and everything per expert are in the step's order (`order` permutes the input)."""

    ids: jax.Array  # [U] int32 the experts, permuted (-1 = padding)
    order: jax.Array  # [U] int32 the permutation of the input ids
    outputs: Any  # emit's results stacked [U, ...]
    h2d_bytes: jax.Array  # [] float32 bytes copied
    cache: C.LayerCache  # the cache after the step (slots and rule state; unchanged without admission)
    admitted: jax.Array  # [U] int32 the slot each permuted id was admitted to (>= the slot count: not admitted)


def fetch_rows(stack: jax.Array, e: jax.Array, start: int, size: int) -> jax.Array:
    """Copy rows [start, start+size) of expert `e` from a pinned_host stack [E, F, 3, D] to the device.

    e is a traced int32; the dynamic slice feeds `device_put` directly, so only that slice moves (JAX_NOTES.md
    §2b). On the H200 (jax 0.11.2) XLA runs it as one kernel that reads the pinned host memory (48.9-50.0 GB/s),
    not as a DMA on a copy engine (benchmarks/results/archive/probe_step_*.json). Returns [size, 3, D] on the device.
    """
    D = stack.shape[-1]
    zero = jnp.zeros((), jnp.int32)
    sl = jax.lax.dynamic_slice(stack, (jnp.maximum(e, 0), jnp.int32(start), zero, zero), (1, size, 3, D))
    return jax.device_put(sl, jax.memory.Space.Device)[0]


def copy_step(spec: StepSpec, split: int, stack: jax.Array, cache: C.LayerCache, ids: jax.Array, need: jax.Array,
              emit, every: bool = False, admit_step: jax.Array | None = None) -> CopyResult:
    """One layer's data-dependent copy step: bring experts `ids` to the device and hand each one to `emit`.

    Args:
      ids: [U] int32 distinct experts (-1 = padding); need: [U] bool, those that must be assembled.
      split: the layer's plan split s.
      emit: `emit(kind, buffer, mask)` maps one expert to a pytree of fixed shape: kind "whole" (copied), "bottom"
        (slot top + copied bottom), or "rest" (not copied: buffer = its slot's top when s == F, valid where the
        traced `mask` is true; None when s < F or nothing is cached).
      every: static, True when every id is known to be valid and needed (batch 1, nothing prefetched).
      admit_step: the decode step (int32) for a layer whose rule admits (lru, freq). The slots are chosen by
        `cache.admit_slots` over the permuted ids; each group's switch returns the first s rows of its whole
        copies, written into their slots right after the switch (outside it: a write inside a branch made XLA copy
        the whole cache in every branch), so that no buffer of every layer's rows to admit is assembled.
    Returns:
      `CopyResult`.
    """
    cfg = spec.cfg
    F, D = cfg.d_ff, cfg.expert_row_width
    U = ids.shape[0]
    s = split if cache.tops.shape[0] > 0 else 0
    need = need & (ids >= 0)
    slot, cached = C.lookup(cache, ids, s)
    miss, top_hit = need & ~cached, need & cached & (s < F)
    # The rest first, then top-only hits, then misses: bottom copies and whole copies are consecutive runs, and
    # the slots are read before an admission overwrites one.
    order = jnp.argsort(2 * miss.astype(jnp.int32) + top_hit.astype(jnp.int32), stable=True)
    sids, slots, cached = ids[order], jnp.maximum(slot[order], 0), cached[order]
    n_miss, n_top = jnp.sum(miss, dtype=jnp.int32), jnp.sum(top_hit, dtype=jnp.int32)
    nbytes = (n_miss * F + n_top * (F - s)).astype(jnp.float32) * spec.row_bytes
    n_slots = cache.tops.shape[0]
    admit = admit_step is not None and s > 0
    if admit:
        with jax.named_scope("cache_admission"):
            cache, target = C.admit_slots(spec.rule, cache, sids, admit_step)
    else:
        target = jnp.full((U,), n_slots, jnp.int32)
    r = cache.tops.shape[1]

    def expert(kind, e, slot, is_cached, tops):  # (emit's result, the rows to admit [r, 3, D] when admitting)
        rows = jnp.zeros((r if admit else 0, 3, D), spec.store_dtype)
        if kind == "whole":
            buf = fetch_rows(stack, e, 0, F)
            return emit(kind, buf, None), (buf[:r] if admit else rows)
        if kind == "bottom":
            return emit(kind, jnp.concatenate([tops[slot], fetch_rows(stack, e, s, F - s)]), None), rows
        return (emit(kind, tops[slot], is_cached) if s == F else emit(kind, None, None)), rows

    def stacked(kinds, e, slot, is_cached, tops):  # one group: e, slot, is_cached [m]
        outs = [expert(k, e[i], slot[i], is_cached[i], tops) for i, k in enumerate(kinds)]
        return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

    def write(tops, rows, t):  # the group's admissions, outside the switch: XLA updates a carried buffer in place
        return C.write_rows(tops, t, rows) if admit else tops

    tops = cache.tops
    if every and s == 0:
        res, _ = stacked(["whole"] * U, sids, slots, cached, tops)
        return CopyResult(sids, order, res, nbytes, cache, target)
    has_bot = 0 < s < F

    def group(m, n_rest, g0, e, slot, is_cached, t, tops):  # the switch over one group's (rest, bottom) counts
        pairs = [(a, b) for a in range(m + 1) for b in (range(a, m + 1) if has_bot else (a,))]
        table = np.zeros((m + 1, m + 1), np.int32)
        for i, (a, b) in enumerate(pairs):
            table[a, b] = i
        branches = [functools.partial(stacked, ["rest"] * a + ["bottom"] * (b - a) + ["whole"] * (m - b))
                    for a, b in pairs]
        a = jnp.clip(n_rest - g0, 0, m)
        b = jnp.clip(n_rest + n_top - g0, 0, m) if has_bot else a
        res, rows = jax.lax.switch(jnp.asarray(table)[a, b], branches, e, slot, is_cached, tops)
        return res, write(tops, rows, t)

    n_groups = -(-U // COPY_GROUP)
    n_rest = U - n_miss - n_top
    if n_groups <= COPY_UNROLL_GROUPS:
        groups = []
        for g0 in range(0, U, COPY_GROUP):
            sl = slice(g0, g0 + COPY_GROUP)
            res, tops = group(min(COPY_GROUP, U - g0), n_rest, g0, sids[sl], slots[sl], cached[sl], target[sl], tops)
            groups.append(res)
        res = jax.tree.map(lambda *xs: jnp.concatenate(xs), *groups)
        return CopyResult(sids, order, res, nbytes, cache.replace(tops=tops), target)
    # Several groups (batch > 1, or top-k > COPY_GROUP): one switch in a loop, so the program's size does not grow
    # with the batch. Padding (-1, not cached) goes in front, in the "rest" part of the first group, and emits
    # zeros; the misses stay last.
    pad = n_groups * COPY_GROUP - U

    def padded(x, value):
        return jnp.pad(x, (pad, 0), constant_values=value).reshape(n_groups, COPY_GROUP)

    g0s = jnp.arange(n_groups, dtype=jnp.int32) * COPY_GROUP
    xs = (g0s, padded(sids, -1), padded(slots, 0), padded(cached, False), padded(target, n_slots))

    def body(carry, x):  # the group's results written into the carried buffer, not stacked as scan outputs
        buf, tops = carry
        out, tops = group(COPY_GROUP, pad + n_rest, *x, tops)
        return (jax.tree.map(lambda b, o: jax.lax.dynamic_update_index_in_dim(b, o, x[0] // COPY_GROUP, 0),
                             buf, out), tops), None

    # The loop's result buffer is filled from this layer's ids (the loop overwrites every value). A constant
    # buffer has no inputs, so XLA allocated every layer's at the start of the step and kept them all alive
    # (every layer's admitted rows): for Qwen3-30B-A3B lru on the H200, 3.45 GiB at 48 layers and
    # 1.76 GiB at 24 (benchmarks/results/archive/probe_step_qwen3_l24.json), against 0.14 GiB with the fill
    # (probe_step_qwen3_l24_tied.json). Its shapes are one copied expert's results (every kind emits the same
    # shapes), traced once rather than the whole switch again.
    one = jax.eval_shape(lambda e, sl, c: expert("whole", e, sl, c, cache.tops)[0], sids[0], slots[0], cached[0])
    fill = ids[0].astype(jnp.float32) * 0.0
    buf = jax.tree.map(lambda a: jnp.broadcast_to(fill.astype(a.dtype), (n_groups, COPY_GROUP) + a.shape), one)
    res, tops = jax.lax.scan(body, (buf, tops), xs)[0]
    res = jax.tree.map(lambda x: x.reshape((n_groups * COPY_GROUP,) + x.shape[2:])[pad:], res)
    return CopyResult(sids, order, res, nbytes, cache.replace(tops=tops), target)


def assemble(spec: StepSpec, split: int, stack: jax.Array, cache: C.LayerCache, ids: jax.Array, need: jax.Array,
             every: bool = False) -> CopyResult:
    """The weights of experts `ids` on the device (`copy_step`; for a prefetch, used a layer later).

    Returns a `CopyResult` whose outputs are the buffers [U, F, 3, D] (zeros where not needed and not cached whole).
    """
    shape = (spec.cfg.d_ff, 3, spec.cfg.expert_row_width)

    def emit(kind, buf, mask):
        if buf is None:
            return jnp.zeros(shape, spec.store_dtype)
        return buf if mask is None else jnp.where(mask, buf, jnp.zeros((), buf.dtype))

    return copy_step(spec, split, stack, cache, ids, need, emit, every)


def expert_outputs(spec: StepSpec, x: jax.Array, split: int, stack: jax.Array, cache: C.LayerCache, ids: jax.Array,
                   need: jax.Array, every: bool = False, admit_step: jax.Array | None = None) -> CopyResult:
    """Outputs of experts `ids` for tokens x [B, D], each computed where its weights arrive (`copy_step`).

    Returns a `CopyResult` whose outputs are [U, B, D] float32 (zeros where not needed and not cached whole);
    admit_step as in `copy_step`.
    """
    B, D = x.shape

    def emit(kind, buf, mask):
        if buf is None:
            return jnp.zeros((B, D), jnp.float32)
        with jax.named_scope("ffn"):
            out = M.segment_ffn(x, buf, spec.cfg.expert_quant).astype(jnp.float32)
        return out if mask is None else jnp.where(mask, out, 0.0)

    return copy_step(spec, split, stack, cache, ids, need, emit, every, admit_step)

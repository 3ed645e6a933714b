"""The offloaded decode step: one token for every row, every layer, in one compiled program.

Data flow per layer l (DESIGN.md; JAX_NOTES.md §2b), all on the device, through `model.decoder_layer`:

  attention(l) -> h_mid
  predictor: layer l+1's post-attention RMSNorm + router on h_mid -> top-k' experts of l+1
  router(l) -> routed experts (distinct: U = min(B*K, E) slots, padded with -1)
  copies: what the routed experts lack on the device (a miss: all rows; a top-only hit: its bottom rows)
  y = sum over routed experts of weight * SwiGLU(x, buffer) (+ shared expert)
  cache rule update (admission for `lru` and `moepic`'s frequency rule), counters (hits, bytes, recall)

Two ways to make the copies, the same results (tests):

- **Direct copies** (`moe_decode_direct`, the default on one GPU): the step computes a copy plan per layer
  (`copy_plan`: per expert, which rows come from the host stack and which from its cache slot) and one
  `transfer.start` call queues them, with the next layer's predicted experts (the prefetch), on a private stream
  as DMA (a worker thread reads the plan and queues the copies); the step then waits on the device only
  (`transfer.wait`). A full hit is not copied: its rows come from its cache slot. No conditional, and the host
  does not wait for the GPU: it queues the layers ahead while the copies run. The prefetch is waited for a layer
  later, so it streams in while this layer computes (MoEpic's overlap). On an H100 it decoded Qwen1.5-MoE at 25 %
  under calibrated routing 7-13 % faster than the conditional step
  (docs/notes/2026-12-07-async-direct-copies.md).
- **The conditional copy step** (`moe_decode` + `copy_step.py`; the CPU and several devices): copies made inside
  `lax.switch` branches by XLA (zero-copy kernels on the compute stream); on a GPU each conditional makes the host
  wait for its branch index.

Every size comes from the plan (slots N_l, split s_l), so changing which expert sits in which slot never
recompiles.

For benchmarks the routing can come from a trace instead of the routers (`RoutingTrace`): recorded routing of a
trained model, or a calibrated synthetic one (benchmarks/routing_traces.py). Then each MoE layer's routed ids and
gate weights, and the predictor's ids, are read from the trace at the decode position; everything else (copies,
cache rules, counters) is the product path. The tokens are then meaningless: only the costs are measured. A replayed
id is tied to the hidden state its router would have read (`after`): otherwise XLA could start every layer's copies
at the top of the step, which no real routing allows (it did: on the CPU the decode step's temporaries then held
every layer's copied experts at once).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax.offload import cache as C
from moepic_jax.offload import transfer
from moepic_jax.offload.copy_step import StepSpec, assemble, expert_outputs

# per layer: routed pairs by hit class, routed pairs that were prefetched, H2D bytes (prefetch included), and the
# prefetched bytes of experts the layer did not route (wasted)
COUNTERS = ("full_hits", "top_hits", "misses", "predicted", "routed", "h2d_bytes", "prefetch_wasted_bytes")


class RoutingTrace(NamedTuple):
    """Routing to replay in the decode step (benchmarks; `routing=` of `make_engine` / `generate`).

    Decode step n (counting from 0 over the engine's life) reads row (n * B + b) mod T for batch row b.
    """

    ids: jax.Array  # [T, L, K] int32 routed expert ids per decode position and layer (-1 in dense layers)
    weights: jax.Array  # [T, L, K] float32 their gate weights
    predicted: jax.Array  # [T, L, K'] int32 the predictor's ids for layer l (-1 at layer 0 and in dense layers)

    @classmethod
    def load(cls, path) -> RoutingTrace:
        """Read a trace file (`benchmarks/routing_traces.py --out`: an .npz with ids, weights, predicted)."""
        with np.load(path) as f:
            missing = {"ids", "weights", "predicted"} - set(f.files)
            if missing:
                raise ValueError(f"routing trace {path} lacks {sorted(missing)}; write it with "
                                 "benchmarks/routing_traces.py --out")
            return cls(np.asarray(f["ids"], np.int32), np.asarray(f["weights"], np.float32),
                       np.asarray(f["predicted"], np.int32))

    def check(self, cfg, n_predicted: int) -> None:
        """Raise ValueError unless the trace fits a model of `cfg` with k' = n_predicted."""
        ids, w, pred = (np.asarray(x) for x in self)
        T, L, K = ids.shape if ids.ndim == 3 else (0, 0, 0)
        if ids.ndim != 3 or (L, K) != (cfg.n_layers, cfg.top_k) or w.shape != ids.shape:
            raise ValueError(f"routing trace ids/weights must be [T, n_layers={cfg.n_layers}, top_k={cfg.top_k}], "
                             f"got {ids.shape} / {w.shape}; write the trace for this model's config")
        if pred.shape != (T, L, n_predicted):
            raise ValueError(f"routing trace predicted must be [T, {L}, n_predicted={n_predicted}], got {pred.shape}")
        moe = np.asarray(cfg.moe_layers)
        if T < 1 or ids.min() < -1 or ids.max() >= cfg.n_experts or (ids[:, moe] < 0).any():
            raise ValueError(f"routing trace ids must be in [0, {cfg.n_experts}) in MoE layers (-1 elsewhere)")
        if any(len(set(r)) < K for r in ids[:, moe].reshape(-1, K).tolist()):
            raise ValueError("routing trace: a token routes to the same expert twice in one layer")
        if not np.isfinite(w).all():
            raise ValueError("routing trace weights must be finite")
        # a layer after an MoE layer's predictor: every slot names an expert (a -1 would be copied as expert 0)
        predicted_layers = [l for l in range(1, L) if moe[l]]
        if pred.min() < -1 or pred.max() >= cfg.n_experts or (pred[:, predicted_layers] < 0).any():
            raise ValueError(f"routing trace predicted ids must be in [0, {cfg.n_experts}) for every MoE layer after "
                             "the first (-1 at layer 0 and in dense layers)")


def trace_rows(trace: RoutingTrace, step, batch: int) -> jax.Array:
    """[B] int32 the trace rows of decode step `step` (1-based, as the engine counts) for every batch row."""
    T = trace.ids.shape[0]
    return ((step - 1) * batch + jnp.arange(batch, dtype=jnp.int32)) % T


def after(ids: jax.Array, h: jax.Array) -> jax.Array:
    """`ids`, made to depend on `h`: a select on a test of h's values that never holds for a finite h, which XLA
    cannot fold away. (An `optimization_barrier` on (ids, h) did not stop the CPU scheduler from starting the
    copies early: 22.4 against 14.5 MB of decode temporaries on the embedded model.)"""
    return jnp.where(jnp.sum(jnp.abs(h.astype(jnp.float32))) > 3e38, 0, ids)


# Read when the direct step is traced. True: the FFNs of what is on the device before a layer's copies land (the
# experts prefetched a layer ago, the shared expert, and with whole-expert slots of unquantized experts a full hit,
# read from its cache slot) run between the copies' start and wait, and their outputs are selected. False
# (default): a full hit's rows are selected into the copies' buffer after the wait, and every FFN follows the wait.
# On an H100 under calibrated routing, 8 layers of `lru` in one process, True took 28 % less time on Qwen3-30B-A3B
# with prefetch, 9 % without, 4 % less on Qwen1.5 without prefetch and 1 % more with it
# (docs/notes/2026-12-07-decode-step-profile.md). At full size (48 layers of Qwen3, another H100) it decoded at 10 %
# as False had, and at 25 % in 45.0 / 48.5 ms (`lru` / `moepic`) where False had taken 36.9-42.0 / 37.7-41.7 ms in
# three earlier runs (docs/notes/2026-12-08-full-size-early-ffns.md): False, the step the README's rows measured,
# stays the default until one machine runs both (benchmarks/experiments/direct/early_late_gpu.sh).
READY_FFNS_DURING_COPIES = False


class Prefetch(NamedTuple):
    """The next layer's predicted experts, assembled on the device a layer ahead."""

    ids: jax.Array  # [P] int32 distinct predicted experts (-1 padded), in assembly order
    buffers: jax.Array  # [P, F, 3, D]
    h2d_bytes: jax.Array  # [P] float32 bytes copied for each


def routed(spec: StepSpec, lp: M.LayerParams, x: jax.Array, traced: tuple[jax.Array, jax.Array] | None):
    """(ids [B, K] int32 global expert ids, weights [B, K]) of layer lp's router on x [B, D], or the routing trace's
    (traced = (ids, weights)); replayed ids become known when the router's would: after x."""
    if traced is not None:
        return after(traced[0], x), traced[1]
    with jax.named_scope("router"):
        return M.route(x, lp.moe.w_router, spec.cfg)


def predicted_ids(spec: StepSpec, lp_next: M.LayerParams, h_mid: jax.Array, P: int,
                  traced: jax.Array | None = None) -> jax.Array:
    """[P] int32 the next layer's experts predicted from the residual stream h_mid [B, D] (this device's, distinct,
    -1 padded). DESIGN.md "Predictor": layer l+1's post-attention RMSNorm and router applied to h_mid, top k' per
    token. traced: [B, k'] the routing trace's predicted ids instead (known after h_mid, like the router's)."""
    if traced is not None:
        pids = after(traced, h_mid)
    else:
        with jax.named_scope("predictor"):
            pids = M.route(M.rms_norm(h_mid, lp_next.mlp_norm, spec.cfg.rms_eps), lp_next.moe.w_router, spec.cfg,
                           spec.n_predicted)[0]
    return spec.place.distinct(spec.place.local(pids), P)


def predict(spec: StepSpec, l_next: int, stack: jax.Array, cache: C.LayerCache, pred: jax.Array,
            batch: int) -> Prefetch:
    """Assemble the predicted experts pred [P] of layer l_next on the device now (the conditional copy step), to be
    used a layer later."""
    with jax.named_scope("prefetch"):
        r = assemble(spec, spec.splits[l_next], stack, cache, pred, pred >= 0,
                     every=batch == 1 and spec.place.mesh is None)
    each = copy_plan(spec, spec.splits[l_next], cache, pred, pred >= 0)[1]  # the bytes the copy step moved, each
    return Prefetch(r.ids, r.outputs, each[r.order])


def moe_decode(spec: StepSpec, l: int, lp: M.LayerParams, stack, x, cache, pred: Prefetch | None, step,
               gids: jax.Array, w: jax.Array):
    """MoE block of layer l for B tokens (x [B, D]) with the conditional copy step (`copy_step`). gids, w: [B, K]
    the routed experts (global ids) and gate weights (`routed`). Returns (y [B, D], cache, counters of l
    {name: [] float32})."""
    cfg, place = spec.cfg, spec.place
    B = x.shape[0]
    ids = place.local(gids)  # this device's experts (-1: another device computes that pair)
    U = min(B * cfg.top_k, place.e_loc)
    uniq = place.distinct(ids, U)
    full, top, miss = C.classify(cache, ids, spec.splits[l], cfg.d_ff)
    predicted = jnp.zeros(ids.shape, bool)
    got = jnp.zeros((U,), bool)
    if pred is not None:
        predicted = jnp.any(ids[..., None] == pred.ids, axis=-1) & (ids >= 0)
        got = jnp.any(uniq[:, None] == pred.ids, axis=-1) & (uniq >= 0)
    # At batch 1 the top-k ids are distinct (no padding); with nothing prefetched, every one is needed.
    with jax.named_scope("copy_step"):
        r = expert_outputs(spec, x, spec.splits[l], stack, cache, uniq, ~got,
                           every=B == 1 and pred is None and place.mesh is None,
                           admit_step=step if spec.admits else None)
    outs, nbytes, new_cache = r.outputs, r.h2d_bytes, r.cache
    if pred is not None:
        nbytes = nbytes + jnp.sum(pred.h2d_bytes)
        j = jnp.argmax(r.ids[:, None] == pred.ids, axis=-1)  # [U] where each prefetched expert sits
        g = got[r.order]
        with jax.named_scope("ffn"):
            pred_outs = jnp.stack([M.segment_ffn(x, pred.buffers[p], cfg.expert_quant).astype(jnp.float32)
                                   for p in range(len(pred.ids))])
        outs = jnp.where(g[:, None, None], pred_outs[j], outs)
        n, rows_kept = new_cache.tops.shape[:2]
        if spec.admits and n and rows_kept:  # a prefetched miss is admitted with its prefetched rows (not copied)
            with jax.named_scope("cache_admission"):
                idx = jnp.where(g, r.admitted, n + jnp.arange(r.admitted.shape[0]))  # distinct; >= n is dropped
                new_cache = new_cache.replace(tops=C.write_rows(new_cache.tops, idx, pred.buffers[j, :rows_kept]))
    y = combine(cfg, ids, w, r.ids, outs)
    y = place.psum(y).astype(x.dtype) + M.shared_expert(x, lp.moe)
    f32 = jnp.float32
    counters = dict(full_hits=jnp.sum(full, dtype=f32), top_hits=jnp.sum(top, dtype=f32),
                    misses=jnp.sum(miss, dtype=f32), predicted=jnp.sum(predicted, dtype=f32),
                    h2d_bytes=nbytes.astype(f32), prefetch_wasted_bytes=wasted(pred, uniq))
    counters = {k: place.psum(v) for k, v in counters.items()}  # over the devices' experts
    counters["routed"] = f32(ids.size)
    return y, new_cache, counters


class InFlight(NamedTuple):
    """The next layer's predicted experts, their copies queued by `transfer.start` (group 1) and not waited for."""

    ids: jax.Array  # [P] int32 distinct predicted experts (-1 padded)
    dst: jax.Array  # [P, F, 3, D] their rows once waited for (`transfer.wait`, group 1 of `tag`)
    h2d_bytes: jax.Array  # [P] float32 bytes copied for each
    tag: int  # the layer whose start queued them
    group: transfer.Group | None = None  # what that start copied from (operands of the wait: kept alive till then)


def copy_plan(spec: StepSpec, split: int, cache: C.LayerCache, ids: jax.Array, need: jax.Array):
    """The copy plan that makes experts `ids` whole on the device (`transfer`): [U, 2, 4] int32, two rows per expert.

    A needed miss: rows [0, F) from the host. A needed top hit (s < F): rows [0, s) from its slot (device to
    device) and rows [s, F) from the host. A full hit (s == F) and what is not needed (padding, or prefetched a
    layer ago): nothing (the step reads a full hit from its slot, `direct_step_rows`).
    Returns (plan, H2D bytes of each [U] float32, miss [U] bool, top_hit [U] bool) with miss/top_hit among the
    needed.
    """
    F = spec.cfg.d_ff
    s = split if cache.tops.shape[0] > 0 else 0
    need = need & (ids >= 0)
    slot, cached = C.lookup(cache, ids, s)
    miss, top_hit = need & ~cached, need & cached & (s < F)
    e = jnp.maximum(ids, 0)
    zero = jnp.zeros_like(e)
    first = jnp.stack([jnp.where(cached, transfer.FROM_CACHE, transfer.FROM_HOST), jnp.where(cached, slot, e), zero,
                       jnp.where(miss | top_hit, jnp.where(cached, s, F), 0)], -1)
    second = jnp.stack([zero, e, zero + s, jnp.where(need & cached, F - s, 0)], -1)
    plan = jnp.stack([first, second], 1).astype(jnp.int32)
    rows = jnp.where(miss, F, 0) + jnp.where(top_hit, F - s, 0)
    return plan, rows.astype(jnp.float32) * spec.row_bytes, miss, top_hit


def moe_decode_direct(spec: StepSpec, l: int, lp: M.LayerParams, x: jax.Array, cache: C.LayerCache, src: jax.Array,
                      ids: jax.Array, w: jax.Array, pred: InFlight | None, nxt: tuple | None, step):
    """MoE block of layer l for B tokens (x [B, D]) with direct copies (`transfer`): no conditional.

    One `transfer.start` queues this layer's copies (group 0) and, when nxt = (layer l+1's src, its cache, its
    predicted ids [P], its split) is given, the next layer's (group 1, waited for a layer later); the program only waits on
    the device. ids, w: [B, K] the routed experts (global ids) and gate weights; pred: what the previous layer
    queued for this one. Returns (y [B, D], cache, counters of l {name: [] float32}, the next layer's `InFlight`).
    """
    cfg, place = spec.cfg, spec.place
    F, B = cfg.d_ff, x.shape[0]
    U = min(B * cfg.top_k, place.e_loc)
    uniq = place.distinct(ids, U)
    full, top, miss_pairs = C.classify(cache, ids, spec.splits[l], F)
    full_u = C.classify(cache, uniq, spec.splits[l], F)[0]
    got = jnp.zeros((U,), bool)
    predicted = jnp.zeros(ids.shape, bool)
    if pred is not None:  # prefetched a layer ago (a full hit is never prefetched: it needs no copy)
        got = jnp.any(uniq[:, None] == pred.ids, axis=-1) & (uniq >= 0) & ~full_u
        predicted = jnp.any(ids[..., None] == pred.ids, axis=-1) & (ids >= 0)
    platform = place.device.platform
    early = READY_FFNS_DURING_COPIES
    # A full hit's FFN from its slot costs one more expert FFN per routed expert (U of them, hits or not). Packed
    # (quantized) experts dequantize in every FFN, while their row select moves a quarter of the bytes: they keep
    # the select (not measured either way).
    from_slot = early and whole_slots(cache, spec.splits[l], F) and cfg.expert_quant is None
    slot = C.lookup(cache, uniq, F)[0] if from_slot else None  # a full hit's slot (full_u: which are full hits)
    ready_arg = (x, None if pred is None else pred.dst)

    def ready_ffns(arg):  # the FFNs whose rows are on the device before this layer's copies land
        xb, pdst = arg  # with `early`, both come through a barrier after this layer's copy start
        hit_outs = pred_outs = pbufs = None
        shared = M.shared_expert(xb, lp.moe)  # it reads no copied rows either
        with jax.named_scope("ffn"):
            if from_slot:
                hit_outs = jnp.stack([M.segment_ffn(xb, cache.tops[jnp.maximum(slot[u], 0)], cfg.expert_quant)
                                      .astype(jnp.float32) for u in range(U)])
            if pred is not None:  # the wait stalls XLA's stream: after the start, not before this layer's compute
                pbufs = transfer.wait(platform, pdst, pred.group, pred.tag, 1)
                pred_outs = jnp.stack([M.segment_ffn(xb, pbufs[p], cfg.expert_quant).astype(jnp.float32)
                                       for p in range(len(pred.ids))])
        return hit_outs, pred_outs, pbufs, shared

    bufs, each, miss, top_hit, flight, ready = direct_step_rows(
        spec, l, spec.splits[l], cache, src, uniq, ~got, nxt, full_rows=not from_slot,
        during=(ready_ffns, ready_arg) if early else None)
    nbytes = jnp.sum(each)
    # The prefetch slots' FFNs and their outputs selected per routed expert. Selecting the prefetched rows instead
    # (each expert computed once) made every FFN wait for a pass over U experts' rows through HBM: Qwen1.5 `moepic`
    # with prefetch at 25 % decoded in 29.0 ms against 25.6 before (two H100s, on which `lru` took 28.3 and 28.7 ms;
    # docs/notes/2026-12-07-copy-kernel.md).
    with jax.named_scope("ffn"):
        outs = jnp.stack([M.segment_ffn(x, bufs[u], cfg.expert_quant).astype(jnp.float32)
                          for u in range(U)])  # [U, B, D]
    hit_outs, pred_outs, pbufs, shared = ready if early else ready_ffns(ready_arg)
    if from_slot:  # a full hit's output, computed from its slot
        outs = jnp.where(full_u[:, None, None], hit_outs, outs)
    rows_kept = cache.tops.shape[1]
    admit_rows = bufs[:, :rows_kept] if spec.admits else None
    if pred is not None:  # a prefetched expert's rows are where its prefetch landed
        nbytes = nbytes + jnp.sum(pred.h2d_bytes)
        j = jnp.argmax(uniq[:, None] == pred.ids, axis=-1)  # [U] where each prefetched expert sits
        outs = jnp.where(got[:, None, None], pred_outs[j], outs)
        if spec.admits:  # a prefetched miss is admitted with its prefetched (top) rows
            admit_rows = jnp.where(got[:, None, None, None], pbufs[j, :rows_kept], admit_rows)
    if spec.admits and cache.tops.shape[0] and rows_kept and spec.splits[l]:
        with jax.named_scope("cache_admission"):
            # the copy step's use order (not copied, top-only hits, misses) is the rule's order of uses
            order = jnp.argsort(2 * miss.astype(jnp.int32) + top_hit.astype(jnp.int32), stable=True)
            cache, target = C.admit_slots(spec.rule, cache, uniq[order], step)
            slots = jnp.zeros_like(target).at[order].set(target)
            cache = cache.replace(tops=C.write_rows(cache.tops, slots, admit_rows))
    y = combine(cfg, ids, w, uniq, outs)
    y = y.astype(x.dtype) + shared
    f32 = jnp.float32
    counters = dict(full_hits=jnp.sum(full, dtype=f32), top_hits=jnp.sum(top, dtype=f32),
                    misses=jnp.sum(miss_pairs, dtype=f32), predicted=jnp.sum(predicted, dtype=f32),
                    h2d_bytes=nbytes.astype(f32), routed=f32(ids.size), prefetch_wasted_bytes=wasted(pred, uniq))
    return y, cache, counters, flight


def direct_step_rows(spec: StepSpec, tag: int, split: int, cache: C.LayerCache, src: jax.Array, ids: jax.Array,
                     need: jax.Array, nxt: tuple | None = None, full_rows: bool = True, during=None):
    """The rows [U, F, 3, W] of experts `ids` [U] where `need` [U] (others undefined), as the direct step has them:
    one `transfer.start` (tagged `tag`) copies the misses and top hits' bottoms (with the next layer's prefetch when
    nxt = (its src, its cache, its predicted ids, its split)), the step waits on the device, and a full hit's rows
    come from its cache slot (no copy through the private stream; full_rows=False: left undefined).
    during = (fn, arg): fn(arg) is computed after the copies start and before the step waits for them (optimization
    barriers order it), so that it overlaps them.
    Returns (rows, H2D bytes of each [U], miss [U], top_hit [U], the next layer's `InFlight` or None, fn(arg) or
    None)."""
    F = spec.cfg.d_ff
    plan, each, miss, top_hit = copy_plan(spec, split, cache, ids, need)
    with jax.named_scope("copy_step"):
        now = transfer.Group(plan, src, cache.tops)
        dst, flight = start_copies(spec, tag, now, nxt)
        ready = None
        if during is not None:
            dst, arg = jax.lax.optimization_barrier((dst, during[1]))
            dst, ready = jax.lax.optimization_barrier((dst, during[0](arg)))
        rows = transfer.wait(spec.place.device.platform, dst, now, tag, 0)
    if full_rows and whole_slots(cache, split, F):
        slot, full = C.lookup(cache, ids, split)
        rows = jnp.where(full[:, None, None, None], cache.tops[jnp.maximum(slot, 0)].astype(rows.dtype), rows)
    return rows, each, miss, top_hit, flight, ready


def whole_slots(cache: C.LayerCache, split: int, d_ff: int) -> bool:
    """Whether the layer's slots hold whole experts (static): then every hit is a full hit."""
    return bool(split == d_ff and cache.tops.shape[0] and cache.tops.shape[1] == d_ff)


def start_copies(spec: StepSpec, l: int, now: transfer.Group | None, nxt: tuple | None):
    """One `transfer.start` at layer l: group 0 = `now` (this layer's plan; None: nothing), group 1 = the next
    layer's predicted experts when nxt = (its src, its cache, its predicted ids [P], its split) is given. Returns (group 0's
    destination, unwaited; the next layer's `InFlight` or None)."""
    empty = jnp.zeros((0, 2, transfer.PLAN_COLS), jnp.int32)
    groups, flight_bytes = [now], None
    if nxt is not None:
        nsrc, ncache, nids, nsplit = nxt
        nplan, flight_bytes, _, _ = copy_plan(spec, nsplit, ncache, nids, nids >= 0)
        groups.append(transfer.Group(nplan, nsrc, ncache.tops))
    if now is None:
        groups[0] = transfer.Group(empty, groups[1].src, groups[1].tops[:0])
    if nxt is None:
        groups.append(transfer.Group(empty, now.src, now.tops[:0]))
    width = spec.row_bytes // (3 * jnp.dtype(spec.store_dtype).itemsize)  # a stored row is [3, width]
    dst, dst_next = transfer.start(spec.place.device.platform, tuple(groups), spec.cfg.d_ff, (3, width),
                                   spec.cfg.n_experts, spec.store_dtype, tag=l)
    return dst, (None if nxt is None else InFlight(nxt[2], dst_next, flight_bytes, l, groups[1]))


def wasted(pred, uniq: jax.Array) -> jax.Array:
    """[] float32 the bytes copied for predicted experts that the layer did not route (0 without a prefetch).
    pred: the `Prefetch` / `InFlight` of this layer; uniq: [U] its routed experts (-1 padded)."""
    if pred is None:
        return jnp.float32(0)
    unused = ~jnp.any(pred.ids[:, None] == uniq[None, :], axis=-1)
    return jnp.sum(jnp.where(unused, pred.h2d_bytes, 0.0)).astype(jnp.float32)


def combine(cfg, ids: jax.Array, w: jax.Array, uniq: jax.Array, outs: jax.Array) -> jax.Array:
    """sum_k w[:, k] * outs[position of ids[:, k] in uniq]: [B, D] float32, summed in routing order (k = 0..K-1)
    exactly as the resident model does, so that bfloat16 results round identically, not just within tolerance.
    ids, w: [B, K]; uniq: [U]; outs: [U, B, D]."""
    B = ids.shape[0]
    rows = jnp.arange(B)
    y = jnp.zeros((B, cfg.d_model), jnp.float32)
    for k in range(cfg.top_k):
        u = jnp.argmax(uniq[None, :] == ids[:, k:k + 1], axis=1)  # [B] position of ids[:, k] in uniq
        y = y + jnp.where(ids[:, k, None] >= 0, w[:, k, None] * outs[u, rows], 0.0)
    return y


def decode_step(spec: StepSpec, resident: M.Params, stacks: tuple, caches: tuple, kv: M.KVCache, tokens, step,
                trace: RoutingTrace | None = None, srcs: jax.Array | None = None):
    """One token for every row.

    Args:
      resident: the parameters on the device (routed experts absent); stacks: [n_layers] pinned_host stacks
        [E, F, 3, D] (None for dense layers); caches: [n_layers] `LayerCache` (None for dense layers);
      kv: the KV cache; tokens: [B] int32; step: [] int32, the decode step's number from 1 (the LRU clock);
      trace: routing to replay instead of the routers' (None: the model's own routing);
      srcs: [n_layers, 2] int32 the stacks' host addresses (`transfer.host_address`; zeros for dense layers),
        read when spec.direct (direct copies, `transfer`) instead of the stacks.
    Returns:
      (logits [B, V] float32, caches, kv, counters {name: [n_layers] float32} for the names in COUNTERS).
    """
    cfg = spec.cfg
    B = tokens.shape[0]
    positions, valid, new_kv = M.cache_positions(kv, jnp.ones((B, 1), bool))
    pos = M.Positions(positions, valid, kv.length)
    h = M.embed(resident, tokens[:, None])
    k, v = kv.k, kv.v
    caches = list(caches)
    cnt = {n: [jnp.zeros((), jnp.float32)] * cfg.n_layers for n in COUNTERS}
    pred = None
    n_pred = min(B * spec.n_predicted, spec.place.e_loc)
    rows = None if trace is None else trace_rows(trace, step, B)
    for l, lp in enumerate(resident.layers):
        nxt = l + 1
        predicts = spec.prefetch and nxt < cfg.n_layers and cfg.moe_layers[nxt]

        def ffn(x, h_mid, l=l, lp=lp, predicts=predicts, nxt=nxt):  # x, h_mid: [B, 1, D]
            pids = predicted_ids(spec, resident.layers[nxt], h_mid[:, 0], n_pred,
                                 None if rows is None else trace.predicted[rows, nxt]) if predicts else None
            if not cfg.moe_layers[l]:
                next_pred = None
                if predicts and spec.direct:
                    next_pred = start_copies(spec, l, None, (srcs[nxt], caches[nxt], pids, spec.splits[nxt]))[1]
                elif predicts:
                    next_pred = predict(spec, nxt, stacks[nxt], caches[nxt], pids, B)
                with jax.named_scope("ffn"):
                    return M.mlp(x[:, 0], lp.mlp)[:, None], (caches[l], None, next_pred)
            ids, w = routed(spec, lp, x[:, 0], None if rows is None else (trace.ids[rows, l],
                                                                          trace.weights[rows, l].astype(jnp.float32)))
            if spec.direct:
                y, cache, c, next_pred = moe_decode_direct(
                    spec, l, lp, x[:, 0], caches[l], srcs[l], ids, w, pred, (srcs[nxt], caches[nxt], pids, spec.splits[nxt])
                    if predicts else None, step)
            else:
                next_pred = predict(spec, nxt, stacks[nxt], caches[nxt], pids, B) if predicts else None
                y, cache, c = moe_decode(spec, l, lp, stacks[l], x[:, 0], caches[l], pred, step, ids, w)
            return y[:, None], (cache, c, next_pred)

        h, k, v, (caches[l], c, next_pred) = M.decoder_layer(lp, h, k, v, l, pos, cfg, ffn)
        if c is not None:
            for n in COUNTERS:
                cnt[n][l] = c[n]
        if cfg.moe_layers[l] and spec.admits:
            # The next layer starts only after this layer's admissions are written: otherwise XLA may defer every
            # layer's cache update to the end of the step and keep all their admitted rows alive at once
            # (1.6 GiB of temporaries for Qwen1.5-MoE at batch 1 on the H200, 6.3 GiB at batch 4).
            h, caches[l] = jax.lax.optimization_barrier((h, caches[l]))
        pred = next_pred
    logits = M.lm_head(resident, h, cfg)[:, 0]
    counters = {n: jnp.stack(cnt[n]) for n in COUNTERS}
    return logits, tuple(caches), new_kv.replace(k=k, v=v), counters

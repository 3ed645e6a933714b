"""The offloaded decode step: one token for every row, every layer, in one compiled program.

Data flow per layer l (DESIGN.md; JAX_NOTES.md §2b), all on the device, through `model.decoder_layer`:

  attention(l) -> h_mid
  predictor: layer l+1's post-attention RMSNorm + router on h_mid -> top-k' experts of l+1
             -> their buffers are assembled now (prefetch), so XLA can overlap the copies with l
  router(l) -> routed experts (distinct: U = min(B*K, E) slots, padded with -1)
  per routed expert e:  predicted ? the prefetched buffer : the copy step (`copy_step.py`)
  y = sum over routed experts of weight * SwiGLU(x, buffer) (+ shared expert)
  cache rule update (admission for `lru` and `moepic`'s frequency rule), counters (hits, bytes, recall)

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
from moepic_jax.offload.copy_step import StepSpec, assemble, expert_outputs

COUNTERS = ("full_hits", "top_hits", "misses", "predicted", "routed", "h2d_bytes")


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


class Prefetch(NamedTuple):
    """The next layer's predicted experts, assembled on the device a layer ahead."""

    ids: jax.Array  # [P] int32 distinct predicted experts (-1 padded), in assembly order
    buffers: jax.Array  # [P, F, 3, D]
    h2d_bytes: jax.Array  # [] float32


def predict(spec: StepSpec, l_next: int, lp: M.LayerParams, stack: jax.Array, h_mid: jax.Array,
            cache: C.LayerCache, P: int, traced: jax.Array | None = None) -> Prefetch:
    """Predict layer l_next's experts from the current residual stream and start their copies.

    DESIGN.md "Predictor": apply layer l+1's post-attention RMSNorm and router to h_mid ([B, D]), take the top k'
    per token, keep the distinct ones (P slots). traced: [B, k'] predicted ids from a routing trace instead.
    """
    if traced is not None:  # replayed ids become known when the router's would: after h_mid
        traced = after(traced, h_mid)
    with jax.named_scope("predictor"):
        pids = traced if traced is not None else M.route(M.rms_norm(h_mid, lp.mlp_norm, spec.cfg.rms_eps),
                                                         lp.moe.w_router, spec.cfg, spec.n_predicted)[0]
        pred = spec.place.distinct(spec.place.local(pids), P)
    with jax.named_scope("prefetch"):
        r = assemble(spec, spec.splits[l_next], stack, cache, pred, pred >= 0,
                     every=h_mid.shape[0] == 1 and spec.place.mesh is None)
    return Prefetch(r.ids, r.outputs, r.h2d_bytes)


def moe_decode(spec: StepSpec, l: int, lp: M.LayerParams, stack, x, cache, pred: Prefetch | None, step,
               traced: tuple[jax.Array, jax.Array] | None = None):
    """MoE block of layer l for B tokens (x [B, D]). traced: (ids [B, K], weights [B, K]) from a routing trace
    instead of the router. Returns (y [B, D], cache, counters of l {name: [] float32})."""
    cfg, place = spec.cfg, spec.place
    B = x.shape[0]
    if traced is not None:  # replayed ids become known when the router's would: after x
        traced = (after(traced[0], x), traced[1])
    with jax.named_scope("router"):
        gids, w = traced if traced is not None else M.route(x, lp.moe.w_router, cfg)  # [B, K] global ids
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
        nbytes = nbytes + pred.h2d_bytes
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
                new_cache = new_cache.replace(tops=new_cache.tops.at[idx].set(
                    pred.buffers[j, :rows_kept].astype(new_cache.tops.dtype), mode="drop", unique_indices=True))
    # outs: every distinct expert's output for every row [U, B, D]; summed in routing order (k = 0..K-1)
    # exactly as the resident model does, so that bfloat16 results round identically, not just within tolerance.
    rows = jnp.arange(B)
    y = jnp.zeros((B, cfg.d_model), jnp.float32)
    for k in range(cfg.top_k):
        u = jnp.argmax(r.ids[None, :] == ids[:, k:k + 1], axis=1)  # [B] position of ids[:, k] in the step's ids
        y = y + jnp.where(ids[:, k, None] >= 0, w[:, k, None] * outs[u, rows], 0.0)
    y = place.psum(y).astype(x.dtype) + M.shared_expert(x, lp.moe)
    f32 = jnp.float32
    counters = dict(full_hits=jnp.sum(full, dtype=f32), top_hits=jnp.sum(top, dtype=f32),
                    misses=jnp.sum(miss, dtype=f32), predicted=jnp.sum(predicted, dtype=f32),
                    h2d_bytes=nbytes.astype(f32))
    counters = {k: place.psum(v) for k, v in counters.items()}  # over the devices' experts
    counters["routed"] = f32(ids.size)
    return y, new_cache, counters


def decode_step(spec: StepSpec, resident: M.Params, stacks: tuple, caches: tuple, kv: M.KVCache, tokens, step,
                trace: RoutingTrace | None = None):
    """One token for every row.

    Args:
      resident: the parameters on the device (routed experts absent); stacks: [n_layers] pinned_host stacks
        [E, F, 3, D] (None for dense layers); caches: [n_layers] `LayerCache` (None for dense layers);
      kv: the KV cache; tokens: [B] int32; step: [] int32, the decode step's number from 1 (the LRU clock);
      trace: routing to replay instead of the routers' (None: the model's own routing).
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
            next_pred = predict(spec, nxt, resident.layers[nxt], stacks[nxt], h_mid[:, 0], caches[nxt], n_pred,
                                None if rows is None else trace.predicted[rows, nxt]) if predicts else None
            if not cfg.moe_layers[l]:
                with jax.named_scope("ffn"):
                    return M.mlp(x[:, 0], lp.mlp)[:, None], (caches[l], None, next_pred)
            traced = None if rows is None else (trace.ids[rows, l], trace.weights[rows, l].astype(jnp.float32))
            y, cache, c = moe_decode(spec, l, lp, stacks[l], x[:, 0], caches[l], pred, step, traced)
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

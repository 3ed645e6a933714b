"""Calibration: expert activation frequencies and predictor recall (`ModelProfile`), the copy-time curve and
per-layer compute time (`HardwareProfile`). It reads placed weights (`offload.store.PlacedWeights`) and runs the
model's own layer body and the offloaded copy step; it never needs an engine, so a plan can be solved before the
engine that runs it exists.

The model profile runs calibration tokens through a resident forward of the placed weights, which routes every
token at every layer and applies the predictor (layer l+1's post-attention RMSNorm and router on layer
l's residual stream, top k'), so `freq` and `recall` are what the decode step will see.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax.offload import cache as C
from moepic_jax.offload import copy_step as CS
from moepic_jax.offload import decode as DS
from moepic_jax.offload import transfer
from moepic_jax.offload.copy_step import StepSpec, fetch_rows
from moepic_jax.offload.decode import RoutingTrace
from moepic_jax.offload.placement import make_placement
from moepic_jax.offload.store import PlacedWeights
from moepic_jax.planning.profiles import HardwareProfile, ModelProfile

log = logging.getLogger(__name__)

# Used when no hardware profile is measured or given: `measure_hardware` on the H200 with Qwen1.5-MoE-A2.7B shapes,
# medians of the four runs of the engine that computes each expert inside its copy step
# (benchmarks/results/archive/bench_policies_qwen15_{2026-11-30,zipf1,b4,p1024}.json): a copy step of 4 experts costs
# 0.14 ms (0.08-0.19 over the runs) + bytes at 49 GB/s, a conditional copy step 0.036 ms, and a prefetch made inside a
# conditional hid nothing of a layer's compute (0-2 %). The layer compute time depends on the model (0.20 ms
# there); the default is a small model's.
DEFAULT_H2D_LATENCY_S = 1.4e-4
DEFAULT_H2D_BANDWIDTH_BPS = 49e9
DEFAULT_LAYER_COMPUTE_S = 1e-4
DEFAULT_COND_OVERHEAD_S = 3.6e-5
DEFAULT_COND_WINDOW_FRACTION = 0.0
# With direct copies (`offload/transfer.py`), on the H100 (docs/notes/2026-12-07-default-step-sweep.md): a copy call
# that copies nothing costs a layer 0.15-0.18 ms with Qwen1.5-MoE-A2.7B shapes (0.24 ms with Qwen3-30B-A3B's, 8
# experts a layer) in `measure_hardware(direct=True)`; a prefetch hides most of a layer's compute: forced on, it ran
# Qwen1.5 at 0.98 of its floor (the copy-overlap probes, docs/notes/2026-12-07-copy-overlap-probes.md: a private-
# stream copy hid 0.90-0.92 of itself behind compute).
DEFAULT_DIRECT_OVERHEAD_S = 1.5e-4
DEFAULT_DIRECT_WINDOW_FRACTION = 0.9
DEFAULT_DEVICE = "default (not measured)"  # the `device` of `default_hardware`

_DEFAULT_TEXT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from empty stack")
        return self.items.pop()


import json, os, sys
def load_config(path):
    with open(path) as f:
        return json.load(f)
'''


def default_calibration_tokens(source, n_tokens: int = 256, seed: int = 0) -> np.ndarray:
    """Calibration prompt: code text through `source.tokenizer` (a `Model` or `PlacedWeights`), else seeded random
    ids below `source.cfg.vocab_size`. Returns [n] int32."""
    if source.tokenizer is not None:
        ids = source.tokenizer.encode(_DEFAULT_TEXT)
        reps = -(-n_tokens // max(len(ids), 1))
        return np.asarray((ids * reps)[:n_tokens], np.int32)
    return np.random.RandomState(seed).randint(0, source.cfg.vocab_size, n_tokens).astype(np.int32)


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    """A `tqdm.auto` bar on stderr when `enabled`, else None (tqdm is only imported when asked for)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def _tick(bar, n: int = 1) -> None:
    if bar is not None:
        bar.update(n)


def _close(bar) -> None:
    if bar is not None:
        bar.close()


def route_all(weights: PlacedWeights, tokens: np.ndarray, n_predicted: int | None = None, progress: bool = False):
    """Route `tokens` [n] through every layer (a resident forward, one layer's stack on the device at a time).

    `progress`: show a progress bar over the layers (tqdm, stderr).
    Returns ({MoE layer: routed ids [n, K]}, {layer l+1: ids the predictor picks for it from layer l [n, k']}); the
    second is empty when n_predicted is 0 (default k' = top_k).
    """
    cfg = weights.cfg
    n_predicted = cfg.top_k if n_predicted is None else n_predicted
    res = _first_device_resident(weights)  # whole stacks are copied one at a time below
    t = jnp.asarray(tokens[None])
    mask = jnp.ones(t.shape, bool)
    cache = M.init_kv_cache(cfg, 1, t.shape[1], weights.dtype)
    positions, valid, _ = M.cache_positions(cache, mask)
    pos = M.Positions(positions, valid, jnp.int32(0))

    @jax.jit
    def layer(lp, nlp, experts, h, k, v, l):
        def ffn(x, h_mid):
            x = x[0]
            pred = None
            if nlp is not None and n_predicted > 0:
                xn = M.rms_norm(h_mid, nlp.mlp_norm, cfg.rms_eps)[0]
                pred = M.route(xn, nlp.moe.w_router, cfg, n_predicted)[0]
            if lp.moe is not None:
                ids, w = M.route(x, lp.moe.w_router, cfg)
                y = M.experts_scan(x, experts, ids, w, cfg.expert_quant).astype(x.dtype) + M.shared_expert(x, lp.moe)
            else:
                ids, y = None, M.mlp(x, lp.mlp)
            return y[None], (ids, pred)

        h, k, v, (ids, pred) = M.decoder_layer(lp, h, k, v, l, pos, cfg, ffn)
        return h, k, v, ids, pred

    h = M.embed(res, t)
    k, v = cache.k, cache.v
    routed, predicted = {}, {}
    dev = jax.sharding.SingleDeviceSharding(weights.device)
    bar = progress_bar(cfg.n_layers, "profiling experts", "layer", progress)
    for l, lp in enumerate(res.layers):
        nlp = res.layers[l + 1] if l + 1 < cfg.n_layers and cfg.moe_layers[l + 1] else None
        experts = jax.device_put(weights.stacks[l], dev) if cfg.moe_layers[l] else None
        h, k, v, ids, pred = layer(lp, nlp, experts, h, k, v, jnp.int32(l))
        del experts
        if ids is not None:
            routed[l] = np.asarray(ids)
        if pred is not None:
            predicted[l + 1] = np.asarray(pred)
        _tick(bar)
    _close(bar)
    return routed, predicted


def _first_device_resident(weights: PlacedWeights):
    """The resident weights on the first device: its replica (no copy)."""
    return jax.tree_util.tree_map(lambda x: _on_first_device(x, weights.device), weights.resident)


def _on_first_device(x: jax.Array, device) -> jax.Array:
    """`device`'s own buffer of an array on several devices (its replica, or its shard of a split array); the
    array itself when it lives on one device."""
    if len(x.sharding.device_set) == 1:
        return x
    return next(sh.data for sh in x.addressable_shards if sh.device == device)


def profile_model(weights: PlacedWeights, tokens: np.ndarray | None = None, score_from: int = 0,
                  smoothing: float = 0.5, n_predicted: int | None = None, progress: bool = False) -> ModelProfile:
    """Measure expert activation frequencies and predictor recall/precision on calibration tokens.

    Args:
      weights: the placed weights (`offload.store.place_weights`; an engine's `.weights`).
      tokens: [n] int32 calibration tokens; None = `default_calibration_tokens`.
      score_from: count the routing of positions [score_from, n) only; the tokens before are context (e.g. a
        prompt, to profile exactly the tokens a generate call decoded). Raises ValueError outside [0, n).
      smoothing: add-alpha (Laplace) pseudo-count per expert: freq[l, e] = k (count + alpha) / (n k + alpha E).
        A finite calibration never sees some experts; with 0 the planner would give them no value and leave a
        budget that could hold them unused. 0 = raw counts / n.
      n_predicted: k', the experts predicted per token for the next layer (default top_k; 0: no prediction).
      progress: show a progress bar over the layers (tqdm, stderr).
    Returns:
      `ModelProfile` with freq [n_layers, n_experts] (rows of MoE layers sum to top_k), recall/precision
      [n_layers] (NaN where the layer is not predicted).
    """
    cfg = weights.cfg
    n_predicted = cfg.top_k if n_predicted is None else n_predicted
    tokens = default_calibration_tokens(weights) if tokens is None else np.asarray(tokens, np.int32).ravel()
    if not (math.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing={smoothing} must be a finite pseudo-count >= 0")
    if not 0 <= score_from < len(tokens):
        raise ValueError(f"score_from={score_from} must lie in [0, {len(tokens)}) (the number of calibration tokens)")
    routed, predicted = route_all(weights, tokens, n_predicted, progress)
    routed = {l: ids[score_from:] for l, ids in routed.items()}
    predicted = {l: ids[score_from:] for l, ids in predicted.items()}
    L, E = cfg.n_layers, cfg.n_experts
    freq = np.zeros((L, E))
    recall = np.full(L, np.nan)
    precision = np.full(L, np.nan)
    n = len(tokens) - score_from
    for l, ids in routed.items():
        counts = np.bincount(ids.ravel(), minlength=E)
        freq[l] = cfg.top_k * (counts + smoothing) / (n * cfg.top_k + smoothing * E)
        if l in predicted:
            inter = np.array([len(set(a) & set(b)) for a, b in zip(ids.tolist(), predicted[l].tolist())])
            recall[l] = inter.sum() / ids.size
            precision[l] = inter.sum() / predicted[l].size
    return ModelProfile(freq=freq, recall=recall, precision=precision, d_model=cfg.d_model, d_ff=cfg.d_ff,
                        top_k=cfg.top_k, n_experts=E, dtype_bytes=weights.dtype.itemsize, model_id=cfg.identity(),
                        n_predicted=n_predicted, expert_row_bytes=stored_row_bytes(cfg, weights.dtype.itemsize))


def profile_from_trace(trace: RoutingTrace, cfg, dtype_bytes: int, smoothing: float = 0.5) -> ModelProfile:
    """A model profile from recorded (or calibrated) routing instead of a forward over calibration text.

    Args:
      trace: ids [T, L, K] routed experts (-1 in dense layers), predicted [T, L, K'] the predictor's picks (-1 where
        none); weights are not read.
      smoothing: as in `profile_model`: freq[l, e] = K (count + alpha) / (T K + alpha E).
    Returns:
      `ModelProfile` (freq [L, E], recall/precision [L], NaN where a layer has no predictions).
    Raises:
      ValueError: a trace that does not fit `cfg` (`RoutingTrace.check`), or a negative smoothing.
    """
    ids, pred = np.asarray(trace.ids), np.asarray(trace.predicted)
    trace.check(cfg, pred.shape[2])
    if not (math.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing={smoothing} must be a finite pseudo-count >= 0")
    T, L, K = ids.shape
    E = cfg.n_experts
    freq = np.zeros((L, E))
    recall = np.full(L, np.nan)
    precision = np.full(L, np.nan)
    for l in cfg.moe_layer_ids:
        counts = np.bincount(ids[:, l].ravel(), minlength=E)
        freq[l] = K * (counts + smoothing) / (T * K + smoothing * E)
        if (pred[:, l] >= 0).any():
            inter = sum(len(set(a) & set(b)) for a, b in zip(ids[:, l].tolist(), pred[:, l].tolist()))
            recall[l] = inter / ids[:, l].size
            precision[l] = inter / pred[:, l].size
    return ModelProfile(freq=freq, recall=recall, precision=precision, d_model=cfg.d_model, d_ff=cfg.d_ff, top_k=K,
                        n_experts=E, dtype_bytes=dtype_bytes, model_id=cfg.identity(), n_predicted=pred.shape[2],
                        expert_row_bytes=stored_row_bytes(cfg, dtype_bytes))


def stored_row_bytes(cfg, dtype_bytes: int) -> int:
    """`ModelProfile.expert_row_bytes` of a model: the packed row bytes of quantized experts, else 0 (the profile
    then counts 3 * d_model * dtype_bytes)."""
    return cfg.expert_row_bytes(dtype_bytes) if cfg.expert_quant is not None else 0


def default_hardware(n_layers: int, direct: bool = False) -> HardwareProfile:
    """The unmeasured default (the figures above) for the conditional copy step or, direct=True, for direct copies;
    `measure_hardware` measures the machine in use."""
    return HardwareProfile(h2d_latency_s=DEFAULT_H2D_LATENCY_S, h2d_bandwidth_Bps=DEFAULT_H2D_BANDWIDTH_BPS,
                           layer_compute_s=np.full(n_layers, DEFAULT_LAYER_COMPUTE_S), device=DEFAULT_DEVICE,
                           cond_overhead_s=DEFAULT_DIRECT_OVERHEAD_S if direct else DEFAULT_COND_OVERHEAD_S,
                           cond_window_fraction=DEFAULT_DIRECT_WINDOW_FRACTION if direct
                           else DEFAULT_COND_WINDOW_FRACTION, direct=direct)


def direct_rows(platform: str, stack: jax.Array, src: jax.Array, ids: list, rows: int, tag: int) -> list:
    """Rows [0, rows) of experts `ids` (traced int32 scalars) of a pinned_host stack [E, F, 3, D], copied by one
    direct copy call (`offload/transfer.py`) and waited for: a list of [rows, 3, D] device arrays."""
    plan = jnp.stack([jnp.stack([jnp.int32(transfer.FROM_HOST), e, jnp.int32(0), jnp.int32(rows)])
                      for e in ids])[:, None]
    tops = jnp.zeros((0, 0) + stack.shape[2:], stack.dtype)
    none = transfer.Group(jnp.zeros((0, 1, transfer.PLAN_COLS), jnp.int32), src, tops)
    now = transfer.Group(plan, src, tops)
    dst, _ = transfer.start(platform, (now, none), stack.shape[1], stack.shape[2:], stack.shape[0], stack.dtype,
                            tag=tag)
    dst = transfer.wait(platform, dst, now, tag, 0)
    return [dst[j, :rows] for j in range(len(ids))]


def measure_h2d(stack: jax.Array, sizes_rows: list[int], repeats: int = 5, chain: int = 8, per_step: int = 1,
                direct: bool = False, bar=None) -> tuple[list[int], list[float]]:
    """Time in-graph copy steps of `per_step` experts' rows [0, rows) from a pinned_host stack [E, F, 3, D], as the
    decode step makes them: one layer's copies issued together, inside one compiled program, each step's expert
    ids depending on the previous step's data (steps neither overlap each other nor pay a host round trip each).
    Returns (bytes per step, median seconds per step) per size. (Timing lone jitted copies instead gave a ~0.5 ms
    "latency" on the H200, the dispatch and sync of the call, which the decode step does not pay; serialised single
    copies gave 43 GB/s where the decode step's batches of copies stream at ~53 GB/s.) `bar`: a progress bar
    (`progress_bar`) advanced once per size, or None."""
    row_bytes = int(np.prod(stack.shape[2:])) * stack.dtype.itemsize
    E = stack.shape[0]
    src = jnp.asarray(transfer.host_address(stack)) if direct else None
    platform = next(iter(stack.sharding.device_set)).platform
    out_b, out_t = [], []
    for rows in sizes_rows:
        def copies(st, acc, src, _r=rows):
            for i in range(chain):
                gate = acc > 1e30  # the step's ids depend on the previous step's data: steps are serialised
                ids = [jnp.where(gate, 0, (i * per_step + j) * 7 % E).astype(jnp.int32) for j in range(per_step)]
                if direct:  # one direct copy call of per_step experts' rows [0, rows)
                    bufs = direct_rows(platform, st, src, ids, _r, tag=i)
                else:
                    bufs = [fetch_rows(st, e, 0, _r) for e in ids]
                acc = acc + sum(jnp.sum(b, dtype=jnp.float32) for b in bufs)  # all of it: no slice shrinks a copy
            return acc

        fn = jax.jit(copies)
        fn(stack, jnp.float32(0), src).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(stack, jnp.float32(0), src).block_until_ready()
            ts.append(time.perf_counter() - t0)
        out_b.append(per_step * rows * row_bytes)
        out_t.append(float(np.median(ts)) / chain)
        _tick(bar)
    return out_b, out_t


def measure_hardware(weights: PlacedWeights, repeats: int = 5, direct: bool = False,
                     progress: bool = False) -> HardwareProfile:
    """Measure this machine for the planner (seconds and bytes/second; DESIGN.md cost model).

    Fits the copy-time curve from in-graph copies of several segment sizes, measures the decode compute time
    per layer (attention + router + the routed experts' math, experts already on the device), and the cost of
    the engine's copy step (`cond_overhead_s`, `cond_window_fraction`, see `conditional_costs`), all with the
    copies the engine will make: direct copies (`offload/transfer.py`) when direct is True, else the conditional
    copy step.
    `progress`: show a progress bar over the measurements (copy sizes, compute, the four chains).
    Returns a `HardwareProfile` with every layer given the first MoE layer's compute time.
    """
    cfg = weights.cfg
    l0 = cfg.moe_layer_ids[0]
    F = cfg.d_ff
    rows = sorted({max(1, F // 8), max(1, F // 4), max(1, F // 2), F})
    bar = progress_bar(len(rows) + 1 + len(COND_MODES), "measuring hardware", "step", progress)
    stack = _on_first_device(weights.stacks[l0], weights.device)  # several devices: the first one's experts and link
    # copy steps of top_k experts, as a decode layer's misses (the latency fitted is then per step, as in the planner)
    sizes, times = measure_h2d(stack, rows, repeats, per_step=min(cfg.top_k, stack.shape[0]), direct=direct, bar=bar)
    # compute: one decode token through one layer with k experts resident, timed in a loop
    lp = _first_device_resident(weights).layers[l0]
    ex = jax.device_put(stack, jax.sharding.SingleDeviceSharding(weights.device))
    kv = M.init_kv_cache(cfg, 1, 256, weights.dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    valid = jnp.ones((1, 256), bool)

    @jax.jit
    def layer(lp, experts, h, k, v):  # weights as arguments, not closed-over constants
        ffn = M.resident_ffn(lp.replace(moe=lp.moe.replace(experts=experts)), cfg, is_moe=True)
        h, k, v, _ = M.decoder_layer(lp, h, k, v, 0, M.Positions(pos, valid, jnp.int32(0)), cfg, ffn)
        return h, k, v

    h = jnp.ones((1, 1, cfg.d_model), weights.dtype) * 0.01
    jax.block_until_ready(layer(lp, ex, h, kv.k, kv.v))
    t0 = time.perf_counter()
    for _ in range(repeats * 4):
        out = layer(lp, ex, h, kv.k, kv.v)
    jax.block_until_ready(out)
    c = (time.perf_counter() - t0) / (repeats * 4)
    _tick(bar)
    costs = conditional_costs(weights, stack, ex, lambda h, x_exp, w: layer(w[0], x_exp, h, w[1], w[2])[0], h, repeats,
                              weights=(lp, kv.k, kv.v), direct=direct, bar=bar)
    _close(bar)
    del ex
    compute = np.full(cfg.n_layers, c)
    try:
        hw = HardwareProfile.fit(sizes, times, compute, device=str(weights.device.device_kind))
    except ValueError as e:  # tiny copies (test models on a CPU) drown in timer noise: a flat curve instead
        log.warning("%s; using latency = the fastest step, bandwidth = the largest step's bytes / its time", e)
        i = int(np.argmax(sizes))
        hw = HardwareProfile(min(times), sizes[i] / times[i], compute, device=str(weights.device.device_kind))
    return dataclasses.replace(hw, cond_overhead_s=costs["cond_overhead_s"],
                               cond_window_fraction=costs["cond_window_fraction"], direct=direct)


COND_MODES = ("plain", "hit", "miss", "ahead")


def conditional_costs(placed: PlacedWeights, stack: jax.Array, ex: jax.Array, layer, h: jax.Array, repeats: int = 5,
                      reps: int = 8, weights=(), direct: bool = False, bar=None, outputs: dict | None = None) -> dict:
    """What the engine's data-dependent copy step costs on this machine, measured with its own code.

    `layer(h, experts, weights)` is one resident decode layer ([1, 1, d_model] -> same; `weights` is passed to the
    jitted chains as an argument: closed over, they were constants that XLA folded, over 1 s per op for
    Mixtral-8x7B's attention on the H200), `stack` one layer's pinned_host
    experts [E, F, 3, D] and `ex` the same experts on the device. Four jitted chains of `reps` layers, each layer's
    output feeding the next:
      plain: the layers alone;
      hit:   each layer also applies one routed expert that sits in a one-slot cache, through the decode step's
             own `copy_step.expert_outputs` (its `lax.switch` picks "no copy");
      miss:  the same for an expert that is not cached (one whole copy inside the conditional), used at once;
      ahead: that copy issued one layer before it is used, as a prefetch is (`copy_step.assemble`).
    Returns seconds per layer: cond_overhead_s = (hit - plain) / reps, copy_s = (miss - hit) / reps, hidden_s =
    (miss - ahead) / reps, compute_s = plain / reps; and cond_window_fraction = hidden_s / compute_s clipped to
    [0, 1] (0: the copies inside a conditional do not overlap compute at all).
    direct: the same chains with direct copies (`offload/transfer.py`, `decode.moe_decode_direct`'s calls): a hit
    is then a copy call whose plan takes the expert from its slot, and "ahead" a prefetch group queued, as the step
    queues it, in the same call as the layer's own copies (here a hit's), after the layer; its layers also apply
    that hit, so hidden_s is low by one expert FFN (a few microseconds).
    `bar`: a progress bar advanced once per chain, or None. `outputs`: a dict that receives each chain's result
    [1, 1, d_model] by mode (tests check it against the experts the chain should have applied).
    The expert FFNs read the RMS-normalised residual stream, as in the model (raw, the chains' values grew without
    bound: NaN within 8 layers on a tiny model, and an infinite value turns an expert id into padding).
    """
    cfg = placed.cfg
    E, F = stack.shape[0], cfg.d_ff
    dev = jax.sharding.SingleDeviceSharding(placed.device)
    # the decode step's own copy step, on one device with every split F (whole experts), no admission
    spec = StepSpec(cfg=cfg, dtype=placed.dtype, splits=(F,) * cfg.n_layers, rule="static", n_predicted=0,
                    prefetch=False, place=make_placement([placed.device], E), direct=direct)
    src = jnp.asarray(transfer.host_address(stack)) if direct else None
    U = min(cfg.top_k, E)
    tops = jax.jit(lambda st: fetch_rows(st, jnp.int32(0), 0, F)[None], out_shardings=dev)(stack)
    cache = jax.device_put(C.init_layer_cache(tops, [0], E), dev)  # slot 0 holds expert 0 whole

    def ids_for(h, r, hit):  # [U]: one expert (data-dependent, so nothing is hoisted), the rest padding
        e = 0 if hit else 1 + r % (E - 1)
        first = jnp.where(h[0, 0, 0] > 1e30, -1, e).astype(jnp.int32)
        return jnp.concatenate([first[None], jnp.full((U - 1,), -1, jnp.int32)])

    def first(res):  # the copy step's result for ids[0], the one expert (the step orders padding before a miss)
        return res.outputs[jnp.argmax(res.order == 0)]

    def assemble(h, r, cache, stack):  # a copy made ahead, as a prefetch is: the expert's [F, 3, D] buffer
        ids = ids_for(h, r, False)
        if direct:  # queued now, waited for when used (tagged reps: the layers' own calls are tagged 0..reps-1)
            return DS.start_copies(spec, reps, None, (src, cache, ids, F))[1]
        return first(CS.assemble(spec, F, stack, cache, ids, ids >= 0))

    def landed(pending):
        if not direct:
            return pending
        return transfer.wait(placed.device.platform, pending.dst, pending.group, pending.tag, 1)[0]

    def normed(h):  # the expert's input [1, D]
        return M.rms_norm(h[0], jnp.ones(h.shape[-1], h.dtype), cfg.rms_eps)

    def apply(h, w):
        return h + M.segment_ffn(normed(h), w, cfg.expert_quant)[None].astype(h.dtype)

    # the step computes a full hit from its slot during the copies (unquantized experts, `moe_decode_direct`)
    slot_hits = direct and DS.READY_FFNS_DURING_COPIES and cfg.expert_quant is None

    def routed(h, r, hit, cache, stack):  # the decode step's own path: the output computed where the copy lands
        ids = ids_for(h, r, hit)
        if slot_hits:  # as the step: a full hit's FFN from its slot during the copies
            slot, full = C.lookup(cache, ids, F)
            rows, *_, from_slot = DS.direct_step_rows(
                spec, r, F, cache, src, ids, ids >= 0, full_rows=False,
                during=(lambda hb: apply(hb, cache.tops[jnp.maximum(slot[0], 0)]), h))
            return jnp.where(full[0], from_slot, apply(h, rows[0]))
        if direct:  # a hit is read from its slot, a miss copied by a start/wait pair, as in the decode step
            return apply(h, DS.direct_step_rows(spec, r, F, cache, src, ids, ids >= 0)[0][0])
        return h + first(CS.expert_outputs(spec, normed(h), F, stack, cache, ids, ids >= 0))[None].astype(h.dtype)

    def chain(mode, h, cache, stack, ex, weights):
        pending = assemble(h, 0, cache, stack) if mode == "ahead" else None
        for r in range(reps):
            if mode == "ahead" and direct:
                # As the decode step queues a prefetch: in the layer's own copy call (here a full hit, no copy),
                # after the layer's routing. A prefetch in a call of its own is tied to nothing before its wait;
                # measured that way the H100 hid 0.09-0.20 of the window, where the step hid most of it. The wait
                # for the previous layer's prefetch comes after this call's start when the step orders it so
                # (`decode.READY_FFNS_DURING_COPIES`): unordered, XLA may queue it before the layer's compute.
                h = layer(h, ex, weights)
                ids = ids_for(h, r, True)
                nxt = (src, cache, ids_for(h, r + 1, False), F) if r + 1 < reps else None
                if DS.READY_FFNS_DURING_COPIES:  # as the step orders it: the prefetched expert after the start
                    def ready(arg, p=pending):  # h and the prefetch's destination, through the barrier
                        hb, dst = arg  # the prefetched expert, then the full hit from its slot (expert 0, slot 0)
                        hb = apply(hb, landed(p._replace(dst=dst)))
                        return apply(hb, cache.tops[0]) if slot_hits else hb

                    rows, *_, flight, h_ready = DS.direct_step_rows(spec, r, F, cache, src, ids, ids >= 0, nxt,
                                                                    full_rows=not slot_hits,
                                                                    during=(ready, (h, pending.dst)))
                    # the step computes the copied rows' FFN too and selects: the layer waits for its copy call
                    h_copied = apply(h_ready, rows[0])
                    h = jnp.where(C.lookup(cache, ids, F)[1][0], h_ready, h_copied) if slot_hits else h_copied
                else:
                    rows, *_, flight, _ = DS.direct_step_rows(spec, r, F, cache, src, ids, ids >= 0, nxt)
                    h = apply(apply(h, rows[0]), landed(pending))
                pending = flight
                continue
            if mode == "ahead":
                cur = pending
                if r + 1 < reps:
                    pending = assemble(h, r + 1, cache, stack)  # issued before this layer's compute
            h = layer(h, ex, weights)
            if mode == "plain":
                h = apply(h, ex[r % E])
            elif mode == "ahead":
                h = apply(h, landed(cur))
            else:
                h = routed(h, r, mode == "hit", cache, stack)
        return h

    t = {}
    for mode in COND_MODES:
        fn = jax.jit(functools.partial(chain, mode))
        result = jax.block_until_ready(fn(h, cache, stack, ex, weights))
        if outputs is not None:
            outputs[mode] = result
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(h, cache, stack, ex, weights))
            ts.append(time.perf_counter() - t0)
        t[mode] = float(np.median(ts)) / reps
        _tick(bar)
    del cache, tops
    out = {"compute_s": t["plain"], "cond_overhead_s": max(0.0, t["hit"] - t["plain"]),
           "copy_s": t["miss"] - t["hit"], "hidden_s": t["miss"] - t["ahead"]}
    out["cond_window_fraction"] = float(np.clip(out["hidden_s"] / max(out["compute_s"], 1e-12), 0.0, 1.0))
    log.info("conditional copies: %s", {k: round(v * 1e6, 1) if k.endswith("_s") else v for k, v in out.items()})
    return out


def save_json(obj, path) -> None:
    pathlib.Path(path).write_text(obj.to_json() if hasattr(obj, "to_json") else json.dumps(obj))

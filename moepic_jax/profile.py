"""Calibration: expert activation frequencies and predictor recall (ModelProfile), copy-time curve and
per-layer compute time (HardwareProfile), and the built-in plan of an engine (`plan_for`).

The model profile runs calibration tokens through the offloading engine's prefill, which routes every
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
from moepic_jax.planner import CachePlan, HardwareProfile, LayerPlan, ModelProfile, predicted_tpot, solve

log = logging.getLogger(__name__)

# Used when no hardware profile is measured or given: `measure_hardware` on the H200 with Qwen1.5-MoE-A2.7B shapes,
# medians of the four runs of the engine that computes each expert inside its copy step
# (benchmarks/results/bench_policies_qwen15_{s4,zipf1,b4,p1024}.json): a copy step of 4 experts costs 0.14 ms
# (0.08-0.19 over the runs) + bytes at 49 GB/s, a conditional copy step 0.036 ms, and a prefetch made inside a
# conditional hid nothing of a layer's compute (0-2 %). The layer compute time depends on the model (0.20 ms
# there); the default is a small model's.
DEFAULT_H2D_LATENCY_S = 1.4e-4
DEFAULT_H2D_BANDWIDTH_BPS = 49e9
DEFAULT_LAYER_COMPUTE_S = 1e-4
DEFAULT_COND_OVERHEAD_S = 3.6e-5
DEFAULT_COND_WINDOW_FRACTION = 0.0

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


def default_calibration_tokens(model, n_tokens: int = 256, seed: int = 0) -> np.ndarray:
    """Calibration prompt: code text through the model's tokenizer, else seeded random ids. Returns [n] int32."""
    if model.tokenizer is not None:
        ids = model.tokenizer.encode(_DEFAULT_TEXT)
        reps = -(-n_tokens // max(len(ids), 1))
        return np.asarray((ids * reps)[:n_tokens], np.int32)
    return np.random.RandomState(seed).randint(0, model.cfg.vocab_size, n_tokens).astype(np.int32)


def _route_all(engine, tokens: np.ndarray):
    """Per MoE layer: routed ids [N, K] and predicted ids for that layer [N, k'] (None for the first)."""
    cfg = engine.cfg
    res = _first_device_resident(engine)  # whole stacks are copied one at a time below
    t = jnp.asarray(tokens[None])
    mask = jnp.ones(t.shape, bool)
    cache = M.init_kv_cache(cfg, 1, t.shape[1], engine.dtype)
    positions, valid, _ = M.cache_positions(cache, mask)

    @jax.jit
    def layer(lp, nlp, experts, h, k, v, l):
        a, k, v = M.attention(lp.attn, M.rms_norm(h, lp.attn_norm, cfg.rms_eps), positions, k, v, l, valid,
                              jnp.int32(0), cfg)
        h = h + a
        x = M.rms_norm(h, lp.mlp_norm, cfg.rms_eps)[0]
        pred = None
        if nlp is not None:
            xn = M.rms_norm(h, nlp.mlp_norm, cfg.rms_eps)[0]
            pred = M.route(xn, nlp.moe.w_router, cfg, engine.n_predicted)[0]
        if lp.moe is not None:
            ids, w = M.route(x, lp.moe.w_router, cfg)
            y = M.experts_scan(x, experts, ids, w).astype(x.dtype) + M.shared_expert(x, lp.moe)
        else:
            ids, y = None, M.mlp(x, lp.mlp)
        return h + y[None], k, v, ids, pred

    h = M.embed(res, t)
    k, v = cache.k, cache.v
    routed, predicted = {}, {}
    dev = jax.sharding.SingleDeviceSharding(engine.device)
    for l, lp in enumerate(res.layers):
        nlp = res.layers[l + 1] if l + 1 < cfg.n_layers and cfg.moe_layers[l + 1] else None
        experts = jax.device_put(engine.stacks[l], dev) if cfg.moe_layers[l] else None
        h, k, v, ids, pred = layer(lp, nlp, experts, h, k, v, jnp.int32(l))
        del experts
        if ids is not None:
            routed[l] = np.asarray(ids)
        if pred is not None and engine.n_predicted > 0:
            predicted[l + 1] = np.asarray(pred)
    return routed, predicted


def _first_device_resident(engine):
    """The resident weights on the engine's first device: its replica (no copy)."""
    return jax.tree_util.tree_map(lambda x: _on_first_device(x, engine.device), engine.resident)


def _on_first_device(x: jax.Array, device) -> jax.Array:
    """`device`'s own buffer of an array on several devices (its replica, or its shard of a split array); the
    array itself when it lives on one device."""
    if len(x.sharding.device_set) == 1:
        return x
    return next(sh.data for sh in x.addressable_shards if sh.device == device)


def profile_model(engine, tokens: np.ndarray | None = None, score_from: int = 0, smoothing: float = 0.5
                  ) -> ModelProfile:
    """Measure expert activation frequencies and predictor recall/precision on calibration tokens.

    Args:
      engine: an `OffloadEngine` (its host stacks and resident weights are used; nothing is cached).
      tokens: [n] int32 calibration tokens; None = `default_calibration_tokens`.
      score_from: count the routing of positions [score_from, n) only; the tokens before are context (e.g. a
        prompt, to profile exactly the tokens a generate call decoded). Raises ValueError outside [0, n).
      smoothing: add-alpha (Laplace) pseudo-count per expert: freq[l, e] = k (count + alpha) / (n k + alpha E).
        A finite calibration never sees some experts; with 0 the planner would give them no value and leave a
        budget that could hold them unused. 0 = raw counts / n.
    Returns:
      `ModelProfile` with freq [n_layers, n_experts] (rows of MoE layers sum to top_k), recall/precision
      [n_layers] (NaN where the layer is not predicted).
    """
    cfg = engine.cfg
    tokens = default_calibration_tokens(engine.model) if tokens is None else np.asarray(tokens, np.int32).ravel()
    if not (math.isfinite(smoothing) and smoothing >= 0):
        raise ValueError(f"smoothing={smoothing} must be a finite pseudo-count >= 0")
    if not 0 <= score_from < len(tokens):
        raise ValueError(f"score_from={score_from} must lie in [0, {len(tokens)}) (the number of calibration tokens)")
    routed, predicted = _route_all(engine, tokens)
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
                        top_k=cfg.top_k, n_experts=E, dtype_bytes=engine.dtype.itemsize, model_id=cfg.identity(),
                        n_predicted=engine.n_predicted)


def default_hardware(n_layers: int) -> HardwareProfile:
    """The unmeasured default (the H200 figures above); `measure_hardware` measures the machine in use."""
    return HardwareProfile(h2d_latency_s=DEFAULT_H2D_LATENCY_S, h2d_bandwidth_Bps=DEFAULT_H2D_BANDWIDTH_BPS,
                           layer_compute_s=np.full(n_layers, DEFAULT_LAYER_COMPUTE_S), device="default (not measured)",
                           cond_overhead_s=DEFAULT_COND_OVERHEAD_S, cond_window_fraction=DEFAULT_COND_WINDOW_FRACTION)


def measure_h2d(stack: jax.Array, sizes_rows: list[int], repeats: int = 5, chain: int = 8, per_step: int = 1
                ) -> tuple[list[int], list[float]]:
    """Time in-graph copy steps of `per_step` experts' rows [0, rows) from a pinned_host stack [E, F, 3, D], as the
    decode step makes them: one layer's copies issued together, inside one compiled program, each step's expert
    ids depending on the previous step's data (steps neither overlap each other nor pay a host round trip each).
    Returns (bytes per step, median seconds per step) per size. (Timing lone jitted copies instead gave a ~0.5 ms
    "latency" on the H200, the dispatch and sync of the call, which the decode step does not pay; serialised single
    copies gave 43 GB/s where the decode step's batches of copies stream at ~53 GB/s.)"""
    from moepic_jax.offload import fetch_rows

    row_bytes = int(np.prod(stack.shape[2:])) * stack.dtype.itemsize
    E = stack.shape[0]
    out_b, out_t = [], []
    for rows in sizes_rows:
        def copies(st, acc, _r=rows):
            for i in range(chain):
                gate = acc > 1e30  # the step's ids depend on the previous step's data: steps are serialised
                bufs = [fetch_rows(st, jnp.where(gate, 0, (i * per_step + j) * 7 % E).astype(jnp.int32), 0, _r)
                        for j in range(per_step)]
                acc = acc + sum(jnp.sum(b, dtype=jnp.float32) for b in bufs)  # all of it: no slice shrinks a copy
            return acc

        fn = jax.jit(copies)
        fn(stack, jnp.float32(0)).block_until_ready()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(stack, jnp.float32(0)).block_until_ready()
            ts.append(time.perf_counter() - t0)
        out_b.append(per_step * rows * row_bytes)
        out_t.append(float(np.median(ts)) / chain)
    return out_b, out_t


def measure_hardware(engine, repeats: int = 5) -> HardwareProfile:
    """Measure this machine for the planner (seconds and bytes/second; DESIGN.md cost model).

    Fits the copy-time curve from in-graph copies of several segment sizes, measures the decode compute time
    per layer (attention + router + the routed experts' math, experts already on the device), and the cost of
    the engine's data-dependent copy step (`cond_overhead_s`, `cond_window_fraction`, see `conditional_costs`).
    Returns a `HardwareProfile` with every layer given the first MoE layer's compute time.
    """
    cfg = engine.cfg
    l0 = cfg.moe_layer_ids[0]
    F = cfg.d_ff
    rows = sorted({max(1, F // 8), max(1, F // 4), max(1, F // 2), F})
    stack = _on_first_device(engine.stacks[l0], engine.device)  # several devices: the first one's experts and link
    # copy steps of top_k experts, as a decode layer's misses (the latency fitted is then per step, as in the planner)
    sizes, times = measure_h2d(stack, rows, repeats, per_step=min(cfg.top_k, stack.shape[0]))
    # compute: one decode token through one layer with k experts resident, timed in a loop
    lp = _first_device_resident(engine).layers[l0]
    ex = jax.device_put(stack, jax.sharding.SingleDeviceSharding(engine.device))
    kv = M.init_kv_cache(cfg, 1, 256, engine.dtype)
    pos = jnp.zeros((1, 1), jnp.int32)
    valid = jnp.ones((1, 256), bool)

    @jax.jit
    def layer(lp, experts, h, k, v):  # weights as arguments, not closed-over constants
        a, k, v = M.attention(lp.attn, M.rms_norm(h, lp.attn_norm, cfg.rms_eps), pos, k, v, 0, valid,
                              jnp.int32(0), cfg)
        h = h + a
        x = M.rms_norm(h, lp.mlp_norm, cfg.rms_eps)[0]
        return h + M.moe_resident(x, lp.moe.replace(experts=experts), cfg)[None], k, v

    h = jnp.ones((1, 1, cfg.d_model), engine.dtype) * 0.01
    jax.block_until_ready(layer(lp, ex, h, kv.k, kv.v))
    t0 = time.perf_counter()
    for _ in range(repeats * 4):
        out = layer(lp, ex, h, kv.k, kv.v)
    jax.block_until_ready(out)
    c = (time.perf_counter() - t0) / (repeats * 4)
    costs = conditional_costs(engine, stack, ex, lambda h, x_exp, w: layer(w[0], x_exp, h, w[1], w[2])[0], h, repeats,
                              weights=(lp, kv.k, kv.v))
    del ex
    compute = np.full(cfg.n_layers, c)
    try:
        hw = HardwareProfile.fit(sizes, times, compute, device=str(engine.device.device_kind))
    except ValueError as e:  # tiny copies (test models on a CPU) drown in timer noise: a flat curve instead
        log.warning("%s; using latency = the fastest step, bandwidth = the largest step's bytes / its time", e)
        i = int(np.argmax(sizes))
        hw = HardwareProfile(min(times), sizes[i] / times[i], compute, device=str(engine.device.device_kind))
    return dataclasses.replace(hw, cond_overhead_s=costs["cond_overhead_s"],
                               cond_window_fraction=costs["cond_window_fraction"])


def conditional_costs(engine, stack: jax.Array, ex: jax.Array, layer, h: jax.Array, repeats: int = 5,
                      reps: int = 8, weights=()) -> dict:
    """What the engine's data-dependent copy step costs on this machine, measured with its own code.

    `layer(h, experts, weights)` is one resident decode layer ([1, 1, d_model] -> same; `weights` is passed to the
    jitted chains as an argument: closed over, they were constants that XLA folded, over 1 s per op for
    Mixtral-8x7B's attention on the H200), `stack` one layer's pinned_host
    experts [E, F, 3, D] and `ex` the same experts on the device. Four jitted chains of `reps` layers, each layer's output feeding the next:
      plain: the layers alone;
      hit:   each layer also applies one routed expert that sits in a one-slot cache, through the decode step's
             own `OffloadEngine._expert_outputs` (its `lax.switch` picks "no copy");
      miss:  the same for an expert that is not cached (one whole copy inside the conditional), used at once;
      ahead: that copy issued one layer before it is used, as a prefetch is (`OffloadEngine._assemble`).
    Returns seconds per layer: cond_overhead_s = (hit - plain) / reps, copy_s = (miss - hit) / reps, hidden_s =
    (miss - ahead) / reps, compute_s = plain / reps; and cond_window_fraction = hidden_s / compute_s clipped to
    [0, 1] (0: the copies inside a conditional do not overlap compute at all).
    """
    from moepic_jax import cache as C
    from moepic_jax.offload import fetch_rows

    cfg = engine.cfg
    E, F = stack.shape[0], cfg.d_ff
    dev = jax.sharding.SingleDeviceSharding(engine.device)
    U = min(cfg.top_k, E)
    tops = jax.jit(lambda st: fetch_rows(st, jnp.int32(0), 0, F)[None], out_shardings=dev)(stack)
    cache = jax.device_put(C.init_layer_cache(tops, [0], E), dev)  # slot 0 holds expert 0 whole

    def ids_for(h, r, hit):  # [U]: one expert (data-dependent, so nothing is hoisted), the rest padding
        e = 0 if hit else 1 + r % (E - 1)
        first = jnp.where(h[0, 0, 0] > 1e30, -1, e).astype(jnp.int32)
        return jnp.concatenate([first[None], jnp.full((U - 1,), -1, jnp.int32)])

    def assemble(h, r, cache, stack):  # a copy made ahead, as a prefetch is: the expert's [F, 3, D] buffer
        ids = ids_for(h, r, False)
        return engine._assemble(F, stack, cache, ids, ids >= 0)[2][0]

    def apply(h, w):
        return h + M.segment_ffn(h[0], w)[None].astype(h.dtype)

    def routed(h, r, hit, cache, stack):  # the decode step's own path: the output computed where the copy lands
        ids = ids_for(h, r, hit)
        return h + engine._expert_outputs(h[0], F, stack, cache, ids, ids >= 0)[2][0][None].astype(h.dtype)

    def chain(mode, h, cache, stack, ex, weights):
        pending = assemble(h, 0, cache, stack) if mode == "ahead" else None
        for r in range(reps):
            if mode == "ahead":
                cur = pending
                if r + 1 < reps:
                    pending = assemble(h, r + 1, cache, stack)  # issued before this layer's compute
            h = layer(h, ex, weights)
            if mode == "plain":
                h = apply(h, ex[r % E])
            elif mode == "ahead":
                h = apply(h, cur)
            else:
                h = routed(h, r, mode == "hit", cache, stack)
        return h

    t = {}
    for mode in ("plain", "hit", "miss", "ahead"):
        fn = jax.jit(functools.partial(chain, mode))
        jax.block_until_ready(fn(h, cache, stack, ex, weights))
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(h, cache, stack, ex, weights))
            ts.append(time.perf_counter() - t0)
        t[mode] = float(np.median(ts)) / reps
    del cache, tops
    out = {"compute_s": t["plain"], "cond_overhead_s": max(0.0, t["hit"] - t["plain"]),
           "copy_s": t["miss"] - t["hit"], "hidden_s": t["miss"] - t["ahead"]}
    out["cond_window_fraction"] = float(np.clip(out["hidden_s"] / max(out["compute_s"], 1e-12), 0.0, 1.0))
    log.info("conditional copies: %s", {k: round(v * 1e6, 1) if k.endswith("_s") else v for k, v in out.items()})
    return out


def cached_profile(engine) -> ModelProfile:
    """The model profile of `engine.model` with the default calibration tokens, computed once per model and
    number of predicted experts and kept on the model object (profiles depend on the weights, not the budget)."""
    store = engine.model.__dict__.setdefault("_profiles", {})
    key = (engine.n_predicted, engine.cfg.identity())
    if key not in store:
        store[key] = profile_model(engine)
    return store[key]


def plan_for(engine, granule: int = 128, profile: ModelProfile | None = None,
             hardware: HardwareProfile | None = None) -> CachePlan:
    """The engine's plan when none is given: profile the model, then `planner.solve` under the cache budget.

    `static` solves with allow_split=False, `moepic` with allow_split=True, `lru` gets the same number of
    whole-expert slots in every MoE layer (its rule then replaces occupants at run time). `moepic`'s frequency rule
    replaces occupants too; the solver still prices its hot set as static, which undercounts its hits. Plans are kept
    on the model, keyed by policy, cache budget, granule, devices and hardware profile.

    With n devices (`engine.n_dev`) the cache budget is per device: the plan is solved for n times that budget
    and then balanced so that every device caches the same number of its own experts (its hottest ones),
    which the static shapes of one program per device require (`_balance`).
    """
    key = (engine.policy, engine.cache_budget, granule, str(engine.devices), None if hardware is None
           else hardware.to_json(), None if profile is None else profile.to_json())
    plans = engine.model.__dict__.setdefault("_plans", {})
    if key not in plans:
        plans[key] = _plan_for(engine, granule, profile, hardware)
    return plans[key]


def _balance(plan: CachePlan, freq: np.ndarray, n_dev: int, slot_bytes_per_row: int, budget: int | None) -> CachePlan:
    """Every layer's cached set as the n_dev devices' own hottest experts, the same number on each device (device
    d owns the experts [d*E/n_dev, (d+1)*E/n_dev)), within `budget` bytes per device (None = no limit).

    Starts from N_l // n_dev slots per device (N_l = the global plan's cached count), then spends what the rounding
    freed one slot at a time, on the layer whose next slot catches the most routed pairs per byte (that slot holds
    every device's next hottest expert).
    """
    E = freq.shape[1]
    e_loc = E // n_dev
    ranked = [[np.argsort(-freq[l, d * e_loc:(d + 1) * e_loc], kind="stable") for d in range(n_dev)]
              for l in range(freq.shape[0])]
    n = [len(lp.cached) // n_dev for lp in plan.layers]
    split = [lp.split for lp in plan.layers]
    used = sum(n[l] * split[l] * slot_bytes_per_row for l in range(len(n)))
    while budget is not None:
        best, best_gain = None, 0.0
        for l in range(len(n)):
            cost = split[l] * slot_bytes_per_row
            if split[l] and n[l] < e_loc and used + cost <= budget:
                gain = sum(freq[l, d * e_loc + ranked[l][d][n[l]]] for d in range(n_dev)) / cost
                if gain > best_gain:
                    best, best_gain = l, gain
        if best is None:
            break
        used += split[best] * slot_bytes_per_row
        n[best] += 1
    layers = [LayerPlan(split[l] if n[l] else 0,
                        tuple(sorted(d * e_loc + int(j) for d in range(n_dev) for j in ranked[l][d][:n[l]])))
              for l in range(len(n))]
    return dataclasses.replace(plan, layers=tuple(layers))


def _plan_for(engine, granule, profile, hardware) -> CachePlan:
    cfg = engine.cfg
    E, F = cfg.n_experts, cfg.d_ff
    n_dev = getattr(engine, "n_dev", 1)
    budget = engine.cache_budget
    if budget is not None:
        budget *= n_dev  # the caches of all devices together
    n_moe = sum(cfg.moe_layers)
    expert = F * engine.row_bytes
    full = n_moe * E * expert
    budget = full if budget is None else max(0, min(budget, full))
    if engine.policy == "lru":
        n = min(E, budget // (n_moe * expert)) // n_dev * n_dev
        mp = profile or cached_profile(engine)
        layers = []
        for l in range(cfg.n_layers):
            if cfg.moe_layers[l] and n > 0:
                hot = np.argsort(-mp.freq[l], kind="stable")[:n]  # warm start with the hottest experts
                layers.append(LayerPlan(F, tuple(sorted(int(e) for e in hot))))
            else:
                layers.append(LayerPlan(0, ()))
        plan = CachePlan(layers=tuple(layers), budget_bytes=int(budget), model_id=cfg.identity())
        if n_dev > 1:
            plan = _balance(plan, mp.freq, n_dev, engine.row_bytes, engine.cache_budget)
        # Predict only where the cost model says it pays (LRU's hit rate is not the static one, but whether a
        # prefetch can hide and what its conditionals cost do not depend on which experts sit in the slots).
        return _with_best_prefetch(plan, mp, hardware or default_hardware(cfg.n_layers))
    mp = profile or cached_profile(engine)
    hw = hardware or default_hardware(cfg.n_layers)
    g = granule if F % granule == 0 and granule <= F else _largest_divisor_granule(F, granule)
    plan = solve(mp, hw, int(budget), granule=g, allow_split=engine.spec.allow_split)
    if n_dev > 1:  # balancing changes the cached sets: decide prefetch again for the plan that will run
        plan = _with_best_prefetch(_balance(plan, mp.freq, n_dev, engine.row_bytes, engine.cache_budget), mp, hw)
    log.info("plan for %s at %.3f GiB of cache (prefetch %s): %s", engine.policy, budget / 2**30,
             "on" if plan.prefetch else "off", [(lp.split, len(lp.cached)) for lp in plan.layers])
    return plan


def _with_best_prefetch(plan: CachePlan, mp: ModelProfile, hw: HardwareProfile) -> CachePlan:
    """`plan` with prediction on or off, whichever the cost model predicts faster (ties: on)."""
    on, off = (dataclasses.replace(plan, prefetch=p) for p in (True, False))
    return on if predicted_tpot(on, mp, hw) <= predicted_tpot(off, mp, hw) else off


def _largest_divisor_granule(F: int, granule: int) -> int:
    for g in range(min(granule, F), 0, -1):
        if F % g == 0:
            return g
    return 1


def save_json(obj, path) -> None:
    pathlib.Path(path).write_text(obj.to_json() if hasattr(obj, "to_json") else json.dumps(obj))

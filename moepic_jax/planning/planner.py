"""Cache planner: per-layer split point and cached experts under one VRAM budget (NumPy only).

MoEpic (Yan et al., arXiv 2509.08342) splits every expert along its neurons into a *top* segment (first `s`
neurons) and a *bottom* segment (the other `f - s`), keeps the top segments of hot experts on the device and
copies the rest host->device per token, prefetching the experts predicted for the next layer. This module picks,
for every decoder layer `l`, the split `s_l` and the number `N_l` of cached experts (the `N_l` most frequent ones)
so that the predicted time per output token (TPOT) is smallest under the cache budget. It follows the paper's
divide-and-conquer / fixed-point cache configuration (its "adaptive cache configuration" section); how the
fixed point simplifies under this cost model is explained below.

Notation (one decoder layer `l`, batch 1 decode)
------------------------------------------------
  E experts, k = top_k routed per token, f = d_ff neurons, d = d_model,
  beta = 3 * d * dtype_bytes            bytes of one neuron row (gate column, up column, down row), or the
                                        packed row of quantized experts (`ModelProfile.row_bytes`),
  p[l, e]                               probability that expert e is routed for a token (row sums to k),
  C_l, s_l, N_l = |C_l|                 cached experts, split, slots; P_l = sum_{e in C_l} p[l, e],
  rho_l                                 predictor recall (share of routed experts that were predicted; NaN = layer
                                        not predicted, e.g. layer 0 or no data -> no prefetch at all),
  k' = n_predicted (0 means k)          experts the predictor prefetches per layer,
  L_c = h2d_latency_s, B = h2d_bandwidth_Bps, c_l = layer_compute_s[l], a = window_fraction (or
  cond_window_fraction, see "Data-dependent copies"), o = cond_overhead_s.

Cost model
----------
Each routed expert costs at most ONE copy: a full hit (cached and s_l = f) copies nothing, a top-only hit
(cached, s_l < f) copies its bottom `(f - s_l) * beta` bytes, a miss copies the whole `f * beta` bytes. A layer
issues its copies together, in one copy step: they stream back to back over the link, so the fixed cost L_c of
the affine copy curve (HardwareProfile.copy_time_s) is paid once per step that copies anything, not per copy
(the H200 decode fits this, docs/notes/2026-11-30-benchmark-diary.md "Planner validation"). With byte times

    t_miss   = f * beta / B
    t_hit_l  = 0 if s_l == f else (f - s_l) * beta / B

the expected copies, bytes and copy time per token of layer l's routed experts are

    n_l = k - P_l * [s_l == f]                                    (copies)
    b_l = beta * (k * f - s_l * P_l)                               (bytes)
    t_l = P_l * t_hit_l + (k - P_l) * t_miss + L_c * (1 - [s_l == f, N_l >= k] * q_l^k)
        = b_l / B + L_c * P(the step copies anything)              (seconds), q_l = P_l / k

(the k routed experts taken as independent draws). A step whose routed experts are all full hits saves the
latency (possible only with N_l >= k); a top-only hit never does.

Prefetch: during layer l-1 the engine copies the missing segment of each of the k' experts predicted for layer l
(wrong guesses included: their copies are wasted but use the link). A routed expert was predicted with
probability rho_l; the rest is copied after routing (on demand), not hidden. Each predicted expert is cached with
probability q_l = P_l / k, so the number h of cached ones is ~ Binomial(k', q_l) and the prefetch takes
X_h = h * t_hit_l + (k' - h) * t_miss (+ L_c when X_h > 0). The stall is what the window W_{l-1} does not hide, in expectation over h:

    W_{l-1}    = a_l * c_{l-1}                                 (W_{-1} = 0)
    stall_l    = sum_h Binom(h; k', q_l) * max(0, X_h - W_{l-1})  (0 when the layer is not predicted)
    ondemand_l = (1 - rho_l) * b_l / B + L_c * (1 - P(no routed expert needs a copy after routing))
    T_l        = c_l + n_cond_l * o + stall_l + ondemand_l

where a routed expert needs an on-demand copy with probability r_l = (1 - rho_l)(1 - [s_l == f] q_l), so
P(none) = (1 - r_l)^k with N_l >= k, else rho_l^k (with fewer than k slots only prediction spares them all).
    TPOT       = sum_l T_l + extra_s

Data-dependent copies. How many experts a step copies is data, so the engine copies inside a conditional
(`lax.switch`) unless the count is known when compiling (batch 1, no cache, nothing predicted: the k routed experts,
or the k' predicted ones of a layer without cache, are always copied). On the H200 a conditional costs a fixed
`o = cond_overhead_s` (0.087 ms measured when the step assembled its experts' buffers, 0.036 ms since each expert is
computed inside the conditional) and the copies made inside it hardly overlap compute (`cond_window_fraction` 0.08,
then 0-0.02 measured; benchmarks/results/archive/probe_cond_stream.json, bench_policies_qwen15_validation2.json and
bench_policies_qwen15_2026-11-30.json). So, with C_l = [N_l > 0] and
Q_l = [layer l is predicted]:

    n_cond_l = C_l * Q_l + max(C_l, Q_l)   (the prefetch's conditional, the on-demand conditional)
    a_l      = window_fraction * (cond_window_fraction if C_l else 1)

`window_fraction` stays for unconditional prefetch copies. With direct copies (`HardwareProfile.direct`,
`offload/transfer.py`) there is no conditional: every MoE layer makes one copy call, n_cond_l = 1, and
a_l = window_fraction * cond_window_fraction whether the layer is cached or not. With a = 0 a prediction only adds its wasted copies and
its conditional, so the solver also decides whether to predict at all (`solve(prefetch=None)`, `CachePlan.prefetch`).

E[X] ~ (k'/k) * t_l, so with every X_h on the same side of the window this is the DESIGN.md starting model
`c_l + max(0, t_prefetch - W) + t_ondemand` (plus the wasted prefetches); the binomial only matters where the
window hides some tokens' prefetches and not others' -- which is exactly where caching the tops of many experts
(every token's prefetch a little smaller) can beat caching fewer whole experts (some tokens free, others not).
Under a linear stall it cannot: per cached byte, top rows and whole experts save the same `p[l, e] / B`, and whole
experts also save the latency, so the most frequent experts are cached whole. Dense layers (all-zero freq row):
T_l = c_l. Apart from the step from N_l = 0 to 1 (which may add a conditional), T_l is non-increasing in s_l and in
N_l; the solver keeps (0, 0) among each layer's options, so more budget never predicts a slower token.

Why the window does not depend on the neighbours: layer l's prefetch is issued once layer l-1 has routed, at the
same time as layer l-1's on-demand copies. With those queued first on the link, layer l-1 lasts
`c_{l-1} + stall + t_od_{l-1}` and its link is busy with its own copies for `t_od_{l-1}` of it, which leaves
exactly `c_{l-1}` of link time for layer l's prefetch, whatever layer l-1's plan is. (`window_fraction` < 1
accounts for the part of c_{l-1} that runs before the prediction exists.) So in MoEpic's alternation "fix the
windows, solve the layers, recompute the windows" the windows are already at their fixed point after the first
pass; the layers stay coupled only through the budget, which the multiplier below handles.

Solver (MoEpic's divide and conquer)
------------------------------------
1. Per layer, tabulate T_l and memory `m_l = N_l * s_l * beta` for every (s, N) of the candidate splits x
   {0..E} at once ([n_layers, n_splits, E + 1] arrays) and keep its Pareto frontier (memory up, time down).
2. Divide: for a multiplier lambda each layer independently minimises `T_l + lambda * m_l`.
   Conquer: bisect lambda (log scale) to the smallest one whose plan fits the budget.
3. Spend the budget left greedily (best TPOT gain per byte, one layer step at a time), then improve by pairwise
   exchanges (for each pair of layers, the best joint choice given what the others use) until nothing improves;
   this closes most of the Lagrangian duality gap (exact for two MoE layers).
A budget that holds every expert of every MoE layer whole caches everything whole (also zero-frequency experts).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from moepic_jax.planning.profiles import CachePlan, HardwareProfile, LayerPlan, ModelProfile, as_int


# ----------------------------------------------------------------------------------------------------------------
# cost model


def _check_hw(mp: ModelProfile, hw: HardwareProfile) -> None:
    if hw.layer_compute_s.shape != (mp.n_layers,):
        raise ValueError(f"HardwareProfile.layer_compute_s has {hw.layer_compute_s.shape[0]} layers, "
                         f"ModelProfile.freq has {mp.n_layers}; profile both on the same model")


def _layer_consts(mp: ModelProfile, hw: HardwareProfile):
    """Per-layer constants of the cost model, each [n_layers]: (k_l, rho, n_pf, previous layer's compute, compute)."""
    _check_hw(mp, hw)
    moe = np.array(mp.moe_layers, dtype=bool)
    k_l = np.where(moe, float(mp.top_k), 0.0)
    predicted = np.isfinite(mp.recall) & moe
    rho = np.where(predicted, np.nan_to_num(mp.recall), 0.0)
    n_pf = np.where(predicted, mp.n_predicted or mp.top_k, 0)
    c = hw.layer_compute_s
    return k_l, rho, n_pf, np.concatenate([[0.0], c[:-1]]), c


def _layer_time(p_c, split, n_cached, mp: ModelProfile, hw: HardwareProfile) -> dict:
    """Cost model of the module docstring for cached mass p_c, split s and N_l = n_cached experts cached (arrays;
    layers on axis 0, broadcasting).

    Returns a dict of arrays of the broadcast shape: t (expected routed copy time without prediction), stall,
    ondemand, overhead (n_cond_l * cond_overhead_s), layer (T_l).
    """
    p_c, split = np.asarray(p_c, dtype=np.float64), np.asarray(split, dtype=np.float64)
    n_cached = np.asarray(n_cached, dtype=np.float64)
    has_cache = (n_cached > 0) & (split > 0)
    nd = max(p_c.ndim, split.ndim, n_cached.ndim, 1)
    k_l, rho, n_pf, c_prev, c = (x.reshape((-1,) + (1,) * (nd - 1)) for x in _layer_consts(mp, hw))
    predicted = n_pf > 0
    if hw.direct:  # one copy call per MoE layer (its host round trip); every prefetch overlaps alike
        window = hw.window_fraction * hw.cond_window_fraction * c_prev
        overhead = np.where(k_l > 0, hw.cond_overhead_s, 0.0) + 0.0 * has_cache
    else:  # a prefetch into a cached layer is a conditional copy, which on some stacks cannot overlap compute
        window = hw.window_fraction * np.where(has_cache, hw.cond_window_fraction, 1.0) * c_prev
        overhead = ((has_cache & predicted).astype(np.float64) + (has_cache | predicted)) * hw.cond_overhead_s
    f, beta, lat, bw = mp.d_ff, mp.row_bytes, hw.h2d_latency_s, hw.h2d_bandwidth_Bps
    t_miss = f * beta / bw  # byte times; the latency is paid once per copy step (below)
    t_hit = np.where(split >= f, 0.0, (f - split) * beta / bw)
    q = np.clip(p_c / mp.top_k, 0.0, 1.0)
    full = (split >= f) & (n_cached >= k_l)  # k full hits are possible at all
    bytes_t = p_c * t_hit + (k_l - p_c) * t_miss  # b_l / B
    moe = k_l > 0
    t = bytes_t + lat * np.where(moe, 1.0 - np.where(full, q ** k_l, 0.0), 0.0)
    # after routing, a routed expert needs a copy unless it was predicted or is a full hit; the step pays the
    # latency unless none does (fewer than k slots: only prediction can spare every routed expert)
    r = (1.0 - rho) * (1.0 - np.where(split >= f, q, 0.0))
    p_none = np.where(full, (1.0 - r) ** k_l, rho ** k_l)
    # prefetch of n_pf predicted experts, h of them cached: h ~ Binomial(n_pf, q), q = P / k
    q = q[..., None]
    h = np.arange(int(n_pf.max()) + 1, dtype=np.float64)
    n = n_pf[..., None].astype(np.float64)
    comb = np.vectorize(math.comb, otypes=[np.float64])(n.astype(np.int64), h.astype(np.int64))
    pmf = comb * q**h * (1.0 - q) ** np.maximum(n - h, 0.0)
    x = h * t_hit[..., None] + np.maximum(n - h, 0.0) * t_miss
    x = x + lat * (x > 0)
    stall = np.sum(pmf * np.maximum(0.0, x - window[..., None]), axis=-1)
    ondemand = (1.0 - rho) * bytes_t + lat * np.where(moe, 1.0 - p_none, 0.0)
    return {"t": t, "prefetch": n_pf / mp.top_k * t, "stall": stall, "ondemand": ondemand, "overhead": overhead,
            "layer": c + overhead + stall + ondemand}


def without_prediction(mp: ModelProfile) -> ModelProfile:
    """The same profile with no layer predicted (recall and precision NaN): the cost of running without prefetch."""
    nan = np.full(mp.n_layers, np.nan)
    return dataclasses.replace(mp, recall=nan, precision=nan)


def plan_bytes(plan: CachePlan, mp: ModelProfile) -> int:
    """Device bytes of the top caches: sum_l len(cached_l) * split_l * beta (`ModelProfile.row_bytes`; exact int)."""
    return sum(len(lp.cached) * lp.split for lp in plan.layers) * mp.row_bytes


def plan_stats(plan: CachePlan, mp: ModelProfile, hw: HardwareProfile | None = None) -> dict:
    """Per-layer expectations of the cost model for one plan (what the engine's counters should measure).

    Returns a dict of [n_layers] float64 arrays: full_hit_rate, top_only_hit_rate, miss_rate (per routed expert;
    0 on dense layers), copies (routed copies per token), routed_bytes (bytes per token of routed experts),
    h2d_bytes (routed + wasted prefetch bytes per token); with hw also prefetch_s, ondemand_s, stall_s,
    overhead_s, layer_s (T_l, seconds); plus "tpot_s" (float, with hw). A plan with prefetch=False is costed
    without prediction.
    Raises ValueError if the plan does not fit the model (CachePlan.validate) or names another model_id.
    """
    plan.validate(mp.n_layers, mp.n_experts, mp.d_ff, mp.moe_layers)
    if plan.model_id and mp.model_id and plan.model_id != mp.model_id:
        raise ValueError(f"plan was solved for model_id {plan.model_id!r}, the profile is {mp.model_id!r}; re-plan")
    if not plan.prefetch:
        mp = without_prediction(mp)
    f, k = mp.d_ff, mp.top_k
    split = np.array([lp.split for lp in plan.layers], dtype=np.float64)
    p_c = np.array([mp.freq[l, list(lp.cached)].sum() for l, lp in enumerate(plan.layers)], dtype=np.float64)
    moe = np.array(mp.moe_layers, dtype=bool)
    full = (split == f) & (p_c > 0)
    k_l = np.where(moe, float(k), 0.0)
    n = np.maximum(k_l - np.where(full, p_c, 0.0), 0.0)
    b = mp.row_bytes * np.maximum(k_l * f - split * p_c, 0.0)
    hit = np.where(moe, p_c / k, 0.0)
    out = {
        "full_hit_rate": np.where(full, hit, 0.0),
        "top_only_hit_rate": np.where(full, 0.0, hit),
        "miss_rate": np.where(moe, 1.0 - hit, 0.0),
        "copies": n,
        "routed_bytes": b,
    }
    if hw is None:
        return out
    cost = _layer_time(p_c, split, np.array(plan.n_slots()), mp, hw)
    _, rho, n_pf, _, _ = _layer_consts(mp, hw)
    out["h2d_bytes"] = (n_pf / k + 1.0 - rho) * b
    out["prefetch_s"] = cost["prefetch"]
    out["ondemand_s"] = cost["ondemand"]
    out["stall_s"] = cost["stall"]
    out["overhead_s"] = cost["overhead"]
    out["layer_s"] = cost["layer"]
    out["tpot_s"] = float(out["layer_s"].sum() + hw.extra_s)
    return out


def predicted_tpot(plan: CachePlan, mp: ModelProfile, hw: HardwareProfile) -> float:
    """Predicted seconds per decoded token at batch 1: sum_l T_l + extra_s (module docstring, "Cost model").

    Uses the plan's actual cached sets (not necessarily the most frequent experts).
    Raises ValueError if the plan or the hardware profile does not match the model profile.
    """
    return plan_stats(plan, mp, hw)["tpot_s"]


# ----------------------------------------------------------------------------------------------------------------
# solver


def candidate_splits(d_ff: int, granule: int = 128, allow_split: bool = True,
                     splits: Sequence[int] | None = None) -> tuple[int, ...]:
    """Split points the solver may choose, sorted ascending, always including 0.

    allow_split=False: (0, d_ff). Explicit `splits`: those values plus 0 (each in [0, d_ff]). Otherwise the multiples
    of `granule` from 0 to d_ff; a granule >= d_ff gives (0, d_ff) (tiny models).
    Raises ValueError: granule <= 0, granule < d_ff not dividing d_ff, splits outside [0, d_ff], splits given with
    allow_split=False.
    """
    d_ff = as_int(d_ff, "d_ff")
    if not allow_split:
        if splits is not None:
            raise ValueError("allow_split=False uses only splits {0, d_ff}; do not pass splits= as well")
        return (0, d_ff)
    if splits is not None:
        vals = {as_int(s, "splits entry") for s in splits}
        bad = sorted(s for s in vals if not 0 <= s <= d_ff)
        if bad:
            raise ValueError(f"splits {bad} outside [0, d_ff={d_ff}]")
        return tuple(sorted(vals | {0}))
    granule = as_int(granule, "granule")
    if granule <= 0:
        raise ValueError(f"granule={granule} must be a positive number of neurons")
    if granule >= d_ff:
        return (0, d_ff)
    if d_ff % granule:
        raise ValueError(f"granule={granule} does not divide d_ff={d_ff}; pick a divisor of d_ff or pass splits=")
    return tuple(range(0, d_ff + 1, granule))


def _frontiers(mp: ModelProfile, hw: HardwareProfile, s_cand: np.ndarray):
    """Per-layer Pareto frontiers of (memory, T_l) over all (s, N) options.

    Returns FT, FM, FS, FN: [n_layers, F] time (s), memory (bytes), split index, N; padded with inf / 0;
    each row starts with (s=0, N=0) and is sorted by memory with strictly decreasing time.
    """
    n_layers, n_exp = mp.freq.shape
    beta = float(mp.row_bytes)
    order = np.argsort(-mp.freq, axis=1, kind="stable")  # most frequent first, ties -> lower id
    p_cum = np.concatenate([np.zeros((n_layers, 1)), np.cumsum(np.take_along_axis(mp.freq, order, 1), 1)], 1)
    s = s_cand.astype(np.float64)[None, :, None]  # [1, S, 1]
    n_slots = np.arange(n_exp + 1, dtype=np.float64)[None, None, :]  # [1, 1, E+1]
    time = _layer_time(p_cum[:, None, :], s, n_slots, mp, hw)["layer"].reshape(n_layers, -1)  # [L, S*(E+1)]
    mem = (n_slots * s * beta).reshape(-1)
    valid = (((s > 0) & (n_slots > 0)) | ((s == 0) & (n_slots == 0))).reshape(-1)
    moe = np.array(mp.moe_layers, dtype=bool)
    idx_all = np.flatnonzero(valid)
    rows = []
    for l in range(n_layers):
        idx = idx_all if moe[l] else idx_all[:1]
        o = idx[np.lexsort((idx, time[l, idx], mem[idx]))]
        tt = time[l, o]
        prev_best = np.concatenate([[np.inf], np.minimum.accumulate(tt)[:-1]])
        rows.append(o[tt < prev_best])
    width = max(len(r) for r in rows)
    ft = np.full((n_layers, width), np.inf)
    fm = np.full((n_layers, width), np.inf)
    fs = np.zeros((n_layers, width), dtype=np.int64)
    fn = np.zeros((n_layers, width), dtype=np.int64)
    for l, r in enumerate(rows):
        ft[l, :len(r)], fm[l, :len(r)] = time[l, r], mem[r]
        fs[l, :len(r)], fn[l, :len(r)] = np.divmod(r, n_exp + 1)
    return ft, fm, fs, fn, order


def _lagrange(ft: np.ndarray, fm: np.ndarray, budget: float) -> np.ndarray:
    """Divide and conquer: per layer argmin(T + lambda * mem), lambda bisected to the smallest feasible value."""
    rows = np.arange(ft.shape[0])
    fm0 = np.where(np.isfinite(fm), fm, 0.0)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(ft + lam * fm0, axis=1)

    def fits(p: np.ndarray) -> bool:
        return fm[rows, p].sum() <= budget

    if fits(pick(0.0)):
        return pick(0.0)
    # above hi every layer prefers (0, 0): hi = the largest time saved per byte over the first option
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(fm0 > 0, (ft[:, :1] - ft) / fm0, 0.0)
    hi = float(np.max(np.where(np.isfinite(ratio), ratio, 0.0))) * (1 + 1e-9) + 1e-300
    lo = hi * 1e-18
    if fits(pick(lo)):
        return pick(lo)
    for _ in range(200):
        if hi <= lo * (1 + 1e-13):
            break
        mid = math.sqrt(lo * hi)
        if fits(pick(mid)):
            hi = mid
        else:
            lo = mid
    return pick(hi)


def _fill(ft: np.ndarray, fm: np.ndarray, pos: np.ndarray, budget: float) -> np.ndarray:
    """Spend the budget left: repeatedly take the one-layer move with the best TPOT gain per extra byte."""
    rows = np.arange(ft.shape[0])
    pos = pos.copy()
    while True:
        left = budget - fm[rows, pos].sum()
        d_mem = fm - fm[rows, pos][:, None]
        d_time = ft[rows, pos][:, None] - ft
        ok = (d_mem > 0) & (d_mem <= left) & (d_time > 0)
        if not ok.any():
            return pos
        gain = np.where(ok, d_time / np.where(ok, d_mem, 1.0), -1.0)
        l, q = np.unravel_index(np.argmax(gain), gain.shape)
        pos[l] = q


def _exchange(ft: np.ndarray, fm: np.ndarray, pos: np.ndarray, budget: float, max_sweeps: int = 20) -> np.ndarray:
    """Pairwise exchange: for each pair of layers, the best joint pair of options given the others' memory."""
    rows = np.arange(ft.shape[0])
    lens = np.isfinite(fm).sum(axis=1)
    layers = [l for l in rows if lens[l] > 1]
    pos = pos.copy()
    for _ in range(max_sweeps):
        improved = False
        for a, i in enumerate(layers):
            for j in layers[a + 1:]:
                room = budget - fm[rows, pos].sum() + fm[i, pos[i]] + fm[j, pos[j]]
                n_i = int(np.searchsorted(fm[i, :lens[i]], room, side="right"))
                q_j = np.searchsorted(fm[j, :lens[j]], room - fm[i, :n_i], side="right") - 1
                total = ft[i, :n_i] + ft[j, q_j]
                q_i = int(np.argmin(total))
                current = ft[i, pos[i]] + ft[j, pos[j]]
                if total[q_i] < current - 1e-12 * abs(current):
                    pos[i], pos[j] = q_i, q_j[q_i]
                    improved = True
        pos = _fill(ft, fm, pos, budget)
        if not improved:
            break
    return pos


def solve(mp: ModelProfile, hw: HardwareProfile, budget_bytes: int, granule: int = 128, allow_split: bool = True,
          splits: Sequence[int] | None = None, prefetch: bool | None = None) -> CachePlan:
    """Choose each layer's split s_l and cached experts to minimise predicted_tpot under plan_bytes <= budget_bytes.

    MoEpic's divide-and-conquer cache configuration (arXiv 2509.08342): Lagrangian multiplier on memory, each layer
    solved independently and vectorised over all (s, N) pairs, bisection on the multiplier, the prefetch windows at
    their fixed point (here after one pass, see the module docstring), then greedy fill and pairwise exchange.

    Args:
      mp: model profile (freq [n_layers, n_experts], recall [n_layers], sizes).
      hw: hardware profile (layer_compute_s [n_layers] must match mp).
      budget_bytes: device bytes for the top caches (int >= 0).
      granule, allow_split, splits: candidate split points, see candidate_splits().
      prefetch: True = the engine predicts (as the profile's recall says), False = it does not; None = solve both
        ways and keep the faster plan (ties: prefetch).
    Returns:
      CachePlan with, per MoE layer, the N_l most frequent experts (ties -> lower id) cached with split s_l; N_l = 0
      is written split 0, cached (). Dense layers: split 0, cached (). `prefetch` as chosen. Deterministic.
    Raises:
      ValueError: negative budget, profiles that do not match, bad granule / splits.
    """
    budget = as_int(budget_bytes, "budget_bytes")
    if budget < 0:
        raise ValueError(f"budget_bytes={budget} is negative")
    _check_hw(mp, hw)
    if prefetch is None:
        with_pf = solve(mp, hw, budget, granule, allow_split, splits, prefetch=True)
        without = solve(mp, hw, budget, granule, allow_split, splits, prefetch=False)
        return with_pf if predicted_tpot(with_pf, mp, hw) <= predicted_tpot(without, mp, hw) else without
    plan_mp = mp if prefetch else without_prediction(mp)
    s_cand = np.array(candidate_splits(mp.d_ff, granule, allow_split, splits), dtype=np.int64)
    moe = mp.moe_layers
    if mp.d_ff in s_cand and budget >= mp.full_cache_bytes:
        every = tuple(range(mp.n_experts))
        layers = tuple(LayerPlan(mp.d_ff, every) if m else LayerPlan() for m in moe)
        return CachePlan(layers, budget, mp.model_id, prefetch)
    ft, fm, fs, fn, order = _frontiers(plan_mp, hw, s_cand)
    pos = _lagrange(ft, fm, float(budget))
    pos = _exchange(ft, fm, _fill(ft, fm, pos, float(budget)), float(budget))
    layers = []
    for l in range(mp.n_layers):
        n_l = int(fn[l, pos[l]])
        if n_l == 0:
            layers.append(LayerPlan())
        else:
            layers.append(LayerPlan(int(s_cand[fs[l, pos[l]]]), tuple(int(e) for e in order[l, :n_l])))
    plan = CachePlan(tuple(layers), budget, mp.model_id, prefetch)
    if plan_bytes(plan, mp) > budget:  # float rounding guard; never expected
        raise RuntimeError(f"solver produced {plan_bytes(plan, mp)} bytes over the budget {budget}")
    return plan

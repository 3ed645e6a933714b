"""The plan of a policy: what each policy caches, from a model profile, a hardware profile and a cache budget.

NumPy only. `static` solves with allow_split=False, `moepic` with allow_split=True (`planner.solve`), `lru` gets the
same number of whole-expert slots in every MoE layer, warm-started with the hottest experts (its rule then replaces
occupants at run time). `moepic`'s frequency rule replaces occupants too; the solver still prices its hot set as
static, which undercounts its hits. Which of these a policy uses is `PolicySpec.plan` (`offload/policies.py`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from moepic_jax.config import MoEConfig
from moepic_jax.offload.policies import PolicySpec
from moepic_jax.planning.planner import predicted_tpot, solve
from moepic_jax.planning.profiles import CachePlan, HardwareProfile, LayerPlan, ModelProfile

log = logging.getLogger(__name__)


def empty_plan(cfg: MoEConfig) -> CachePlan:
    """Nothing cached, no prediction (`ondemand`)."""
    return CachePlan(layers=tuple(LayerPlan(0, ()) for _ in cfg.moe_layers), budget_bytes=0, model_id=cfg.identity(),
                     prefetch=False)


def plan_for_policy(spec: PolicySpec, cfg: MoEConfig, mp: ModelProfile, hw: HardwareProfile, cache_budget: int | None,
                    row_bytes: int, n_dev: int = 1, granule: int = 128) -> CachePlan:
    """The plan of policy `spec` for a cache budget.

    Args:
      cache_budget: bytes per device the caches may hold (None: no limit, every expert cached whole).
      row_bytes: bytes of one neuron of one expert (3 * d_model * dtype bytes).
      n_dev: devices of the expert axis. With n devices the plan is solved for n times the per-device budget and
        then balanced so that every device caches the same number of its own experts (its hottest ones), which the
        static shapes of one program per device require (`balance`).
      granule: split granularity in neurons (the largest divisor of d_ff not above it is used).
    """
    if spec.plan == "none":
        return empty_plan(cfg)
    E, F = cfg.n_experts, cfg.d_ff
    budget = None if cache_budget is None else cache_budget * n_dev  # the caches of all devices together
    n_moe = sum(cfg.moe_layers)
    expert = F * row_bytes
    full = n_moe * E * expert
    budget = full if budget is None else max(0, min(budget, full))
    if spec.plan == "slots":
        n = min(E, budget // (n_moe * expert)) // n_dev * n_dev
        layers = []
        for l in range(cfg.n_layers):
            if cfg.moe_layers[l] and n > 0:
                hot = np.argsort(-mp.freq[l], kind="stable")[:n]  # warm start with the hottest experts
                layers.append(LayerPlan(F, tuple(sorted(int(e) for e in hot))))
            else:
                layers.append(LayerPlan(0, ()))
        plan = CachePlan(layers=tuple(layers), budget_bytes=int(budget), model_id=cfg.identity())
        if n_dev > 1:
            plan = balance(plan, mp.freq, n_dev, row_bytes, cache_budget)
        # Predict only where the cost model says it pays (LRU's hit rate is not the static one, but whether a
        # prefetch can hide and what its conditionals cost do not depend on which experts sit in the slots).
        return with_best_prefetch(plan, mp, hw)
    g = granule if F % granule == 0 and granule <= F else largest_divisor_granule(F, granule)
    plan = solve(mp, hw, int(budget), granule=g, allow_split=spec.allow_split)
    if n_dev > 1:  # balancing changes the cached sets: decide prefetch again for the plan that will run
        plan = with_best_prefetch(balance(plan, mp.freq, n_dev, row_bytes, cache_budget), mp, hw)
    log.info("plan for %s at %.3f GiB of cache (prefetch %s): %s", spec.name, budget / 2**30,
             "on" if plan.prefetch else "off", [(lp.split, len(lp.cached)) for lp in plan.layers])
    return plan


def balance(plan: CachePlan, freq: np.ndarray, n_dev: int, slot_bytes_per_row: int, budget: int | None) -> CachePlan:
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


def with_best_prefetch(plan: CachePlan, mp: ModelProfile, hw: HardwareProfile) -> CachePlan:
    """`plan` with prediction on or off, whichever the cost model predicts faster (ties: on)."""
    on, off = (dataclasses.replace(plan, prefetch=p) for p in (True, False))
    return on if predicted_tpot(on, mp, hw) <= predicted_tpot(off, mp, hw) else off


def largest_divisor_granule(F: int, granule: int) -> int:
    """The largest divisor of F not above `granule`."""
    for g in range(min(granule, F), 0, -1):
        if F % g == 0:
            return g
    return 1

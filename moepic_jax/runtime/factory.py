"""Building an engine: check the arguments, place the weights, size the budget, calibrate, solve the plan, then
construct the engine with that plan. `EngineCache` keeps what is worth keeping between calls (placed weights,
model profiles, engines); `generate` owns one (`generate.ENGINES`), callers may hold their own.
"""

from __future__ import annotations

import gc
import logging
import hashlib
import os
import weakref

import numpy as np

from moepic_jax import model as M
from moepic_jax.io.loading import Model
from moepic_jax.offload import memory, transfer
from moepic_jax.offload.decode import RoutingTrace
from moepic_jax.offload.memory import below_minimum, offload_fixed_bytes, parse_budget, resolve_budget, tree_bytes
from moepic_jax.offload.placement import make_placement
from moepic_jax.offload.policies import policy_spec
from moepic_jax.offload.store import PlacedWeights, place_weights
from moepic_jax.planning import calibrate
from moepic_jax.planning.plans import empty_plan, plan_for_policy
from moepic_jax.planning.profiles import CachePlan, HardwareProfile, ModelProfile
from moepic_jax.runtime.engine import OffloadEngine, ResidentEngine

log = logging.getLogger(__name__)


class EngineCache:
    """What building engines for one model at a time can reuse: the placed weights (pinned experts), model profiles
    (they depend on the weights and k', not on the budget) and the engines themselves, keyed by their arguments.

    One model at a time: asking for another model (or `clear()`) drops everything held for the previous one, so
    that its device and pinned memory can be freed.
    """

    def __init__(self):
        self._model = None  # weakref to the model everything below belongs to
        self.placed: dict = {}  # str(devices) -> PlacedWeights
        self.profiles: dict = {}  # (k', model identity) -> ModelProfile
        self.engines: dict = {}  # key -> engine

    def for_model(self, model: Model) -> EngineCache:
        """Self, emptied first when it held another model's state."""
        if self._model is None or self._model() is not model:
            self.clear()
            self._model = ref = weakref.ref(model)
            # Nothing here references the model, so when the caller drops it, this frees what was held for it
            # (unless another model has taken its place by then).
            weakref.finalize(model, lambda: self.clear() if self._model is ref else None)
        return self

    def clear(self) -> None:
        """Drop every engine, profile and placed weights held."""
        self.placed.clear()
        self.profiles.clear()
        self.engines.clear()
        self._model = None
        gc.collect()  # engines hold compiled executables; free their device buffers now, not at the next GC

    def weights(self, place, progress: bool = False) -> PlacedWeights:
        """The held model's weights placed on `place` (`offload.store.place_weights`), placed once per device set.
        `progress`: a progress bar while the experts are pinned (tqdm, stderr)."""
        key = str(place.devices)
        if key not in self.placed:
            self.placed.clear()  # one placement at a time: each holds the experts in pinned memory
            self.placed[key] = place_weights(self._model(), place, progress)
        return self.placed[key]

    def profile(self, weights: PlacedWeights, n_predicted: int, progress: bool = False) -> ModelProfile:
        """The model profile on the default calibration tokens (`calibrate.profile_model`), computed once per k'.
        `progress`: a progress bar over the layers while it is computed (tqdm, stderr)."""
        key = (n_predicted, weights.cfg.identity())
        if key not in self.profiles:
            self.profiles[key] = calibrate.profile_model(weights, n_predicted=n_predicted, progress=progress)
        return self.profiles[key]

    def drop_engines(self) -> None:
        """Drop the engines (keep the placed weights and profiles): each engine holds device memory."""
        self.engines.clear()
        gc.collect()


def make_engine(model: Model, policy: str = "moepic", vram_budget="auto", plan: CachePlan | None = None, *,
                n_predicted: int | None = None, max_batch: int = 1, max_seq_len: int = 1024, granule: int = 128,
                profile: ModelProfile | None = None, hardware: HardwareProfile | None = None, devices=None,
                prefetch: bool | None = None, adapt_to_prompt: bool = False, routing=None,
                cache: EngineCache | None = None, direct: bool | str = "auto", progress: bool = False):
    """Build the engine of `policy` for `model` under `vram_budget` (see `offload.memory.parse_budget`).

    Offloading policies: place the weights (experts pinned, the rest on the device), take the fixed part off the
    budget, make the plan unless one is given (profile the model with `calibrate.profile_model` unless `profile` is
    given; the hardware profile is `hardware` or `calibrate.default_hardware`), then build the `OffloadEngine`
    with that plan and a re-plan callback for warm-up (only for plans made here).

    Args:
      policy: a name of `offload.policies.POLICIES`.
      plan: a `CachePlan` (static/moepic/lru); None = made here. `ondemand` takes none.
      n_predicted: experts predicted per token for the next layer (k'); default top_k.
      max_batch, max_seq_len: the largest KV cache the engine reserves in its budget.
      granule: split granularity in neurons for the plan made here.
      devices: None (the default device), a device count, or a list of `jax.Device`; with several, the experts are
        split over an `expert` mesh axis (`offload/placement.py`) and `vram_budget` is per device.
      prefetch: None = as the plan says; True / False force next-layer prediction on / off.
      adapt_to_prompt: see `OffloadEngine`.
      routing: a `RoutingTrace` (or the path of a trace .npz) that the decode step replays instead of the routers
        (benchmarks; see `offload/decode.py`). Offloading policies only.
      cache: an `EngineCache` whose placed weights and profiles are reused (None: nothing kept).
      direct: "auto" (default): decode with direct copies (`OffloadEngine`, `offload/transfer.py`) on one GPU where
        they build, with the conditional copy step elsewhere (CPU, several devices); True / False force either.
        On an H100 under calibrated routing direct copies decoded 7-13 % faster than the conditional step, and 17 %
        slower where 84 % of routed experts hit the cache (docs/notes/2026-12-07-async-direct-copies.md).
      progress: show progress bars (tqdm, stderr) while the experts are pinned and the model is profiled.
    Raises:
      ValueError: unknown policy; bad arguments; a budget below what the policy needs (the message names the
        minimum); a plan that does not fit the model or the budget.
    """
    spec = policy_spec(policy)
    if not spec.offloads and routing is not None:
        raise ValueError("routing= replays routing in the offloaded decode step; use an offloading policy")
    if not spec.offloads:
        if devices is not None and (devices != 1 if isinstance(devices, int) else len(list(devices)) != 1):
            raise ValueError("policy 'resident' runs on one device; to spread the experts over several devices use an "
                             "offloading policy (e.g. policy='moepic', devices=2)")
        return ResidentEngine(model, vram_budget)
    cfg = model.cfg
    n_predicted = cfg.top_k if n_predicted is None else int(n_predicted)
    if not 0 <= n_predicted <= cfg.n_experts:
        raise ValueError(f"n_predicted={n_predicted} must be in [0, n_experts={cfg.n_experts}]")
    if not (prefetch is None or isinstance(prefetch, bool)):
        raise ValueError(f"prefetch must be None, True or False, got {prefetch!r}")
    if prefetch and not spec.predicts:
        raise ValueError(f"policy {policy!r} never predicts the next layer's experts; prefetch=True needs lru, "
                         "static or moepic")
    if not isinstance(adapt_to_prompt, bool):
        raise ValueError(f"adapt_to_prompt must be True or False, got {adapt_to_prompt!r}")
    if isinstance(routing, (str, os.PathLike)):
        routing = RoutingTrace.load(routing)
    if routing is not None:
        routing.check(cfg, n_predicted)
    if spec.plan == "none" and plan is not None:
        raise ValueError(f"policy {policy!r} caches nothing; do not pass a plan")
    given = parse_budget(vram_budget)
    place = make_placement(devices, cfg.n_experts)
    weights = _placed(model, place, cache, progress)
    fixed = offload_fixed_bytes(cfg, weights.dtype.itemsize, tree_bytes(weights.resident), place.e_loc, n_predicted,
                                spec.predicts if prefetch is None else prefetch, max_batch, max_seq_len,
                                place.device.platform)
    direct = uses_direct(direct, place)
    budget = resolve_budget(given, fixed, model.expert_bytes() // place.n_dev, place.device)
    if given.kind == "auto" and plan is not None and place.device.platform == "cpu":
        # "auto" with the caller's own plan on the CPU: room for that plan's caches (host memory is not scarce)
        row_bytes = cfg.expert_row_bytes(weights.dtype.itemsize)
        budget = fixed + sum(len(lp.cached) * lp.split * row_bytes for lp in plan.layers) // place.n_dev
    if given.kind == "auto" and place.n_dev == 1 and place.device.platform != "cpu" and routing is None and (
            model.weight_bytes() + M.kv_cache_bytes(cfg, max_batch, max_seq_len, weights.dtype.itemsize)
            + memory.workspace_bytes(place.device.platform, 0) <= budget):
        return ResidentEngine(model, budget)  # "auto": the whole model fits the free memory
    if budget is not None and budget < fixed:
        raise below_minimum(given, budget, fixed, f"policy {policy!r} (non-expert weights, KV cache for {max_batch} x "
                            f"{max_seq_len} tokens, copy buffers, workspace)")
    replan = None
    if spec.plan == "none":
        plan = empty_plan(cfg)
    elif plan is None:
        mp = profile or _profile(weights, n_predicted, cache, progress)
        hw = hardware or calibrate.default_hardware(cfg.n_layers, direct=direct)
        if hw.direct != direct:
            log.warning("the hardware profile was measured for %s, the engine runs %s: the plan prices the wrong "
                        "copies (measure_hardware(weights, direct=%s))",
                        *(("direct copies", "the conditional copy step") if hw.direct else
                          ("the conditional copy step", "direct copies")), direct)
        row_bytes = cfg.expert_row_bytes(weights.dtype.itemsize)

        def replan(cache_budget):
            return plan_for_policy(spec, cfg, mp, hw, cache_budget, row_bytes, place.n_dev, granule)

        plan = replan(None if budget is None else budget - fixed)
    return OffloadEngine(weights, spec, plan, budget, n_predicted, max_batch=max_batch, max_seq_len=max_seq_len,
                         prefetch=prefetch, adapt_to_prompt=adapt_to_prompt, replan=replan, routing=routing,
                         direct=direct, budget_follows_minimum=given.kind == "share" or (given.kind == "auto" and
                                                                          place.device.platform == "cpu"))


def uses_direct(direct: bool | str, place) -> bool:
    """Whether an engine on `place` decodes with direct copies: `direct` as given, or for "auto" on one GPU where
    the library builds (`transfer.available`). Raises ValueError for any other value."""
    if isinstance(direct, bool):
        return direct
    if direct != "auto":
        raise ValueError(f"direct must be 'auto', True or False, got {direct!r}")
    return place.n_dev == 1 and place.device.platform == "gpu" and transfer.available(place.device)


def _placed(model: Model, place, cache: EngineCache | None, progress: bool = False) -> PlacedWeights:
    """The model's weights placed on `place` (kept in `cache` for the next engine on the same devices)."""
    return place_weights(model, place, progress) if cache is None else cache.for_model(model).weights(place, progress)


def _profile(weights: PlacedWeights, n_predicted: int, cache: EngineCache | None, progress: bool = False
             ) -> ModelProfile:
    """The model profile on the default calibration tokens (kept in `cache`: it depends on the weights and k')."""
    if cache is None:
        return calibrate.profile_model(weights, n_predicted=n_predicted, progress=progress)
    return cache.profile(weights, n_predicted, progress)


def engine_key(policy: str, vram_budget, plan, engine_kw: dict):
    """A hashable key of an engine's arguments (profiles and plans keyed by their JSON)."""
    def hashable(v):
        if hasattr(v, "to_json"):
            return v.to_json()
        if isinstance(v, RoutingTrace):  # arrays: keyed by their contents
            return hashlib.sha1(b"".join(np.asarray(x).tobytes() for x in v)).hexdigest()
        if isinstance(v, (list, tuple)):
            return tuple(v)
        return v

    return (policy, str(vram_budget), None if plan is None else plan.to_json(),
            tuple(sorted((k, hashable(v)) for k, v in engine_kw.items())))


__all__ = ["EngineCache", "engine_key", "make_engine"]

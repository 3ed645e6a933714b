"""The explicit engine cache (`runtime.factory.EngineCache`, `moepic_jax.ENGINES`) and the "auto" budget on a GPU."""

import gc
import types

import numpy as np
import pytest

import moepic_jax
from moepic_jax.offload.decode import RoutingTrace
from moepic_jax.offload.memory import AUTO_GPU_MARGIN_BYTES, Budget, resolve_budget
from moepic_jax.offload.placement import make_placement
from moepic_jax.runtime.factory import EngineCache


def test_the_cache_places_and_profiles_once_per_model_and_forgets_a_dropped_model(hf_dirs):
    cache = EngineCache()
    m = moepic_jax.load(hf_dirs["qwen3_moe"], dtype="float32")
    place = make_placement(None, m.cfg.n_experts)
    w = cache.for_model(m).weights(place)
    assert cache.for_model(m).weights(place) is w  # placed once
    assert all(s is lp.moe.experts for s, lp in zip(w.stacks, m.params.layers))  # the model's pinned experts, no copy
    mp = cache.profile(w, m.cfg.top_k)
    assert cache.profile(w, m.cfg.top_k) is mp and mp.freq.shape == (m.cfg.n_layers, m.cfg.n_experts)
    other = moepic_jax.load(hf_dirs["mixtral"], dtype="float32")
    cache.for_model(other)  # another model: what was held for the first one goes
    assert not cache.placed and not cache.profiles
    cache.for_model(m).weights(place)
    del m, w
    gc.collect()
    assert not cache.placed  # the model was dropped: its placed weights went with it


def test_generate_reuses_its_engine_for_the_same_routing_trace(hf_dirs):
    m = moepic_jax.load(hf_dirs["qwen3_moe"], dtype="float32")
    cfg = m.cfg
    rng = np.random.RandomState(0)
    ids = np.stack([[rng.choice(cfg.n_experts, cfg.top_k, replace=False) for _ in range(cfg.n_layers)]
                    for _ in range(6)]).astype(np.int32)
    pred = ids.copy()
    pred[:, 0] = -1
    trace = RoutingTrace(ids, np.full(ids.shape, 1 / cfg.top_k, np.float32), pred)
    kw = dict(model=m, max_new_tokens=4, policy="lru", vram_budget="30%", routing=trace, granule=16)
    first = moepic_jax.generate([1, 2, 3], **kw)
    again = moepic_jax.generate([1, 2, 3], **kw)
    assert first.stats.compile_count > 0 and again.stats.compile_count == 0  # the same engine, keyed by contents
    copy = RoutingTrace(*(x.copy() for x in trace))
    assert moepic_jax.generate([1, 2, 3], **{**kw, "routing": copy}).stats.compile_count == 0
    assert len(moepic_jax.ENGINES.engines) == 1


@pytest.mark.parametrize("limit, in_use", [(80 * 2**30, 2 * 2**30), (24 * 2**30, 20 * 2**30)])
def test_auto_budget_on_a_gpu_is_its_free_memory_less_the_margin(limit, in_use):
    gpu = types.SimpleNamespace(platform="gpu", memory_stats=lambda: {"bytes_limit": limit, "bytes_in_use": in_use})
    want = int((limit - in_use) * 0.95) - AUTO_GPU_MARGIN_BYTES
    assert resolve_budget(Budget("auto"), 10**9, 10**10, gpu) == want
    cpu = types.SimpleNamespace(platform="cpu", memory_stats=lambda: None)
    assert resolve_budget(Budget("auto"), 100, 1000, cpu) == 100 + 250  # the minimum plus 25 % of the experts

"""Trace-driven routing (`routing=`): the offloaded decode step replays a scripted routing trace through the product
path, and its hit counters equal a pure-Python replay of each policy's rule from the plan's slots.

The replay knows nothing of the engine: per MoE layer it starts from the plan's cached experts (slot order) and
split, classifies each step's routed experts (full hit: cached with split == d_ff; top-only hit: cached with a
smaller split; miss), then applies the rule: none (ondemand, static), LRU (an OrderedDict) or the frequency rule
(decayed counts with the admission filter, one admission at a time).
"""

import collections

import jax.numpy as jnp
import numpy as np
import pytest

import moepic_jax
from moepic_jax.offload.cache import FREQ_DECAY
from moepic_jax.offload.decode import RoutingTrace
from moepic_jax.planning.profiles import CachePlan, LayerPlan
from moepic_jax.runtime.factory import make_engine

KW = dict(granule=16, max_batch=1, max_seq_len=32)
STEPS = 12


@pytest.fixture(scope="module")
def model(hf_dirs):
    return moepic_jax.load(hf_dirs["qwen2_moe"], dtype="float32")  # 3 layers, layer 1 dense, 8 experts, top-2


def scripted_trace(cfg, T: int, seed: int) -> RoutingTrace:
    """Skewed routing (a few hot experts), -1 in dense layers; predictions: each routed expert kept with
    probability 0.7, the rest filled with other experts; none for layer 0."""
    rng = np.random.RandomState(seed)
    L, K, E = cfg.n_layers, cfg.top_k, cfg.n_experts
    p = np.arange(E, 0, -1, dtype=float) ** 2
    p /= p.sum()
    ids = np.full((T, L, K), -1, np.int32)
    pred = np.full((T, L, K), -1, np.int32)
    for t in range(T):
        for l in range(L):
            if not cfg.moe_layers[l]:
                continue
            ids[t, l] = rng.choice(E, K, replace=False, p=p)
            if l > 0:
                keep = [int(e) for e in ids[t, l] if rng.rand() < 0.7]
                others = [int(e) for e in rng.permutation(E) if e not in ids[t, l]]
                pred[t, l] = (keep + others)[:K]
    w = rng.dirichlet(np.ones(K), size=(T, L)).astype(np.float32)
    return RoutingTrace(ids, w, pred)


def replay(rule: str, steps: list[list[int]], cached: tuple, split: int, d_ff: int):
    """[(full hits, top-only hits, misses)] per step of `rule` from the plan's slots `cached`."""
    slots = list(cached) if split else []
    lru = collections.OrderedDict((e, None) for e in slots)  # slot order = age order at equal stamps
    score = np.zeros(64, np.float32)
    out = []
    for step in steps:
        used = sorted(step)  # the step handles its distinct experts in ascending order
        resident = set(lru) if rule == "lru" else set(slots)
        hits = sum(e in resident for e in used)
        out.append((hits if split == d_ff else 0, hits if split < d_ff else 0, len(used) - hits))
        if rule == "lru" and slots:
            for e in [e for e in used if e in resident] + [e for e in used if e not in resident]:
                if e in lru:
                    lru.move_to_end(e)
                else:
                    lru.popitem(last=False)
                    lru[e] = None
        if rule == "freq" and slots:
            score = score * np.float32(FREQ_DECAY)
            for e in used:
                score[e] += np.float32(1)
            for e in sorted((e for e in used if e not in slots), key=lambda e: -score[e]):
                free = [i for i, o in enumerate(slots) if o not in used]
                if not free:
                    break
                victim = min(free, key=lambda i: (score[slots[i]], i))
                if not score[e] > score[slots[victim]]:
                    break
                slots[victim] = e
    return out


@pytest.mark.parametrize("policy", ["ondemand", "lru", "static", "moepic", "moepic-split"])
def test_traced_counters_equal_the_replay(policy, model):
    cfg = model.cfg
    trace = scripted_trace(cfg, T=8, seed=3)  # shorter than the decode: rows wrap around
    base = make_engine(model, "ondemand", **KW).fixed_bytes
    kw = dict(KW) if policy == "ondemand" else {**KW, "prefetch": True}
    budget = base + int(0.4 * model.expert_bytes())
    if policy == "moepic-split":  # top segments of half the neurons for experts 0-3 (the trace's hottest)
        policy, budget = "moepic", None
        kw["plan"] = CachePlan(layers=tuple(LayerPlan(32, (0, 1, 2, 3)) if moe else LayerPlan(0, ())
                                            for moe in cfg.moe_layers), budget_bytes=0)
    eng = make_engine(model, policy, vram_budget=budget, routing=trace, **kw)
    state = eng.new_state(1, 32)
    toks = jnp.asarray([[5, 6, 7, 8]], jnp.int32)
    _, state, _ = eng.prefill(state, toks, jnp.ones(toks.shape, bool))
    got = []
    for _ in range(STEPS):
        _, state, c = eng.decode(state, jnp.asarray([1], jnp.int32))
        got.append({k: np.asarray(v) for k, v in c.items()})
    rule = {"ondemand": "static", "lru": "lru", "static": "static", "moepic": "freq"}[policy]
    splits = set()
    for l in cfg.moe_layer_ids:
        lp = eng.cache_plan.layers[l]
        splits.add(lp.split)
        steps = [[int(e) for e in trace.ids[n % 8, l]] for n in range(STEPS)]
        want = replay(rule, steps, lp.cached, lp.split, cfg.d_ff)
        have = [(int(c["full_hits"][l]), int(c["top_hits"][l]), int(c["misses"][l])) for c in got]
        assert have == want, (policy, l)
        if policy != "ondemand":  # the prefetch counted the trace's predictions, not the router's
            pred = [len(set(trace.ids[n % 8, l].tolist()) & set(trace.predicted[n % 8, l].tolist())) if l else 0
                    for n in range(STEPS)]
            assert [int(c["predicted"][l]) for c in got] == pred
    total = np.sum([[c["full_hits"].sum(), c["top_hits"].sum(), c["misses"].sum()] for c in got], axis=0)
    assert total.sum() == STEPS * len(cfg.moe_layer_ids) * cfg.top_k
    if policy != "ondemand":
        assert total[0] + total[1] > 0  # the plan caches something the trace routes to
    if "plan" in kw:
        assert splits == {32} and total[1] > 0  # top-only hits are exercised


def test_bad_traces_are_refused(model, tmp_path):
    cfg = model.cfg
    tr = scripted_trace(cfg, T=4, seed=0)
    with pytest.raises(ValueError, match="top_k"):
        make_engine(model, "lru", routing=RoutingTrace(tr.ids[:, :, :1], tr.weights[:, :, :1], tr.predicted), **KW)
    bad = tr.ids.copy()
    bad[0, 0] = [3, 3]
    with pytest.raises(ValueError, match="twice"):
        make_engine(model, "lru", routing=RoutingTrace(bad, tr.weights, tr.predicted), **KW)
    with pytest.raises(ValueError, match="offloading policy"):
        make_engine(model, "resident", routing=tr)
    np.savez(tmp_path / "t.npz", ids=tr.ids, weights=tr.weights)
    with pytest.raises(ValueError, match="lacks"):
        make_engine(model, "lru", routing=tmp_path / "t.npz", **KW)

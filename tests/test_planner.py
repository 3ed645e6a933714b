"""Tests for moepic_jax.planning.planner: cost model, solver against brute force, dataclasses and errors (CPU, NumPy)."""

import dataclasses
import itertools
import json
import math

import numpy as np
import pytest

from moepic_jax.planning.planner import (
    CachePlan,
    HardwareProfile,
    LayerPlan,
    ModelProfile,
    candidate_splits,
    plan_bytes,
    plan_stats,
    predicted_tpot,
    solve,
)

D_MODEL, DTYPE_BYTES = 1024, 2
BETA = 3 * D_MODEL * DTYPE_BYTES


def routed_freq(rng, n_experts, k, alpha, n_tokens=400):
    """[n_experts] routing frequencies from simulated top-k routing with Dirichlet(alpha) expert popularity."""
    w = rng.dirichlet(np.full(n_experts, alpha)) + 1e-12
    scores = np.log(w)[None, :] + rng.gumbel(size=(n_tokens, n_experts))
    top = np.argsort(-scores, axis=1)[:, :k]
    return np.bincount(top.ravel(), minlength=n_experts) / n_tokens


def make_profiles(rng, n_layers, n_experts, k, d_ff, dense=(), alpha=0.3, n_predicted=0, cond=False):
    """Random profiles; cond=True also draws a conditional-copy overhead and window (else the ideal 0 and 1)."""
    freq = np.stack([np.zeros(n_experts) if l in dense else routed_freq(rng, n_experts, k, alpha)
                     for l in range(n_layers)])
    recall = rng.uniform(0.0, 1.0, n_layers)
    recall[0] = np.nan
    mp = ModelProfile(freq, recall, recall.copy(), D_MODEL, d_ff, k, n_experts, DTYPE_BYTES, "test", n_predicted)
    expert_s = d_ff * BETA / 20e9
    hw = HardwareProfile(h2d_latency_s=rng.uniform(0.05, 1.0) * expert_s, h2d_bandwidth_Bps=20e9,
                         layer_compute_s=rng.uniform(0.2, 3.0, n_layers) * expert_s * k, device="test",
                         window_fraction=rng.uniform(0.5, 1.0))
    if cond:
        hw = dataclasses.replace(hw, cond_overhead_s=float(rng.uniform(0.0, 0.5) * expert_s),
                                 cond_window_fraction=float(rng.choice([0.0, rng.uniform(0.0, 1.0)])))
    return mp, hw


def layer_options(mp, s_cand):
    """Every plan a layer may take: (LayerPlan, bytes), with the N most frequent experts (ties -> lower id)."""
    out = []
    for l in range(mp.n_layers):
        opts = [LayerPlan()]
        if mp.moe_layers[l]:
            order = np.argsort(-mp.freq[l], kind="stable")
            opts += [LayerPlan(s, tuple(order[:n])) for s in s_cand if s > 0 for n in range(1, mp.n_experts + 1)]
        out.append(opts)
    return out


def brute_force(mp, hw, budget, s_cand, prefetch=None):
    """Best predicted_tpot over every feasible combination of per-layer (s, N) (and prefetch on/off when None),
    vectorised over combinations.

    predicted_tpot is a sum of per-layer terms, so TPOT(combo) = TPOT(empty) + sum_l delta_l(option_l); this is
    checked on random combinations against predicted_tpot itself before it is used.
    """
    if prefetch is None:
        return min(brute_force(mp, hw, budget, s_cand, True), brute_force(mp, hw, budget, s_cand, False))
    opts = layer_options(mp, s_cand)
    empty = dataclasses.replace(CachePlan.empty(mp.n_layers), prefetch=prefetch)
    base = predicted_tpot(empty, mp, hw)
    deltas, mems = [], []
    for l, ol in enumerate(opts):
        d, m = [], []
        for o in ol:
            layers = list(empty.layers)
            layers[l] = o
            p = CachePlan(tuple(layers), 0, prefetch=prefetch)
            d.append(predicted_tpot(p, mp, hw) - base)
            m.append(plan_bytes(p, mp))
        deltas.append(np.array(d))
        mems.append(np.array(m, dtype=np.int64))
    grids_t = np.meshgrid(*deltas, indexing="ij")
    grids_m = np.meshgrid(*mems, indexing="ij")
    tot_t = base + sum(grids_t)
    tot_m = sum(grids_m)
    rng = np.random.default_rng(0)
    for _ in range(3):
        combo = tuple(int(rng.integers(len(o))) for o in opts)
        plan = CachePlan(tuple(opts[l][c] for l, c in enumerate(combo)), 0, prefetch=prefetch)
        assert math.isclose(predicted_tpot(plan, mp, hw), tot_t[combo], rel_tol=1e-9)
        assert plan_bytes(plan, mp) == tot_m[combo]
    return float(np.min(np.where(tot_m <= budget, tot_t, np.inf)))


def random_instance(seed):
    rng = np.random.default_rng(seed)
    n_layers, n_experts = int(rng.integers(2, 4)), int(rng.integers(3, 6))
    k = int(rng.integers(1, min(3, n_experts - 1) + 1))
    dense = (1,) if n_layers == 3 and rng.random() < 0.2 else ()
    n_points = int(rng.integers(2, 5))
    if rng.random() < 0.5:  # granule path: d_ff = n_points granules
        d_ff, kw = 16 * n_points, {"granule": 16}
        s_cand = candidate_splits(d_ff, 16)
    else:  # explicit split points, d_ff not always among them
        d_ff = 64
        pts = sorted(rng.choice(np.arange(8, 65, 8), size=n_points, replace=False).tolist())
        kw = {"splits": pts}
        s_cand = candidate_splits(d_ff, splits=pts)
    mp, hw = make_profiles(rng, n_layers, n_experts, k, d_ff, dense, alpha=float(rng.choice([0.1, 0.3, 1.0])),
                           n_predicted=int(rng.choice([0, k + 1])), cond=bool(rng.random() < 0.5))
    budget = int(rng.uniform(0, 1.1) * mp.full_cache_bytes)
    return mp, hw, budget, kw, s_cand


@pytest.mark.parametrize("seed", range(60))
def test_solve_matches_brute_force(seed):
    mp, hw, budget, kw, s_cand = random_instance(seed)
    plan = solve(mp, hw, budget, **kw)
    plan.validate(mp.n_layers, mp.n_experts, mp.d_ff, mp.moe_layers)
    assert plan_bytes(plan, mp) <= budget
    assert all(lp.split in s_cand for lp in plan.layers)
    best = brute_force(mp, hw, budget, s_cand)
    got = predicted_tpot(plan, mp, hw)
    assert got <= best * 1.01, (got, best)
    assert got >= best * (1 - 1e-12)  # nothing beats the optimum over all feasible plans


@pytest.mark.parametrize("seed", range(10))
def test_more_budget_never_worse(seed):
    rng = np.random.default_rng(100 + seed)
    mp, hw = make_profiles(rng, 6, 16, 2, 512, dense=(2,), alpha=0.2)
    budgets = np.linspace(0, mp.full_cache_bytes, 25).astype(np.int64)
    tpots = [predicted_tpot(solve(mp, hw, int(b), granule=64), mp, hw) for b in budgets]
    for a, b in itertools.pairwise(tpots):
        assert b <= a * 1.01
    assert tpots[-1] < tpots[0]  # caching everything whole beats caching nothing


def test_budget_zero_and_full():
    rng = np.random.default_rng(7)
    mp, hw = make_profiles(rng, 4, 8, 2, 256, dense=(0,))
    plan0 = solve(mp, hw, 0)
    assert plan0.layers == tuple(LayerPlan() for _ in range(4))
    assert plan_bytes(plan0, mp) == 0 and plan0.budget_bytes == 0 and plan0.model_id == "test"
    # an expert that is never routed is still cached when everything fits
    freq = mp.freq.copy()
    freq[1] = 0.0
    freq[1, :2] = 1.0
    mp2 = ModelProfile(freq, mp.recall, mp.precision, D_MODEL, 256, 2, 8, DTYPE_BYTES, "m2")
    full = mp2.full_cache_bytes
    assert full == 3 * 8 * 256 * BETA
    plan = solve(mp2, hw, full)
    assert plan.layers[0] == LayerPlan()
    assert all(lp == LayerPlan(256, tuple(range(8))) for lp in plan.layers[1:])
    assert plan_bytes(plan, mp2) == full
    st = plan_stats(plan, mp2, hw)
    assert np.allclose(st["full_hit_rate"][1:], 1.0) and np.allclose(st["h2d_bytes"], 0.0)
    assert predicted_tpot(plan, mp2, hw) == pytest.approx(hw.layer_compute_s.sum())
    # one byte less: no longer everything
    plan_less = solve(mp2, hw, full - 1)
    assert plan_bytes(plan_less, mp2) <= full - 1 and plan_less != plan


def test_no_split_uses_whole_experts_only():
    rng = np.random.default_rng(3)
    mp, hw = make_profiles(rng, 5, 8, 2, 512)
    seen = set()
    for frac in (0.1, 0.3, 0.5, 0.8):
        budget = int(frac * mp.full_cache_bytes)
        plan = solve(mp, hw, budget, allow_split=False)
        assert plan_bytes(plan, mp) <= budget
        for lp in plan.layers:
            assert lp.split in (0, 512)
            seen.add(lp.split)
        # the split version can only be as good or better (its candidate set is a superset)
        assert predicted_tpot(solve(mp, hw, budget), mp, hw) <= predicted_tpot(plan, mp, hw) * 1.01
    assert 512 in seen


def test_split_wins_when_bottoms_hide_in_the_window():
    """Flat popularity, window = one expert copy: four half experts always hide, two whole ones stall 1/4 of the time.

    Layer 1 routes 2 of 4 experts (p = 0.5 each), both predicted (recall 1); a whole copy takes t_m = 1 ms, the window
    (layer 0's compute) is 1 ms. Whole experts 0, 1 cached: prefetch X = (2 - h) t_m with h ~ Binomial(2, 1/2), so
    E[max(0, X - W)] = 1/4 * 1 ms. Four tops of half size: X = 2 * 0.5 ms = W, no stall.
    """
    freq = np.array([[0.0] * 4, [0.5] * 4])
    recall = np.array([np.nan, 1.0])
    mp = ModelProfile(freq, recall, recall, D_MODEL, 256, 2, 4, DTYPE_BYTES, "m")
    hw = HardwareProfile(0.0, 256 * BETA / 1e-3, np.array([1e-3, 2e-3]))
    budget = 2 * 256 * BETA  # two whole experts or four halves
    plan = solve(mp, hw, budget)
    assert plan.layers[1] == LayerPlan(128, (0, 1, 2, 3))
    assert predicted_tpot(plan, mp, hw) == pytest.approx(3e-3)
    whole = solve(mp, hw, budget, allow_split=False)
    assert whole.layers[1] == LayerPlan(256, (0, 1))
    assert predicted_tpot(whole, mp, hw) == pytest.approx(3e-3 + 0.25e-3)
    st = plan_stats(whole, mp, hw)
    assert st["stall_s"][1] == pytest.approx(0.25e-3) and st["prefetch_s"][1] == pytest.approx(1e-3)
    assert st["full_hit_rate"][1] == pytest.approx(0.5) and st["copies"][1] == pytest.approx(1.0)
    # with no window to hide in, bytes are all that count and both plans copy the same bytes: a tie
    hw0 = HardwareProfile(0.0, 256 * BETA / 1e-3, np.array([0.0, 2e-3]))
    assert predicted_tpot(plan, mp, hw0) == pytest.approx(predicted_tpot(whole, mp, hw0))
    # a per-copy latency then favours whole experts (a full hit saves the copy, a top-only hit does not)
    hw_lat = HardwareProfile(1e-4, 256 * BETA / 1e-3, np.array([0.0, 2e-3]))
    assert solve(mp, hw_lat, budget).layers[1] == LayerPlan(256, (0, 1))


def test_cost_model_hand_computed():
    freq = np.array([[0.0, 0.0, 0.0], [1.0, 0.6, 0.4]])
    recall = np.array([np.nan, 0.5])
    mp = ModelProfile(freq, recall, recall, 8, 100, 2, 3, 4, "m")  # beta = 96 bytes
    hw = HardwareProfile(1e-5, 1e6, np.array([2e-3, 1e-3]), window_fraction=0.5, extra_s=1e-4)
    plan = CachePlan((LayerPlan(), LayerPlan(40, (0, 1))), 10_000)
    assert plan_bytes(plan, mp) == 2 * 40 * 96
    # P = 1.6, n = 2 copies in one copy step (one latency), b = 96 * (2 * 100 - 40 * 1.6) = 13056 bytes
    t = 1e-5 + 13056e-6
    phi, rho, window = 1.0, 0.5, 0.5 * 2e-3  # every prefetch outlasts the window: the stall is linear here
    # on demand: half the bytes; the step's latency unless both routed experts were predicted (rho^2 = 1/4; top-only
    # hits always copy their bottoms)
    expect = 2e-3 + 1e-3 + max(0.0, phi * t - window) + (1 - rho) * 13056e-6 + 0.75 * 1e-5 + 1e-4
    assert predicted_tpot(plan, mp, hw) == pytest.approx(expect, rel=1e-12)
    st = plan_stats(plan, mp, hw)
    assert st["top_only_hit_rate"][1] == pytest.approx(0.8) and st["miss_rate"][1] == pytest.approx(0.2)
    assert st["h2d_bytes"][1] == pytest.approx(1.5 * 13056)  # prefetched (incl. wasted) + on demand
    # n_predicted = 3 of top_k = 2: 1.5 times the routed traffic is prefetched
    mp4 = ModelProfile(freq, recall, recall, 8, 100, 2, 3, 4, "m", n_predicted=3)
    assert plan_stats(plan, mp4, hw)["prefetch_s"][1] == pytest.approx(1.5 * t)
    # caching expert 0 whole removes one copy and its bytes
    plan_full = CachePlan((LayerPlan(), LayerPlan(100, (0,))), 10_000)
    st = plan_stats(plan_full, mp, hw)
    assert st["copies"][1] == pytest.approx(1.0) and st["routed_bytes"][1] == pytest.approx(96 * 100)
    assert st["full_hit_rate"][1] == pytest.approx(0.5)
    # one slot for top_k = 2 routed experts: every step copies something, so it always pays the latency
    no_pf = CachePlan(plan_full.layers, 10_000, prefetch=False)
    assert predicted_tpot(no_pf, mp, hw) == pytest.approx(3e-3 + 9600e-6 + 1e-5 + 1e-4, rel=1e-12)
    # two slots (experts 0, 1 whole: q = 0.8): the step copies nothing when both are hits, P = 0.8^2
    two = CachePlan((LayerPlan(), LayerPlan(100, (0, 1))), 10_000, prefetch=False)
    assert predicted_tpot(two, mp, hw) == pytest.approx(3e-3 + 0.4 * 9600e-6 + 0.36 * 1e-5 + 1e-4, rel=1e-12)


def test_deterministic_and_ties():
    rng = np.random.default_rng(11)
    mp, hw = make_profiles(rng, 8, 32, 4, 1024)
    budget = int(0.3 * mp.full_cache_bytes)
    plans = [solve(mp, hw, budget) for _ in range(3)]
    assert plans[0].to_json() == plans[1].to_json() == plans[2].to_json()
    # equal frequencies: lower ids are cached first
    freq = np.full((1, 4), 0.5)
    mp_eq = ModelProfile(freq, np.array([np.nan]), np.array([np.nan]), D_MODEL, 128, 2, 4, DTYPE_BYTES, "m")
    plan = solve(mp_eq, HardwareProfile(1e-5, 20e9, np.array([1e-3])), 2 * 128 * BETA, allow_split=False)
    assert plan.layers[0] == LayerPlan(128, (0, 1))


def test_solve_errors():
    rng = np.random.default_rng(5)
    mp, hw = make_profiles(rng, 3, 4, 2, 256)
    with pytest.raises(ValueError, match="negative"):
        solve(mp, hw, -1)
    with pytest.raises(ValueError, match="granule"):
        solve(mp, hw, 100, granule=0)
    with pytest.raises(ValueError, match="does not divide"):
        solve(mp, hw, 100, granule=96)
    with pytest.raises(ValueError, match="outside"):
        solve(mp, hw, 100, splits=[64, 512])
    with pytest.raises(ValueError, match="allow_split"):
        solve(mp, hw, 100, allow_split=False, splits=[64])
    hw_bad = HardwareProfile(1e-5, 20e9, np.ones(4))
    with pytest.raises(ValueError, match="layer_compute_s has 4 layers"):
        solve(mp, hw_bad, 100)
    with pytest.raises(ValueError, match="layer_compute_s has 4 layers"):
        predicted_tpot(CachePlan.empty(3), mp, hw_bad)
    assert candidate_splits(64, 128) == (0, 64)  # granule above d_ff: whole experts only
    assert candidate_splits(256, 64) == (0, 64, 128, 192, 256)
    assert candidate_splits(256, splits=[128, 64, 128]) == (0, 64, 128)


def test_model_profile_errors():
    freq = np.array([[0.5, 0.5, 1.0], [0.0, 0.0, 0.0]])
    r = np.array([np.nan, 0.9])
    args = (8, 64, 2, 3, 2, "m")
    ModelProfile(freq, r, r, *args)  # valid
    bad_nan = freq.copy()
    bad_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ModelProfile(bad_nan, r, r, *args)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ModelProfile(freq * np.array([[-1.0, 1.0, 1.0]]), r, r, *args)
    with pytest.raises(ValueError, match="sums to"):
        ModelProfile(freq * 0.5 + np.array([[0.0, 0.0, 0.0], [0.2, 0.2, 0.2]]), r, r, *args)
    with pytest.raises(ValueError, match=r"expected \[n_layers, 4\]"):
        ModelProfile(freq, r, r, 8, 64, 2, 4, 2, "m")
    with pytest.raises(ValueError, match="recall has shape"):
        ModelProfile(freq, np.ones(3), r, *args)
    with pytest.raises(ValueError, match="recall must lie"):
        ModelProfile(freq, np.array([0.5, 1.5]), r, *args)
    with pytest.raises(ValueError, match="top_k"):
        ModelProfile(freq, r, r, 8, 64, 4, 3, 2, "m")
    with pytest.raises(ValueError, match="d_ff"):
        ModelProfile(freq, r, r, 8, 0, 2, 3, 2, "m")
    with pytest.raises(ValueError, match=r"recall exceeds n_predicted / top_k = 1/2 at layers \[1\]"):
        ModelProfile(freq, r, r, 8, 64, 2, 3, 2, "m", n_predicted=1)  # at most 1 of 2 routed can be predicted
    ModelProfile(freq, np.array([np.nan, 0.5]), r, 8, 64, 2, 3, 2, "m", n_predicted=1)


def test_hardware_profile_copy_time_and_fit():
    hw = HardwareProfile(2e-4, 50e9, np.ones(2))
    assert hw.copy_time_s(0) == 0.0
    assert hw.copy_time_s(50e9) == pytest.approx(1.0002)
    assert np.allclose(hw.copy_time_s(np.array([0, 1e9])), [0.0, 2e-4 + 0.02])
    with pytest.raises(ValueError):
        hw.copy_time_s(-1)
    sizes = np.array([1e6, 8e6, 17e6, 64e6, 512e6])
    fitted = HardwareProfile.fit(sizes, 3e-4 + sizes / 45e9, np.ones(3), device="gpu")
    assert fitted.h2d_latency_s == pytest.approx(3e-4, rel=1e-6)
    assert fitted.h2d_bandwidth_Bps == pytest.approx(45e9, rel=1e-6)
    assert fitted.device == "gpu" and fitted.layer_compute_s.shape == (3,)
    # noise: relative error stays small for all sizes
    rng = np.random.default_rng(0)
    times = (3e-4 + sizes / 45e9) * rng.uniform(0.97, 1.03, sizes.size)
    fitted = HardwareProfile.fit(sizes, times, np.ones(3))
    assert np.all(np.abs(fitted.copy_time_s(sizes) / times - 1) < 0.06)
    # times that would need a negative latency: latency clamped to 0
    fitted = HardwareProfile.fit(sizes[1:], sizes[1:] / 40e9 - 5e-5, np.ones(1))
    assert fitted.h2d_latency_s == 0.0 and 40e9 < fitted.h2d_bandwidth_Bps < 54e9
    with pytest.raises(ValueError, match="distinct"):
        HardwareProfile.fit([1e6, 1e6], [1e-3, 1e-3], np.ones(1))
    with pytest.raises(ValueError, match="grow"):
        HardwareProfile.fit([1e6, 1e8], [1e-2, 1e-3], np.ones(1))
    with pytest.raises(ValueError, match="bandwidth"):
        HardwareProfile(1e-4, 0.0, np.ones(2))
    with pytest.raises(ValueError, match="layer_compute_s"):
        HardwareProfile(1e-4, 1e9, np.array([1.0, np.nan]))


def test_json_round_trips(tmp_path):
    rng = np.random.default_rng(2)
    mp, hw = make_profiles(rng, 3, 5, 2, 128, dense=(2,), n_predicted=3)
    mp2 = ModelProfile.from_json(mp.to_json())
    assert mp2 == mp and np.isnan(mp2.recall[0]) and mp2.n_predicted == 3
    assert np.array_equal(mp2.freq, mp.freq)
    json.loads(mp.to_json())  # strict JSON: NaN written as null
    assert "NaN" not in mp.to_json()
    mp.save(tmp_path / "mp.json")
    assert ModelProfile.load(tmp_path / "mp.json") == mp
    hw2 = HardwareProfile.from_json(hw.to_json())
    assert hw2 == hw and hw2.window_fraction == hw.window_fraction
    hw.save(tmp_path / "hw.json")
    assert HardwareProfile.load(tmp_path / "hw.json") == hw
    plan = solve(mp, hw, int(0.4 * mp.full_cache_bytes), granule=32)
    assert CachePlan.from_json(plan.to_json()) == plan
    plan.save(tmp_path / "plan.json")
    assert CachePlan.load(tmp_path / "plan.json") == plan
    d = json.loads(plan.to_json())
    assert d["budget_bytes"] == plan.budget_bytes and d["model_id"] == "test"
    assert [x["split"] for x in d["layers"]] == [lp.split for lp in plan.layers]
    d["future_key"] = 1
    d["layers"][0]["extra"] = "x"
    assert CachePlan.from_json(json.dumps(d)) == plan  # unknown keys ignored
    # the hardware profile keeps its defaults when optional keys are missing
    hw3 = HardwareProfile.from_json(json.dumps({"h2d_latency_s": 1e-5, "h2d_bandwidth_Bps": 1e9,
                                                "layer_compute_s": [1e-3]}))
    assert hw3.device == "unknown" and hw3.window_fraction == 1.0 and hw3.extra_s == 0.0


@pytest.mark.parametrize("text, match", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ('{"budget_bytes": 1}', "missing key 'layers'"),
    ('{"budget_bytes": 1, "layers": 3}', "must be a list"),
    ('{"budget_bytes": 1, "layers": [{"split": 1}]}', "missing key 'cached'"),
    ('{"budget_bytes": 1, "layers": [{"split": 1.5, "cached": []}]}', "must be an int"),
    ('{"budget_bytes": 1, "layers": [{"split": 1, "cached": ["a"]}]}', "must be an int"),
    ('{"budget_bytes": true, "layers": []}', "must be an int"),
    ('{"layers": []}', "missing key 'budget_bytes'"),
])
def test_cache_plan_from_json_errors(text, match):
    with pytest.raises(ValueError, match=match):
        CachePlan.from_json(text)


def test_profiles_from_json_errors():
    with pytest.raises(ValueError, match="missing key 'freq'"):
        ModelProfile.from_json('{"recall": []}')
    with pytest.raises(ValueError, match="not valid JSON"):
        HardwareProfile.from_json("{")
    with pytest.raises(ValueError, match="must be a number"):
        HardwareProfile.from_json('{"h2d_latency_s": "fast", "h2d_bandwidth_Bps": 1, "layer_compute_s": [1]}')


@pytest.mark.parametrize("layers, match", [
    ([LayerPlan(), LayerPlan()], "2 layers, the model has 3"),
    ([LayerPlan(), LayerPlan(), LayerPlan(65, (0,))], r"layer 2: split 65 outside \[0, d_ff=64\]"),
    ([LayerPlan(), LayerPlan(32, (0, 4)), LayerPlan()], r"layer 1: cached expert ids \[4\]"),
    ([LayerPlan(), LayerPlan(32, (1, 1)), LayerPlan()], "layer 1: duplicated"),
    ([LayerPlan(32, (0,)), LayerPlan(), LayerPlan()], "layer 0 is a dense layer"),
    ([LayerPlan(), LayerPlan(0, (2,)), LayerPlan()], "layer 1: caches experts .* with split 0"),
    ([LayerPlan(), LayerPlan(-1, ()), LayerPlan()], "layer 1: split -1"),
])
def test_validate_errors(layers, match):
    plan = CachePlan(tuple(layers), 100)
    with pytest.raises(ValueError, match=match):
        plan.validate(3, 4, 64, [False, True, True])


def test_plan_basics():
    plan = CachePlan([LayerPlan(), LayerPlan(32, (3, np.int64(1))), LayerPlan(64, (0, 1, 2, 3))], 10)
    plan.validate(3, 4, 64, [False, True, True])
    assert plan.layers[1].cached == (1, 3) and type(plan.layers[1].cached[1]) is int
    assert plan.n_slots() == (0, 2, 4)
    freq = np.array([[0.0] * 4, [0.5] * 4, [0.5] * 4])
    r = np.full(3, np.nan)
    mp = ModelProfile(freq, r, r, 8, 64, 2, 4, 2, "m")
    assert plan_bytes(plan, mp) == (2 * 32 + 4 * 64) * 3 * 8 * 2
    with pytest.raises(ValueError, match="moe_layers has 2"):
        plan.validate(3, 4, 64, [True, True])
    with pytest.raises(ValueError, match="dense layer"):
        plan_stats(plan, ModelProfile(freq[[0, 0, 2]], r, r, 8, 64, 2, 4, 2, "m"))
    assert CachePlan.empty(2).layers == (LayerPlan(), LayerPlan())
    with pytest.raises(ValueError, match="model_id 'other'"):
        plan_stats(CachePlan(plan.layers, 10, "other"), mp)
    assert plan_stats(CachePlan(plan.layers, 10, "m"), mp)["top_only_hit_rate"][1] == pytest.approx(0.5)


def test_brute_force_is_exhaustive():
    """The oracle itself: its option count and its optimum at zero and unlimited budget."""
    mp, hw, _, _, s_cand = random_instance(1)
    opts = layer_options(mp, s_cand)
    n_moe = sum(mp.moe_layers)
    assert sum(len(o) for o in opts) == mp.n_layers + n_moe * (len(s_cand) - 1) * mp.n_experts
    for pf in (True, False):
        empty = CachePlan(CachePlan.empty(mp.n_layers).layers, 0, prefetch=pf)
        assert brute_force(mp, hw, 0, s_cand, pf) == pytest.approx(predicted_tpot(empty, mp, hw))
    best = min(predicted_tpot(CachePlan(tuple(c), 0, prefetch=pf), mp, hw)
               for pf in (True, False) for c in itertools.product(*opts))
    assert brute_force(mp, hw, 10**15, s_cand) == pytest.approx(best)


def test_conditional_copies_hand_computed():
    """Data-dependent copies (module docstring): n_cond_l conditionals of cond_overhead_s each, and a prefetch into a
    cached layer sees only cond_window_fraction of the window; the solver then turns prediction off."""
    freq = np.array([[0.0, 0.0, 0.0], [1.0, 0.6, 0.4]])
    recall = np.array([np.nan, 0.5])
    mp = ModelProfile(freq, recall, recall, 8, 100, 2, 3, 4, "m")  # beta = 96 bytes, k' = k = 2
    o = 3e-4
    hw = HardwareProfile(1e-5, 1e6, np.array([2e-3, 1e-3]), window_fraction=0.5, cond_overhead_s=o,
                         cond_window_fraction=0.0)
    t_two_misses = 1e-5 + 2 * 9600e-6  # one copy step: one latency
    # cached (split 40, experts 0 and 1: P = 1.6) and predicted: two conditionals, no window, so the prefetch
    # (k' = k experts, incl. wrong guesses) is all stall: E[X] = t; on demand: half the bytes, and the latency
    # unless both routed experts were predicted (1 - 0.5^2)
    t = 1e-5 + 13056e-6
    on_demand = 0.5 * 13056e-6 + 0.75 * 1e-5
    plan = CachePlan((LayerPlan(), LayerPlan(40, (0, 1))), 10_000)
    assert predicted_tpot(plan, mp, hw) == pytest.approx(2e-3 + 1e-3 + 2 * o + t + on_demand, rel=1e-12)
    st = plan_stats(plan, mp, hw)
    assert st["overhead_s"].tolist() == pytest.approx([0.0, 2 * o]) and st["stall_s"][1] == pytest.approx(t)
    # the same plan without prediction: one conditional (the on-demand copies), every routed copy on demand
    no_pf = dataclasses.replace(plan, prefetch=False)
    assert predicted_tpot(no_pf, mp, hw) == pytest.approx(2e-3 + 1e-3 + o + t, rel=1e-12)
    assert plan_stats(no_pf, mp, hw)["h2d_bytes"][1] == pytest.approx(13056)
    # nothing cached but predicted: the prefetch is unconditional and keeps its window (0.5 * 2 ms); the on-demand
    # copies of the mispredicted half need one conditional
    empty = CachePlan.empty(2)
    stall = t_two_misses - 0.5 * 2e-3
    on_demand = 0.5 * 2 * 9600e-6 + 0.75 * 1e-5
    assert predicted_tpot(empty, mp, hw) == pytest.approx(3e-3 + o + stall + on_demand, rel=1e-12)
    # nothing cached, nothing predicted: the k routed copies are made unconditionally
    assert predicted_tpot(dataclasses.replace(empty, prefetch=False), mp, hw) == pytest.approx(3e-3 + t_two_misses)
    # the solver compares both and keeps the faster; the ideal hardware (defaults) keeps prediction
    budget = 2 * 40 * 96
    chosen = solve(mp, hw, budget, granule=20)
    assert not chosen.prefetch
    assert predicted_tpot(chosen, mp, hw) == pytest.approx(min(
        predicted_tpot(solve(mp, hw, budget, granule=20, prefetch=pf), mp, hw) for pf in (True, False)))
    # free conditionals and a window that hides every prefetch: prediction pays again
    ideal = dataclasses.replace(hw, cond_overhead_s=0.0, cond_window_fraction=1.0, layer_compute_s=np.array([0.1, 1e-3]))
    assert solve(mp, ideal, budget, granule=20).prefetch


def test_prefetch_and_conditional_fields_round_trip():
    plan = CachePlan((LayerPlan(), LayerPlan(40, (0, 1))), 10_000, "m", prefetch=False)
    back = CachePlan.from_json(plan.to_json())
    assert back == plan and back.prefetch is False
    d = json.loads(plan.to_json())
    del d["prefetch"]
    assert CachePlan.from_json(json.dumps(d)).prefetch is True  # plans written before the field: as before
    d["prefetch"] = "no"
    with pytest.raises(ValueError, match="prefetch"):
        CachePlan.from_json(json.dumps(d))
    with pytest.raises(ValueError, match="prefetch"):
        CachePlan(plan.layers, 0, prefetch=None)
    hw = HardwareProfile(1e-5, 1e9, np.ones(2), cond_overhead_s=2e-4, cond_window_fraction=0.0)
    assert HardwareProfile.from_json(hw.to_json()) == hw
    with pytest.raises(ValueError, match="cond_overhead_s"):
        HardwareProfile(1e-5, 1e9, np.ones(2), cond_overhead_s=-1.0)

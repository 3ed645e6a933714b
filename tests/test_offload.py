"""Invariant 1 (exact) and 4 (static shapes) for the offloading engine, on every family and policy.

The reference is the resident model: teacher-forced logits (same input tokens at every step) must agree to
float32 rounding, and free-running greedy tokens must be identical.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FAMILIES

import moepic_jax
from moepic_jax.runtime.compiled import CompileCache
from moepic_jax.runtime.engine import ResidentEngine
from moepic_jax.generate import bucket as _bucket
from moepic_jax.planning.profiles import CachePlan, LayerPlan
from moepic_jax.runtime.factory import make_engine

BATCH = [[3, 14, 15, 92, 65, 35, 89, 79, 32], [38, 46, 26, 43]]  # two prompts of different lengths
SINGLE = [[27, 18, 28, 18, 28, 45, 90, 45]]
NEW = 6
# prefetch=True: the prefetch path is tested on every policy that has one (the default follows the plan, which on
# the default hardware profile drops prediction; test_prefetch_follows_the_plan covers that).
KW = dict(granule=16, max_batch=2, max_seq_len=32)
PKW = {**KW, "prefetch": True}


def kw(policy):
    return KW if policy == "ondemand" else PKW  # ondemand never predicts (prefetch=True is refused)


@pytest.fixture(scope="module")
def offload_models(hf_dirs):
    """Separate float32 copies: building an offload engine pins the model's experts in place."""
    return {fam: moepic_jax.load(hf_dirs[fam], dtype="float32") for fam in FAMILIES}


def _batch(prompts):  # left padding to generate()'s bucket, so both share compiled steps
    T = _bucket(max(map(len, prompts)))
    toks = np.zeros((len(prompts), T), np.int32)
    mask = np.zeros((len(prompts), T), bool)
    for i, p in enumerate(prompts):
        toks[i, T - len(p):], mask[i, T - len(p):] = p, True
    return jnp.asarray(toks), jnp.asarray(mask)


def teacher_forced(engine, forced, prompts):
    """Logits of the prefill and of decode steps fed `forced` [steps, B] tokens. Returns ([steps+1, B, V], counters)."""
    toks, mask = _batch(prompts)
    state = engine.new_state(len(prompts), _bucket(toks.shape[1] + NEW))
    logits, state, _ = engine.prefill(state, toks, mask)
    out, counters = [np.asarray(logits)], []
    for t in forced:
        logits, state, c = engine.decode(state, jnp.asarray(t, jnp.int32))
        out.append(np.asarray(logits))
        counters.append({k: np.asarray(v) for k, v in c.items()})
    return np.stack(out), counters


@pytest.fixture(scope="module")
def reference(models):
    """(family, n prompts) -> (forced tokens [NEW-1, B], resident logits, resident greedy tokens)."""
    out = {}
    for fam in FAMILIES:
        for prompts in (SINGLE, BATCH):
            res = moepic_jax.generate(prompts, model=models[fam], max_new_tokens=NEW, policy="resident")
            forced = np.array(res.token_ids).T[:-1]  # feed the greedy tokens back
            logits, _ = teacher_forced(ResidentEngine(models[fam]), forced, prompts)
            out[fam, len(prompts)] = (forced, logits, res.token_ids)
    return out


def _budget(model, frac, policy="ondemand"):
    base = make_engine(model, policy="ondemand", **KW)
    return base.fixed_bytes + int(frac * model.expert_bytes())


def _assert_slots_hold_host_rows(engine, model):
    """After decoding: every filled slot holds its owner's first s host rows and the slot map agrees (a wrongly
    written slot changes the logits only if it is hit later). Returns how many slots changed owner from the plan."""
    moved = 0
    for l, c in enumerate(engine.caches):
        if c is None or c.owner.shape[0] == 0:
            continue
        host = np.asarray(model.params.layers[l].moe.experts)
        owner = np.asarray(c.owner)
        s = c.tops.shape[1]
        for j, e in enumerate(owner):
            if e >= 0:
                np.testing.assert_array_equal(np.asarray(c.tops[j]), host[e, :s])
                assert int(c.slot_of[e]) == j
        assert int((np.asarray(c.slot_of) >= 0).sum()) == int((owner >= 0).sum())
        moved += len(set(owner.tolist()) - set(engine.cache_plan.layers[l].cached))
    return moved


def _check(engine, fam, reference, model, prompts=SINGLE):
    forced, ref_logits, ref_tokens = reference[fam, len(prompts)]
    logits, counters = teacher_forced(engine, forced, prompts)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    res = moepic_jax.generate(prompts, model=model, max_new_tokens=NEW, engine=engine)
    assert res.token_ids == ref_tokens
    return counters, res


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("policy", ["ondemand", "lru", "static", "moepic"])
@pytest.mark.parametrize("frac", [0.1, 0.3, 0.6])
def test_policies_exact(family, policy, frac, offload_models, reference):
    if policy == "ondemand" and frac != 0.1:
        pytest.skip("ondemand caches nothing: one budget is enough")
    m = offload_models[family]
    engine = make_engine(m, policy=policy, vram_budget=_budget(m, frac), **kw(policy))
    counters, res = _check(engine, family, reference, m, SINGLE)
    assert engine.cache_bytes() <= engine.cache_budget
    h2d = sum(c["h2d_bytes"].sum() for c in counters)
    cached_all = all(len(lp.cached) == m.cfg.n_experts and lp.split == m.cfg.d_ff
                     for lp, moe in zip(engine.cache_plan.layers, m.cfg.moe_layers) if moe)
    assert not cached_all, "these budgets must leave experts offloaded"
    assert h2d > 0  # something crossed the link: the test exercised offloading
    routed = sum(c["routed"].sum() for c in counters)
    parts = sum(c["full_hits"].sum() + c["top_hits"].sum() + c["misses"].sum() for c in counters)
    assert parts == routed == len(counters) * m.cfg.top_k * sum(m.cfg.moe_layers)


@pytest.mark.parametrize("policy", ["ondemand", "lru", "static", "moepic"])
def test_direct_copies_exact(policy, offload_models, reference):
    """Direct copies (`offload/transfer.py`, direct=True) give the resident model's logits and tokens too, with the
    same per-layer counters as the conditional copy step."""
    engines, counters = _direct_and_conditional(policy, offload_models, reference, SINGLE)
    assert [e.direct for e in engines] == [False, True]
    assert engines[0].cache_plan == engines[1].cache_plan
    for got, exp in zip(*counters):
        for k in exp:
            np.testing.assert_array_equal(got[k], exp[k])


@pytest.mark.parametrize("policy", ["lru", "moepic"])
def test_direct_copies_exact_with_ready_ffns_during_the_copies(policy, offload_models, reference, monkeypatch):
    """`decode.READY_FFNS_DURING_COPIES = True` (full hits computed from their slots and prefetched experts while the
    copies stream; the default selects a full hit's rows into the copies' buffer and runs every FFN after the wait)
    keeps the resident model's logits, tokens and the conditional step's counters."""
    from moepic_jax.offload import decode

    monkeypatch.setattr(decode, "READY_FFNS_DURING_COPIES", True)
    engines, counters = _direct_and_conditional(policy, offload_models, reference, SINGLE)
    for got, exp in zip(*counters):
        for k in exp:
            np.testing.assert_array_equal(got[k], exp[k])
    assert sum(c["full_hits"].sum() for c in counters[1]) > 0  # the switched path ran


@pytest.mark.parametrize("policy", ["lru", "moepic"])
def test_direct_copies_exact_at_batch_two(policy, offload_models, reference):
    """Two prompts: padded routed and predicted ids (-1), destination rows no plan writes."""
    engines, counters = _direct_and_conditional(policy, offload_models, reference, BATCH)
    assert engines[0].cache_plan == engines[1].cache_plan
    for got, exp in zip(*counters):
        for k in exp:
            np.testing.assert_array_equal(got[k], exp[k])
    wasted = sum(c["prefetch_wasted_bytes"].sum() for c in counters[1])
    assert engines[1].prefetches and 0 <= wasted <= sum(c["h2d_bytes"].sum() for c in counters[1])


def _direct_and_conditional(policy, offload_models, reference, prompts):
    """(engines, per-step counters) of the conditional step and of direct copies under one plan; both checked
    against the resident model's logits and tokens (`_check`)."""
    from moepic_jax.planning.calibrate import default_hardware

    m = offload_models["qwen2_moe"]
    hw = default_hardware(m.cfg.n_layers)  # one hardware profile: both engines run the same plan
    engines = [make_engine(m, policy=policy, vram_budget=_budget(m, 0.3), direct=d, hardware=hw, **kw(policy))
               for d in (False, True)]
    return engines, [_check(e, "qwen2_moe", reference, m, prompts)[0] for e in engines]


def test_direct_decode_step_has_no_conditional(offload_models):
    """With direct copies the decode step holds no conditional and no loop (on a GPU each makes the host wait for
    its predicate), only the two copy calls per MoE layer; the conditional copy step holds one switch per layer."""
    m = offload_models["qwen2_moe"]
    counts = {}
    for d in (True, False):
        engine = make_engine(m, policy="moepic", vram_budget=_budget(m, 0.3), direct=d, prefetch=True, **KW)
        moepic_jax.generate(SINGLE, model=m, max_new_tokens=2, engine=engine)
        text = "\n".join(exe.as_text() for key, exe in engine.compiles._fns.items() if key[0] == "decode")
        counts[d] = (text.count(" conditional("), text.count(" while("), text.count("moepic_h2d_start"),
                     text.count("moepic_h2d_wait"))
    moe = m.cfg.moe_layers
    n_moe = sum(moe)
    prefetched = sum(moe[1:])  # every MoE layer after the first is prefetched into by the layer before it
    assert counts[True][:2] == (0, 0), counts
    # one start per layer that copies or prefetches; a wait for its layer's experts and one for the prefetch
    assert counts[True][2] == sum(moe[l] or (l + 1 < len(moe) and moe[l + 1]) for l in range(len(moe))), counts
    assert counts[True][3] == n_moe + prefetched, counts
    assert counts[False][0] >= n_moe and counts[False][2] == 0, counts


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
@pytest.mark.parametrize("split", [16, 32, 48])
def test_explicit_split_plans_exact(family, split, offload_models, reference):
    """Top-only hits: a plan that caches the tops of some experts in every MoE layer."""
    m = offload_models[family]
    cfg = m.cfg
    layers = tuple(LayerPlan(split, tuple(range(0, cfg.n_experts, 2))) if moe else LayerPlan(0, ())
                   for moe in cfg.moe_layers)
    plan = CachePlan(layers=layers, budget_bytes=0, model_id=cfg.identity())
    engine = make_engine(m, policy="moepic", plan=plan, **PKW)
    counters, _ = _check(engine, family, reference, m, SINGLE)
    assert sum(c["top_hits"].sum() for c in counters) > 0
    assert sum(c["misses"].sum() for c in counters) > 0
    assert sum(c["full_hits"].sum() for c in counters) == 0
    # bytes at batch 1 (no duplicate experts): a top-only hit copies F - s rows, a miss F rows; wrong
    # prefetches add more, and at most k' extra experts per layer are prefetched.
    rb = 3 * cfg.d_model * 4
    for c in counters:
        need = (c["top_hits"] * (cfg.d_ff - split) + c["misses"] * cfg.d_ff) * rb
        assert np.all(c["h2d_bytes"] >= need)
        assert np.all(c["h2d_bytes"] <= need + cfg.top_k * cfg.d_ff * rb)


@pytest.mark.parametrize("split", [48, 64])
def test_prefill_copies_only_what_the_cache_lacks(split, offload_models, reference):
    """A cache holding at least half of a layer's rows: prefill takes them from the slots and copies the rest
    (missing experts whole, cached experts' bottoms), with exactly the resident model's logits and tokens."""
    m = offload_models["qwen2_moe"]
    cfg = m.cfg
    E, F = cfg.n_experts, cfg.d_ff
    cached = tuple(e for e in range(E) if e % 4 != 1)  # 3/4 of the experts, not a contiguous run
    layers = tuple(LayerPlan(split, cached) if moe else LayerPlan(0, ()) for moe in cfg.moe_layers)
    plan = CachePlan(layers=layers, budget_bytes=0, model_id=cfg.identity())
    engine = make_engine(m, policy="moepic", plan=plan, **KW)
    assert len(cached) * split >= (1 - 0.5) * E * F  # the partial path's condition holds in every MoE layer
    toks, mask = _batch(SINGLE)
    _, _, c = engine.prefill(engine.new_state(1, _bucket(toks.shape[1] + NEW)), toks, mask)
    rb = 3 * cfg.d_model * 4
    want = ((E - len(cached)) * F + len(cached) * (F - split)) * rb
    np.testing.assert_array_equal(c["h2d_bytes"], np.where(cfg.moe_layers, want, 0))
    assert want < E * F * rb
    _check(engine, "qwen2_moe", reference, m, SINGLE)


@pytest.mark.parametrize("policy", ["static", "moepic"])
def test_prefill_refills_the_static_cache_from_the_prompt(policy, offload_models, reference):
    """adapt_to_prompt=True: after prefill each layer's slots hold the experts the prompt routed to most (the
    plan's experts count as PROMPT_PRIOR_TOKENS more; ties keep them), with their host rows; tokens stay exact.
    moepic (frequency rule) refills as static does.
    The reference counts come from the profiler's own forward over the prompt, not from the engine's prefill."""
    from moepic_jax.offload.prefill import PROMPT_PRIOR_TOKENS
    from moepic_jax.planning.calibrate import profile_model

    m = offload_models["qwen3_moe"]
    cfg = m.cfg
    E = cfg.n_experts
    layers = tuple(LayerPlan(cfg.d_ff, (0, 1, 2)) if moe else LayerPlan(0, ()) for moe in cfg.moe_layers)
    plan = CachePlan(layers=layers, budget_bytes=0, model_id=cfg.identity())
    prompt = BATCH[0]
    fixed = make_engine(m, policy=policy, plan=plan, **KW)  # the default keeps the plan's hot set
    toks, mask = _batch([prompt])
    fixed.prefill(fixed.new_state(1, _bucket(toks.shape[1] + NEW)), toks, mask)
    assert [np.asarray(c.owner).tolist() for c in fixed.caches if c is not None] == [[0, 1, 2]] * sum(cfg.moe_layers)
    engine = make_engine(m, policy=policy, plan=plan, adapt_to_prompt=True, **KW)
    engine.prefill(engine.new_state(1, _bucket(toks.shape[1] + NEW)), toks, mask)
    counts = profile_model(engine.weights, np.asarray(prompt, np.int32), smoothing=0.0).freq * len(prompt)
    for l, c in enumerate(engine.caches):
        if c is None:
            continue
        score = counts[l] + PROMPT_PRIOR_TOKENS * np.isin(np.arange(E), [0, 1, 2])
        owner = np.asarray(c.owner)
        assert score[owner].min() >= score[np.setdiff1d(np.arange(E), owner)].max()  # the top 3 by score
    moved = _assert_slots_hold_host_rows(engine, m)  # against the plan's hot set, 0-2
    assert moved > 0, "the prompt must route elsewhere than experts 0-2 for this test to mean something"
    used = engine.plan_in_use()  # the plan as the slots hold it now
    assert [lp.cached for lp, c in zip(used.layers, engine.caches) if c is not None] == [
        tuple(sorted(np.asarray(c.owner).tolist())) for c in engine.caches if c is not None]
    _check(engine, "qwen3_moe", reference, m, SINGLE)


@pytest.mark.parametrize("policy", ["ondemand", "lru", "static", "moepic"])
def test_batch_of_two_prompts_exact(policy, offload_models, reference):
    """Left-padded batch of two prompts of different lengths; duplicated experts are copied once."""
    m = offload_models["qwen2_moe"]
    engine = make_engine(m, policy=policy, vram_budget=_budget(m, 0.3), **kw(policy))
    counters, res = _check(engine, "qwen2_moe", reference, m, BATCH)
    assert sum(c["h2d_bytes"].sum() for c in counters) > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_grouped_prefill_exact(family, offload_models, reference, monkeypatch):
    """Prefill with the tokens grouped by expert (the path Hopper GPUs take, `grouped.experts_grouped`; here with
    `jax.lax.ragged_dot` as its matmul): the same logits and tokens as the resident model, for the resident engine
    too, and the batch's padding tokens included."""
    from moepic_jax.model import grouped
    from moepic_jax.model import layers as M

    monkeypatch.setattr(M, "GROUPED_MIN_ROWS", 0)  # these prompts have fewer pairs than the GPU row tile
    m = offload_models[family]
    engine = make_engine(m, policy="lru", vram_budget=_budget(m, 0.3), **PKW)
    assert engine.matmul is None  # the CPU keeps experts_scan
    traced = []

    def matmul(*args):  # counts the traces: the grouped path is the one compiled
        traced.append(args[0].shape)
        return grouped.ragged_matmul_lax(*args)

    engine.matmul = matmul
    counters, _ = _check(engine, family, reference, m, BATCH)
    assert sum(c["h2d_bytes"].sum() for c in counters) > 0
    resident = ResidentEngine(m)
    resident.matmul = grouped.ragged_matmul_lax
    forced, ref_logits, _ = reference[family, 2]
    logits, _ = teacher_forced(resident, forced, BATCH)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
    assert traced and all(shape[0] == 2 * _bucket(9) * m.cfg.top_k for shape in traced)  # [B*T*top_k, ...]


@pytest.mark.parametrize("policy", ["lru", "moepic"])
def test_copy_groups_in_a_loop_exact(policy, offload_models, reference, monkeypatch):
    """Batches with more copy groups than COPY_UNROLL_GROUPS run one switch in a `lax.scan` over the groups (padding
    included: 4 distinct-expert slots in groups of 3). Same logits, tokens and per-layer counters as the unrolled
    switches, which test_batch_of_two_prompts_exact checks against the resident model."""
    from moepic_jax.offload import copy_step as offload
    m = offload_models["qwen2_moe"]
    budget = _budget(m, 0.3)
    unrolled = make_engine(m, policy=policy, vram_budget=budget, direct=False, **PKW)
    _, want = teacher_forced(unrolled, reference["qwen2_moe", 2][0], BATCH)
    monkeypatch.setattr(offload, "COPY_GROUP", 3)
    monkeypatch.setattr(offload, "COPY_UNROLL_GROUPS", 1)
    looped = make_engine(m, policy=policy, vram_budget=budget, direct=False, **PKW)
    counters, _ = _check(looped, "qwen2_moe", reference, m, BATCH)
    moved = _assert_slots_hold_host_rows(looped, m)
    assert moved > 0 or policy == "moepic"  # here the frequency rule keeps its two hottest (used every step)
    decode = [exe for key, exe in looped.compiles._fns.items() if key[0] == "decode"]
    assert decode and all("while" in exe.as_text() for exe in decode)  # the loop path is the one under test
    assert not any("while" in exe.as_text() for key, exe in unrolled.compiles._fns.items() if key[0] == "decode")
    for got, exp in zip(counters, want):
        for k in exp:
            np.testing.assert_array_equal(got[k], exp[k])
    assert sum(c["h2d_bytes"].sum() for c in counters) > 0


def test_copy_loop_temporaries_do_not_grow_with_layers(tmp_path, monkeypatch):
    """The decode step's XLA temporaries must not grow with the layer count: each layer's copy-group loop result
    has to be dead before the next layer's is allocated. Loop results stacked as scan outputs, and constant result
    buffers (XLA allocates them at the start of the step), grew by one layer's results (lru: the admitted rows)
    per MoE layer, on the CPU as on the H200 (3.45 GiB for Qwen3-30B-A3B lru at batch 1;
    benchmarks/results/archive/probe_step_qwen3_l24*.json). The budget leaves room, so that the extra temporaries do not
    make the planner shrink the caches instead. Nor may the step copy a layer's cache (LRU admission)."""
    from conftest import build_hf_model

    from moepic_jax.offload import copy_step as offload
    monkeypatch.setattr(offload, "COPY_GROUP", 3)  # batch 2 x top-2: 4 distinct experts -> 2 groups, in a loop
    monkeypatch.setattr(offload, "COPY_UNROLL_GROUPS", 1)
    temps, shapes = {}, {}
    for layers in (2, 6):
        d = tmp_path / str(layers)
        build_hf_model("qwen3_moe", num_hidden_layers=layers).save_pretrained(d)
        m = moepic_jax.load(d, dtype="float32")
        engine = make_engine(m, policy="lru", vram_budget=_budget(m, 0.5) + 4 * 2**20, prefetch=False, direct=False,
                             **KW)
        moepic_jax.generate(BATCH, model=m, max_new_tokens=2, engine=engine)
        assert all(c is not None and c.tops.shape[0] > 0 for c in engine.caches)  # every layer admits
        decode = [exe for key, exe in engine.compiles._fns.items() if key[0] == "decode"]
        assert decode and all("while" in exe.as_text() for exe in decode)  # the loop path is the one under test
        temps[layers] = engine.compiles.temp_bytes_of("decode")
        shapes[layers] = {c.tops.shape for c in engine.caches}
        # LRU admission writes each copy group's rows into the loop-carried cache in place. Written inside the
        # switch, XLA copied the whole cache in every branch (seen in the CPU HLO): no copy of a cache may remain.
        cache_types = {"f32[" + ",".join(map(str, shape)) + "]" for shape in shapes[layers]}
        copies = [line for exe in decode for line in exe.as_text().splitlines()
                  if " copy(" in line and any(t in line.split("=", 1)[-1].split(" copy(")[0] for t in cache_types)]
        assert not copies, copies[:3]
    assert shapes[2] == shapes[6]  # the same caches per layer: the temporaries alone differ
    cfg = m.cfg
    # a layer's loop results: admitted rows (at most d_ff each) of 4 distinct experts, float32 (padding aside)
    per_layer = 4 * cfg.d_ff * 3 * cfg.d_model * 4
    assert temps[6] - temps[2] < per_layer, (temps, per_layer)


@pytest.mark.parametrize("policy", ["lru", "moepic"])
def test_prefetch_follows_the_plan(policy, offload_models, reference):
    """prefetch=None: the engine predicts only where its plan keeps prediction. With the default hardware profile
    (H200: copies inside a conditional do not overlap compute) the planner drops it; then every copied byte is a
    routed expert's missing rows, exactly, and the results stay exact. Forced on, the same engine predicts."""
    m = offload_models["qwen2_moe"]
    cfg = m.cfg
    budget = _budget(m, 0.3)
    engine = make_engine(m, policy=policy, vram_budget=budget, **KW)
    assert not engine.cache_plan.prefetch and not engine.prefetches
    counters, res = _check(engine, "qwen2_moe", reference, m, SINGLE)
    assert all(c["predicted"].sum() == 0 for c in counters)
    assert np.isnan(res.stats.predictor_recall)
    rb, F = 3 * cfg.d_model * 4, cfg.d_ff
    splits = np.array(engine.splits)
    for c in counters:
        np.testing.assert_allclose(c["h2d_bytes"], (c["top_hits"] * (F - splits) + c["misses"] * F) * rb)
    assert sum(c["h2d_bytes"].sum() for c in counters) > 0
    forced = make_engine(m, policy=policy, vram_budget=budget, **PKW)
    assert forced.prefetches
    counters, _ = _check(forced, "qwen2_moe", reference, m, SINGLE)
    assert sum(c["predicted"].sum() for c in counters) > 0
    for eng in (engine, forced):  # both rules admit: prefetched misses (forced) and copied ones
        assert _assert_slots_hold_host_rows(eng, m) > 0


def test_replan_for_prefill_costs_no_second_decode_compile(offload_models, reference, monkeypatch):
    """Where prefill's temporaries exceed the estimated fixed part (as on the H200, where a layer stack's
    assembly for a partial prefill needs ~0.5 GiB), warm-up re-plans the caches before it compiles the decode step:
    the same decode compiles as an engine that fits, a smaller cache, the need within the budget, exact tokens."""
    m = offload_models["qwen2_moe"]
    budget = _budget(m, 0.6)
    compiled = []
    real_get = CompileCache.get

    def get(self, name, *a, **k):  # record which programs are compiled
        n = self.count
        exe = real_get(self, name, *a, **k)
        if self.count > n:
            compiled.append(name)
        return exe

    monkeypatch.setattr(CompileCache, "get", get)
    fits = make_engine(m, policy="static", vram_budget=budget, **KW)
    tokens = reference["qwen2_moe", 1][2]
    assert moepic_jax.generate(SINGLE, model=m, max_new_tokens=NEW, engine=fits).token_ids == tokens
    want = compiled.count("decode")
    compiled.clear()
    # Prefill's temporaries: two layer stacks plus half the expert bytes (more than the fixed part holds).
    extra = 2 * fits.e_loc * m.cfg.d_ff * fits.row_bytes + m.expert_bytes() // 2
    real_temps = CompileCache.temp_bytes_of
    monkeypatch.setattr(CompileCache, "temp_bytes_of",
                        lambda self, name: max(real_temps(self, name), extra if name == "prefill_moe" else 0))
    tight = make_engine(m, policy="static", vram_budget=budget, **KW)
    assert moepic_jax.generate(SINGLE, model=m, max_new_tokens=NEW, engine=tight).token_ids == tokens
    assert want >= 1 and compiled.count("decode") == want
    assert tight.cache_bytes() < fits.cache_bytes()
    assert tight.device_bytes_needed(tight.new_state(1, 16)) <= budget


def test_compile_count_is_stable(offload_models, reference):
    m = offload_models["qwen3_moe"]
    engine = make_engine(m, policy="lru", vram_budget=_budget(m, 0.3), **PKW)
    first = moepic_jax.generate(BATCH, model=m, max_new_tokens=NEW, engine=engine)
    assert 1 <= first.stats.compile_count <= 5  # decode + prefill pre/moe/dense/head: bounded by distinct shapes
    again = moepic_jax.generate(BATCH, model=m, max_new_tokens=NEW + 3, engine=engine)
    assert again.stats.compile_count == 0
    # where the compile seconds went, per program: they add up to the total that the stats report
    by_name = engine.compiles.seconds_by_name
    assert {"decode", "prefill_pre", "prefill_moe", "head"} <= set(by_name)
    assert sum(by_name.values()) == pytest.approx(first.stats.compile_s)


def test_budget_below_minimum_raises(offload_models):
    m = offload_models["mixtral"]
    base = make_engine(m, policy="ondemand", **KW)
    with pytest.raises(ValueError, match=r"below the minimum of \d+\.\d+ GiB"):
        make_engine(m, policy="moepic", vram_budget=base.fixed_bytes - 1, **PKW)
    with pytest.raises(ValueError, match="use an offloading policy"):
        ResidentEngine(m, vram_budget=m.weight_bytes() // 2)


def test_plan_mismatch_raises(offload_models):
    m = offload_models["mixtral"]
    cfg = m.cfg
    short = CachePlan(layers=(LayerPlan(0, ()),) * (cfg.n_layers - 1), budget_bytes=0)
    with pytest.raises(ValueError, match="layer"):
        make_engine(m, policy="moepic", plan=short, **PKW)
    bad = CachePlan(layers=(LayerPlan(16, (cfg.n_experts,)),) + (LayerPlan(0, ()),) * (cfg.n_layers - 1),
                    budget_bytes=0)
    with pytest.raises(ValueError):
        make_engine(m, policy="moepic", plan=bad, **PKW)
    split = CachePlan(layers=(LayerPlan(16, (0,)),) * cfg.n_layers, budget_bytes=0)
    with pytest.raises(ValueError, match="whole experts"):
        make_engine(m, policy="static", plan=split, **PKW)
    other = CachePlan(layers=(LayerPlan(0, ()),) * cfg.n_layers, budget_bytes=0, model_id="0123456789abcdef")
    with pytest.raises(ValueError, match="re-plan"):
        make_engine(m, policy="moepic", plan=other, **PKW)
    with pytest.raises(ValueError, match="never predicts"):
        make_engine(m, policy="ondemand", prefetch=True, **KW)
    with pytest.raises(ValueError, match="prefetch must be"):
        make_engine(m, policy="lru", prefetch=1, **KW)
    big = CachePlan(layers=(LayerPlan(cfg.d_ff, tuple(range(8))),) * cfg.n_layers, budget_bytes=0)
    with pytest.raises(ValueError, match="left for caches"):
        make_engine(m, policy="moepic", plan=big, vram_budget=_budget(m, 0.1), **PKW)


def test_generate_api_with_policy_and_budget_string(offload_models, reference):
    m = offload_models["olmoe"]
    base = make_engine(m, policy="ondemand", **KW)
    budget = f"{(base.fixed_bytes + m.expert_bytes() // 3) / 2**20:.3f}MiB"
    res = moepic_jax.generate(BATCH, model=m, max_new_tokens=NEW, policy="moepic", vram_budget=budget, **PKW)
    assert res.token_ids == reference["olmoe", 2][2]
    s = res.stats
    assert s.policy == "moepic" and s.vram_budget_bytes == int(float(budget[:-3]) * 2**20)
    assert len(s.per_layer) == m.cfg.n_layers
    assert np.isnan(s.per_layer[0].predictor_recall)
    assert 0 <= s.predictor_recall <= 1 and 0 <= s.miss_rate <= 1
    assert abs(s.full_hit_rate + s.top_only_hit_rate + s.miss_rate - 1) < 1e-9
    assert s.to_dict()["policy"] == "moepic"


def test_h2d_bytes_are_per_token_at_batch_two(offload_models):
    """ondemand copies each distinct routed expert once per step: per token, never more than K whole experts per
    MoE layer (a batch of two shares duplicated experts, so it is at most that)."""
    m = offload_models["qwen2_moe"]
    cfg = m.cfg
    res = moepic_jax.generate(BATCH, model=m, max_new_tokens=NEW, policy="ondemand", **KW)
    per_expert = cfg.d_ff * 3 * cfg.d_model * 4
    most = cfg.top_k * sum(cfg.moe_layers) * per_expert
    assert 0 < res.stats.h2d_bytes_per_token <= most


def test_held_engine_reservation_is_enough(offload_models):
    """A prompt + new tokens that fit the engine's max_seq_len run without a bigger power-of-two cache."""
    m = offload_models["mixtral"]
    eng = moepic_jax.make_engine(m, policy="ondemand", max_batch=1, max_seq_len=24)
    res = moepic_jax.generate(list(range(1, 17)), model=m, max_new_tokens=6, engine=eng)
    assert len(res.token_ids[0]) == 6


def test_generate_with_a_profile_of_your_own_text(offload_models, reference):
    """generate(profile=, hardware=): profiles are accepted as engine keywords (keyed by their JSON), the plan is
    solved from them, and the result stays exact."""
    from moepic_jax.planning.calibrate import default_hardware, profile_model

    m = offload_models["qwen2_moe"]
    mp = profile_model(make_engine(m, policy="ondemand", **KW).weights, np.array(SINGLE[0] * 3, np.int32))
    hw = default_hardware(m.cfg.n_layers)
    kw = dict(model=m, max_new_tokens=NEW, policy="static", vram_budget=_budget(m, 0.3), profile=mp, hardware=hw,
              **KW)
    res = moepic_jax.generate(SINGLE, **kw)
    assert res.token_ids == reference["qwen2_moe", 1][2]
    again = moepic_jax.generate(SINGLE, **kw)  # the same keywords find the same engine: nothing compiles
    assert again.stats.compile_count == 0


def test_compiled_steps_hold_one_kv_cache(offload_models):
    """No compiled step hands back a KV cache it does not update in place: a program that returns k and v
    without donating them makes a copy, one more KV cache on the device that the budget does not count (the
    prefill bookkeeping did, 0.19 GiB for Qwen1.5-MoE at 1024 tokens on the H200)."""
    m = offload_models["qwen2_moe"]
    engine = make_engine(m, policy="static", vram_budget=_budget(m, 0.3), **KW)
    moepic_jax.generate(BATCH, model=m, max_new_tokens=NEW, engine=engine)
    kv = engine.new_state(2, engine.max_seq_len)  # at least the cache generate() used
    kv_bytes = kv.k.nbytes + kv.v.nbytes
    assert not all(m.cfg.moe_layers)  # the dense layers' prefill step is checked too
    fresh = {name: 0 for name in ("prefill_pre", "prefill_moe", "prefill_dense", "head", "decode")}
    for (name, _), exe in engine.compiles._fns.items():
        if name in fresh:
            ma = exe.memory_analysis()
            fresh[name] = max(fresh[name], ma.output_size_in_bytes - ma.alias_size_in_bytes)
    assert all(v < kv_bytes for v in fresh.values()), (fresh, kv_bytes)

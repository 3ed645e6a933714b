"""Quantized experts (`experts="int8" | "int4"`): the group-wise scheme against a NumPy reference, the packed layout,
the pinned store, exactness of every offloading policy against the resident model with the same quantized weights,
bytes counted as stored by the budget and the planner, the CLI option, and held-out perplexity.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moepic_jax
from moepic_jax import cli
from moepic_jax.config import ExpertQuant, expert_quant
from moepic_jax.io import checkpoint
from moepic_jax.model import quant as Q
from moepic_jax.offload.policies import POLICIES
from moepic_jax.runtime.factory import make_engine

PROMPT = "def fibonacci(n):"
NEW = 12
KW = {"granule": 32, "max_batch": 1, "max_seq_len": 64}
SCHEMES = [ExpertQuant(8, 128), ExpertQuant(4, 64), ExpertQuant(8, 32), ExpertQuant(4, 16)]


def reference_quantize(x: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The scheme in plain NumPy: per group of `group` elements along the last axis, scale = absmax / (qmax + 0.5)
    (float32; 1 where that is below sqrt of the smallest normal float32), code = round-half-even(x / scale) clipped
    to [-2^(bits-1), qmax]."""
    x = np.asarray(x, np.float32)
    qmax = 2 ** (bits - 1) - 1
    g = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scale = (np.abs(g).max(-1) / np.float32(qmax + 0.5)).astype(np.float32)
    scale = np.where(scale < np.sqrt(np.finfo(np.float32).tiny), np.float32(1), scale).astype(np.float32)
    codes = np.clip(np.rint(g / scale[..., None]), -qmax - 1, qmax).astype(np.int8)
    return codes.reshape(x.shape), scale


def _weights(shape, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    x[..., :7] *= 20  # a few outliers in the first group of every vector
    x[0, 0, 0, :] = 0  # an all-zero vector: scale 1, codes 0
    return x


@pytest.mark.parametrize("q", SCHEMES, ids=lambda q: f"{q.name}_g{q.group}")
def test_codes_and_scales_match_numpy_reference(q):
    x = _weights((2, 5, 3, 128))
    codes, scales = (np.asarray(a) for a in Q.quantize_vectors(jnp.asarray(x), q))
    want_codes, want_scales = reference_quantize(x, q.bits, q.group)
    # XLA's float32 division may differ from NumPy's by one ulp, which can flip a code sitting on a rounding tie
    # (a group's negative absmax element sits on one: -(qmax + 0.5) -> -qmax - 1 or -qmax)
    np.testing.assert_allclose(scales, want_scales, rtol=2.5e-7, atol=0)
    ratio = x.reshape(*x.shape[:-1], -1, q.group) / want_scales[..., None]
    tie = (np.abs(np.abs(ratio - np.trunc(ratio)) - 0.5) < 1e-4).reshape(x.shape)
    diff = codes.astype(int) - want_codes
    assert np.all(diff[~tie] == 0) and np.all(np.abs(diff[tie]) <= 1)
    g = np.abs(x).reshape(*x.shape[:-1], -1, q.group)
    at_absmax = (g == g.max(-1, keepdims=True)).reshape(x.shape)
    assert np.all(at_absmax[diff != 0])  # only a group's largest element, on its tie, may differ
    assert codes.min() >= -(2 ** (q.bits - 1)) and codes.max() <= 2 ** (q.bits - 1) - 1
    assert codes.max() == 2 ** (q.bits - 1) - 1  # the top bucket is used (the bound is qmax + 0.5)
    assert np.all(scales[0, 0, 0] == 1) and np.all(codes[0, 0, 0] == 0)


@pytest.mark.parametrize("q", SCHEMES, ids=lambda q: f"{q.name}_g{q.group}")
def test_packed_rows_layout_and_dequantization_error(q):
    x = _weights((2, 5, 3, 128), seed=1)
    D = x.shape[-1]
    packed = Q.quantize_rows(x, q)
    assert packed.dtype == np.uint8 and packed.shape == (2, 5, 3, q.row_width(D))
    assert q.row_width(D) == D * q.bits // 8 + 4 * D // q.group
    codes, scales = (np.asarray(a) for a in Q.quantize_vectors(jnp.asarray(x), q))  # checked above
    cb = q.code_bytes(D)
    if q.bits == 8:
        np.testing.assert_array_equal(packed[..., :cb].view(np.int8), codes)
    else:  # element 2i in the low nibble, 2i+1 in the high one
        u = codes.view(np.uint8) & 0xF
        np.testing.assert_array_equal(packed[..., :cb], u[..., 0::2] | (u[..., 1::2] << 4))
    np.testing.assert_array_equal(np.ascontiguousarray(packed[..., cb:]).view("<f4"), scales)
    want = (codes.astype(np.float32).reshape(*codes.shape[:-1], -1, q.group) * scales[..., None]).reshape(x.shape)
    got = np.asarray(jax.jit(Q.dequantize_rows, static_argnums=(1, 2))(jnp.asarray(packed), q, jnp.float32))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(Q.dequantize_rows_np(packed, q), want)
    # error bound: half a step of the vector's group (the saturated top bucket included)
    step = np.repeat(scales, q.group, axis=-1)
    assert np.all(np.abs(got - x) <= 0.5 * step * (1 + 1e-4))  # plus float32 rounding of code * scale
    rel = np.sqrt(np.mean((got - x) ** 2) / np.mean(x ** 2))
    assert rel < (0.025 if q.bits == 8 else 0.35), rel  # the outliers widen the first group's step


@pytest.mark.parametrize("reduce", [False, True], ids=["einsum", "reduce"])
@pytest.mark.parametrize("q", SCHEMES[:2], ids=lambda q: q.name)
def test_quantized_segment_ffn_matches_numpy_swiglu(q, reduce):
    from moepic_jax.model import layers

    seg = Q.quantize_rows(_weights((1, 6, 3, 128), seed=2), q)[0]  # [S, 3, W]
    x = np.random.default_rng(3).standard_normal((2, 128)).astype(np.float32)
    w = Q.dequantize_rows_np(seg, q).astype(np.float64)  # [S, 3, D]
    g, u = x @ w[:, 0].T, x @ w[:, 1].T
    want = (g / (1 + np.exp(-g)) * u) @ w[:, 2]
    with jax.default_matmul_precision("highest"):
        fn = jax.jit(lambda x, s: layers.segment_ffn(x, s, q, reduce))
        got = np.asarray(fn(jnp.asarray(x), jnp.asarray(seg)))
    assert ("dot(" in fn.lower(jnp.asarray(x), jnp.asarray(seg)).as_text(dialect="hlo")) != reduce  # the form asked
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("limit", [2, 8])
def test_resident_gathered_experts_take_the_form_of_the_whole_block(limit, monkeypatch):
    """The resident decode path computes each token alone (`experts_gathered`), the offloaded paths all N tokens at
    once: both must take the form that N tokens get, or bfloat16 results differ between them."""
    from moepic_jax.model import layers

    monkeypatch.setattr(layers, "QUANT_REDUCE_MAX_TOKENS", {"default": limit})
    q, real, forms = SCHEMES[0], layers.segment_ffn, []

    def spy(x, seg, quant=None, reduce=None):
        forms.append(layers.quant_reduce_form(quant, x.shape[0]) if reduce is None else reduce)
        return real(x, seg, quant, reduce)

    monkeypatch.setattr(layers, "segment_ffn", spy)
    experts = jnp.asarray(Q.quantize_rows(_weights((4, 2, 3, 128), seed=4), q))
    N = 5
    x = jnp.ones((N, 128), jnp.bfloat16)
    layers.experts_gathered(x, experts, jnp.zeros((N, 2), jnp.int32), jnp.ones((N, 2), jnp.float32), q)
    assert len(forms) == 2 * N and set(forms) == {N <= limit}


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match=r"valid group sizes: \[2, 4, 8, 16, 32, 64, 128, 256\]"):
        ExpertQuant(8, 96).check(256)
    with pytest.raises(ValueError, match="valid group sizes"):
        Q.quantize_rows(np.zeros((1, 2, 3, 100), np.float32), ExpertQuant(4, 64))
    with pytest.raises(ValueError, match="'int8', 'int4' or None"):
        expert_quant("int3")
    with pytest.raises(ValueError, match="even int"):
        expert_quant("int4", 7)
    with pytest.raises(ValueError, match="needs experts="):
        expert_quant(None, 64)
    assert expert_quant("int8") == ExpertQuant(8, 128) and expert_quant("int4") == ExpertQuant(4, 64)
    with pytest.raises(ValueError, match=r"group size 96 does not divide d_model=256.*valid group sizes"):
        moepic_jax.load(experts="int8", group=96)


@pytest.fixture(scope="module")
def bf16():
    return moepic_jax.load()


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized(request):
    return moepic_jax.load(experts=request.param)


def test_pinned_store_holds_packed_rows(bf16, quantized):
    cfg, q = quantized.cfg, quantized.cfg.expert_quant
    E, F, D = cfg.n_experts, cfg.d_ff, cfg.d_model
    W = {8: D + 4 * D // 128, 4: D // 2 + 4 * D // 64}[q.bits]
    for l in cfg.moe_layer_ids:
        st = quantized.params.layers[l].moe.experts
        assert isinstance(st, jax.Array) and st.sharding.memory_kind == "pinned_host"
        assert st.dtype == jnp.uint8 and st.shape == (E, F, 3, W) and st.nbytes == E * F * 3 * W
    assert quantized.expert_bytes() == len(cfg.moe_layer_ids) * E * F * 3 * W
    assert bf16.expert_bytes() / quantized.expert_bytes() == pytest.approx(2 * D / W)
    # the store is the quantization of the model-dtype weights, layer by layer
    l = cfg.moe_layer_ids[-1]
    want = Q.quantize_rows(np.asarray(bf16.params.layers[l].moe.experts).astype(np.float32), q)
    np.testing.assert_array_equal(np.asarray(quantized.params.layers[l].moe.experts), want)
    # non-expert weights stay in the model dtype
    assert quantized.params.embed.dtype == bf16.params.embed.dtype
    np.testing.assert_array_equal(quantized.params.layers[0].moe.w_router, bf16.params.layers[0].moe.w_router)


def _spy_full_precision(monkeypatch):
    """Wrap the loader's quantizer: record, at each call, how many earlier full-precision stacks are still alive."""
    from moepic_jax.io import loading

    seen, alive = [], []
    orig = loading.quantize_rows

    def spy(stack, q):
        gc.collect()
        alive.append(sum(r() is not None for r in seen))
        seen.append(weakref.ref(stack))
        return orig(stack, q)

    monkeypatch.setattr(loading, "quantize_rows", spy)
    return seen, alive


def test_checkpoint_load_never_holds_every_layer_at_full_precision(monkeypatch):
    seen, alive = _spy_full_precision(monkeypatch)
    m = moepic_jax.load(experts="int4")
    assert len(seen) == len(m.cfg.moe_layer_ids)
    assert max(alive) == 0, alive  # each layer's full-precision stack was dropped before the next was read


def test_hf_load_quantizes_layer_by_layer(monkeypatch, hf_dirs, models):
    seen, alive = _spy_full_precision(monkeypatch)
    m = moepic_jax.load(hf_dirs["qwen2_moe"], dtype="float32", experts="int8", group=32)
    ref = models["qwen2_moe"]
    assert len(seen) == len(m.cfg.moe_layer_ids) and max(alive) <= 1, alive
    for l in m.cfg.moe_layer_ids:
        want = Q.quantize_rows(np.asarray(ref.params.layers[l].moe.experts), m.cfg.expert_quant)
        np.testing.assert_array_equal(np.asarray(m.params.layers[l].moe.experts), want)
    # dense layers and the shared expert are untouched
    np.testing.assert_array_equal(m.params.layers[1].mlp.w_gate, ref.params.layers[1].mlp.w_gate)
    np.testing.assert_array_equal(m.params.layers[0].moe.shared.w_up, ref.params.layers[0].moe.shared.w_up)


def test_save_and_export_refuse_quantized(quantized, tmp_path):
    with pytest.raises(ValueError, match="quantized"):
        checkpoint.save(tmp_path / "c", quantized.cfg, quantized.params, "bfloat16")
    with pytest.raises(ValueError, match="quantized"):
        checkpoint.export_hf(quantized, tmp_path / "hf")


def test_every_policy_matches_resident_with_the_same_quantized_weights(bf16, quantized):
    ref = moepic_jax.generate(PROMPT, model=quantized, max_new_tokens=NEW, policy="resident")
    plain = moepic_jax.generate(PROMPT, model=bf16, max_new_tokens=NEW, policy="resident")
    assert len(ref.token_ids[0]) == NEW
    cfg = quantized.cfg
    # A share, not bytes: on the CPU backend the decode step's float32 copy of the bfloat16 LM head (8 MiB) is more
    # than the fixed part's estimate once the expert stacks are packed; a share grows the minimum to what the
    # compiled steps need (`OffloadEngine`, budget_follows_minimum).
    budget = "30%"  # the caches hold at most 30 % of the packed experts
    for policy in POLICIES:
        if policy == "resident":
            continue
        res = moepic_jax.generate(PROMPT, model=quantized, max_new_tokens=NEW, policy=policy, vram_budget=budget,
                                  **KW)
        assert res.token_ids == ref.token_ids, policy
        assert res.stats.h2d_bytes_per_token > 0, policy
        if policy == "ondemand":  # every routed expert copied whole, at its packed size
            assert res.stats.h2d_bytes_per_token == len(cfg.moe_layer_ids) * cfg.top_k * cfg.expert_bytes(2)
    # quantization changes the model only a little: the greedy continuation starts the same way (int4 departs
    # from the bfloat16 tokens at the third token of this prompt; perplexity measures the change)
    assert ref.token_ids[0][:2] == plain.token_ids[0][:2]


def test_batched_decode_with_several_copy_groups_matches_resident():
    """Three prompts: 6 routed experts per layer, two copy groups (the copy step's loop), int4 and lru."""
    m = moepic_jax.load(experts="int4")
    prompts = ["def fibonacci(n):", "import os", "class Foo:"]
    ref = moepic_jax.generate(prompts, model=m, max_new_tokens=6, policy="resident")
    res = moepic_jax.generate(prompts, model=m, max_new_tokens=6, policy="lru", vram_budget="30%", granule=32,
                              max_batch=3, max_seq_len=64)
    assert res.token_ids == ref.token_ids


@pytest.mark.parametrize("policy", ["lru", "moepic"])
def test_prefetched_quantized_experts_match_resident(policy):
    """Prediction and prefetch forced on: the prefetched packed buffers feed the FFN and (lru, moepic's rule) the
    cache admission."""
    m = moepic_jax.load(experts="int8")
    ref = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, policy="resident")
    res = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, policy=policy, vram_budget="30%", prefetch=True,
                              **KW)
    assert res.token_ids == ref.token_ids
    assert math.isfinite(res.stats.predictor_recall) and res.stats.predictor_recall > 0


@pytest.mark.parametrize("policy", ["moepic", "static"])
def test_split_and_refilled_caches_of_packed_rows_match_resident(policy):
    """moepic with a split plan (top-only hits: slot rows + a copied packed bottom; prefill assembles each stack from
    the slots plus copies of the rest), static refilled from the prompt (whole packed experts)."""
    from moepic_jax.planning.profiles import CachePlan, LayerPlan

    m = moepic_jax.load(experts="int4")
    cfg = m.cfg
    E, F = cfg.n_experts, cfg.d_ff
    cached = tuple(e for e in range(E) if e % 4 != 1)  # 12 of 16 experts
    split = 192 if policy == "moepic" else F
    plan = CachePlan(layers=tuple(LayerPlan(split, cached) if moe else LayerPlan(0, ()) for moe in cfg.moe_layers),
                     budget_bytes=0, model_id=cfg.identity())
    ref = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, policy="resident")
    res = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, policy=policy, plan=plan,
                              adapt_to_prompt=policy == "static", **KW)
    assert res.token_ids == ref.token_ids
    if policy == "moepic":
        assert res.stats.top_only_hit_rate > 0
        rb = cfg.expert_row_bytes(2)
        want = ((E - len(cached)) * F + len(cached) * (F - split)) * rb * len(cfg.moe_layer_ids)
        assert res.stats.prefill_h2d_bytes == want  # only what the slots lack, in packed bytes


def test_budget_and_planner_count_quantized_bytes(bf16):
    """The same byte budget caches about twice (int8) and 3.6 times (int4) as many whole experts."""
    base = make_engine(bf16, policy="static", vram_budget="25%", **KW)
    budget = base.vram_budget_bytes
    n_bf16 = sum(len(lp.cached) for lp in base.cache_plan.layers)
    assert n_bf16 > 0
    for experts, ratio in (("int8", 1.9), ("int4", 3.3)):
        m = moepic_jax.load(experts=experts)
        eng = make_engine(m, policy="static", vram_budget=budget, **KW)
        n = sum(len(lp.cached) for lp in eng.cache_plan.layers)
        assert n >= ratio * n_bf16, (experts, n, n_bf16)
        assert eng.row_bytes == 3 * m.cfg.expert_row_width == m.cfg.expert_row_bytes(2)
        assert eng.cache_bytes() == sum(len(lp.cached) * lp.split for lp in eng.cache_plan.layers) * eng.row_bytes
        assert eng.cache_bytes() <= eng.cache_budget
        assert eng.fixed_bytes < base.fixed_bytes  # copy buffers and prefill stacks are packed too
        res = moepic_jax.generate(PROMPT, model=m, engine=eng, max_new_tokens=4)
        caches = [c for c in eng.caches if c is not None]
        assert all(c.tops.dtype == jnp.uint8 and c.tops.shape[-1] == m.cfg.expert_row_width for c in caches)
        assert res.stats.full_hit_rate > 0


def test_profile_counts_packed_rows():
    from moepic_jax.offload.placement import make_placement
    from moepic_jax.offload.store import place_weights
    from moepic_jax.planning import calibrate
    from moepic_jax.planning.profiles import ModelProfile

    m = moepic_jax.load(experts="int4")
    mp = calibrate.profile_model(place_weights(m, make_placement(None, m.cfg.n_experts)), n_predicted=m.cfg.top_k)
    assert mp.row_bytes == m.cfg.expert_row_bytes(2) == 3 * (128 + 4 * 256 // 64)
    assert mp.expert_bytes == m.cfg.expert_bytes(2)
    assert ModelProfile.from_json(mp.to_json()).row_bytes == mp.row_bytes


def test_cli_generate_with_int8_experts(capsys, tmp_path):
    out = tmp_path / "stats.json"
    assert cli.main(["generate", PROMPT, "--experts", "int8", "--policy", "ondemand", "--max-new-tokens", "4",
                     "--stats-json", str(out)]) == 0
    text, err = capsys.readouterr()
    assert text.startswith(PROMPT) and "policy=ondemand" in err
    stats = json.loads(out.read_text())
    cfg = moepic_jax.load(experts="int8", pin_experts=False).cfg
    # 6 MoE layers x top-2 experts x 256 neurons x 3 rows x (256 int8 codes + 2 float32 scales)
    assert stats["h2d_bytes_per_token"] == 6 * 2 * 256 * 3 * 264 == len(cfg.moe_layer_ids) * 2 * cfg.expert_bytes(2)
    assert cli.main(["generate", PROMPT, "--experts", "int4", "--quant-group", "96", "--max-new-tokens", "2"]) == 2
    assert "valid group sizes" in capsys.readouterr().err


def test_heldout_perplexity_int8_close_to_bf16():
    from tools import train_embedded as train

    d = checkpoint.default_checkpoint_dir()
    ev = json.loads((d / "eval.json").read_text())
    text = (d / ev["sample"]).read_text(encoding="utf-8")
    assert hashlib.sha256(text.encode()).hexdigest() == ev["sample_sha256"]
    m = moepic_jax.load(dtype="float32", experts="int8")
    ppl = train.sample_perplexity(m, text[ev["offset_chars"]:], ev["n_tokens"], ev["chunk"])
    assert math.isfinite(ppl)
    assert abs(ppl / ev["ppl"] - 1) <= 0.01, (ppl, ev["ppl"])


def test_direct_copies_of_packed_rows_match_resident():
    """Direct copies (`offload/transfer.py`) move packed rows: a split plan (top rows from the slots, device to
    device, packed bottoms from the host) with prefetch forced on gives the resident model's tokens."""
    from moepic_jax.planning.profiles import CachePlan, LayerPlan

    m = moepic_jax.load(experts="int4")
    cfg = m.cfg
    cached = tuple(e for e in range(cfg.n_experts) if e % 4 != 1)
    plan = CachePlan(layers=tuple(LayerPlan(192, cached) if moe else LayerPlan(0, ()) for moe in cfg.moe_layers),
                     budget_bytes=0, model_id=cfg.identity())
    ref = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, policy="resident")
    engine = make_engine(m, policy="moepic", plan=plan, prefetch=True, direct=True, **KW)
    res = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, engine=engine)
    assert engine.direct and res.token_ids == ref.token_ids
    assert res.stats.top_only_hit_rate > 0 and res.stats.predictor_recall > 0


@pytest.mark.parametrize("early", [False, True], ids=["after_wait", "during_copies"])
@pytest.mark.parametrize("policy", ["lru", "moepic"])
def test_direct_copies_of_whole_packed_experts_match_resident(policy, early, monkeypatch):
    """Whole packed experts in the slots, prefetch forced on, the prefetched and shared experts computed after the
    copies' wait or while they stream (`decode.READY_FFNS_DURING_COPIES`; a packed full hit keeps the row select
    either way): the tokens are the resident model's."""
    from moepic_jax.offload import decode
    from moepic_jax.planning.profiles import CachePlan, LayerPlan

    monkeypatch.setattr(decode, "READY_FFNS_DURING_COPIES", early)

    m = moepic_jax.load(experts="int4")
    cfg = m.cfg
    cached = tuple(e for e in range(cfg.n_experts) if e % 2 == 0)
    plan = CachePlan(layers=tuple(LayerPlan(cfg.d_ff, cached) if moe else LayerPlan(0, ()) for moe in cfg.moe_layers),
                     budget_bytes=0, model_id=cfg.identity())
    ref = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, policy="resident")
    engine = make_engine(m, policy=policy, plan=plan, prefetch=True, direct=True, **KW)
    res = moepic_jax.generate(PROMPT, model=m, max_new_tokens=8, engine=engine)
    assert engine.direct and res.token_ids == ref.token_ids
    assert res.stats.full_hit_rate > 0 and res.stats.predictor_recall > 0

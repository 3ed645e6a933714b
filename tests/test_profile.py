"""profile.profile_model against transformers' own router logits (the independent reference)."""

import numpy as np
import pytest
import torch

import moepic_jax
from moepic_jax.planning.calibrate import profile_model
from moepic_jax.runtime.factory import make_engine


@pytest.fixture(scope="module")
def mixtral(hf_dirs):
    return moepic_jax.load(hf_dirs["mixtral"], dtype="float32"), hf_dirs["mixtral_torch"]


def test_frequencies_match_transformers_routing(mixtral):
    model, hf = mixtral
    cfg = model.cfg
    tokens = np.random.RandomState(5).randint(0, cfg.vocab_size, 40).astype(np.int32)
    with torch.no_grad():
        out = hf(torch.as_tensor(tokens[None], dtype=torch.long), output_router_logits=True)
    # [tokens, experts] router logits per layer -> each token's top-k experts
    top = [np.argsort(-rl.float().numpy().reshape(len(tokens), -1), axis=1, kind="stable")[:, :cfg.top_k]
           for rl in out.router_logits]
    engine = make_engine(model, policy="ondemand", max_batch=1, max_seq_len=64)
    k, E, start = cfg.top_k, cfg.n_experts, 10
    raw = profile_model(engine.weights, tokens, score_from=start, smoothing=0.0)
    smooth = profile_model(engine.weights, tokens, score_from=start)  # default alpha = 0.5
    for l in range(cfg.n_layers):
        counts = np.bincount(top[l][start:].ravel(), minlength=E)
        n = len(tokens) - start
        np.testing.assert_allclose(raw.freq[l], counts / n, atol=1e-12)
        np.testing.assert_allclose(smooth.freq[l], k * (counts + 0.5) / (n * k + 0.5 * E), atol=1e-12)
        assert smooth.freq[l].min() > 0 and abs(smooth.freq[l].sum() - k) < 1e-9
    with pytest.raises(ValueError, match="score_from"):
        profile_model(engine.weights, tokens, score_from=len(tokens))
    with pytest.raises(ValueError, match="smoothing"):
        profile_model(engine.weights, tokens, smoothing=-1.0)


def test_measure_hardware_runs_the_copy_step_it_prices(capsys):
    """measure_hardware times the decode step's own copy step (`copy_step.assemble` / `expert_outputs`) on the
    placed weights: every figure is a measured, finite, positive time or rate. No progress bar unless asked for."""
    import numpy as np

    from moepic_jax.planning.calibrate import measure_hardware

    m = moepic_jax.load(None, dtype="float32")
    hw = measure_hardware(make_engine(m, "ondemand", max_seq_len=32).weights, repeats=2)
    assert "measuring hardware" not in capsys.readouterr().err
    assert hw.h2d_bandwidth_Bps > 1e6 and hw.h2d_latency_s >= 0
    assert hw.layer_compute_s.shape == (m.cfg.n_layers,) and np.all(hw.layer_compute_s > 0)
    assert hw.cond_overhead_s >= 0 and 0.0 <= hw.cond_window_fraction <= 1.0


def test_progress_bars_only_when_asked(capsys):
    """progress=True shows a bar (stderr) for pinning, profiling and the hardware measurement, each run to its end;
    progress=False (the default) prints nothing."""
    from moepic_jax.planning.calibrate import measure_hardware

    m = moepic_jax.load(None, dtype="float32")
    L = m.cfg.n_layers
    capsys.readouterr()
    eng = make_engine(m, "moepic", vram_budget=0.5, max_seq_len=32)
    profile_model(eng.weights)
    assert capsys.readouterr() == ("", "")
    make_engine(m, "moepic", vram_budget=0.5, max_seq_len=32, progress=True)
    err = capsys.readouterr().err
    assert "pinning experts" in err and "profiling experts" in err and f"{L}/{L}" in err
    measure_hardware(eng.weights, repeats=1, progress=True)
    err = capsys.readouterr().err
    assert "measuring hardware" in err and "9/9" in err  # 4 copy sizes, the compute, 4 conditional chains


@pytest.mark.parametrize("direct", [False, True])
def test_copy_cost_chains_apply_the_experts_they_copy(direct):
    """The chains that price the copy step (`conditional_costs`: plain, hit, miss, prefetched ahead) compute what
    they claim, against plain JAX on the device-resident experts: a copy that was skipped, landed in the wrong
    buffer or was waited for under another call's tag would change the result. With direct copies the prefetch
    rides in the layer's own copy call (a hit), so the "ahead" layers apply that hit and the prefetched expert (the
    prefetched one first where the step computes it during the copies, `decode.READY_FFNS_DURING_COPIES`)."""
    import jax
    import jax.numpy as jnp

    from moepic_jax import model as M
    from moepic_jax.offload import decode, transfer
    from moepic_jax.planning import calibrate

    if direct and not transfer.available(jax.devices()[0]):
        pytest.skip("direct copies need a C++ compiler")
    m = moepic_jax.load(None, dtype="float32")
    w = make_engine(m, "ondemand", max_seq_len=32).weights
    cfg, l0, reps = m.cfg, m.cfg.moe_layer_ids[0], 3
    stack = w.stacks[l0]
    lp = w.resident.layers[l0]
    ex = jax.device_put(stack, jax.sharding.SingleDeviceSharding(w.device))
    kv = M.init_kv_cache(cfg, 1, 256, w.dtype)
    pos, valid = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 256), bool)

    def layer(h, experts, wt):
        lp, k, v = wt
        ffn = M.resident_ffn(lp.replace(moe=lp.moe.replace(experts=experts)), cfg, is_moe=True)
        return M.decoder_layer(lp, h, k, v, 0, M.Positions(pos, valid, jnp.int32(0)), cfg, ffn)[0]

    h0 = jnp.ones((1, 1, cfg.d_model), w.dtype) * 0.01
    got = {}
    calibrate.conditional_costs(w, stack, ex, layer, h0, repeats=1, reps=reps, weights=(lp, kv.k, kv.v),
                                direct=direct, outputs=got)

    def apply(h, e):
        x = M.rms_norm(h[0], jnp.ones(cfg.d_model, h.dtype), cfg.rms_eps)
        return h + M.segment_ffn(x, ex[e])[None].astype(h.dtype)

    E = stack.shape[0]
    for mode in calibrate.COND_MODES:
        h = h0
        for r in range(reps):
            h = layer(h, ex, (lp, kv.k, kv.v))
            miss = 1 + r % (E - 1)
            h = {"plain": lambda: apply(h, r % E), "hit": lambda: apply(h, 0), "miss": lambda: apply(h, miss),
                 "ahead": lambda: (apply(h, miss) if not direct else apply(apply(h, miss), 0)
                                   if decode.READY_FFNS_DURING_COPIES else apply(apply(h, 0), miss))}[mode]()
        np.testing.assert_allclose(np.asarray(got[mode]), np.asarray(h), rtol=1e-4, atol=1e-5, err_msg=mode)

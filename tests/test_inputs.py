"""Invariant 5: bad input is a clear error naming the fix (config, checkpoint, prompts, sampling, budget)."""

import json
import shutil

import jax
import numpy as np
import pytest
from conftest import build_hf_model
from safetensors.numpy import load_file, save_file

import moepic_jax
from moepic_jax.offload.memory import parse_budget, resolve_budget
from moepic_jax.config import from_hf_config


def _cfg(hf_dirs, fam="qwen2_moe"):
    return json.loads((hf_dirs[fam] / "config.json").read_text())


def test_unsupported_model_type(hf_dirs):
    d = _cfg(hf_dirs)
    d["model_type"] = "deepseek_v3"
    with pytest.raises(ValueError, match="supported MoE families: mixtral, qwen2_moe, qwen3_moe, olmoe"):
        from_hf_config(d)


@pytest.mark.parametrize("key", ["rope_parameters", "rope_scaling"])
def test_unsupported_rope_type(hf_dirs, key):
    d = _cfg(hf_dirs)
    d.pop("rope_parameters", None)
    d[key] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="unsupported RoPE type 'yarn'.*supported: default"):
        from_hf_config(d)


def test_sliding_window_refused(hf_dirs):
    d = _cfg(hf_dirs, "mixtral")
    d["sliding_window"] = 4096
    with pytest.raises(ValueError, match="sliding-window attention .* not supported"):
        from_hf_config(d)
    d = _cfg(hf_dirs, "qwen3_moe")
    d["use_sliding_window"], d["sliding_window"] = True, 128
    with pytest.raises(ValueError, match="sliding-window"):
        from_hf_config(d)


def test_old_and_new_rope_layouts_agree(hf_dirs):
    new = _cfg(hf_dirs, "qwen3_moe")
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    old = dict(new)
    old.pop("rope_parameters")
    old["rope_theta"] = 12345.0
    assert from_hf_config(new) == from_hf_config(old)
    assert from_hf_config(old).rope_theta == 12345.0


def test_dense_layers_from_sparse_step(hf_dirs):
    d = _cfg(hf_dirs, "qwen2_moe")
    d.update(mlp_only_layers=[], decoder_sparse_step=2)
    assert from_hf_config(d).moe_layers == (False, True, False)
    assert from_hf_config(_cfg(hf_dirs, "qwen2_moe")).moe_layers == (True, False, True)


def _copy(hf_dirs, tmp_path, fam="mixtral"):
    dst = tmp_path / fam
    shutil.copytree(hf_dirs[fam], dst)
    return dst, load_file(str(dst / "model.safetensors"))


def test_missing_tensor(hf_dirs, tmp_path):
    d, sd = _copy(hf_dirs, tmp_path)
    sd.pop("model.layers.2.block_sparse_moe.experts.5.w2.weight")
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="missing 1 tensor.*layers.2.moe.experts.5.2"):
        moepic_jax.load(d, dtype="float32")


def test_unexpected_tensor(hf_dirs, tmp_path):
    d, sd = _copy(hf_dirs, tmp_path)
    sd["model.layers.0.mystery.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.mystery.weight'"):
        moepic_jax.load(d, dtype="float32")


def test_wrong_shape(hf_dirs, tmp_path):
    d, sd = _copy(hf_dirs, tmp_path)
    sd["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \(16, 64\), expected \(32, 64\)"):
        moepic_jax.load(d, dtype="float32")


def test_missing_shard(hf_dirs, tmp_path):
    m = build_hf_model("qwen3_moe")
    m.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    files = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 1, "the checkpoint should be sharded for this test"
    ok = moepic_jax.load(tmp_path / "sharded", dtype="float32")  # sharded + index loads
    ref = moepic_jax.load(hf_dirs["qwen3_moe"], dtype="float32")
    np.testing.assert_array_equal(ok.params.layers[2].moe.experts, ref.params.layers[2].moe.experts)
    files[-1].unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        moepic_jax.load(tmp_path / "sharded", dtype="float32")


def test_fused_expert_layout(hf_dirs, tmp_path, models):
    """transformers' fused layout (experts.gate_up_proj [E, 2F, D], experts.down_proj [E, D, F]) loads identically."""
    d, sd = _copy(hf_dirs, tmp_path, "olmoe")
    for l in range(3):
        p = f"model.layers.{l}.mlp.experts."
        g = np.stack([sd.pop(p + f"{e}.gate_proj.weight") for e in range(8)])
        u = np.stack([sd.pop(p + f"{e}.up_proj.weight") for e in range(8)])
        dn = np.stack([sd.pop(p + f"{e}.down_proj.weight") for e in range(8)])
        sd[p + "gate_up_proj"] = np.concatenate([g, u], axis=1)
        sd[p + "down_proj"] = dn
    save_file(sd, str(d / "model.safetensors"))
    fused = moepic_jax.load(d, dtype="float32")
    for l in range(3):
        np.testing.assert_array_equal(fused.params.layers[l].moe.experts, models["olmoe"].params.layers[l].moe.experts)


def test_bad_dtype_and_path(hf_dirs, tmp_path):
    with pytest.raises(ValueError, match="unsupported dtype 'int8'"):
        moepic_jax.load(hf_dirs["mixtral"], dtype="int8")
    with pytest.raises(FileNotFoundError):
        moepic_jax.load(tmp_path / "nope")


def test_bf16_load_casts(hf_dirs):
    m = moepic_jax.load(hf_dirs["mixtral"])
    assert str(m.params.layers[0].moe.experts.dtype) == "bfloat16"


@pytest.mark.parametrize("kw, msg", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(policy="fastest"), "unknown policy"),
    (dict(stop=[""]), "stop"),
])
def test_bad_generate_args(models, kw, msg):
    with pytest.raises(ValueError, match=msg):
        moepic_jax.generate([1, 2, 3], model=models["mixtral"], **{"policy": "resident", **kw})


def test_bad_prompts(models):
    m = models["mixtral"]
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        moepic_jax.generate([[]], model=m, policy="resident")
    with pytest.raises(ValueError, match="prompts is empty"):
        moepic_jax.generate([], model=m, policy="resident")
    with pytest.raises(ValueError, match="exceeds the context of 256 tokens"):
        moepic_jax.generate(list(range(10)) * 25, model=m, max_new_tokens=8, policy="resident")
    with pytest.raises(ValueError, match="no tokenizer"):
        moepic_jax.generate("hello", model=m, policy="resident")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        moepic_jax.generate([1, 500], model=m, policy="resident")


@pytest.mark.parametrize("budget, want", [
    (1000, 1000), ("6GiB", 6 * 2**30), ("500MB", 500 * 10**6), ("1.5 GiB", int(1.5 * 2**30)),
    ("40%", 100 + 400), (0.25, 100 + 250), ("0%", 100), (None, None), ("none", None), ("auto", 100 + 250),
])
def test_parse_budget(budget, want):
    """Bytes are bytes; a share is the minimum (here 100 bytes) plus that share of the expert bytes (here 1000);
    "auto" on the CPU is the minimum plus 25 % of the expert bytes."""
    assert resolve_budget(parse_budget(budget), 100, 1000, jax.devices("cpu")[0]) == want


@pytest.mark.parametrize("budget", [-5, 0, 1.5, "lots", "120%", True])
def test_parse_budget_errors(budget):
    with pytest.raises(ValueError, match="vram_budget|budget"):
        parse_budget(budget)


def test_budget_below_minimum_names_the_smallest_value_in_the_form_typed(models):
    """The error names the minimum and the smallest budget in the unit the user typed (and the share form)."""
    m = models["qwen3_moe"]
    base = moepic_jax.make_engine(m, "moepic", max_seq_len=32).fixed_bytes
    with pytest.raises(ValueError, match=r"below the minimum of \d+\.\d+ GiB.*at least (\d+\.\d+)MiB.*25%") as e:
        moepic_jax.make_engine(m, "moepic", vram_budget="0.01MiB", max_seq_len=32)
    smallest = float(e.value.args[0].split("at least ")[1].split("MiB")[0]) * 2**20
    assert base <= smallest <= base + 0.001 * 2**20 + 1  # rounded to the thousandth of a MiB, up from the minimum
    moepic_jax.make_engine(m, "moepic", vram_budget=f"{smallest / 2**20 + 0.001:.3f}MiB", max_seq_len=32)  # fits


def test_sampling_is_seeded_and_respects_top_k(models):
    m = models["qwen3_moe"]
    a = moepic_jax.generate([5, 6, 7], model=m, max_new_tokens=8, temperature=1.0, seed=3, policy="resident")
    b = moepic_jax.generate([5, 6, 7], model=m, max_new_tokens=8, temperature=1.0, seed=3, policy="resident")
    assert a.token_ids == b.token_ids
    g = moepic_jax.generate([5, 6, 7], model=m, max_new_tokens=8, policy="resident")
    k1 = moepic_jax.generate([5, 6, 7], model=m, max_new_tokens=8, temperature=0.7, top_k=1, seed=9, policy="resident")
    assert k1.token_ids == g.token_ids  # top-k 1 is greedy whatever the seed


def test_top_p_filters_the_nucleus():
    """Against a brute-force nucleus: with top_p the sampled tokens stay inside the smallest set reaching top_p."""
    import jax
    import jax.numpy as jnp

    from moepic_jax import sampling

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    seen = set()
    for s in range(200):
        t = sampling.sample(logits, jax.random.PRNGKey(s), jnp.float32(1.0), 0, jnp.float32(0.75), use_top_p=True)
        seen.add(int(t[0]))
    assert seen == {0, 1}  # 0.5 + 0.3 >= 0.75: tokens 2 and 3 are never drawn
    seen = {int(sampling.sample(logits, jax.random.PRNGKey(s), jnp.float32(1.0), 0, jnp.float32(1.0),
                                use_top_p=False)[0]) for s in range(200)}
    assert seen == {0, 1, 2, 3}


def test_parse_budget_numpy_scalars():
    assert parse_budget(np.int64(10**9)).value == 10**9 and parse_budget(np.int64(10**9)).kind == "bytes"
    assert parse_budget(np.float32(0.5)).kind == "share" and parse_budget(np.float32(0.5)).value == 0.5


@pytest.mark.parametrize("edit, msg", [
    ({"mlp_only_layers": [0, 1]}, "config.json makes layer 0 dense"),
    ({"num_experts": 4}, "n_experts=4"),
])
def test_config_checkpoint_mismatch_is_a_value_error(hf_dirs, tmp_path, edit, msg):
    d = tmp_path / "q2"
    shutil.copytree(hf_dirs["qwen2_moe"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(edit)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=msg):
        moepic_jax.load(d, dtype="float32")


def test_kv_cache_never_reserves_past_the_context(models):
    """A prompt whose power-of-two bucket plus the new tokens would pass the context: the padding shrinks and the
    KV cache holds at most the context, and the tokens equal those of an unpadded run (the resident forward)."""
    m = models["qwen3_moe"]
    ctx = m.cfg.max_position_embeddings  # 256
    prompt = [int(t) for t in np.random.RandomState(0).randint(0, 96, 140)]  # bucket 256 + 16 > 256
    res = moepic_jax.generate(prompt, model=m, max_new_tokens=16, policy="lru", vram_budget="30%",
                              max_batch=1, granule=16)
    eng = moepic_jax.ENGINES.engines[next(iter(moepic_jax.ENGINES.engines))]
    assert eng.max_seq_len <= ctx
    ref = moepic_jax.generate(prompt, model=m, max_new_tokens=16, policy="resident")
    assert res.token_ids == ref.token_ids

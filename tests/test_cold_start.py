"""benchmarks.cold_start on CPU: the random Qwen1.5-shaped checkpoint it writes is a complete Hugging Face directory
(our loader and transformers read it with nothing missing or unexpected), and one fresh `moepic-jax generate`
process reports its timings."""

import json
import math

import numpy as np

import moepic_jax
from benchmarks import cold_start as cs
from benchmarks import common as C


def test_random_checkpoint_is_a_complete_hf_directory(tmp_path):
    import torch
    import transformers

    cfg = C.get_config("qwen15", tiny=True, n_layers=2)
    out = cs.write_random_checkpoint(cfg, tmp_path / "ckpt", progress=False)
    assert len(list(out.glob("*.safetensors"))) == cfg.n_layers + 1  # one shard per layer + embedding/head
    index = json.loads((out / "model.safetensors.index.json").read_text())
    stored = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert 0 < stored - cs.checkpoint_bytes(cfg) < 64 * 1024 * len(index["weight_map"])  # headers only on top
    m = moepic_jax.load(out, dtype="float32")  # refuses missing, unexpected or misshapen tensors
    assert m.cfg == cfg and m.tokenizer is None
    assert np.all(np.asarray(m.params.final_norm) == 1) and np.asarray(m.params.layers[0].moe.experts).std() > 0.01
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), output_loading_info=True,
                                                                 dtype=torch.float32)
    assert type(hf).__name__ == "Qwen2MoeForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_one_cold_run_reports_its_timings(tmp_path):
    out = tmp_path / "cold.json"
    rows = cs.main(["--tiny", "--layers", "2", "--models", "random", "--runs", "1", "--new-tokens", "4",
                    "--work-dir", str(tmp_path), "--out", str(out)])
    assert len(rows) == 1
    r = rows[0]
    assert r["cache"] == "empty" and r["new_tokens"] == 4 and r["compiles"] > 0 and r["cache_files"] > 0
    assert 0 < r["load_s"] < r["first_token_s"] < r["wall_s"]
    assert r["compile_s"] <= r["setup_s"] and all(math.isfinite(r[k]) for k in ("ttft_ms", "tpot_ms"))
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["wall_s"] == r["wall_s"] and saved["meta"]["config"]["num_hidden_layers"] == 2
    assert not list(tmp_path.glob("moepic_cold_*"))  # the checkpoint and the compile cache are removed


def test_use_compile_cache_writes_compiled_programs_to_its_directory(tmp_path):
    """In a fresh process (JAX decides once, at its first compilation, whether a persistent cache is in use)."""
    import subprocess
    import sys

    code = ("import jax, jax.numpy as jnp, moepic_jax, sys; d = moepic_jax.use_compile_cache(sys.argv[1], 0.0); "
            "jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(jnp.arange(7.0)).block_until_ready(); print(d)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "xla")], capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == str(tmp_path / "xla")
    assert any((tmp_path / "xla").iterdir())

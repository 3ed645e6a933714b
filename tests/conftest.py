"""Shared fixtures: tiny random Hugging Face MoE checkpoints of every supported family (CPU, float32).

Weights are drawn with std 0.15 so greedy argmax has a clear margin (DESIGN.md, invariant 1).
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As the CLI does: every op rounds as written, so bfloat16 results are identical across policies (see cli.py).
if "xla_allow_excess_precision" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")

# Small but non-trivial: GQA (4 query heads over 2 kv heads), 3 layers, 8 experts, top-2, d_ff 64.
BASE = dict(vocab_size=96, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts_per_tok=2, max_position_embeddings=256, rms_norm_eps=1e-6)

VARIANTS = {
    "mixtral": dict(intermediate_size=64, num_local_experts=8),
    # a shared expert with its gate, qkv bias, a dense layer (mlp_only_layers), no top-k renorm
    "qwen2_moe": dict(moe_intermediate_size=64, intermediate_size=96, shared_expert_intermediate_size=48, num_experts=8,
                      mlp_only_layers=[1], norm_topk_prob=False, qkv_bias=True),
    # per-head q/k norm, explicit head_dim different from hidden/heads, renormalised top-k
    "qwen3_moe": dict(moe_intermediate_size=64, intermediate_size=96, num_experts=8, head_dim=24, norm_topk_prob=True),
    # q/k norm over all heads, no renorm, tied embeddings
    "olmoe": dict(intermediate_size=64, num_experts=8, norm_topk_prob=False, tie_word_embeddings=True),
}


def build_hf_model(family: str, seed: int = 0, **overrides):
    """A random transformers model of `family` (float32, eval mode)."""
    import torch
    import transformers

    classes = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM),
    }
    cfg_cls, model_cls = classes[family]
    kw = {**BASE, **VARIANTS[family], **overrides}
    kw.setdefault("eos_token_id", None)
    kw.setdefault("bos_token_id", None)
    kw.setdefault("pad_token_id", None)
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    m = model_cls(cfg).float().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.15)
        if kw.get("tie_word_embeddings"):
            m.tie_weights()
    return m


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """family -> directory of a saved random checkpoint (plus the torch model under key family+'_torch')."""
    out = {}
    for fam in FAMILIES:
        m = build_hf_model(fam)
        d = tmp_path_factory.mktemp(fam)
        m.save_pretrained(d)
        out[fam] = d
        out[fam + "_torch"] = m
    return out


@pytest.fixture(scope="session")
def models(hf_dirs):
    """family -> moepic_jax Model loaded in float32."""
    import moepic_jax

    return {fam: moepic_jax.load(hf_dirs[fam], dtype="float32") for fam in FAMILIES}


def random_ids(seed: int, batch: int, seq: int, vocab: int = 96) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq))

"""Helpers shared by the GPU benchmark scripts (`from benchmarks import common as C`): real configs, random models
built on the device, the peak host->device bandwidth of the run, environment info, and result files (JSON +
markdown + PNG).

Import this module AFTER setting the XLA_* environment variables of the run (it imports jax).

Random models (`random_model`)
------------------------------
No CPU-side random init of tens of GB: every weight is drawn with `jax.random` on the default device.
Non-expert ("resident") weights are small (Qwen1.5-MoE-A2.7B: about 3.7 GB) and are pulled back to host NumPy,
one leaf at a time, like a loaded checkpoint (engines `device_put` them; NumPy leaves also keep
`Model.weight_bytes()` meaningful). Expert stacks `[E, F, 3, D]` are drawn one MoE layer at a time on the device
and moved with `jax.device_put(x, SingleDeviceSharding(dev, memory_kind="pinned_host"))` straight into pinned
host memory; the device copy is deleted before the next layer, so the device never holds more than one layer.
`offload.store.pin_experts` returns stacks that are already pinned_host arrays as they are, so every engine shares that one host store.
Norm weights are ones (a std-0.02 norm weight would erase the signal), everything else N(0, std).

Routing realism (`zipf_bias=alpha`): "Zipf router bias (dedicated residual coordinate)"
-------------------------------------------------------------------------------------
Random routers were expected to route almost uniformly; measured, they don't (Qwen1.5-MoE width, std 0.02, 3
layers on the CPU: normalised routing entropy 0.78, the top 25 % of experts take 78 % of the routed pairs), because
attention averaging makes the hidden states of different tokens alike. So measure the routing of every model
(`routing_entropy`) and report it beside the results. The Zipf option adds a controlled skew. The router is `logits = rmsnorm(h) @ W_r` and has no
bias parameter, and model.py must not change, so the bias is built from weights alone:

  * coordinate 0 of the residual stream is made a constant A = std (as large as any embedding entry, so token
    embeddings stay as distinct as before): `embed[:, 0] = A`, and every weight that
    WRITES the residual stream has its column 0 zeroed (attention `wo[:, 0]` and `bo[0]`, the experts' down rows
    `experts[:, :, 2, 0]`, the shared expert's and dense MLPs' `w_down[:, 0]`). So h[0] == A exactly, at every
    layer, for every token, in every engine (the split top/bottom sums add exact zeros there too);
  * the MoE input is then x[0] = g0_l * A / rms(h_mid) (RMSNorm), with g0_l = `mlp_norm[0]` of layer l. Layer by
    layer, as the model is built, calibration tokens are run through the layer and g0_l is set to
    mean_tokens(rms(h_mid)) / A, so x[0] ~= 1 (like any other coordinate of x);
  * row 0 of the router is the bias: `w_router[0, e] = b_{l,e} = -alpha * ln(rank_{l,e})` (centred), with a fixed
    random rank permutation per layer. softmax(content + b) multiplies expert e's odds by rank^-alpha: a Zipf law.

The bias is exact up to the per-token spread of rms(h_mid) (the realised bias is b * mean_rms / rms_token); its
coefficient of variation per layer is measured during construction and reported in `model.random_info`
(measured on the CPU: 10-13 % on tiny models; up to 31 % at Qwen1.5 width, largest in the first layers, where the
first tokens of a sequence attend to few others). The bias keeps its Zipf shape per token; only its scale varies. The rest of the model is unchanged (one of D residual coordinates is given up).
The predictor (layer l+1's norm and router on layer l's stream) sees the same bias, as it would in a real model.
Always report the routing entropy (`routing_entropy`) of what was actually routed, with and without the bias.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import importlib.metadata
import itertools
import json
import math
import os
import pathlib
import platform
import re
import socket
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax.config import MoEConfig, expert_quant, from_hf_config
import moepic_jax
from moepic_jax.io.loading import Model
from moepic_jax.model.params import np_dtype
from moepic_jax.model.quant import quantize_rows_jax

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

# ------------------------------------------------------------------------------------------------------------------
# Real Hugging Face configs (config.json of each checkpoint, trimmed to what the architecture needs; values as
# published on the Hub). Notes on what is less certain are next to the entries.

REAL_CONFIGS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen1.5-MoE-A2.7B: config.json has no qkv_bias key (Qwen2-MoE always has q/k/v biases; transformers 5
    # names the flag qkv_bias and defaults it to True). sliding_window 32768 but use_sliding_window false.
    "qwen15": {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "intermediate_size": 5632, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "vocab_size": 151936, "max_position_embeddings": 8192, "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False, "qkv_bias": True,
        "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 21,
        "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
    },
    # allenai/OLMoE-1B-7B-0924: q/k RMSNorm over all heads (qk_norm "full"), no biases, clip_qkv null.
    # bos_token_id is null in the published file (eos 50279, pad 1).
    "olmoe": {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe",
        "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "intermediate_size": 1024, "num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False,
        "vocab_size": 50304, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-05, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "clip_qkv": None, "bos_token_id": None, "eos_token_id": 50279, "pad_token_id": 1, "torch_dtype": "bfloat16",
    },
    # Qwen/Qwen3-30B-A3B: head_dim 128 (so H*hd = 4096 != hidden 2048), per-head q/k norm, no biases.
    "qwen3": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
        "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 151936, "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-06, "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": 48,
        "bos_token_id": 151643, "eos_token_id": 151645, "torch_dtype": "bfloat16",
    },
    # mistralai/Mixtral-8x7B-v0.1: sliding_window null in the current config.json (early uploads said 4096).
    "mixtral": {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu",
        "tie_word_embeddings": False, "sliding_window": None, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    },
}


def set_gpu_env(model: str, tiny: bool = False) -> None:
    """Settings read when JAX starts its backend (call before the first device use; importing jax is fine): no
    preallocation, so that peak_bytes_in_use means something; Mixtral-8x7B's 84 GiB of experts need a pinned host
    pool above the 64 GiB default, and 112 GiB let the pool grow until the 128 GiB H200 host OOM-killed the
    process (docs/notes/2026-11-30-benchmark-diary.md). (`import moepic_jax` sets CUDA_DEVICE_MAX_CONNECTIONS for direct
    copies.) Values already in the environment win."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if model == "mixtral" and not tiny:
        os.environ.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", "100")


MODEL_NAMES = {"qwen15": "Qwen1.5-MoE-A2.7B", "olmoe": "OLMoE-1B-7B", "qwen3": "Qwen3-30B-A3B",
               "mixtral": "Mixtral-8x7B"}

# Shrunk versions of each family for CPU smoke tests (same family features: shared expert, q/k norms, GQA ...).
_TINY = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=512, max_position_embeddings=512)
TINY_OVERRIDES = {
    "qwen15": dict(_TINY, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=64,
                   shared_expert_intermediate_size=96, num_experts=8, num_experts_per_tok=2),
    "olmoe": dict(_TINY, num_key_value_heads=4, intermediate_size=64, num_experts=8, num_experts_per_tok=2),
    "qwen3": dict(_TINY, num_key_value_heads=2, head_dim=24, intermediate_size=96, moe_intermediate_size=64,
                  num_experts=8, num_experts_per_tok=2),
    "mixtral": dict(_TINY, num_key_value_heads=2, intermediate_size=64, num_local_experts=8,
                    num_experts_per_tok=2),
}


def get_config(name: str, tiny: bool = False, n_layers: int | None = None, experts: str | None = None,
               quant_group: int | None = None) -> MoEConfig:
    """`MoEConfig` of a real model ("qwen15", "olmoe", "qwen3", "mixtral"), or of its tiny CPU stand-in; n_layers:
    keep only the first n layers (a probe of per-layer costs that compiles faster); experts, quant_group: quantized
    experts as `moepic_jax.config.expert_quant` reads them (None / "none": the model dtype)."""
    if name not in REAL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(REAL_CONFIGS)}")
    d = dict(REAL_CONFIGS[name])
    if tiny:
        d.update(TINY_OVERRIDES[name])
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            d[k] = None  # ids of the real vocabulary would be outside the tiny one
    if n_layers is not None:
        d["num_hidden_layers"] = n_layers
    return dataclasses.replace(from_hf_config(d), expert_quant=expert_quant(experts, quant_group))


# ------------------------------------------------------------------------------------------------------------------
# Random models


@jax.jit
def _split_key(key, i):
    return jax.random.fold_in(key, i)


def _normal(key, shape, dtype, scale):
    return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)


_normal_jit = jax.jit(_normal, static_argnums=(1, 2))


def _calib_attention(lp: M.LayerParams, h: jax.Array, cfg: MoEConfig):
    """Causal self-attention of calibration tokens h [1, N, D] through one layer -> (h_mid, rms(h_mid) [N])."""
    N = h.shape[1]
    kc = jnp.zeros((1, 1, N, cfg.n_kv_heads, cfg.head_dim), h.dtype)
    positions = jnp.arange(N, dtype=jnp.int32)[None]
    valid = jnp.ones((1, N), bool)
    def no_ffn(x, h_mid):  # the layer's attention half only (`model.decoder_layer`); the FFN half runs apart
        return jnp.zeros_like(x), None

    h_mid = M.decoder_layer(lp, h, kc, kc, 0, M.Positions(positions, valid, jnp.int32(0)), cfg, no_ffn)[0]
    hf = h_mid.astype(jnp.float32)[0]
    return h_mid, jnp.sqrt(jnp.mean(hf * hf, axis=-1) + cfg.rms_eps)


def _calib_ffn(lp: M.LayerParams, h_mid: jax.Array, cfg: MoEConfig):
    """FFN half of a layer for calibration tokens -> (h_out [1, N, D], routed ids [N, K] or zeros). A program apart
    from the attention half, so that h_mid is rounded to the weights' dtype in between, as the random weights of
    earlier runs were drawn (one program may keep it in float32)."""
    x = M.rms_norm(h_mid, lp.mlp_norm, cfg.rms_eps)[0]
    if lp.moe is not None:
        ids, w = M.route(x, lp.moe.w_router, cfg)
        y = M.experts_dense(x, lp.moe.experts, ids, w, cfg.expert_quant).astype(x.dtype) + M.shared_expert(x, lp.moe)
    else:
        ids, y = jnp.zeros((x.shape[0], cfg.top_k), jnp.int32), M.mlp(x, lp.mlp)
    return h_mid + y[None], ids


_calib_attention_jit = jax.jit(_calib_attention, static_argnums=2)
_calib_ffn_jit = jax.jit(_calib_ffn, static_argnums=2)


def zipf_bias_vector(n_experts: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """Router logit bias of one layer: -alpha * ln(rank) over a random rank permutation, centred. [E] float32."""
    rank = rng.permutation(n_experts) + 1
    b = -alpha * np.log(rank.astype(np.float64))
    return (b - b.mean()).astype(np.float32)


def routing_entropy(freq: np.ndarray, top_k: int, moe_layers: Sequence[bool] | None = None) -> dict:
    """Entropy of the expert popularity per MoE layer (p = freq / top_k).

    Returns: mean/min normalised entropy H / ln(E) (1.0 = uniform), mean effective experts exp(H), the mean share
    of routed (token, expert) pairs that go to the most popular 25 % of experts (0.25 = uniform), per-layer lists.
    """
    freq = np.asarray(freq, np.float64)
    L, E = freq.shape
    rows = [l for l in range(L) if (moe_layers is None or moe_layers[l]) and freq[l].sum() > 0]
    ent, eff, top25 = [], [], []
    for l in rows:
        p = freq[l] / freq[l].sum()
        nz = p[p > 0]
        h = float(-(nz * np.log(nz)).sum())
        ent.append(h / math.log(E))
        eff.append(math.exp(h))
        top25.append(float(np.sort(p)[::-1][: max(1, E // 4)].sum()))
    if not rows:
        return {"norm_entropy_mean": float("nan")}
    return {"norm_entropy_mean": float(np.mean(ent)), "norm_entropy_min": float(np.min(ent)),
            "effective_experts_mean": float(np.mean(eff)), "n_experts": E, "top25pct_share_mean": float(np.mean(top25)),
            "norm_entropy_per_layer": [round(x, 4) for x in ent]}


def random_model(cfg: MoEConfig, dtype: str = "bfloat16", seed: int = 0, std: float = 0.02,
                 zipf_bias: float | None = None, calib_tokens: int = 128, measure_routing: bool = False,
                 progress: bool = True) -> Model:
    """A `Model` with random weights drawn on the device: resident weights as host NumPy, experts as pinned_host
    jax Arrays (one `[E, F, 3, D]` stack per MoE layer, drawn on the device and pinned one layer at a time; a
    `cfg.expert_quant` quantizes them on the device as they are drawn: `[E, F, 3, W]` uint8).
    See the module docstring.

    Args:
      zipf_bias: alpha of the Zipf router bias (None or 0 = the random router's own routing).
      calib_tokens: tokens run through each layer as it is built, to calibrate the bias (with zipf_bias) and to
        measure the routing (`random_info["calib_routing"]`; with zipf_bias or measure_routing).
    Returns:
      `Model` with `model.random_info` (dict: construction settings, seconds, bias calibration spread, routing
      entropy of the calibration tokens).
    """
    t0 = time.perf_counter()
    dev = jax.devices()[0]
    host_sh = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    dev_sh = jax.sharding.SingleDeviceSharding(dev)
    jdt = jnp.dtype(np_dtype(dtype))
    base = jax.random.PRNGKey(seed)
    counter = itertools.count()
    A = float(np.asarray(std, np_dtype(dtype)))  # the constant residual coordinate 0 (zipf only): as large as an embedding entry, so that token
    # embeddings stay as distinct as without it (a larger A would dominate rms(h) and make all tokens alike)
    zipf = zipf_bias is not None and zipf_bias != 0
    calibrate = zipf or measure_routing
    rng = np.random.default_rng(seed + 12345)
    calib = {"bias_factor_cv": [], "routed_counts": []}
    state: dict[str, Any] = {}
    pin_s = [0.0]

    def to_host(x):  # a host copy; the device array is freed when its last reference goes
        return None if x is None else np.array(jax.device_get(x))

    def leaf(name, shape):
        key = _split_key(base, next(counter))
        kind = "norm" if name.endswith("norm") else name
        if kind == "norm":
            return to_host(jnp.ones(shape, jdt))
        if kind == "experts":  # drawn on the device, pinned at once: one layer on the device at a time
            ts = time.perf_counter()
            pinned = jax.device_put(_draw_experts_jit(key, tuple(shape), jdt, jnp.float32(std), zipf,
                                                      cfg.expert_quant), host_sh)
            pinned.block_until_ready()
            pin_s[0] += time.perf_counter() - ts
            return pinned
        x = _normal_jit(key, tuple(shape), jdt, jnp.float32(std))
        if kind == "embed" and calibrate:
            if zipf:
                x = x.at[:, 0].set(A)
            ids = jnp.asarray(np.random.default_rng(seed + 7).integers(0, cfg.vocab_size, calib_tokens), jnp.int32)
            state["h"] = x[ids][None]  # calibration tokens [1, N, D]
        return to_host(x)

    def layer_hook(l, lp: M.LayerParams):
        if calibrate:
            if zipf:
                lp = _zero_writes_to_coord0(lp)
            dlp = jax.device_put(lp.replace(moe=None if lp.moe is None else lp.moe.replace(experts=None)), dev_sh)
            h_mid, rms = _calib_attention_jit(dlp, state["h"], cfg)
            rms = np.asarray(rms, np.float64)
            mean_rms = float(rms.mean())
            fac = mean_rms / rms  # realised bias / intended bias, per token
            calib["bias_factor_cv"].append(float(fac.std() / fac.mean()))
            counts = np.zeros(cfg.n_experts, np.int64)
            if lp.moe is not None and zipf:
                b = zipf_bias_vector(cfg.n_experts, float(zipf_bias), rng)
                mlp_norm = lp.mlp_norm.copy()
                mlp_norm[0] = mean_rms / A
                w_router = lp.moe.w_router.copy()
                w_router[0] = b.astype(w_router.dtype)
                lp = lp.replace(mlp_norm=mlp_norm, moe=lp.moe.replace(w_router=w_router))
                dlp = dlp.replace(mlp_norm=jax.device_put(mlp_norm, dev_sh),
                                  moe=dlp.moe.replace(w_router=jax.device_put(w_router, dev_sh)))
            if lp.moe is not None:
                dlp = dlp.replace(moe=dlp.moe.replace(experts=jax.device_put(lp.moe.experts, dev_sh)))
            h_new, ids = _calib_ffn_jit(dlp, h_mid, cfg)
            if lp.moe is not None:
                counts = np.bincount(np.asarray(ids).ravel(), minlength=cfg.n_experts)
            calib["routed_counts"].append(counts)
            state["h"] = h_new
            del dlp, h_mid, h_new
        if progress:
            print(f"  layer {l + 1}/{cfg.n_layers} built ({time.perf_counter() - t0:.1f} s)", file=sys.stderr,
                  flush=True)
        return lp

    params = M.param_tree(cfg, leaf)
    params = params.replace(layers=tuple(layer_hook(l, lp) for l, lp in enumerate(params.layers)))
    state.clear()
    model = Model(cfg=cfg, params=params, tokenizer=None, dtype=dtype)
    info = {
        "weights": f"random N(0, {std}) drawn on {dev.device_kind} with jax.random (seed {seed}); norms = 1",
        "routing": "own (random router)" if not zipf else
        f"Zipf router bias alpha={zipf_bias} (dedicated residual coordinate; see benchmarks/common.py)",
        "zipf_alpha": zipf_bias if zipf else None,
        "build_s": round(time.perf_counter() - t0, 2), "pin_s": round(pin_s[0], 2),
        "expert_bytes": cfg.total_expert_bytes(jdt.itemsize),
        "resident_bytes": sum(int(a.nbytes) for a in jax.tree_util.tree_leaves(params) if isinstance(a, np.ndarray)),
    }
    if calibrate:
        freq = np.stack(calib["routed_counts"]).astype(np.float64) / calib_tokens
        info.update(calib_tokens=calib_tokens, calib_routing=routing_entropy(freq, cfg.top_k, cfg.moe_layers))
    if zipf:
        info.update(bias_factor_cv_mean=float(np.mean(calib["bias_factor_cv"])),
                    bias_factor_cv_max=float(np.max(calib["bias_factor_cv"])),
                    bias_factor_cv_per_layer=[round(x, 4) for x in calib["bias_factor_cv"]])
    model.__dict__["random_info"] = info
    gc.collect()
    return model


def _draw_experts(key, shape, dtype, scale, zero_coord0: bool, quant=None):
    """One layer's [E, F, 3, D] stack, drawn one expert at a time (lax.map) so that the random-number temporaries
    stay at one expert's size and the device peak of the build is about one stack. With `quant` (an
    `ExpertQuant`) each expert is quantized as it is drawn: the stack is [E, F, 3, W] uint8 (`model/quant.py`)."""

    def one(k):
        x = _normal(k, shape[1:], dtype, scale)
        if zero_coord0:  # the down rows must not write residual coordinate 0 (Zipf bias construction)
            x = x.at[:, 2, 0].set(0)
        return x if quant is None else quantize_rows_jax(x, quant)

    return jax.lax.map(one, jax.random.split(key, shape[0]))


_draw_experts_jit = jax.jit(_draw_experts, static_argnums=(1, 2, 4, 5))


def _zero_writes_to_coord0(lp: M.LayerParams) -> M.LayerParams:
    """Zero column 0 of every resident weight that writes the residual stream (host NumPy leaves; the experts'
    down rows are zeroed when they are drawn), so h[0] stays constant."""

    def zero_col0(a):
        a = a.copy()
        a[..., 0] = 0
        return a

    attn = lp.attn.replace(wo=zero_col0(lp.attn.wo))
    if attn.bo is not None:
        attn = attn.replace(bo=zero_col0(attn.bo))
    lp = lp.replace(attn=attn)
    if lp.mlp is not None:
        lp = lp.replace(mlp=lp.mlp.replace(w_down=zero_col0(lp.mlp.w_down)))
    if lp.moe is not None and lp.moe.shared is not None:
        lp = lp.replace(moe=lp.moe.replace(shared=lp.moe.shared.replace(w_down=zero_col0(lp.moe.shared.w_down))))
    return lp


def release_engine(model: Model, ref) -> dict:
    """After the caller dropped its last reference to an engine: drop any engine kept on the model, collect, and
    check that the engine is really gone.

    Args:
      ref: `weakref.ref(engine)` taken before the caller's reference was dropped (None: nothing to check).
    Returns {"engine_freed": bool (False = something still references it, e.g. a jit cache), "live_device_bytes":
    bytes of live arrays in device memory after freeing}.
    """
    moepic_jax.ENGINES.clear()  # the engines generate() keeps
    gc.collect()
    return {"engine_freed": ref is None or ref() is None, "live_device_bytes": live_device_bytes()}


def live_device_bytes() -> int:
    """Bytes of live jax arrays in the device memory kind (works on CPU too, unlike memory_stats)."""
    n = 0
    for a in jax.live_arrays():
        try:
            if a.is_deleted() or a.sharding.memory_kind not in (None, "device"):
                continue
            n += a.nbytes
        except Exception:  # noqa: BLE001 - arrays may be deleted concurrently
            pass
    return int(n)


# ------------------------------------------------------------------------------------------------------------------
# Bandwidth


def measure_peak_h2d(stack: jax.Array, split: int | None = None, k: int = 4, repeats: int = 5) -> dict:
    """Peak pinned_host -> device bandwidth, measured in this run.

    * whole stack: eager `device_put(stack, device)` of one layer's `[E, F, 3, D]` (about 1 GB for Qwen1.5-MoE),
      timed with block_until_ready, best (and median) of `repeats`, after one untimed copy;
    * in graph (as the decode step copies): one whole expert and one bottom segment (rows [split, F)),
      `profile.measure_h2d` (median of repeats); and k whole experts in one jitted call (k copies in flight).
    Returns a dict of bytes and GB/s (10^9) per pattern; "peak_Bps" is the best of them (the floor's bandwidth).
    """
    from moepic_jax.offload.copy_step import fetch_rows
    from moepic_jax.planning.calibrate import measure_h2d

    dev = list(stack.devices())[0]
    dsh = jax.sharding.SingleDeviceSharding(dev)
    E, F = stack.shape[0], stack.shape[1]
    split = F // 2 if split is None else int(split)
    out: dict[str, Any] = {}
    nbytes = int(stack.nbytes)
    y = jax.device_put(stack, dsh)
    y.block_until_ready()
    y.delete()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        y = jax.device_put(stack, dsh)
        y.block_until_ready()
        ts.append(time.perf_counter() - t0)
        y.delete()
    out["stack_bytes"] = nbytes
    out["stack_GBps_best"] = nbytes / min(ts) / 1e9
    out["stack_GBps_median"] = nbytes / float(np.median(ts)) / 1e9
    rows = [F] + ([F - split] if 0 < split < F else [])
    sizes, times = measure_h2d(stack, rows, repeats)
    out["expert_bytes"] = sizes[0]
    out["expert_GBps"] = sizes[0] / times[0] / 1e9
    out["expert_ms"] = times[0] * 1e3
    if len(rows) > 1:
        out["bottom_rows"] = F - split
        out["bottom_bytes"] = sizes[1]
        out["bottom_GBps"] = sizes[1] / times[1] / 1e9
        out["bottom_ms"] = times[1] * 1e3
    k = max(1, min(k, E))

    def k_copies(st, ids):
        return jnp.stack([fetch_rows(st, ids[i], 0, F) for i in range(k)])

    fn = jax.jit(k_copies)
    ids = jnp.arange(k, dtype=jnp.int32)
    fn(stack, ids).block_until_ready()
    ts = []
    for r in range(repeats):
        ids = jnp.asarray((np.arange(k) + r * k) % E, jnp.int32)
        t0 = time.perf_counter()
        fn(stack, ids).block_until_ready()
        ts.append(time.perf_counter() - t0)
    out["k_experts"] = k
    out["k_experts_GBps"] = k * sizes[0] / float(np.median(ts)) / 1e9
    best = max(out["stack_GBps_best"], out["expert_GBps"], out.get("bottom_GBps", 0.0), out["k_experts_GBps"])
    out["peak_Bps"] = best * 1e9
    out["peak_source"] = max(("stack_GBps_best", "expert_GBps", "bottom_GBps", "k_experts_GBps"),
                             key=lambda n: out.get(n, 0.0))
    return {k_: (round(v, 3) if isinstance(v, float) else v) for k_, v in out.items()}


# ------------------------------------------------------------------------------------------------------------------
# Environment and results


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def command_line() -> str:
    """This process's command line as typed: `python -m benchmarks.<name> ARGS` for a module run (`sys.argv[0]` is
    then the file's path), else the interpreter and `sys.argv`."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = ["-m", spec.name.removesuffix(".__main__")] if spec is not None and spec.name else sys.argv[:1]
    return " ".join([pathlib.Path(sys.executable).name] + prog + sys.argv[1:])


def env_info(device: str | None = None) -> dict:
    """GPU, package versions, python, date (UTC), host, command line and the XLA settings of this run.

    device: the accelerator's name when known (e.g. from torch); None asks jax (this starts JAX's backend)."""
    devs = jax.devices() if device is None else None
    versions = {}
    for d in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "numpy", "ml_dtypes",
              "transformers", "torch", "accelerate", "moepic_jax"):
        v = _version(d)
        if v is not None:
            versions[d] = v
    return {
        "device": device if devs is None else devs[0].device_kind,
        "platform": None if devs is None else devs[0].platform, "device_count": None if devs is None else len(devs),
        "versions": versions, "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
        "command": command_line(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_", "TF_GPU"))},
    }


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100] or "result"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    return x


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if spec and isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec). Missing / NaN values print as '-'."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), f) for k, _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def plot_tpot(rows: Sequence[dict], path: pathlib.Path, title: str = "") -> bool:
    """TPOT (ms) against the VRAM budget (GiB), one line per series (a row's "series", default its policy), its
    floor dashed in the same colour; series without a budget (resident) as a horizontal dotted line. Returns False
    without matplotlib/data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001
        return False
    pts = [r for r in rows if r.get("tpot_ms") is not None and math.isfinite(r.get("tpot_ms", float("nan")))]
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series = lambda r: r.get("series") or r["policy"]  # noqa: E731
    policies = list(dict.fromkeys(series(r) for r in pts))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, pol in enumerate(policies):
        c = colors[i % len(colors)]
        rs = sorted((r for r in pts if series(r) == pol), key=lambda r: r.get("budget_gib") or 0)
        with_b = [r for r in rs if r.get("budget_gib") is not None]
        if not with_b:
            for r in rs:
                ax.axhline(r["tpot_ms"], color=c, ls=":", label=f"{pol} (all weights on the device)")
            continue
        x = [r["budget_gib"] for r in with_b]
        ax.plot(x, [r["tpot_ms"] for r in with_b], "o-", color=c, label=pol)
        fl = [(r["budget_gib"], r["floor_ms"]) for r in with_b if r.get("floor_ms") is not None]
        if fl:
            ax.plot([a for a, _ in fl], [b for _, b in fl], "--", color=c, alpha=0.7, label=f"{pol} floor")
    ax.set_xlabel("VRAM budget (GiB)")
    ax.set_ylabel("TPOT (ms / token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_results(name: str, rows: Sequence[dict], meta: dict, out_dir: str | os.PathLike | None = None,
                  columns: Sequence[tuple[str, str, str]] | None = None, plot: bool = True,
                  title: str | None = None) -> list[str]:
    """Write `<name>.json` (meta + rows), `<name>.md` (meta summary + table) and `<name>.png` (TPOT vs budget)
    into `out_dir` (default `benchmarks/results/`). Returns the paths."""
    name = _safe_name(name)
    dirs = [pathlib.Path(out_dir) if out_dir else RESULTS_DIR]
    if columns is None:
        keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
        columns = [(k, k, ".4g") for k in keys]
    title = title or name
    env = meta.get("env", {})
    lines = [f"# {title}", ""]
    for label, val in (("command", env.get("command")), ("GPU", env.get("device")),
                       ("versions", ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items())),
                       ("python", env.get("python")), ("date (UTC)", env.get("date_utc")),
                       ("host", env.get("hostname"))):
        if val:
            lines.append(f"- {label}: `{val}`" if label == "command" else f"- {label}: {val}")
    for n in meta.get("notes", []):
        lines.append(f"- {n}")
    lines += ["", markdown_table(rows, columns), ""]
    md = "\n".join(lines)
    payload = json.dumps(_jsonable({"meta": meta, "rows": list(rows)}), indent=1)
    paths = []
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(payload + "\n")
        (d / f"{name}.md").write_text(md)
        paths += [str(d / f"{name}.json"), str(d / f"{name}.md")]
        if plot and plot_tpot(rows, d / f"{name}.png", title):
            paths.append(str(d / f"{name}.png"))
    return paths

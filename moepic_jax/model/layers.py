"""Blocks of the functional JAX model of an MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE).

Dim legend (used in comments and einsums): B batch, T seq (new tokens), S cache slots,
D d_model, F d_ff (neurons of one expert), E experts, K top_k, H heads, G kv heads,
hd head_dim, V vocab, N tokens flattened (B*T).

Why plain functions over `flax.struct.dataclass` pytrees rather than linen/NNX modules:
offloading needs every expert (and every segment of an expert) to be an explicit argument
of the MoE step, placed in a chosen memory kind and sliced by traced ids. A module would
hide those arrays in its state; a dataclass pytree keeps them addressable and jit-friendly.

The split that MoEpic (arXiv 2509.08342, §3) relies on is exact for SwiGLU: an expert is a
sum over its neurons j of silu(x·g_j) (x·u_j) d_j, so the output of the top segment
(neurons [0, s)) plus that of the bottom segment (neurons [s, F)) is the full output. Experts
are stored **neuron-major**, `[E, F, 3, D]` with row j = (gate column j, up column j,
down row j), so any split is a contiguous slice `[e, :s]` / `[e, s:]`.

Reference behaviour: transformers/models/{mixtral,qwen2_moe,qwen3_moe,olmoe}/modeling_*.py
(RMSNorm in float32, router softmax in float32, rotate-half RoPE, GQA).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moepic_jax.config import ExpertQuant, MoEConfig
from moepic_jax.model.grouped import BLOCK_M as GROUPED_MIN_ROWS
from moepic_jax.model.grouped import experts_grouped
from moepic_jax.model.params import AttnParams, MLPParams, MoEParams, Params
from moepic_jax.model.quant import dequantize_rows

# Finite "minus infinity" for masks: a fully masked (padding) row stays finite instead of NaN.
_MASK_VALUE = -1e30
# Quantized experts on at most this many tokens take the multiply-reduce form of `segment_ffn`, per backend (others:
# the "default" entry): products and sums in float32, which XLA fuses with the dequantization, so the packed bytes
# are read once. The einsum form dequantizes into a temporary first: on an H100 at one token it wrote a float32 copy
# of each Mixtral-8x7B expert (716 MB for two) and took 300 us per int4 expert against 107 us (Qwen1.5 shapes:
# 20.7 against 15.5 us; Qwen3's small experts: 13.1 against 14.4), benchmarks/experiments/quant/ffn_probe.py. One
# token is the measured case (at 2-8 tokens the float32 products may not fuse); on the CPU the einsum is faster.
QUANT_REDUCE_MAX_TOKENS = {"default": 1, "cpu": 0}


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32, weight applied in the input dtype (as HF's *RMSNorm)."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w * xf.astype(x.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE. x: [B, T, heads, hd]; positions: [B, T] int. Angles in float32, as HF."""
    hd = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))  # [hd/2]
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    cos, sin = jnp.cos(emb).astype(x.dtype), jnp.sin(emb).astype(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(
    p: AttnParams, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array, layer: int,
    valid: jax.Array, start: jax.Array, cfg: MoEConfig,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Grouped-query self-attention with a KV cache (prefill when T > 1, decode when T == 1).

    Args:
      x: [B, T, D] normed input; positions: [B, T] RoPE positions (real tokens only).
      k_cache, v_cache: [L, B, S, G, hd] the whole cache (updated in place at `layer`, so a donated
        cache is never copied); layer: static layer index; valid: [B, S] bool after writing the T new
        slots; start: [] int32, slot of the first new token.
    Returns:
      ([B, T, D] output, new k_cache, new v_cache).
    """
    B, T, _ = x.shape
    H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = x @ p.wq, x @ p.wk, x @ p.wv
    if cfg.qkv_bias:
        q, k, v = q + p.bq, k + p.bk, v + p.bv
    if cfg.qk_norm == "full":  # OLMoE: norm over all heads before the reshape
        q, k = rms_norm(q, p.q_norm, cfg.rms_eps), rms_norm(k, p.k_norm, cfg.rms_eps)
    if cfg.clip_qkv is not None:
        c = cfg.clip_qkv
        q, k, v = jnp.clip(q, -c, c), jnp.clip(k, -c, c), jnp.clip(v, -c, c)
    q, k, v = q.reshape(B, T, H, hd), k.reshape(B, T, G, hd), v.reshape(B, T, G, hd)
    if cfg.qk_norm == "head":  # Qwen3-MoE: per-head norm
        q, k = rms_norm(q, p.q_norm, cfg.rms_eps), rms_norm(k, p.k_norm, cfg.rms_eps)
    q, k = rope(q, positions, cfg.rope_theta), rope(k, positions, cfg.rope_theta)
    zero = jnp.zeros((), jnp.int32)
    idx = (jnp.asarray(layer, jnp.int32), zero, start.astype(jnp.int32), zero, zero)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None], idx)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None], idx)
    kl, vl = k_cache[layer], v_cache[layer]  # [B, S, G, hd]
    S = kl.shape[1]
    qg = q.reshape(B, T, G, H // G, hd)
    scores = jnp.einsum("btgrh,bsgh->bgrts", qg, kl).astype(jnp.float32) * (hd**-0.5)
    causal = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]  # [T, S]
    mask = causal[None] & valid[:, None, :]  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
    out = jnp.einsum("bgrts,bsgh->btgrh", probs, vl).reshape(B, T, H * hd)
    out = out @ p.wo
    if cfg.o_bias:
        out = out + p.bo
    return out, k_cache, v_cache


def mlp(x: jax.Array, p: MLPParams) -> jax.Array:
    """Dense SwiGLU. x: [..., D] -> [..., D]."""
    return (jax.nn.silu(x @ p.w_gate) * (x @ p.w_up)) @ p.w_down


def route(x: jax.Array, w_router: jax.Array, cfg: MoEConfig, k: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Top-k router: softmax in float32 over E logits, top-k, optional renormalisation.

    Args:
      x: [N, D] normed hidden states; k: static, experts per token (default cfg.top_k; the predictor asks k').
    Returns:
      (ids [N, k] int32, weights [N, k] float32). Mixtral always renormalises; the others follow
      `norm_topk_prob` (HF `*TopKRouter.forward`).
    """
    logits = x @ w_router  # [N, E]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    w, ids = jax.lax.top_k(probs, cfg.top_k if k is None else k)
    if cfg.norm_topk_prob:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    return ids.astype(jnp.int32), w


def expert_weights(rows: jax.Array, quant: ExpertQuant | None, dtype) -> jax.Array:
    """Neuron rows as weights: `rows` itself ([..., 3, D]), or quantized rows [..., 3, W] uint8 dequantized to
    `dtype` (`quant.dequantize_rows`; inside the jitted step, so XLA can fuse it into the consuming matmul)."""
    return rows if quant is None else dequantize_rows(rows, quant, dtype)


def quant_reduce_form(quant: ExpertQuant | None, n_tokens: int) -> bool:
    """Whether quantized experts on `n_tokens` tokens take `segment_ffn`'s multiply-reduce form
    (`QUANT_REDUCE_MAX_TOKENS` of the default backend)."""
    limit = QUANT_REDUCE_MAX_TOKENS.get(jax.default_backend(), QUANT_REDUCE_MAX_TOKENS["default"])
    return quant is not None and n_tokens <= limit


def segment_ffn(x: jax.Array, seg: jax.Array, quant: ExpertQuant | None = None,
                reduce: bool | None = None) -> jax.Array:
    """Partial SwiGLU output of a run of neurons of one expert.

    Args:
      x: [N, D]; seg: [S, 3, D] neuron-major rows (gate col, up col, down row), or with `quant` (static) the
        stored rows [S, 3, W] uint8, dequantized here.
      reduce: the form for quantized rows (static; default `quant_reduce_form(quant, N)`). A caller that splits
        a block's tokens passes the block's choice, so that every path computing the same tokens uses one form.
    Returns:
      [N, D]. Summing over an expert's segments gives the full expert output (exact).
    """
    if quant is not None and (quant_reduce_form(quant, x.shape[0]) if reduce is None else reduce):
        w = dequantize_rows(seg, quant, jnp.float32)  # [S, 3, D]
        xf = x.astype(jnp.float32)
        g = jnp.sum(xf[:, None, :] * w[None, :, 0], axis=-1)  # [N, S]
        u = jnp.sum(xf[:, None, :] * w[None, :, 1], axis=-1)
        return jnp.sum((jax.nn.silu(g) * u)[:, :, None] * w[None, :, 2], axis=1).astype(x.dtype)
    seg = expert_weights(seg, quant, x.dtype)
    g = jnp.einsum("nd,sd->ns", x, seg[:, 0])
    u = jnp.einsum("nd,sd->ns", x, seg[:, 1])
    return jnp.einsum("ns,sd->nd", jax.nn.silu(g) * u, seg[:, 2])


def experts_dense(x: jax.Array, experts: jax.Array, ids: jax.Array, w: jax.Array,
                  quant: ExpertQuant | None = None) -> jax.Array:
    """Routed-expert output computed over all E experts with a combine matrix (prefill; many tokens).

    x: [N, D]; experts: [E, F, 3, D] (with `quant`: [E, F, 3, W] uint8, dequantized as a whole: small models and
    tests only); ids, w: [N, K]. Returns [N, D] float32.
    """
    experts = expert_weights(experts, quant, x.dtype)
    E = experts.shape[0]
    combine = jnp.sum(jax.nn.one_hot(ids, E, dtype=jnp.float32) * w[..., None], axis=1)  # [N, E]
    g = jnp.einsum("nd,efd->nef", x, experts[:, :, 0])
    u = jnp.einsum("nd,efd->nef", x, experts[:, :, 1])
    y = jnp.einsum("nef,efd->ned", jax.nn.silu(g) * u, experts[:, :, 2])  # [N, E, D]
    return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), combine)


def experts_scan(x: jax.Array, experts: jax.Array, ids: jax.Array, w: jax.Array,
                 quant: ExpertQuant | None = None) -> jax.Array:
    """Same result as `experts_dense`, one expert at a time (`lax.scan` over E), so the temporaries are
    [N, F] instead of [N, E, F]: the prefill path for large models. With `quant` each expert is dequantized in
    its own iteration. Returns [N, D] float32."""
    E = experts.shape[0]
    combine = jnp.sum(jax.nn.one_hot(ids, E, dtype=jnp.float32) * w[..., None], axis=1)  # [N, E]

    def body(acc, inp):
        ex, c = inp  # [F, 3, D], [N]
        return acc + c[:, None] * segment_ffn(x, ex, quant).astype(jnp.float32), None

    acc, _ = jax.lax.scan(body, jnp.zeros((x.shape[0], x.shape[1]), jnp.float32), (experts, combine.T))
    return acc


def experts_gathered(x: jax.Array, experts: jax.Array, ids: jax.Array, w: jax.Array,
                     quant: ExpertQuant | None = None) -> jax.Array:
    """Routed-expert output reading only the N*K routed experts (decode; few tokens). Returns [N, D] f32.

    One dynamic index per routed expert rather than one gather of [N, K, F, 3, D]: on the H200 the indexed
    form decoded Qwen1.5-MoE-A2.7B faster (benchmarks/experiments/probe_decode.py).
    """
    rows = []
    reduce = quant_reduce_form(quant, x.shape[0])  # as the offloaded paths choose for these N tokens
    for n in range(ids.shape[0]):
        acc = jnp.zeros((x.shape[1],), jnp.float32)
        for k in range(ids.shape[1]):
            ex = jax.lax.dynamic_index_in_dim(experts, ids[n, k], keepdims=False)  # [F, 3, D]
            acc = acc + w[n, k] * segment_ffn(x[n:n + 1], ex, quant, reduce)[0].astype(jnp.float32)
        rows.append(acc)
    return jnp.stack(rows)


def shared_expert(x: jax.Array, p: MoEParams) -> jax.Array:
    """Qwen2-MoE shared expert with its sigmoid gate; zeros when the family has none. x: [N, D]."""
    if p.shared is None:
        return jnp.zeros_like(x)
    return jax.nn.sigmoid(x @ p.w_shared_gate) * mlp(x, p.shared)


def experts_many(x: jax.Array, experts: jax.Array, ids: jax.Array, w: jax.Array, matmul=None,
                 quant: ExpertQuant | None = None) -> jax.Array:
    """Routed-expert output for many tokens (prefill): grouped by expert with `matmul` (`grouped.matmul_for`), or
    `experts_scan` when it is None or there are fewer (token, expert) pairs than one row tile of the kernel
    (GROUPED_MIN_ROWS: the GPU checks ran 512 pairs and more; a few tokens cost the scan little).
    Quantized experts (`quant`) always take the scan: the grouped kernel reads model-dtype weights, and
    dequantizing a layer's stack for it would put a full-precision copy of the layer on the device.
    x: [N, D]; experts: [E, F, 3, D] ([E, F, 3, W] uint8 with quant); ids, w: [N, K]. Returns [N, D] float32."""
    if matmul is None or quant is not None or ids.size < GROUPED_MIN_ROWS:
        return experts_scan(x, experts, ids, w, quant)
    return experts_grouped(x, experts, ids, w, matmul)


def moe_resident(x: jax.Array, p: MoEParams, cfg: MoEConfig, matmul=None) -> jax.Array:
    """MoE block with all experts on the device. x: [N, D] -> [N, D]. matmul: see `experts_many`."""
    with jax.named_scope("router"):
        ids, w = route(x, p.w_router, cfg)
    n = x.shape[0]
    # Reading only the routed experts is cheaper while N*K is small; the dense form avoids a huge gather.
    q = cfg.expert_quant
    routed = experts_gathered(x, p.experts, ids, w, q) if n * cfg.top_k <= cfg.n_experts else experts_many(
        x, p.experts, ids, w, matmul, q)
    return routed.astype(x.dtype) + shared_expert(x, p)


def embed(params: Params, tokens: jax.Array) -> jax.Array:
    """tokens [B, T] -> [B, T, D]."""
    return params.embed[tokens]


def lm_head(params: Params, h: jax.Array, cfg: MoEConfig) -> jax.Array:
    """Final RMSNorm and LM head. h: [B, T, D] -> logits [B, T, V] float32."""
    h = rms_norm(h, params.final_norm, cfg.rms_eps)
    if params.lm_head is None:  # tied: contract with the embedding directly (no [D, V] transpose in memory)
        return jnp.einsum("btd,vd->btv", h, params.embed).astype(jnp.float32)
    return (h @ params.lm_head).astype(jnp.float32)

"""The decoder layer body, written once: every path (resident forward, offloaded decode and prefill, calibration,
training) runs `decoder_layer` and passes its own feed-forward block.

  h_mid = h + attention(rms_norm(h))          (writes this layer's KV cache)
  h_out = h_mid + ffn(rms_norm(h_mid), h_mid)

The feed-forward block is the only part that differs between paths: a dense MLP, the resident MoE, or the
offloaded MoE step with its copies, cache rules and counters. It also receives h_mid, the residual stream after
attention, because the next-layer predictor (DESIGN.md, "Predictor") reads it.

Reference behaviour: transformers/models/{mixtral,qwen2_moe,qwen3_moe,olmoe}/modeling_*.py (`*DecoderLayer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from moepic_jax.config import MoEConfig
from moepic_jax.model import layers as Lyr
from moepic_jax.model.kv_cache import KVCache, cache_positions
from moepic_jax.model.params import LayerParams, Params

# (x [B, T, D] normed input, h_mid [B, T, D] residual stream after attention) -> (y [B, T, D], aux pytree)
FeedForward = Callable[[jax.Array, jax.Array], tuple[jax.Array, Any]]


class Positions(NamedTuple):
    """Where T new tokens go: RoPE positions [B, T] int32, the cache's valid slots [B, S] bool, and the first slot
    written [] int32 (`kv_cache.cache_positions`)."""

    positions: jax.Array
    valid: jax.Array
    start: jax.Array


def decoder_layer(lp: LayerParams, h: jax.Array, k: jax.Array, v: jax.Array, layer, pos: Positions,
                  cfg: MoEConfig, ffn: FeedForward) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """One decoder layer.

    Args:
      lp: the layer's parameters (its routed experts may be absent: `ffn` brings them).
      h: [B, T, D] residual stream in.
      k, v: [L, B, S, G, hd] the whole KV cache; layer `layer` (int or traced int32) is written at `pos.start`.
      pos: `Positions` of the T tokens.
      ffn: the feed-forward block, `(x [B, T, D], h_mid [B, T, D]) -> (y [B, T, D], aux)`.
    Returns:
      (h [B, T, D], k, v, aux from `ffn`).
    """
    with jax.named_scope("attention"):
        a, k, v = Lyr.attention(lp.attn, Lyr.rms_norm(h, lp.attn_norm, cfg.rms_eps), pos.positions, k, v, layer,
                                pos.valid, pos.start, cfg)
    h = h + a
    x = Lyr.rms_norm(h, lp.mlp_norm, cfg.rms_eps)
    y, aux = ffn(x, h)
    return h + y, k, v, aux


def resident_ffn(lp: LayerParams, cfg: MoEConfig, is_moe: bool, matmul=None) -> FeedForward:
    """The feed-forward block with every weight at hand: the layer's dense MLP, or its MoE block over all its
    experts (`layers.moe_resident`; matmul: prefill's grouped matmul, `grouped.matmul_for`)."""

    def ffn(x, h_mid):
        B, T, D = x.shape
        x2 = x.reshape(B * T, D)
        with jax.named_scope("ffn"):
            y = Lyr.moe_resident(x2, lp.moe, cfg, matmul) if is_moe else Lyr.mlp(x2, lp.mlp)
        return y.reshape(B, T, D), None

    return ffn


def forward_tokens(
    params: Params, cfg: MoEConfig, tokens: jax.Array, mask: jax.Array, cache: KVCache, last_only: bool = False,
    matmul=None,
) -> tuple[jax.Array, KVCache]:
    """All-resident forward over T new tokens, writing the KV cache.

    Args:
      tokens: [B, T] int32; mask: [B, T] bool (False = left padding); cache: `KVCache`.
      last_only: static; compute logits for the last position only (generation does not need the others).
      matmul: static; the grouped matmul of many-token MoE blocks (`grouped.matmul_for`; None: `experts_scan`).
    Returns:
      (logits [B, T, V] float32 ([B, 1, V] with last_only), updated cache).
    """
    positions, valid, new_cache = cache_positions(cache, mask)
    pos = Positions(positions, valid, cache.length)
    h = Lyr.embed(params, tokens)
    k, v = cache.k, cache.v
    for l, lp in enumerate(params.layers):
        h, k, v, _ = decoder_layer(lp, h, k, v, l, pos, cfg, resident_ffn(lp, cfg, cfg.moe_layers[l], matmul))
    new_cache = new_cache.replace(k=k, v=v)
    return Lyr.lm_head(params, h[:, -1:] if last_only else h, cfg), new_cache

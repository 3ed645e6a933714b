"""The functional MoE decoder (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): parameters, KV cache, blocks, the layer body.

  params.py    the parameter tree (one description: `param_tree`), dtypes
  kv_cache.py  `KVCache`, its size, the positions of new tokens
  layers.py    rms_norm, rope, attention, router, expert FFNs (full, segment, scanned, grouped), lm head
  quant.py     quantized experts: group-wise int8 / int4 rows (packing, qwix numerics, dequantization)
  grouped.py   prefill's grouped matmul (Pallas Mosaic-GPU ragged_dot on Hopper, a plain fallback)
  decoder.py   `decoder_layer`, the one layer body every path runs; `forward_tokens`, the resident forward

The names below are re-exported so that `from moepic_jax import model as M; M.attention(...)` reads as one module.
"""

from moepic_jax.model.decoder import FeedForward, Positions, decoder_layer, forward_tokens, resident_ffn
from moepic_jax.model.kv_cache import KVCache, cache_positions, init_kv_cache, kv_cache_bytes
from moepic_jax.model.layers import (attention, embed, expert_weights, experts_dense, experts_gathered, experts_many,
                                     experts_scan, lm_head, mlp, moe_resident, rms_norm, rope, route, segment_ffn,
                                     shared_expert)
from moepic_jax.model.params import (DTYPES, AttnParams, LayerParams, MLPParams, MoEParams, Params, abstract_params,
                                     empty_params, np_dtype, param_tree)

__all__ = ["DTYPES", "AttnParams", "FeedForward", "KVCache", "LayerParams", "MLPParams", "MoEParams", "Params",
           "Positions", "abstract_params", "attention", "cache_positions", "decoder_layer", "embed", "empty_params",
           "expert_weights", "experts_dense", "experts_gathered", "experts_many", "experts_scan", "forward_tokens",
           "init_kv_cache", "kv_cache_bytes", "lm_head", "mlp", "moe_resident", "np_dtype", "param_tree",
           "resident_ffn", "rms_norm", "rope", "route", "segment_ffn", "shared_expert"]

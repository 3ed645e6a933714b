"""Quantized experts: weight-only, symmetric, group-wise int8 / int4, packed so that a neuron row stays one slice.

Format (`config.ExpertQuant(bits, group)`). The neuron-major stack `[E, F, 3, D]` (per neuron f: gate column, up
column, down row, each a vector of length D = d_model) becomes ONE uint8 array `[E, F, 3, W]`, where each length-D
vector is stored as

  codes  (D bytes for int8; D / 2 bytes for int4: element 2i in the low nibble, 2i+1 in the high one)
  scales (D / group float32 scales, their 4 little-endian bytes each)

and the value of element j is `code_j * scale_{j // group}`. Groups run along D for all three vectors of a
neuron: for the gate and up columns that is the input dimension, for the down row the output dimension. Every
neuron row is then self-contained, so any split point of the plan is still a contiguous slice of one array (one
copy), and the cache's top slots, the copy step and the prefetch move uint8 rows as they moved model-dtype rows.
(Grouping the down projection along its input dimension, F, would tie neighbouring neurons together through a
shared scale and forbid splits that are not multiples of the group.)

Numerics: the codes and scales come from qwix (`qwix.quantize`, Google's JAX quantization library: absmax
calibration, scale = absmax / (qmax + 0.5), round half to even, saturating conversion to int8 / int4). At load
time it runs on the host's CPU device one expert at a time (`quantize_rows`), so the host never holds more than
one layer at full precision plus one expert's temporaries. `tests/test_quant.py` checks the codes and scales against a plain NumPy implementation
of the same scheme. Packing (nibbles, scale bytes) and `dequantize_rows` are ours: qwix's `QArray` keeps codes
and scales in separate arrays, which would make a segment two copies.

Dequantization happens on the device, inside the jitted expert FFN (`layers.segment_ffn`): slicing the codes and
scale bytes, bitcasting the scales, unpacking nibbles and the multiply are elementwise producers of the einsum, so
XLA can fuse them into it; at most one expert (or one segment) is dequantized at a time, never a layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax.config import QUANT_SCALE_BYTES, ExpertQuant


def _qwix():
    try:
        import qwix
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ImportError("quantized experts need qwix: pip install qwix (or pip install -e .)") from e
    return qwix


def quantize_vectors(x: jax.Array, q: ExpertQuant) -> tuple[jax.Array, jax.Array]:
    """Group-wise symmetric quantization of the last axis with qwix (traceable; runs where x lives).

    Args:
      x: [..., D] float array (computed in float32).
      q: the scheme; D must be a multiple of q.group.
    Returns:
      (codes [..., D] int8 in [-2^(bits-1), 2^(bits-1) - 1], scales [..., D / group] float32), with
      x ~= codes * repeat(scales, group).
    Raises:
      ValueError: D is not a multiple of the group (the message lists the valid group sizes).
    """
    qwix = _qwix()
    q.check(x.shape[-1])
    x = x.astype(jnp.float32)
    qa = qwix.quantize(x, jnp.int8 if q.bits == 8 else jnp.int4, channelwise_axes=tuple(range(x.ndim - 1)),
                       tiled_axes={x.ndim - 1: q.group}, scale_dtype=jnp.float32)
    return qa.qvalue.astype(jnp.int8), qa.scale.astype(jnp.float32)


def pack_vectors(codes: jax.Array, scales: jax.Array, q: ExpertQuant) -> jax.Array:
    """Codes [..., D] int8 and scales [..., D / group] float32 -> the stored bytes [..., W] uint8 (module format)."""
    if q.bits == 8:
        packed = jax.lax.bitcast_convert_type(codes.astype(jnp.int8), jnp.uint8)
    else:
        c = jax.lax.bitcast_convert_type(codes.astype(jnp.int8), jnp.uint8) & 0xF
        packed = c[..., 0::2] | (c[..., 1::2] << 4)
    sb = jax.lax.bitcast_convert_type(scales.astype(jnp.float32), jnp.uint8)  # [..., D / group, 4]
    return jnp.concatenate([packed, sb.reshape(*scales.shape[:-1], -1)], axis=-1)


def quantize_rows_jax(x: jax.Array, q: ExpertQuant) -> jax.Array:
    """Rows [..., D] float -> stored rows [..., W] uint8 (qwix numerics + `pack_vectors`); jit-able, runs where x
    lives (the benchmarks' random models quantize on the GPU they are drawn on)."""
    return pack_vectors(*quantize_vectors(x, q), q)


_quantize_cpu = jax.jit(quantize_rows_jax, static_argnums=1)


def quantize_rows(stack: np.ndarray, q: ExpertQuant, out: np.ndarray | None = None) -> np.ndarray:
    """Quantize a neuron-major expert stack on the host (the CPU device), one expert at a time.

    Args:
      stack: [E, F, 3, D] (or any [E, ...,  D]) float weights, NumPy.
      out: optional preallocated [E, F, 3, W] uint8 to fill.
    Returns:
      [E, F, 3, W] uint8, W = q.row_width(D).
    Raises:
      ValueError: D is not a multiple of the group size (the message lists the valid ones).
    """
    D = stack.shape[-1]
    q.check(D)
    if out is None:
        out = np.empty(stack.shape[:-1] + (q.row_width(D),), np.uint8)
    cpu = jax.devices("cpu")[0]
    for e in range(stack.shape[0]):
        out[e] = np.asarray(_quantize_cpu(jax.device_put(np.asarray(stack[e]), cpu), q))
    return out


def unpack_codes(packed: jax.Array, q: ExpertQuant, d: int) -> jax.Array:
    """The integer codes [..., d] int8 of stored rows `packed` [..., W] uint8 (in the jitted step)."""
    raw = packed[..., :q.code_bytes(d)]
    if q.bits == 8:
        return jax.lax.bitcast_convert_type(raw, jnp.int8)
    lo = (raw & 0xF).astype(jnp.int8)
    hi = (raw >> 4).astype(jnp.int8)
    lo, hi = (lo ^ 8) - 8, (hi ^ 8) - 8  # sign-extend the nibbles
    return jnp.stack([lo, hi], axis=-1).reshape(*raw.shape[:-1], d)


def unpack_scales(packed: jax.Array, q: ExpertQuant, d: int) -> jax.Array:
    """The scales [..., d / group] float32 of stored rows `packed` [..., W] uint8."""
    raw = packed[..., q.code_bytes(d):]
    return jax.lax.bitcast_convert_type(raw.reshape(*raw.shape[:-1], d // q.group, QUANT_SCALE_BYTES), jnp.float32)


def width_to_d(q: ExpertQuant, width: int) -> int:
    """D of stored rows of `width` bytes (inverse of `ExpertQuant.row_width`); ValueError if none matches."""
    d = width * 8 * q.group // (q.bits * q.group + 8 * QUANT_SCALE_BYTES)
    if q.row_width(d) != width:
        raise ValueError(f"rows of {width} bytes are not {q.name} rows with group {q.group}")
    return d


def dequantize_rows(packed: jax.Array, q: ExpertQuant, dtype) -> jax.Array:
    """Stored rows [..., W] uint8 -> weights [..., D] in `dtype` (code * scale in float32, then cast).

    Runs inside the jitted expert FFN so that XLA fuses it into the matmul that consumes it.
    """
    d = width_to_d(q, packed.shape[-1])
    codes = unpack_codes(packed, q, d).astype(jnp.float32)
    scales = unpack_scales(packed, q, d)
    lead = codes.shape[:-1]
    w = codes.reshape(*lead, d // q.group, q.group) * scales[..., None]
    return w.reshape(*lead, d).astype(dtype)


def dequantize_rows_np(packed: np.ndarray, q: ExpertQuant, dtype=np.float32) -> np.ndarray:
    """Host (NumPy) version of `dequantize_rows`: stored rows [..., W] uint8 -> [..., D] `dtype`."""
    packed = np.asarray(packed, np.uint8)
    d = width_to_d(q, packed.shape[-1])
    raw = packed[..., :q.code_bytes(d)]
    if q.bits == 8:
        codes = raw.view(np.int8)
    else:
        nib = np.stack([raw & 0xF, raw >> 4], axis=-1).reshape(*raw.shape[:-1], d).astype(np.int8)
        codes = (nib ^ 8) - 8
    scales = np.ascontiguousarray(packed[..., q.code_bytes(d):]).view("<f4")
    lead = codes.shape[:-1]
    w = codes.astype(np.float32).reshape(*lead, d // q.group, q.group) * scales[..., None]
    return w.reshape(*lead, d).astype(dtype)

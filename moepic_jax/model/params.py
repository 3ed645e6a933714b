"""The parameter tree of an MoE decoder: one description that init, loading, export and the benchmarks read.

Leaves are arrays wherever they live (NumPy on the host, `jax.Array` on the device or in pinned host memory).
Experts are stored neuron-major, `[E, F, 3, D]` (see `model/layers.py`), so a split is a contiguous slice.
Dim legend: D d_model, F d_ff, E experts, H heads, G kv heads, hd head_dim, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import flax.struct
import jax
import ml_dtypes
import numpy as np

from moepic_jax.config import MoEConfig

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


@flax.struct.dataclass
class AttnParams:
    wq: jax.Array  # [D, H*hd]
    wk: jax.Array  # [D, G*hd]
    wv: jax.Array  # [D, G*hd]
    wo: jax.Array  # [H*hd, D]
    bq: Optional[jax.Array] = None  # [H*hd]
    bk: Optional[jax.Array] = None  # [G*hd]
    bv: Optional[jax.Array] = None  # [G*hd]
    bo: Optional[jax.Array] = None  # [D]
    q_norm: Optional[jax.Array] = None  # [hd] (qk_norm="head") or [H*hd] ("full")
    k_norm: Optional[jax.Array] = None  # [hd] or [G*hd]


@flax.struct.dataclass
class MLPParams:
    """A dense SwiGLU MLP (dense layers, the shared expert)."""

    w_gate: jax.Array  # [D, F']
    w_up: jax.Array  # [D, F']
    w_down: jax.Array  # [F', D]


@flax.struct.dataclass
class MoEParams:
    w_router: jax.Array  # [D, E]
    experts: jax.Array  # [E, F, 3, D] neuron-major ([E, F, 3, W] uint8 when quantized, `model/quant.py`); None when offloaded
    shared: Optional[MLPParams] = None  # Qwen2-MoE shared expert
    w_shared_gate: Optional[jax.Array] = None  # [D, 1]


@flax.struct.dataclass
class LayerParams:
    attn_norm: jax.Array  # [D]
    attn: AttnParams
    mlp_norm: jax.Array  # [D]
    mlp: Optional[MLPParams] = None  # dense layer
    moe: Optional[MoEParams] = None  # MoE layer


@flax.struct.dataclass
class Params:
    embed: jax.Array  # [V, D]
    layers: tuple  # tuple[LayerParams, ...] (n_layers)
    final_norm: jax.Array  # [D]
    lm_head: Optional[jax.Array] = None  # [D, V]; None when tied to embed



def np_dtype(dtype: str | Any):
    """Map "bfloat16" / "float32" / "float16" (or a NumPy dtype) to a NumPy dtype; ValueError otherwise."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unsupported dtype {dtype!r}; supported: {', '.join(DTYPES)}")
        return np.dtype(DTYPES[dtype])
    d = np.dtype(dtype)
    if d not in [np.dtype(v) for v in DTYPES.values()]:
        raise ValueError(f"unsupported dtype {d}; supported: {', '.join(DTYPES)}")
    return d


def param_tree(cfg: MoEConfig, leaf: Callable[[str, tuple], Any]) -> Params:
    """The `Params` tree of `cfg` with `leaf(name, shape)` at every leaf (the one description of the tree).

    `name` is the leaf's role ("embed", "wq", "experts", "shared.w_gate", "attn_norm", ...), `shape` its shape,
    e.g. `("experts", (E, F, 3, D))`. `empty_params` (zeros), the benchmarks' random models and shape checks all
    build their trees through it, so they cannot drift apart.
    """
    D, H, G, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    # Leaves are made in a fixed order (embed, each layer, final norm, lm head): callers that draw random leaves
    # from a counter get the same weights from every build.
    embed = leaf("embed", (cfg.vocab_size, D))
    layers = []
    for l in range(cfg.n_layers):
        qn = kn = None
        if cfg.qk_norm == "head":
            qn, kn = leaf("q_norm", (hd,)), leaf("k_norm", (hd,))
        elif cfg.qk_norm == "full":
            qn, kn = leaf("q_norm", (H * hd,)), leaf("k_norm", (G * hd,))
        bias = cfg.qkv_bias
        attn = AttnParams(
            wq=leaf("wq", (D, H * hd)), wk=leaf("wk", (D, G * hd)), wv=leaf("wv", (D, G * hd)),
            wo=leaf("wo", (H * hd, D)), bq=leaf("bq", (H * hd,)) if bias else None,
            bk=leaf("bk", (G * hd,)) if bias else None, bv=leaf("bv", (G * hd,)) if bias else None,
            bo=leaf("bo", (D,)) if cfg.o_bias else None, q_norm=qn, k_norm=kn,
        )
        mlp = moe = None
        if cfg.moe_layers[l]:
            Fs = cfg.shared_d_ff
            shared = MLPParams(leaf("shared.w_gate", (D, Fs)), leaf("shared.w_up", (D, Fs)),
                               leaf("shared.w_down", (Fs, D))) if Fs else None
            moe = MoEParams(w_router=leaf("w_router", (D, cfg.n_experts)),
                            experts=leaf("experts", (cfg.n_experts, cfg.d_ff, 3, D)), shared=shared,
                            w_shared_gate=leaf("w_shared_gate", (D, 1)) if Fs else None)
        else:
            Fd = cfg.dense_d_ff
            mlp = MLPParams(leaf("mlp.w_gate", (D, Fd)), leaf("mlp.w_up", (D, Fd)), leaf("mlp.w_down", (Fd, D)))
        layers.append(LayerParams(attn_norm=leaf("attn_norm", (D,)), attn=attn, mlp_norm=leaf("mlp_norm", (D,)),
                                  mlp=mlp, moe=moe))
    final_norm = leaf("final_norm", (D,))
    lm_head = None if cfg.tie_word_embeddings else leaf("lm_head", (D, cfg.vocab_size))
    return Params(embed=embed, layers=tuple(layers), final_norm=final_norm, lm_head=lm_head)


def empty_params(cfg: MoEConfig, dtype) -> Params:
    """A host `Params` tree of zeros with every shape the config implies."""
    dt = np_dtype(dtype)
    return param_tree(cfg, lambda name, shape: np.zeros(shape, dt))


def abstract_params(cfg: MoEConfig, dtype) -> Params:
    """The `Params` tree of `jax.ShapeDtypeStruct` leaves (no memory)."""
    dt = np_dtype(dtype)
    return param_tree(cfg, lambda name, shape: jax.ShapeDtypeStruct(shape, dt))

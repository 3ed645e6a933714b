"""Host side of offloading: every routed expert lives in the `pinned_host` memory kind.

One stack per MoE layer, `[E, F, 3, D]` neuron-major (`model/layers.py`), so that a whole expert is the
contiguous slice `[e, 0:F]` and a bottom segment is `[e, s:F]`: each is ONE copy (DESIGN.md). One
stack per layer (not separate top/bottom stacks) keeps a single host copy of the weights whatever
split the plan picks, and a split change never rebuilds the store. Quantized experts (`load(experts="int8")`) are
the same stack of packed rows, `[E, F, 3, W]` uint8 (`model/quant.py`): every slice and copy works unchanged.

`pin_experts` copies a model's expert stacks to pinned_host arrays layer by layer and returns them; the model is
left as it is. A stack that already is a pinned_host array with the same sharding is returned as is, so models whose
experts were made in pinned memory (the benchmarks' random models) and callers that keep the store
(`runtime.factory.EngineCache`) never copy the experts twice.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax.config import MoEConfig
from moepic_jax.offload.placement import Placement



def host_sharding(device=None) -> jax.sharding.SingleDeviceSharding:
    """`SingleDeviceSharding(device, memory_kind="pinned_host")` of the default (or given) device."""
    return jax.sharding.SingleDeviceSharding(device or jax.devices()[0], memory_kind="pinned_host")


def pin_experts(params, sharding: jax.sharding.Sharding | None = None, progress: bool = False) -> tuple:
    """Every MoE layer's expert stack of `params` in pinned host memory.

    Args:
      params: a `Params` tree whose experts are NumPy or `jax.Array` stacks [E, F, 3, D].
      sharding: a pinned_host sharding of the stacks; None = `host_sharding()` of the default device. With several
        devices, `NamedSharding(mesh, P("expert"), memory_kind="pinned_host")` gives each device the pinned host
        buffer of its own experts (its own H2D link).
    Returns:
      tuple over layers: a pinned_host `jax.Array [E, F, 3, D]` for MoE layers, None for dense layers. Stacks that
      already are pinned with an equivalent sharding are returned as they are.
    """
    sh = sharding or host_sharding()
    it = range(len(params.layers))
    if progress:
        from tqdm.auto import tqdm  # optional progress bar; only loaded when asked for

        it = tqdm(it, desc="pinning experts", unit="layer")
    out = []
    for l in it:
        moe = params.layers[l].moe
        if moe is None:
            out.append(None)
            continue
        ex = moe.experts
        if isinstance(ex, jax.Array) and ex.sharding.memory_kind == "pinned_host" and ex.sharding.is_equivalent_to(
                sh, ex.ndim):
            out.append(ex)
            continue
        pinned = jax.device_put(ex if isinstance(ex, jax.Array) else np.asarray(ex), sh)
        pinned.block_until_ready()  # one layer at a time: the host holds at most one layer in flight
        out.append(pinned)
    return tuple(out)


def split_resident(params):
    """(params without routed experts, tuple of expert stacks): the resident part goes to the device."""
    layers, stacks = [], []
    for lp in params.layers:
        if lp.moe is None:
            layers.append(lp)
            stacks.append(None)
        else:
            layers.append(lp.replace(moe=lp.moe.replace(experts=None)))
            stacks.append(lp.moe.experts)
    return params.replace(layers=tuple(layers)), tuple(stacks)


class PlacedWeights(NamedTuple):
    """A model's weights placed for offloading: what engines and calibration read."""

    cfg: MoEConfig
    dtype: Any  # jnp.dtype of the weights
    resident: Any  # `Params` on the device(s), routed experts absent (None)
    stacks: tuple  # [n_layers] pinned_host stacks [E, F, 3, D] (None for dense layers)
    place: Placement
    tokenizer: Any = None  # the model's tokenizer (calibration text), or None

    @property
    def device(self):
        return self.place.device


def place_weights(model, place: Placement, progress: bool = False) -> PlacedWeights:
    """Pin `model`'s experts (`pin_experts`, split over the expert axis with several devices) and put the rest of
    its weights on the device(s) of `place` (replicated). The model is not changed."""
    stacks = pin_experts(model.params, place.sharding("pinned_host", expert=True), progress)
    resident_host, _ = split_resident(model.params)
    resident = jax.device_put(resident_host, place.sharding())
    return PlacedWeights(cfg=model.cfg, dtype=jnp.dtype(model.dtype), resident=resident, stacks=stacks, place=place,
                         tokenizer=model.tokenizer)

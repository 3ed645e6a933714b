"""Host side of offloading: every routed expert lives in the `pinned_host` memory kind.

One stack per MoE layer, `[E, F, 3, D]` neuron-major (model.py), so that a whole expert is the
contiguous slice `[e, 0:F]` and a bottom segment is `[e, s:F]`: each is ONE copy (DESIGN.md). One
stack per layer (not separate top/bottom stacks) keeps a single host copy of the weights whatever
split the plan picks, and a split change never rebuilds the store.

`pin_experts` converts a `Model`'s NumPy expert stacks to pinned_host arrays layer by layer and
drops each NumPy stack as soon as it is pinned, so the host never holds two copies of all experts
and the device never holds all of them.
"""

from __future__ import annotations

import jax
import numpy as np

from moepic_jax.weights import Model


def host_sharding(device=None) -> jax.sharding.SingleDeviceSharding:
    """`SingleDeviceSharding(device, memory_kind="pinned_host")` of the default (or given) device."""
    return jax.sharding.SingleDeviceSharding(device or jax.devices()[0], memory_kind="pinned_host")


def pin_experts(model: Model, sharding: jax.sharding.Sharding | None = None, progress: bool = False) -> tuple:
    """Move every MoE layer's expert stack to pinned host memory, in place on `model`.

    Args:
      sharding: a pinned_host sharding of the stacks ([E, F, 3, D]); None = `host_sharding()` of the default
        device. With several devices, `NamedSharding(mesh, P("expert"), memory_kind="pinned_host")` gives each
        device the pinned host buffer of its own experts (its own H2D link).
    Returns:
      tuple over layers: a pinned_host `jax.Array [E, F, 3, D]` for MoE layers, None for dense layers.
      Calling it again with the same sharding returns the same arrays (the store is built once per model); a
      different sharding re-lays the store out, layer by layer (pinned host to pinned host).
    """
    sh = sharding or host_sharding()
    layers = list(model.params.layers)
    it = range(len(layers))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="pinning experts", unit="layer")
    for l in it:
        moe = layers[l].moe
        if moe is None:
            continue
        ex = moe.experts
        if isinstance(ex, jax.Array) and ex.sharding.memory_kind == "pinned_host" and ex.sharding.is_equivalent_to(
                sh, ex.ndim):
            continue
        pinned = jax.device_put(ex if isinstance(ex, jax.Array) else np.asarray(ex), sh)
        pinned.block_until_ready()
        layers[l] = layers[l].replace(moe=moe.replace(experts=pinned))  # the previous stack is dropped here
    model.params = model.params.replace(layers=tuple(layers))
    return tuple(None if lp.moe is None else lp.moe.experts for lp in model.params.layers)


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

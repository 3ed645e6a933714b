"""Where an offloading engine runs: one device, or several with the experts of every MoE layer split over an
`expert` mesh axis (device d owns experts [d*E/n, (d+1)*E/n): its pinned host buffer, cache slots and copies).
The step then runs under `shard_map` with routed ids mapped to local ids (-1 = another device's expert), and the
MoE output is summed over the axis (`psum`)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

P = jax.sharding.PartitionSpec
EXPERT_AXIS = "expert"


def resolve_devices(devices) -> list:
    """The devices an engine runs on: None = the default device; an int n = the first n devices; or a sequence
    of `jax.Device`. Raises ValueError for a count outside [1, jax.device_count()] or an empty sequence."""
    if devices is None:
        return [jax.devices()[0]]
    if isinstance(devices, (int, np.integer)) and not isinstance(devices, bool):
        n = int(devices)
        if not 1 <= n <= jax.device_count():
            raise ValueError(f"devices={n}: this process sees {jax.device_count()} device(s) "
                             f"({jax.devices()[0].platform}); pass 1..{jax.device_count()}")
        return list(jax.devices()[:n])
    devs = list(devices)
    if not devs or not all(isinstance(d, jax.Device) for d in devs):
        raise ValueError(f"devices must be None, a device count or a non-empty sequence of jax.Device, got {devices!r}")
    return devs


@dataclasses.dataclass(frozen=True, eq=False)
class Placement:
    """The engine's devices, its mesh (None on one device) and the experts each device owns (`e_loc`)."""

    devices: tuple
    mesh: jax.sharding.Mesh | None
    e_loc: int

    @property
    def device(self):
        return self.devices[0]

    @property
    def n_dev(self) -> int:
        return len(self.devices)

    def sharding(self, memory_kind: str = "device", expert: bool = False) -> jax.sharding.Sharding:
        """Replicated (or, with expert=True, split over the expert axis) placement in `memory_kind`."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device, memory_kind=memory_kind)
        return jax.sharding.NamedSharding(self.mesh, P(EXPERT_AXIS) if expert else P(), memory_kind=memory_kind)

    def spmd(self, fn, in_specs, out_specs):
        """`fn` as one program per device over the expert axis (identity with one device)."""
        if self.mesh is None:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def local(self, ids: jax.Array) -> jax.Array:
        """Global expert ids -> this device's local ids, -1 where another device owns the expert (or id -1)."""
        if self.mesh is None:
            return ids
        d = jax.lax.axis_index(EXPERT_AXIS)
        return jnp.where((ids >= 0) & (ids // self.e_loc == d), ids - d * self.e_loc, -1)

    def distinct(self, ids: jax.Array, size: int) -> jax.Array:
        """Distinct valid ids of `ids` (any shape), ascending, padded with -1 to `size`."""
        big = self.e_loc  # above every local id, so -1 entries never crowd out a valid one
        u = jnp.unique(jnp.where(ids >= 0, ids, big).ravel(), size=size, fill_value=big)
        return jnp.where(u == big, -1, u)

    def psum(self, x):
        return x if self.mesh is None else jax.lax.psum(x, EXPERT_AXIS)


def make_placement(devices, n_experts: int) -> Placement:
    """The `Placement` of `devices` (see `resolve_devices`). Raises ValueError when the experts do not split evenly."""
    devs = resolve_devices(devices)
    if n_experts % len(devs):
        raise ValueError(f"{n_experts} experts cannot be split evenly over {len(devs)} devices; use a device "
                         f"count that divides {n_experts}")
    mesh = jax.sharding.Mesh(np.array(devs), (EXPERT_AXIS,)) if len(devs) > 1 else None
    return Placement(devices=tuple(devs), mesh=mesh, e_loc=n_experts // len(devs))

"""Direct copies (`offload/transfer.py`): the plan's rows land where it says, bad plans are refused, and the wasted
prefetch bytes are those of predicted experts the layer did not route. On the CPU the copies run at `wait`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moepic_jax.offload import decode, transfer

DEV = jax.devices()[0]
pytestmark = pytest.mark.skipif(not transfer.available(DEV), reason="direct copies need a C++ compiler")
E, F, D = 5, 8, 4


def _stack():
    host = np.random.default_rng(0).standard_normal((E, F, 3, D)).astype(np.float32)
    pinned = jax.device_put(host, jax.sharding.SingleDeviceSharding(DEV, memory_kind="pinned_host"))
    return host, pinned


def _copy(plan0, plan1, pinned, tops):
    src = jnp.asarray(transfer.host_address(pinned))

    @jax.jit
    def run(plan0, plan1, src, tops):
        groups = (transfer.Group(plan0, src, tops), transfer.Group(plan1, src, tops))
        d0, d1 = transfer.start(DEV.platform, groups, F, (3, D), E, jnp.float32, tag=0)
        return transfer.wait(DEV.platform, d0, groups[0], 0, 0), transfer.wait(DEV.platform, d1, groups[1], 0, 1)

    return [np.asarray(x) for x in run(jnp.asarray(plan0, jnp.int32), jnp.asarray(plan1, jnp.int32), src, tops)]


def test_plan_rows_land_where_planned():
    host, pinned = _stack()
    tops = jnp.asarray(np.random.default_rng(1).standard_normal((3, 6, 3, D)).astype(np.float32))
    H, C = transfer.FROM_HOST, transfer.FROM_CACHE
    # expert 2 whole from the host; slot 1's 6 top rows + expert 4's rows 6..8 from the host; nothing
    plan0 = [[[H, 2, 0, F], [H, 0, 0, 0]], [[C, 1, 0, 6], [H, 4, 6, 2]], [[H, 0, 0, 0], [H, 0, 0, 0]]]
    plan1 = [[[H, 3, 0, F], [H, 0, 0, 0]]]
    d0, d1 = _copy(plan0, plan1, pinned, tops)
    np.testing.assert_array_equal(d0[0], host[2])
    np.testing.assert_array_equal(d0[1, :6], np.asarray(tops)[1])
    np.testing.assert_array_equal(d0[1, 6:], host[4, 6:])
    np.testing.assert_array_equal(d1[0], host[3])


@pytest.mark.parametrize("row", [[0, E, 0, F], [0, 1, 4, F], [1, 3, 0, 2], [1, 0, 0, 7], [2, 0, 0, 1]],
                         ids=["expert", "host rows", "slot", "cache rows", "source"])
def test_bad_plans_are_refused(row):
    """A bad plan row is refused by its own call (CPU, synchronous GPU mode) or, on a GPU where a worker reads the
    plans after the call returned, by the next call; either way the error is reported once and later copies work."""
    host, pinned = _stack()
    tops = jnp.zeros((3, 6, 3, D), jnp.float32)
    with pytest.raises(Exception, match="h2d"):
        for _ in range(2):
            _copy([[row]], np.zeros((0, 1, 4), np.int32), pinned, tops)
    good = [[[transfer.FROM_HOST, 1, 0, F]]]
    np.testing.assert_array_equal(_copy(good, np.zeros((0, 1, 4), np.int32), pinned, tops)[0][0], host[1])


def test_wasted_prefetch_bytes_are_the_unrouted_predicted_experts():
    pred = decode.InFlight(ids=jnp.array([3, 5, -1, 6], jnp.int32), dst=None,
                           h2d_bytes=jnp.array([10.0, 20.0, 0.0, 40.0]), tag=0)
    uniq = jnp.array([5, 7, -1], jnp.int32)
    assert float(decode.wasted(pred, uniq)) == 50.0  # experts 3 and 6 were copied and not routed
    assert float(decode.wasted(None, uniq)) == 0.0


def test_direct_auto_is_the_conditional_step_on_cpu_and_a_bad_value_is_refused():
    from moepic_jax.offload.placement import make_placement
    from moepic_jax.runtime.factory import uses_direct

    place = make_placement(None, E)
    assert uses_direct("auto", place) is False  # the CPU keeps the conditional copy step
    assert uses_direct(True, place) is True and uses_direct(False, place) is False
    with pytest.raises(ValueError, match="direct must be 'auto', True or False"):
        uses_direct("yes", place)


@pytest.mark.parametrize("given, expect", [(None, "32"), ("8", "8")])
def test_import_sets_one_hardware_queue_per_stream_unless_set(given, expect):
    """`import moepic_jax` sets CUDA_DEVICE_MAX_CONNECTIONS=32 for direct copies' device-side waits; a value the user
    set wins."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "CUDA_DEVICE_MAX_CONNECTIONS"}
    if given is not None:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = given
    code = "import os, moepic_jax; print(os.environ['CUDA_DEVICE_MAX_CONNECTIONS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()[-1]
    assert out == expect

"""Prefill's grouped-by-expert routed experts (`moepic_jax.grouped`) against the scan over all experts.

The Mosaic-GPU kernel runs only on Hopper (benchmarks/experiments/probe_grouped_prefill.py checks it there against
`jax.lax.ragged_dot`: max abs difference 0). Here the grouping around the matmul (sort, the [E, 3F, D] view, the
interleaved down projection, masking, unsort, combine) runs with `jax.lax.ragged_dot` as the matmul.
"""
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moepic_jax.model import grouped
from moepic_jax import model as M


def _case(n, k, e, f, d, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((n, d)), jnp.float32)
    experts = jnp.asarray(rng.standard_normal((e, f, 3, d)) * 0.2, jnp.float32)
    ids = jnp.asarray(np.stack([rng.permutation(e - 2)[:k] for _ in range(n)]), jnp.int32)  # last 2 experts: no rows
    w = jnp.asarray(rng.random((n, k)), jnp.float32)
    return x, experts, ids, w


@pytest.mark.parametrize("n,k,e,f,d", [(13, 3, 8, 16, 32), (40, 2, 6, 24, 16), (1, 4, 7, 8, 8)])
def test_grouped_equals_scan(n, k, e, f, d):
    x, experts, ids, w = _case(n, k, e, f, d)
    got = grouped.experts_grouped(x, experts, ids, w, grouped.ragged_matmul_lax)
    want = M.experts_scan(x, experts, ids, w)
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)


def test_ids_of_another_device_contribute_nothing():
    """An id outside [0, E) (an expert another device holds, `Placement.local`) adds zero, as in the scan."""
    x, experts, ids, w = _case(11, 3, 8, 16, 32, seed=1)
    ids = ids.at[0, 1].set(8).at[4, 0].set(-1).at[10].set(8)  # one token with no local expert at all
    got = np.asarray(grouped.experts_grouped(x, experts, ids, w, grouped.ragged_matmul_lax))
    np.testing.assert_allclose(got, np.asarray(M.experts_scan(x, experts, ids, w)), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got[10], 0)
    # brute force for token 0: only its two local experts
    want0 = sum(float(w[0, j]) * np.asarray(M.segment_ffn(x[:1], experts[int(ids[0, j])]))[0] for j in (0, 2))
    np.testing.assert_allclose(got[0], want0, atol=1e-5, rtol=0)


def test_matmul_for_picks_mosaic_on_hopper_only():
    hopper = SimpleNamespace(platform="gpu", compute_capability="9.0")
    assert grouped.matmul_for(hopper, 2048, 1408, jnp.bfloat16) is grouped.ragged_matmul_mosaic  # Qwen1.5-MoE
    assert grouped.matmul_for(hopper, 2048, 768, jnp.bfloat16) is grouped.ragged_matmul_mosaic  # Qwen3-30B-A3B
    assert grouped.matmul_for(hopper, 2048, 768, jnp.float32) is None  # the kernel is bf16 / f16
    assert grouped.matmul_for(hopper, 64, 64, jnp.bfloat16) is None  # d_model not a multiple of the tile
    assert grouped.matmul_for(SimpleNamespace(platform="gpu", compute_capability="8.0"), 2048, 768,
                              jnp.bfloat16) is None
    assert grouped.matmul_for(jax.devices("cpu")[0], 2048, 768, jnp.bfloat16) is None


def test_mosaic_refuses_shapes_off_its_tiles():
    lhs, rhs = jnp.zeros((8, 96), jnp.bfloat16), jnp.zeros((2, 96, 128), jnp.bfloat16)
    with pytest.raises(ValueError, match="K % 64"):
        grouped.ragged_matmul_mosaic(lhs, rhs, jnp.array([4, 4]), False)

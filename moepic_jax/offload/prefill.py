"""Offloaded prefill: the layer step, the assembly of a layer's expert stack on the device, and the prompt refill.

Prefill (many tokens) uses nearly every expert of a layer, so the engine brings each MoE layer's whole stack to the
device, enqueued one layer ahead of the compute that needs it, and computes each expert over the tokens routed to
it (`model/grouped.py`; on devices without the grouped kernel, every expert over every token with a combine matrix;
both exact): one large copy (the most efficient per byte), or, where the layer's cache holds at least half of its
rows, the cached rows from the slots and per-expert copies of the rest (`gather_stack`). At most two layer stacks
are on the device at once; they are part of the budget's fixed part. With `adapt_to_prompt`, the slots of `static`
and `moepic` are then refilled from that on-device stack with the experts the prompt routed to most (`refill_tops`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax.offload.copy_step import StepSpec, fetch_rows

# Prefill copies only the rows a layer's cache does not hold once they are at most this share of its stack: one
# expert alone streams at ~39 GB/s against ~53 GB/s for a whole 1 GB layer stack on the H200
# (benchmarks/results/archive/bench_policies_qwen15_2026-11-30.json, "h2d"), so per-expert copies pay below ~73 % of the
# bytes; 50 % leaves a margin (the crossover itself is not measured yet).
PREFILL_PARTIAL_MAX = 0.5
# adapt_to_prompt: weight of the current cache membership, in routed tokens, when the prompt re-picks a layer's hot
# set; a short prompt then moves only the experts it clearly prefers, and ties keep what is cached.
PROMPT_PRIOR_TOKENS = 1.0
# Bytes per loop iteration of prefill's stack assembly and cache refill (`gather_stack`, `refill_tops`), counted
# as whole experts (a cached expert's iteration copies only its bottom rows):
# an iteration's copies are alive together (XLA starts them all before writing any), so this bounds their temporaries
# (7 experts of Qwen1.5-MoE, 14 of Qwen3-30B-A3B, 1 of Mixtral-8x7B) and keeps each program small to compile.
GATHER_UNROLL_BYTES = 128 * 2**20


def unroll_for(n: int, rows: jax.Array) -> int:
    """Iterations unrolled in a loop of n copies of one row of `rows` [_, ...]: GATHER_UNROLL_BYTES, 1 at least."""
    item = math.prod(rows.shape[1:]) * rows.dtype.itemsize
    return max(1, min(n, GATHER_UNROLL_BYTES // max(1, item)))


def partial_stack(n_cached: int, split: int, e_loc: int, d_ff: int, one_device: bool) -> bool:
    """Whether prefill assembles a layer's stack from its cache (n_cached slots of `split` rows) plus copies of the
    missing rows, rather than copying the whole stack."""
    return (one_device and n_cached > 0 and split > 0
            and e_loc * d_ff - n_cached * split <= PREFILL_PARTIAL_MAX * e_loc * d_ff)


def prompt_refill(counts: np.ndarray, owner: np.ndarray, prior: float = PROMPT_PRIOR_TOKENS) -> np.ndarray:
    """`adapt_to_prompt`'s rule: the experts one layer's slots hold after a prompt, in slot order [N] int32.

    counts: [E] routed tokens per expert in the prompt; owner: [N] the expert in each slot now (-1 = empty). Score =
    counts, plus `prior` for the experts cached now; the N best are kept (ties: cached first, then the higher id).
    Slots whose expert stays keep it; the others take the newcomers, best first.
    """
    score = np.asarray(counts, np.float64).copy()
    score[owner[owner >= 0]] += prior
    best = np.lexsort((np.isin(np.arange(len(score)), owner), score))[::-1][:len(owner)].tolist()
    keep = set(best)
    new = [e for e in best if e not in set(owner.tolist())]
    return np.array([e if e in keep else new.pop(0) for e in owner.tolist()], np.int32)


def prefill_layer(spec: StepSpec, is_moe: bool, matmul, lp, experts, h, k, v, positions, valid, start, layer):
    """One layer over T prompt tokens with the layer's whole expert stack on the device.

    Args:
      experts: [E_loc, F, 3, D] the layer's stack (this device's experts), or None for a dense layer;
      h: [B, T, D]; k, v: the KV cache; positions [B, T]; valid [B, S]; start [] int32; layer [] int32.
      matmul: the grouped matmul (`grouped.matmul_for`) or None.
    Returns:
      (h [B, T, D], k, v) and, for an MoE layer, counts [E] int32: the prompt's real tokens routed to each expert.
    """
    cfg = spec.cfg

    def ffn(x, h_mid):
        B, T, D = x.shape
        x = x.reshape(B * T, D)
        if not is_moe:
            with jax.named_scope("ffn"):
                return M.mlp(x, lp.mlp).reshape(B, T, D), None
        with jax.named_scope("router"):
            ids, w = M.route(x, lp.moe.w_router, cfg)
        with jax.named_scope("ffn"):
            y = spec.place.psum(M.experts_many(x, experts, spec.place.local(ids), w, matmul,
                                               cfg.expert_quant)).astype(x.dtype)
            y = y + M.shared_expert(x, lp.moe)
        # valid: [B, S] over the whole KV cache; this step's tokens are [start, start + T). Padding positions
        # route too: they are not counted.
        real = jax.lax.dynamic_slice_in_dim(valid, start, T, axis=1).reshape(B * T, 1).astype(jnp.int32)
        counts = jnp.zeros((cfg.n_experts,), jnp.int32).at[ids].add(jnp.broadcast_to(real, ids.shape))
        return y.reshape(B, T, D), counts

    h, k, v, counts = M.decoder_layer(lp, h, k, v, layer, M.Positions(positions, valid, start), cfg, ffn)
    return (h, k, v, counts) if is_moe else (h, k, v)


def refill_tops(tops, stack, owner):
    """tops [N, s, 3, D] (donated, rewritten in place): slot j <- rows [0, s) of expert owner[j] of `stack`
    ([E, F, 3, D] on the device)."""
    s, D = tops.shape[1], tops.shape[3]
    zero = jnp.zeros((), jnp.int32)

    def slot(j, tops):
        top = jax.lax.dynamic_slice(stack, (owner[j], zero, zero, zero), (1, s, 3, D))
        return jax.lax.dynamic_update_slice(tops, top, (j, zero, zero, zero))

    n = tops.shape[0]
    return jax.lax.fori_loop(0, n, slot, tops, unroll=unroll_for(n, tops)) if n else tops


def gather_stack(stack, tops, missing, owners):
    """A layer's whole stack [E, F, 3, D] on the device: the missing experts copied whole from the pinned
    `stack`, each cached expert's top [0, s) from its slot of `tops` [N, s, 3, D] plus, when s < F, its bottom
    copied. The same rows as the host stack, so prefill's results are unchanged. Loops over the experts
    (GATHER_UNROLL_BYTES per iteration): unrolled over all 128 experts of Qwen3-30B-A3B, one program per slot
    count took seconds to compile (and a plan has one per layer), and on the H200 all the copies of a layer
    were alive at once (0.47 GiB of temporaries for Qwen1.5-MoE at 50 %, enough to force a re-plan)."""
    F, s = stack.shape[1], tops.shape[1]
    zero = jnp.zeros((), jnp.int32)

    def put(out, e, rows):
        return jax.lax.dynamic_update_slice(out, rows[None], (e, zero, zero, zero))

    def whole(i, out):
        return put(out, missing[i], fetch_rows(stack, missing[i], 0, F))

    def cached(j, out):
        row = tops[j] if s == F else jnp.concatenate([tops[j], fetch_rows(stack, owners[j], s, F - s)])
        return put(out, owners[j], row)

    def loop(n, body, out):
        return jax.lax.fori_loop(0, n, body, out, unroll=unroll_for(n, out)) if n else out

    out = loop(missing.shape[0], whole, jnp.zeros(stack.shape, stack.dtype))
    return loop(owners.shape[0], cached, out)

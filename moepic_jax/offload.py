"""The offloading engine: experts in pinned host memory, a VRAM cache of top segments, next-layer
prediction and prefetch, all inside one compiled decode step per (plan, batch size).

Data flow of one decode step (DESIGN.md; JAX_NOTES.md §2b), per layer l, all on the device:

  attention(l) -> h_mid
  predictor: layer l+1's post-attention RMSNorm + router on h_mid -> top-k' experts of l+1
             -> their buffers are assembled now (prefetch), so XLA can overlap the copies with l
  router(l) -> routed experts (distinct: U = min(B*K, E) slots, padded with -1)
  per routed expert e:  predicted ? the prefetched buffer : fetch(e)
     fetch(e) = full hit  -> the cached top (s == F)
                top hit   -> concat(cached top [0:s], copy of host [e, s:F])   (one copy)
                miss      -> copy of host [e, 0:F]                              (one copy)
  y = sum over routed experts of weight * SwiGLU(x, buffer) (+ shared expert)
  cache rule update (admission for `lru` and `moepic`'s frequency rule), counters (hits, bytes, recall)

Copies are `jax.device_put(lax.dynamic_slice(host_stack, ...), Space.Device)` with a traced expert
id: a DMA of just that slice. Every size comes from the plan (slots N_l, split s_l), so changing which
expert sits in which slot never recompiles. Which experts need a copy is data: the experts are sorted so
that misses come first, then top-only hits, and one `lax.switch` per group of COPY_GROUP experts picks how
many of each to copy (`_copy_step`), since every conditional costs a host round trip on the GPU. Each
expert's output is computed inside that conditional, where its weights arrive: the assembled weights of a
layer are never materialised as one [U, F, 3, D] array.

With several devices (`devices=`), device d owns experts [d*E/n, (d+1)*E/n) of every layer: its pinned
buffer, slots and copies. The step runs under `shard_map` over the `expert` mesh axis with routed ids mapped
to local ids (-1 = another device's expert), and the MoE output is summed over the axis (`psum`).

Prefill (many tokens) uses nearly every expert of a layer, so it brings each MoE layer's whole stack to the
device, enqueued one layer ahead of the compute that needs it, and computes each expert over the tokens routed to
it (`grouped.py`; on devices without the grouped kernel, every expert over every token with a combine matrix; both
exact): one large copy (the most efficient per byte), or, where the layer's cache holds at least half of its rows,
the cached rows from the slots and per-expert copies of the rest (`_prefill_sources`). At most two layer stacks are
on the device at once; they are part of the budget's fixed part. With `adapt_to_prompt`, the slots of `static` and
`moepic` are then refilled from that on-device stack with the experts the prompt routed to most (`_refill_from_prompt`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import cache as C
from moepic_jax import grouped
from moepic_jax import model as M
from moepic_jax.budget import parse_budget
from moepic_jax.engine import CompileCache, tree_bytes
from moepic_jax.planner import CachePlan, LayerPlan
from moepic_jax.store import pin_experts, split_resident

P = jax.sharding.PartitionSpec
EXPERT_AXIS = "expert"
from moepic_jax.weights import Model

log = logging.getLogger(__name__)

WORKSPACE_MARGIN_BYTES = 8 * 2**20  # small temporaries, counters and allocator slack beyond what is sized below
# The GPU allocator (BFC) hands out a whole free chunk when under 128 MiB (and under the request) would remain, and
# that slack counts as in use for the buffer's life. The caches' slot arrays kept 216 MiB of it for Qwen3-30B-A3B
# (24 layers, 25 %): three arrays with 120, 32 and 64 MiB more than asked. Reserving the caches in one chunk first
# (`_build_caches`) left two, 152 MiB, served from holes that earlier transients had left
# (benchmarks/results/probe_prefill_memory_qwen3_lru*.json). On an accelerator the budget counts this many chunks of
# slack, each at most 128 MiB or one layer stack (the largest slot array), whichever is less. Not on the CPU backend.
ALLOCATOR_SLACK_CHUNKS = 2
ALLOCATOR_MAX_SLACK_BYTES = 128 * 2**20
# Prefill copies only the rows a layer's cache does not hold once they are at most this share of its stack: one
# expert alone streams at ~39 GB/s against ~53 GB/s for a whole 1 GB layer stack on the H200
# (benchmarks/results/bench_policies_qwen15_s4.json, "h2d"), so per-expert copies pay below ~73 % of the bytes;
# 50 % leaves a margin (the crossover itself is not measured yet).
PREFILL_PARTIAL_MAX = 0.5
# adapt_to_prompt: weight of the current cache membership, in routed tokens, when the prompt re-picks a layer's hot
# set; a short prompt then moves only the experts it clearly prefers, and ties keep what is cached.
PROMPT_PRIOR_TOKENS = 1.0
# Bytes per loop iteration of prefill's stack assembly and cache refill (`_gather_stack`, `_refill_tops`), counted
# as whole experts (a cached expert's iteration copies only its bottom rows):
# an iteration's copies are alive together (XLA starts them all before writing any), so this bounds their temporaries
# (7 experts of Qwen1.5-MoE, 14 of Qwen3-30B-A3B, 1 of Mixtral-8x7B) and keeps each program small to compile.
GATHER_UNROLL_BYTES = 128 * 2**20
COPY_GROUP = 4  # experts per lax.switch in `_copy_step`: 5 branches (15 with bottoms), at most 20 copies per group
# Up to this many groups the switches are unrolled; beyond, one switch runs in a `lax.scan` over the groups. Unrolled,
# every branch computes its experts, so the program grows as (groups x branches x COPY_GROUP) FFNs: 235 s to compile
# Qwen1.5-MoE lru at batch 4 (4 groups) on the H200, 67 s with the loop at the same TPOT (55.1 vs 54.5 ms,
# benchmarks/results/bench_policies_qwen15_s5.json); Qwen3-30B-A3B (top-8, 2 groups, 48 layers) compiled for over
# 250 s unrolled.
COPY_UNROLL_GROUPS = 1


def activation_bytes(cfg, batch: int, max_len: int, dtype_bytes: int) -> int:
    """Largest activations of a prefill over `max_len` tokens (bytes): attention scores and probabilities
    ([B, H, T, S] float32), one expert's SwiGLU intermediates ([N, F] float32 x 3, experts scanned one at a
    time), the residual stream and its float32 accumulators ([N, D] x 6), the last-token logits."""
    n = batch * max_len
    attn = 2 * batch * cfg.n_heads * max_len * max_len * 4
    ffn = 3 * n * max(cfg.d_ff, cfg.dense_d_ff, cfg.shared_d_ff) * 4
    stream = 6 * n * cfg.d_model * 4 + n * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * dtype_bytes
    return attn + ffn + stream + batch * cfg.vocab_size * 4


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


def fetch_rows(stack: jax.Array, e: jax.Array, start: int, size: int) -> jax.Array:
    """Copy rows [start, start+size) of expert `e` from a pinned_host stack [E, F, 3, D] to the device.

    e is a traced int32; the dynamic slice feeds `device_put` directly, so only that slice moves (JAX_NOTES.md
    §2b). On the H200 (jax 0.11.2) XLA runs it as one kernel that reads the pinned host memory (48.9-50.0 GB/s),
    not as a DMA on a copy engine (benchmarks/results/probe_step_*.json). Returns [size, 3, D] on the device.
    """
    D = stack.shape[-1]
    zero = jnp.zeros((), jnp.int32)
    sl = jax.lax.dynamic_slice(stack, (jnp.maximum(e, 0), jnp.int32(start), zero, zero), (1, size, 3, D))
    return jax.device_put(sl, jax.memory.Space.Device)[0]


def _unroll(n: int, rows: jax.Array) -> int:
    """Iterations unrolled in a loop of n copies of one row of `rows` [_, ...]: GATHER_UNROLL_BYTES, 1 at least."""
    item = math.prod(rows.shape[1:]) * rows.dtype.itemsize
    return max(1, min(n, GATHER_UNROLL_BYTES // max(1, item)))


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


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    rule: str  # cache replacement rule
    prefetch: bool
    allow_split: bool

    @property
    def admits(self) -> bool:
        """Whether the rule writes slots during decode (lru, freq), in the copy step (`_copy_step`)."""
        return self.rule != "static"


SPECS = {
    "ondemand": PolicySpec("static", prefetch=False, allow_split=False),
    "lru": PolicySpec("lru", prefetch=True, allow_split=False),
    "static": PolicySpec("static", prefetch=True, allow_split=False),
    "moepic": PolicySpec("freq", prefetch=True, allow_split=True),  # cache.py: why freq
}


class OffloadEngine:
    """Experts offloaded to pinned host memory; one of the policies ondemand, lru, static, moepic.

    Args:
      model: a host `Model` (its expert stacks are moved to pinned_host memory, in place, once).
      policy: see `SPECS` and DESIGN.md's policy table.
      vram_budget: everything the engine may hold on the device (see `budget.parse_budget`).
      plan: a `CachePlan` (static/moepic); None = built from a profile (`plan_for`).
      n_predicted: experts predicted per token for the next layer (k'); default top_k.
      max_batch, max_seq_len: the largest KV cache the engine reserves in its budget.
      granule: split granularity in neurons for the built-in plan.
      devices: None (the default device), a device count, or a list of `jax.Device`. With several devices the
        experts of every MoE layer are sharded over an `expert` mesh axis: device d owns experts
        [d * E/n, (d+1) * E/n), their pinned host buffers, their cache slots and their copies; the rest of the
        model and the KV cache are replicated; each device computes its own routed experts and the outputs are
        summed over the axis (`shard_map` + `psum`). `vram_budget` is then per device.
      prefetch: None = as the plan says (`CachePlan.prefetch`: the planner keeps next-layer prediction only where
        its cost model says it pays); True / False force it on / off for the policies that predict.
      adapt_to_prompt: static / moepic: during each prefill, refill every layer's slots with the experts the prompt
        routes to most (the experts already cached count as PROMPT_PRIOR_TOKENS extra routed tokens), taking their
        tops from the layer stack that prefill has on the device anyway: no extra H2D bytes, the plan's slot counts
        and splits unchanged (nothing recompiles). Off by default: it raised a 25 % cache's hits from 27 % to 77 %
        with random weights, whose routing follows the prompt, but lowered them from 35 % to 27 % on the trained
        embedded model, whose calibration profile predicts its decode better than the prompt does
        (benchmarks/results/bench_routing_embedded.md). Ignored by lru (which adapts by itself) and with several
        devices.
    Raises:
      ValueError: budget below the fixed part (names the minimum in GiB), a plan that does not match
        the model, a plan bigger than the cache budget.
    """

    def __init__(self, model: Model, policy: str = "moepic", vram_budget=None, plan: CachePlan | None = None,
                 n_predicted: int | None = None, max_batch: int = 1, max_seq_len: int = 1024, granule: int = 128,
                 profile=None, hardware=None, devices=None, prefetch: bool | None = None,
                 adapt_to_prompt: bool = False):
        if policy not in SPECS:
            raise ValueError(f"unknown offloading policy {policy!r}; choose one of {', '.join(SPECS)}")
        self.policy, self.spec = policy, SPECS[policy]
        self.model, self.cfg = model, model.cfg
        cfg = self.cfg
        self.dtype = jnp.dtype(model.dtype)
        self.row_bytes = 3 * cfg.d_model * self.dtype.itemsize  # one neuron of one expert
        self.n_predicted = cfg.top_k if n_predicted is None else int(n_predicted)
        if not 0 <= self.n_predicted <= cfg.n_experts:
            raise ValueError(f"n_predicted={n_predicted} must be in [0, n_experts={cfg.n_experts}]")
        self.max_batch, self.max_seq_len = int(max_batch), int(max_seq_len)
        self.vram_budget_bytes = parse_budget(vram_budget, model.weight_bytes())
        self.compiles = CompileCache()
        if not (prefetch is None or isinstance(prefetch, bool)):
            raise ValueError(f"prefetch must be None, True or False, got {prefetch!r}")
        if prefetch and not self.spec.prefetch:
            raise ValueError(f"policy {policy!r} never predicts the next layer's experts; prefetch=True needs lru, "
                             "static or moepic")
        self._prefetch = prefetch
        if not isinstance(adapt_to_prompt, bool):
            raise ValueError(f"adapt_to_prompt must be True or False, got {adapt_to_prompt!r}")
        self.adapt_to_prompt = adapt_to_prompt
        self.devices = resolve_devices(devices)
        self.device, self.n_dev = self.devices[0], len(self.devices)
        # prefill's grouped matmul; one device only: inside shard_map the kernel has not been run on a GPU yet
        self.matmul = grouped.matmul_for(self.device, cfg.d_model, cfg.d_ff, self.dtype) if self.n_dev == 1 else None
        if cfg.n_experts % self.n_dev:
            raise ValueError(f"{cfg.n_experts} experts cannot be split evenly over {self.n_dev} devices; use a device "
                             f"count that divides {cfg.n_experts}")
        self.e_loc = cfg.n_experts // self.n_dev  # experts owned by each device
        self.stack_bytes = self.e_loc * cfg.d_ff * self.row_bytes  # one layer's expert stack, per device
        self.mesh = jax.sharding.Mesh(np.array(self.devices), (EXPERT_AXIS,)) if self.n_dev > 1 else None

        self.stacks = pin_experts(model, self._sharding("pinned_host", expert=True))
        resident_host, _ = split_resident(model.params)
        self.resident = jax.device_put(resident_host, self._sharding())
        self.fixed_bytes = self.fixed_bytes_for(self.max_batch, self.max_seq_len, prefetch)
        if self.vram_budget_bytes is not None and self.vram_budget_bytes < self.fixed_bytes:
            raise ValueError(
                f"VRAM budget {self.vram_budget_bytes / 2**30:.3f} GiB is below the minimum of "
                f"{self.fixed_bytes / 2**30:.3f} GiB for policy {policy!r} (non-expert weights, KV cache for "
                f"{self.max_batch} x {self.max_seq_len} tokens, copy buffers, workspace); raise vram_budget")
        self.cache_budget = None if self.vram_budget_bytes is None else self.vram_budget_bytes - self.fixed_bytes
        self._plan_args = (plan is None, granule, profile, hardware)
        self.cache_plan = self._resolve_plan(plan, granule, profile, hardware)
        self.splits = tuple(lp.split for lp in self.cache_plan.layers)
        # The caches are allocated after the decode step is compiled (warmup): XLA's compile-time scratch (GEMM
        # autotuning buffers) then never coincides with full caches on the device.
        self.caches = None
        self.step_count = 0
        self._kv_makers = {}

    @property
    def prefetches(self) -> bool:
        """Whether decode predicts and prefetches the next layer's experts: the policy prefetches, k' > 0, and the
        plan keeps prediction (the planner drops it where it does not pay, `planner.solve(prefetch=None)`)."""
        wanted = self.cache_plan.prefetch if self._prefetch is None else self._prefetch
        return self.spec.prefetch and self.n_predicted > 0 and wanted

    def plan_in_use(self) -> CachePlan:
        """The plan with each layer's cached experts as the slots hold them now (lru, moepic's frequency rule and
        adapt_to_prompt move them;
        global expert ids) and prefetch as the engine runs it. Reads the slot owners from the device."""
        owners = {} if self.caches is None else self._slot_owners()
        layers = []
        for l, lp in enumerate(self.cache_plan.layers):
            if l not in owners:
                layers.append(lp)
                continue
            own = owners[l].reshape(self.n_dev, -1)  # device d's block holds its local ids
            glob = np.where(own >= 0, own + self.e_loc * np.arange(self.n_dev)[:, None], -1).ravel()
            layers.append(dataclasses.replace(lp, cached=tuple(int(e) for e in glob if e >= 0)))
        return dataclasses.replace(self.cache_plan, layers=tuple(layers), prefetch=self.prefetches)

    # ---- devices ------------------------------------------------------------------------------------
    @functools.cached_property
    def replicated_sharding(self) -> jax.sharding.Sharding:
        """Where the engine's logits and KV cache live (every device of the engine)."""
        return self._sharding()

    def _sharding(self, memory_kind: str = "device", expert: bool = False) -> jax.sharding.Sharding:
        """Replicated (or, with expert=True, split over the expert axis) placement in `memory_kind`."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(self.device, memory_kind=memory_kind)
        return jax.sharding.NamedSharding(self.mesh, P(EXPERT_AXIS) if expert else P(), memory_kind=memory_kind)

    def _spmd(self, fn, in_specs, out_specs):
        """`fn` as one program per device over the expert axis (identity with one device)."""
        if self.mesh is None:
            return fn
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def _local(self, ids: jax.Array) -> jax.Array:
        """Global expert ids -> this device's local ids, -1 where another device owns the expert (or id -1)."""
        if self.mesh is None:
            return ids
        d = jax.lax.axis_index(EXPERT_AXIS)
        return jnp.where((ids >= 0) & (ids // self.e_loc == d), ids - d * self.e_loc, -1)

    def _distinct(self, ids: jax.Array, size: int) -> jax.Array:
        """Distinct valid ids of `ids` (any shape), ascending, padded with -1 to `size`."""
        big = self.e_loc  # above every local id, so -1 entries never crowd out a valid one
        u = jnp.unique(jnp.where(ids >= 0, ids, big).ravel(), size=size, fill_value=big)
        return jnp.where(u == big, -1, u)

    def _psum(self, x):
        return x if self.mesh is None else jax.lax.psum(x, EXPERT_AXIS)

    # ---- budget -------------------------------------------------------------------------------------
    def fixed_bytes_for(self, batch: int, max_len: int, prefetch: bool | None = None) -> int:
        """Device bytes of everything but the top caches, per device, for a KV cache of batch x max_len tokens.
        prefetch: reserve buffers for the next layer's predicted experts (default: if the policy predicts; the
        plan, made later, may still turn prediction off)."""
        cfg = self.cfg
        expert = cfg.d_ff * self.row_bytes
        U = min(batch * cfg.top_k, self.e_loc)
        prefetch = self.spec.prefetch if prefetch is None else prefetch
        P = min(batch * self.n_predicted, self.e_loc) if prefetch else 0
        kv = M.kv_cache_bytes(cfg, batch, max_len, self.dtype.itemsize)
        # decode: routed + prefetched buffers of two layers in flight; prefill: two layer stacks.
        buffers = max(2 * (U + P) * expert, 2 * self.stack_bytes)
        acts = activation_bytes(cfg, batch, max_len, self.dtype.itemsize)
        return tree_bytes(self.resident) + kv + buffers + acts + self.workspace_bytes()

    def workspace_bytes(self) -> int:
        """Device bytes (per device) kept for what is not sized elsewhere: WORKSPACE_MARGIN_BYTES, plus on an
        accelerator the allocator's slack (ALLOCATOR_SLACK_CHUNKS)."""
        if self.device.platform == "cpu":
            return WORKSPACE_MARGIN_BYTES
        return WORKSPACE_MARGIN_BYTES + ALLOCATOR_SLACK_CHUNKS * min(ALLOCATOR_MAX_SLACK_BYTES, self.stack_bytes)

    def min_budget_bytes(self) -> int:
        """The smallest VRAM budget (bytes) this policy accepts for the reserved batch and length."""
        return self.fixed_bytes

    # ---- plan ---------------------------------------------------------------------------------------
    def _resolve_plan(self, plan, granule, profile, hardware) -> CachePlan:
        cfg = self.cfg
        F, E = cfg.d_ff, cfg.n_experts
        moe = cfg.moe_layers
        if self.policy == "ondemand":
            if plan is not None:
                raise ValueError("policy 'ondemand' caches nothing; do not pass a plan")
            return CachePlan(layers=tuple(LayerPlan(0, ()) for _ in moe), budget_bytes=0, model_id=cfg.identity(),
                             prefetch=False)
        if plan is None:
            from moepic_jax.profile import plan_for

            plan = plan_for(self, granule=granule, profile=profile, hardware=hardware)
        plan.validate(cfg.n_layers, E, F, moe)
        if self.policy in ("lru", "static") and any(lp.split not in (0, F) for lp in plan.layers):
            raise ValueError(f"policy {self.policy!r} caches whole experts: every split must be 0 or d_ff={F}")
        for l, lp in enumerate(plan.layers):
            counts = np.bincount(np.asarray(lp.cached, np.int64) // self.e_loc, minlength=self.n_dev)
            if self.n_dev > 1 and len(set(counts.tolist())) > 1:
                raise ValueError(f"layer {l} of the plan caches {counts.tolist()} experts on the {self.n_dev} devices; with "
                                 f"several devices each must cache the same number of its own experts "
                                 f"(device d owns experts [d*{self.e_loc}, (d+1)*{self.e_loc}))")
        need = sum(len(lp.cached) * lp.split * self.row_bytes for lp in plan.layers) // self.n_dev  # per device
        if self.cache_budget is not None and need > self.cache_budget:
            raise ValueError(f"the plan's top caches need {need / 2**30:.3f} GiB but only "
                             f"{self.cache_budget / 2**30:.3f} GiB of the VRAM budget is left for caches")
        if plan.model_id and plan.model_id != cfg.identity():
            raise ValueError(f"plan was made for model {plan.model_id}, not this model ({cfg.identity()}); re-plan")
        return plan

    def _build_caches(self):
        """Fill each layer's top slots from the host stack (one copy per cached expert, once). With several devices
        each device fills the slots of its own experts from its own pinned buffer."""
        cfg = self.cfg
        out = []

        def put(tops, stack, e, slot, s):  # copy one top into its slot of the donated cache, in place
            return jax.lax.dynamic_update_index_in_dim(tops, fetch_rows(stack, e, 0, s), slot, axis=0)

        put = jax.jit(put, static_argnums=(4,), donate_argnums=(0,))
        shapes = self._abstract_caches()
        # One allocation of every cache's bytes, freed at once, leaves one free chunk to carve the slot arrays
        # from: less allocator slack (ALLOCATOR_SLACK_CHUNKS; -64 MiB for Qwen3-30B-A3B, 24 layers, 25 %).
        reserve_bytes = self.cache_bytes()
        for dev in self.devices if reserve_bytes else ():
            reserve = jnp.zeros((reserve_bytes,), jnp.uint8, device=dev)
            reserve.block_until_ready()
            reserve.delete()
        for l, lp in enumerate(self.cache_plan.layers):
            if not cfg.moe_layers[l]:
                out.append(None)
                continue
            n, s = shapes[l].tops.shape[0] // self.n_dev, shapes[l].tops.shape[1]
            local = {sh.device: sh.data for sh in self.stacks[l].addressable_shards} if self.mesh else {
                self.device: self.stacks[l]}
            per_dev = []
            for d, dev in enumerate(self.devices):
                mine = [e - d * self.e_loc for e in lp.cached if e // self.e_loc == d] if n else []
                # Preallocated and filled slot by slot: the device never holds the caches twice.
                tops = jnp.zeros((n, s, 3, cfg.d_model), self.dtype, device=dev)  # made on dev, not copied there
                for slot, e in enumerate(mine):
                    tops = put(tops, local[dev], jnp.int32(e), jnp.int32(slot), s)
                per_dev.append(jax.device_put(C.init_layer_cache(tops, mine, self.e_loc), dev))
            if self.mesh is None:
                out.append(per_dev[0])
            else:  # one global array per field, each device's block its own cache
                sh = self._sharding(expert=True)
                out.append(jax.tree_util.tree_map(
                    lambda shape, *xs: jax.make_array_from_single_device_arrays(shape.shape, sh, list(xs)),
                    shapes[l], *per_dev))
        return tuple(out)

    def _abstract_caches(self):
        """Shapes of the caches `_build_caches` makes (compiling needs only these). With several devices the
        arrays are global: device d holds block d of every field (its n slots, the slot map of its experts)."""
        cfg, out, nd = self.cfg, [], self.n_dev
        sh = self._sharding(expert=True)
        for l, lp in enumerate(self.cache_plan.layers):
            if not cfg.moe_layers[l]:
                out.append(None)
                continue
            n, s = (len(lp.cached) // nd, lp.split) if lp.cached and lp.split else (0, max(lp.split, 0))

            def sds(shape, dtype):
                return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

            out.append(C.LayerCache(tops=sds((nd * n, s, 3, cfg.d_model), self.dtype),
                                    slot_of=sds((cfg.n_experts,), jnp.int32), owner=sds((nd * n,), jnp.int32),
                                    last_use=sds((nd * n,), jnp.int32), score=sds((cfg.n_experts,), jnp.float32)))
        return tuple(out)

    def _caches_or_shapes(self):
        return self._abstract_caches() if self.caches is None else self.caches

    def cache_bytes(self) -> int:
        """Device bytes of the top caches the plan asks for (allocated or not yet), per device."""
        return sum(tree_bytes(c.tops) for c in self._caches_or_shapes() if c is not None) // self.n_dev

    # ---- state ----------------------------------------------------------------------------------------
    def new_state(self, batch: int, max_len: int):
        """A zeroed KV cache for `batch` x `max_len` tokens. Raises ValueError beyond the reserved size."""
        if batch > self.max_batch or max_len > self.max_seq_len:
            raise ValueError(f"this engine reserved a KV cache for batch {self.max_batch} x {self.max_seq_len} tokens; "
                             f"batch {batch} x {max_len} needs a new engine (Engine(..., max_batch=, max_seq_len=))")
        make = self._kv_makers.get((batch, max_len))
        if make is None:  # zeros made in place on the engine's device(s), not on the default one and copied
            make = functools.partial(M.init_kv_cache, self.cfg, batch, max_len, self.dtype)
            make = self._kv_makers[batch, max_len] = jax.jit(make, out_shardings=self._sharding())
        return make()

    # ---- decode -------------------------------------------------------------------------------------
    def _copy_step(self, split: int, stack: jax.Array, cache: C.LayerCache, ids: jax.Array, need: jax.Array,
                   emit, every: bool = False, admit_step: jax.Array | None = None):
        """One layer's data-dependent copy step: bring experts `ids` to the device and hand each one to `emit`.

        ids: [U] int32 distinct experts (-1 = padding); need: [U] bool, those that must be assembled; split: the
        layer's plan split s; every: static, True when every id is known to be valid and needed (batch 1, nothing
        prefetched). A needed expert costs at most one copy (the planner's cost model): a miss is copied whole, a
        cached expert's top rows [0, s) come from its slot and, when s < F, its bottom rows [s, F) are copied.
        `emit(kind, buffer, mask)` maps one expert to a pytree of fixed shape: kind "whole" (copied), "bottom"
        (slot top + copied bottom), or "rest" (not copied: buffer = its slot's top when s == F, valid where the
        traced `mask` is true; None when s < F or nothing is cached).

        admit_step: the decode step (int32) for a layer whose rule admits (lru, freq). The slots are chosen by
        `cache.admit_slots` over the permuted ids; each group's switch returns the first s rows of its whole copies,
        written into their slots right after the switch (outside it: a write inside a branch made XLA copy the
        whole cache in every branch), so that no buffer of every layer's rows to admit is assembled.

        How many copies a step makes depends on the data, so it takes a conditional, and on the GPU every
        conditional costs a host round trip (about 50 us per `lax.cond` on the H200,
        benchmarks/results/probe_cond_*.json): experts are sorted so that the ones not copied come first, then
        top-only hits, then misses, and one `lax.switch` per group of COPY_GROUP experts picks the counts for that
        group. Every read of a slot therefore comes before any admission writes one. `emit` runs inside the
        branch, so a caller that only needs each expert's output never materialises the [U, F, 3, D] weights.
        Returns (ids permuted [U], the permutation [U], emit's results stacked [U, ...], H2D bytes (float32), the
        cache after the step (its slots and rule state; unchanged without admit_step), the slot each permuted id
        was admitted to [U] (>= the slot count: not admitted)).
        """
        F = self.cfg.d_ff
        U = ids.shape[0]
        s = split if cache.tops.shape[0] > 0 else 0
        valid = ids >= 0
        need = need & valid
        slot = cache.slot_of[jnp.maximum(ids, 0)] if s > 0 else jnp.full(ids.shape, -1, jnp.int32)
        cached = valid & (slot >= 0)
        miss, top_hit = need & ~cached, need & cached & (s < F)
        # The rest first, then top-only hits, then misses: bottom copies and whole copies are consecutive runs, and
        # the slots are read before an admission overwrites one.
        order = jnp.argsort(2 * miss.astype(jnp.int32) + top_hit.astype(jnp.int32), stable=True)
        sids, slots, cached = ids[order], jnp.maximum(slot[order], 0), cached[order]
        n_miss, n_top = jnp.sum(miss, dtype=jnp.int32), jnp.sum(top_hit, dtype=jnp.int32)
        nbytes = (n_miss * F + n_top * (F - s)).astype(jnp.float32) * self.row_bytes
        n_slots = cache.tops.shape[0]
        admit = admit_step is not None and s > 0
        if admit:
            cache, target = C.admit_slots(self.spec.rule, cache, sids, admit_step)
        else:
            target = jnp.full((U,), n_slots, jnp.int32)
        r = cache.tops.shape[1]

        def expert(kind, e, slot, is_cached, tops):  # (emit's result, the rows to admit [r, 3, D] when admitting)
            rows = jnp.zeros((r if admit else 0, 3, self.cfg.d_model), self.dtype)
            if kind == "whole":
                buf = fetch_rows(stack, e, 0, F)
                return emit(kind, buf, None), (buf[:r] if admit else rows)
            if kind == "bottom":
                return emit(kind, jnp.concatenate([tops[slot], fetch_rows(stack, e, s, F - s)]), None), rows
            return (emit(kind, tops[slot], is_cached) if s == F else emit(kind, None, None)), rows

        def stacked(kinds, e, slot, is_cached, tops):  # one group: e, slot, is_cached [m]
            outs = [expert(k, e[i], slot[i], is_cached[i], tops) for i, k in enumerate(kinds)]
            return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

        def write(tops, rows, t):  # the group's admissions, outside the switch: XLA updates a carried buffer in place
            return tops.at[t].set(rows.astype(tops.dtype), mode="drop", unique_indices=True) if admit else tops

        tops = cache.tops
        if every and s == 0:
            res, _ = stacked(["whole"] * U, sids, slots, cached, tops)
            return sids, order, res, nbytes, cache, target
        has_bot = 0 < s < F

        def group(m, n_rest, g0, e, slot, is_cached, t, tops):  # the switch over one group's (rest, bottom) counts
            pairs = [(a, b) for a in range(m + 1) for b in (range(a, m + 1) if has_bot else (a,))]
            table = np.zeros((m + 1, m + 1), np.int32)
            for i, (a, b) in enumerate(pairs):
                table[a, b] = i
            branches = [functools.partial(stacked, ["rest"] * a + ["bottom"] * (b - a) + ["whole"] * (m - b))
                        for a, b in pairs]
            a = jnp.clip(n_rest - g0, 0, m)
            b = jnp.clip(n_rest + n_top - g0, 0, m) if has_bot else a
            res, rows = jax.lax.switch(jnp.asarray(table)[a, b], branches, e, slot, is_cached, tops)
            return res, write(tops, rows, t)

        n_groups = -(-U // COPY_GROUP)
        n_rest = U - n_miss - n_top
        if n_groups <= COPY_UNROLL_GROUPS:
            groups = []
            for g0 in range(0, U, COPY_GROUP):
                sl = slice(g0, g0 + COPY_GROUP)
                res, tops = group(min(COPY_GROUP, U - g0), n_rest, g0, sids[sl], slots[sl], cached[sl], target[sl],
                                  tops)
                groups.append(res)
            res = jax.tree.map(lambda *xs: jnp.concatenate(xs), *groups)
            return sids, order, res, nbytes, cache.replace(tops=tops), target
        # Several groups (batch > 1, or top-k > COPY_GROUP): one switch in a loop, so the program's size does not grow
        # with the batch. Padding (-1, not cached) goes in front, in the "rest" part of the first group, and emits
        # zeros; the misses stay last.
        pad = n_groups * COPY_GROUP - U

        def padded(x, value):
            return jnp.pad(x, (pad, 0), constant_values=value).reshape(n_groups, COPY_GROUP)

        g0s = jnp.arange(n_groups, dtype=jnp.int32) * COPY_GROUP
        xs = (g0s, padded(sids, -1), padded(slots, 0), padded(cached, False), padded(target, n_slots))

        def body(carry, x):  # the group's results written into the carried buffer, not stacked as scan outputs
            buf, tops = carry
            out, tops = group(COPY_GROUP, pad + n_rest, *x, tops)
            return (jax.tree.map(lambda b, o: jax.lax.dynamic_update_index_in_dim(b, o, x[0] // COPY_GROUP, 0),
                                 buf, out), tops), None

        # The loop's result buffer is filled from this layer's ids (the loop overwrites every value). A constant
        # buffer has no inputs, so XLA allocated every layer's at the start of the step and kept them all alive
        # (every layer's admitted rows): for Qwen3-30B-A3B lru on the H200, 3.45 GiB at 48 layers (session 6) and
        # 1.76 GiB at 24 (benchmarks/results/probe_step_qwen3_l24.json), against 0.14 GiB with the fill
        # (probe_step_qwen3_l24_tied.json). Its shapes are one copied expert's results (every kind emits the same
        # shapes), traced once rather than the whole switch again.
        one = jax.eval_shape(lambda e, sl, c: expert("whole", e, sl, c, cache.tops)[0],
                             sids[0], slots[0], cached[0])
        fill = ids[0].astype(jnp.float32) * 0.0
        buf = jax.tree.map(lambda a: jnp.broadcast_to(fill.astype(a.dtype), (n_groups, COPY_GROUP) + a.shape), one)
        res, tops = jax.lax.scan(body, (buf, tops), xs)[0]
        res = jax.tree.map(lambda x: x.reshape((n_groups * COPY_GROUP,) + x.shape[2:])[pad:], res)
        return sids, order, res, nbytes, cache.replace(tops=tops), target

    def _assemble(self, split: int, stack: jax.Array, cache: C.LayerCache, ids: jax.Array, need: jax.Array,
                  every: bool = False):
        """The weights of experts `ids` on the device (`_copy_step`; for a prefetch, used a layer later).

        Returns (ids permuted [U], the permutation [U], their buffers [U, F, 3, D] (zeros where not needed and not
        cached whole), H2D bytes (float32)).
        """
        shape = (self.cfg.d_ff, 3, self.cfg.d_model)

        def emit(kind, buf, mask):
            if buf is None:
                return jnp.zeros(shape, self.dtype)
            return buf if mask is None else jnp.where(mask, buf, jnp.zeros((), buf.dtype))

        return self._copy_step(split, stack, cache, ids, need, emit, every)[:4]

    def _expert_outputs(self, x: jax.Array, split: int, stack: jax.Array, cache: C.LayerCache, ids: jax.Array,
                        need: jax.Array, every: bool = False, admit_step: jax.Array | None = None):
        """Outputs of experts `ids` for tokens x [B, D], each computed where its weights arrive (`_copy_step`).

        Returns (ids permuted [U], the permutation [U], outputs [U, B, D] float32 (zeros where not needed and not
        cached whole), H2D bytes (float32), the cache after the step, the admitted slot of each permuted id [U]);
        admit_step as in `_copy_step`.
        """
        B, D = x.shape

        def emit(kind, buf, mask):
            if buf is None:
                return jnp.zeros((B, D), jnp.float32)
            out = M.segment_ffn(x, buf).astype(jnp.float32)
            return out if mask is None else jnp.where(mask, out, 0.0)

        return self._copy_step(split, stack, cache, ids, need, emit, every, admit_step)

    def _predict(self, l_next: int, lp: M.LayerParams, stack: jax.Array, h_mid: jax.Array, cache: C.LayerCache,
                 P: int):
        """Predict layer l_next's experts from the current residual stream and start their copies.

        DESIGN.md "Predictor": apply layer l+1's post-attention RMSNorm and router to h_mid ([B, D]),
        take the top k' per token. Returns (distinct predicted ids [P] (-1 padded), buffers [P, F, 3, D], bytes).
        """
        pids, _ = M.route(M.rms_norm(h_mid, lp.mlp_norm, self.cfg.rms_eps), lp.moe.w_router, self.cfg,
                          self.n_predicted)
        pred = self._distinct(self._local(pids), P)
        sids, _, bufs, nbytes = self._assemble(self.splits[l_next], stack, cache, pred, pred >= 0,
                                               every=h_mid.shape[0] == 1 and self.mesh is None)
        return sids, bufs, nbytes

    def _moe_decode(self, l, lp: M.LayerParams, stack, x, cache, pred, step):
        """MoE block of layer l for B tokens (x [B, D]). Returns (y [B, D], cache, counters of l)."""
        cfg = self.cfg
        B = x.shape[0]
        gids, w = M.route(x, lp.moe.w_router, cfg)  # [B, K] global ids
        ids = self._local(gids)  # this device's experts (-1: another device computes that pair)
        U = min(B * cfg.top_k, self.e_loc)
        uniq = self._distinct(ids, U)
        full, top, miss = C.classify(cache, ids, self.splits[l], cfg.d_ff)
        predicted = jnp.zeros(ids.shape, bool)
        got = jnp.zeros((U,), bool)
        if pred is not None:
            pred_ids, pred_bufs, pred_bytes = pred
            predicted = jnp.any(ids[..., None] == pred_ids, axis=-1) & (ids >= 0)
            got = jnp.any(uniq[:, None] == pred_ids, axis=-1) & (uniq >= 0)
        # At batch 1 the top-k ids are distinct (no padding); with nothing prefetched, every one is needed.
        admit = self.spec.admits
        sids, order, outs, nbytes, new_cache, target = self._expert_outputs(
            x, self.splits[l], stack, cache, uniq, ~got, every=B == 1 and pred is None and self.mesh is None,
            admit_step=step if admit else None)
        if pred is not None:
            nbytes = nbytes + pred_bytes
            j = jnp.argmax(sids[:, None] == pred_ids, axis=-1)  # [U] where each prefetched expert sits
            g = got[order]
            pred_outs = jnp.stack([M.segment_ffn(x, pred_bufs[p]).astype(jnp.float32) for p in range(len(pred_ids))])
            outs = jnp.where(g[:, None, None], pred_outs[j], outs)
            n, r = new_cache.tops.shape[:2]
            if admit and n and r:  # a prefetched miss is admitted with its prefetched rows (not copied in the step)
                idx = jnp.where(g, target, n + jnp.arange(target.shape[0]))  # distinct; >= n is dropped
                new_cache = new_cache.replace(tops=new_cache.tops.at[idx].set(
                    pred_bufs[j, :r].astype(new_cache.tops.dtype), mode="drop", unique_indices=True))
        # outs: every distinct expert's output for every row [U, B, D]; summed in routing order (k = 0..K-1)
        # exactly as the resident model does, so that bfloat16 results round identically, not just within tolerance.
        rows = jnp.arange(B)
        y = jnp.zeros((B, cfg.d_model), jnp.float32)
        for k in range(cfg.top_k):
            u = jnp.argmax(sids[None, :] == ids[:, k:k + 1], axis=1)  # [B] position of ids[:, k] in sids
            y = y + jnp.where(ids[:, k, None] >= 0, w[:, k, None] * outs[u, rows], 0.0)
        y = self._psum(y).astype(x.dtype) + M.shared_expert(x, lp.moe)
        cache = new_cache
        f32 = jnp.float32
        counters = dict(full_hits=jnp.sum(full, dtype=f32), top_hits=jnp.sum(top, dtype=f32),
                        misses=jnp.sum(miss, dtype=f32), predicted=jnp.sum(predicted, dtype=f32),
                        h2d_bytes=nbytes.astype(f32))
        counters = {k: self._psum(v) for k, v in counters.items()}  # over the devices' experts
        counters["routed"] = f32(ids.size)
        return y, cache, counters

    def _decode_step(self, resident, stacks, caches, kv: M.KVCache, tokens, step):
        """One token for every row. tokens: [B] int32. Returns (logits [B, V], caches, kv, counters [L])."""
        cfg = self.cfg
        B = tokens.shape[0]
        mask = jnp.ones((B, 1), bool)
        positions, valid, new_kv = M.cache_positions(kv, mask)
        h = M.embed(resident, tokens[:, None])
        k, v = kv.k, kv.v
        caches = list(caches)
        names = ("full_hits", "top_hits", "misses", "predicted", "routed", "h2d_bytes")
        cnt = {n: [jnp.zeros((), jnp.float32)] * cfg.n_layers for n in names}
        pred = None
        n_pred = min(B * self.n_predicted, self.e_loc)
        for l, lp in enumerate(resident.layers):
            a, k, v = M.attention(lp.attn, M.rms_norm(h, lp.attn_norm, cfg.rms_eps), positions, k, v, l, valid,
                                  kv.length, cfg)
            h = h + a
            h_mid = h[:, 0]
            nxt = l + 1
            next_pred = None
            if self.prefetches and nxt < cfg.n_layers and cfg.moe_layers[nxt]:
                next_pred = self._predict(nxt, resident.layers[nxt], stacks[nxt], h_mid, caches[nxt], n_pred)
            x = M.rms_norm(h_mid, lp.mlp_norm, cfg.rms_eps)
            if cfg.moe_layers[l]:
                y, caches[l], c = self._moe_decode(l, lp, stacks[l], x, caches[l], pred, step)
                for n in names:
                    cnt[n][l] = c[n]
            else:
                y = M.mlp(x, lp.mlp)
            h = h + y[:, None]
            if cfg.moe_layers[l] and self.spec.admits:
                # The next layer starts only after this layer's admissions are written: otherwise XLA may defer every
                # layer's cache update to the end of the step and keep all their admitted rows alive at once
                # (1.6 GiB of temporaries for Qwen1.5-MoE at batch 1 on the H200, 6.3 GiB at batch 4).
                h, caches[l] = jax.lax.optimization_barrier((h, caches[l]))
            pred = next_pred
        logits = M.lm_head(resident, h, cfg)[:, 0]
        new_kv = new_kv.replace(k=k, v=v)
        counters = {n: jnp.stack(cnt[n]) for n in names}
        return logits, tuple(caches), new_kv, counters

    def decode(self, state, tokens):
        """One token per row. tokens: [batch] int32 (on the device).

        Returns (logits [batch, vocab] float32, KV cache (donated input), counters: dict of [n_layers] float32
        arrays full_hits, top_hits, misses, predicted (routed pairs that were prefetched), routed, h2d_bytes).
        The top caches and the replacement rule's state are updated in place (donated).
        """
        if self.caches is None:
            self.caches = self._build_caches()
        if self.mesh is not None:
            tokens = jax.device_put(tokens, self.replicated_sharding)
        args = (self.resident, self.stacks, self.caches, state, tokens, jnp.int32(self.step_count + 1))
        exe = self._get_decode(args, donate_argnums=(2, 3), fixed=3)
        logits, self.caches, state, counters = exe(*args)
        self.step_count += 1
        return logits, state, counters

    @functools.cached_property
    def _decode_program(self):
        """(decode step as one program per device, its output shardings). Built once, not per token. With several
        devices the outputs are placed explicitly: XLA would hand zero-size cache arrays back replicated, which
        the next call would refuse."""
        r, x = P(), P(EXPERT_AXIS)
        fn = self._spmd(self._decode_step, (r, x, x, r, r, r), (r, x, r, r))
        if self.mesh is None:
            return fn, None
        rep, exp = self._sharding(), self._sharding(expert=True)
        return fn, (rep, exp, rep, rep)

    def _compile_decode(self, state, dec_tokens):
        """Compile the decode step for this KV cache and batch (against the caches' shapes when not built yet)."""
        self._get_decode((self.resident, self.stacks, self._caches_or_shapes(), state, dec_tokens, jnp.int32(0)),
                         donate_argnums=(2, 3), fixed=3)

    def _get_decode(self, args, donate_argnums, fixed):
        fn, out = self._decode_program
        return self.compiles.get("decode", fn, args, donate_argnums=donate_argnums, fixed=fixed, out_shardings=out)

    # ---- prefill --------------------------------------------------------------------------------------
    def _prefill_layer(self, lp, experts, h, k, v, positions, valid, start, layer, is_moe: bool):
        cfg = self.cfg
        B, T, D = h.shape
        a, k, v = M.attention(lp.attn, M.rms_norm(h, lp.attn_norm, cfg.rms_eps), positions, k, v, layer, valid,
                              start, cfg)
        h = h + a
        x = M.rms_norm(h, lp.mlp_norm, cfg.rms_eps).reshape(B * T, D)
        if is_moe:
            ids, w = M.route(x, lp.moe.w_router, cfg)
            y = self._psum(M.experts_many(x, experts, self._local(ids), w, self.matmul)).astype(x.dtype)
            y = y + M.shared_expert(x, lp.moe)
            # valid: [B, S] over the whole KV cache; this step's tokens are [start, start + T). Padding positions
            # route too: they are not counted.
            real = jax.lax.dynamic_slice_in_dim(valid, start, T, axis=1).reshape(B * T, 1).astype(jnp.int32)
            counts = jnp.zeros((cfg.n_experts,), jnp.int32).at[ids].add(jnp.broadcast_to(real, ids.shape))
            return h + y.reshape(B, T, D), k, v, counts
        y = M.mlp(x, lp.mlp)
        return h + y.reshape(B, T, D), k, v

    def prefill(self, state: M.KVCache, tokens, mask):
        """Prefill T tokens: a Python loop over layers of compiled layer steps, each MoE layer's experts brought
        to the device one layer ahead (enqueued before the compute it overlaps): the whole stack in one copy, or,
        where the layer's cache holds at least half of its rows, the cached rows from the slots and only the
        missing ones copied (`_prefill_sources`)."""
        cfg = self.cfg
        res = self.resident
        if self.mesh is not None:
            tokens, mask = jax.device_put((tokens, mask), self.replicated_sharding)
        args = (res, state, tokens, mask)
        h, positions, valid, pos, length = self.compiles.get("prefill_pre", self._prefill_pre, args, fixed=1)(*args)
        k, v = state.k, state.v
        moe_ids = [l for l in range(cfg.n_layers) if cfg.moe_layers[l]]
        if self.caches is None:
            self.caches = self._build_caches()
        # Slot owners of the layers prefill assembles or refills, read once: decode steps move them, prefill does not.
        owners = self._slot_owners([l for l in moe_ids
                                    if self._prefill_partial(self.cache_plan.layers[l]) or self._adapts(l)])
        sources = self._prefill_sources(owners)
        pending = {moe_ids[0]: self._prefill_stack(moe_ids[0], sources)} if moe_ids else {}
        h2d = np.zeros(cfg.n_layers)
        experts = None
        for l, lp in enumerate(res.layers):
            is_moe = cfg.moe_layers[l]
            # Python would otherwise run ahead and enqueue every layer's stack copy at once (each allocates its
            # device buffer at enqueue time): wait for layer l-1 and drop its stack, so that at most two stacks
            # (layer l's, already copied or in flight, and layer l+1's) are alive, as the budget assumes.
            experts = args = None  # the previous layer's stack is referenced by both
            h.block_until_ready()
            nxt = next((m for m in moe_ids if m > l), None)
            if nxt is not None and nxt not in pending:
                pending[nxt] = self._prefill_stack(nxt, sources)  # enqueued before layer l's compute
            if is_moe:
                experts, h2d[l] = pending.pop(l)
            args = (lp, experts, h, k, v, positions, valid, state.length, jnp.int32(l))
            h, k, v, *counts = self._prefill_fn(is_moe, args)(*args)
            if is_moe and self._adapts(l):
                self._refill_from_prompt(l, experts, counts[0], owners[l])
        logits = self._head(res, h)
        return logits, state.replace(k=k, v=v, valid=valid, pos=pos, length=length), {"h2d_bytes": h2d}

    def _prefill_partial(self, lp: LayerPlan) -> bool:
        """Whether prefill assembles this layer's stack from its cache plus copies of the missing rows."""
        n, s = len(lp.cached), lp.split
        return (self.mesh is None and n > 0 and s > 0
                and self.e_loc * self.cfg.d_ff - n * s <= PREFILL_PARTIAL_MAX * self.e_loc * self.cfg.d_ff)

    def _slot_owners(self, layers=None) -> dict:
        """{layer: the expert in each of its cache slots [N] int32 (-1 = empty)} for `layers` (default: every layer
        with slots), in slot order, as the device holds them now (lru, freq and adapt_to_prompt move experts): one
        device read for all."""
        if layers is None:
            layers = [l for l, c in enumerate(self.caches) if c is not None and c.owner.shape[0] > 0]
        return {l: np.asarray(o, np.int32) for l, o in zip(layers, jax.device_get([self.caches[l].owner
                                                                                   for l in layers]))}

    def _prefill_sources(self, owners: dict) -> dict:
        """Per MoE layer that prefill assembles (`_prefill_partial`): (missing experts [E - N], the expert in each
        cache slot [N]) as int32 arrays, from the slot `owners` (`_slot_owners`). Every slot of a built cache is
        filled; a layer with an empty slot is copied whole."""
        out = {}
        for l, own in owners.items():
            if self._prefill_partial(self.cache_plan.layers[l]) and (own >= 0).all():
                out[l] = (np.setdiff1d(np.arange(self.e_loc, dtype=np.int32), own), own)
        return out

    def _prefill_stack(self, l: int, sources: dict):
        """Layer l's expert stack on the device for prefill ([E, F, 3, D]) and the bytes copied for it."""
        F = self.cfg.d_ff
        if l not in sources:
            # bytes over all devices, as the decode counters are (each device copies its own experts)
            return jax.device_put(self.stacks[l], self._sharding(expert=True)), self.cfg.n_experts * F * self.row_bytes
        missing, owners = sources[l]
        tops = self.caches[l].tops
        args = (self.stacks[l], tops, jnp.asarray(missing), jnp.asarray(owners))
        stack = self.compiles.get("prefill_gather", self._gather_stack, args)(*args)
        return stack, (len(missing) * F + len(owners) * (F - tops.shape[1])) * self.row_bytes

    def _adapts(self, l: int) -> bool:
        lp = self.cache_plan.layers[l]
        return (self.adapt_to_prompt and self.spec.rule != "lru" and self.mesh is None and len(lp.cached) > 0
                and lp.split > 0 and len(lp.cached) < self.e_loc)

    def _refill_from_prompt(self, l: int, stack, counts, owner: np.ndarray):
        """Re-pick layer l's cached experts (now `owner` [N], slot order) from the prompt's routing `counts` [E]
        (routed tokens per expert) and copy their tops from `stack` ([E, F, 3, D], layer l's experts on the device
        during prefill). Slots whose expert stays keep it; the others take the newcomers, hottest first. The
        frequency rule's scores restart at zero: starting them from the counts did not raise its hits in the replay
        (benchmarks/sim_replacement.py, `freq-seeded`, from the calibration profile: 47.0 against 47.5 % at 25 %)."""
        cache = self.caches[l]
        new_owner = prompt_refill(np.asarray(jax.device_get(counts)), owner)
        if np.array_equal(new_owner, owner):
            return
        owner = new_owner
        args = (cache.tops, stack, jnp.asarray(owner))
        tops = self.compiles.get("cache_refill", self._refill_tops, args, donate_argnums=(0,))(*args)
        new_cache = jax.device_put(C.init_layer_cache(tops, owner.tolist(), self.e_loc), self.device)
        self.caches = self.caches[:l] + (new_cache,) + self.caches[l + 1:]

    @staticmethod
    def _refill_tops(tops, stack, owner):
        """tops [N, s, 3, D] (donated, rewritten in place): slot j <- rows [0, s) of expert owner[j] of `stack`."""
        s, D = tops.shape[1], tops.shape[3]
        zero = jnp.zeros((), jnp.int32)

        def slot(j, tops):
            top = jax.lax.dynamic_slice(stack, (owner[j], zero, zero, zero), (1, s, 3, D))
            return jax.lax.dynamic_update_slice(tops, top, (j, zero, zero, zero))

        n = tops.shape[0]
        return jax.lax.fori_loop(0, n, slot, tops, unroll=_unroll(n, tops)) if n else tops

    @staticmethod
    def _gather_stack(stack, tops, missing, owners):
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
            return jax.lax.fori_loop(0, n, body, out, unroll=_unroll(n, out)) if n else out

        out = loop(missing.shape[0], whole, jnp.zeros(stack.shape, stack.dtype))
        return loop(owners.shape[0], cached, out)

    def _prefill_pre(self, res, state, tokens, mask):
        # Only the bookkeeping leaves the program: returning the KV cache would make the compiled executable copy
        # k and v (one more KV cache on the device through prefill, 0.19 GiB for Qwen1.5-MoE at 1024 tokens).
        positions, valid, new_kv = M.cache_positions(state, mask)
        return M.embed(res, tokens), positions, valid, new_kv.pos, new_kv.length

    def _prefill_fn(self, is_moe: bool, args):
        def layer(lp, experts, h, k, v, positions, valid, start, l):
            return self._prefill_layer(lp, experts, h, k, v, positions, valid, start, l, is_moe)

        r = P()
        layer = self._spmd(layer, (r, P(EXPERT_AXIS), r, r, r, r, r, r, r), (r, r, r, r) if is_moe else (r, r, r))
        return self.compiles.get("prefill_moe" if is_moe else "prefill_dense", layer, args, donate_argnums=(3, 4), fixed=2)

    def _head_fn(self, res, h_last):
        return M.lm_head(res, h_last, self.cfg)[:, 0]

    def _head(self, res, h):
        args = (res, h[:, -1:])
        return self.compiles.get("head", self._head_fn, args, fixed=1)(*args)

    def warmup(self, state, tokens, mask, dec_tokens):
        """Compile the prefill layer steps and the decode step for these shapes (kept out of TTFT/TPOT).

        Prefill's programs come first and the budget is checked on them before the decode step is compiled: where
        prefill is what does not fit (two layer stacks and their temporaries), the re-plan then costs no second
        compile of the decode step, the most expensive one (25-35 s for Qwen1.5-MoE on the H200)."""
        cfg, dev = self.cfg, self._sharding()
        pre = (self.resident, state, tokens, mask)
        h, positions, valid, *_ = jax.eval_shape(self._prefill_pre, *pre)
        self.compiles.get("prefill_pre", self._prefill_pre, pre, fixed=1)

        def sds(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)

        h, positions, valid = sds(h), sds(positions), sds(valid)
        for l in sorted({next((m for m in range(cfg.n_layers) if cfg.moe_layers[m] == flag), None)
                         for flag in (True, False)} - {None}):
            ex = (jax.ShapeDtypeStruct(self.stacks[l].shape, self.dtype, sharding=self._sharding(expert=True))
                  if cfg.moe_layers[l] else None)
            self._prefill_fn(cfg.moe_layers[l], (self.resident.layers[l], ex, h, state.k, state.v, positions, valid,
                                                 state.length, jnp.int32(l)))
        last = sds(jax.ShapeDtypeStruct((h.shape[0], 1, h.shape[2]), h.dtype))
        self.compiles.get("head", self._head_fn, (self.resident, last), fixed=1)
        self._compile_gathers()
        self._check_compiled_budget(state, decode=False)
        self._compile_decode(state, dec_tokens)
        self._check_compiled_budget(state)
        if self.caches is None:
            self.caches = self._build_caches()

    def _compile_gathers(self):
        """Compile prefill's stack assembly (`_gather_stack`) and cache refill (`_refill_tops`) for each (slots,
        split) of the plan that uses them."""
        sds = functools.partial(jax.ShapeDtypeStruct, sharding=self._sharding())
        D = self.cfg.d_model
        for l, lp in enumerate(self.cache_plan.layers):
            if not self.cfg.moe_layers[l]:
                continue
            n = len(lp.cached)
            if self._prefill_partial(lp):
                self.compiles.get("prefill_gather", self._gather_stack, (
                    self.stacks[l], sds((n, lp.split, 3, D), self.dtype),
                    sds((self.e_loc - n,), jnp.int32), sds((n,), jnp.int32)))
            if self._adapts(l):
                self.compiles.get("cache_refill", self._refill_tops, (
                    sds((n, lp.split, 3, D), self.dtype), sds(self.stacks[l].shape, self.dtype),
                    sds((n,), jnp.int32)), donate_argnums=(0,))

    def device_bytes_needed(self, state) -> int:
        """Device bytes at the peak: resident weights, KV cache, top caches, then the larger of prefill (two layer
        stacks plus the largest temporaries of a prefill step; their max on the CPU backend) and decode (its XLA
        temporaries, which hold its copy buffers; `compiled.memory_analysis()`), plus the workspace. Prefill and
        decode never overlap."""
        stacks = 2 * self.stack_bytes
        temps = max(self.compiles.temp_bytes_of(n)
                    for n in ("prefill_pre", "prefill_moe", "prefill_dense", "head", "prefill_gather"))
        # Prefill holds the two stacks and a layer step's temporaries at once (on the H200 the max of the two
        # left the peak 0.1 GiB over the budget). On the CPU backend a bfloat16 prefill's temporaries hold a
        # float32 upcast of the whole stack, which the GPU does not make; there the max is kept so that small
        # budgets stay testable (the prefill activations are budgeted in the fixed part, `activation_bytes`).
        prefill = max(stacks, temps) if self.device.platform == "cpu" else stacks + temps
        return (tree_bytes(self.resident) + tree_bytes(state) + self.cache_bytes()
                + max(prefill, self.compiles.temp_bytes_of("decode")) + self.workspace_bytes())

    def _check_compiled_budget(self, state, decode: bool = True) -> None:
        """Re-plan the caches (at most 3 times) while the compiled steps need more than the budget; raise if they
        still do. decode=False: before the decode step is compiled (its temporaries count as 0 and it is not
        recompiled)."""
        need = self.device_bytes_needed(state)
        auto, granule, profile, hardware = self._plan_args
        for _ in range(3):
            if not (self.vram_budget_bytes is not None and need > self.vram_budget_bytes and auto and self.cache_bytes()):
                break
            # The estimate of the fixed part was short of what XLA allocates: give the caches less and re-plan
            # once (only plans we made ourselves; a user's plan is never changed behind their back).
            over = need - self.vram_budget_bytes + WORKSPACE_MARGIN_BYTES // 8
            log.info("the compiled steps need %.1f MiB more than the estimated fixed part; re-planning the caches "
                        "with %.1f MiB less", over / 2**20, over / 2**20)
            self.cache_budget = max(0, self.cache_budget - over)
            self.model.__dict__.get("_plans", {}).clear()
            self.caches = None  # rebuilt for the new plan (after the compile) by the caller
            self.cache_plan = self._resolve_plan(None, granule, profile, hardware)
            self.splits = tuple(lp.split for lp in self.cache_plan.layers)
            self.compiles.forget("decode")
            for name in ("prefill_gather", "cache_refill"):  # their shapes follow the plan's slots
                self.compiles.forget(name)
            self._compile_gathers()
            if decode:
                self._compile_decode(state, jnp.zeros((state.pos.shape[0],), jnp.int32))
            need = self.device_bytes_needed(state)
        if self.vram_budget_bytes is not None and need > self.vram_budget_bytes:
            raise ValueError(
                f"the compiled steps need {need / 2**30:.3f} GiB on the device (XLA temporaries "
                f"{self.compiles.temp_bytes / 2**30:.3f} GiB), over the VRAM budget of "
                f"{self.vram_budget_bytes / 2**30:.3f} GiB; raise vram_budget or lower max_seq_len/max_batch")

"""Engines: a host `Model` placed on the device for one (policy, VRAM budget), running compiled steps.

Every engine has the interface of `Engine`:

  engine.new_state(batch, max_len)        -> state        (KV cache; checks the budget)
  engine.warmup(state, tokens, mask, dec) compiles the steps for these shapes (kept out of TTFT/TPOT)
  engine.prefill(state, tokens, mask)      -> (logits [B, V], state, counters)
  engine.decode(state, tokens)             -> (logits [B, V], state, counters)

`ResidentEngine` holds every weight on the device. `OffloadEngine` runs a solved `CachePlan` (made before it, by
`runtime/factory.py`): experts in pinned host memory, top caches, the compiled decode step of `offload/decode.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax.io.loading import Model
from moepic_jax.model import grouped
from moepic_jax.offload import cache as C
from moepic_jax.offload import memory, transfer
from moepic_jax.offload.copy_step import StepSpec, fetch_rows
from moepic_jax.offload.decode import RoutingTrace, decode_step
from moepic_jax.offload.memory import parse_budget, resolve_budget, tree_bytes
from moepic_jax.offload.placement import EXPERT_AXIS, P
from moepic_jax.offload.policies import PolicySpec
from moepic_jax.offload.prefill import gather_stack, partial_stack, prefill_layer, prompt_refill, refill_tops
from moepic_jax.offload.store import PlacedWeights
from moepic_jax.planning.profiles import CachePlan
from moepic_jax.runtime.compiled import CompileCache

log = logging.getLogger(__name__)


def device_memory_stats() -> dict | None:
    """`memory_stats()` of the default device; None where the backend does not report it (CPU)."""
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None


class Engine(Protocol):
    """What `generate` needs of an engine (see the module docstring)."""

    policy: str
    vram_budget_bytes: int | None
    compiles: CompileCache

    def new_state(self, batch: int, max_len: int) -> M.KVCache: ...
    def warmup(self, state, tokens, mask, dec_tokens) -> None: ...
    def prefill(self, state, tokens, mask) -> tuple[jax.Array, M.KVCache, dict]: ...
    def decode(self, state, tokens) -> tuple[jax.Array, M.KVCache, dict]: ...


class ResidentEngine:
    """Every weight on the device: the speed ceiling and the exactness reference."""

    policy = "resident"

    def __init__(self, model: Model, vram_budget=None):
        self.cfg = model.cfg  # the model itself is not kept: an engine cache must not keep a dropped model alive
        self.weight_bytes = model.weight_bytes()
        self.dtype = jnp.dtype(model.dtype)
        device = jax.devices()[0]
        budget = parse_budget(vram_budget)
        need = model.weight_bytes()
        # A share of the experts on top of the minimum: all of them are resident here, so any share fits; "auto" on
        # the CPU is host memory: no limit.
        no_limit = budget.kind == "share" or (budget.kind == "auto" and device.platform == "cpu")
        self.vram_budget_bytes = None if no_limit else resolve_budget(budget, need, 0, device)
        self.compiles = CompileCache()
        if self.vram_budget_bytes is not None and need > self.vram_budget_bytes:
            raise ValueError(
                f"policy 'resident' needs all {need / 2**30:.3f} GiB of weights on the device, more than the VRAM "
                f"budget of {self.vram_budget_bytes / 2**30:.3f} GiB; use an offloading policy (e.g. 'moepic')")
        self.params = jax.device_put(model.params, jax.sharding.SingleDeviceSharding(device))
        self.matmul = grouped.matmul_for(device, self.cfg.d_model, self.cfg.d_ff, self.dtype)  # prefill's experts
        self.cache_plan = None

    def fixed_bytes(self, batch: int, max_len: int) -> int:
        return self.weight_bytes + M.kv_cache_bytes(self.cfg, batch, max_len, self.dtype.itemsize)

    def new_state(self, batch: int, max_len: int):
        """A zeroed KV cache for `batch` rows of `max_len` slots ([layers, batch, max_len, kv_heads, head_dim]).

        Raises:
          ValueError: weights + this KV cache exceed the VRAM budget.
        """
        need = self.fixed_bytes(batch, max_len)
        if self.vram_budget_bytes is not None and need > self.vram_budget_bytes:
            raise ValueError(f"weights + KV cache for batch {batch} x {max_len} tokens need {need / 2**30:.3f} GiB, "
                             f"over the VRAM budget of {self.vram_budget_bytes / 2**30:.3f} GiB")
        return M.init_kv_cache(self.cfg, batch, max_len, self.dtype)

    def _step(self, params, cache, tokens, mask):
        logits, cache = M.forward_tokens(params, self.cfg, tokens, mask, cache, last_only=True, matmul=self.matmul)
        return logits[:, -1], cache, {}

    def prefill(self, state, tokens, mask):
        """Run the prompt. tokens, mask: [batch, seq] (mask False = left padding).

        Returns (logits of the last position [batch, vocab] float32, the updated KV cache (the input is donated),
        counters {} (nothing is copied)).
        """
        args = (self.params, state, tokens, mask)
        return self.compiles.get("prefill", self._step, args, donate_argnums=(1,), fixed=1)(*args)

    def _decode_step(self, params, cache, tokens):
        return self._step(params, cache, tokens[:, None], jnp.ones((tokens.shape[0], 1), bool))

    def decode(self, state, tokens):
        """One token per row. tokens: [batch] int32. Returns (logits [batch, vocab] float32, KV cache, {})."""
        args = (self.params, state, tokens)
        return self.compiles.get("decode", self._decode_step, args, donate_argnums=(1,), fixed=1)(*args)

    def warmup(self, state, tokens, mask, dec_tokens):
        """Compile the prefill and decode steps for these shapes (kept out of TTFT/TPOT)."""
        self.compiles.get("prefill", self._step, (self.params, state, tokens, mask), donate_argnums=(1,), fixed=1)
        self.compiles.get("decode", self._decode_step, (self.params, state, dec_tokens), donate_argnums=(1,), fixed=1)


class OffloadEngine:
    """Experts offloaded to pinned host memory; one of the policies ondemand, lru, static, moepic.

    Built by `runtime.factory.make_engine` (`moepic_jax.Engine` is its protocol), which places the weights, checks
    the budget and solves the plan first.

    Args:
      weights: the placed weights (`offload.store.place_weights`).
      spec: the policy (`offload.policies.POLICY_SPECS`).
      plan: the solved `CachePlan` this engine runs (validated here against the model and the cache budget).
      vram_budget_bytes: everything the engine may hold on the device, per device (None: no limit).
      n_predicted: experts predicted per token for the next layer (k').
      max_batch, max_seq_len: the largest KV cache the engine reserves in its budget.
      prefetch: None = as the plan says (`CachePlan.prefetch`); True / False force prediction on / off.
      adapt_to_prompt: static / moepic: during each prefill, refill every layer's slots with the experts the prompt
        routes to most (the experts already cached count as PROMPT_PRIOR_TOKENS extra routed tokens), taking their
        tops from the layer stack that prefill has on the device anyway: no extra H2D bytes, the plan's slot counts
        and splits unchanged (nothing recompiles). Off by default: it raised a 25 % cache's hits from 27 % to 77 %
        with random weights, whose routing follows the prompt, but lowered them from 35 % to 27 % on the trained
        embedded model, whose calibration profile predicts its decode better than the prompt does
        (benchmarks/results/embedded/bench_routing_embedded.md). Ignored by lru (which adapts by itself) and with
        several devices.
      replan: `cache_budget_bytes -> CachePlan`, called at warm-up when the compiled steps need more than the
        estimated fixed part (only for plans the factory made; a user's plan is never changed behind their back).
      routing: a `RoutingTrace` whose routed ids, gate weights and predicted ids the decode step replays instead of
        the routers' (benchmarks: recorded or calibrated routing; the tokens are then meaningless). None: off.
      budget_follows_minimum: the budget was given as the minimum plus a share of the experts (a share, or "auto"
        on the CPU): where the compiled steps need more than the estimated minimum, the budget grows by the
        difference and the caches keep their share, instead of the caches shrinking (`_check_compiled_budget`).
      direct: decode copies experts by DMA on a private stream with no conditional in the step (`offload/transfer`;
        one device and a C++ compiler to build the copy library). Off by default: exact, but on the H100 slower
        than the conditional copy step (`offload/copy_step`) in byte-bound decodes
        (docs/notes/2026-12-07-direct-copies.md).
    Raises:
      ValueError: a plan that does not match the model, a plan bigger than the cache budget; direct=True where
        direct copies are unavailable.
    """

    def __init__(self, weights: PlacedWeights, spec: PolicySpec, plan: CachePlan, vram_budget_bytes: int | None,
                 n_predicted: int, max_batch: int = 1, max_seq_len: int = 1024, prefetch: bool | None = None,
                 adapt_to_prompt: bool = False, replan: Callable[[int], CachePlan] | None = None,
                 routing: RoutingTrace | None = None, budget_follows_minimum: bool = False,
                 direct: bool = False):
        self.weights, self.spec, self.policy = weights, spec, spec.name
        self.cfg, self.dtype, self.place = weights.cfg, weights.dtype, weights.place
        self.store_dtype = jnp.dtype(self.cfg.expert_store_dtype(self.dtype))  # uint8 for quantized experts
        self.stacks, self.resident = weights.stacks, weights.resident
        self.n_predicted = n_predicted
        self.max_batch, self.max_seq_len = int(max_batch), int(max_seq_len)
        self.vram_budget_bytes = vram_budget_bytes
        self._prefetch = prefetch
        self.adapt_to_prompt = adapt_to_prompt
        self.compiles = CompileCache()
        # prefill's grouped matmul; one device only: inside shard_map the kernel has not been run on a GPU yet
        self.matmul = (grouped.matmul_for(self.device, self.cfg.d_model, self.cfg.d_ff, self.dtype)
                       if self.n_dev == 1 else None)
        self.fixed_bytes = self.fixed_bytes_for(self.max_batch, self.max_seq_len, prefetch)
        self.cache_budget = None if vram_budget_bytes is None else vram_budget_bytes - self.fixed_bytes
        self._replan = replan
        self._grow_budget = budget_follows_minimum
        self.cache_plan = self._check_plan(plan)
        if routing is not None:
            routing.check(self.cfg, self.n_predicted)
            routing = jax.device_put(RoutingTrace(*(jnp.asarray(x) for x in routing)), self.place.sharding())
        self.routing = routing
        # The caches are allocated after the decode step is compiled (warmup): XLA's compile-time scratch (GEMM
        # autotuning buffers) then never coincides with full caches on the device.
        self.caches = None
        self.step_count = 0
        self._kv_makers = {}
        # Direct copies (DMA on a private stream, no conditional in the decode step) need one device and the
        # library `transfer` builds; otherwise decode copies in conditionals (`copy_step`).
        self.direct = bool(direct)
        if self.direct and (self.mesh is not None or not transfer.available(self.device)):
            raise ValueError("direct copies are unavailable here ("
                             f"{'several devices' if self.mesh is not None else transfer.unavailable_reason(self.device)}"
                             "); leave direct=False (the conditional copy step)")
        self.srcs = jax.device_put(np.stack([transfer.host_address(s) if s is not None else np.zeros(2, np.int32)
                                             for s in self.stacks]), self.place.sharding()) if self.direct else None

    # ---- what the engine is -------------------------------------------------------------------------
    devices = property(lambda self: list(self.place.devices))
    device = property(lambda self: self.place.device)
    n_dev = property(lambda self: self.place.n_dev)
    e_loc = property(lambda self: self.place.e_loc)
    mesh = property(lambda self: self.place.mesh)

    @property
    def row_bytes(self) -> int:
        """Bytes of one stored neuron of one expert (packed when quantized)."""
        return self.cfg.expert_row_bytes(self.dtype.itemsize)

    @property
    def stack_bytes(self) -> int:
        """One layer's expert stack, per device."""
        return self.e_loc * self.cfg.d_ff * self.row_bytes

    @property
    def splits(self) -> tuple[int, ...]:
        return tuple(lp.split for lp in self.cache_plan.layers)

    @property
    def prefetches(self) -> bool:
        """Whether decode predicts and prefetches the next layer's experts: the policy predicts, k' > 0, and the
        plan keeps prediction (the planner drops it where it does not pay, `planner.solve(prefetch=None)`)."""
        wanted = self.cache_plan.prefetch if self._prefetch is None else self._prefetch
        return self.spec.predicts and self.n_predicted > 0 and wanted

    @property
    def step_spec(self) -> StepSpec:
        """What the compiled steps read of this engine (`offload/copy_step.py`)."""
        return StepSpec(cfg=self.cfg, dtype=self.dtype, splits=self.splits, rule=self.spec.rule,
                        n_predicted=self.n_predicted, prefetch=self.prefetches, place=self.place, direct=self.direct)

    @functools.cached_property
    def replicated_sharding(self) -> jax.sharding.Sharding:
        """Where the engine's logits and KV cache live (every device of the engine)."""
        return self.place.sharding()

    def plan_in_use(self) -> CachePlan:
        """The plan with each layer's cached experts as the slots hold them now (lru, moepic's frequency rule and
        adapt_to_prompt move them; global expert ids) and prefetch as the engine runs it. Reads the slot owners from
        the device."""
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

    # ---- budget -------------------------------------------------------------------------------------
    def fixed_bytes_for(self, batch: int, max_len: int, prefetch: bool | None = None) -> int:
        """Device bytes of everything but the top caches, per device, for a KV cache of batch x max_len tokens.
        prefetch: reserve buffers for the next layer's predicted experts (default: if the policy predicts)."""
        predicts = self.spec.predicts if prefetch is None else prefetch
        return memory.offload_fixed_bytes(self.cfg, self.dtype.itemsize, tree_bytes(self.resident), self.e_loc,
                                   self.n_predicted, predicts, batch, max_len, self.device.platform)

    def workspace_bytes(self) -> int:
        """Device bytes (per device) kept for what is not sized elsewhere (`memory.workspace_bytes`)."""
        return memory.workspace_bytes(self.device.platform, self.stack_bytes)

    def min_budget_bytes(self) -> int:
        """The smallest VRAM budget (bytes) this policy accepts for the reserved batch and length."""
        return self.fixed_bytes

    # ---- plan ---------------------------------------------------------------------------------------
    def _check_plan(self, plan: CachePlan) -> CachePlan:
        cfg = self.cfg
        F, E = cfg.d_ff, cfg.n_experts
        plan.validate(cfg.n_layers, E, F, cfg.moe_layers)
        if not self.spec.allow_split and any(lp.split not in (0, F) for lp in plan.layers):
            raise ValueError(f"policy {self.policy!r} caches whole experts: every split must be 0 or d_ff={F}")
        for l, lp in enumerate(plan.layers):
            counts = np.bincount(np.asarray(lp.cached, np.int64) // self.e_loc, minlength=self.n_dev)
            if self.n_dev > 1 and len(set(counts.tolist())) > 1:
                raise ValueError(f"layer {l} of the plan caches {counts.tolist()} experts on the {self.n_dev} devices; "
                                 f"with several devices each must cache the same number of its own experts "
                                 f"(device d owns experts [d*{self.e_loc}, (d+1)*{self.e_loc}))")
        need = sum(len(lp.cached) * lp.split * self.row_bytes for lp in plan.layers) // self.n_dev  # per device
        if self.cache_budget is not None and need > self.cache_budget:
            raise ValueError(f"the plan's top caches need {need / 2**20:.2f} MiB but only "
                             f"{self.cache_budget / 2**20:.2f} MiB of the VRAM budget is left for caches; raise "
                             "vram_budget or cache fewer experts")
        if plan.model_id and plan.model_id != cfg.identity():
            raise ValueError(f"plan was made for model {plan.model_id}, not this model ({cfg.identity()}); re-plan")
        return plan

    # ---- caches -------------------------------------------------------------------------------------
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
        # from: less allocator slack (memory.ALLOCATOR_SLACK_CHUNKS; -64 MiB for Qwen3-30B-A3B, 24 layers, 25 %).
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
                tops = jnp.zeros((n, s, 3, cfg.expert_row_width), self.store_dtype, device=dev)  # made on dev, not copied there
                for slot, e in enumerate(mine):
                    tops = put(tops, local[dev], jnp.int32(e), jnp.int32(slot), s)
                per_dev.append(jax.device_put(C.init_layer_cache(tops, mine, self.e_loc), dev))
            if self.mesh is None:
                out.append(per_dev[0])
            else:  # one global array per field, each device's block its own cache
                sh = self.place.sharding(expert=True)
                out.append(jax.tree_util.tree_map(
                    lambda shape, *xs: jax.make_array_from_single_device_arrays(shape.shape, sh, list(xs)),
                    shapes[l], *per_dev))
        return tuple(out)

    def _abstract_caches(self):
        """Shapes of the caches `_build_caches` makes (compiling needs only these). With several devices the
        arrays are global: device d holds block d of every field (its n slots, the slot map of its experts)."""
        cfg, out, nd = self.cfg, [], self.n_dev
        sh = self.place.sharding(expert=True)
        for l, lp in enumerate(self.cache_plan.layers):
            if not cfg.moe_layers[l]:
                out.append(None)
                continue
            n, s = (len(lp.cached) // nd, lp.split) if lp.cached and lp.split else (0, max(lp.split, 0))

            def sds(shape, dtype):
                return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

            out.append(C.LayerCache(tops=sds((nd * n, s, 3, cfg.expert_row_width), self.store_dtype),
                                    slot_of=sds((cfg.n_experts,), jnp.int32), owner=sds((nd * n,), jnp.int32),
                                    last_use=sds((nd * n,), jnp.int32), score=sds((cfg.n_experts,), jnp.float32)))
        return tuple(out)

    def _caches_or_shapes(self):
        return self._abstract_caches() if self.caches is None else self.caches

    def cache_bytes(self) -> int:
        """Device bytes of the top caches the plan asks for (allocated or not yet), per device."""
        return sum(tree_bytes(c.tops) for c in self._caches_or_shapes() if c is not None) // self.n_dev

    def _slot_owners(self, layers=None) -> dict:
        """{layer: the expert in each of its cache slots [N] int32 (-1 = empty)} for `layers` (default: every layer
        with slots), in slot order, as the device holds them now (lru, freq and adapt_to_prompt move experts): one
        device read for all."""
        if layers is None:
            layers = [l for l, c in enumerate(self.caches) if c is not None and c.owner.shape[0] > 0]
        return {l: np.asarray(o, np.int32) for l, o in zip(layers, jax.device_get([self.caches[l].owner
                                                                                   for l in layers]))}

    # ---- state ----------------------------------------------------------------------------------------
    def new_state(self, batch: int, max_len: int):
        """A zeroed KV cache for `batch` x `max_len` tokens. Raises ValueError beyond the reserved size."""
        if batch > self.max_batch or max_len > self.max_seq_len:
            raise ValueError(f"this engine reserved a KV cache for batch {self.max_batch} x {self.max_seq_len} tokens; "
                             f"batch {batch} x {max_len} needs a new engine "
                             "(make_engine(..., max_batch=, max_seq_len=))")
        make = self._kv_makers.get((batch, max_len))
        if make is None:  # zeros made in place on the engine's device(s), not on the default one and copied
            make = functools.partial(M.init_kv_cache, self.cfg, batch, max_len, self.dtype)
            make = self._kv_makers[batch, max_len] = jax.jit(make, out_shardings=self.place.sharding())
        return make()

    # ---- decode -------------------------------------------------------------------------------------
    def decode(self, state, tokens):
        """One token per row. tokens: [batch] int32 (on the device).

        Returns (logits [batch, vocab] float32, KV cache (donated input), counters: dict of [n_layers] float32
        arrays full_hits, top_hits, misses, predicted (routed pairs that were prefetched), routed, h2d_bytes,
        prefetch_wasted_bytes (`offload.decode.COUNTERS`)).
        The top caches and the replacement rule's state are updated in place (donated).
        """
        if self.caches is None:
            self.caches = self._build_caches()
        if self.mesh is not None:
            tokens = jax.device_put(tokens, self.replicated_sharding)
        args = (self.resident, self.stacks, self.caches, state, tokens, jnp.int32(self.step_count + 1), self.routing,
                self.srcs)
        exe = self._get_decode(args)
        logits, self.caches, state, counters = exe(*args)
        self.step_count += 1
        return logits, state, counters

    def _decode_program(self):
        """(decode step as one program per device, its output shardings). With several devices the outputs are
        placed explicitly: XLA would hand zero-size cache arrays back replicated, which the next call would
        refuse."""
        r, x = P(), P(EXPERT_AXIS)
        fn = self.place.spmd(functools.partial(decode_step, self.step_spec), (r, x, x, r, r, r, r, r), (r, x, r, r))
        if self.mesh is None:
            return fn, None
        rep, exp = self.place.sharding(), self.place.sharding(expert=True)
        return fn, (rep, exp, rep, rep)

    def _compile_decode(self, state, dec_tokens):
        """Compile the decode step for this KV cache and batch (against the caches' shapes when not built yet)."""
        self._get_decode((self.resident, self.stacks, self._caches_or_shapes(), state, dec_tokens, jnp.int32(0),
                          self.routing, self.srcs))

    def _get_decode(self, args):
        # the program is built only on a compile-cache miss (the key is the shapes, not the spec)
        exe = self.compiles.lookup("decode", args, fixed=3)
        if exe is not None:
            return exe
        fn, out = self._decode_program()
        return self.compiles.get("decode", fn, args, donate_argnums=(2, 3), fixed=3, out_shardings=out)

    # ---- prefill --------------------------------------------------------------------------------------
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

    def _prefill_partial(self, lp) -> bool:
        """Whether prefill assembles this layer's stack from its cache plus copies of the missing rows."""
        return partial_stack(len(lp.cached), lp.split, self.e_loc, self.cfg.d_ff, self.mesh is None)

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
            return (jax.device_put(self.stacks[l], self.place.sharding(expert=True)),
                    self.cfg.n_experts * F * self.row_bytes)
        missing, owners = sources[l]
        tops = self.caches[l].tops
        args = (self.stacks[l], tops, jnp.asarray(missing), jnp.asarray(owners))
        stack = self.compiles.get("prefill_gather", gather_stack, args)(*args)
        return stack, (len(missing) * F + len(owners) * (F - tops.shape[1])) * self.row_bytes

    def _adapts(self, l: int) -> bool:
        lp = self.cache_plan.layers[l]
        return (self.adapt_to_prompt and self.spec.adapts_to_prompt and self.mesh is None and len(lp.cached) > 0
                and lp.split > 0 and len(lp.cached) < self.e_loc)

    def _refill_from_prompt(self, l: int, stack, counts, owner: np.ndarray):
        """Re-pick layer l's cached experts (now `owner` [N], slot order) from the prompt's routing `counts` [E]
        (routed tokens per expert) and copy their tops from `stack` ([E, F, 3, D], layer l's experts on the device
        during prefill). Slots whose expert stays keep it; the others take the newcomers, hottest first. The
        frequency rule's scores restart at zero: starting them from the counts did not raise its hits in the replay
        (benchmarks/experiments/sim_replacement.py, `freq-seeded`, from the calibration profile: 47.0 against 47.5 %
        at 25 %)."""
        cache = self.caches[l]
        new_owner = prompt_refill(np.asarray(jax.device_get(counts)), owner)
        if np.array_equal(new_owner, owner):
            return
        owner = new_owner
        args = (cache.tops, stack, jnp.asarray(owner))
        tops = self.compiles.get("cache_refill", refill_tops, args, donate_argnums=(0,))(*args)
        new_cache = jax.device_put(C.init_layer_cache(tops, owner.tolist(), self.e_loc), self.device)
        self.caches = self.caches[:l] + (new_cache,) + self.caches[l + 1:]

    def _prefill_pre(self, res, state, tokens, mask):
        # Only the bookkeeping leaves the program: returning the KV cache would make the compiled executable copy
        # k and v (one more KV cache on the device through prefill, 0.19 GiB for Qwen1.5-MoE at 1024 tokens).
        positions, valid, new_kv = M.cache_positions(state, mask)
        return M.embed(res, tokens), positions, valid, new_kv.pos, new_kv.length

    def _prefill_fn(self, is_moe: bool, args):
        layer = functools.partial(prefill_layer, self.step_spec, is_moe, self.matmul)
        r = P()
        layer = self.place.spmd(layer, (r, P(EXPERT_AXIS), r, r, r, r, r, r, r),
                                (r, r, r, r) if is_moe else (r, r, r))
        return self.compiles.get("prefill_moe" if is_moe else "prefill_dense", layer, args, donate_argnums=(3, 4),
                                 fixed=2)

    def _head_fn(self, res, h_last):
        return M.lm_head(res, h_last, self.cfg)[:, 0]

    def _head(self, res, h):
        args = (res, h[:, -1:])
        return self.compiles.get("head", self._head_fn, args, fixed=1)(*args)

    # ---- warm-up --------------------------------------------------------------------------------------
    def warmup(self, state, tokens, mask, dec_tokens):
        """Compile the prefill layer steps and the decode step for these shapes (kept out of TTFT/TPOT).

        Prefill's programs come first and the budget is checked on them before the decode step is compiled: where
        prefill is what does not fit (two layer stacks and their temporaries), the re-plan then costs no second
        compile of the decode step, the most expensive one (25-35 s for Qwen1.5-MoE on the H200)."""
        cfg, dev = self.cfg, self.place.sharding()
        pre = (self.resident, state, tokens, mask)
        h, positions, valid, *_ = jax.eval_shape(self._prefill_pre, *pre)
        self.compiles.get("prefill_pre", self._prefill_pre, pre, fixed=1)

        def sds(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev)

        h, positions, valid = sds(h), sds(positions), sds(valid)
        for l in sorted({next((m for m in range(cfg.n_layers) if cfg.moe_layers[m] == flag), None)
                         for flag in (True, False)} - {None}):
            ex = (jax.ShapeDtypeStruct(self.stacks[l].shape, self.store_dtype, sharding=self.place.sharding(expert=True))
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
        """Compile prefill's stack assembly (`gather_stack`) and cache refill (`refill_tops`) for each (slots,
        split) of the plan that uses them."""
        sds = functools.partial(jax.ShapeDtypeStruct, sharding=self.place.sharding())
        D, dt = self.cfg.expert_row_width, self.store_dtype
        for l, lp in enumerate(self.cache_plan.layers):
            if not self.cfg.moe_layers[l]:
                continue
            n = len(lp.cached)
            if self._prefill_partial(lp):
                self.compiles.get("prefill_gather", gather_stack, (
                    self.stacks[l], sds((n, lp.split, 3, D), dt),
                    sds((self.e_loc - n,), jnp.int32), sds((n,), jnp.int32)))
            if self._adapts(l):
                self.compiles.get("cache_refill", refill_tops, (
                    sds((n, lp.split, 3, D), dt), sds(self.stacks[l].shape, dt),
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
        if self._grow_budget and self.vram_budget_bytes is not None and need > self.vram_budget_bytes:
            # "minimum + share": the minimum was an estimate; the share of the experts is what the user asked for.
            log.info("the compiled steps need %.1f MiB more than the estimated minimum; the budget grows by as much",
                     (need - self.vram_budget_bytes) / 2**20)
            self.vram_budget_bytes = need
            return
        for _ in range(3):
            if not (self.vram_budget_bytes is not None and need > self.vram_budget_bytes and self._replan is not None
                    and self.cache_bytes()):
                break
            # The estimate of the fixed part was short of what XLA allocates: give the caches less and re-plan.
            over = need - self.vram_budget_bytes + memory.WORKSPACE_MARGIN_BYTES // 8
            log.info("the compiled steps need %.1f MiB more than the estimated fixed part; re-planning the caches "
                     "with %.1f MiB less", over / 2**20, over / 2**20)
            self.cache_budget = max(0, self.cache_budget - over)
            self.caches = None  # rebuilt for the new plan (after the compile) by the caller
            self.cache_plan = self._check_plan(self._replan(self.cache_budget))
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

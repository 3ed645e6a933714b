"""Engines: place a host `Model` on the device for one (policy, VRAM budget) and run compiled steps.

This file starts with the `resident` policy (every weight on the device); the offloading policies
are added by `offload.py` and share this interface:

  engine.new_state(batch, max_len)        -> state        (KV cache + policy state; checks the budget)
  engine.prefill(state, tokens, mask)      -> (logits [B, V], state, counters)
  engine.decode(state, tokens)             -> (logits [B, V], state, counters)

Compiled executables are built ahead of time (`jit(...).lower(...).compile()`) and cached by input
shapes, so compile time is measured apart from TTFT/TPOT and counted in `compile_count`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import grouped
from moepic_jax import model as M
from moepic_jax.budget import parse_budget
from moepic_jax.weights import Model

POLICIES = ("resident", "ondemand", "lru", "static", "moepic")


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def device_memory_stats() -> dict | None:
    """`memory_stats()` of the default device; None where the backend does not report it (CPU)."""
    try:
        return jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None


class CompileCache:
    """AOT-compiled executables keyed by (name, input shapes); counts compiles and their seconds."""

    def __init__(self):
        self._fns: dict[Any, Any] = {}
        self.count = 0
        self.seconds_by_name: dict[str, float] = {}  # compile seconds per program name (where compile time goes)
        self._temps: dict[Any, int] = {}  # XLA temporary bytes of each compiled step (memory_analysis)

    def get(self, name: str, fn: Callable, args: tuple, donate_argnums=(), fixed: int = 0, out_shardings=None) -> Any:
        """The executable of `fn` for these arguments, compiled on first use.

        The first `fixed` arguments have the same shapes at every call of `name` on one engine (weights, host
        stacks, caches), so only the others enter the key: computing a key over hundreds of weight leaves on
        every decode step would cost milliseconds of host time per token. out_shardings: as for `jax.jit` (None =
        XLA's choice).
        """
        key = (name, tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(args[fixed:])))
        exe = self._fns.get(key)
        if exe is None:
            t0 = time.perf_counter()
            jit_kw = {} if out_shardings is None else {"out_shardings": out_shardings}
            exe = jax.jit(fn, donate_argnums=donate_argnums, **jit_kw).lower(*args).compile()
            self.seconds_by_name[name] = self.seconds_by_name.get(name, 0.0) + time.perf_counter() - t0
            self.count += 1
            try:
                self._temps[key] = int(exe.memory_analysis().temp_size_in_bytes)
            except Exception:  # noqa: BLE001 - memory_analysis is not available on every backend
                pass
            self._fns[key] = exe
        return exe


    @property
    def seconds(self) -> float:
        """Compile seconds of every program so far."""
        return sum(self.seconds_by_name.values())

    @property
    def temp_bytes(self) -> int:
        """Largest XLA temporary allocation of the compiled steps kept."""
        return max(self._temps.values(), default=0)

    def temp_bytes_of(self, name: str) -> int:
        """Largest XLA temporary allocation among the compiled executables of `name` (0 if none)."""
        return max((v for k, v in self._temps.items() if k[0] == name), default=0)

    def forget(self, name: str) -> None:
        """Drop the executables of `name` (e.g. a decode step whose plan changed)."""
        for key in [k for k in self._fns if k[0] == name]:
            del self._fns[key]
            self._temps.pop(key, None)


class ResidentEngine:
    """Every weight on the device: the speed ceiling and the exactness reference."""

    policy = "resident"

    def __init__(self, model: Model, vram_budget=None):
        self.model = model
        self.cfg = model.cfg
        self.dtype = jnp.dtype(model.dtype)
        self.vram_budget_bytes = parse_budget(vram_budget, model.weight_bytes())
        self.compiles = CompileCache()
        need = model.weight_bytes()
        if self.vram_budget_bytes is not None and need > self.vram_budget_bytes:
            raise ValueError(
                f"policy 'resident' needs all {need / 2**30:.3f} GiB of weights on the device, more than the VRAM "
                f"budget of {self.vram_budget_bytes / 2**30:.3f} GiB; use an offloading policy (e.g. 'moepic')")
        device = jax.devices()[0]
        self.params = jax.device_put(model.params, jax.sharding.SingleDeviceSharding(device))
        self.matmul = grouped.matmul_for(device, self.cfg.d_model, self.cfg.d_ff, self.dtype)  # prefill's experts
        self.cache_plan = None

    def fixed_bytes(self, batch: int, max_len: int) -> int:
        return self.model.weight_bytes() + M.kv_cache_bytes(self.cfg, batch, max_len, self.dtype.itemsize)

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


def make_engine(model: Model, policy: str = "moepic", vram_budget=None, plan=None, **kw):
    """Build the engine of `policy` for `model` under `vram_budget` (see `budget.parse_budget`).

    Raises:
      ValueError: unknown policy; a budget below what the policy needs (the message names the minimum).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy == "resident":
        devices = kw.get("devices")
        if devices is not None and (devices != 1 if isinstance(devices, int) else len(list(devices)) != 1):
            raise ValueError("policy 'resident' runs on one device; to spread the experts over several devices use an "
                             "offloading policy (e.g. policy='moepic', devices=2)")
        return ResidentEngine(model, vram_budget)
    from moepic_jax.offload import OffloadEngine

    return OffloadEngine(model, policy=policy, vram_budget=vram_budget, plan=plan, **kw)

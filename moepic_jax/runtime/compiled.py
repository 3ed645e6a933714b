"""Compiled executables built ahead of time (`jit(...).lower(...).compile()`) and kept by input shapes, so compile
time is measured apart from TTFT/TPOT and counted in `compile_count`."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax


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
        key = self._key(name, args, fixed)
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

    @staticmethod
    def _key(name: str, args: tuple, fixed: int):
        return name, tuple((x.shape, str(x.dtype)) for x in jax.tree_util.tree_leaves(args[fixed:]))

    def lookup(self, name: str, args: tuple, fixed: int = 0) -> Any | None:
        """The executable `get` would return, or None when it is not compiled yet (nothing is built)."""
        return self._fns.get(self._key(name, args, fixed))

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

"""Device memory: the VRAM budget, and the bytes of everything an offloading engine holds besides its caches.

The budget (DESIGN.md, "Public API contract") is everything an engine may hold on the device. It is given as
  bytes:   an int, or a string with a unit: "6GiB" (2^30), "500MB" (10^6), "1.5 GiB";
  a share: "40%" or a float 0.4: the engine's minimum plus that share of the experts' bytes, that is "how much of
           the experts the cache may hold" (one meaning in the API, the CLI, the benchmarks and the README);
  "auto":  on a GPU the device's free memory less AUTO_GPU_MARGIN (and the model runs resident when it fits);
           on the CPU the minimum plus AUTO_CPU_SHARE of the expert bytes, so that a demo offloads and caches;
  None:    no limit.
The minimum (the fixed part: resident weights, KV cache, copy buffers, activations, workspace) comes off first; the
rest is the cache budget the planner fills.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re

import jax
import numpy as np

from moepic_jax.model.kv_cache import kv_cache_bytes

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNIT_NAMES = {k: k.upper().replace("I", "i") if k else "" for k in _UNITS}  # "gib" -> "GiB", "mb" -> "MB"
AUTO_CPU_SHARE = 0.25  # "auto" on the CPU: the minimum plus this share of the expert bytes
AUTO_GPU_MARGIN_BYTES = 2**30  # "auto" on a GPU: free memory less this (and less 5 %), for other users of the GPU
AUTO_GPU_MARGIN_SHARE = 0.05


@dataclasses.dataclass(frozen=True)
class Budget:
    """A VRAM budget as the user gave it (`parse_budget`); `resolve_budget` turns it into bytes."""

    kind: str  # "bytes" | "share" | "auto" | "none"
    value: float = 0.0  # bytes (kind "bytes") or the share of the expert bytes in [0, 1] (kind "share")
    unit: str = ""  # the unit typed ("GiB", "MB"; "" for an int), so that messages answer in the same form

    def describe(self, nbytes: int, up: bool = False) -> str:
        """`nbytes` in the unit the user typed (GiB for shares and auto), to the thousandth (rounded up: `up`)."""
        unit = self.unit if self.kind == "bytes" else "GiB"
        if not unit:
            return str(int(nbytes))
        x = nbytes / _UNITS[unit.lower()]
        return f"{math.ceil(x * 1000) / 1000 if up else x:.3f}{unit}"


def parse_budget(budget) -> Budget:
    """Read a VRAM budget (see the module docstring). An existing `Budget` is returned as is.

    Raises:
      ValueError: a negative or zero byte count, a share outside [0, 1] (0-100 %), or a string that is none of
        "<number><unit>" (B/KB/MB/GB/TB/KiB/MiB/GiB/TiB), "<number>%", "auto", "none".
    """
    if isinstance(budget, Budget):
        return budget
    if budget is None:
        return Budget("none")
    if isinstance(budget, bool):
        raise ValueError(f"vram_budget must be bytes, a share, 'auto' or a string like '6GiB'; got {budget!r}")
    if isinstance(budget, numbers.Integral):
        if int(budget) <= 0:
            raise ValueError(f"vram_budget must be > 0 bytes, got {budget}")
        return Budget("bytes", int(budget))
    if isinstance(budget, numbers.Real):
        if not 0.0 <= float(budget) <= 1.0:
            raise ValueError(f"a float vram_budget is a share of the expert bytes in [0, 1]; got {budget} "
                             "(pass an int for bytes, or a string like '6GiB')")
        return Budget("share", float(budget))
    if isinstance(budget, str):
        s = budget.strip().replace(" ", "")
        if s.lower() in ("auto", "none"):
            return Budget(s.lower())
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)%", s)
        if m:
            share = float(m[1]) / 100
            if not 0.0 <= share <= 1.0:
                raise ValueError(f"a percentage vram_budget is the share of the expert bytes the cache may hold, in "
                                 f"[0, 100]%; got {budget!r}")
            return Budget("share", share)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)([A-Za-z]*)", s)
        if m and m[2].lower() in _UNITS:
            n = int(float(m[1]) * _UNITS[m[2].lower()])
            if n <= 0:
                raise ValueError(f"vram_budget must be > 0, got {budget!r}")
            return Budget("bytes", n, _UNIT_NAMES[m[2].lower()])
    raise ValueError(f"cannot read vram_budget {budget!r}; use 'auto', bytes (int), '6GiB', '500MB', a share of the "
                     "expert bytes ('40%' or 0.4), or 'none'")


def free_device_bytes(device) -> int | None:
    """Free memory of `device` in bytes (its allocator's limit less what is in use); None where not reported."""
    try:
        st = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        return None
    if not st or "bytes_limit" not in st:
        return None
    return int(st["bytes_limit"]) - int(st.get("bytes_in_use", 0))


def resolve_budget(budget: Budget, minimum: int, expert_bytes: int, device) -> int | None:
    """The budget in bytes (None: no limit) for an engine whose minimum is `minimum` bytes and whose experts take
    `expert_bytes` (per device). See the module docstring."""
    if budget.kind == "none":
        return None
    if budget.kind == "bytes":
        return int(budget.value)
    if budget.kind == "share":
        return minimum + int(budget.value * expert_bytes)
    free = free_device_bytes(device) if device.platform != "cpu" else None
    if free is None:
        return minimum + int(AUTO_CPU_SHARE * expert_bytes)
    return int(free * (1 - AUTO_GPU_MARGIN_SHARE)) - AUTO_GPU_MARGIN_BYTES


def below_minimum(budget: Budget, nbytes: int, minimum: int, what: str) -> ValueError:
    """The error for a budget below the minimum: it names the minimum, the smallest value in the form the user
    typed, and the share form that always fits."""
    return ValueError(f"VRAM budget {budget.describe(nbytes)} ({nbytes / 2**30:.3f} GiB) is below the minimum of "
                      f"{minimum / 2**30:.3f} GiB for {what}; pass at least {budget.describe(minimum, up=True)}, or a "
                      "share such as 25% (the minimum plus 25 % of the expert bytes), or 'auto'")


WORKSPACE_MARGIN_BYTES = 8 * 2**20  # small temporaries, counters and allocator slack beyond what is sized below
# The GPU allocator (BFC) hands out a whole free chunk when under 128 MiB (and under the request) would remain, and
# that slack counts as in use for the buffer's life. The caches' slot arrays kept 216 MiB of it for Qwen3-30B-A3B
# (24 layers, 25 %): three arrays with 120, 32 and 64 MiB more than asked. Reserving the caches in one chunk first
# (the engine's cache build) left two, 152 MiB, served from holes that earlier transients had left
# (benchmarks/results/archive/probe_prefill_memory_qwen3_lru*.json). On an accelerator the budget counts this many
# chunks of slack, each at most 128 MiB or one layer stack (the largest slot array), whichever is less. Not on the
# CPU backend.
ALLOCATOR_SLACK_CHUNKS = 2
ALLOCATOR_MAX_SLACK_BYTES = 128 * 2**20


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def activation_bytes(cfg, batch: int, max_len: int, dtype_bytes: int) -> int:
    """Largest activations of a prefill over `max_len` tokens (bytes): attention scores and probabilities
    ([B, H, T, S] float32), one expert's SwiGLU intermediates ([N, F] float32 x 3, experts scanned one at a
    time), the residual stream and its float32 accumulators ([N, D] x 6), the last-token logits; with quantized
    experts also one expert dequantized in float32 ([F, 3, D], prefill's scan dequantizes one at a time)."""
    n = batch * max_len
    attn = 2 * batch * cfg.n_heads * max_len * max_len * 4
    ffn = 3 * n * max(cfg.d_ff, cfg.dense_d_ff, cfg.shared_d_ff) * 4
    stream = 6 * n * cfg.d_model * 4 + n * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * dtype_bytes
    dequant = cfg.d_ff * 3 * cfg.d_model * 4 if cfg.expert_quant is not None else 0
    return attn + ffn + stream + batch * cfg.vocab_size * 4 + dequant


def workspace_bytes(platform: str, stack_bytes: int) -> int:
    """Device bytes (per device) kept for what is not sized elsewhere: WORKSPACE_MARGIN_BYTES, plus on an
    accelerator the allocator's slack (ALLOCATOR_SLACK_CHUNKS chunks of at most one layer stack of `stack_bytes`)."""
    if platform == "cpu":
        return WORKSPACE_MARGIN_BYTES
    return WORKSPACE_MARGIN_BYTES + ALLOCATOR_SLACK_CHUNKS * min(ALLOCATOR_MAX_SLACK_BYTES, stack_bytes)


def offload_fixed_bytes(cfg, dtype_bytes: int, resident_bytes: int, e_loc: int, n_predicted: int, predicts: bool,
                        batch: int, max_len: int, platform: str) -> int:
    """Device bytes of everything but the top caches, per device, for a KV cache of batch x max_len tokens: the
    resident weights, the KV cache, copy buffers (decode: routed + predicted experts of two layers in flight;
    prefill: two layer stacks), prefill activations and the workspace (`workspace_bytes`)."""
    expert = cfg.expert_bytes(dtype_bytes)  # as stored: packed bytes for quantized experts
    stack = e_loc * expert
    U = min(batch * cfg.top_k, e_loc)
    Pn = min(batch * n_predicted, e_loc) if predicts else 0
    kv = kv_cache_bytes(cfg, batch, max_len, dtype_bytes)
    buffers = max(2 * (U + Pn) * expert, 2 * stack)
    acts = activation_bytes(cfg, batch, max_len, dtype_bytes)
    return resident_bytes + kv + buffers + acts + workspace_bytes(platform, stack)

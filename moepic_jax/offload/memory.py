"""Device memory: the VRAM budget, and the bytes of everything an offloading engine holds besides its caches.

Budget (DESIGN.md, "Public API contract"): an int is bytes; a float in (0, 1] is a fraction of the model's total
weight bytes; strings "6GiB" (2^30), "500MB" (10^6), "40%" (of total weight bytes); None means no limit.
The fixed part (resident weights, KV cache, copy buffers, activations, workspace) comes off the budget first; the
rest is the cache budget the planner fills.
"""

from __future__ import annotations

import numbers
import re

import jax
import numpy as np

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(budget, total_weight_bytes: int) -> int | None:
    """Return the budget in bytes (or None for no limit).

    Raises:
      ValueError: a negative or zero budget, a float outside (0, 1], or a string that is not
        "<number><unit>" with unit in B/KB/MB/GB/TB/KiB/MiB/GiB/TiB or "<number>%".
    """
    if budget is None:
        return None
    if isinstance(budget, bool):
        raise ValueError(f"vram_budget must be bytes, a fraction, or a string like '6GiB'; got {budget!r}")
    if isinstance(budget, numbers.Integral):
        budget = int(budget)
        if budget <= 0:
            raise ValueError(f"vram_budget must be > 0 bytes, got {budget}")
        return budget
    if isinstance(budget, numbers.Real):
        budget = float(budget)
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float vram_budget is a fraction of the weights in (0, 1]; got {budget} "
                             "(pass an int for bytes, or a string like '6GiB')")
        return int(budget * total_weight_bytes)
    if isinstance(budget, str):
        s = budget.strip().replace(" ", "")
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)%", s)
        if m:
            frac = float(m[1]) / 100
            if not 0.0 < frac <= 1.0:
                raise ValueError(f"a percentage vram_budget must be in (0, 100]%, got {budget!r}")
            return int(frac * total_weight_bytes)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)([A-Za-z]*)", s)
        if m and m[2].lower() in _UNITS:
            n = int(float(m[1]) * _UNITS[m[2].lower()])
            if n <= 0:
                raise ValueError(f"vram_budget must be > 0, got {budget!r}")
            return n
    raise ValueError(f"cannot read vram_budget {budget!r}; use bytes (int), a fraction (0.4), '6GiB', '500MB' or '40%'")


WORKSPACE_MARGIN_BYTES = 8 * 2**20  # small temporaries, counters and allocator slack beyond what is sized below
# The GPU allocator (BFC) hands out a whole free chunk when under 128 MiB (and under the request) would remain, and
# that slack counts as in use for the buffer's life. The caches' slot arrays kept 216 MiB of it for Qwen3-30B-A3B
# (24 layers, 25 %): three arrays with 120, 32 and 64 MiB more than asked. Reserving the caches in one chunk first
# (the engine's cache build) left two, 152 MiB, served from holes that earlier transients had left
# (benchmarks/results/probe_prefill_memory_qwen3_lru*.json). On an accelerator the budget counts this many chunks of
# slack, each at most 128 MiB or one layer stack (the largest slot array), whichever is less. Not on the CPU backend.
ALLOCATOR_SLACK_CHUNKS = 2
ALLOCATOR_MAX_SLACK_BYTES = 128 * 2**20


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a pytree."""
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree)))


def activation_bytes(cfg, batch: int, max_len: int, dtype_bytes: int) -> int:
    """Largest activations of a prefill over `max_len` tokens (bytes): attention scores and probabilities
    ([B, H, T, S] float32), one expert's SwiGLU intermediates ([N, F] float32 x 3, experts scanned one at a
    time), the residual stream and its float32 accumulators ([N, D] x 6), the last-token logits."""
    n = batch * max_len
    attn = 2 * batch * cfg.n_heads * max_len * max_len * 4
    ffn = 3 * n * max(cfg.d_ff, cfg.dense_d_ff, cfg.shared_d_ff) * 4
    stream = 6 * n * cfg.d_model * 4 + n * (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim * dtype_bytes
    return attn + ffn + stream + batch * cfg.vocab_size * 4


def workspace_bytes(platform: str, stack_bytes: int) -> int:
    """Device bytes (per device) kept for what is not sized elsewhere: WORKSPACE_MARGIN_BYTES, plus on an
    accelerator the allocator's slack (ALLOCATOR_SLACK_CHUNKS chunks of at most one layer stack of `stack_bytes`)."""
    if platform == "cpu":
        return WORKSPACE_MARGIN_BYTES
    return WORKSPACE_MARGIN_BYTES + ALLOCATOR_SLACK_CHUNKS * min(ALLOCATOR_MAX_SLACK_BYTES, stack_bytes)

"""VRAM budget parsing (DESIGN.md, "Public API contract").

An int is bytes; a float in (0, 1] is a fraction of the model's total weight bytes; strings
"6GiB" (2^30), "500MB" (10^6), "40%" (of total weight bytes); None means no limit.
"""

from __future__ import annotations

import numbers
import re

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

"""The statistics of one `generate` call: timing (TTFT, TPOT), hit rates, H2D bytes, predictor recall, per layer.

TTFT: time to first token, from the call (compiled steps ready) to the first new token. TPOT: time per output token,
the median over decode steps. Hit rates are shares of routed (token, expert) pairs: a full hit has the whole expert
on the device, a top-only hit its top segment (the bottom is copied), a miss copies everything. Recall: the share of
routed pairs the next-layer predictor had named (layer 0 is never predicted).
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

from moepic_jax.offload.policies import POLICY_SPECS
from moepic_jax.runtime.engine import device_memory_stats


@dataclasses.dataclass
class LayerStats:
    """Per decoder layer, over decoded tokens: shares of routed experts, bytes, recall."""

    layer: int
    full_hit_rate: float
    top_only_hit_rate: float
    miss_rate: float
    h2d_bytes_per_token: float
    predictor_recall: float


@dataclasses.dataclass
class GenerateStats:
    """Timing and offloading statistics of one `generate` call (DESIGN.md, "Public API contract").

    Times in seconds; `tpot_s` is the median time per output token over decode steps, `ttft_s` the time
    from the call (compiled steps ready) to the first token; compile time is in `compile_s`, apart. `setup_s`: what
    the call spent before the prompt's prefill (building or reusing the engine: placement, profiling, planning,
    compiling or loading the compiled steps), so the call's first token came `setup_s + ttft_s` after it began.
    Hit rates are shares of routed (token, expert) pairs over decode steps. NaN where not applicable.
    """

    policy: str
    vram_budget_bytes: int | None
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    tpot_s: float
    tpot_p90_s: float
    tokens_per_s: float
    h2d_bytes_per_token: float
    full_hit_rate: float
    top_only_hit_rate: float
    miss_rate: float
    predictor_recall: float
    per_layer: list[LayerStats]
    compile_count: int
    compile_s: float
    peak_device_bytes: int | None
    prefill_h2d_bytes: float = 0.0
    prefetch_wasted_bytes_per_token: float = 0.0  # H2D bytes of predicted experts that were not routed
    setup_s: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: TTFT, TPOT, hit rate, H2D MB per token, recall, policy, budget ("-" where not applicable)."""
        b = "none" if self.vram_budget_bytes is None else f"{self.vram_budget_bytes / 2**30:.3g} GiB"

        def pct(x):
            return "-" if x != x else f"{x:.1%}"

        return (f"policy={self.policy} budget={b} TTFT={self.ttft_s * 1e3:.1f} ms TPOT={self.tpot_s * 1e3:.2f} ms "
                f"({self.tokens_per_s:.1f} tok/s) hit={pct(self.full_hit_rate + self.top_only_hit_rate)} "
                f"(full {pct(self.full_hit_rate)}) H2D={self.h2d_bytes_per_token / 1e6:.2f} MB/token "
                f"recall={pct(self.predictor_recall)} compiles={self.compile_count} ({self.compile_s:.1f} s)")

    def timing(self) -> str:
        """One line of where the time went: compile, TTFT, TPOT, tokens/s and the H2D rate of the decode."""
        gbps = self.h2d_bytes_per_token / self.tpot_s / 1e9 if self.tpot_s == self.tpot_s and self.tpot_s else 0.0
        return (f"compile {self.compile_s:.1f} s, TTFT {self.ttft_s * 1e3:.1f} ms, TPOT {self.tpot_s * 1e3:.2f} ms, "
                f"{self.tokens_per_s:.1f} tok/s, H2D {gbps:.2f} GB/s")


def collect_stats(engine, cfg, batch, prompt_tokens, out, ttft, step_times, counters, c_prefill,
                  compiles0) -> GenerateStats:
    """The `GenerateStats` of one call: counters [steps] of {name: [n_layers]} summed over steps and rows."""
    n_new = sum(len(o) for o in out)
    tpot = statistics.median(step_times) if step_times else float("nan")
    p90 = float(np.percentile(step_times, 90)) if step_times else float("nan")
    L = cfg.n_layers
    agg = {}
    for c in counters:
        for k, v in c.items():
            agg[k] = agg.get(k, 0) + np.asarray(v, np.float64)
    steps = max(len(counters), 1) * batch  # decoded tokens: every row decodes at every step
    per_layer = []
    nan = float("nan")
    routed = agg.get("routed", np.zeros(L))
    for l in range(L):
        r = routed[l] if l < len(routed) else 0
        per_layer.append(LayerStats(
            layer=l,
            full_hit_rate=float(agg["full_hits"][l] / r) if r else nan,
            top_only_hit_rate=float(agg["top_hits"][l] / r) if r else nan,
            miss_rate=float(agg["misses"][l] / r) if r else nan,
            h2d_bytes_per_token=float(agg["h2d_bytes"][l] / steps) if "h2d_bytes" in agg else 0.0,
            predictor_recall=float(agg["predicted"][l] / r) if r and l > 0 and "predicted" in agg
            and getattr(engine, "prefetches", False) else nan,
        ))
    tot = float(routed.sum()) if len(counters) else 0.0
    if tot and "full_hits" in agg:
        full, top, miss = (float(agg[k].sum() / tot) for k in ("full_hits", "top_hits", "misses"))
        pred_routed = float(routed[1:].sum())
        prefetches = getattr(engine, "prefetches", False)
        recall = float(agg["predicted"][1:].sum() / pred_routed) if pred_routed and prefetches else nan
    elif not POLICY_SPECS[engine.policy].offloads:
        full, top, miss, recall = 1.0, 0.0, 0.0, nan
    else:
        full = top = miss = recall = nan
    h2d = float(agg["h2d_bytes"].sum() / steps) if "h2d_bytes" in agg else 0.0
    wasted = float(agg["prefetch_wasted_bytes"].sum() / steps) if "prefetch_wasted_bytes" in agg else 0.0
    mem = device_memory_stats()
    return GenerateStats(
        policy=engine.policy,
        vram_budget_bytes=engine.vram_budget_bytes,
        prompt_tokens=prompt_tokens,
        new_tokens=n_new,
        ttft_s=ttft,
        tpot_s=tpot,
        tpot_p90_s=p90,
        tokens_per_s=batch / tpot if step_times else float("nan"),
        h2d_bytes_per_token=h2d,
        full_hit_rate=full,
        top_only_hit_rate=top,
        miss_rate=miss,
        predictor_recall=recall,
        per_layer=per_layer,
        compile_count=engine.compiles.count - compiles0[0],
        compile_s=engine.compiles.seconds - compiles0[1],
        peak_device_bytes=None if not mem else int(mem.get("peak_bytes_in_use", 0)) or None,
        prefill_h2d_bytes=float(np.sum(np.asarray(c_prefill.get("h2d_bytes", 0.0)))) if c_prefill else 0.0,
        prefetch_wasted_bytes_per_token=wasted,
    )

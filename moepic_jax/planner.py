"""Cache planner: per-layer split point and cached experts under one VRAM budget (NumPy only).

MoEpic (Yan et al., arXiv 2509.08342) splits every expert along its neurons into a *top* segment (first `s`
neurons) and a *bottom* segment (the other `f - s`), keeps the top segments of hot experts on the device and
copies the rest host->device per token, prefetching the experts predicted for the next layer. This module picks,
for every decoder layer `l`, the split `s_l` and the number `N_l` of cached experts (the `N_l` most frequent ones)
so that the predicted time per output token (TPOT) is smallest under the cache budget. It follows the paper's
divide-and-conquer / fixed-point cache configuration (its "adaptive cache configuration" section); how the
fixed point simplifies under this cost model is explained below.

Notation (one decoder layer `l`, batch 1 decode)
------------------------------------------------
  E experts, k = top_k routed per token, f = d_ff neurons, d = d_model,
  beta = 3 * d * dtype_bytes            bytes of one neuron row (gate column, up column, down row),
  p[l, e]                               probability that expert e is routed for a token (row sums to k),
  C_l, s_l, N_l = |C_l|                 cached experts, split, slots; P_l = sum_{e in C_l} p[l, e],
  rho_l                                 predictor recall (share of routed experts that were predicted; NaN = layer
                                        not predicted, e.g. layer 0 or no data -> no prefetch at all),
  k' = n_predicted (0 means k)          experts the predictor prefetches per layer,
  L_c = h2d_latency_s, B = h2d_bandwidth_Bps, c_l = layer_compute_s[l], a = window_fraction (or
  cond_window_fraction, see "Data-dependent copies"), o = cond_overhead_s.

Cost model
----------
Each routed expert costs at most ONE copy: a full hit (cached and s_l = f) copies nothing, a top-only hit
(cached, s_l < f) copies its bottom `(f - s_l) * beta` bytes, a miss copies the whole `f * beta` bytes. A layer
issues its copies together, in one copy step: they stream back to back over the link, so the fixed cost L_c of
the affine copy curve (HardwareProfile.copy_time_s) is paid once per step that copies anything, not per copy
(the H200 decode fits this, benchmarks/results/README.md "Planner validation"). With byte times

    t_miss   = f * beta / B
    t_hit_l  = 0 if s_l == f else (f - s_l) * beta / B

the expected copies, bytes and copy time per token of layer l's routed experts are

    n_l = k - P_l * [s_l == f]                                    (copies)
    b_l = beta * (k * f - s_l * P_l)                               (bytes)
    t_l = P_l * t_hit_l + (k - P_l) * t_miss + L_c * (1 - [s_l == f, N_l >= k] * q_l^k)
        = b_l / B + L_c * P(the step copies anything)              (seconds), q_l = P_l / k

(the k routed experts taken as independent draws). A step whose routed experts are all full hits saves the
latency (possible only with N_l >= k); a top-only hit never does.

Prefetch: during layer l-1 the engine copies the missing segment of each of the k' experts predicted for layer l
(wrong guesses included: their copies are wasted but use the link). A routed expert was predicted with
probability rho_l; the rest is copied after routing (on demand), not hidden. Each predicted expert is cached with
probability q_l = P_l / k, so the number h of cached ones is ~ Binomial(k', q_l) and the prefetch takes
X_h = h * t_hit_l + (k' - h) * t_miss (+ L_c when X_h > 0). The stall is what the window W_{l-1} does not hide, in expectation over h:

    W_{l-1}    = a_l * c_{l-1}                                 (W_{-1} = 0)
    stall_l    = sum_h Binom(h; k', q_l) * max(0, X_h - W_{l-1})  (0 when the layer is not predicted)
    ondemand_l = (1 - rho_l) * b_l / B + L_c * (1 - P(no routed expert needs a copy after routing))
    T_l        = c_l + n_cond_l * o + stall_l + ondemand_l

where a routed expert needs an on-demand copy with probability r_l = (1 - rho_l)(1 - [s_l == f] q_l), so
P(none) = (1 - r_l)^k with N_l >= k, else rho_l^k (with fewer than k slots only prediction spares them all).
    TPOT       = sum_l T_l + extra_s

Data-dependent copies. How many experts a step copies is data, so the engine copies inside a conditional
(`lax.switch`) unless the count is known when compiling (batch 1, no cache, nothing predicted: the k routed experts,
or the k' predicted ones of a layer without cache, are always copied). On the H200 a conditional costs a fixed
`o = cond_overhead_s` (0.087 ms measured when the step assembled its experts' buffers, 0.036 ms since each expert is
computed inside the conditional) and the copies made inside it hardly overlap compute (`cond_window_fraction` 0.08,
then 0-0.02 measured; benchmarks/results/probe_cond_stream.json, bench_policies_qwen15_validation2.json and
bench_policies_qwen15_s4.json). So, with C_l = [N_l > 0] and
Q_l = [layer l is predicted]:

    n_cond_l = C_l * Q_l + max(C_l, Q_l)   (the prefetch's conditional, the on-demand conditional)
    a_l      = window_fraction * (cond_window_fraction if C_l else 1)

`window_fraction` stays for unconditional prefetch copies. With a = 0 a prediction only adds its wasted copies and
its conditional, so the solver also decides whether to predict at all (`solve(prefetch=None)`, `CachePlan.prefetch`).

E[X] ~ (k'/k) * t_l, so with every X_h on the same side of the window this is the DESIGN.md starting model
`c_l + max(0, t_prefetch - W) + t_ondemand` (plus the wasted prefetches); the binomial only matters where the
window hides some tokens' prefetches and not others' -- which is exactly where caching the tops of many experts
(every token's prefetch a little smaller) can beat caching fewer whole experts (some tokens free, others not).
Under a linear stall it cannot: per cached byte, top rows and whole experts save the same `p[l, e] / B`, and whole
experts also save the latency, so the most frequent experts are cached whole. Dense layers (all-zero freq row):
T_l = c_l. Apart from the step from N_l = 0 to 1 (which may add a conditional), T_l is non-increasing in s_l and in
N_l; the solver keeps (0, 0) among each layer's options, so more budget never predicts a slower token.

Why the window does not depend on the neighbours: layer l's prefetch is issued once layer l-1 has routed, at the
same time as layer l-1's on-demand copies. With those queued first on the link, layer l-1 lasts
`c_{l-1} + stall + t_od_{l-1}` and its link is busy with its own copies for `t_od_{l-1}` of it, which leaves
exactly `c_{l-1}` of link time for layer l's prefetch, whatever layer l-1's plan is. (`window_fraction` < 1
accounts for the part of c_{l-1} that runs before the prediction exists.) So in MoEpic's alternation "fix the
windows, solve the layers, recompute the windows" the windows are already at their fixed point after the first
pass; the layers stay coupled only through the budget, which the multiplier below handles.

Solver (MoEpic's divide and conquer)
------------------------------------
1. Per layer, tabulate T_l and memory `m_l = N_l * s_l * beta` for every (s, N) of the candidate splits x
   {0..E} at once ([n_layers, n_splits, E + 1] arrays) and keep its Pareto frontier (memory up, time down).
2. Divide: for a multiplier lambda each layer independently minimises `T_l + lambda * m_l`.
   Conquer: bisect lambda (log scale) to the smallest one whose plan fits the budget.
3. Spend the budget left greedily (best TPOT gain per byte, one layer step at a time), then improve by pairwise
   exchanges (for each pair of layers, the best joint choice given what the others use) until nothing improves;
   this closes most of the Lagrangian duality gap (exact for two MoE layers).
A budget that holds every expert of every MoE layer whole caches everything whole (also zero-frequency experts).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _require(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _loads(s: str, what: str) -> dict:
    try:
        d = json.loads(s)
    except (TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what}.from_json: not valid JSON ({e})") from None
    _require(isinstance(d, dict), f"{what}.from_json: expected a JSON object, got {type(d).__name__}")
    return d


def _get(d: dict, key: str, what: str):
    if key not in d:
        raise ValueError(f"{what}.from_json: missing key {key!r}")
    return d[key]


def _as_int(v, what: str) -> int:
    ok = isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))
    _require(ok, f"{what} must be an int, got {v!r}")
    return int(v)


def _as_float(v, what: str) -> float:
    ok = isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
    _require(ok, f"{what} must be a number, got {v!r}")
    return float(v)


def _float_array(v, what: str, ndim: int) -> np.ndarray:
    """A read-only float64 copy of `v`; JSON null becomes NaN."""
    try:
        a = np.array(v, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a {ndim}-D array of numbers") from None
    if a.ndim != ndim:
        raise ValueError(f"{what} must be a {ndim}-D array of numbers, got shape {a.shape}")
    a.flags.writeable = False
    return a


def _nan_to_none(a: np.ndarray) -> list:
    return [None if not math.isfinite(x) else float(x) for x in a.tolist()]


# ----------------------------------------------------------------------------------------------------------------
# plans


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Cache plan of one decoder layer.

    split: neurons in the top segment (0 = nothing cached; d_ff caches whole experts).
    cached: expert ids whose top segment [0:split] stays on the device; stored sorted ascending.
    """

    split: int = 0
    cached: tuple[int, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "split", _as_int(self.split, "LayerPlan.split"))
        try:
            ids = tuple(sorted(_as_int(e, "LayerPlan.cached entry") for e in self.cached))
        except TypeError:
            raise ValueError(f"LayerPlan.cached must be a sequence of ints, got {self.cached!r}") from None
        object.__setattr__(self, "cached", ids)


@dataclasses.dataclass(frozen=True)
class CachePlan:
    """Per-layer split points and cached experts, solved for one cache budget.

    layers: one LayerPlan per decoder layer (dense layers: split 0, cached ()).
    budget_bytes: the cache budget (bytes) the plan was solved for.
    model_id: ModelProfile.model_id it was solved for ("" = unknown).
    prefetch: whether the engine predicts and prefetches the next layer's experts (the policy's prefetch is used
      only where this is True; the solver turns it off where the cost model says prefetching does not pay).
    """

    layers: tuple[LayerPlan, ...]
    budget_bytes: int
    model_id: str = ""
    prefetch: bool = True

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        for i, lp in enumerate(self.layers):
            _require(isinstance(lp, LayerPlan), f"CachePlan.layers[{i}] must be a LayerPlan, got {type(lp).__name__}")
        object.__setattr__(self, "budget_bytes", _as_int(self.budget_bytes, "CachePlan.budget_bytes"))
        _require(isinstance(self.model_id, str), f"CachePlan.model_id must be a str, got {self.model_id!r}")
        _require(isinstance(self.prefetch, (bool, np.bool_)), f"CachePlan.prefetch must be a bool, got {self.prefetch!r}")
        object.__setattr__(self, "prefetch", bool(self.prefetch))

    @classmethod
    def empty(cls, n_layers: int, budget_bytes: int = 0, model_id: str = "") -> CachePlan:
        """A plan that caches nothing (every layer split 0, cached ())."""
        return cls(tuple(LayerPlan() for _ in range(n_layers)), budget_bytes, model_id)

    def n_slots(self) -> tuple[int, ...]:
        """Cached experts per layer: (len(cached_l) for each layer)."""
        return tuple(len(lp.cached) for lp in self.layers)

    def validate(self, n_layers: int, n_experts: int, d_ff: int, moe_layers: Sequence[bool]) -> None:
        """Check the plan against a model.

        Args:
          n_layers: decoder layers; n_experts: experts per MoE layer; d_ff: neurons per expert.
          moe_layers: [n_layers] True where the layer is a MoE layer.
        Raises:
          ValueError naming the layer and what is wrong: wrong number of layers, split outside [0, d_ff], cached id
          out of range or duplicated, experts cached on a dense layer, experts cached with split 0.
        """
        moe_layers = list(moe_layers)
        if len(moe_layers) != n_layers:
            raise ValueError(f"moe_layers has {len(moe_layers)} entries, expected n_layers={n_layers}")
        if len(self.layers) != n_layers:
            raise ValueError(f"CachePlan has {len(self.layers)} layers, the model has {n_layers}")
        if self.budget_bytes < 0:
            raise ValueError(f"CachePlan.budget_bytes={self.budget_bytes} is negative")
        for l, lp in enumerate(self.layers):
            if not 0 <= lp.split <= d_ff:
                raise ValueError(f"layer {l}: split {lp.split} outside [0, d_ff={d_ff}]")
            bad = [e for e in lp.cached if not 0 <= e < n_experts]
            if bad:
                raise ValueError(f"layer {l}: cached expert ids {bad} outside [0, n_experts={n_experts})")
            if len(set(lp.cached)) != len(lp.cached):
                raise ValueError(f"layer {l}: duplicated cached expert ids in {list(lp.cached)}")
            if lp.cached and not moe_layers[l]:
                raise ValueError(f"layer {l} is a dense layer but caches experts {list(lp.cached)}")
            if lp.cached and lp.split == 0:
                raise ValueError(f"layer {l}: caches experts {list(lp.cached)} with split 0 (nothing to cache)")

    def to_json(self) -> str:
        """{"format", "version", "budget_bytes", "model_id", "prefetch", "layers": [{"split", "cached"}, ...],
        "n_slots"}."""
        return json.dumps({
            "format": "moepic_jax.CachePlan",
            "version": _FORMAT_VERSION,
            "budget_bytes": self.budget_bytes,
            "model_id": self.model_id,
            "prefetch": self.prefetch,
            "layers": [{"split": lp.split, "cached": list(lp.cached)} for lp in self.layers],
            "n_slots": list(self.n_slots()),
        })

    @classmethod
    def from_json(cls, s: str) -> CachePlan:
        """Inverse of to_json; unknown keys are ignored. Raises ValueError on malformed input."""
        d = _loads(s, "CachePlan")
        layers = _get(d, "layers", "CachePlan")
        _require(isinstance(layers, list), "CachePlan.from_json: 'layers' must be a list")
        out = []
        for i, x in enumerate(layers):
            _require(isinstance(x, dict), f"CachePlan.from_json: layers[{i}] must be an object with split, cached")
            cached = _get(x, "cached", f"CachePlan layers[{i}]")
            _require(isinstance(cached, list), f"CachePlan.from_json: layers[{i}].cached must be a list of ints")
            out.append(LayerPlan(_as_int(_get(x, "split", f"CachePlan layers[{i}]"), f"layers[{i}].split"),
                                 tuple(_as_int(e, f"layers[{i}].cached entry") for e in cached)))
        model_id = d.get("model_id", "")
        _require(isinstance(model_id, str), "CachePlan.from_json: 'model_id' must be a string")
        prefetch = d.get("prefetch", True)
        _require(isinstance(prefetch, bool), "CachePlan.from_json: 'prefetch' must be true or false")
        return cls(tuple(out), _as_int(_get(d, "budget_bytes", "CachePlan"), "budget_bytes"), model_id, prefetch)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> CachePlan:
        return cls.from_json(Path(path).read_text())


# ----------------------------------------------------------------------------------------------------------------
# profiles


@dataclasses.dataclass(frozen=True, eq=False)
class ModelProfile:
    """What the planner needs to know about a model (measured by profile.py).

    freq: [n_layers, n_experts] probability that each expert is routed for a token; each MoE row sums to top_k,
      dense rows are all zeros.
    recall: [n_layers] share of routed experts the predictor had prefetched, in [0, 1]; NaN = layer not predicted
      (layer 0, dense layers, no data) -> treated as no prefetch.
    precision: [n_layers] share of predicted experts that were routed (informational; the cost model derives the
      wasted prefetches from recall and n_predicted).
    d_model, d_ff, top_k, n_experts, dtype_bytes: model sizes (dtype_bytes of the expert weights on the host).
    model_id: hash of the model config (e.g. MoEConfig.identity()).
    n_predicted: experts prefetched per predicted layer (0 = top_k).
    Raises ValueError (in __init__) on inconsistent shapes or NaN/inf/negative frequencies.
    """

    freq: np.ndarray
    recall: np.ndarray
    precision: np.ndarray
    d_model: int
    d_ff: int
    top_k: int
    n_experts: int
    dtype_bytes: int
    model_id: str
    n_predicted: int = 0

    def __post_init__(self):
        for name in ("d_model", "d_ff", "top_k", "n_experts", "dtype_bytes", "n_predicted"):
            object.__setattr__(self, name, _as_int(getattr(self, name), f"ModelProfile.{name}"))
            if getattr(self, name) < (0 if name == "n_predicted" else 1):
                raise ValueError(f"ModelProfile.{name}={getattr(self, name)} must be positive")
        if self.top_k > self.n_experts:
            raise ValueError(f"ModelProfile.top_k={self.top_k} exceeds n_experts={self.n_experts}")
        if self.n_predicted > self.n_experts:
            raise ValueError(f"ModelProfile.n_predicted={self.n_predicted} exceeds n_experts={self.n_experts}")
        _require(isinstance(self.model_id, str), f"ModelProfile.model_id must be a str, got {self.model_id!r}")
        freq = _float_array(self.freq, "ModelProfile.freq", 2)
        if freq.shape[1] != self.n_experts:
            raise ValueError(f"ModelProfile.freq has shape {freq.shape}; expected [n_layers, {self.n_experts}]")
        if not np.all(np.isfinite(freq)):
            raise ValueError("ModelProfile.freq contains NaN or inf; replace missing counts with 0, then normalise")
        if np.any(freq < 0) or np.any(freq > 1 + 1e-6):
            raise ValueError("ModelProfile.freq must lie in [0, 1] (tokens routed to the expert / tokens)")
        sums = freq.sum(axis=1)
        for l, sm in enumerate(sums):
            if sm > 1e-9 and abs(sm - self.top_k) > 1e-3 * self.top_k:
                raise ValueError(f"ModelProfile.freq row {l} sums to {sm:.6g}; a MoE row must sum to top_k="
                                 f"{self.top_k} (freq = routed counts / tokens) and a dense row must be all zeros")
        object.__setattr__(self, "freq", freq)
        for name in ("recall", "precision"):
            a = _float_array(getattr(self, name), f"ModelProfile.{name}", 1)
            if a.shape != (freq.shape[0],):
                raise ValueError(f"ModelProfile.{name} has shape {a.shape}; expected [n_layers={freq.shape[0]}]")
            fin = a[np.isfinite(a)]
            if np.any(np.isinf(a)) or np.any(fin < 0) or np.any(fin > 1):
                raise ValueError(f"ModelProfile.{name} must lie in [0, 1] (NaN = not measured)")
            object.__setattr__(self, name, a)
        n_pred = self.n_predicted or self.top_k
        over = [l for l, r in enumerate(self.recall) if r > n_pred / self.top_k + 1e-9]
        if over:
            raise ValueError(f"ModelProfile.recall exceeds n_predicted / top_k = {n_pred}/{self.top_k} at layers "
                             f"{over}: at most n_predicted of the top_k routed experts can have been predicted")

    @property
    def n_layers(self) -> int:
        return int(self.freq.shape[0])

    @property
    def moe_layers(self) -> tuple[bool, ...]:
        """[n_layers] True where the freq row is not all zeros."""
        return tuple(bool(x) for x in self.freq.sum(axis=1) > 0)

    @property
    def row_bytes(self) -> int:
        """beta = 3 * d_model * dtype_bytes: bytes of one neuron row of an expert."""
        return 3 * self.d_model * self.dtype_bytes

    @property
    def expert_bytes(self) -> int:
        return self.d_ff * self.row_bytes

    @property
    def full_cache_bytes(self) -> int:
        """Bytes needed to cache every expert of every MoE layer whole."""
        return sum(self.moe_layers) * self.n_experts * self.expert_bytes

    def to_json(self) -> str:
        return json.dumps({
            "format": "moepic_jax.ModelProfile", "version": _FORMAT_VERSION,
            "freq": self.freq.tolist(), "recall": _nan_to_none(self.recall),
            "precision": _nan_to_none(self.precision), "d_model": self.d_model, "d_ff": self.d_ff,
            "top_k": self.top_k, "n_experts": self.n_experts, "dtype_bytes": self.dtype_bytes,
            "model_id": self.model_id, "n_predicted": self.n_predicted,
        })

    @classmethod
    def from_json(cls, s: str) -> ModelProfile:
        """Inverse of to_json; unknown keys are ignored; null recall/precision entries become NaN."""
        d = _loads(s, "ModelProfile")
        kw = {k: _get(d, k, "ModelProfile") for k in ("freq", "recall", "precision", "d_model", "d_ff", "top_k",
                                                       "n_experts", "dtype_bytes", "model_id")}
        kw["n_predicted"] = d.get("n_predicted", 0)
        return cls(**kw)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> ModelProfile:
        return cls.from_json(Path(path).read_text())

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelProfile) and self.to_json() == other.to_json()

    __hash__ = None


@dataclasses.dataclass(frozen=True, eq=False)
class HardwareProfile:
    """What the planner needs to know about the machine (measured by profile.py).

    h2d_latency_s: fixed cost per host->device copy step (seconds): the copies a layer issues together stream back
      to back and pay it once (`profile.measure_h2d` fits it from steps of top_k copies).
    h2d_bandwidth_Bps: asymptotic host->device bandwidth (bytes / second).
    layer_compute_s: [n_layers] decode compute time per layer at batch 1 with everything resident (seconds); the
      window that hides the next layer's prefetch.
    device: free text (e.g. "NVIDIA H200").
    window_fraction: share of layer_compute_s[l-1] that can hide layer l's prefetch (prediction happens after
      attention, so slightly < 1 in practice; a calibration knob).
    extra_s: time per token outside the decoder layers (embedding, final norm, lm head, sampling), seconds.
    cond_overhead_s: fixed cost of one data-dependent copy step of top_k experts in the decode (its conditionals:
      one `lax.switch` per 4 experts, single device, batch 1; and the assembly of its
      buffers), seconds; 0 = free (the ideal). Measured by `profile.measure_hardware`.
    cond_window_fraction: the share of that window left to a prefetch made inside a conditional (0.08 on the H200:
      those copies do not overlap compute); 1 = like an unconditional copy.
    """

    h2d_latency_s: float
    h2d_bandwidth_Bps: float
    layer_compute_s: np.ndarray
    device: str = "unknown"
    window_fraction: float = 1.0
    extra_s: float = 0.0
    cond_overhead_s: float = 0.0
    cond_window_fraction: float = 1.0

    def __post_init__(self):
        for name in ("h2d_latency_s", "h2d_bandwidth_Bps", "window_fraction", "extra_s", "cond_overhead_s",
                     "cond_window_fraction"):
            v = _as_float(getattr(self, name), f"HardwareProfile.{name}")
            if not math.isfinite(v) or v < 0 or (name == "h2d_bandwidth_Bps" and v == 0):
                raise ValueError(f"HardwareProfile.{name}={v} must be finite and >= 0 (bandwidth > 0)")
            object.__setattr__(self, name, v)
        c = _float_array(self.layer_compute_s, "HardwareProfile.layer_compute_s", 1)
        if not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ValueError("HardwareProfile.layer_compute_s must be finite and >= 0 (seconds per layer)")
        object.__setattr__(self, "layer_compute_s", c)
        _require(isinstance(self.device, str), f"HardwareProfile.device must be a str, got {self.device!r}")

    def copy_time_s(self, nbytes):
        """Time of one host->device copy step of nbytes: h2d_latency_s + nbytes / h2d_bandwidth_Bps (0 bytes -> 0 s).

        Args: nbytes: bytes, scalar or array. Returns: seconds, a float for a scalar, else an array like nbytes.
        """
        b = np.asarray(nbytes, dtype=np.float64)
        if np.any(b < 0) or not np.all(np.isfinite(b)):
            raise ValueError("copy_time_s: nbytes must be finite and >= 0")
        t = np.where(b > 0, self.h2d_latency_s + b / self.h2d_bandwidth_Bps, 0.0)
        return float(t) if t.ndim == 0 else t

    @staticmethod
    def fit(sizes_bytes, times_s, layer_compute_s, device: str = "") -> HardwareProfile:
        """Fit latency and bandwidth of `t = latency + bytes / bandwidth` to measured copies.

        Least squares on the *relative* error ((latency + size/bw) / t - 1), so small copies (the bottoms, a few MB)
        weigh as much as large ones. A negative latency is clamped to 0 and the bandwidth refitted.
        Args:
          sizes_bytes, times_s: [n_measurements] copy sizes (bytes) and measured times (seconds); >= 2 distinct sizes.
          layer_compute_s: [n_layers] seconds. device: free text.
        Raises: ValueError on bad shapes, non-positive values, or times that do not grow with size.
        """
        x = np.asarray(sizes_bytes, dtype=np.float64).ravel()
        t = np.asarray(times_s, dtype=np.float64).ravel()
        if x.shape != t.shape or x.size < 2 or np.unique(x).size < 2:
            raise ValueError("HardwareProfile.fit needs sizes and times of equal length with >= 2 distinct sizes")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(t)) and np.all(x > 0) and np.all(t > 0)):
            raise ValueError("HardwareProfile.fit: sizes and times must be finite and > 0")
        a = np.stack([1.0 / t, x / t], axis=1)  # rows: (lat + x * inv_bw) / t ~ 1
        (lat, inv_bw), *_ = np.linalg.lstsq(a, np.ones_like(t), rcond=None)
        if lat < 0:
            lat, inv_bw = 0.0, float(np.sum(x / t) / np.sum((x / t) ** 2))
        if not inv_bw > 0:
            raise ValueError("HardwareProfile.fit: copy times do not grow with size; cannot fit a bandwidth")
        return HardwareProfile(float(lat), float(1.0 / inv_bw), layer_compute_s, device or "unknown")

    def to_json(self) -> str:
        return json.dumps({
            "format": "moepic_jax.HardwareProfile", "version": _FORMAT_VERSION,
            "h2d_latency_s": self.h2d_latency_s, "h2d_bandwidth_Bps": self.h2d_bandwidth_Bps,
            "layer_compute_s": self.layer_compute_s.tolist(), "device": self.device,
            "window_fraction": self.window_fraction, "extra_s": self.extra_s,
            "cond_overhead_s": self.cond_overhead_s, "cond_window_fraction": self.cond_window_fraction,
        })

    @classmethod
    def from_json(cls, s: str) -> HardwareProfile:
        """Inverse of to_json; unknown keys are ignored. Raises ValueError on malformed input."""
        d = _loads(s, "HardwareProfile")
        kw = {k: _get(d, k, "HardwareProfile") for k in ("h2d_latency_s", "h2d_bandwidth_Bps", "layer_compute_s")}
        for k in ("device", "window_fraction", "extra_s", "cond_overhead_s", "cond_window_fraction"):
            if k in d:
                kw[k] = d[k]
        return cls(**kw)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> HardwareProfile:
        return cls.from_json(Path(path).read_text())

    def __eq__(self, other) -> bool:
        return isinstance(other, HardwareProfile) and self.to_json() == other.to_json()

    __hash__ = None


# ----------------------------------------------------------------------------------------------------------------
# cost model


def _check_hw(mp: ModelProfile, hw: HardwareProfile) -> None:
    if hw.layer_compute_s.shape != (mp.n_layers,):
        raise ValueError(f"HardwareProfile.layer_compute_s has {hw.layer_compute_s.shape[0]} layers, "
                         f"ModelProfile.freq has {mp.n_layers}; profile both on the same model")


def _layer_consts(mp: ModelProfile, hw: HardwareProfile):
    """Per-layer constants of the cost model, each [n_layers]: (k_l, rho, n_pf, previous layer's compute, compute)."""
    _check_hw(mp, hw)
    moe = np.array(mp.moe_layers, dtype=bool)
    k_l = np.where(moe, float(mp.top_k), 0.0)
    predicted = np.isfinite(mp.recall) & moe
    rho = np.where(predicted, np.nan_to_num(mp.recall), 0.0)
    n_pf = np.where(predicted, mp.n_predicted or mp.top_k, 0)
    c = hw.layer_compute_s
    return k_l, rho, n_pf, np.concatenate([[0.0], c[:-1]]), c


def _layer_time(p_c, split, n_cached, mp: ModelProfile, hw: HardwareProfile) -> dict:
    """Cost model of the module docstring for cached mass p_c, split s and N_l = n_cached experts cached (arrays;
    layers on axis 0, broadcasting).

    Returns a dict of arrays of the broadcast shape: t (expected routed copy time without prediction), stall,
    ondemand, overhead (n_cond_l * cond_overhead_s), layer (T_l).
    """
    p_c, split = np.asarray(p_c, dtype=np.float64), np.asarray(split, dtype=np.float64)
    n_cached = np.asarray(n_cached, dtype=np.float64)
    has_cache = (n_cached > 0) & (split > 0)
    nd = max(p_c.ndim, split.ndim, n_cached.ndim, 1)
    k_l, rho, n_pf, c_prev, c = (x.reshape((-1,) + (1,) * (nd - 1)) for x in _layer_consts(mp, hw))
    predicted = n_pf > 0
    # a prefetch into a cached layer is a conditional copy, which on some stacks cannot overlap compute
    window = hw.window_fraction * np.where(has_cache, hw.cond_window_fraction, 1.0) * c_prev
    overhead = ((has_cache & predicted).astype(np.float64) + (has_cache | predicted)) * hw.cond_overhead_s
    f, beta, lat, bw = mp.d_ff, mp.row_bytes, hw.h2d_latency_s, hw.h2d_bandwidth_Bps
    t_miss = f * beta / bw  # byte times; the latency is paid once per copy step (below)
    t_hit = np.where(split >= f, 0.0, (f - split) * beta / bw)
    q = np.clip(p_c / mp.top_k, 0.0, 1.0)
    full = (split >= f) & (n_cached >= k_l)  # k full hits are possible at all
    bytes_t = p_c * t_hit + (k_l - p_c) * t_miss  # b_l / B
    moe = k_l > 0
    t = bytes_t + lat * np.where(moe, 1.0 - np.where(full, q ** k_l, 0.0), 0.0)
    # after routing, a routed expert needs a copy unless it was predicted or is a full hit; the step pays the
    # latency unless none does (fewer than k slots: only prediction can spare every routed expert)
    r = (1.0 - rho) * (1.0 - np.where(split >= f, q, 0.0))
    p_none = np.where(full, (1.0 - r) ** k_l, rho ** k_l)
    # prefetch of n_pf predicted experts, h of them cached: h ~ Binomial(n_pf, q), q = P / k
    q = q[..., None]
    h = np.arange(int(n_pf.max()) + 1, dtype=np.float64)
    n = n_pf[..., None].astype(np.float64)
    comb = np.vectorize(math.comb, otypes=[np.float64])(n.astype(np.int64), h.astype(np.int64))
    pmf = comb * q**h * (1.0 - q) ** np.maximum(n - h, 0.0)
    x = h * t_hit[..., None] + np.maximum(n - h, 0.0) * t_miss
    x = x + lat * (x > 0)
    stall = np.sum(pmf * np.maximum(0.0, x - window[..., None]), axis=-1)
    ondemand = (1.0 - rho) * bytes_t + lat * np.where(moe, 1.0 - p_none, 0.0)
    return {"t": t, "prefetch": n_pf / mp.top_k * t, "stall": stall, "ondemand": ondemand, "overhead": overhead,
            "layer": c + overhead + stall + ondemand}


def without_prediction(mp: ModelProfile) -> ModelProfile:
    """The same profile with no layer predicted (recall and precision NaN): the cost of running without prefetch."""
    nan = np.full(mp.n_layers, np.nan)
    return dataclasses.replace(mp, recall=nan, precision=nan)


def plan_bytes(plan: CachePlan, mp: ModelProfile) -> int:
    """Device bytes of the top caches: sum_l len(cached_l) * split_l * 3 * d_model * dtype_bytes (exact int)."""
    return sum(len(lp.cached) * lp.split for lp in plan.layers) * mp.row_bytes


def plan_stats(plan: CachePlan, mp: ModelProfile, hw: HardwareProfile | None = None) -> dict:
    """Per-layer expectations of the cost model for one plan (what the engine's counters should measure).

    Returns a dict of [n_layers] float64 arrays: full_hit_rate, top_only_hit_rate, miss_rate (per routed expert;
    0 on dense layers), copies (routed copies per token), routed_bytes (bytes per token of routed experts),
    h2d_bytes (routed + wasted prefetch bytes per token); with hw also prefetch_s, ondemand_s, stall_s,
    overhead_s, layer_s (T_l, seconds); plus "tpot_s" (float, with hw). A plan with prefetch=False is costed
    without prediction.
    Raises ValueError if the plan does not fit the model (CachePlan.validate) or names another model_id.
    """
    plan.validate(mp.n_layers, mp.n_experts, mp.d_ff, mp.moe_layers)
    if plan.model_id and mp.model_id and plan.model_id != mp.model_id:
        raise ValueError(f"plan was solved for model_id {plan.model_id!r}, the profile is {mp.model_id!r}; re-plan")
    if not plan.prefetch:
        mp = without_prediction(mp)
    f, k = mp.d_ff, mp.top_k
    split = np.array([lp.split for lp in plan.layers], dtype=np.float64)
    p_c = np.array([mp.freq[l, list(lp.cached)].sum() for l, lp in enumerate(plan.layers)], dtype=np.float64)
    moe = np.array(mp.moe_layers, dtype=bool)
    full = (split == f) & (p_c > 0)
    k_l = np.where(moe, float(k), 0.0)
    n = np.maximum(k_l - np.where(full, p_c, 0.0), 0.0)
    b = mp.row_bytes * np.maximum(k_l * f - split * p_c, 0.0)
    hit = np.where(moe, p_c / k, 0.0)
    out = {
        "full_hit_rate": np.where(full, hit, 0.0),
        "top_only_hit_rate": np.where(full, 0.0, hit),
        "miss_rate": np.where(moe, 1.0 - hit, 0.0),
        "copies": n,
        "routed_bytes": b,
    }
    if hw is None:
        return out
    cost = _layer_time(p_c, split, np.array(plan.n_slots()), mp, hw)
    _, rho, n_pf, _, _ = _layer_consts(mp, hw)
    out["h2d_bytes"] = (n_pf / k + 1.0 - rho) * b
    out["prefetch_s"] = cost["prefetch"]
    out["ondemand_s"] = cost["ondemand"]
    out["stall_s"] = cost["stall"]
    out["overhead_s"] = cost["overhead"]
    out["layer_s"] = cost["layer"]
    out["tpot_s"] = float(out["layer_s"].sum() + hw.extra_s)
    return out


def predicted_tpot(plan: CachePlan, mp: ModelProfile, hw: HardwareProfile) -> float:
    """Predicted seconds per decoded token at batch 1: sum_l T_l + extra_s (module docstring, "Cost model").

    Uses the plan's actual cached sets (not necessarily the most frequent experts).
    Raises ValueError if the plan or the hardware profile does not match the model profile.
    """
    return plan_stats(plan, mp, hw)["tpot_s"]


# ----------------------------------------------------------------------------------------------------------------
# solver


def candidate_splits(d_ff: int, granule: int = 128, allow_split: bool = True,
                     splits: Sequence[int] | None = None) -> tuple[int, ...]:
    """Split points the solver may choose, sorted ascending, always including 0.

    allow_split=False: (0, d_ff). Explicit `splits`: those values plus 0 (each in [0, d_ff]). Otherwise the multiples
    of `granule` from 0 to d_ff; a granule >= d_ff gives (0, d_ff) (tiny models).
    Raises ValueError: granule <= 0, granule < d_ff not dividing d_ff, splits outside [0, d_ff], splits given with
    allow_split=False.
    """
    d_ff = _as_int(d_ff, "d_ff")
    if not allow_split:
        if splits is not None:
            raise ValueError("allow_split=False uses only splits {0, d_ff}; do not pass splits= as well")
        return (0, d_ff)
    if splits is not None:
        vals = {_as_int(s, "splits entry") for s in splits}
        bad = sorted(s for s in vals if not 0 <= s <= d_ff)
        if bad:
            raise ValueError(f"splits {bad} outside [0, d_ff={d_ff}]")
        return tuple(sorted(vals | {0}))
    granule = _as_int(granule, "granule")
    if granule <= 0:
        raise ValueError(f"granule={granule} must be a positive number of neurons")
    if granule >= d_ff:
        return (0, d_ff)
    if d_ff % granule:
        raise ValueError(f"granule={granule} does not divide d_ff={d_ff}; pick a divisor of d_ff or pass splits=")
    return tuple(range(0, d_ff + 1, granule))


def _frontiers(mp: ModelProfile, hw: HardwareProfile, s_cand: np.ndarray):
    """Per-layer Pareto frontiers of (memory, T_l) over all (s, N) options.

    Returns FT, FM, FS, FN: [n_layers, F] time (s), memory (bytes), split index, N; padded with inf / 0;
    each row starts with (s=0, N=0) and is sorted by memory with strictly decreasing time.
    """
    n_layers, n_exp = mp.freq.shape
    beta = float(mp.row_bytes)
    order = np.argsort(-mp.freq, axis=1, kind="stable")  # most frequent first, ties -> lower id
    p_cum = np.concatenate([np.zeros((n_layers, 1)), np.cumsum(np.take_along_axis(mp.freq, order, 1), 1)], 1)
    s = s_cand.astype(np.float64)[None, :, None]  # [1, S, 1]
    n_slots = np.arange(n_exp + 1, dtype=np.float64)[None, None, :]  # [1, 1, E+1]
    time = _layer_time(p_cum[:, None, :], s, n_slots, mp, hw)["layer"].reshape(n_layers, -1)  # [L, S*(E+1)]
    mem = (n_slots * s * beta).reshape(-1)
    valid = (((s > 0) & (n_slots > 0)) | ((s == 0) & (n_slots == 0))).reshape(-1)
    moe = np.array(mp.moe_layers, dtype=bool)
    idx_all = np.flatnonzero(valid)
    rows = []
    for l in range(n_layers):
        idx = idx_all if moe[l] else idx_all[:1]
        o = idx[np.lexsort((idx, time[l, idx], mem[idx]))]
        tt = time[l, o]
        prev_best = np.concatenate([[np.inf], np.minimum.accumulate(tt)[:-1]])
        rows.append(o[tt < prev_best])
    width = max(len(r) for r in rows)
    ft = np.full((n_layers, width), np.inf)
    fm = np.full((n_layers, width), np.inf)
    fs = np.zeros((n_layers, width), dtype=np.int64)
    fn = np.zeros((n_layers, width), dtype=np.int64)
    for l, r in enumerate(rows):
        ft[l, :len(r)], fm[l, :len(r)] = time[l, r], mem[r]
        fs[l, :len(r)], fn[l, :len(r)] = np.divmod(r, n_exp + 1)
    return ft, fm, fs, fn, order


def _lagrange(ft: np.ndarray, fm: np.ndarray, budget: float) -> np.ndarray:
    """Divide and conquer: per layer argmin(T + lambda * mem), lambda bisected to the smallest feasible value."""
    rows = np.arange(ft.shape[0])
    fm0 = np.where(np.isfinite(fm), fm, 0.0)

    def pick(lam: float) -> np.ndarray:
        return np.argmin(ft + lam * fm0, axis=1)

    def fits(p: np.ndarray) -> bool:
        return fm[rows, p].sum() <= budget

    if fits(pick(0.0)):
        return pick(0.0)
    # above hi every layer prefers (0, 0): hi = the largest time saved per byte over the first option
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(fm0 > 0, (ft[:, :1] - ft) / fm0, 0.0)
    hi = float(np.max(np.where(np.isfinite(ratio), ratio, 0.0))) * (1 + 1e-9) + 1e-300
    lo = hi * 1e-18
    if fits(pick(lo)):
        return pick(lo)
    for _ in range(200):
        if hi <= lo * (1 + 1e-13):
            break
        mid = math.sqrt(lo * hi)
        if fits(pick(mid)):
            hi = mid
        else:
            lo = mid
    return pick(hi)


def _fill(ft: np.ndarray, fm: np.ndarray, pos: np.ndarray, budget: float) -> np.ndarray:
    """Spend the budget left: repeatedly take the one-layer move with the best TPOT gain per extra byte."""
    rows = np.arange(ft.shape[0])
    pos = pos.copy()
    while True:
        left = budget - fm[rows, pos].sum()
        d_mem = fm - fm[rows, pos][:, None]
        d_time = ft[rows, pos][:, None] - ft
        ok = (d_mem > 0) & (d_mem <= left) & (d_time > 0)
        if not ok.any():
            return pos
        gain = np.where(ok, d_time / np.where(ok, d_mem, 1.0), -1.0)
        l, q = np.unravel_index(np.argmax(gain), gain.shape)
        pos[l] = q


def _exchange(ft: np.ndarray, fm: np.ndarray, pos: np.ndarray, budget: float, max_sweeps: int = 20) -> np.ndarray:
    """Pairwise exchange: for each pair of layers, the best joint pair of options given the others' memory."""
    rows = np.arange(ft.shape[0])
    lens = np.isfinite(fm).sum(axis=1)
    layers = [l for l in rows if lens[l] > 1]
    pos = pos.copy()
    for _ in range(max_sweeps):
        improved = False
        for a, i in enumerate(layers):
            for j in layers[a + 1:]:
                room = budget - fm[rows, pos].sum() + fm[i, pos[i]] + fm[j, pos[j]]
                n_i = int(np.searchsorted(fm[i, :lens[i]], room, side="right"))
                q_j = np.searchsorted(fm[j, :lens[j]], room - fm[i, :n_i], side="right") - 1
                total = ft[i, :n_i] + ft[j, q_j]
                q_i = int(np.argmin(total))
                current = ft[i, pos[i]] + ft[j, pos[j]]
                if total[q_i] < current - 1e-12 * abs(current):
                    pos[i], pos[j] = q_i, q_j[q_i]
                    improved = True
        pos = _fill(ft, fm, pos, budget)
        if not improved:
            break
    return pos


def solve(mp: ModelProfile, hw: HardwareProfile, budget_bytes: int, granule: int = 128, allow_split: bool = True,
          splits: Sequence[int] | None = None, prefetch: bool | None = None) -> CachePlan:
    """Choose each layer's split s_l and cached experts to minimise predicted_tpot under plan_bytes <= budget_bytes.

    MoEpic's divide-and-conquer cache configuration (arXiv 2509.08342): Lagrangian multiplier on memory, each layer
    solved independently and vectorised over all (s, N) pairs, bisection on the multiplier, the prefetch windows at
    their fixed point (here after one pass, see the module docstring), then greedy fill and pairwise exchange.

    Args:
      mp: model profile (freq [n_layers, n_experts], recall [n_layers], sizes).
      hw: hardware profile (layer_compute_s [n_layers] must match mp).
      budget_bytes: device bytes for the top caches (int >= 0).
      granule, allow_split, splits: candidate split points, see candidate_splits().
      prefetch: True = the engine predicts (as the profile's recall says), False = it does not; None = solve both
        ways and keep the faster plan (ties: prefetch).
    Returns:
      CachePlan with, per MoE layer, the N_l most frequent experts (ties -> lower id) cached with split s_l; N_l = 0
      is written split 0, cached (). Dense layers: split 0, cached (). `prefetch` as chosen. Deterministic.
    Raises:
      ValueError: negative budget, profiles that do not match, bad granule / splits.
    """
    budget = _as_int(budget_bytes, "budget_bytes")
    if budget < 0:
        raise ValueError(f"budget_bytes={budget} is negative")
    _check_hw(mp, hw)
    if prefetch is None:
        with_pf = solve(mp, hw, budget, granule, allow_split, splits, prefetch=True)
        without = solve(mp, hw, budget, granule, allow_split, splits, prefetch=False)
        return with_pf if predicted_tpot(with_pf, mp, hw) <= predicted_tpot(without, mp, hw) else without
    plan_mp = mp if prefetch else without_prediction(mp)
    s_cand = np.array(candidate_splits(mp.d_ff, granule, allow_split, splits), dtype=np.int64)
    moe = mp.moe_layers
    if mp.d_ff in s_cand and budget >= mp.full_cache_bytes:
        every = tuple(range(mp.n_experts))
        layers = tuple(LayerPlan(mp.d_ff, every) if m else LayerPlan() for m in moe)
        return CachePlan(layers, budget, mp.model_id, prefetch)
    ft, fm, fs, fn, order = _frontiers(plan_mp, hw, s_cand)
    pos = _lagrange(ft, fm, float(budget))
    pos = _exchange(ft, fm, _fill(ft, fm, pos, float(budget)), float(budget))
    layers = []
    for l in range(mp.n_layers):
        n_l = int(fn[l, pos[l]])
        if n_l == 0:
            layers.append(LayerPlan())
        else:
            layers.append(LayerPlan(int(s_cand[fs[l, pos[l]]]), tuple(int(e) for e in order[l, :n_l])))
    plan = CachePlan(tuple(layers), budget, mp.model_id, prefetch)
    if plan_bytes(plan, mp) > budget:  # float rounding guard; never expected
        raise RuntimeError(f"solver produced {plan_bytes(plan, mp)} bytes over the budget {budget}")
    return plan

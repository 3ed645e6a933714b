"""What the planner reads and writes, as values with a JSON form: `ModelProfile` (expert activation frequencies,
predictor recall, shapes), `HardwareProfile` (the copy-time curve, compute times) and `CachePlan` (per layer the
split s_l and the cached experts). NumPy only; validated on construction and on reading JSON (errors name the field).
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


def as_int(v, what: str) -> int:
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
        object.__setattr__(self, "split", as_int(self.split, "LayerPlan.split"))
        try:
            ids = tuple(sorted(as_int(e, "LayerPlan.cached entry") for e in self.cached))
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
        object.__setattr__(self, "budget_bytes", as_int(self.budget_bytes, "CachePlan.budget_bytes"))
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
            out.append(LayerPlan(as_int(_get(x, "split", f"CachePlan layers[{i}]"), f"layers[{i}].split"),
                                 tuple(as_int(e, f"layers[{i}].cached entry") for e in cached)))
        model_id = d.get("model_id", "")
        _require(isinstance(model_id, str), "CachePlan.from_json: 'model_id' must be a string")
        prefetch = d.get("prefetch", True)
        _require(isinstance(prefetch, bool), "CachePlan.from_json: 'prefetch' must be true or false")
        return cls(tuple(out), as_int(_get(d, "budget_bytes", "CachePlan"), "budget_bytes"), model_id, prefetch)

    def save(self, path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path) -> CachePlan:
        return cls.from_json(Path(path).read_text())


# ----------------------------------------------------------------------------------------------------------------
# profiles


@dataclasses.dataclass(frozen=True, eq=False)
class ModelProfile:
    """What the planner needs to know about a model (measured by `calibrate.py`).

    freq: [n_layers, n_experts] probability that each expert is routed for a token; each MoE row sums to top_k,
      dense rows are all zeros.
    recall: [n_layers] share of routed experts the predictor had prefetched, in [0, 1]; NaN = layer not predicted
      (layer 0, dense layers, no data) -> treated as no prefetch.
    precision: [n_layers] share of predicted experts that were routed (informational; the cost model derives the
      wasted prefetches from recall and n_predicted).
    d_model, d_ff, top_k, n_experts, dtype_bytes: model sizes (dtype_bytes of the expert weights on the host).
    model_id: hash of the model config (e.g. MoEConfig.identity()).
    n_predicted: experts prefetched per predicted layer (0 = top_k).
    expert_row_bytes: bytes of one stored neuron row of an expert where it is not 3 * d_model * dtype_bytes
      (quantized experts: packed codes and scales, `MoEConfig.expert_row_bytes`); 0 = 3 * d_model * dtype_bytes.
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
    expert_row_bytes: int = 0

    def __post_init__(self):
        for name in ("d_model", "d_ff", "top_k", "n_experts", "dtype_bytes", "n_predicted", "expert_row_bytes"):
            object.__setattr__(self, name, as_int(getattr(self, name), f"ModelProfile.{name}"))
            if getattr(self, name) < (0 if name in ("n_predicted", "expert_row_bytes") else 1):
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
        """beta = 3 * d_model * dtype_bytes (or `expert_row_bytes` when set): bytes of one neuron row of an expert."""
        return self.expert_row_bytes or 3 * self.d_model * self.dtype_bytes

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
            **({"expert_row_bytes": self.expert_row_bytes} if self.expert_row_bytes else {}),
        })

    @classmethod
    def from_json(cls, s: str) -> ModelProfile:
        """Inverse of to_json; unknown keys are ignored; null recall/precision entries become NaN."""
        d = _loads(s, "ModelProfile")
        kw = {k: _get(d, k, "ModelProfile") for k in ("freq", "recall", "precision", "d_model", "d_ff", "top_k",
                                                       "n_experts", "dtype_bytes", "model_id")}
        kw["n_predicted"] = d.get("n_predicted", 0)
        kw["expert_row_bytes"] = d.get("expert_row_bytes", 0)
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
    """What the planner needs to know about the machine (measured by `calibrate.py`).

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
    direct: the decode step copies directly (`offload/transfer.py`, no conditional): then every MoE layer pays
      cond_overhead_s once (its copy call's host round trip, whatever it copies) and every prefetch sees
      cond_window_fraction of its window (the copies run on the copy engines while the layer computes).
    """

    h2d_latency_s: float
    h2d_bandwidth_Bps: float
    layer_compute_s: np.ndarray
    device: str = "unknown"
    window_fraction: float = 1.0
    extra_s: float = 0.0
    cond_overhead_s: float = 0.0
    cond_window_fraction: float = 1.0
    direct: bool = False

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
        _require(isinstance(self.direct, bool), f"HardwareProfile.direct must be True or False, got {self.direct!r}")

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
            "direct": self.direct,
        })

    @classmethod
    def from_json(cls, s: str) -> HardwareProfile:
        """Inverse of to_json; unknown keys are ignored. Raises ValueError on malformed input."""
        d = _loads(s, "HardwareProfile")
        kw = {k: _get(d, k, "HardwareProfile") for k in ("h2d_latency_s", "h2d_bandwidth_Bps", "layer_compute_s")}
        for k in ("device", "window_fraction", "extra_s", "cond_overhead_s", "cond_window_fraction", "direct"):
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

"""Routing traces for cache and prefetch studies: drawn from a calibrated model (NumPy), or recorded from the
trained embedded model.

  python -m benchmarks.routing_traces --model qwen15 --tokens 512 --seed 0 --out trace.npz
  python -m benchmarks.routing_traces --model embedded --tokens 512 --out embedded.npz
  python -m benchmarks.routing_traces --model all --tokens 512          # statistics of every model, no file

A trace holds, per decode token t and layer l: `ids [T, L, k]` int32, the routed experts (-1 in dense layers),
`weights [T, L, k]` float32, their gate weights (sum 1 over k), and `predicted [T, L, k]` int32, the experts the
next-layer predictor names for layer l from layer l-1's hidden state (-1 at layer 0 and in dense layers).

Calibration targets (`MODELS`)
------------------------------
Measured by Liang et al., "Not All Models Suit Expert Offloading: On Local Routing Consistency of
Mixture-of-Expert Models", arXiv 2505.16056 (teacher-forced over 11 corpora; values taken from the paper's
released notebooks, github.com/ljcleo/moe-lrc, not re-derived here):

  | model              | E, top-k       | layers | top 10 % / 25 % / 50 % share | next-token reuse |
  | Mixtral-8x7B       | 8, 2           | 32     | 0.12 / 0.29 / 0.55           | 0.31             |
  | OLMoE-1B-7B        | 64, 8          | 16     | 0.31 / 0.52 / 0.76           | 0.31             |
  | Qwen1.5-MoE-A2.7B  | 60 (+shared),4 | 24     | 0.15 / 0.32 / 0.57           | 0.13             |
  | Qwen3-30B-A3B      | 128, 8         | 48     | 0.39 / 0.66 / 0.89           | 0.35 (0.45 free-running decode) |

The Qwen3 trace is fitted to the teacher-forced 0.35; `--reuse 0.45` gives the free-running figure. Predictor
recall: next-layer predictors that apply layer l+1's router to layer l's hidden state find about 0.8 of layer l+1's
routed experts, less in the first layers (an estimate from the literature on such predictors, e.g. MoE-Infinity,
ProMoE, AdapMoE; not a measurement of these models): `recall` (default 0.8) from layer `ramp_layers` on, rising
linearly from `first_recall` (default 0.55) at layer 1. All layers of the four models are MoE layers.

Statistics (`trace_stats`), over the MoE layers of a trace, each averaged over layers
-------------------------------------------------------------------------------------
  topX      per layer, count the routed (token, expert) pairs of each expert, sort the experts by count and take
            the share of all pairs held by the n = max(1, floor(X/100 * E + 0.5)) most used experts (X * E rounded
            half up: Mixtral, E = 8: 10 % -> 1 expert (0.8), 25 % -> 2, 50 % -> 4; OLMoE 6 / 16 / 32; Qwen1.5
            6 / 15 / 30; Qwen3 13 / 32 / 64).
  reuse     P(expert routed at token t+1 | routed at t), same layer: |S_t & S_t+1| / k averaged over t (every
            token routes k distinct experts, so this is the average over routed pairs).
  coverage  the share of a layer's experts routed at least once in a window of `window` (512) tokens, averaged
            over the whole windows (the trace itself when shorter).
  recall    the share of layer l's routed experts found in predicted[:, l], over the layers that have a
            predictor (l >= 1); NaN when none has.

What is infeasible
------------------
* Mixtral top 10 %: with the rounding above it is the busiest expert's share, which is at least 1/E = 0.125 of
  the pairs (the counts average T k / E), so 0.12 cannot be met exactly; on 512 tokens the sampled counts spread
  and the busiest expert takes about 0.14. Both are within 0.03 of 0.12. (Interpolating the cumulative share at
  0.8 experts would make 0.12 mean a top share of 0.15, consistent with 0.29 for two experts: the published
  number may have been computed that way, unchecked; it is not what `trace_stats` does.)
* Coverage 0.75-0.97 (the drift "over 300-512 tokens a layer touches 75-97 % of its experts") is a range for
  models with many experts. Mixtral (8 experts, 1024 pairs in 512 tokens, top 50 % share 0.55) touches all 8:
  coverage is 1.0 and no drift can lower it without breaking the share targets. Qwen1.5's near-uniform shares
  bound it from below: the 30 busiest experts hold 0.57, so the other used experts, each below the busiest 30's
  average (0.019), must hold 0.43: at least 23 more, coverage >= 0.88; with the sampling spread of 512 tokens
  this generator reaches the top 50 % share within 0.03 only above 0.98 (fitting 0.98 gave 0.60 for 0.57), so
  Qwen1.5 has no dormant experts (coverage 1.0, outside the range). OLMoE is fitted to 0.90 (0.86, the middle of
  the range, left its top 10 % share 0.025 short), Qwen3 to 0.86.

The generator (`generate_trace`)
--------------------------------
Per layer l, token t and expert e the router logit is

  z[t, l, e] = alpha * b_l[e] + sigma * x[t, l, e] + g[t, l, e],   g ~ Gumbel(0, 1),

and the k largest logits among the experts not dormant are routed (Gumbel top-k: k distinct experts drawn
without replacement from softmax(alpha b + sigma x)). Gate weights are the softmax of the k routed logits
(renormalised top-k, as Mixtral and Qwen3 route; OLMoE and Qwen1.5 do not renormalise: not modelled).
  b_l       a fixed popularity shape over a random per-layer ranking of the experts (`SHAPES`: Zipf, -ln(rank);
            a flat-tailed Zipf; log-normal, the standard normal quantile of the rank); `alpha` fits the mean of
            the three share targets (bisection); each shape is fitted and the one with the smallest worst share
            error is kept.
  x         a fast state, AR(1) with coefficient 0.8 (about 5 tokens), unit variance, mixing a per-layer part
            and a shared cross-layer "topic" part (weight `layer_corr`, 0.5) read through a fixed per-layer
            permutation of the experts, so layers are correlated; `sigma` fits the reuse target.
  dormancy  the slow drift: a per-layer, per-expert AR(1) state with coefficient 0.9995 (about 2000 tokens); an
            expert of the less used half whose state is below the `d` quantile is not routed; `d` fits the
            coverage target.
  predicted for layer l >= 1 keeps each routed expert with probability recall_l and fills the other slots with
            experts not routed there, drawn from softmax(alpha b + sigma x) at that token (a predictor's false
            positives are experts the router also scored high).
alpha, sigma and d are fitted per call (coordinate bisection, 3 rounds, on a fixed seed, 8 layers and the
requested number of tokens; memoised; 0.4-5 s on a CPU for the models here, Qwen3 the slowest), so the trace of any seed matches the
targets in expectation. No hit rate of any cache is used to fit anything.

`--model embedded` records real routing instead (`record_embedded`): the trained embedded model (checkpoints/,
16 experts, top-2) teacher-forced over the last T tokens of its held-out sample (`heldout_sample.txt`, test-split
files of the Python standard library, never trained on): every position's routing is what decoding that text
would route, given the text as context. Its statistics are measured; it has no targets.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from statistics import NormalDist

import numpy as np

# name: (n_experts, top_k, n_layers, (top10, top25, top50), reuse, coverage target or None); see the docstring.
MODELS = {
    "mixtral": (8, 2, 32, (0.12, 0.29, 0.55), 0.31, None),
    "olmoe": (64, 8, 16, (0.31, 0.52, 0.76), 0.31, 0.90),
    "qwen15": (60, 4, 24, (0.15, 0.32, 0.57), 0.13, None),
    "qwen3": (128, 8, 48, (0.39, 0.66, 0.89), 0.35, 0.86),
}
FRACTIONS = (0.10, 0.25, 0.50)
# popularity shapes over the rank r = 1..E: Zipf, a flat-tailed Zipf (Box-Cox of the rank, exponent -1/2: the
# head as steep, the tail flatter), and log-normal (the standard normal quantile of the rank)
SHAPES = {
    "zipf": lambda r: -np.log(r),
    "zipf-flat": lambda r: 2.0 * (r**-0.5 - 1.0),
    "lognormal": lambda r: np.array([NormalDist().inv_cdf(1.0 - (i - 0.5) / len(r)) for i in r]),
}
FAST_RHO = 0.8  # fast state: AR(1) coefficient per token (time constant ~5 tokens)
SLOW_RHO = 0.9995  # dormancy state: ~2000 tokens
FIT_SEED = 12345
FIT_LAYERS = 8
WINDOW = 512


def recall_profile(n_layers: int, recall: float = 0.8, first_recall: float = 0.55, ramp_layers: int = 3
                   ) -> np.ndarray:
    """Predictor recall per layer, [L] float64: NaN at layer 0 (no predictor), `first_recall` at layer 1 rising
    linearly to `recall` at layer `ramp_layers` and after. Raises ValueError outside [0, 1] or ramp_layers < 1."""
    if not (0 <= recall <= 1 and 0 <= first_recall <= 1):
        raise ValueError(f"recall and first_recall must lie in [0, 1], got {recall}, {first_recall}")
    if ramp_layers < 1:
        raise ValueError(f"ramp_layers must be >= 1, got {ramp_layers}")
    out = np.full(n_layers, np.nan)
    for l in range(1, n_layers):
        f = 1.0 if ramp_layers == 1 else min(1.0, (l - 1) / (ramp_layers - 1))
        out[l] = first_recall + (recall - first_recall) * f
    return out


def trace_stats(ids: np.ndarray, predicted: np.ndarray | None, n_experts: int, window: int = WINDOW) -> dict:
    """Statistics of a trace (definitions in the module docstring).

    Args:
      ids: [T, L, k] int routed experts, -1 in dense layers (a layer is dense when all its ids are -1).
      predicted: [T, L, k'] int predicted experts (-1 where a layer has no predictor), or None.
      n_experts: E. window: tokens per coverage window.
    Returns:
      dict of floats: top10, top25, top50 (shares of routed pairs), reuse, coverage (fractions of E), recall
      (NaN without predictions). Raises ValueError for a trace of under 2 tokens or with no MoE layer.
    """
    ids = np.asarray(ids)
    T, L, k = ids.shape
    moe = (ids >= 0).any(axis=(0, 2))
    if T < 2 or not moe.any():
        raise ValueError(f"need >= 2 tokens and one MoE layer, got ids of shape {ids.shape} with {moe.sum()} MoE")
    routed = _one_hot(ids[:, moe], n_experts)  # [T, Lm, E]
    counts = np.sort(routed.sum(axis=0), axis=1)[:, ::-1]  # [Lm, E], busiest first
    out = {}
    for frac in FRACTIONS:
        n = max(1, int(math.floor(frac * n_experts + 0.5)))
        out[f"top{round(frac * 100)}"] = float((counts[:, :n].sum(1) / counts.sum(1)).mean())
    out["reuse"] = float(((routed[:-1] & routed[1:]).sum(-1) / k).mean())
    w = min(T, window)
    out["coverage"] = float(np.mean([routed[s:s + w].any(axis=0).mean() for s in range(0, T - w + 1, w)]))
    out["recall"] = float("nan")
    if predicted is not None:
        predicted = np.asarray(predicted)
        has = moe & (predicted >= 0).any(axis=(0, 2))
        if has.any():
            found = _one_hot(predicted[:, has], n_experts) & _one_hot(ids[:, has], n_experts)
            out["recall"] = float((found.sum(-1) / k).mean())
    return out


def _one_hot(ids: np.ndarray, n: int) -> np.ndarray:
    """[..., k] ids (-1 = none) -> [..., n] bool."""
    out = np.zeros(ids.shape[:-1] + (n + 1,), bool)
    np.put_along_axis(out, np.where(ids < 0, n, ids), True, axis=-1)
    return out[..., :n]


def _check(n_experts, top_k, n_layers, tokens, top_shares, reuse, coverage):
    if not (1 <= top_k < n_experts):
        raise ValueError(f"top_k must be in [1, n_experts), got top_k={top_k}, n_experts={n_experts}")
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    if tokens < 2:
        raise ValueError(f"tokens must be >= 2 (reuse compares consecutive tokens), got {tokens}")
    s = tuple(float(v) for v in top_shares)
    if len(s) != 3 or not (0 < s[0] <= s[1] <= s[2] <= 1):
        raise ValueError(f"top_shares must be 3 shares for the top 10/25/50 % of experts, non-decreasing in (0, 1]"
                         f", got {top_shares}")
    if not 0 <= reuse <= 1:
        raise ValueError(f"reuse must lie in [0, 1], got {reuse}")
    if coverage is not None and not 0 < coverage <= 1:
        raise ValueError(f"coverage must lie in (0, 1] or be None, got {coverage}")
    return s


class _Draws:
    """The random numbers of one trace ([T, L, E] each), independent of the fitted parameters."""

    def __init__(self, n_experts, top_k, n_layers, tokens, seed, layer_corr):
        E, L, T = n_experts, n_layers, tokens
        rng = np.random.default_rng(seed)
        self.rank = np.argsort(rng.random((L, E)), axis=1)  # expert e of layer l has rank rank[l, e] (0 = top)
        perm = np.argsort(rng.random((L, E)), axis=1)  # layer l reads the topic state through perm[l]
        fast = _ar1(rng.standard_normal((T, L, E)), FAST_RHO)
        topic = _ar1(rng.standard_normal((T, E)), FAST_RHO)
        self.x = math.sqrt(1 - layer_corr) * fast + math.sqrt(layer_corr) * topic[:, perm]
        self.slow = _ar1(rng.standard_normal((T, L, E)), SLOW_RHO)
        self.g = rng.gumbel(size=(T, L, E))
        self.g_pred = rng.gumbel(size=(T, L, E))
        self.u_keep = rng.random((T, L, top_k))  # the predictor's keep draws, one per routed slot

    def shape(self, kind):
        """[L, E] popularity logits b_l (0 for the busiest expert)."""
        r = np.arange(1, self.rank.shape[1] + 1, dtype=np.float64)
        table = SHAPES[kind](r)
        return table[self.rank]

    def logits(self, kind, alpha, sigma, dormant):
        """([T, L, E] router logits with dormant experts at -inf, [T, L, E] the same without the Gumbel noise)."""
        base = alpha * self.shape(kind) + sigma * self.x
        if dormant > 0:  # only the less used half of the experts drifts in and out of use
            off = (self.slow < NormalDist().inv_cdf(dormant)) & (self.rank >= self.rank.shape[1] // 2)
            base = np.where(off, -np.inf, base)
        return base + self.g, base


def _ar1(noise, rho):
    """Unit-variance AR(1) along axis 0 of `noise`."""
    out = np.empty_like(noise)
    out[0] = noise[0]
    q = math.sqrt(1 - rho * rho)
    for t in range(1, len(noise)):
        out[t] = rho * out[t - 1] + q * noise[t]
    return out


def _top_k(z, k):
    """Indices [..., k] of the k largest entries of z [..., E], largest first."""
    idx = np.argpartition(-z, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(z, idx, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(idx, order, axis=-1)


def _bisect(f, target, lo, hi, increasing=True, steps=10):
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        if (f(mid) < target) == increasing:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@functools.lru_cache(maxsize=64)
def fit_params(n_experts: int, top_k: int, tokens: int, top_shares: tuple, reuse: float, coverage: float | None,
               layer_corr: float = 0.5) -> dict:
    """Fit (shape, alpha, sigma, dormant) so that a trace of `tokens` tokens has the target statistics.

    Per shape of `SHAPES`: alpha from the popularity alone, then 3 rounds of bisection (sigma on reuse, the
    dormant quantile on coverage, alpha on the mean of the three shares), on FIT_SEED and FIT_LAYERS layers; the
    shape with the smallest worst share error is returned with its statistics (dict: shape, alpha, sigma, dormant,
    stats). Deterministic.
    """
    draws = _Draws(n_experts, top_k, FIT_LAYERS, tokens, FIT_SEED, layer_corr)
    goal = float(np.mean(top_shares))

    def stats(kind, a, s, d):
        z, _ = draws.logits(kind, a, s, d)
        return trace_stats(np.argpartition(-z, top_k - 1, axis=-1)[..., :top_k], None, n_experts)

    def mean_share(st):
        return np.mean([st["top10"], st["top25"], st["top50"]])

    def share_err(st):
        return max(abs(st[f"top{round(f * 100)}"] - t) for f, t in zip(FRACTIONS, top_shares))

    def fit(kind):
        a, s, d = _bisect(lambda v: mean_share(stats(kind, v, 0.0, 0.0)), goal, 0.0, 6.0), 1.0, 0.0
        for _ in range(3):
            s = _bisect(lambda v: stats(kind, a, v, d)["reuse"], reuse, 0.0, 6.0)
            if coverage is not None and coverage < 1:
                d = _bisect(lambda v: stats(kind, a, s, v)["coverage"], coverage, 0.0, 0.95, increasing=False)
            a = _bisect(lambda v: mean_share(stats(kind, v, s, d)), goal, 0.0, 6.0)
        st = stats(kind, a, s, d)
        return share_err(st), dict(shape=kind, alpha=a, sigma=s, dormant=d, stats=st)

    return min((fit(kind) for kind in SHAPES), key=lambda r: r[0])[1]


def generate_trace(n_experts: int, top_k: int, n_layers: int, tokens: int, seed: int, *, top_shares, reuse: float,
                   recall: float = 0.8, first_recall: float = 0.55, ramp_layers: int = 3,
                   coverage: float | None = 0.86, layer_corr: float = 0.5, moe_layers=None) -> dict:
    """Draw a routing trace calibrated to published statistics (model in the module docstring).

    Args:
      n_experts: E; top_k: k routed experts per token (1 <= k < E); n_layers: L; tokens: T decode tokens (>= 2);
      seed: the trace's random seed (the fit uses its own fixed seed).
      top_shares: (top10, top25, top50) target shares of routed pairs held by the busiest 10/25/50 % of experts,
        non-decreasing (arXiv 2505.16056 for the models in `MODELS`).
      reuse: target P(expert routed at t+1 | routed at t), same layer (arXiv 2505.16056).
      recall, first_recall, ramp_layers: predictor recall per layer (`recall_profile`; an estimate from the
        literature, not a measurement).
      coverage: target share of a layer's experts routed in a window of min(T, 512) tokens; None = no dormancy.
      layer_corr: weight in [0, 1) of the shared cross-layer topic state in the fast state.
      moe_layers: [L] bool, False = dense layer (all -1); None = all MoE.
    Returns:
      dict: ids [T, L, k] int32 (-1 in dense layers), weights [T, L, k] float32 (sum 1 over k in MoE layers, 0 in
      dense), predicted [T, L, k] int32 (-1 at layer 0 and in dense layers), recall [L] float64 (the per-layer
      target, NaN at layer 0), params (the fitted parameters and the fit trace's statistics).
    Raises:
      ValueError: top_k not in [1, E), tokens < 2, shares not 3 non-decreasing values in (0, 1], reuse, recall or
        coverage outside [0, 1], layer_corr outside [0, 1), moe_layers not of length L.
    """
    shares = _check(n_experts, top_k, n_layers, tokens, top_shares, reuse, coverage)
    if not 0 <= layer_corr < 1:
        raise ValueError(f"layer_corr must lie in [0, 1), got {layer_corr}")
    moe = np.ones(n_layers, bool) if moe_layers is None else np.asarray(moe_layers, bool)
    if moe.shape != (n_layers,):
        raise ValueError(f"moe_layers must have n_layers={n_layers} entries, got shape {moe.shape}")
    rec = recall_profile(n_layers, recall, first_recall, ramp_layers)
    p = fit_params(n_experts, top_k, tokens, shares, float(reuse), coverage, float(layer_corr))
    draws = _Draws(n_experts, top_k, n_layers, tokens, seed, layer_corr)
    z, base = draws.logits(p["shape"], p["alpha"], p["sigma"], p["dormant"])
    ids = _top_k(z, top_k)  # [T, L, k]
    zk = np.take_along_axis(z, ids, axis=-1)
    w = np.exp(zk - zk[..., :1])
    w /= w.sum(-1, keepdims=True)
    # predictor: keep routed slot j with probability recall_l; fill dropped slots with unrouted experts
    keep = draws.u_keep < np.nan_to_num(rec, nan=0.0)[None, :, None]  # [T, L, k]
    others = base + draws.g_pred
    np.put_along_axis(others, ids, -np.inf, axis=-1)
    fill = _top_k(others, top_k)  # [T, L, k] unrouted experts, best first
    slot = np.clip(np.cumsum(~keep, axis=-1) - 1, 0, top_k - 1)
    pred = np.where(keep, ids, np.take_along_axis(fill, slot, axis=-1))
    pred[:, 0] = -1
    ids, pred, w = ids.astype(np.int32), pred.astype(np.int32), w.astype(np.float32)
    ids[:, ~moe], pred[:, ~moe], w[:, ~moe] = -1, -1, 0.0
    return dict(ids=ids, weights=w, predicted=pred, recall=rec, params=p)


def record_embedded(tokens: int = 512, model=None) -> dict:
    """Routing of the trained embedded model over the last `tokens` tokens of its held-out sample (teacher-forced
    resident forward, float32, one sequence).

    Args:
      tokens: T (2 <= T <= the model's max_position_embeddings); model: a loaded `moepic_jax.Model`, None = the
        embedded default model in float32.
    Returns:
      dict: ids [T, L, k] int32 (-1 in dense layers), weights [T, L, k] float32 (the router's top-k weights),
      predicted [T, L, k] int32 (layer l's router applied to layer l-1's post-attention stream, top k; -1 at
      layer 0 and in dense layers), tokens [T] int32, n_experts int.
    Raises:
      ValueError: tokens out of range.
    The forward is the package's own layer body (`model.decoder_layer`) with the resident MoE block.
    """
    import jax
    import jax.numpy as jnp

    import moepic_jax
    from moepic_jax import model as M
    from moepic_jax.io.checkpoint import default_checkpoint_dir

    model = moepic_jax.load(None, dtype="float32") if model is None else model
    # the experts are pinned in host memory at load; the resident forward reads them from the device
    cfg, params = model.cfg, jax.device_put(model.params, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    if not 2 <= tokens <= cfg.max_position_embeddings:
        raise ValueError(f"tokens must be in [2, {cfg.max_position_embeddings}], got {tokens}")
    text = (default_checkpoint_dir() / "heldout_sample.txt").read_text(encoding="utf-8")
    all_ids = np.asarray(model.tokenizer.encode(text), np.int32)
    tok = all_ids[len(all_ids) - tokens:]
    t = jnp.asarray(tok[None])
    cache = M.init_kv_cache(cfg, 1, tokens, jnp.float32)
    positions, valid, _ = M.cache_positions(cache, jnp.ones(t.shape, bool))
    pos = M.Positions(positions, valid, cache.length)
    h = M.embed(params, t)
    k, v = cache.k, cache.v
    L, K = cfg.n_layers, cfg.top_k
    ids = np.full((tokens, L, K), -1, np.int32)
    weights = np.zeros((tokens, L, K), np.float32)
    pred = np.full((tokens, L, K), -1, np.int32)
    for l, lp in enumerate(params.layers):  # as model.forward_tokens, recording the routers
        def ffn(x, h_mid, l=l, lp=lp):
            x = x.reshape(tokens, -1)
            if l + 1 < L and cfg.moe_layers[l + 1]:
                nxt = params.layers[l + 1]
                pred[:, l + 1] = np.asarray(M.route(M.rms_norm(h_mid, nxt.mlp_norm, cfg.rms_eps).reshape(tokens, -1),
                                                    nxt.moe.w_router, cfg)[0])
            if not cfg.moe_layers[l]:
                return M.mlp(x, lp.mlp).reshape(1, tokens, -1), None
            r_ids, r_w = M.route(x, lp.moe.w_router, cfg)
            ids[:, l], weights[:, l] = np.asarray(r_ids), np.asarray(r_w)
            return M.moe_resident(x, lp.moe, cfg).reshape(1, tokens, -1), None

        h, k, v, _ = M.decoder_layer(lp, h, k, v, l, pos, cfg, ffn)
    return dict(ids=ids, weights=weights, predicted=pred, tokens=tok, n_experts=cfg.n_experts)


def model_trace(name: str, tokens: int, seed: int, recall: float = 0.8, first_recall: float = 0.55,
                reuse: float | None = None) -> tuple[dict, dict | None]:
    """(trace, targets) for a name of `MODELS` or "embedded" (targets None). reuse overrides the table's."""
    if name == "embedded":
        tr = record_embedded(tokens)
        return tr, None
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join([*MODELS, 'embedded'])}")
    E, k, L, shares, ru, cov = MODELS[name]
    ru = ru if reuse is None else reuse
    tr = generate_trace(E, k, L, tokens, seed, top_shares=shares, reuse=ru, recall=recall,
                        first_recall=first_recall, coverage=cov)
    tr["n_experts"] = E
    targets = dict(top10=shares[0], top25=shares[1], top50=shares[2], reuse=ru, coverage=cov,
                   recall=float(np.nanmean(tr["recall"])))
    return tr, targets


def _row(name, st, tg):
    cols = ("top10", "top25", "top50", "reuse", "coverage", "recall")

    def cell(c):
        t = None if tg is None else tg[c]
        return f"{st[c]:.3f}" + (" (-)" if t is None else f" ({t:.2f})")
    return f"| {name} | " + " | ".join(cell(c) for c in cols) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen15", help=f"{', '.join(MODELS)}, embedded, or all (no --out)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recall", type=float, default=0.8, help="predictor recall from layer 3 on")
    ap.add_argument("--first-recall", type=float, default=0.55, help="predictor recall at layer 1")
    ap.add_argument("--reuse", type=float, default=None, help="override the reuse target (Qwen3 free-running: 0.45)")
    ap.add_argument("--out", default=None, help="trace file (.npz)")
    a = ap.parse_args(argv)
    names = [*MODELS, "embedded"] if a.model == "all" else [a.model]
    if a.out and len(names) > 1:
        ap.error("--out needs a single --model")
    rows = []
    for name in names:
        tr, tg = model_trace(name, a.tokens, a.seed, a.recall, a.first_recall, a.reuse)
        st = trace_stats(tr["ids"], tr["predicted"], tr["n_experts"])
        rows.append(_row(name, st, tg))
        if a.out:
            np.savez(a.out, ids=tr["ids"], weights=tr["weights"], predicted=tr["predicted"], model=np.array(name),
                     seed=np.array(a.seed), recall=np.array(a.recall), first_recall=np.array(a.first_recall),
                     n_experts=np.array(tr["n_experts"]))
            print(f"wrote {a.out}: ids/weights/predicted {tr['ids'].shape}")
    print(f"\ntrace statistics over {a.tokens} tokens, seed {a.seed} (target in brackets; arXiv 2505.16056 for the"
          " shares and reuse, coverage range 0.75-0.97, recall: the literature estimate's layer mean)")
    print("| model | top10 | top25 | top50 | reuse | coverage | recall |\n|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

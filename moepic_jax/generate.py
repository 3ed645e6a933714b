"""`generate()` and `forward()`: prompt handling, sampling, stop conditions, streaming and stats.

Prompts of different lengths are left-padded into one batch; RoPE positions count real tokens
only (HF `generate` does the same with `position_ids = cumsum(attention_mask) - 1`). The prompt
length is padded to a power of two and the KV cache length to a power of two, so the number of
compiled shapes stays small.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax import sampling
from moepic_jax.engine import device_memory_stats, make_engine
from moepic_jax.weights import Model


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
    from the call (compiled steps ready) to the first token; compile time is in `compile_s`, apart.
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

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def summary(self) -> str:
        """One line: TTFT, TPOT, hit rate, H2D MB per token, policy, budget."""
        b = "none" if self.vram_budget_bytes is None else f"{self.vram_budget_bytes / 2**30:.3g} GiB"
        hit = self.full_hit_rate + self.top_only_hit_rate
        return (f"policy={self.policy} budget={b} TTFT={self.ttft_s * 1e3:.1f} ms TPOT={self.tpot_s * 1e3:.2f} ms "
                f"({self.tokens_per_s:.1f} tok/s) hit={hit:.1%} (full {self.full_hit_rate:.1%}) "
                f"H2D={self.h2d_bytes_per_token / 1e6:.2f} MB/token recall={self.predictor_recall:.1%} "
                f"compiles={self.compile_count} ({self.compile_s:.1f} s)")


@dataclasses.dataclass
class GenerateResult:
    text: str | list[str] | None  # str for one prompt, list for a list; None without a tokenizer
    token_ids: list[list[int]]  # new tokens per prompt
    stats: GenerateStats


def _bucket(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _normalize_prompts(prompts, tokenizer) -> tuple[list[list[int]], bool]:
    """-> (token id lists, single). Accepts str, list[str], list[int], list[list[int]]."""
    if isinstance(prompts, str):
        prompts, single = [prompts], True
    elif isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, (int, np.integer)) for t in prompts):
        prompts, single = [list(prompts)], True
    elif isinstance(prompts, (list, tuple)):
        single = False
    else:
        raise ValueError(f"prompts must be a str, a list of str, or token ids; got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("this model has no tokenizer; pass token ids (list[int]) instead of text")
            ids = tokenizer.encode(p, add_special_tokens=True) if p else []
        elif isinstance(p, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in p):
            ids = [int(t) for t in p]
        else:
            raise ValueError(f"prompt {i} is neither a str nor a list of int token ids")
        if not ids:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        out.append(ids)
    return out, single


def _engine_for(model: Model, policy: str, vram_budget, plan, engine_kw, batch: int, max_len: int):
    """The engine kept on the model for (policy, budget, plan): built once, reused by later calls.

    Offloading engines reserve a KV cache of max_batch x max_seq_len in their budget; unless the caller
    fixes them, they are sized for this call and the engine is rebuilt when a later call needs more.
    """
    if isinstance(engine_kw.get("devices"), (list, tuple)):
        engine_kw = {**engine_kw, "devices": tuple(engine_kw["devices"])}  # hashable, for the key below

    def hashable(v):  # profiles (profile=, hardware=) are keyed by their JSON
        return v.to_json() if hasattr(v, "to_json") else v

    key = (policy, str(vram_budget), None if plan is None else plan.to_json(),
           tuple(sorted((k, hashable(v)) for k, v in engine_kw.items())))
    engines = model.__dict__.setdefault("_engines", {})
    eng = engines.get(key)
    if eng is not None and policy != "resident" and (eng.max_batch < batch or eng.max_seq_len < max_len):
        eng = None
    if eng is None:
        engines.clear()  # one engine at a time: each holds device memory
        import gc

        gc.collect()  # engines hold reference cycles (compiled bound methods): free their device arrays now
        kw = dict(engine_kw)
        if policy != "resident":
            kw.setdefault("max_batch", batch)
            kw.setdefault("max_seq_len", max_len)
        eng = engines[key] = make_engine(model, policy=policy, vram_budget=vram_budget, plan=plan, **kw)
    return eng


def forward(model: Model, token_ids, attention_mask=None) -> np.ndarray:
    """Resident forward pass for verification.

    Args:
      token_ids: [batch, seq] ints; attention_mask: [batch, seq] (1 = token, 0 = left padding) or None.
    Returns:
      logits [batch, seq, vocab] float32 (NumPy). Positions count real tokens only.
    """
    tokens = jnp.asarray(np.asarray(token_ids, np.int32))
    if tokens.ndim != 2:
        raise ValueError(f"token_ids must be [batch, seq], got shape {tokens.shape}")
    mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(np.asarray(attention_mask) != 0)
    cache = M.init_kv_cache(model.cfg, tokens.shape[0], tokens.shape[1], jnp.dtype(model.dtype))
    params = jax.device_put(model.params, jax.sharding.SingleDeviceSharding(jax.devices()[0]))  # device memory
    fn = jax.jit(M.forward_tokens, static_argnums=1)
    logits, _ = fn(params, model.cfg, tokens, mask, cache)
    return np.asarray(logits)


def generate(
    prompts,
    model: Model | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str] | str | None = None,
    policy: str = "moepic",
    vram_budget=None,
    plan=None,
    stream: Callable[[int, str], None] | None = None,
    engine=None,
    **engine_kw,
) -> GenerateResult:
    """Generate text with an MoE model whose experts may be offloaded to host memory.

    Args:
      prompts: a str, a list of str, or token ids (`list[int]` or `list[list[int]]`).
      model: a `Model` from `moepic_jax.load`; None loads the embedded default model.
      max_new_tokens: new tokens per prompt (>= 1).
      temperature: 0 = greedy; > 0 samples. top_k: 0 = off. top_p: 1 = off.
      seed: PRNG seed for sampling.
      stop: strings that end a prompt's generation (the text is cut before them); the model's EOS
        tokens always stop.
      policy: "resident", "ondemand", "lru", "static" or "moepic" (DESIGN.md, Policies).
      vram_budget: everything the engine may hold on the device: bytes, a fraction of the weights,
        "6GiB", "500MB", "40%"; None = no limit.
      plan: a `planner.CachePlan` for "static"/"moepic"; None = solved from a profile.
      stream: called as `stream(prompt_index, new_text)` as text is produced (needs a tokenizer).
      engine: an engine from `moepic_jax.Engine(...)` to use instead of building one.
      **engine_kw: for the offloading policies, passed to `OffloadEngine`: max_batch, max_seq_len, granule,
        n_predicted, prefetch (None = as the plan says, True/False to force next-layer prefetch), profile,
        hardware, and devices (a device count or list: the experts are split over an `expert` mesh axis of those
        devices and `vram_budget` is per device).
    Returns:
      `GenerateResult` (.text, .token_ids [batch][new], .stats).
    Raises:
      ValueError: empty prompts, a prompt longer than the context, bad sampling arguments, a budget
        below what the policy needs, an unknown policy.
    """
    if model is None:
        from moepic_jax.weights import load

        model = load()
    sampling.check_sampling_args(temperature, top_k, top_p)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not isinstance(s, str) or not s for s in stops):
        raise ValueError("stop must be a non-empty str or a list of non-empty str")
    tok = model.tokenizer
    ids, single = _normalize_prompts(prompts, tok)
    cfg = model.cfg
    longest = max(len(p) for p in ids)
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the context of "
                         f"{cfg.max_position_embeddings} tokens; shorten the prompt or lower max_new_tokens")
    bad = [t for p in ids for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    B = len(ids)
    T = _bucket(longest)
    max_len = _bucket(T + max_new_tokens)  # a power of two bounds the number of compiled shapes
    reserved = getattr(engine, "max_seq_len", None)
    if reserved is not None and T + max_new_tokens <= reserved < max_len:
        max_len = reserved  # a held engine's reservation is enough
    if engine is None:
        engine = _engine_for(model, policy, vram_budget, plan, engine_kw, B, max_len)
    tokens = np.zeros((B, T), np.int32)
    mask = np.zeros((B, T), bool)
    for i, p in enumerate(ids):
        tokens[i, T - len(p):] = p
        mask[i, T - len(p):] = True
    eos = set(cfg.eos_token_id)
    if tok is not None and tok.eos_token_id is not None:
        eos.add(int(tok.eos_token_id))

    compiles0 = (engine.compiles.count, engine.compiles.seconds)
    state = engine.new_state(B, max_len)
    tokens_d, mask_d = jnp.asarray(tokens), jnp.asarray(mask)
    dec_tokens = jnp.zeros((B,), jnp.int32)
    engine.warmup(state, tokens_d, mask_d, dec_tokens)
    key = jax.random.PRNGKey(seed)
    temp, topp = jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p)

    def pick(logits, key):
        if temperature == 0:
            return sampling.greedy(logits)
        return sampling.sample(logits, key, temp, top_k, topp, use_top_p=top_p < 1.0)

    # Warm the sampler and PRNG too, so TTFT holds no compile time.
    zeros = jnp.zeros((B, cfg.vocab_size), jnp.float32)
    if getattr(engine, "replicated_sharding", None) is not None:  # placed like the engine's logits (several devices)
        zeros = jax.device_put(zeros, engine.replicated_sharding)
    np.asarray(pick(zeros, jax.random.split(key)[1]))
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    texts = [""] * B
    counters = []
    step_times = []
    t0 = time.perf_counter()
    logits, state, c_prefill = engine.prefill(state, tokens_d, mask_d)
    key, sub = jax.random.split(key)
    nxt = pick(logits, sub)
    nxt_host = np.asarray(nxt)
    ttft = time.perf_counter() - t0
    t_prev = time.perf_counter()
    for step in range(max_new_tokens):
        # Dispatch step t+1 before reading token t back, so that the device never waits for Python (dispatch,
        # stop checks, streaming): the read below waits for step t only, while step t+1 is already queued. If
        # every row stops at token t, step t+1's work is dropped.
        ahead = step < max_new_tokens - 1
        if ahead:
            logits, state, c = engine.decode(state, nxt)
            key, sub = jax.random.split(key)
            nxt_next = pick(logits, sub)
        if step > 0:
            nxt_host = np.asarray(nxt)
            now = time.perf_counter()
            step_times.append(now - t_prev)
            t_prev = now
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt_host[i])
            out[i].append(t)
            if t in eos:
                done[i] = True
            if tok is not None and (stream is not None or stops):
                full = tok.decode([x for x in out[i] if x not in eos], skip_special_tokens=True)
                cut = min((full.find(s) for s in stops if s in full), default=-1)
                if cut >= 0:
                    full, done[i] = full[:cut], True
                if stream is not None and len(full) > len(texts[i]) and full.startswith(texts[i]):
                    stream(i, full[len(texts[i]):])
                texts[i] = full
        if all(done) or not ahead:
            break
        counters.append(c)
        nxt = nxt_next
    stats = _stats(engine, cfg, B, len(ids[0]) if B == 1 else sum(map(len, ids)), out, ttft, step_times, counters,
                   c_prefill, compiles0)
    text = None
    if tok is not None:
        text = []
        for i in range(B):
            full = tok.decode([x for x in out[i] if x not in eos], skip_special_tokens=True)
            cut = min((full.find(s) for s in stops if s in full), default=-1)
            text.append(full[:cut] if cut >= 0 else full)
        text = text[0] if single else text
    return GenerateResult(text=text, token_ids=out, stats=stats)


def _stats(engine, cfg, batch, prompt_tokens, out, ttft, step_times, counters, c_prefill, compiles0) -> GenerateStats:
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
    elif engine.policy == "resident":
        full, top, miss, recall = 1.0, 0.0, 0.0, nan
    else:
        full = top = miss = recall = nan
    h2d = float(agg["h2d_bytes"].sum() / steps) if "h2d_bytes" in agg else 0.0
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
    )

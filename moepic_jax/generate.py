"""`generate()` and `forward()`: prompt handling, sampling, stop conditions, streaming and stats.

Prompts of different lengths are left-padded into one batch; RoPE positions count real tokens
only (HF `generate` does the same with `position_ids = cumsum(attention_mask) - 1`). The prompt
length is padded to a power of two and the KV cache length to a power of two, so the number of
compiled shapes stays small.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moepic_jax import model as M
from moepic_jax import sampling
from moepic_jax.io.loading import Model, load
from moepic_jax.offload.policies import policy_spec
from moepic_jax.runtime.factory import EngineCache, engine_key, make_engine
from moepic_jax.stats import GenerateStats, collect_stats


@dataclasses.dataclass
class GenerateResult:
    text: str | list[str] | None  # str for one prompt, list for a list; None without a tokenizer
    token_ids: list[list[int]]  # new tokens per prompt
    stats: GenerateStats


def bucket(n: int, minimum: int = 8) -> int:
    """The smallest power of two >= n (and >= minimum): prompt and KV lengths, so few shapes compile."""
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


# The engines `generate` keeps between calls (one model at a time). `ENGINES.clear()` frees their device and pinned
# memory; callers who want their own lifetime pass `engine=` (`moepic_jax.make_engine`) instead.
ENGINES = EngineCache()


def _engine_for(model: Model, policy: str, vram_budget, plan, engine_kw, batch: int, max_len: int):
    """The engine kept in ENGINES for (model, policy, budget, plan, engine_kw): built once, reused by later calls.

    Offloading engines reserve a KV cache of max_batch x max_seq_len in their budget; unless the caller
    fixes them, they are sized for this call and the engine is rebuilt when a later call needs more.
    """
    offloads = policy_spec(policy).offloads
    cache = ENGINES.for_model(model)
    key = engine_key(policy, vram_budget, plan, {k: v for k, v in engine_kw.items() if k != "progress"})
    eng = cache.engines.get(key)
    if eng is not None and offloads and (eng.max_batch < batch or eng.max_seq_len < max_len):
        eng = None
    if eng is None:
        cache.drop_engines()  # one engine at a time: each holds device memory
        kw = dict(engine_kw)
        if offloads:
            kw.setdefault("max_batch", batch)
            kw.setdefault("max_seq_len", max_len)
        eng = cache.engines[key] = make_engine(model, policy=policy, vram_budget=vram_budget, plan=plan, cache=cache,
                                               **kw)
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
    vram_budget="auto",
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
      vram_budget: everything the engine may hold on the device (`offload/memory.py`): "auto" (default: on a GPU
        its free memory less a margin, resident when the model fits; on the CPU the minimum plus 25 % of the expert
        bytes), bytes or "6GiB" / "500MB", a share of the expert bytes on top of the minimum ("40%" or 0.4), or
        None (no limit).
      plan: a `planning.profiles.CachePlan` for "static"/"moepic"; None = solved from a profile.
      stream: called as `stream(prompt_index, new_text)` as text is produced (needs a tokenizer).
      engine: an engine from `moepic_jax.make_engine(...)` to use instead of building one.
      **engine_kw: for the offloading policies, passed to `make_engine`: max_batch, max_seq_len, granule,
        n_predicted, prefetch (None = as the plan says, True/False to force next-layer prefetch), profile,
        hardware, devices (a device count or list: the experts are split over an `expert` mesh axis of those
        devices and `vram_budget` is per device), and progress (progress bars while the engine is built; not part
        of the key of the engine kept for later calls).
    Returns:
      `GenerateResult` (.text, .token_ids [batch][new], .stats).
    Raises:
      ValueError: empty prompts, a prompt longer than the context, bad sampling arguments, a budget
        below what the policy needs, an unknown policy.
    """
    t_call = time.perf_counter()
    if model is None:
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
    # Powers of two bound the number of compiled shapes; the KV cache never reserves more than the context (the
    # prompt's padding shrinks first: longest + max_new_tokens <= context was checked above).
    ctx = cfg.max_position_embeddings
    T = min(bucket(longest), ctx - max_new_tokens)
    max_len = min(bucket(T + max_new_tokens), ctx)
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
    n_prompt = len(ids[0]) if B == 1 else sum(map(len, ids))
    stats = collect_stats(engine, cfg, B, n_prompt, out, ttft, step_times, counters, c_prefill, compiles0)
    stats.setup_s = t0 - t_call
    text = None
    if tok is not None:
        text = []
        for i in range(B):
            full = tok.decode([x for x in out[i] if x not in eos], skip_special_tokens=True)
            cut = min((full.find(s) for s in stops if s in full), default=-1)
            text.append(full[:cut] if cut >= 0 else full)
        text = text[0] if single else text
    return GenerateResult(text=text, token_ids=out, stats=stats)

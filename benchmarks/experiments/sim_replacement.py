"""Would a frequency-based replacement rule beat the static hot set and LRU? Hit rates by replay.

The decode's routing does not depend on the cache (the engine is exact), so each rule can be replayed on one
recorded routing trace: per MoE layer, the routed experts of every token of a text ([T, top_k], from
`calibrate.route_all`, the same forward the profiler runs). With n whole-expert slots per layer (n = frac x E):
  static     the n experts most frequent in the calibration text (what `static` / `moepic` keep);
  lru        least recently used out, every miss admitted (the engine's rule, `cache.lru_slots`: hits first);
  lfu        least frequently used out (counts start from the calibration counts), every miss admitted;
  lfu-admit  as lfu, but a missed expert is admitted only when its count beats the coldest cached expert's
             (TinyLFU's admission filter);
  freq       the engine's frequency rule (`cache.freq_slots`): as lfu-admit, but the counts start at zero and are
             multiplied by --decay every token (a sliding frequency);
  freq-seeded  as freq, the counts starting from the calibration frequencies (scaled to an expert used every token);
  belady     the offline optimum (evict the expert used again furthest in the future, admit only a newcomer
             needed sooner), from the static hot set: an upper bound.
A rule never evicts an expert the same token uses. Hit rate = routed (token, expert) pairs found in the cache.
The trained embedded model's routing is the realistic one; random weights route by prompt (benchmarks.bench_routing).

  python -m benchmarks.experiments.sim_replacement [--variants trained,zipf] [--budgets 0.1,0.25,0.5]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

RULES = ("static", "lru", "lfu", "lfu-admit", "freq", "freq-seeded", "belady")


def replay(rule: str, trace: np.ndarray, n: int, prior: np.ndarray, decay: float = 0.98) -> float:
    """Hit rate of `rule` with n slots on trace [T, K] (expert ids) given calibration counts prior [E]."""
    T, K = trace.shape
    if n == 0:
        return 0.0
    hits = 0
    if rule == "static":
        hot = set(np.argsort(-prior, kind="stable")[:n].tolist())
        return float(np.isin(trace, list(hot)).mean())
    if rule == "lru":
        cache = collections.OrderedDict()  # expert -> None, least recent first
        for t in range(T):
            used = list(dict.fromkeys(trace[t].tolist()))
            for e in used:
                if e in cache:
                    hits += 1
                    cache.move_to_end(e)
            for e in used:
                if e not in cache:
                    if len(cache) >= n:
                        victim = next((v for v in cache if v not in used), None)
                        if victim is None:
                            continue
                        del cache[victim]
                    cache[e] = None
        return hits / (T * K)
    if rule == "belady":
        nxt = collections.defaultdict(collections.deque)  # expert -> its future use times
        for t in range(T):
            for e in set(trace[t].tolist()):
                nxt[e].append(t)
        cache = set(np.argsort(-prior, kind="stable")[:n].tolist())  # from the static hot set, as lfu
        for t in range(T):
            used = set(trace[t].tolist())
            for e in used:
                nxt[e].popleft()
            hits += sum(e in cache for e in trace[t].tolist())
            for e in used - cache:
                if len(cache) >= n:
                    cands = [v for v in cache if v not in used]
                    if not cands:
                        continue
                    far = max(cands, key=lambda v: nxt[v][0] if nxt[v] else T + 1)
                    # admit only if the newcomer is needed sooner than the one it would evict
                    if (nxt[e][0] if nxt[e] else T + 1) >= (nxt[far][0] if nxt[far] else T + 1):
                        continue
                    cache.remove(far)
                cache.add(e)
        return hits / (T * K)
    # frequency rules: the misses hottest first (ties: trace order), each against the coldest cached expert this
    # token does not use; with the admission filter the first refusal ends the token (as `cache.freq_slots`)
    decayed = rule in ("freq", "freq-seeded")
    if rule == "freq":
        count = np.zeros(len(prior))
    elif rule == "freq-seeded":  # the calibration frequencies at the scale of an expert used every token
        count = prior / max(prior.sum(), 1) * K / (1 - decay)
    else:
        count = prior.astype(np.float64)
    cache = set(np.argsort(-prior, kind="stable")[:n].tolist())  # start from the static hot set
    for t in range(T):
        used = list(dict.fromkeys(trace[t].tolist()))
        if decayed:
            count *= decay
        hits += sum(e in cache for e in trace[t].tolist())
        for e in used:
            count[e] += 1
        for e in sorted((e for e in used if e not in cache), key=lambda e: -count[e]):
            if len(cache) < n:
                cache.add(e)
                continue
            cands = [v for v in cache if v not in used]
            if not cands:
                break
            coldest = min(cands, key=lambda v: count[v])
            if rule != "lfu" and count[e] <= count[coldest]:
                break
            cache.remove(coldest)
            cache.add(e)
    return hits / (T * K)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="trained,random,zipf")
    ap.add_argument("--budgets", default="0.1,0.25,0.5")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--trace-tokens", type=int, default=512)
    ap.add_argument("--decay", type=float, default=None, help="default: the engine's cache.FREQ_DECAY")
    ap.add_argument("--zipf", type=float, default=1.0)
    ap.add_argument("--out-dir", default=None)
    a = ap.parse_args(argv)
    from benchmarks import common as C
    import moepic_jax
    from moepic_jax.io.checkpoint import default_checkpoint_dir
    from moepic_jax.offload.cache import FREQ_DECAY
    from moepic_jax.planning.calibrate import route_all
    from moepic_jax.runtime.factory import make_engine

    a.decay = FREQ_DECAY if a.decay is None else a.decay
    trained = moepic_jax.load(dtype="float32")
    cfg = trained.cfg
    ids = np.asarray(trained.tokenizer.encode((default_checkpoint_dir() / "heldout_sample.txt").read_text()), np.int32)
    if len(ids) < a.calib_tokens + a.trace_tokens:
        raise SystemExit(f"the held-out sample has {len(ids)} tokens; --calib-tokens + --trace-tokens must be <= that")
    calib, trace_tokens = ids[: a.calib_tokens], ids[len(ids) - a.trace_tokens:]  # two distant parts
    fracs = [float(x) for x in a.budgets.split(",")]
    rows = []
    for variant in a.variants.split(","):
        model = trained if variant == "trained" else C.random_model(
            cfg, dtype="float32", seed=0, zipf_bias=a.zipf if variant == "zipf" else None, progress=False)
        eng = make_engine(model, policy="ondemand", max_batch=1, max_seq_len=max(a.calib_tokens, a.trace_tokens))
        cal, _ = route_all(eng.weights, calib)
        run, _ = route_all(eng.weights, trace_tokens)
        del eng
        for frac in fracs:
            n = int(round(frac * cfg.n_experts))
            row = {"variant": variant, "budget_frac": frac, "slots": n}
            for rule in RULES:
                per_layer = [replay(rule, run[l], n, np.bincount(cal[l].ravel(), minlength=cfg.n_experts), a.decay)
                             for l in sorted(run)]
                row[rule] = float(np.mean(per_layer))
            rows.append(row)
            print(json.dumps(row), flush=True)
    env = C.env_info()
    out = {"command": C.command_line(), "env": env, "calib_tokens": a.calib_tokens,
           "trace_tokens": a.trace_tokens, "decay": a.decay, "rows": rows}
    head = "| routing | slots (of E) | " + " | ".join(RULES) + " |\n|---|---|" + "---|" * len(RULES)
    lines = [head] + [f"| {r['variant']} | {r['slots']} ({r['budget_frac']:.0%}) | " + " | ".join(
        f"{r[k]:.1%}" for k in RULES) + " |" for r in rows]
    print("\n" + "\n".join(lines))
    if a.out_dir:
        Path(a.out_dir).mkdir(parents=True, exist_ok=True)
        Path(a.out_dir, "sim_replacement.json").write_text(json.dumps(out, indent=1))
        Path(a.out_dir, "sim_replacement.md").write_text(
            f"# Replacement rules replayed on recorded routing\n\n- command: `{out['command']}`\n- date (UTC): "
            f"{env.get('date')}\n- {cfg.n_layers} layers x {cfg.n_experts} experts, top-{cfg.top_k}; calibration "
            f"{a.calib_tokens} tokens, trace {a.trace_tokens} tokens of the held-out text; decay {a.decay}\n\n"
            + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

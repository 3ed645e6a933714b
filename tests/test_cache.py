"""Replacement rules replayed on scripted expert traces, against a plain-Python reference (no model)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moepic_jax.offload import cache as C

E, D = 8, 4


def _cache(n, split, cached=()):
    tops = jnp.zeros((n, split, 3, D), jnp.float32)
    tops = tops.at[: len(cached)].set(jnp.asarray([np.full((split, 3, D), e, np.float32) for e in cached]).reshape(
        len(cached), split, 3, D)) if cached else tops
    return C.init_layer_cache(tops, list(cached), E)


def _buffers(experts, F):
    """An expert's assembled buffer is filled with its id, so slot contents can be checked."""
    return jnp.stack([jnp.full((F, 3, D), max(e, -1), jnp.float32) for e in experts])


def _ref_lru(trace, n):
    """Reference LRU over steps of distinct experts: (full hits, misses) and the final resident set.

    As in the engine, a step's experts are looked up against the cache as it was when the step began (their
    buffers are assembled before any admission); the hits are used first, then the misses admitted, each in order."""
    od = collections.OrderedDict()
    hits = misses = 0
    for step in trace:
        step = [e for e in step if e >= 0]
        resident = set(od)
        hits += sum(e in resident for e in step)
        misses += sum(e not in resident for e in step)
        for e in [e for e in step if e in resident] + [e for e in step if e not in resident]:
            if e in od:
                od.move_to_end(e)
            else:
                if len(od) >= n:
                    od.popitem(last=False)
                od[e] = True
    return hits, misses, set(od)


@pytest.mark.parametrize("per_step", [2, 4])
@pytest.mark.parametrize("n_slots", [1, 2, 3, 5])
def test_lru_matches_reference_on_a_trace(n_slots, per_step):
    """Steps of 2 (top-2) or 4 distinct experts (batch > 1: more misses in one step than slots), with padding."""
    rng = np.random.RandomState(n_slots * 10 + per_step)
    # skewed trace of 40 steps, some padding (-1)
    trace = []
    for _ in range(40):
        step = [int(e) for e in rng.choice(E, per_step, replace=False, p=np.array([8, 6, 5, 3, 2, 1, 1, 1]) / 27)]
        if rng.rand() < 0.2:
            step[rng.randint(per_step)] = -1
        trace.append(step)
    F = 6
    cache = _cache(n_slots, F)
    update = jax.jit(lambda c, ex, bufs, step: C.update("lru", c, ex, bufs, step))
    hits = misses = 0
    for t, step in enumerate(trace, start=1):
        ex = jnp.asarray(step, jnp.int32)
        full, top, miss = C.classify(cache, ex, F, F)
        assert not bool(top.any())  # whole experts: never top-only
        hits += int(full.sum())
        misses += int(miss.sum())
        cache = update(cache, ex, _buffers(step, F), jnp.int32(t))
    rh, rm, resident = _ref_lru(trace, n_slots)
    assert (hits, misses) == (rh, rm)
    owner = set(int(o) for o in np.asarray(cache.owner) if o >= 0)
    assert owner == resident
    # slot map and slot contents agree with the owners
    for slot, e in enumerate(np.asarray(cache.owner)):
        if e >= 0:
            assert int(cache.slot_of[e]) == slot
            assert np.all(np.asarray(cache.tops[slot]) == e)
    assert int((np.asarray(cache.slot_of) >= 0).sum()) == len(resident)


def test_lru_from_a_full_cache_matches_reference():
    """The engine's real start: every slot filled by the plan, all last uses 0 (ties broken by the lowest slot)."""
    rng = np.random.RandomState(7)
    start = (5, 2, 7)
    cache = _cache(3, 6, cached=start)
    trace = [[int(e) for e in rng.choice(E, 3, replace=False)] for _ in range(30)]
    od = collections.OrderedDict((e, True) for e in start)  # slot order = age order at equal stamps
    hits = misses = 0
    for t, step in enumerate(trace, start=1):
        full, _, miss = C.classify(cache, jnp.asarray(step, jnp.int32), 6, 6)
        want_hits = sum(e in od for e in step)
        assert (int(full.sum()), int(miss.sum())) == (want_hits, len(step) - want_hits)
        hits += want_hits
        for e in [e for e in step if e in od] + [e for e in step if e not in od]:
            if e in od:
                od.move_to_end(e)
            else:
                od.popitem(last=False)
                od[e] = True
        cache = C.update("lru", cache, jnp.asarray(step, jnp.int32), _buffers(step, 6), jnp.int32(t))
        assert set(int(o) for o in np.asarray(cache.owner)) == set(od)
    assert hits > 0
    for slot, e in enumerate(np.asarray(cache.owner)):
        assert int(cache.slot_of[e]) == slot and np.all(np.asarray(cache.tops[slot]) == e)


def test_lru_ignores_padding_and_protects_same_step():
    cache = _cache(2, 4)
    cache = C.update("lru", cache, jnp.asarray([3, -1], jnp.int32), _buffers([3, -1], 4), jnp.int32(1))
    assert sorted(np.asarray(cache.owner).tolist()) == [-1, 3]
    cache = C.update("lru", cache, jnp.asarray([5, 6], jnp.int32), _buffers([5, 6], 4), jnp.int32(2))
    # 3 was least recently used: both new experts now resident, 3 evicted
    assert sorted(np.asarray(cache.owner).tolist()) == [5, 6]
    assert int(cache.slot_of[3]) == -1


def _ref_freq(trace, n, start=()):
    """Reference of the frequency rule, one admission at a time: (hits, misses) per step and the final slots.

    Scores decay by FREQ_DECAY each step, then each used expert's grows by 1 (float32, as on the device). The misses,
    hottest first (ties: step order), each take the slot of the coldest expert this step does not use (empty slots
    first, then the lowest slot), while the miss is hotter than that expert; the first refusal ends the step."""
    score = np.zeros(E, np.float32)
    slots = list(start) + [-1] * (n - len(start))
    counts = []
    for step in trace:
        used = [e for e in step if e >= 0]
        score = score * np.float32(C.FREQ_DECAY)
        for e in used:
            score[e] += np.float32(1)
        hits = sum(e in slots for e in used)
        counts.append((hits, len(used) - hits))
        for e in sorted((e for e in used if e not in slots), key=lambda e: -score[e]):
            free = [i for i, o in enumerate(slots) if o not in used]
            if not free:
                break
            victim = min(free, key=lambda i: (-1.0 if slots[i] < 0 else score[slots[i]], i))
            if slots[victim] >= 0 and not score[e] > score[slots[victim]]:
                break
            slots[victim] = e
    return counts, slots


@pytest.mark.parametrize("per_step", [2, 4])
@pytest.mark.parametrize("n_slots", [1, 2, 3, 5])
@pytest.mark.parametrize("start", [(), "full"])
def test_freq_matches_reference_on_a_trace(n_slots, per_step, start):
    """The frequency rule (`moepic`) against the one-at-a-time reference: hits and misses of every step, which
    expert sits in which slot, and the slots' rows. Skewed traces with padding; empty and plan-filled starts."""
    rng = np.random.RandomState(n_slots * 10 + per_step + (0 if start == () else 100))
    p = np.array([8, 6, 5, 3, 2, 1, 1, 1]) / 27
    trace = [[int(e) if rng.rand() > 0.15 else -1 for e in rng.choice(E, per_step, replace=False, p=p)]
             for _ in range(60)]
    cached = tuple(range(E - 1, E - 1 - n_slots, -1)) if start == "full" else ()  # the plan's (cold) hot set
    F = 6
    cache = _cache(n_slots, F, cached=cached)
    update = jax.jit(lambda c, ex, bufs: C.update("freq", c, ex, bufs, jnp.int32(0)))
    got = []
    for step in trace:
        full, _, miss = C.classify(cache, jnp.asarray(step, jnp.int32), F, F)
        got.append((int(full.sum()), int(miss.sum())))
        cache = update(cache, jnp.asarray(step, jnp.int32), _buffers(step, F))
    want, slots = _ref_freq(trace, n_slots, cached)
    assert got == want
    assert np.asarray(cache.owner).tolist() == slots
    assert sum(h for h, _ in got) > 0 and any(s != c for s, c in zip(slots, cached or [-1] * n_slots))
    for slot, e in enumerate(slots):
        if e >= 0:
            assert int(cache.slot_of[e]) == slot and np.all(np.asarray(cache.tops[slot]) == e)
    assert int((np.asarray(cache.slot_of) >= 0).sum()) == sum(e >= 0 for e in slots)


def test_freq_keeps_a_hot_expert_against_a_one_off():
    """The admission filter: an expert used once does not evict one used often (LRU would)."""
    cache = _cache(1, 4, cached=(0,))
    for _ in range(3):
        cache = C.update("freq", cache, jnp.asarray([0, -1], jnp.int32), _buffers([0, -1], 4), jnp.int32(0))
    cache = C.update("freq", cache, jnp.asarray([5, -1], jnp.int32), _buffers([5, -1], 4), jnp.int32(0))
    assert np.asarray(cache.owner).tolist() == [0]
    for _ in range(40):  # used over and over while 0 is not: 5 becomes hotter and takes the slot
        cache = C.update("freq", cache, jnp.asarray([5, -1], jnp.int32), _buffers([5, -1], 4), jnp.int32(0))
    assert np.asarray(cache.owner).tolist() == [5] and np.all(np.asarray(cache.tops[0]) == 5)


@pytest.mark.parametrize("split, F", [(2, 6), (6, 6)])
def test_static_rule_counts(split, F):
    """The static rule never changes the hot set; counts split into full / top-only / miss exactly."""
    cache = _cache(3, split, cached=(0, 2, 5))
    trace = [[0, 1], [2, 5], [7, 0], [5, 3], [-1, 2]]
    want_cached = sum(e in (0, 2, 5) for s in trace for e in s)
    want_miss = sum(e not in (0, 2, 5) and e >= 0 for s in trace for e in s)
    got = np.zeros(3, int)
    for t, step in enumerate(trace, start=1):
        ex = jnp.asarray(step, jnp.int32)
        full, top, miss = C.classify(cache, ex, split, F)
        got += [int(full.sum()), int(top.sum()), int(miss.sum())]
        cache = C.update("static", cache, ex, _buffers(step, F), jnp.int32(t))
    if split == F:
        assert got.tolist() == [want_cached, 0, want_miss]
    else:
        assert got.tolist() == [0, want_cached, want_miss]
    assert np.asarray(cache.owner).tolist() == [0, 2, 5]


def test_unknown_rule():
    with pytest.raises(ValueError, match="unknown replacement rule"):
        C.update("fifo", _cache(1, 2), jnp.asarray([0]), _buffers([0], 2), jnp.int32(1))


def test_lru_miss_never_evicts_an_expert_the_same_step_uses():
    """Slots hold 0 (older) and 1; the step uses 2 and 0, misses listed first (the engine sorts copies first):
    0 keeps its slot untouched and 1, the least recently used of the others, makes room for 2."""
    cache = _cache(2, 4)
    cache = C.update("lru", cache, jnp.asarray([0, -1], jnp.int32), _buffers([0, -1], 4), jnp.int32(1))
    cache = C.update("lru", cache, jnp.asarray([1, -1], jnp.int32), _buffers([1, -1], 4), jnp.int32(2))
    slot0 = int(cache.slot_of[0])
    cache = C.update("lru", cache, jnp.asarray([2, 0], jnp.int32), _buffers([2, 0], 4), jnp.int32(3))
    assert int(cache.slot_of[0]) == slot0 and int(cache.slot_of[1]) == -1
    assert int(cache.slot_of[2]) == 1 - slot0
    assert np.all(np.asarray(cache.tops[slot0]) == 0) and np.all(np.asarray(cache.tops[1 - slot0]) == 2)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.uint8])
def test_write_rows_matches_numpy_and_drops_out_of_range_slots(dtype):
    rng = np.random.default_rng(0)
    tops = rng.integers(0, 100, (5, 3, 3, D)).astype(np.float32)
    rows = rng.integers(100, 200, (4, 3, 3, D)).astype(np.float32)
    slots = np.array([3, 7, 0, 5], np.int32)  # distinct; 7 and 5 are past the 5 slots: dropped
    want = tops.copy()
    for s, r in zip(slots, rows):
        if s < len(tops):
            want[s] = r
    got = jax.jit(C.write_rows)(jnp.asarray(tops, dtype), jnp.asarray(slots), jnp.asarray(rows, dtype))
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_cpu_admission_writes_a_bfloat16_cache_without_a_scatter():
    """XLA:CPU widens a bfloat16 scatter to float32 around the whole operand, several passes over the cache, so
    `write_rows` updates it row by row there."""
    tops = jnp.zeros((8, 16, 3, 64), jnp.bfloat16)
    text = jax.jit(C.write_rows).lower(tops, jnp.array([2, 9], jnp.int32),
                                       jnp.ones((2, 16, 3, 64), jnp.bfloat16)).compile().as_text()
    assert " scatter(" not in text and text.count("dynamic-update-slice(") >= 2

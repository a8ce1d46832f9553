"""Neuron cache invariants under random selections (property-based)."""

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlx_flash.neuron_cache import NeuronCache
from mlx_flash.store.format import Component, Encoding, encode, to_bytes

N, D = 48, 64
COMPONENTS = [
    Component("gate_proj", D, Encoding("float16", 4, 32)),
    Component("up_proj", D, Encoding("bfloat16")),
    Component("down_proj", D, Encoding("uint8", 8, 32, "mxfp8")),  # uint8 scales
]
mx.random.seed(0)
WEIGHTS = {c.name: mx.random.normal((N, D)) for c in COMPONENTS}
BUNDLES = np.concatenate(
    [to_bytes(encode(WEIGHTS[c.name], c.encoding, D)[0]) for c in COMPONENTS], axis=1
)
REFERENCE = NeuronCache(COMPONENTS, N, N, mx.float32)
REFERENCE.fill(np.arange(N), BUNDLES)


def expected(ids):
    return REFERENCE.gather(np.asarray(ids))


def parts(w):
    return w if isinstance(w, tuple) else (w,)


selections = st.lists(
    st.lists(st.integers(0, N - 1), unique=True, max_size=16), min_size=1, max_size=25
)


@settings(max_examples=60, deadline=None)
@given(selections, st.integers(4, 40), st.integers(1, 5), st.booleans())
def test_cache_invariants(tokens, capacity, window, strict):
    cache = NeuronCache(COMPONENTS, N, capacity, mx.float32, window if strict else None)
    reads = 0
    history = []
    for ids in tokens:
        ids = np.array(ids[:capacity], np.int64)
        before = set(cache.cached_ids().tolist())
        slots, load_ids, load_slots = cache.admit(ids)
        # a hit never reads; exactly the missing ids are read
        assert set(load_ids.tolist()) == set(ids.tolist()) - before
        reads += len(load_ids)
        cache.fill(load_slots, BUNDLES[load_ids])
        # capacity is never exceeded, no slot leaks: the maps agree both ways
        cached = cache.id_of[cache.id_of >= 0]
        assert len(cached) <= capacity and len(set(cached.tolist())) == len(cached)
        assert all(cache.slot_of[i] == s for s, i in enumerate(cache.id_of) if i >= 0)
        assert np.count_nonzero(cache.slot_of >= 0) == len(cached)
        # contents are the bundles of the ids they hold
        got, want = cache.gather(slots), expected(ids)
        for name in want:
            for a, b in zip(parts(got[name]), parts(want[name])):
                assert mx.array_equal(a, b)
        history.append(set(ids.tolist()))
        recent = set().union(*history[-window:])  # the last `window` tokens
        if strict:  # strict windowing holds nothing older than the window
            assert set(cached.tolist()) <= recent
        if sum(len(h) for h in history[-window:]) <= capacity:
            assert recent <= set(cached.tolist())  # the window stays while it fits
    assert cache.stats.loads == reads


def test_lru_evicts_the_oldest_first():
    cache = NeuronCache(COMPONENTS, N, 4, mx.float32)
    for ids in ([0, 1], [2, 3], [0]):
        cache.admit(np.array(ids))
    _, loaded, _ = cache.admit(np.array([4, 5]))  # evicts 1 (used at step 1), then 2
    assert loaded.tolist() == [4, 5]
    assert cache.cached_ids().tolist() == [0, 3, 4, 5]
    assert cache.stats.evictions == 2


# The hot part: pinned ids (a profile's most frequent neurons) -------------------

pinned_sets = st.lists(st.integers(0, N - 1), unique=True, max_size=12)


def route(cache, ids, keep_cached=True):
    ids = np.array(ids, np.int64)
    return ids[cache.admissible(ids, keep_cached)]


@settings(max_examples=60, deadline=None)
@given(selections, pinned_sets, st.integers(0, 20), st.integers(1, 5), st.booleans())
def test_pinned_ids_always_hit_and_capacity_holds(
    tokens, pinned, spare, window, strict
):
    capacity = len(pinned) + spare
    if capacity == 0:
        return
    pinned = np.array(pinned, np.int64)
    cache = NeuronCache(
        COMPONENTS, N, capacity, mx.float32, window if strict else None, pinned
    )
    cache.fill(np.arange(len(pinned)), BUNDLES[pinned])  # once, by the caller
    assert cache.slot_of[pinned].tolist() == list(range(len(pinned)))
    for step, ids in enumerate(tokens):
        ids = route(cache, ids)
        slots, load_ids, load_slots = cache.admit(ids)
        assert not set(load_ids.tolist()) & set(pinned.tolist())  # pinned: hits
        assert (load_slots >= len(pinned)).all()  # arrivals never take a hot slot
        cache.fill(load_slots, BUNDLES[load_ids])
        cached = cache.id_of[cache.id_of >= 0]
        assert len(cached) <= capacity and len(set(cached.tolist())) == len(cached)
        assert set(pinned.tolist()) <= set(cached.tolist())
        assert all(cache.slot_of[i] == s for s, i in enumerate(cache.id_of) if i >= 0)
        got, want = cache.gather(slots), expected(ids)
        for name in want:
            for a, b in zip(parts(got[name]), parts(want[name])):
                assert mx.array_equal(a, b)
        if step == len(tokens) // 2:
            cache.clear()  # an interrupted step: the recency part is forgotten
            assert cache.cached_ids().tolist() == sorted(pinned.tolist())


@settings(max_examples=60, deadline=None)
@given(selections, pinned_sets, st.integers(1, 20), st.integers(1, 5), st.booleans())
def test_the_recency_part_behaves_as_a_cache_of_its_own_size(
    tokens, pinned, spare, window, strict
):
    """Pinning P ids of C slots: the others see exactly a cache of C - P slots fed
    the same tokens without the pinned ids."""
    window = window if strict else None
    ours = NeuronCache(COMPONENTS, N, len(pinned) + spare, mx.float32, window, pinned)
    plain = NeuronCache(COMPONENTS, N, spare, mx.float32, window)
    hot = set(pinned)
    for ids in tokens:
        ids = [i for i in ids if i not in hot][:spare] + [i for i in ids if i in hot]
        _, ours_loaded, _ = ours.admit(np.array(ids, np.int64))
        rest = np.array([i for i in ids if i not in hot], np.int64)
        _, plain_loaded, _ = plain.admit(rest)
        assert ours_loaded.tolist() == plain_loaded.tolist()
        recency = set(ours.cached_ids().tolist()) - hot
        assert recency == set(plain.cached_ids().tolist())
    assert ours.stats == plain.stats


@settings(max_examples=60, deadline=None)
@given(selections, st.integers(1, 40), pinned_sets)
def test_admissible_routes_hits_first_and_fits(tokens, capacity, pinned):
    pinned = pinned[:capacity]
    cache = NeuronCache(COMPONENTS, N, capacity, mx.float32, pinned=pinned)
    plain = NeuronCache(COMPONENTS, N, capacity, mx.float32)
    for ids in tokens:
        ids = np.array(ids, np.int64)
        # without a hot part and without keep_cached: today's ids[:capacity]
        assert route(plain, ids, keep_cached=False).tolist() == ids[:capacity].tolist()
        before = set(cache.cached_ids().tolist())
        through = route(cache, ids)
        # every cached id goes through (a hit costs no slot); the order is kept
        assert set(ids.tolist()) & before <= set(through.tolist())
        assert through.tolist() == [i for i in ids.tolist() if i in set(through)]
        # an overflow only when the recency part is full
        if len(through) < len(ids):
            assert np.count_nonzero(~cache.is_pinned[through]) == cache.recency_capacity
        cache.admit(through)  # would fail its assertion if it did not fit
        plain.admit(ids[:capacity])


@settings(max_examples=80, deadline=None)
@given(
    selections,
    st.integers(1, 30),
    st.lists(st.tuples(st.integers(0, 24), pinned_sets), max_size=4),
    st.integers(1, 5),
    st.booleans(),
)
def test_repinning_between_tokens(tokens, capacity, repins, window, strict):
    """The hot part re-chosen while decoding (online counts): pinned ids already
    cached stay where they are, the others take a slot when next selected and then
    always hit; ids leaving it stay cached; capacity, the maps and every slot's
    contents hold throughout, as does an interrupted step's `clear`."""
    cache = NeuronCache(COMPONENTS, N, capacity, mx.float32, window if strict else None)
    at = {step: np.array(ids[:capacity], np.int64) for step, ids in repins}
    for step, ids in enumerate(tokens):
        if step in at:
            before = {i: cache.slot_of[i] for i in cache.cached_ids().tolist()}
            cache.repin(at[step])
            assert {i: cache.slot_of[i] for i in before} == before  # nothing moved
            pinned = np.nonzero(cache.is_pinned)[0]
            assert set(pinned.tolist()) == set(at[step].tolist())
        hot_before = set(cache.cached_ids().tolist()) & set(cache.pinned.tolist())
        ids = route(cache, ids)
        slots, load_ids, load_slots = cache.admit(ids)
        assert not set(load_ids.tolist()) & hot_before  # a cached pinned id hits
        cache.fill(load_slots, BUNDLES[load_ids])
        cached = cache.id_of[cache.id_of >= 0]
        assert len(cached) <= capacity and len(set(cached.tolist())) == len(cached)
        assert all(cache.slot_of[i] == s for s, i in enumerate(cache.id_of) if i >= 0)
        assert hot_before <= set(cached.tolist())  # pinned and cached: never leaves
        assert set(ids.tolist()) <= set(cached.tolist())
        got, want = cache.gather(slots), expected(ids)
        for name in want:
            for a, b in zip(parts(got[name]), parts(want[name])):
                assert mx.array_equal(a, b)
        if step == len(tokens) // 2 and at:
            cache.clear()  # nothing was placed by a caller: everything is forgotten
            assert len(cache.cached_ids()) == 0
    with pytest.raises(ValueError):
        cache.repin(np.zeros(2, np.int64))  # not unique


def test_repinning_keeps_the_old_hot_part_as_the_most_recent():
    cache = NeuronCache(COMPONENTS, N, 4, mx.float32, pinned=[0, 1])
    cache.fill(np.arange(2), BUNDLES[[0, 1]])
    cache.admit(np.array([2]))
    cache.admit(np.array([3]))
    cache.repin(np.array([3, 5]))  # 3 pinned where it is; 5 when it comes
    assert cache.cached_ids().tolist() == [0, 1, 2, 3]
    _, loaded, _ = cache.admit(np.array([5]))  # evicts 2 (older than 0 and 1)
    assert loaded.tolist() == [5] and cache.cached_ids().tolist() == [0, 1, 3, 5]
    cache.admit(np.array([6]))  # then 0 or 1, never 3 or 5
    cache.admit(np.array([7]))
    assert cache.cached_ids().tolist() == [3, 5, 6, 7]


def test_bad_pinned_ids_are_refused():
    for pinned, capacity in (([1, 1], 4), ([0, 1, 2], 2), ([N], 4), ([-1], 4)):
        with pytest.raises(ValueError):
            NeuronCache(COMPONENTS, N, capacity, mx.float32, pinned=pinned)


@pytest.mark.parametrize("slots", [[0, 1, 2, 3], [5, 6, 7], [7], [3, 1, 2], [0, 2, 4]])
def test_gather_of_a_run_is_a_view_with_the_same_rows(slots):
    """An ascending run of slots gathers as a slice of the rows (no copy: the
    exact default's partly cached layer every token); any other order as a take;
    both the rows of those slots."""
    slots = np.array(slots)
    got = REFERENCE.gather(slots)
    index = mx.array(slots.astype(np.uint32))
    for name, w in REFERENCE.arrays.items():
        for a, b in zip(parts(got[name]), parts(w)):
            assert mx.array_equal(a, mx.take(b, index, axis=0))

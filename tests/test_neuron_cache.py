"""Neuron cache invariants under random selections (property-based)."""

import mlx.core as mx
import numpy as np
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

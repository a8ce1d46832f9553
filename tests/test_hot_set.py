"""The hot set's counts and split, and the trace-driven cache simulator."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash import convert, load
from mlx_flash.cache_simulator import (
    Policy,
    hot,
    hot_recency,
    lru,
    online,
    simulate,
    trace_counts,
    window,
)
from mlx_flash.hot_set import (
    ONLINE_FACTOR,
    ONLINE_FIRST,
    FrequencyCounter,
    OnlineHotSet,
    propose_split,
    split_curve,
)
from mlx_flash.neuron_cache import SlotMap

N = 32
tokens_of_ids = st.lists(
    st.lists(st.integers(0, N - 1), unique=True, max_size=12), min_size=1, max_size=30
)
traces = st.lists(tokens_of_ids, min_size=1, max_size=3).map(
    lambda layers: [layers[0]] + [t[: len(layers[0])] for t in layers[1:]]
)


def as_arrays(trace):
    return [[np.array(ids, np.int64) for ids in layer] for layer in trace]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=N, max_size=N), max_size=20))
def test_counting_token_by_token_equals_counting_sequences(rows):
    mask = np.array(rows, bool).reshape(1, -1, N)
    one, many = FrequencyCounter([N]), FrequencyCounter([N])
    for row in mask[0]:
        one.update(0, np.nonzero(row)[0])
    many.update_sequences(0, mask)
    a, b = one.layers[0], many.layers[0]
    assert (a.selected == b.selected).all() and (a.repeated == b.repeated).all()
    assert (
        (a.tokens, a.pairs) == (b.tokens, b.pairs) == (len(rows), max(len(rows) - 1, 0))
    )


def test_a_new_sequence_makes_no_pair():
    c = FrequencyCounter([4])
    c.update(0, np.array([1, 2]))
    c.end_sequence()
    c.update(0, np.array([2, 3]))
    c.update(0, np.array([3]))
    counts = c.layers[0]
    assert counts.selected.tolist() == [0, 1, 2, 2]
    assert counts.repeated.tolist() == [0, 0, 0, 1]
    assert (counts.tokens, counts.pairs) == (3, 1)
    assert counts.hot_ids(3).tolist() == [2, 3, 1]  # ties: the lower id first


@settings(max_examples=60, deadline=None)
@given(traces, st.integers(1, 20), st.integers(0, 20), st.integers(1, 4))
def test_hits_and_misses_are_every_selection(trace, capacity, hot_slots, tokens):
    trace = as_arrays(trace)
    counts = trace_counts(trace, N)
    selections = sum(len(ids) for layer in trace for ids in layer)
    for policy in (
        lru(capacity),
        lru(capacity, keep_cached=False),
        window(capacity, tokens),
        hot(counts, capacity),
        hot_recency(counts, capacity, hot_slots),
        hot_recency(counts, capacity),
    ):
        r = simulate(trace, policy, N, [100, 200, 300][: len(trace)])
        assert r.hits + r.misses == r.selections == selections
        assert 0 <= r.hits and r.tokens == len(trace[0])
        per_layer = [
            simulate(only(trace, j), policy, N, 1).misses for j in range(len(trace))
        ]
        assert sum(per_layer) == r.misses  # every layer its own cache
        assert r.bytes == sum(m * b for m, b in zip(per_layer, [100, 200, 300]))


def only(trace, j):
    """The trace with every layer but `j` selecting nothing."""
    return [t if i == j else [ids[:0] for ids in t] for i, t in enumerate(trace)]


@settings(max_examples=60, deadline=None)
@given(traces, st.integers(1, N), st.randoms(use_true_random=False))
def test_hot_with_the_traces_own_counts_beats_any_other_pin_set(trace, capacity, rnd):
    trace = as_arrays(trace)
    best = simulate(trace, hot(trace_counts(trace, N), capacity), N, 1)
    other = Policy("other", capacity, pinned=[rnd.sample(range(N), capacity)] * 3)
    assert best.hits >= simulate(trace, other, N, 1).hits


@settings(max_examples=30, deadline=None)
@given(traces, st.integers(1, 20))
def test_the_splits_extremes_are_lru_and_hot(trace, capacity):
    trace = as_arrays(trace)
    counts = trace_counts(trace, N)

    def hits(policy):
        return simulate(trace, policy, N, 1).hits

    assert hits(hot_recency(counts, capacity, 0)) == hits(lru(capacity))
    assert hits(hot_recency(counts, capacity, N)) == hits(hot(counts, capacity))


def bernoulli_trace(freq, tokens, stick, seed=0):
    """Each neuron a two-state chain with stationary frequency `freq` that stays
    selected with probability `stick` (stick = freq: independent tokens)."""
    rng = np.random.default_rng(seed)
    p01 = freq * (1 - stick) / (1 - freq)
    state, trace = rng.random(len(freq)) < freq, []
    for _ in range(tokens):
        u = rng.random(len(freq))
        state = np.where(state, u < stick, u < p01)
        ids = np.nonzero(state)[0]
        trace.append(ids[rng.permutation(len(ids))])
    return [trace]


def test_without_locality_the_split_pins_everything():
    freq = np.linspace(0.05, 0.6, 64)
    counts = trace_counts(bernoulli_trace(freq, 400, freq), 64)[0]
    assert propose_split(counts, 16) == 16


def test_with_locality_the_split_keeps_recency_slots_and_they_pay():
    freq = np.concatenate([np.full(8, 0.5), np.full(56, 0.1)])
    stick = np.concatenate([np.full(8, 0.5), np.full(56, 0.97)])  # bursty tail
    trace = bernoulli_trace(freq, 1000, stick)
    counts = trace_counts(trace, 64)
    k = propose_split(counts[0], 24)
    assert 0 < k < 24
    hot_counts, hits = split_curve(counts[0], 24)
    assert hits[list(hot_counts).index(k)] >= hits.max() * (1 - 1e-3)
    proposed = simulate(trace, hot_recency(counts, 24, k), 64, 1)
    assert proposed.hits > simulate(trace, hot(counts, 24), 64, 1).hits
    assert proposed.hits > simulate(trace, lru(24), 64, 1).hits
    best = max(
        simulate(trace, hot_recency(counts, 24, j), 64, 1).hits for j in range(25)
    )
    assert proposed.hits >= 0.99 * best  # the model's split, near the measured best


def test_online_pinning_follows_the_counts_so_far():
    """No profile: at ONLINE_FIRST tokens and each ONLINE_FACTOR times as many
    since, the layer's split is proposed from its counts so far and exactly their
    most frequent neurons are pinned; nothing is pinned before."""
    freq = np.linspace(0.02, 0.7, 64)
    (trace,) = bernoulli_trace(freq, ONLINE_FIRST * ONLINE_FACTOR + 5, freq)
    hot_set, slots = OnlineHotSet([64]), SlotMap(64, 16)
    counter = FrequencyCounter([64])
    for t, ids in enumerate(trace, 1):
        ids = ids[slots.admissible(ids)]  # (the overflow is read past the cache)
        slots.admit(ids)
        hot_set.update(0, trace[t - 1], slots)
        counter.update(0, trace[t - 1])
        counts = counter.layers[0]
        if t < ONLINE_FIRST:
            assert len(slots.pinned) == 0
        if t in (ONLINE_FIRST, ONLINE_FIRST * ONLINE_FACTOR):
            k = propose_split(counts, 16)
            assert k > 0 and hot_set.splits[0] == k
            assert slots.pinned.tolist() == counts.hot_ids(k).tolist()
    assert slots.is_pinned.sum() == len(slots.pinned)


def test_online_pinning_beats_lru_without_locality():
    """Skewed frequencies, no locality (PowerInfer's case): pinning the counts'
    most frequent neurons beats an LRU of the same size on the same trace, and
    comes near a hot part fixed from the trace's own counts."""
    freq = np.concatenate([np.full(12, 0.8), np.linspace(0.02, 0.3, 116)])
    trace = bernoulli_trace(freq, 600, freq)
    counts = trace_counts(trace, 128)
    learned = simulate(trace, online(16), 128, 1)
    assert learned.hits + learned.misses == learned.selections
    assert learned.hits > 1.3 * simulate(trace, lru(16), 128, 1).hits
    assert learned.hits > 0.95 * simulate(trace, hot_recency(counts, 16), 128, 1).hits


def test_no_counts_no_hot_part():
    assert propose_split(FrequencyCounter([8]).layers[0], 4) == 0


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hot")
    make_checkpoint(tmp / "llama", "llama")
    return convert(tmp / "llama", tmp / "store", progress=False)


def recorded(model):
    """Wrap every layer's selector: trace[layer][token] of what decoding chose."""
    trace = [[] for _ in model.layers]
    for i, layer in enumerate(model.layers):

        def select(x, inner=layer.mlp._selector, i=i):
            selection = inner(x)
            trace[i].append(selection.ids.copy())
            return selection

        layer.mlp._selector = select
    return trace


def test_online_pinning_in_decoding_is_the_simulators(store):
    """A store without a profile: decoding counts each layer's selections and pins
    its cache's hot part from them; its hits are the simulator's `online` policy's
    on the same trace, the pinned ids the counts' top ones, the tokens those of
    a run with no budget."""
    options = {"selector": "oracle", "fraction": 0.5, "prefill_step_size": 16}
    roomy, _ = load(str(store), progress=False, **options)
    budget = roomy.flash_plan.budget_for_slots(40)
    model, _ = load(str(store), dram_budget=budget, progress=False, **options)
    hot_set = model.flash_hot_set
    assert hot_set is not None
    trace = recorded(model)
    ys = [mx.array([[3]])] * 2
    caches = [make_prompt_cache(m) for m in (model, roomy)]
    for step in range(1, ONLINE_FIRST + 9):
        ys = [
            mx.argmax(m(y, cache=c)[:, -1], axis=-1, keepdims=True)
            for m, y, c in zip((model, roomy), ys, caches)
        ]
        assert ys[0].item() == ys[1].item()
        if step == ONLINE_FIRST:  # the first split: the counts' top neurons pinned
            for i, layer in enumerate(model.layers):
                counts, k = hot_set.counter.layers[i], hot_set.splits[i]
                assert counts.tokens == step and k > 0
                assert layer.mlp._cache.pinned.tolist() == counts.hot_ids(k).tolist()
    s = model.flash_stats
    bundles = [layer.bundle_bytes() for layer in model.flash_store.manifest.layers]
    r = simulate(trace, online(40), 128, bundles)
    assert (r.hits, r.misses, r.selections) == (s.hits, s.loaded, s.selected)
    assert f"online counts over {ONLINE_FIRST + 8} tokens" in hot_set.describe()


def test_lru_matches_the_decoding_caches_own_hits(store):
    options = {"selector": "oracle", "fraction": 0.5, "prefill_step_size": 16}
    roomy, _ = load(str(store), progress=False, **options)
    p = roomy.flash_plan
    budget = p.budget_for_slots(40)  # 40 of 128 slots
    model, _ = load(str(store), dram_budget=budget, progress=False, **options)
    trace = recorded(model)
    y, cache = mx.array([[3]]), make_prompt_cache(model)
    for _ in range(24):  # decoding only: each step fills the caches
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
    s = model.flash_stats
    bundles = [layer.bundle_bytes() for layer in model.flash_store.manifest.layers]
    r = simulate(trace, lru(40), 128, bundles)  # decoding routes hits first
    assert (r.hits, r.misses, r.selections) == (s.hits, s.loaded, s.selected)
    assert r.tokens == s.tokens == 24
    assert r.hits > 0 and r.misses > 0
    assert 0 < r.bytes <= s.bytes  # the store's reads add their alignment

"""Trace-driven simulation of the neuron caches: hit rate and bytes read per policy.

A trace is what a selector chose, token by token, in every layer: ``trace[layer]
[token]`` the ids of that token's neurons, most important first. Each layer's cache
is simulated with `SlotMap`, the neuron cache's own bookkeeping, so a simulated
policy is exactly what decoding would do, without weights, reads or MLX. A selected
neuron is a hit when its slot already holds it, else a miss: read from the store,
into the cache or, past its capacity, streamed (the overflow).
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import numpy as np

from .hot_set import FrequencyCounter, LayerCounts, OnlineHotSet, propose_split
from .neuron_cache import SlotMap
from .store.store import read_bytes

Trace = Sequence[Sequence[np.ndarray]]  # trace[layer][token]: (n_selected,) ids


@dataclass(frozen=True)
class Policy:
    """One cache configuration, applied to every layer.

    Args:
        name: for tables.
        capacity: slots per layer, hot and recency parts together.
        window: the recency part's strict window (tokens), or None: LRU.
        pinned: per layer, the hot part's ids; None: no hot part.
        keep_cached: route cached ids through the cache first (`SlotMap.admissible`);
            False is today's rule in sparse_ffn, ``ids[:capacity]``.
        online: pin from the trace's counts so far as decoding does for a store
            without a profile (`hot_set.OnlineHotSet`).
    """

    name: str
    capacity: int
    window: Optional[int] = None
    pinned: Optional[Sequence[np.ndarray]] = None
    keep_cached: bool = True
    online: bool = False

    def slots(self, layer: int, neurons: int) -> SlotMap:
        pinned = None if self.pinned is None else self.pinned[layer]
        return SlotMap(neurons, min(self.capacity, neurons), self.window, pinned)


def lru(capacity: int, keep_cached: bool = True) -> Policy:
    name = "LRU" if keep_cached else "LRU, ids[:capacity] (today)"
    return Policy(name, capacity, keep_cached=keep_cached)


def online(capacity: int) -> Policy:
    """No profile: the hot part pinned from the counts so far (`OnlineHotSet`)."""
    return Policy("online hot + LRU", capacity, online=True)


def window(capacity: int, tokens: int) -> Policy:
    return Policy(f"window {tokens}", capacity, window=tokens)


def hot(counts: Sequence[LayerCounts], capacity: int) -> Policy:
    """Every slot pinned to the layer's most frequent neurons; no recency part."""
    return Policy("hot", capacity, pinned=[c.hot_ids(capacity) for c in counts])


def hot_recency(
    counts: Sequence[LayerCounts],
    capacity: int,
    hot: Union[None, int, Sequence[int]] = None,
    window: Optional[int] = None,
) -> Policy:
    """`hot` pinned slots per layer (an int for every layer, one per layer, or None:
    `propose_split` per layer), the rest LRU (or a strict `window`)."""
    if hot is None:
        hot = [propose_split(c, capacity) for c in counts]
    elif isinstance(hot, int):
        hot = [hot] * len(counts)
    pinned = [c.hot_ids(min(k, capacity)) for c, k in zip(counts, hot)]
    share = np.mean([len(p) for p in pinned]) / max(capacity, 1)
    recency = "LRU" if window is None else f"window {window}"
    return Policy(f"hot {share:.0%} + {recency}", capacity, window, pinned)


@dataclass
class SimResult:
    """What one policy did over a trace (all layers together)."""

    policy: str
    capacity: int
    tokens: int
    hits: int
    misses: int
    bytes: int  # misses x their layer's bundle bytes

    @property
    def selections(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.selections if self.selections else 0.0

    @property
    def mb_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1) / 1e6


def simulate(
    trace: Trace,
    policy: Policy,
    neurons: int,
    bundle_bytes: Union[int, Sequence[int]],
) -> SimResult:
    """Replay `trace` through one cache per layer configured by `policy`.

    Args:
        trace: ``trace[layer][token]``, each token's ids most important first.
        neurons: neurons per layer.
        bundle_bytes: bytes read per missing neuron (one value, or one per layer).
    """
    if isinstance(bundle_bytes, int):
        bundle_bytes = [bundle_bytes] * len(trace)
    selected = misses = read = 0
    counts = OnlineHotSet([neurons] * len(trace)) if policy.online else None
    for layer, tokens in enumerate(trace):
        slots, layer_misses = policy.slots(layer, neurons), 0
        for ids in tokens:
            ids = np.asarray(ids, np.int64)
            through = slots.admissible(ids, policy.keep_cached)
            _, loaded, _ = slots.admit(ids[through])
            layer_misses += len(ids) - np.count_nonzero(through) + len(loaded)
            selected += len(ids)
            if counts is not None:
                counts.update(layer, ids, slots)
        misses += layer_misses
        read += layer_misses * bundle_bytes[layer]
    tokens = len(trace[0]) if len(trace) else 0
    hits = selected - misses
    return SimResult(policy.name, policy.capacity, tokens, hits, misses, read)


def trace_counts(trace: Trace, neurons: int) -> List[LayerCounts]:
    """The trace's own selection counts per layer (one sequence): the profile a
    perfect calibration text would give."""
    counter = FrequencyCounter([neurons] * len(trace))
    for layer, tokens in enumerate(trace):
        for ids in tokens:
            counter.update(layer, ids)
    return counter.layers


class Replay:
    """One layer's cache of one kind (neurons, or the input selector's channels)
    replayed token by token as decoding runs it: the same admission (hits first,
    then the best-scored misses that fit, the rest streamed past the cache) and the
    same reads (the misses' runs merged within `gap`, widened to 4 KiB), so its
    bytes are those the reader would count (`store.read_bytes`).

    Args:
        count: neurons (or channels) in the layer.
        capacity: the cache's slots (the plan's).
        sections: the store sections a miss reads.
        gap: the read gap, in neurons (channels).
        window: the strict window, as the cache's.
    """

    def __init__(self, count: int, capacity: int, sections, gap: int, window=None):
        self.slots = SlotMap(count, min(capacity, count), window)
        self.sections, self.gap = sections, gap
        self.bytes = self.selected = self.hits = 0

    def step(self, ids: np.ndarray) -> int:
        """One token's ids, most important first: the bytes read for it."""
        ids = np.asarray(ids, np.int64)
        through = self.slots.admissible(ids)
        _, loaded, _ = self.slots.admit(ids[through])
        missing = np.concatenate([loaded, ids[~through]])
        read = read_bytes(self.sections, missing, self.gap) if len(missing) else 0
        self.bytes += read
        self.selected += len(ids)
        self.hits += len(ids) - len(missing)
        return read


def neuron_replays(model) -> List[Replay]:
    """Per layer, the neuron cache's `Replay` of a model loaded with a neuron
    selector (lowrank, shadow, gate, oracle): its plan's capacities, the sections
    it reads and its gaps."""
    plan, m = model.flash_plan, model.flash_store.manifest
    replays = []
    for i, layer in enumerate(model.layers):
        ffn = layer.mlp
        sections = [m.layers[i].sections[k] for k in ffn._sections]
        replays.append(
            Replay(
                m.layers[i].neurons,
                plan.capacities[i],
                sections,
                ffn._gap,
                ffn._cache.window,
            )
        )
    return replays


def input_replays(model) -> List[tuple]:
    """Per layer, the (channels, neurons) `Replay`s of a model loaded with the
    `input` selector: its plan's capacities, the sections it reads and its gaps
    (its neuron caches read the down rows alone: `neuron_replays`)."""
    plan, store = model.flash_plan, model.flash_store
    L = len(store.manifest.layers)
    channels = [
        Replay(
            store.columns[i].neurons,
            plan.capacities[L + i],
            store.columns[i].sections,
            layer.mlp._columns.gap,
            layer.mlp._columns.cache.window,
        )
        for i, layer in enumerate(model.layers)
    ]
    return list(zip(channels, neuron_replays(model)))

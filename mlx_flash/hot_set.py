"""The hot set: which neurons of a layer stay pinned in its cache (after PowerInfer,
Song et al. 2023, §4: a few neurons fire for most tokens; keep those resident).

Per layer, counts say how many tokens selected each neuron (`selected`) and how many
consecutive token pairs of one sequence selected it at both tokens (`repeated`). They
come from a stored profile measured on a calibration text (`neuron_profile.py`) or,
for a store without one, from a `FrequencyCounter` updated with each decoded token's
ids (`OnlineHotSet`). A cache of `capacity` slots pins the `hot` most frequently
selected neurons and gives the rest to the recency part; `propose_split` chooses `hot`.
"""

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np


@dataclass
class LayerCounts:
    """One layer's selection counts over `tokens` tokens and `pairs` consecutive
    token pairs (pairs never span two sequences)."""

    selected: np.ndarray  # (n,) int64: tokens that selected each neuron
    repeated: np.ndarray  # (n,) int64: pairs (t - 1, t) selecting it at both
    tokens: int = 0
    pairs: int = 0

    @classmethod
    def zeros(cls, neurons: int) -> "LayerCounts":
        return cls(np.zeros(neurons, np.int64), np.zeros(neurons, np.int64))

    @property
    def neurons(self) -> int:
        return len(self.selected)

    def frequency(self) -> np.ndarray:
        """Each neuron's share of tokens that selected it: (n,) float64."""
        return self.selected / max(self.tokens, 1)

    def chain(self) -> Tuple[np.ndarray, np.ndarray]:
        """Each neuron as a two-state chain: ``(p11, p01)``, the probabilities that a
        token selects it when the previous token did, and when it did not."""
        f = self.frequency()
        first = self.selected * (self.pairs / max(self.tokens, 1))  # ... selected first
        p11 = np.divide(self.repeated, first, out=f.copy(), where=first > 0)
        p11 = np.clip(p11, 0, 1)
        p01 = np.divide(f * (1 - p11), 1 - f, out=np.ones_like(f), where=f < 1)
        return p11, np.clip(p01, 0, 1)

    def hot_ids(self, k: int) -> np.ndarray:
        """The `k` most frequently selected neurons, most frequent first (ties: the
        lower id first)."""
        return np.argsort(-self.selected, kind="stable")[:k]


class FrequencyCounter:
    """Online counting for a store without a profile: every layer's `LayerCounts`,
    updated with each token's selected ids.

    Args:
        neurons: each layer's neuron count.
    """

    def __init__(self, neurons: Sequence[int]):
        self.layers: List[LayerCounts] = [LayerCounts.zeros(n) for n in neurons]
        self._was = [np.zeros(n, bool) for n in neurons]  # the last token's selection
        self._last = [np.zeros(0, np.int64) for _ in neurons]
        self._open = [False] * len(self.layers)  # a token of this sequence was seen

    def update(self, layer: int, ids: np.ndarray) -> None:
        """Count one token's selected `ids` (unique) in `layer`."""
        c, was = self.layers[layer], self._was[layer]
        ids = np.asarray(ids, np.int64)
        if self._open[layer]:
            c.repeated[ids[was[ids]]] += 1
            c.pairs += 1
        was[self._last[layer]] = False
        was[ids] = True
        self._last[layer], self._open[layer] = ids, True
        c.selected[ids] += 1
        c.tokens += 1

    def update_sequences(self, layer: int, mask: np.ndarray) -> None:
        """Count whole sequences at once: `mask` (S, L, n) bool, True where token
        (s, t) selected the neuron; the same counts as `update` token by token with
        `end_sequence` after each sequence."""
        S, L, _ = mask.shape
        c = self.layers[layer]
        c.selected += mask.sum(axis=(0, 1))
        c.repeated += (mask[:, 1:] & mask[:, :-1]).sum(axis=(0, 1))
        c.tokens += S * L
        c.pairs += S * max(L - 1, 0)

    def end_sequence(self) -> None:
        """The next token starts a new sequence (a reset prompt cache): no pair
        spans the two."""
        self._open = [False] * len(self.layers)


def lru_hits(f: np.ndarray, p11: np.ndarray, p01: np.ndarray, slots: int) -> float:
    """Expected hits per token of an LRU of `slots` serving neurons of frequencies
    `f`, each a two-state chain (selected or not) that stays selected with
    probability `p11` and returns with probability `p01` per token.

    Che's approximation: the LRU holds about the neurons selected in the last ``T``
    tokens, ``T`` such that their expected number is `slots`; a selected neuron hits
    when one of those tokens selected it too. Below one token's worth of slots
    (``T`` < 1) the slots hold part of the last token's selection: hits scale down.
    """
    s = float(f.sum())
    if slots <= 0 or s == 0:
        return 0.0
    if slots <= s:
        return slots / s * float((f * p11).sum())
    if slots >= np.count_nonzero(f):
        return s  # every neuron that is ever selected fits

    def absent(T):  # P(not selected in the T - 1 tokens before the last one)
        return np.power(1 - p01, T - 1)

    lo, hi = 1.0, 2.0
    while (1 - (1 - f) * absent(hi)).sum() < slots and hi < 1e9:
        lo, hi = hi, 2 * hi
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if (1 - (1 - f) * absent(mid)).sum() < slots else (lo, mid)
    return float((f * (1 - (1 - p11) * absent(lo))).sum())


def split_curve(counts: LayerCounts, capacity: int) -> Tuple[np.ndarray, np.ndarray]:
    """Expected hits per token for splits of a layer's `capacity` slots: pinning the
    `hot` most frequent neurons earns their frequencies; the other slots are an LRU
    over the rest (`lru_hits`, each neuron's chain fitted to its counts).

    Without locality (a neuron stays selected no more often than it is selected
    at all) pinning wins; with it, an LRU slot can beat the least frequent pinned
    neurons. At most 65 splits are evaluated, evenly spaced.

    Returns:
        ``(hot, hits)``: the pinned counts tried and their expected hits per token.
    """
    capacity = min(capacity, counts.neurons)
    order = counts.hot_ids(counts.neurons)
    f = counts.frequency()[order]
    p11, p01 = (p[order] for p in counts.chain())
    pinned = np.concatenate([[0.0], np.cumsum(f)])
    hot = np.unique(np.linspace(0, capacity, min(capacity, 64) + 1).round())
    hot = hot.astype(np.int64)
    hits = [pinned[k] + lru_hits(f[k:], p11[k:], p01[k:], capacity - k) for k in hot]
    return hot, np.array(hits)


def propose_split(counts: LayerCounts, capacity: int, tolerance: float = 1e-3) -> int:
    """How many of a layer's `capacity` slots to pin: the fewest whose expected hits
    (`split_curve`) are within `tolerance` (relative) of the best split's. Among
    near-equal splits the larger recency part wins: it adapts to the text at hand,
    where the pinned set is fixed by the calibration text, and the model is least
    accurate where the LRU is left about one token's worth of slots. With no counts
    yet, none. The planner's starting point, from the counts alone;
    `cache_simulator` measures a split on a trace."""
    if counts.tokens == 0:
        return 0
    hot, hits = split_curve(counts, capacity)
    return int(hot[np.argmax(hits >= hits.max() * (1 - tolerance))])


# Online pinning: the first split after this many decoded tokens, then each time the
# count has grown this many times (32, 128, 512, ... tokens): a split costs ~1-70 ms
# per layer (`propose_split` on 8,960 neurons), so it is made rarely, and the counts
# it rests on grow with the text.
ONLINE_FIRST, ONLINE_FACTOR = 32, 4


class OnlineHotSet:
    """The hot part for a store without a profile: every layer's selections counted
    as decoding goes (`FrequencyCounter`) and, at ``ONLINE_FIRST`` tokens and each
    ``ONLINE_FACTOR`` times as many since, the layer's cache split anew from its
    counts so far (`propose_split`) and its most frequent neurons pinned
    (`SlotMap.repin`: those cached stay where they are, the others take a slot
    when next selected; nothing is read for pinning alone).

    Args:
        neurons: each layer's neuron count.
    """

    def __init__(self, neurons: Sequence[int]):
        self.counter = FrequencyCounter(neurons)
        self.splits = [0] * len(neurons)  # per layer: the pinned count last chosen
        self._next = [ONLINE_FIRST] * len(neurons)

    def update(self, layer: int, ids: np.ndarray, slots) -> None:
        """Count one token's selected `ids` in `layer`; re-pin its cache `slots` (a
        `SlotMap`) when the schedule says so (between tokens: after its reads)."""
        self.counter.update(layer, ids)
        counts = self.counter.layers[layer]
        if counts.tokens >= self._next[layer]:
            self._next[layer] *= ONLINE_FACTOR
            self.splits[layer] = propose_split(counts, slots.capacity)
            slots.repin(counts.hot_ids(self.splits[layer]))

    def describe(self) -> str:
        tokens = self.counter.layers[0].tokens if self.counter.layers else 0
        return (
            f"[mlx_flash] hot part: online counts over {tokens} tokens (no neuron "
            f"profile), {sum(self.splits)} neurons pinned in all layers"
        )

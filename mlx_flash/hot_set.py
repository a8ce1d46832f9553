"""The hot set: which neurons of a layer stay pinned in its cache (after PowerInfer,
Song et al. 2023, §4: a few neurons fire for most tokens; keep those resident).

Per layer, counts say how many tokens selected each neuron (`selected`) and how many
consecutive token pairs of one sequence selected it at both tokens (`repeated`). They
come from a stored profile measured on a calibration text (`neuron_profile.py`) or,
for a store without one, from a `FrequencyCounter` updated with each decoded token's
ids. A cache of `capacity` slots pins the `hot` most frequently selected neurons and
gives the rest to the recency part; `propose_split` chooses `hot`.
"""

from dataclasses import dataclass
from typing import List, Sequence

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
        c.pairs += S * (L - 1)

    def end_sequence(self) -> None:
        """The next token starts a new sequence (a reset prompt cache): no pair
        spans the two."""
        self._open = [False] * len(self.layers)


def split_curve(counts: LayerCounts, capacity: int) -> np.ndarray:
    """Expected hits per token for every split of a layer's `capacity` slots: entry
    `hot` pins the `hot` most frequent neurons (their frequencies add up), the other
    ``capacity - hot`` slots are a recency part serving the rest.

    The recency part follows a two-rate model: a slot holding a neuron the previous
    token selected hits with the measured persistence of the unpinned neurons,
    ``rho = P(selected at t | selected at t - 1)``; the previous token selected ``s``
    of them on average, so ``min(slots, s)`` slots earn ``rho`` and any others the
    background rate ``beta = P(selected at t | not selected at t - 1)``; at most ``s``
    hits in all. Without locality (``rho`` is then the frequency-weighted frequency,
    below the next neuron's own) pinning always wins; with it, recency slots can beat
    the least frequent pinned neurons.

    Returns:
        (capacity + 1,) float64.
    """
    capacity = min(capacity, counts.neurons)
    tokens = max(counts.tokens, 1)
    order = counts.hot_ids(counts.neurons)
    hot = np.arange(capacity + 1)

    def prefix(a: np.ndarray) -> np.ndarray:  # the sums over the `hot` pinned
        return np.concatenate([[0], np.cumsum(a[order])])[hot]

    pinned = prefix(counts.selected) / tokens
    rest_selected = counts.selected.sum() - prefix(counts.selected)
    rest_repeated = counts.repeated.sum() - prefix(counts.repeated)
    s = rest_selected / tokens  # unpinned neurons selected per token
    first = rest_selected * counts.pairs / tokens  # ... at the first token of a pair
    rho = np.divide(rest_repeated, first, out=np.zeros_like(s), where=first > 0)
    beta = s * (1 - rho) / np.maximum(counts.neurons - hot - s, 1e-9)
    slots = capacity - hot
    recency = rho * np.minimum(slots, s) + beta * np.maximum(0, slots - s)
    return pinned + np.minimum(s, recency)


def propose_split(counts: LayerCounts, capacity: int) -> int:
    """How many of a layer's `capacity` slots to pin: the split that maximises
    `split_curve`'s expected hits (ties go to pinning more: pinned neurons are read
    once and cost no bookkeeping per token). With no counts yet, none. The planner's
    starting point, from the counts alone; `cache_simulator` measures a split."""
    if counts.tokens == 0:
        return 0
    curve = split_curve(counts, capacity)
    return int(len(curve) - 1 - np.argmax(curve[::-1]))

"""The neuron cache: one layer's recently used neurons in preallocated DRAM (§3.1).

Slots are rows of per-component MLX matrices allocated once; numpy views of those same
buffers receive arriving bundles in place, so nothing is allocated while generating. An
id<->slot map says who lives where. By default the cache keeps as many recently used
neurons as it holds, the least recently used leaving first. `strict=True` is the paper's
windowing (§3.1): between tokens, exactly the neurons of the last `window` tokens stay,
the others leave even with slots to spare.

A cache may also have a hot part (PowerInfer, Song et al. 2023): neurons pinned from a
neuron-frequency profile (`neuron_profile.py`, read once at load) or, for a store
without one, from counts made while decoding (`hot_set.OnlineHotSet`, `SlotMap.repin`);
they always hit and never leave; the recency part works as above in the remaining
slots. `SlotMap` is this bookkeeping alone, which the cache simulator
(`cache_simulator.py`) runs without any weights.
"""

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .store.format import FLOAT_DTYPES, Component, Weight

_NP = {"float16": np.float16, "float32": np.float32}
_NEVER = np.iinfo(np.int64).max  # a pinned slot's last use


@dataclass
class CacheStats:  # this layer's; the model-wide counters are in FlashStats
    loads: int = 0
    evictions: int = 0


class SlotMap:
    """The bookkeeping of one layer's cache: which neuron is in which slot, who leaves.

    The hot part (PowerInfer's hot neurons, here the neurons a profile, or the counts
    so far, found most often selected): a pinned id always goes through the cache
    and, once in a slot, never leaves. Ids pinned at construction live in slots
    ``0 .. len(pinned) - 1`` (pinned id ``k`` in slot ``k``: the caller fills them
    once); ids pinned later (`repin`) take a slot when next selected. The other
    slots are the recency part: as many recently used neurons as they hold, the
    least recently used leaving first, or with `window` the paper's strict windowing
    (§3.1). Pure numpy, no buffers: the cache simulator runs the same policy without
    any weights.

    Args:
        n_neurons: neurons in the layer.
        capacity: slots, hot and recency parts together.
        window: if given, between tokens only the recency part's neurons of the last
            `window` tokens stay, even with slots to spare.
        pinned: the hot part's neuron ids (unique; at most `capacity`), or None.
    """

    def __init__(
        self,
        n_neurons: int,
        capacity: int,
        window: Optional[int] = None,
        pinned: Optional[np.ndarray] = None,
    ):
        pinned = np.zeros(0, np.int64) if pinned is None else np.asarray(pinned)
        pinned = pinned.astype(np.int64).reshape(-1)
        if len(pinned) > capacity or len(np.unique(pinned)) != len(pinned):
            raise ValueError(f"{len(pinned)} pinned ids (unique?) for {capacity} slots")
        if len(pinned) and not 0 <= pinned.min() <= pinned.max() < n_neurons:
            raise ValueError(f"pinned ids outside the layer's {n_neurons} neurons")
        self.capacity, self.window, self.pinned = capacity, window, pinned
        self.slot_of = np.full(n_neurons, -1, np.int64)
        self.id_of = np.full(capacity, -1, np.int64)
        self.last_used = np.full(capacity, -1, np.int64)
        self.is_pinned = np.zeros(n_neurons, bool)
        self.is_pinned[pinned] = True
        self.step, self.stats = 0, CacheStats()
        self._placed = pinned  # in slots 0 .. k - 1, filled once by the caller
        self._place_pinned()

    @property
    def strict(self) -> bool:
        return self.window is not None

    @property
    def recency_capacity(self) -> int:
        """Slots of the recency part."""
        return self.capacity - len(self.pinned)

    def admissible(self, ids: np.ndarray, keep_cached: bool = True) -> np.ndarray:
        """Which of one token's `ids` (most important first) go through the cache:
        every pinned id cached; with `keep_cached` every id already cached (a hit
        costs no slot); the pinned ids not yet cached (`repin`) that free slots
        take; then the first others that fit in the recency part's remaining
        slots. The rest is the overflow, read past the cache. With
        ``keep_cached=False`` and no pinned ids this is ``ids[:capacity]``.

        Returns:
            a bool mask over `ids`.
        """
        hot = self.is_pinned[ids]
        held = self.slot_of[ids] >= 0
        cached = held & ~hot
        if not keep_cached:
            cached[:] = False
        hits = np.count_nonzero(cached)
        free = self.capacity - np.count_nonzero(self.last_used == _NEVER) - hits
        arriving = hot & ~held  # pinned, not in a slot yet: first to take one
        arriving &= np.cumsum(arriving) <= free
        other = ~hot & ~cached
        room = min(self.recency_capacity - hits, free - np.count_nonzero(arriving))
        return (hot & held) | arriving | cached | (other & (np.cumsum(other) <= room))

    def admit(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bookkeeping for one token's neurons `ids` (unique; as many missing as
        slots can take: see `admissible`).

        Returns:
            ``(slots, load_ids, load_slots)``: the slot of every id, and the ids that
            must be read from the store with the slots they go to.
        """
        self.step += 1
        slots = self.slot_of[ids]
        hit = slots >= 0
        recent = slots[hit]
        recent = recent[self.last_used[recent] != _NEVER]
        self.last_used[recent] = self.step  # protects hits
        load_ids = ids[~hit]
        free = np.nonzero(self.last_used < self.step)[0]  # empty slots have -1
        assert len(free) >= len(load_ids), "route the selection first: admissible"
        victims = free[np.argsort(self.last_used[free], kind="stable")][: len(load_ids)]
        self.stats.evictions += int(np.count_nonzero(self.id_of[victims] >= 0))
        self.release(victims)
        self.id_of[victims], self.slot_of[load_ids] = load_ids, victims
        self.last_used[victims] = np.where(self.is_pinned[load_ids], _NEVER, self.step)
        slots[~hit] = victims
        if self.strict:  # between tokens, hold only the last `window` tokens' neurons
            self.release(np.nonzero(self.last_used <= self.step - self.window)[0])
        self.stats.loads += len(load_ids)
        return slots, load_ids, victims

    def release(self, slots: np.ndarray) -> None:
        """Empty these slots (their neurons are no longer cached; a pinned id among
        them stays pinned and takes a slot again when next selected). Eviction and
        the window never pick a pinned slot."""
        old = self.id_of[slots]
        self.slot_of[old[old >= 0]] = -1
        self.id_of[slots], self.last_used[slots] = -1, -1

    def repin(self, pinned: np.ndarray) -> None:
        """Make `pinned` (unique ids, at most `capacity`) the hot part, between
        tokens. Its ids already cached are pinned where they are (no bytes move);
        the others take a slot when next selected (never read for pinning alone).
        Ids leaving the hot part stay cached as the most recently used."""
        pinned = np.asarray(pinned, np.int64).reshape(-1)
        if len(pinned) > self.capacity or len(np.unique(pinned)) != len(pinned):
            raise ValueError(f"{len(pinned)} pinned ids (unique?) for {self.capacity}")
        held = self.last_used == _NEVER
        self.last_used[held] = self.step  # the old hot part: most recent
        self.is_pinned[:] = False
        self.is_pinned[pinned] = True
        slots = self.slot_of[pinned]
        self.last_used[slots[slots >= 0]] = _NEVER
        self.pinned, self._placed = pinned, pinned[:0]  # none placed by a caller now

    def clear(self) -> None:
        """Forget every cached neuron (the buffers stay allocated) but those placed
        at construction: their slots are written once, never by a token's step.
        Pinned ids stay pinned; one not placed takes a slot when next selected."""
        self.slot_of[:], self.id_of[:], self.last_used[:] = -1, -1, -1
        self._place_pinned()

    def cached_ids(self) -> np.ndarray:
        return np.sort(self.id_of[self.id_of >= 0])

    def _place_pinned(self) -> None:
        k = len(self._placed)
        self.id_of[:k], self.slot_of[self._placed] = self._placed, np.arange(k)
        self.last_used[:k] = _NEVER  # never a victim, never outside the window


class Slots:
    """Preallocated MLX rows for up to `capacity` decoded neurons of `components`.

    Numpy views of the same buffers receive bundle bytes in place (`put`): a neuron's
    bytes move once, from where they were read into their row; packed words and a
    float mode's uint8 scales as they are. Floats are converted to the compute dtype
    on the way, or with ``convert=False`` kept as stored and converted by MLX where
    they are used: a pool refilled every token (numpy converts float16 one short row
    at a time, ~3x slower than copying the row and converting in MLX, measured on a
    Qwen2.5-Coder-0.5B layer); a cache, filled once and used by every token, converts.

    Args:
        components: the bundle components the rows hold.
        capacity: rows.
        dtype: the compute dtype (bfloat16 rows are held as their bits: numpy has no
            bfloat16, and MLX views them back for free).
        convert: convert floats as they are put (else when used).
    """

    def __init__(
        self,
        components: List[Component],
        capacity: int,
        dtype: mx.Dtype,
        convert: bool = True,
    ):
        self.components, self.capacity = components, capacity
        self.arrays: Dict[str, Weight] = {}  # as held (floats: see `convert`)
        # name -> [(part, view, offset, size, stored)]
        self._parts: Dict[str, list] = {}
        # name -> per part: the dtype MLX converts it to where it is used, or None
        self._cast: Dict[str, list] = {}
        whole = {c.name: replace(c, part=None) for c in components}  # planar: parts
        for c in whole.values():
            parts, fillers, casts, at = [], [], [], 0
            for part, size in c.parts:
                stored, shown, cast = None, None, None
                if part == "packed":
                    arr = mx.zeros((capacity, size // 4), mx.uint32)
                elif c.encoding.dtype == "uint8":  # a float mode's scales: kept
                    arr = mx.zeros((capacity, size), mx.uint8)
                else:
                    shape = (capacity, size // c.encoding.itemsize)
                    held = dtype if convert else FLOAT_DTYPES[c.encoding.dtype]
                    bits = held == mx.bfloat16
                    arr = mx.zeros(shape, mx.uint16 if bits else held)
                    shown = mx.bfloat16 if bits else None
                    stored = c.encoding.dtype if convert else None
                    cast = None if held == dtype else dtype
                mx.eval(arr)
                fillers.append((part, np.array(arr, copy=False), at, size, stored))
                parts.append(arr if shown is None else arr.view(shown))
                casts.append(cast)
                at += size
            self.arrays[c.name] = tuple(parts) if c.encoding.quantized else parts[0]
            self._parts[c.name], self._cast[c.name] = fillers, casts

    @property
    def nbytes(self) -> int:
        return sum(f[1].nbytes for fillers in self._parts.values() for f in fillers)

    def put(self, slots, components: List[Component], rows: np.ndarray) -> None:
        """Bundle bytes `rows` (n, bytes) uint8 holding `components` side by side (a
        planar section's: one part of one) -> rows `slots` (n indices, or a slice);
        components not held are skipped."""
        wait_for_device()
        slots = as_slice(slots)
        at = 0
        for c in components:
            held = [f for f in self._parts.get(c.name, ()) if c.part in (None, f[0])]
            first = held[0][2] if held else 0  # where `rows` begin in the component
            for _, view, offset, size, stored in held:
                raw = rows[:, at + offset - first : at + offset - first + size]
                if stored is None:
                    view[slots] = raw.view(view.dtype)
                else:
                    view[slots] = to_float(raw, stored, view.dtype)
            at += c.nbytes

    def first(self, n: int, names) -> Dict[str, Weight]:
        """The weights in rows ``0 .. n - 1`` of the components `names` (no copy;
        floats held as stored are converted)."""
        out = {}
        for name, w in self.arrays.items():
            if name in names:
                cut = [
                    a[:n] if t is None else a[:n].astype(t)
                    for a, t in zip(
                        w if isinstance(w, tuple) else (w,), self._cast[name]
                    )
                ]
                out[name] = tuple(cut) if isinstance(w, tuple) else cut[0]
        return out

    def gather(self, slots: np.ndarray) -> Dict[str, Weight]:
        """The weights in rows `slots`, in that order: an ascending run of slots is
        a view of the rows (the exact default's partly cached layer: its cached
        neurons fill slots 0 .. k-1 in order, every token), anything else a copy."""
        run = as_slice(slots)
        if isinstance(run, slice):
            take = lambda a: a[run]  # noqa: E731
        else:
            index = mx.array(slots.astype(np.uint32))
            take = lambda a: mx.take(a, index, axis=0)  # noqa: E731
        return {
            name: tuple(map(take, w)) if isinstance(w, tuple) else take(w)
            for name, w in self.arrays.items()
        }


class NeuronCache(SlotMap):
    """Preallocated slots for up to `capacity` neurons of one layer.

    Args:
        components: the bundle components the cache holds (in one section's order).
        n_neurons: neurons in the layer.
        capacity: slots.
        dtype: the compute dtype.
        window: if given, the paper's strict windowing: between tokens only the neurons
            of the last `window` tokens stay, even with slots to spare. If None, the
            cache keeps as many recently used neurons as it holds.
        pinned: the hot part's ids (`SlotMap`), or None. Their slots start empty: the
            caller reads their bundles once and fills them,
            ``cache.fill(np.arange(len(cache.pinned)), rows_of(cache.pinned))``.
    """

    def __init__(
        self,
        components: List[Component],
        n_neurons: int,
        capacity: int,
        dtype: mx.Dtype,
        window: Optional[int] = None,
        pinned: Optional[np.ndarray] = None,
    ):
        super().__init__(n_neurons, capacity, window, pinned)
        self.components = components
        self.slots = Slots(components, capacity, dtype)
        self.arrays = self.slots.arrays

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    def fill(self, slots: np.ndarray, bundles: np.ndarray) -> None:
        """Copy bundles (len(slots), bundle_bytes) uint8 into their slots, decoded."""
        self.slots.put(slots, self.components, bundles)

    def put(self, slots, components: List[Component], rows: np.ndarray) -> None:
        """Bundle bytes of `components` (one section's, as read) into `slots`."""
        self.slots.put(slots, components, rows)

    def gather(self, slots: np.ndarray) -> Dict[str, Weight]:
        """The weights of the neurons in `slots`, in that order (copies, to compute)."""
        return self.slots.gather(slots)


def as_slice(index):
    """An ascending run of row indices as a slice (numpy assigns a slice without
    indexing); anything else as it is."""
    if isinstance(index, slice) or len(index) == 0:
        return index
    first, n = int(index[0]), len(index)
    if int(index[-1]) - first == n - 1 and (n < 3 or np.all(np.diff(index) == 1)):
        return slice(first, first + n)
    return index


def to_float(raw: np.ndarray, stored: str, target: np.dtype) -> np.ndarray:
    """Stored float bytes -> values to assign into `target` slots (numpy converts as
    it assigns); a uint16 target holds bfloat16 bits (rounded to nearest even)."""
    if target == np.uint16:  # bfloat16 rows
        if stored == "bfloat16":
            return raw.view(np.uint16)
        u = raw.view(_NP[stored]).astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    if stored == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(_NP[stored])


def wait_for_device() -> None:
    """A slot may be overwritten only once the GPU has stopped reading it; on the CPU
    every layer's output is evaluated before the next token, so nothing is pending.
    The one device-specific step of the cache."""
    if mx.default_device() != mx.cpu:
        mx.synchronize()

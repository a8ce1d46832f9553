"""The neuron cache: one layer's recently used neurons, in preallocated DRAM (paper §3.1).

Slots are rows of per-component MLX matrices allocated once; numpy views of those same
buffers receive arriving bundles in place, so nothing is allocated while generating. An
id<->slot map says who lives where. By default the cache keeps as many recently used
neurons as it holds, the least recently used leaving first. `strict=True` is the paper's
windowing (§3.1): between tokens, exactly the neurons of the last `window` tokens stay,
the others leave even with slots to spare.
"""

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .store.format import Component, Weight

_NP = {"float16": np.float16, "float32": np.float32}


@dataclass
class CacheStats:  # this layer's; the model-wide counters are in FlashStats
    loads: int = 0
    evictions: int = 0


class NeuronCache:
    """Preallocated slots for up to `capacity` neurons of one layer.

    Args:
        components: the bundle components the cache holds (in one section's order).
        n_neurons: neurons in the layer.
        capacity: slots.
        dtype: the compute dtype floats are stored in (float32 or float16).
        window: if given, the paper's strict windowing: between tokens only the neurons
            of the last `window` tokens stay, even with slots to spare. If None, the
            cache keeps as many recently used neurons as it holds.
    """

    def __init__(
        self,
        components: List[Component],
        n_neurons: int,
        capacity: int,
        dtype: mx.Dtype,
        window: Optional[int] = None,
    ):
        self.components, self.capacity, self.window = components, capacity, window
        self.slot_of = np.full(n_neurons, -1, np.int64)
        self.id_of = np.full(capacity, -1, np.int64)
        self.last_used = np.full(capacity, -1, np.int64)
        self.step, self.stats = 0, CacheStats()
        self.arrays: Dict[str, Weight] = {}
        self._fillers = []  # (numpy view, bundle byte range, stored dtype)
        at = 0
        for c in components:
            parts = []
            for part, size in c.encoding.parts(c.length):
                if part == "packed":
                    arr = mx.zeros((capacity, size // 4), mx.uint32)
                    stored = None
                elif c.encoding.dtype == "uint8":  # a float mode's scales: kept
                    arr = mx.zeros((capacity, size), mx.uint8)
                    stored = None
                else:
                    arr = mx.zeros((capacity, size // c.encoding.itemsize), dtype)
                    stored = c.encoding.dtype
                mx.eval(arr)
                parts.append(arr)
                self._fillers.append((np.array(arr, copy=False), at, at + size, stored))
                at += size
            self.arrays[c.name] = tuple(parts) if c.encoding.quantized else parts[0]

    @property
    def strict(self) -> bool:
        return self.window is not None

    @property
    def nbytes(self) -> int:
        return sum(view.nbytes for view, *_ in self._fillers)

    def admit(self, ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Bookkeeping for one token's neurons `ids` (unique, at most `capacity`).

        Returns:
            ``(slots, load_ids, load_slots)``: the slot of every id, and the ids that
            must be read from the store with the slots they go to.
        """
        assert len(ids) <= self.capacity, "cap the selection to the capacity first"
        self.step += 1
        slots = self.slot_of[ids]
        hit = slots >= 0
        self.last_used[slots[hit]] = self.step  # protects this token's hits
        load_ids = ids[~hit]
        free = np.nonzero(self.last_used < self.step)[0]  # empty slots have -1
        victims = free[np.argsort(self.last_used[free], kind="stable")][: len(load_ids)]
        self.stats.evictions += int(np.count_nonzero(self.id_of[victims] >= 0))
        self.release(victims)
        self.id_of[victims], self.slot_of[load_ids] = load_ids, victims
        self.last_used[victims] = self.step
        slots[~hit] = victims
        if self.strict:  # between tokens, hold only the last `window` tokens' neurons
            self.release(np.nonzero(self.last_used <= self.step - self.window)[0])
        self.stats.loads += len(load_ids)
        return slots, load_ids, victims

    def release(self, slots: np.ndarray) -> None:
        """Empty these slots (their neurons are no longer cached)."""
        old = self.id_of[slots]
        self.slot_of[old[old >= 0]] = -1
        self.id_of[slots], self.last_used[slots] = -1, -1

    def fill(self, slots: np.ndarray, bundles: np.ndarray) -> None:
        """Copy bundles (len(slots), bundle_bytes) uint8 into their slots, decoded."""
        wait_for_device()
        for view, a, b, stored in self._fillers:
            raw = np.ascontiguousarray(bundles[:, a:b])
            if stored is None:
                view[slots] = raw.view(view.dtype)
            else:
                view[slots] = to_float(raw, stored, view.dtype)

    def gather(self, slots: np.ndarray) -> Dict[str, Weight]:
        """The weights of the neurons in `slots`, in that order (copies, for compute)."""
        index = mx.array(slots.astype(np.uint32))
        take = lambda a: mx.take(a, index, axis=0)  # noqa: E731
        return {
            name: tuple(map(take, w)) if isinstance(w, tuple) else take(w)
            for name, w in self.arrays.items()
        }

    def clear(self) -> None:
        """Forget every neuron (the buffers stay allocated)."""
        self.slot_of[:], self.id_of[:], self.last_used[:] = -1, -1, -1

    def cached_ids(self) -> np.ndarray:
        return np.sort(self.id_of[self.id_of >= 0])


def to_float(raw: np.ndarray, stored: str, target: np.dtype) -> np.ndarray:
    """Stored float bytes -> numpy floats of `target` (bfloat16 moved by its bits)."""
    if stored == "bfloat16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return raw.view(_NP[stored]).astype(target, copy=False)


def wait_for_device() -> None:
    """A slot may be overwritten only once the GPU has stopped reading it; on the CPU
    every layer's output is evaluated before the next token, so nothing is pending.
    The one device-specific step of the cache."""
    if mx.default_device() != mx.cpu:
        mx.synchronize()

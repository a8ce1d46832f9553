"""Reading the next layer's bundles while this layer computes.

With `all` (the exact default) and `naive`, what a layer reads is known before it
runs: the neurons its cache does not hold (once the cache is full, the same ones every
token), or the whole layer. So once a layer has placed its own bytes, it asks the next
layer what that one will read, and one background thread reads it into the other
staging buffer (the store's reader and `BundleStore.spare_reader` take turns: a
planar store's layer computes from the buffer it was read into) while this layer's
FFN and the next layer's attention compute. The next layer takes that read if its
request is the one read ahead; otherwise (a cache still filling, a prompt after
decoding) the read ahead is dropped — its bytes were read for nothing — and the
layer reads as before. The second staging buffer is in the DRAM plan ("FFN
read-ahead"). Selectors that decide
on the token's own activations (`input`, `lowrank`, ...) do not read ahead.
"""

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from .store.reader import ReadStats


@dataclass(frozen=True)
class Request:
    """One layer's read: neuron `ids` (in the order the layer reads them) of
    `sections`, runs at most `gap` neurons apart merged."""

    layer: int
    ids: np.ndarray
    sections: Sequence[int]
    gap: int

    def same(self, other: "Request") -> bool:
        return (
            self.layer == other.layer
            and self.gap == other.gap
            and list(self.sections) == list(other.sections)
            and np.array_equal(self.ids, other.ids)
        )


class ReadAhead:
    """One read in flight at a time, into the staging buffer the layer computing now
    does not use (of the store's reader and its spare).

    `start(request)` begins reading (once the read before it has finished: its
    views die with the next read into the buffer); `take(request)` returns its
    pieces (`BundleStore.read_runs`'s) if `request` is the one read ahead, else None.
    A read ahead that failed raises its error where it is taken. `bytes` and
    `reads` count the reads ahead that were taken or dropped, on the caller's
    thread (a layer counts what it takes; a dropped one, the layer that dropped it).
    """

    def __init__(self, store, layers: Sequence = ()):
        self.store, self.readers = store, (store.reader, store.spare_reader())
        self.busy = store.reader  # the buffer the layer computing now was read into
        self.stats = ReadStats()  # every read ahead, on its thread
        # the layers' FlashFFNs, in order (held here, not by each other: a module
        # holding the next would make the model's module tree a cycle)
        self.layers = list(layers)
        store.read_ahead = self
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mlx_flash-ahead")
        self._pending: Optional[Request] = None
        self._future: Optional[Future] = None
        self.bytes = self.reads = 0
        self.taken = self.dropped = 0  # reads ahead used, and read for nothing

    def start(self, request: Optional[Request]) -> None:
        self.settle()
        if request is None or not len(request.ids):
            return
        reader = self.readers[self.readers[0] is self.busy]  # the other one
        self._pending = request
        self._future = self._thread.submit(self._read, request, reader)

    def after(self, layer: int, decoding: bool) -> None:
        """Layer `layer` has placed its bytes: read the next layer's ahead, if they
        are known (`FlashFFN.planned_read`). The first layer's next call is taken to
        be a decoding step (after a prompt's last chunk mlx-lm decodes; a further
        chunk drops the read)."""
        following = (layer + 1) % len(self.layers)
        self.start(self.layers[following].planned_read(decoding or following == 0))

    def take(self, request: Request) -> Optional[List[tuple]]:
        """The pieces read ahead for `request`; else None, once a read still in
        flight is dropped: the caller then reads with the store's reader, whose
        buffer the layer computes from (`busy`)."""
        if self._pending is None or not self._pending.same(request):
            self.settle()
            self.busy = self.store.reader
            return None
        future, self._pending, self._future = self._future, None, None
        pieces, nbytes, reads, self.busy = future.result()  # a failed read raises
        self.taken += 1
        self._count(nbytes, reads)
        return pieces

    def settle(self) -> None:
        """Wait for a read still in flight and drop it (an error too: nothing will
        use its bytes)."""
        future, self._pending, self._future = self._future, None, None
        if future is None:
            return
        self.dropped += 1
        try:
            _, nbytes, reads, _ = future.result()
        except Exception:
            return
        self._count(nbytes, reads)

    def _count(self, nbytes: int, reads: int) -> None:
        self.bytes += nbytes
        self.reads += reads

    def close(self) -> None:
        self.settle()
        self._thread.shutdown(wait=True)

    def _read(self, request: Request, reader):
        """On the read-ahead thread: the pieces, the bytes and reads it took, and the
        reader whose buffer holds them."""
        stats = self.stats
        nbytes, reads = stats.bytes, stats.reads
        pieces = self.store.read_runs(
            request.layer,
            request.ids,
            request.sections,
            request.gap,
            reader=reader,
            stats=stats,
        )
        return pieces, stats.bytes - nbytes, stats.reads - reads, reader

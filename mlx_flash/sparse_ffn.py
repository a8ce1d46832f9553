"""The module swapped into each layer in place of the FFN: its neurons come from the
store.

Decode (one token): select -> ensure the selected neurons are in the neuron cache (read
the missing ones) -> compute on their cached rows. Without a cache (the paper's naive
configuration), and for every multi-token call (prefill, batches), the layer is streamed
whole: a dense pass is exact and holds one layer's FFN at a time, where the union of a
prefill chunk's selections would be nearly dense anyway (see README, "Prefill").
"""

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .hot_set import OnlineHotSet
from .neuron_cache import NeuronCache, Slots, as_slice
from .read_ahead import ReadAhead, Request
from .selectors import AllSelector
from .stats import FlashStats
from .store.format import Weight, assemble, matmul
from .store.store import BundleStore, read_chunks

ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_approx": nn.gelu_approx,
    "relu": nn.relu,
}


class OutBias(nn.Module):
    """The output projection's bias: one dense vector per layer, not part of any
    bundle."""

    def __init__(self, dims: int):
        super().__init__()
        self.bias = mx.zeros((dims,))


@dataclass
class Columns:
    """A layer's gate/up columns by input channel (the `input` selector): the cache
    of recently kept channels, the pool that what streams past it is decoded into,
    the read gap in channels, and the sections read (every one of the columns)."""

    cache: NeuronCache
    pool: Slots
    gap: int
    sections: List[int]


class FlashFFN(nn.Module):
    """A layer's FFN computed from neuron bundles read from a `BundleStore`.

    Args:
        store: the opened store.
        layer: this layer's index.
        stats: the model's shared counters.

    Bundles are decoded to the dtype of the layer's input, the compute dtype.
    """

    def __init__(self, store: BundleStore, layer: int, stats: FlashStats):
        super().__init__()
        m = store.manifest
        self._store, self._layer, self._stats = store, layer, stats
        self.rows, self.column, self.gated = m.rows, m.column, len(m.rows) == 2
        components = m.layers[layer].components
        self._encodings = {n: c.encoding for n, c in components.items()}
        columns = (m.columns[layer].components if m.columns else {}).items()
        self._column_encodings = {n: c.encoding for n, c in columns}
        self.activation = ACTIVATIONS[m.activation]
        self._selector, self._cache, self._sections = None, None, []
        self._gap, self._pool, self._columns = 0, None, None
        self._ahead: Optional[ReadAhead] = None  # reads the next layer's bytes
        self._online: Optional[OnlineHotSet] = None  # counts selections, pins the hot
        self._whole = False  # the cache holds every neuron and the selector takes all
        self._pieces = (None, [])  # the last ids cut into pieces (`_chunks`), by key
        self._computing = ()  # a piece's arrays evaluated in the background
        self.trace = None  # a list: each decoded token's (channels or None, ids)
        if m.out_bias:
            setattr(self, self.column, OutBias(m.hidden_size))

    def setup(
        self,
        selector,
        cache: Optional[NeuronCache],
        sections: List[int],
        gap: int,
        pool: Slots,
        columns: Optional[Columns] = None,
        ahead: Optional[ReadAhead] = None,
        online: Optional[OnlineHotSet] = None,
    ):
        """Decoding: `selector` picks ids, `cache` (or None: stream the layer whole)
        holds the bundle `sections`; what streams past it is decoded into `pool`
        (rows for every neuron of the layer, shared by the layers in turn). With
        `columns`, the `input` selector first picks input channels, read by column.
        With `ahead`, once its own bytes are placed the layer reads the next
        layer's ahead, where they are known before it runs (`read_ahead.py`). With
        `online` (a store without a neuron profile), each token's selection is
        counted and the cache's hot part pinned from the counts."""
        self._selector, self._cache, self._sections = selector, cache, sections
        self._gap, self._pool, self._whole = gap, pool, False
        self._columns, self._ahead, self._online = columns, ahead, online

    def forget(self) -> None:
        """Empty the neuron cache: after a step interrupted between admitting neurons
        and reading them, its slots cannot be trusted."""
        self._whole = False
        for cache in (self._cache, self._columns and self._columns.cache):
            if cache is not None:
                cache.clear()

    def __call__(self, x: mx.array) -> mx.array:
        B, L, _ = x.shape
        if self._whole:  # the cache holds the layer and nothing is read: no
            # evaluation of its own (the graph runs on, as in mlx-lm)
            if B * L == 1:
                self._count_whole()
            return self._from_cache(x)
        if B * L > 1:  # prefill or a batch: accounted apart from decoding
            with self._stats.timed("prefill"):
                y = self._dense(x)
                self._read_next(decoding=False)
                return self._evaluated(y)
        if self._layer == 0:
            self._stats.tokens += 1
        bytes_before, reads_before = self._read_so_far()
        if self._cache is None:
            y = self._dense(x)
        else:
            y = self._sparse(x) if self._columns is None else self._input(x)
        self._read_next(decoding=True)
        nbytes, reads = self._read_so_far()
        self._stats.bytes += nbytes - bytes_before
        self._stats.reads += reads - reads_before
        with self._stats.timed("compute"):
            return self._evaluated(y)

    def _read_so_far(self) -> Tuple[int, int]:
        """Bytes and reads of the store's reader and of the reads ahead taken or
        dropped (on this thread: what is still in flight counts when it lands)."""
        s, ahead = self._store.reader.stats, self._ahead
        if ahead is None:
            return s.bytes, s.reads
        return s.bytes + ahead.bytes, s.reads + ahead.reads

    def _read_next(self, decoding: bool) -> None:
        """This layer's bytes are placed: read the next layer's ahead, if known
        (into the buffer of its piece before last: computed first)."""
        if self._ahead is not None:
            self._waited()
            self._ahead.after(self._layer, decoding)

    def planned_read(self, decoding: bool) -> Optional[Request]:
        """What this layer's next call will read, where that is known before it
        runs: the whole layer when it streams whole (a prefill, no cache); with
        `all` and a full cache, the neurons the cache does not hold (the same every
        token); otherwise (a selection, a cache still filling, a window) None."""
        entry = self._store.manifest.layers[self._layer]
        if self._whole:
            return None  # computed from its cache: nothing read
        if not decoding or self._cache is None:
            every = list(range(len(entry.sections)))
            return self._first(np.arange(entry.neurons), every, 0)
        cache = self._cache
        if not isinstance(self._selector, AllSelector) or cache.window is not None:
            return None
        ids = self._selector.ids
        through = cache.admissible(ids)
        if (cache.slot_of[ids[through]] < 0).any():  # it would admit some: filling
            return None
        return self._first(ids[~through], self._sections, self._gap)

    def _first(self, ids: np.ndarray, sections, gap: int) -> Request:
        """The first read of `ids`' bundles (all of them, or their first piece)."""
        return Request(self._layer, self._chunks(ids, sections, gap)[0], sections, gap)

    def _chunks(
        self, ids: np.ndarray, sections, gap: int, columns: bool = False
    ) -> List[np.ndarray]:
        """`ids` in the pieces the staging buffer takes them in: one, unless the
        buffer is smaller than the layer (`BundleStore.restage`, `read_chunks`)."""
        entry = self._store.entry(self._layer, columns)
        capacity = len(self._store.reader.buffer)
        if not len(ids) or entry.whole_read(list(sections)) <= capacity:
            return [ids]
        key = (columns, tuple(sections), gap, ids.tobytes())
        if self._pieces[0] != key:  # (the same every token with `all`: cut once)
            chosen = [entry.sections[k] for k in sections]
            self._pieces = (key, read_chunks(chosen, ids, gap, capacity))
        return self._pieces[1]

    def _count_whole(self) -> None:
        stats, n = self._stats, self._cache.capacity
        stats.tokens += self._layer == 0
        stats.selected += n
        stats.hits += n

    def _evaluated(self, y: mx.array) -> mx.array:
        # Evaluate now: the layer's decoded neurons are freed before the next layer
        # reads its own, so DRAM holds one layer's FFN at a time, never the model's.
        # (This also evaluates the attention before it: "compute" includes it.)
        self._stats.evals += 1
        mx.eval(y)
        return y  # (B, L, D)

    def _dense(self, x: mx.array) -> mx.array:
        self._stats.dense_layers += 1
        entry = self._store.manifest.layers[self._layer]
        every = list(range(len(entry.sections)))
        decoding = x.shape[0] * x.shape[1] == 1
        y = mx.zeros_like(x)
        for ids, _, pieces, last in self._reads(
            np.arange(entry.neurons), every, 0, False, decoding
        ):
            w = self._staged(pieces, 0, len(ids), x.dtype)
            if w is None:
                self._waited()  # the pool's rows may still be computed from
                timed = self._stats.timed("memory") if decoding else None
                with timed or contextlib.nullcontext():
                    for positions, components, rows in pieces:
                        self._pool.put(positions, components, rows)
                w = self._pool.first(len(ids), self._encodings)
            y = y + self._partial(x, w, None)
            if not last:
                self._settled(y)
        return self.with_bias(y)

    def _reads(
        self,
        ids: np.ndarray,
        sections,
        gap: int,
        columns: bool,
        decoding=True,
        whole=False,
    ):
        """Read `ids`' bundles piece by piece (`_chunks`): yields ``(piece's ids, its
        first position in ids, its pieces, last)``; each read starts the next piece's
        ahead, into the other buffer. The caller uses a piece's views before asking
        for the next one, and evaluates what computes from them unless `last`
        (`_settled`): the buffer is read into again. `whole`: runs as read
        (`BundleStore.read_runs`)."""
        chunks, at = self._chunks(ids, sections, gap, columns), 0
        ahead = self._ahead if not columns and not whole else None
        for i, chunk in enumerate(chunks):
            pieces = self._read(chunk, sections, gap, columns, decoding, whole)
            last = i + 1 == len(chunks)
            if not last and ahead is not None:
                self._waited()  # the next read goes where the piece before was
                ahead.start(Request(self._layer, chunks[i + 1], sections, gap))
            yield chunk, at, pieces, last
            at += len(chunk)

    def _settled(self, *arrays: mx.array) -> None:
        """Start evaluating `arrays` (they compute from a staging buffer, or the
        pool, that a later piece of the layer is read into) while the next piece is
        taken; `_waited` before that buffer is read into again."""
        self._waited()
        self._stats.evals += 1
        mx.async_eval(*arrays)
        self._computing = arrays

    def _waited(self) -> None:
        """Wait for the piece being evaluated (`_settled`), if any."""
        if self._computing:
            mx.eval(*self._computing)
            self._computing = ()

    def _staged(
        self, pieces: list, first: int, n: int, dtype: mx.Dtype
    ) -> Optional[Dict[str, Weight]]:
        """The weights of read positions ``first .. first + n - 1`` computed from where
        they were read: a planar store's sections read as one gapless run each, in
        order, are row-major matrices in the staging buffer, so their rows are viewed,
        not copied (`BundleStore.staged`). None where the pieces are not such runs
        (bundled or split sections, several runs, rows picked past a gap)."""
        if not n:
            return None
        parts = []
        for positions, components, rows in pieces:
            (c,) = components if len(components) == 1 else (None,)
            if c is None or c.part is None or len(positions) < first + n:
                return None
            run = as_slice(positions)  # the read positions 0, 1, ... in order
            if not isinstance(run, slice) or run.start != 0:
                return None
            parts.append((c, rows[first : first + n]))
        return self._viewed(parts, self._store.manifest.layers[self._layer], dtype)

    def _viewed(self, parts: list, entry, dtype) -> Optional[Dict[str, Weight]]:
        """The weights of planar parts' rows ``[(component, rows)]`` as they lie in
        a staging buffer, viewed, not copied (`BundleStore.staged`); None if some
        rows are not such a view."""
        views = {}
        for c, rows in parts:
            staged = self._store.staged(rows)
            if staged is None:
                return None
            views.setdefault(c.name, {})[c.part] = staged
        return {
            name: assemble(entry.components[name], v, dtype)
            for name, v in views.items()
        }

    def _sparse(self, x: mx.array) -> mx.array:
        """Selected neurons: the first `capacity` (by score) through the cache; any
        beyond it streamed past it (computed from the pool), so a small budget costs
        I/O, never quality."""
        stats, cache = self._stats, self._cache
        with stats.timed("select"):  # (the attention before it included)
            selection = self._selector(x)  # one host sync: the decision
        stats.syncs += 1
        ids, pre = selection.ids, selection.pre
        if self.trace is not None:
            self.trace.append((None, ids))
        y = mx.zeros_like(x)
        for positions, w, reused in self._fetch(
            cache, self._pool, ids, self._sections, self._gap, x.dtype
        ):
            with stats.timed("compute"):
                p = None if pre is None else pre[mx.array(positions.astype(np.uint32))]
                y = y + self._partial(x, w, p)
                if reused:
                    self._settled(y)
        stats.selected += len(ids)
        if self._online is not None:  # (between tokens: this one's reads are placed)
            self._online.update(self._layer, ids, cache)
        self._whole = (
            isinstance(self._selector, AllSelector)
            and cache.window is None
            and cache.capacity == len(cache.slot_of)  # the cache holds the layer
            and len(ids) == cache.capacity  # and it was all selected
        )
        return self.with_bias(y)

    def _input(self, x: mx.array) -> mx.array:
        """The `input` selector (`input_sparse.py`): the kept input channels' gate/up
        columns through the column cache give every neuron's a = act(gate)·up from
        the sparsified input; the kept neurons' down rows through the neuron cache
        give the output. Two host syncs, each a decision before its read."""
        stats, select, columns = self._stats, self._selector, self._columns
        with stats.timed("select"):
            channels = select.channels(x)  # (the attention before it included)
        stats.syncs += 1
        xk, h = self._take(x.reshape(-1), channels), [0, 0]
        for index, w, reused in self._fetch(
            columns.cache,
            columns.pool,
            channels,
            columns.sections,
            columns.gap,
            x.dtype,
            True,
            True,
        ):
            with stats.timed("compute"):
                v = xk[mx.array(index.astype(np.uint32))].reshape(1, 1, -1)
                for k, name in enumerate(self.rows):
                    enc = self._column_encodings[name]
                    h[k] = h[k] + matmul(v, w[name], enc, transpose=False)
                if reused:
                    self._settled(*h)
        stats.channels += len(channels)
        with stats.timed("compute"):
            a = self.activate(h)  # (1, 1, n)
        with stats.timed("select"):
            ids = select.neurons(a)
        stats.syncs += 1
        if self.trace is not None:
            self.trace.append((channels, ids))
        y = mx.zeros_like(x)
        ak, enc = self._take(a.reshape(-1), ids), self._encodings[self.column]
        for index, w, reused in self._fetch(
            self._cache,
            self._pool,
            ids,
            self._sections,
            self._gap,
            x.dtype,
            masked=True,
        ):
            with stats.timed("compute"):
                v = ak[mx.array(index.astype(np.uint32))].reshape(1, 1, -1)
                y = y + matmul(v, w[self.column], enc, transpose=False)
                if reused:
                    self._settled(y)
        stats.selected += len(ids)
        return self.with_bias(y)

    @staticmethod
    def _take(values: mx.array, ids: np.ndarray) -> mx.array:
        """values[ids], and a zero after them (where a masked part points)."""
        taken = values[mx.array(ids.astype(np.uint32))]
        return mx.concatenate([taken, mx.zeros((1,), values.dtype)])

    def _fetch(
        self,
        cache: NeuronCache,
        pool: Slots,
        ids: np.ndarray,
        sections: List[int],
        gap: int,
        dtype: mx.Dtype,
        columns: bool = False,
        masked: bool = False,
    ) -> Iterator[Tuple[np.ndarray, Dict[str, Weight], bool]]:
        """The weights of `ids` (most important first) as parts ``(positions,
        weights, reused)``: the hits and the best-scored misses that fit through the
        cache (a cached id costs no slot), the rest streamed past it into the pool
        (benchmarks/results/hot-set.md: LRU's hit rate 2.4% -> 7.2% at 5% of a
        layer on SmolLM2). Misses and overflow are one coalesced read (in pieces,
        when the staging buffer is smaller than the layer: `_reads`), each id's
        bytes moved once: into its slot, or into the pool's rows; or, for a planar
        store's gapless runs, the overflow not at all (`_staged`): each piece's
        part then comes as it is read, `reused` where the caller must evaluate it
        before the next (its buffer is read into again); the cache's part last.

        With `masked`, the cache's piece is every slot, no gather: its positions
        give each slot the position of its id in `ids`, or ``len(ids)`` where the
        slot's id was not selected (the caller multiplies those by zero). Cheaper
        than gathering when most cached ids are selected (the input selector's
        70-80% of channels: a gather copies them before the product reads them).
        On a planar store, `masked` reads each run whole and computes it where it
        was read, the ids read past in it at ``len(ids)`` too (`_in_place`): only
        the cache's rows move."""
        stats = self._stats
        with stats.timed("memory"):
            through = cache.admissible(ids)
            mine, extra = ids[through], ids[~through]
            slots, load_ids, load_slots = cache.admit(mine)
        n, past = len(load_ids), np.nonzero(~through)[0]  # the first n go to slots
        entry = self._store.entry(self._layer, columns)
        in_place = masked and all(entry.sections[k].part for k in sections)
        pooled = False
        try:
            for chunk, at, pieces, last in self._reads(
                np.concatenate([load_ids, extra]),
                sections,
                gap,
                columns,
                whole=in_place,
            ):
                if in_place:  # (a planar store's runs, each computed as read)
                    runs = self._in_place(
                        pieces, sections, at, n, past, len(ids), entry, dtype
                    )
                    with stats.timed("memory"):  # only the cache's rows move
                        self._place_own(cache, pieces, at, load_slots)
                    for j, (index, w) in enumerate(runs):
                        yield index, w, not last and j + 1 == len(runs)
                    continue
                k = min(max(n - at, 0), len(chunk))  # the piece's ids for slots
                staged = None
                if not columns:
                    staged = self._staged(pieces, k, len(chunk) - k, dtype)
                with stats.timed("memory"):
                    if staged is not None:  # only the cache's rows move
                        pieces = [(p[:k], c, rows[:k]) for p, c, rows in pieces if k]
                    pieces = [(p + at, c, rows) for p, c, rows in pieces]
                    if pieces:  # (slots and pool rows: nothing may compute from them)
                        self._waited()
                    self._place(cache, pool, pieces, load_slots)
                if staged is not None:
                    yield past[at + k - n : at + len(chunk) - n], staged, not last
                else:
                    pooled = pooled or len(chunk) > k
        except BaseException:
            cache.release(load_slots)  # admitted, maybe never filled: forget them
            raise
        hits, loaded = len(mine) - len(load_ids), len(load_ids) + len(extra)
        if columns:
            stats.channel_hits += hits
            stats.channels_loaded += loaded
        else:
            stats.hits += hits
            stats.loaded += loaded
        if masked and cache.capacity:
            index = np.full(cache.capacity, len(ids), np.int64)
            index[slots] = np.nonzero(through)[0]
            yield index, cache.arrays, False
        elif len(mine):
            yield np.nonzero(through)[0], cache.gather(slots), False
        if pooled:
            yield past, pool.first(len(extra), cache.arrays), False

    def _in_place(
        self, pieces: list, sections, at: int, n: int, past, count: int, entry, dtype
    ) -> List[Tuple[np.ndarray, Dict[str, Weight]]]:
        """Each run of a planar read (`read_runs(whole=True)`: section after section,
        run after run) computed where it was read: its parts' rows viewed in the
        staging buffer (`BundleStore.staged`), each row given its position in the
        caller's ids (`past`: those of the read ids from the `n`-th on), or `count`
        (where the caller's values hold a zero) for a neuron read past in a gap or
        bound for the cache (the first `n`, computed from their slots)."""
        runs, out = len(pieces) // len(sections), []
        for r in range(runs):
            own = pieces[r::runs]  # the run's piece of each section
            positions = own[0][0]
            streamed = (positions >= 0) & (positions + at >= n)
            if not streamed.any():
                continue  # the cache's neurons alone
            index = np.full(len(positions), count, np.int64)
            index[streamed] = past[positions[streamed] + at - n]
            w = self._viewed([(c, rows) for _, (c,), rows in own], entry, dtype)
            assert w is not None, "a planar run is a view of the buffer"
            out.append((index, w))
        return out

    def _place_own(self, cache, pieces: list, at: int, load_slots: np.ndarray) -> None:
        """Of a planar read's runs (`_in_place`), the rows bound for the cache into
        their slots: the read ids' first ``len(load_slots)``."""
        n, waited = len(load_slots), False
        for positions, components, rows in pieces if n else ():
            mine = (positions >= 0) & (positions + at < n)
            if mine.any():
                if not waited:  # (slots: nothing may compute from them)
                    self._waited()
                    waited = True
                cache.put(load_slots[positions[mine] + at], components, rows[mine])

    def _from_cache(self, x: mx.array) -> mx.array:
        """Every neuron cached, every neuron used: no selection, no reads, no gather
        (the FFN is a sum over neurons, so the slots' order does not matter)."""
        return self.with_bias(self._partial(x, self._cache.arrays, None))

    def _read(
        self,
        ids: np.ndarray,
        sections,
        gap: int,
        columns: bool,
        decoding: bool = True,
        whole: bool = False,
    ) -> list:
        """The bundles of `ids`: read ahead (by the layer or piece before), or read
        now, once the piece before is computed (its buffer may be this read's)."""
        if not len(ids):
            return []

        def io():
            return self._stats.timed("io") if decoding else contextlib.nullcontext()

        if self._ahead is not None and not columns and not whole:
            with io():
                pieces = self._ahead.take(Request(self._layer, ids, sections, gap))
            if pieces is not None:
                return pieces
        self._waited()
        with io():
            return self._store.read_runs(
                self._layer, ids, sections, gap, columns, whole=whole
            )

    @staticmethod
    def _place(cache, pool, pieces: list, load_slots: np.ndarray) -> None:
        """Read rows to where they are used: the first ``len(load_slots)`` ids into
        their cache slots, the rest (the overflow, past the cache) into the pool's
        rows in their order."""
        n = len(load_slots)
        for positions, components, rows in pieces:
            miss = positions < n
            if miss.all():
                cache.put(load_slots[positions], components, rows)
            elif not miss.any():
                pool.put(positions - n, components, rows)
            else:  # a run with both (their rows picked apart: a copy)
                cache.put(load_slots[positions[miss]], components, rows[miss])
                pool.put(positions[~miss] - n, components, rows[~miss])

    def _partial(self, x: mx.array, w: Dict[str, Weight], pre) -> mx.array:
        """The FFN output of the neurons in `w` (bias excluded); `pre` is their first
        row's pre-activation when the selector already computed it."""
        if pre is not None:
            h = [pre.reshape(1, 1, -1)] + [self.project(x, w, n) for n in self.rows[1:]]
        else:
            h = [self.project(x, w, name) for name in self.rows]
        a = self.activate(h)
        return matmul(a, w[self.column], self._encodings[self.column], transpose=False)

    def activate(self, h: List[mx.array]) -> mx.array:
        """The input of the output projection: act(gate) * up, or act(fc1)."""
        return self.activation(h[0]) * h[1] if self.gated else self.activation(h[0])

    def with_bias(self, y: mx.array) -> mx.array:
        return y + self[self.column].bias if self.column in self else y

    def read_all(self, dtype: mx.Dtype) -> Dict[str, Weight]:
        return self._store.read_layer(self._layer, dtype)

    def project(self, x: mx.array, w: Dict[str, Weight], name: str) -> mx.array:
        h = self.matmul_rows(x, w[name], name)  # (B, L, n)
        bias = w.get(name + ".bias")
        return h if bias is None else h + bias.reshape(-1)

    def matmul_rows(self, x: mx.array, rows: Weight, name: str) -> mx.array:
        return matmul(x, rows, self._encodings[name], transpose=True)

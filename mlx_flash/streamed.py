"""Dense weights the plan does not hold: read from the store's aligned
`model.safetensors` every time they are used, through the same direct-I/O reader as the
FFN's bundles.

A layer's attention becomes a `StreamedModule`: before each call its tensors are read
(one coalesced read: format v2 starts every tensor of 4 KiB or more on a block) and
put into the module, after it they are dropped. The LM head becomes a `StreamedHead`
that reads its matrix in chunks of vocabulary rows, so at most one chunk is in DRAM.
A pass computes where it was read: its arrays are views of the staging buffer
(floats stored in another dtype than the compute dtype converted). While a decoded
token's pass (an attention, a head chunk) computes, the pass that follows it is read
into a second staging buffer (`DenseStream`).
"""

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .errors import FlashError, ReadError
from .stats import FlashStats
from .store.aligned_safetensors import MLX_DTYPES
from .store.encoding import Encoding, matmul
from .store.format import ALIGN
from .store.reader import READERS, ReadStats, aligned_extents
from .store.safety import check_safetensors

NUMPY = {  # the numpy type of each safetensors dtype read
    "U32": np.uint32,
    "U8": np.uint8,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,  # its bits; viewed as bfloat16 in MLX
    "I32": np.int32,
}


@dataclass(frozen=True)
class TensorAt:
    """One tensor of the dense file: where it lies and what it holds."""

    name: str
    dtype: str  # the safetensors dtype ("F16", "U32", ...)
    shape: Tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return (
            int(np.prod(self.shape, dtype=np.int64))
            * np.dtype(NUMPY[self.dtype]).itemsize
        )

    @property
    def floating(self) -> bool:
        return self.dtype in ("F32", "F16", "BF16")

    def rows(self, a: int, b: int) -> "TensorAt":
        """Rows [a, b) of a matrix, as a tensor of their own."""
        row = self.nbytes // self.shape[0]
        return TensorAt(
            self.name, self.dtype, (b - a, *self.shape[1:]), self.offset + a * row
        )


def dense_tensors(path: Path) -> Dict[str, TensorAt]:
    """Every tensor of the dense file, by name (checked against the file's size)."""
    return {
        name: TensorAt(name, dtype, tuple(shape), offset)
        for name, (dtype, shape, offset) in check_safetensors(path).items()
        if dtype in NUMPY
    }


def to_array(
    raw: memoryview, t: TensorAt, dtype: Optional[mx.Dtype], staging=None
) -> mx.array:
    """A tensor's bytes -> an MLX array, floats cast to `dtype`: a view of the
    bytes where they lie in `staging` (a reader's `Staging` buffer: valid until its
    next read) and are aligned for their type, else a copy."""
    host = np.frombuffer(raw, np.uint8)
    itemsize = np.dtype(NUMPY[t.dtype]).itemsize
    a = None
    if staging is not None and host.ctypes.data % max(itemsize, 4) == 0:
        a = staging.mlx(host)
    if a is None:
        a = mx.array(host)
    a = a.view(MLX_DTYPES[t.dtype]).reshape(t.shape)
    return (
        a.astype(dtype) if dtype is not None and t.floating and a.dtype != dtype else a
    )


def span(tensors: Sequence[TensorAt]) -> int:
    """Bytes one read of `tensors` takes in the staging buffer (widened to blocks)."""
    ranges = sorted((t.offset, t.nbytes) for t in tensors)
    return sum(e - s for s, e in aligned_extents(ranges))


class DenseStream:
    """Reads tensors of the dense file into MLX arrays, counting decoding's bytes.

    Each pass (a streamed attention, a chunk of a streamed head) is read into one of
    two staging buffers; while a decoded token's pass computes, the pass that came
    after it last time is read into the other one on a background thread (so the
    next streamed attention, or the head's next chunk, or the next token's first
    streamed attention). A pass that finds another read ahead than its own drops it
    (its bytes were read for nothing) and reads now.

    Args:
        path: the store's model.safetensors.
        capacity: the largest read (`span`) any pass makes; each of the two staging
            buffers holds one (both in the plan: `planner.streaming_bytes`).
        threads, reader: as the store's reader.
        stats: the model's counters; bytes read while decoding one token count there.
        checker: the dense file's `BlockChecker` (each block checked when first
            read), or None.
    """

    def __init__(
        self,
        path: Path,
        capacity: int,
        threads: int,
        reader: str,
        stats: FlashStats,
        checker=None,
    ):
        self.path = Path(path)
        self.readers = tuple(
            READERS[reader](self.path, capacity, threads, checker) for _ in range(2)
        )
        self.stats = stats
        self.dtype: Optional[mx.Dtype] = None  # the compute dtype, set by the setup
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="mlx_flash-dense")
        # a decoded token's passes, each to the one that followed it last
        self._follows: Dict[Tuple[TensorAt, ...], Sequence[TensorAt]] = {}
        self._last: Optional[Tuple[TensorAt, ...]] = None  # decoding's last pass
        # the pass read ahead: (its tensors, the read, the reader it reads with)
        self._pending: Optional[Tuple[Tuple[TensorAt, ...], Future, int]] = None
        self._cur = 0  # the reader whose buffer the pass computing now was read into
        self.taken = self.dropped = 0  # reads ahead used, and read for nothing

    def load(self, tensors: Sequence[TensorAt], decoding: bool) -> List[mx.array]:
        return next(self.load_each([tensors], decoding))

    def load_each(
        self, groups: Sequence[Sequence[TensorAt]], decoding: bool
    ) -> Iterator[List[mx.array]]:
        """Each group's tensors as arrays (made on this thread), in turn; the next
        group (or, decoding, the pass that followed the last one before) is read
        ahead while the caller uses one. The arrays view the staging buffer they were
        read into (floats converted): the caller evaluates what it computes from them
        before asking for the group after next, which is read into the same buffer."""
        for k, tensors in enumerate(groups):
            key = tuple(tensors)
            with self.stats.timed("io") if decoding else contextlib.nullcontext():
                views, nbytes, order = self._take(key, decoding)
                if decoding:
                    if self._last is not None:
                        self._follows[self._last] = tensors
                    self._last = key
                else:
                    self._last = None
                ahead = groups[k + 1] if k + 1 < len(groups) else None
                if ahead is None and decoding:
                    ahead = self._follows.get(key)
                if ahead is not None:  # into the buffer these views are not in
                    other = 1 - self._cur
                    future = self._thread.submit(self._read, ahead, self.readers[other])
                    self._pending = (tuple(ahead), future, other)
                arrays = [None] * len(tensors)  # views of the staging buffer
                staging = self.readers[self._cur].buffer
                for i, raw in zip(order, views):
                    arrays[i] = to_array(raw, tensors[i], self.dtype, staging)
                del views
            if decoding:
                self.stats.bytes += nbytes
            yield arrays

    def _take(self, key: Tuple[TensorAt, ...], decoding: bool) -> tuple:
        """The pass `key`: read ahead, or (after dropping a read ahead of another
        pass: decoding counts its bytes) read now."""
        if self._pending is not None and self._pending[0] == key:
            _, future, self._cur = self._pending
            self._pending = None
            self.taken += 1
            return future.result()  # a failed read raises here
        dropped = self.settle()
        if decoding:
            self.stats.bytes += dropped
        return self._read(key, self.readers[self._cur])

    def settle(self) -> int:
        """Wait for a read ahead still in flight and drop it (an error too: nothing
        will use its bytes); the bytes it read."""
        if self._pending is None:
            return 0
        future, self._pending = self._pending[1], None
        self.dropped += 1
        try:
            return future.result()[1]
        except Exception:
            return 0

    def _read(self, tensors: Sequence[TensorAt], reader) -> tuple:
        """`tensors` read with `reader`: (views in offset order, bytes read, that
        order of `tensors`)."""
        order = sorted(range(len(tensors)), key=lambda i: tensors[i].offset)
        stats = ReadStats()
        try:
            views = reader.read_ranges(
                [(tensors[i].offset, tensors[i].nbytes) for i in order], stats
            )
        except ReadError as e:  # name the tensor holding the failing byte
            raise e.within(holding(tensors, e.offset)) from None
        reader.stats.reads += stats.reads
        reader.stats.bytes += stats.bytes
        reader.stats.seconds += stats.seconds
        return views, stats.bytes, order

    def read_totals(self) -> ReadStats:
        """The dense part's reads so far, by both readers (as
        `BundleStore.read_totals` for the bundles)."""
        return ReadStats.total([r.stats for r in self.readers])

    def close(self) -> None:
        self.settle()
        self._thread.shutdown(wait=True)
        for reader in self.readers:
            reader.close()


def holding(tensors: Sequence[TensorAt], at: Optional[int]) -> str:
    """The tensors with bytes in the 4 KiB block at `at` (a failed read's or
    checksum's), as a phrase; all of `tensors` when `at` is unknown."""
    hit = [
        t.name
        for t in tensors
        if at is None or (t.offset < at + ALIGN and at < t.offset + t.nbytes)
    ]
    hit = hit or [t.name for t in tensors]
    more = ", ..." if len(hit) > 4 else ""
    return ("tensor " if len(hit) == 1 else "tensors ") + ", ".join(hit[:4]) + more


def _decoding(args) -> bool:
    x = next((a for a in args if isinstance(a, mx.array)), None)
    return x is not None and x.ndim >= 2 and x.shape[0] * x.shape[1] == 1


class StreamedModule(nn.Module):
    """`module` with its weights read from the dense file for each call.

    Between calls the module holds zero-size placeholders, so it costs no DRAM; its
    output is evaluated before the weights are dropped (one unit in flight)."""

    def __init__(
        self,
        module: nn.Module,
        prefix: str,
        tensors: Dict[str, TensorAt],
        stream: DenseStream,
    ):
        super().__init__()
        self.inner = module
        names = [k for k, _ in tree_flatten(module.parameters())]
        missing = [prefix + k for k in names if prefix + k not in tensors]
        if missing:
            raise FlashError(
                f"the dense file has no {missing[0]}",
                stream.path,
                "convert the model again",
            )
        self._names = names
        self._tensors = [tensors[prefix + k] for k in names]
        self._stream = stream
        self._empty()

    def _empty(self) -> None:
        self.inner.update(
            tree_unflatten([(k, mx.zeros((0,), mx.uint8)) for k in self._names])
        )

    @property
    def stored_bytes(self) -> int:
        return sum(t.nbytes for t in self._tensors)

    def __call__(self, *args, **kwargs):
        arrays = self._stream.load(self._tensors, _decoding(args))
        self.inner.update(tree_unflatten(list(zip(self._names, arrays))))
        try:
            out = self.inner(*args, **kwargs)
            self._stream.stats.evals += 1
            mx.eval(out)
        finally:
            del arrays
            self._empty()
        return out

    def __getattr__(self, name):  # the wrapped module's attributes (n_heads, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "inner" or "inner" not in self:
                raise
            return getattr(self["inner"], name)


class StreamedHead(nn.Module):
    """``x @ W.T (+ b)`` for a (vocab, hidden) matrix read in chunks of `rows` rows
    every call: the LM head, or a tied table used as one (`as_linear`).

    Args:
        parts: the matrix's tensors ("weight", and "scales"/"biases" when quantized;
            "bias" for a linear layer's bias).
        encoding: how "weight" is stored (a float or an MLX quantization).
        rows: vocabulary rows per chunk.
    """

    def __init__(
        self,
        parts: Dict[str, TensorAt],
        encoding: Encoding,
        rows: int,
        stream: DenseStream,
    ):
        super().__init__()
        self._parts, self._encoding, self._stream = parts, encoding, stream
        self._vocab = parts["weight"].shape[0]
        self._rows = max(1, min(rows, self._vocab))

    def chunks(self) -> List[Tuple[int, int]]:
        return [
            (a, min(a + self._rows, self._vocab))
            for a in range(0, self._vocab, self._rows)
        ]

    def __call__(self, x: mx.array) -> mx.array:
        names = [n for n in ("weight", "scales", "biases", "bias") if n in self._parts]
        if x.ndim >= 2 and x.shape[-2] > 1:
            return self._lazy(x, names)
        decoding = _decoding([x])
        out, chunks = [], self.chunks()
        groups = [[self._parts[n].rows(a, b) for n in names] for a, b in chunks]
        for arrays in self._stream.load_each(groups, decoding):
            got = dict(zip(names, arrays))
            w = got["weight"]
            if self._encoding.quantized:
                w = (w, got["scales"]) + ((got["biases"],) if "biases" in got else ())
            y = matmul(x, w, self._encoding, transpose=True)
            if "bias" in got:
                y = y + got["bias"]
            self._stream.stats.evals += 1
            mx.eval(y)
            out.append(y)
            del got, w
        return mx.concatenate(out, axis=-1)

    def _lazy(self, x: mx.array, names: List[str]) -> mx.array:
        """Several positions' logits (a prompt step) as a graph on the matrix loaded
        lazily from the file: nothing is read unless they are evaluated. mlx-lm's
        generation never evaluates them (its prompt steps keep only the KV cache), so
        prefill costs no head read and no logits; a caller who evaluates them (a
        perplexity script) has the matrix read whole, beyond the plan, once per call."""
        lazy, cast = mx.load(str(self._stream.path)), self._stream.dtype
        got = {}
        for n in names:
            t = self._parts[n]
            got[n] = lazy[t.name].astype(cast) if cast and t.floating else lazy[t.name]
        w = got["weight"]
        if self._encoding.quantized:
            w = (w, got["scales"]) + ((got["biases"],) if "biases" in got else ())
        y = matmul(x, w, self._encoding, transpose=True)
        return y + got["bias"] if "bias" in got else y


def head_rows(parts: Dict[str, TensorAt], chunk_bytes: int) -> int:
    """Rows per chunk of a streamed head so that a chunk's stored bytes stay within
    `chunk_bytes`."""
    row = sum(t.nbytes // t.shape[0] for t in parts.values())
    return max(1, chunk_bytes // max(row, 1))

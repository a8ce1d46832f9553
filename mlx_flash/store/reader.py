"""The only code that reads FFN bytes: direct I/O into aligned buffers, in parallel.

Reads bypass the OS page cache (O_DIRECT on Linux, F_NOCACHE on macOS) so that the
store really is read from the SSD and never doubles as a hidden DRAM cache (paper §3).
Direct I/O needs page-aligned buffers, offsets and lengths: requests are widened to 4
KiB boundaries, land in one preallocated staging buffer, and callers get views into it.
The staging buffer is an MLX array's memory, so a planar store's runs (docs/FORMAT.md
§3) are computed from where they were read, with no copy (`Staging.mlx`).
"""

import errno
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..errors import FlashError, ReadError
from .format import ALIGN, align_up

CHUNK = 1 << 20  # split big requests so that every thread has work in flight


def open_unbuffered(path: Path) -> Tuple[int, bool]:
    """Open `path` read-only bypassing the page cache; `(fd, direct)`.

    The one platform-specific function of the reader. Falls back to a buffered fd where
    the filesystem refuses direct I/O (tmpfs, some network filesystems).
    """
    if sys.platform == "darwin":
        import fcntl

        fd = os.open(path, os.O_RDONLY)
        fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        return fd, True
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0)), hasattr(
            os, "O_DIRECT"
        )
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    return os.open(path, os.O_RDONLY), False


class Staging:
    """A page-aligned buffer of `nbytes` in an MLX array's memory: the reader writes
    into `view` (MLX's own buffers start some bytes past a page: one page more is
    allocated and the aligned window taken), MLX computes from `mlx` views of it."""

    def __init__(self, nbytes: int):
        self.array = mx.zeros((nbytes + ALIGN,), mx.uint8)
        mx.eval(self.array)
        host = np.array(self.array, copy=False)
        self.skip = -host.ctypes.data % ALIGN
        self.host = host[self.skip : self.skip + nbytes]
        self.view = memoryview(self.host)

    def __len__(self) -> int:
        return len(self.host)

    def mlx(self, rows: np.ndarray) -> Optional[mx.array]:
        """The bytes of `rows` (a C-contiguous uint8 view of this buffer) as an MLX
        array of the same shape sharing them (valid until the next read into the
        buffer), or None if `rows` is not such a view."""
        start = rows.__array_interface__["data"][0] - self.host.ctypes.data
        if not rows.flags.c_contiguous or not 0 <= start <= len(self) - rows.nbytes:
            return None
        at = self.skip + start
        return self.array[at : at + rows.nbytes].reshape(rows.shape)

    def close(self) -> None:
        """Drop the buffer (freed once no MLX view of it is left)."""
        self.view.release()
        self.array = self.host = None


@dataclass
class ReadStats:
    """Counters of the reader; `seconds` is wall time spent in `read`."""

    reads: int = 0
    bytes: int = 0
    seconds: float = 0.0

    @staticmethod
    def total(stats: Sequence["ReadStats"]) -> "ReadStats":
        """Several readers' counters added up."""
        return ReadStats(
            sum(s.reads for s in stats),
            sum(s.bytes for s in stats),
            sum(s.seconds for s in stats),
        )


class BundleReader:
    """Parallel aligned reads of byte ranges of one file into a reusable staging buffer.

    Args:
        path: the bundles file.
        capacity: the largest request (in bytes) the caller will make.
        threads: parallel reads in flight.
        checker: checks each block the first time a read brings it (a mismatch is
            a `ReadError` at its first byte); None: no checksums.
    """

    def __init__(self, path: Path, capacity: int, threads: int = 4, checker=None):
        self.path, self.checker = Path(path), checker
        try:
            self.fd, self.direct = open_unbuffered(self.path)
        except OSError as e:
            raise FlashError(
                f"cannot open the bundles file ({e.strerror})", path
            ) from None
        self.capacity = align_up(capacity)  # the largest request
        self.buffer = Staging(self.capacity + 2 * ALIGN)
        self.view = self.buffer.view
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(
            self.threads, thread_name_prefix="mlx_flash-read"
        )
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._retired = []

    def read(self, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset + nbytes) of the file, valid until the next read."""
        return self.read_ranges([(offset, nbytes)])[0]

    def read_ranges(
        self, ranges: Sequence[Tuple[int, int]], stats: Optional[ReadStats] = None
    ) -> List[memoryview]:
        """Each (offset, nbytes) range of the file, read in parallel; the views stay
        valid until the next read. Ranges must be sorted and must not overlap.
        Counted in `stats` (default: the reader's own)."""
        stats = stats or self.stats
        extents = aligned_extents(ranges)
        if sum(e - s for s, e in extents) > len(self.buffer):
            raise FlashError("a read exceeds the staging buffer", self.path)
        tic = time.perf_counter()
        pieces, at, where = [], 0, []  # (file start, file end, buffer position)
        for s_, e_ in extents:
            where.append((s_, e_, at))
            pieces += [
                (a, min(a + CHUNK, e_), at + a - s_) for a in range(s_, e_, CHUNK)
            ]
            at += e_ - s_
        slices = [pieces[i :: self.threads] for i in range(self.threads)]
        futures = [self.pool.submit(self._read_pieces, s) for s in slices if s]
        wait(futures)  # all of them, even after a failure: none may write into the
        # staging buffer once we return (the next read would see its bytes)
        stop = min(f.result() for f in futures)  # where a worker met the end of file
        last = max(o + n for o, n in ranges)
        if stop < last:
            raise truncated(self.path, stop, last)
        stats.reads += len(pieces)
        stats.bytes += at
        stats.seconds += time.perf_counter() - tic
        if self.checker is not None:  # whole blocks: the extents are aligned
            for s_, e_, pos in where:
                self.checker.check(s_, self.view[pos : pos + min(e_, stop) - s_])
        views, e = [], 0
        for offset, nbytes in ranges:
            while not where[e][0] <= offset < where[e][1]:
                e += 1
            pos = where[e][2] + offset - where[e][0]
            views.append(self.view[pos : pos + nbytes])
        return views

    def _read_pieces(self, pieces: Sequence[Tuple[int, int, int]]) -> int:
        for a, b, pos in pieces:
            at = self._read_into(a, b, pos - a)
            if at < b:
                return at
        return sys.maxsize

    def _read_into(self, a: int, b: int, shift: int) -> int:
        """Read [a, b) into the buffer at [a + shift, b + shift); returns where it
        stopped (b, or the end of the file)."""
        at = a
        while at < b:
            fd = self.fd
            try:
                n = os.preadv(fd, [self.view[at + shift : b + shift]], at)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    self._reopen_buffered(fd)  # the filesystem refused direct I/O
                    continue
                raise ReadError(
                    f"reading bytes {at}-{b} failed "
                    f"({errno.errorcode.get(e.errno, e.errno)}: {e.strerror})",
                    self.path,
                    "check the disk (dmesg); convert the model again if the file is "
                    "damaged",
                    offset=at,
                ) from None
            if n == 0:
                return at
            at += n
        return at

    def _reopen_buffered(self, failed_fd: int) -> None:
        with self._lock:
            if failed_fd != self.fd:
                return  # another thread already reopened
            if not self.direct:
                raise FlashError(
                    "reads fail with EINVAL even without direct I/O", self.path
                )
            self._retired.append(self.fd)  # other threads may still be reading from it
            self.fd, self.direct = os.open(self.path, os.O_RDONLY), False

    def close(self, wait: bool = True) -> None:
        if self.fd >= 0:
            self.pool.shutdown(wait=wait)
            for fd in [self.fd, *self._retired]:
                os.close(fd)
            self.fd = -1
            try:
                self.buffer.close()
            except BufferError:
                pass  # a caller still holds a view of the last read: freed with it

    def __del__(self):
        # Never wait here: the garbage collector may run this inside a thread that is
        # starting up while another thread waits for it (seen: a deadlock in the test
        # suite). Unreachable, the reader has no read in flight to wait for.
        try:
            self.close(wait=False)
        except Exception:
            pass


def truncated(path: Path, stop: int, last: int) -> ReadError:
    return ReadError(
        f"the bundles file ends at byte {stop}, before byte {last}: it was truncated "
        "after the store was opened",
        path,
        "do not modify a store while it is in use; convert the model again",
        offset=stop,
    )


def aligned_extents(ranges: Sequence[Tuple[int, int]]) -> List[Tuple[int, int]]:
    """Sorted byte ranges widened to 4 KiB boundaries, touching ones merged."""
    extents = []
    for offset, nbytes in ranges:
        start, end = offset - offset % ALIGN, align_up(offset + nbytes)
        if extents and start <= extents[-1][1]:
            extents[-1] = (extents[-1][0], max(end, extents[-1][1]))
        else:
            extents.append((start, end))
    return extents


class MmapReader:
    """The same interface over a read-only mmap of the file (`MADV_RANDOM`, so that a
    random 4 KiB access does not pull megabytes of readahead). Bytes are copied into
    the staging buffer inside `read_ranges`, so page faults are timed as I/O.

    Pages stay in the OS page cache: DRAM outside the budget, unlike direct I/O.

    Truncation: touching a page of the mapping past the end of a file that shrank
    raises SIGBUS, which kills the process (Python cannot turn it into an exception).
    Every `read_ranges` therefore checks the file's size (`fstat`) first and raises a
    `ReadError` if a range now lies past the end. This narrows the window to the
    microseconds between that check and the copy, but cannot close it: a file
    truncated exactly then still kills the process. The direct reader (`pread`, the
    default) has no such window (a short read becomes a `ReadError`): use it wherever
    another process may modify the store.
    """

    direct = False

    def __init__(self, path: Path, capacity: int, threads: int = 1, checker=None):
        self.path, self.threads, self.checker = Path(path), 1, checker
        try:
            self.fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FlashError(
                f"cannot open the bundles file ({e.strerror})", path
            ) from None
        self.map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        if hasattr(self.map, "madvise") and hasattr(mmap, "MADV_RANDOM"):
            self.map.madvise(mmap.MADV_RANDOM)
        self.size = len(self.map)
        self.capacity = capacity
        self.buffer = Staging(capacity)
        self.view = self.buffer.view
        self.stats = ReadStats()

    def read(self, offset: int, nbytes: int) -> memoryview:
        return self.read_ranges([(offset, nbytes)])[0]

    def read_ranges(
        self, ranges: Sequence[Tuple[int, int]], stats: Optional[ReadStats] = None
    ) -> List[memoryview]:
        stats = stats or self.stats
        tic, views, at = time.perf_counter(), [], 0
        last = max((o + n for o, n in ranges), default=0)
        size = min(self.size, os.fstat(self.fd).st_size)  # the SIGBUS guard
        if last > size:
            raise truncated(self.path, size, last)
        for offset, nbytes in ranges:
            if at + nbytes > len(self.buffer):
                raise FlashError("a read exceeds the staging buffer", self.path)
            self.view[at : at + nbytes] = self.map[offset : offset + nbytes]
            views.append(self.view[at : at + nbytes])
            at += nbytes
        stats.reads += len(ranges)
        stats.bytes += at
        stats.seconds += time.perf_counter() - tic
        if self.checker is not None:  # the blocks around each range, once each
            for offset, nbytes in ranges:
                self.checker.check_file(self.fd, offset, offset + nbytes)
        return views

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.buffer.close()
            self.map.close()
        except (BufferError, ValueError):
            pass  # a caller still holds a view of the last read: freed with it

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


READERS = {"direct": BundleReader, "mmap": MmapReader}

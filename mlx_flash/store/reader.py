"""The only code that reads FFN bytes: direct I/O into aligned buffers, in parallel.

Reads bypass the OS page cache (O_DIRECT on Linux, F_NOCACHE on macOS) so that the
store really is read from the SSD and never doubles as a hidden DRAM cache (paper §3).
Direct I/O needs page-aligned buffers, offsets and lengths: requests are widened to 4 KiB
boundaries, land in one preallocated staging buffer, and callers get views into it.
"""

import errno
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Tuple

from ..errors import FlashError
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


@dataclass
class ReadStats:
    """Counters of the reader; `seconds` is wall time spent in `read`."""

    reads: int = 0
    bytes: int = 0
    seconds: float = 0.0


class BundleReader:
    """Parallel aligned reads of byte ranges of one file into a reusable staging buffer.

    Args:
        path: the bundles file.
        capacity: the largest request (in bytes) the caller will make.
        threads: parallel reads in flight.
    """

    def __init__(self, path: Path, capacity: int, threads: int = 4):
        self.path = Path(path)
        try:
            self.fd, self.direct = open_unbuffered(self.path)
        except OSError as e:
            raise FlashError(
                f"cannot open the bundles file ({e.strerror})", path
            ) from None
        self.size = os.fstat(self.fd).st_size
        self.buffer = mmap.mmap(-1, align_up(capacity) + 2 * ALIGN)  # page-aligned
        self.view = memoryview(self.buffer)
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(
            self.threads, thread_name_prefix="mlx_flash-read"
        )
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._retired = []

    def read(self, offset: int, nbytes: int) -> memoryview:
        """Bytes [offset, offset + nbytes) of the file, valid until the next read."""
        start, end = offset - offset % ALIGN, align_up(offset + nbytes)
        if end - start > len(self.buffer):
            raise FlashError(
                f"read of {nbytes} bytes exceeds the staging buffer", self.path
            )
        tic = time.perf_counter()
        pieces = [(a, min(a + CHUNK, end)) for a in range(start, end, CHUNK)]
        slices = [pieces[i :: self.threads] for i in range(self.threads)]
        futures = [self.pool.submit(self._read_pieces, s, start) for s in slices if s]
        ends = [f.result() for f in futures]  # where each worker met the end of file
        if min(ends) < offset + nbytes:
            raise FlashError(
                f"the bundles file ends at byte {min(ends)}, before byte {offset + nbytes}: "
                "it was truncated",
                self.path,
                "convert the model again",
            )
        self.stats.reads += len(pieces)
        self.stats.bytes += end - start
        self.stats.seconds += time.perf_counter() - tic
        return self.view[offset - start : offset - start + nbytes]

    def _read_pieces(self, pieces: Sequence[Tuple[int, int]], base: int) -> int:
        for a, b in pieces:
            at = self._read_into(a, b, base)
            if at < b:
                return at
        return sys.maxsize

    def _read_into(self, a: int, b: int, base: int) -> int:
        """Read [a, b) into the buffer; returns where it stopped (b, or end of file)."""
        at = a
        while at < b:
            fd = self.fd
            try:
                n = os.preadv(fd, [self.view[at - base : b - base]], at)
            except OSError as e:
                if e.errno == errno.EINVAL:
                    self._reopen_buffered(fd)  # the filesystem refused direct I/O
                    continue
                raise FlashError(
                    f"reading bytes {at}-{b} failed ({e.strerror})",
                    self.path,
                    "check the disk; re-convert the store if the file is damaged",
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

    def close(self) -> None:
        if self.fd >= 0:
            self.pool.shutdown(wait=True)
            for fd in [self.fd, *self._retired]:
                os.close(fd)
            self.fd = -1
            try:
                self.view.release()
                self.buffer.close()
            except BufferError:
                pass  # a caller still holds a view of the last read: freed with it

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

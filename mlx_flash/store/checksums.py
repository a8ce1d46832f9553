"""Block checksums (docs/FORMAT.md §7): one xxh3-64 per 4 KiB block of every data file.

The table is the store's `checksums` extension: little-endian u64 values, range after
range, block after block. Its parameters (`meta`) name the ranges it covers; its own
xxh3-64 in `meta["digest"]` catches a damaged table. Pure functions over bytes, plus
the two file passes that write and check them.
"""

import os
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import xxhash

from ..errors import FlashError, ReadError

ALGORITHM = "xxh3_64"
BLOCK = 4096
_CHUNK = 4 << 20  # bytes hashed per file read: a multiple of BLOCK


def block_hashes(data, block: int = BLOCK) -> np.ndarray:
    """xxh3-64 of each `block`-byte block of `data` (the last may be shorter)."""
    view = memoryview(data).cast("B")
    h = xxhash.xxh3_64_intdigest
    return np.array(
        [h(view[i : i + block]) for i in range(0, len(view), block)], np.uint64
    )


def blocks_in(start: int, stop: int, block: int = BLOCK) -> int:
    return -(-(stop - start) // block)


def file_hashes(path: Path, start: int, stop: int) -> np.ndarray:
    """The block hashes of bytes [start, stop) of a file, read in large chunks."""
    out = []
    with open(path, "rb") as f:
        f.seek(start)
        at = start
        while at < stop:
            data = f.read(min(_CHUNK, stop - at))
            if not data:
                raise FlashError("the file is shorter than the manifest says", path)
            out.append(block_hashes(data))
            at += len(data)
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def table_digest(table: bytes) -> str:
    return xxhash.xxh3_64_hexdigest(table)


def build_table(directory: Path, ranges: List[Dict]) -> Tuple[bytes, dict]:
    """Hash every range ({"file", "start", "stop"}) of the files in `directory`:
    the table's bytes and its `meta` (each range with the index of its first block)."""
    parts, first, described = [], 0, []
    for r in ranges:
        hashes = file_hashes(directory / r["file"], r["start"], r["stop"])
        parts.append(hashes)
        described.append({**r, "first": first})
        first += len(hashes)
    table = np.concatenate(parts).astype("<u8").tobytes() if parts else b""
    meta = {
        "algorithm": ALGORITHM,
        "block_bytes": BLOCK,
        "ranges": described,
        "digest": table_digest(table),
    }
    return table, meta


def meta_error(meta: dict, table_bytes: int, sizes: Dict[str, int]) -> str:
    """What is wrong with a checksums extension's parameters, or "": the algorithm,
    the ranges (inside their files, 4 KiB-aligned starts, in table order) and the
    table's size. `sizes` maps each data file to its size."""
    if set(meta) != {"algorithm", "block_bytes", "ranges", "digest"}:
        return "its parameters must be algorithm, block_bytes, ranges and digest"
    if meta["algorithm"] != ALGORITHM or meta["block_bytes"] != BLOCK:
        return f"only {ALGORITHM} over {BLOCK}-byte blocks is known"
    if not isinstance(meta["digest"], str) or not isinstance(meta["ranges"], list):
        return "digest must be a string and ranges a list"
    first = 0
    for r in meta["ranges"]:
        if not isinstance(r, dict) or set(r) != {"file", "start", "stop", "first"}:
            return "each range needs file, start, stop and first"
        if not isinstance(r["file"], str) or r["file"] not in sizes:
            return f"a range names {r['file']!r}, which is no data file of the store"
        ints = all(type(r[k]) is int for k in ("start", "stop", "first"))
        if not ints or r["start"] % BLOCK or not 0 <= r["start"] < r["stop"]:
            return f"the range {r} is malformed"
        if r["stop"] > sizes[r["file"]] or r["first"] != first:
            return f"the range {r} does not fit its file or the table"
        first += blocks_in(r["start"], r["stop"])
    if first * 8 != table_bytes:
        return f"{first} blocks need {first * 8} bytes, the table has {table_bytes}"
    return ""


def mismatches(
    directory: Path,
    meta: dict,
    table: np.ndarray,
    progress: Optional[Callable[[int], None]] = None,
) -> Iterator[Tuple[str, int, int]]:
    """(file, first byte, stop) of every block whose hash differs from the table."""
    for r in meta["ranges"]:
        path = directory / r["file"]
        for at in range(r["start"], r["stop"], _CHUNK):
            stop = min(at + _CHUNK, r["stop"])
            got = file_hashes(path, at, stop)
            k = r["first"] + (at - r["start"]) // BLOCK
            for j in np.nonzero(got != table[k : k + len(got)])[0]:
                a = at + int(j) * BLOCK
                yield r["file"], a, min(a + BLOCK, r["stop"])
            if progress:
                progress(stop - at)


class BlockChecker:
    """Checks each 4 KiB block of one store file against the table the first time
    it is read in this process (docs/FORMAT.md §7): one flag per block of the table
    (`checked`, shared by the files' checkers: the bitmap the DRAM plan counts), so
    re-reading a checked block costs nothing. Blocks of the file no range covers
    (the table itself) are not checked here.

    Args:
        path: the file.
        table: the whole checksum table (u64 per block, every range's).
        ranges: the table's ranges ({"file", "start", "stop", "first"}) of this file.
        checked: the flags, one per table entry.
    """

    def __init__(
        self, path: Path, table: np.ndarray, ranges: List[Dict], checked: np.ndarray
    ):
        self.path, self.table, self.checked = Path(path), table, checked
        self.ranges = sorted((r["start"], r["stop"], r["first"]) for r in ranges)
        self.blocks = 0  # blocks of this file hashed so far (each once)

    def _todo(self, start: int, stop: int) -> Iterator[Tuple[int, int, int]]:
        """(table index, first byte, stop) of each unchecked block meeting
        [start, stop)."""
        for a, b, first in self.ranges:
            lo, hi = max(start, a), min(stop, b)
            if lo >= hi:
                continue
            ka, kb = first + (lo - a) // BLOCK, first + blocks_in(a, hi)
            done = self.checked[ka:kb]
            if done.all():  # the steady state: nothing to hash
                continue
            for j in np.flatnonzero(~done):
                at = a + (ka + int(j) - first) * BLOCK
                yield ka + int(j), at, min(at + BLOCK, b)

    def check(self, start: int, data) -> None:
        """`data` holds the file's bytes from `start` on: check the unchecked blocks
        wholly inside it."""
        view, stop = memoryview(data).cast("B"), start + len(data)
        for k, a, b in self._todo(start, stop):
            if start <= a and b <= stop:  # else only part of it was read: later
                self._accept(k, a, b, view[a - start : b - start])

    def check_file(self, fd: int, start: int, stop: int) -> None:
        """Check the unchecked blocks meeting [start, stop), reading them from `fd`
        (the reads that bring less than whole blocks: rows, mmap pages)."""
        for k, a, b in list(self._todo(start, stop)):
            self._accept(k, a, b, os.pread(fd, b - a, a))

    def _accept(self, k: int, a: int, b: int, data) -> None:
        """Block `k` (bytes [a, b)) is `data`: flagged if it matches, else the
        `ReadError` at its first byte."""
        if xxhash.xxh3_64_intdigest(data) != self.table[k]:
            raise ReadError(
                f"bytes {a}-{b} do not match their checksum: the file is corrupted",
                self.path,
                "convert the model again (or copy the store again); "
                "`python -m mlx_flash.inspect STORE` lists every damaged block",
                offset=a,
            )
        self.checked[k] = True
        self.blocks += 1


def checkers(directory: Path, meta: dict, table: bytes) -> Dict[str, BlockChecker]:
    """One `BlockChecker` per file the table covers, sharing the table and the
    flags."""
    values = np.frombuffer(table, "<u8")
    checked = np.zeros(len(values), bool)  # one flag per block, every file's
    files = sorted({r["file"] for r in meta["ranges"]})
    return {
        name: BlockChecker(
            Path(directory) / name,
            values,
            [r for r in meta["ranges"] if r["file"] == name],
            checked,
        )
        for name in files
    }

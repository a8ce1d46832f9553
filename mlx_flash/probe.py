"""`python -m mlx_flash.probe`: what the SSD can do, and the reader settings it implies.

Random-read throughput against chunk size and thread count, as in the paper's Figure 2b
(§2.2), measured with the page cache bypassed on a scratch file in the store's
directory; sequential reads, and the same random reads through mmap and buffered reads
for comparison. The result is saved per device in the cache, and `reader_settings`
turns it into the reader's thread count and coalescing gap.
"""

import argparse
import errno
import itertools
import math
import mmap
import os
import platform
import random
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .errors import FlashError
from .read_tuning import (
    MEMORY_FILESYSTEMS,
    SCHEMA,
    VERSION,
    fmt_bytes,
    reader_settings,
    save_probe,
    write_json,
)
from .store.format import ALIGN
from .store.reader import open_unbuffered
from .utils import cache_root

DEFAULTS = {"size": "2GiB", "chunks": "4K,...,4M", "threads": "1,4,16,32", "seconds": 2}
QUICK = {"size": "256MiB", "chunks": "4K,64K,1M", "threads": "1,16", "seconds": 0.25}
RESERVE = 1 << 30  # free space the scratch file must leave on the disk
WRITE_BLOCK = 16 << 20
COMPARE_SHARE = 8  # mmap/buffered tests read at most 1/8 of the file: few cache hits
CACHED_RATIO = 1.5  # a re-read this much faster than the first read came from a cache
TRIALS = 3  # a measurement is the median of its trials: the disk's speed wanders

Read = Callable[[memoryview, int], int]  # read(buffer, offset) -> bytes read


def parse_size(text: str) -> int:
    """Bytes from `2GiB`, `4K`, `500MB` or `123456` (binary units throughout)."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if scale > 1 else t)
    except ValueError:
        raise FlashError(
            f"cannot read the size {text!r}", fix="give 4K, 1MiB, 2GiB or bytes"
        ) from None
    if not 0 < value < 2**60:
        raise FlashError(f"the size {text!r} is not positive", fix="give 4K, 2GiB")
    return int(value * scale)


def parse_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise FlashError(f"cannot read the count {text!r}", fix="give 1,4,16") from None


def parse_list(text: str, parse: Callable[[str], int] = parse_count) -> list[int]:
    """`4K,8K,64K`, or with `...` for the powers of two between: `4K,...,4M`."""
    items = [s.strip() for s in str(text).split(",") if s.strip()]
    values: list[int] = []
    for i, item in enumerate(items):
        if item != "...":
            values.append(parse(item))
            continue
        if i == 0 or i == len(items) - 1 or items[i + 1] == "...":
            raise FlashError(f"'...' needs a value on each side in {text!r}")
        low, high = values[-1], parse(items[i + 1])
        while low * 2 < high:
            low *= 2
            values.append(low)
    return sorted(set(values))


def check_directory(directory: Path, size: int) -> None:
    """Refuse a directory that is missing or lacks `size` bytes plus a reserve."""
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        raise FlashError(f"the probe directory {what}", directory, "pass --path DIR")
    free = shutil.disk_usage(directory).free
    if free < size + RESERVE:
        raise FlashError(
            f"not enough free space for a {fmt_bytes(size)} scratch file: "
            f"{fmt_bytes(free)} free, and {fmt_bytes(RESERVE)} must stay free",
            directory,
            "free some space, pass a smaller --size, or --path on another directory",
        )


def scratch_name() -> str:
    return f".mlx_flash-probe-{os.getpid()}-{secrets.token_hex(4)}.tmp"


def create_scratch(directory: Path) -> tuple[Path, int]:
    """A new empty file and its write fd; never opens a file that already exists."""
    for _ in range(8):
        path = directory / scratch_name()
        try:
            return path, os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        except OSError as e:
            raise FlashError(
                f"cannot create a file ({e.strerror})", directory
            ) from None
    raise FlashError("every scratch file name tried exists", directory)


def fill(fd: int, size: int, bar: tqdm) -> None:
    """Write `size` bytes of incompressible data; every 4 KiB page is unique."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, min(WRITE_BLOCK, size), dtype=np.uint8)
    stamps = block.view(np.uint64)[:: ALIGN // 8]
    for at in range(0, size, len(block)):
        stamps[:] = np.arange(at // ALIGN, at // ALIGN + len(stamps))
        n = min(len(block), size - at)
        if os.pwrite(fd, block[:n], at) != n:
            raise OSError(errno.EIO, "short write")
        bar.update(n)
    os.fsync(fd)


def drop_cache(fd: int) -> bool:
    """Drop the file's pages from the OS page cache; False where that needs root.

    The probe's one platform-specific function: Linux evicts one file without root
    (fsync, then POSIX_FADV_DONTNEED); macOS only empties the whole cache (`purge`).
    """
    if not hasattr(os, "posix_fadvise"):
        return False
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def filesystem(directory: Path) -> str:
    """The type of the filesystem holding `directory` (Linux: from /proc/self/mounts);
    "" where unknown. tmpfs accepts direct I/O, yet it is RAM, not a disk."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return ""
    best, kind = "", ""
    for line in mounts:
        point, fstype = line.split()[1:3]
        point = point.replace("\\040", " ").rstrip("/") + "/"
        if f"{directory}/".startswith(point) and len(point) > len(best):
            best, kind = point, fstype
    return kind


# --- measurements -------------------------------------------------------------------


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    return os.preadv(fd, [view], offset)


def run_threads(work, threads: int, seconds: float) -> tuple[int, float]:
    """Run `work(i, deadline, stop) -> reads` on `threads` threads started together.

    Each thread loops over its own reads (one future per read caps IOPS in Python).
    Returns the total reads and the wall time; re-raises a worker's exception.
    """
    stop, barrier = threading.Event(), threading.Barrier(threads + 1)
    reads, errors, start = [0] * threads, [], [0.0]

    def target(i):
        try:
            barrier.wait()
            reads[i] = work(i, start[0] + seconds, stop)
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # noqa: BLE001 (raised again in the caller)
            errors.append(e)
            stop.set()

    pool = [
        threading.Thread(target=target, args=(i,), daemon=True) for i in range(threads)
    ]
    for t in pool:
        t.start()
    try:
        start[0] = time.perf_counter()
        barrier.wait()
        for t in pool:
            t.join()
        elapsed = time.perf_counter() - start[0]
    finally:
        stop.set()
        barrier.abort()
        for t in pool:
            t.join()
    if errors:
        raise errors[0]
    return sum(reads), elapsed


def measurement(chunk: int, threads: int, reads: int, seconds: float) -> dict:
    return {
        "chunk": chunk,
        "threads": threads,
        "reads": reads,
        "bytes": reads * chunk,
        "seconds": round(seconds, 6),
        "gbps": round(reads * chunk / seconds / 1e9, 6),
        "iops": round(reads / seconds, 1),
    }


def median_trial(trials: list[dict]) -> dict:
    """The totals of all trials, with the throughput and IOPS of the median one."""
    median = sorted(trials, key=lambda m: m["gbps"])[len(trials) // 2]
    reads = sum(m["reads"] for m in trials)
    seconds = sum(m["seconds"] for m in trials)
    return {
        **measurement(median["chunk"], median["threads"], reads, seconds),
        "gbps": median["gbps"],
        "iops": median["iops"],
        "trials_gbps": [m["gbps"] for m in trials],
    }


def timed_reads(read: Read, offsets, chunk: int, threads: int, seconds: float) -> dict:
    """Read `chunk` bytes at each offset drawn from `offsets(i)`, an iterator per
    thread, into page-aligned buffers until `seconds` pass or the offsets run out."""

    def work(i, deadline, stop):
        buffer = mmap.mmap(-1, chunk)  # page-aligned, as direct I/O needs
        view, n = memoryview(buffer), 0
        try:
            for offset in offsets(i):
                if stop.is_set() or (n and time.perf_counter() > deadline):
                    break
                if read(view, offset) != chunk:
                    raise OSError(errno.EIO, f"short read at byte {offset}")
                n += 1
        finally:
            view.release()
            buffer.close()
        return n

    return measurement(chunk, threads, *run_threads(work, threads, seconds))


def random_offsets(size: int, chunk: int, limit: int = sys.maxsize, seed: int = 0):
    """Per thread `i`: uniform 4 KiB-aligned offsets, at most `limit` of them."""
    slots = (size - chunk) // ALIGN + 1

    def offsets(i):
        rng = random.Random(seed * 1009 + i)
        return (rng.randrange(slots) * ALIGN for _ in range(limit))

    return offsets


def sequential_offsets(size: int, chunk: int):
    """Consecutive chunks shared by all threads, wrapping at the end of the file."""
    counter, blocks = itertools.count(), size // chunk
    return lambda i: (next(counter) % blocks * chunk for _ in itertools.count())


def mapped_read(fd: int):
    """A `Read` copying from a read-only mmap (MADV_RANDOM, as the mmap reader does),
    and the function that unmaps it. numpy's copy releases the GIL, so the page
    faults of different threads overlap."""
    m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_RANDOM"):
        m.madvise(mmap.MADV_RANDOM)
    held = [np.frombuffer(m, np.uint8)]

    def read(view, offset):
        np.copyto(np.frombuffer(view, np.uint8), held[0][offset : offset + len(view)])
        return len(view)

    def close():
        held.clear()
        m.close()

    return read, close


def reread_check(
    read: Read, size: int, chunk: int = 16 << 10, threads: int = 4
) -> dict:
    """Read the same random chunks twice; the device is measured only if the second
    pass is not much faster than the first."""
    n = min(2048, (size - chunk) // ALIGN + 1) // threads
    offsets = random_offsets(size, chunk, n, seed=7)
    first = timed_reads(read, offsets, chunk, threads, math.inf)["gbps"]
    second = timed_reads(read, offsets, chunk, threads, math.inf)["gbps"]
    return {
        "chunk": chunk,
        "threads": threads,
        "first_gbps": first,
        "second_gbps": second,
        "cached": second > CACHED_RATIO * first,
    }


def run_probe(
    directory: Path,
    size: int,
    chunks: list[int],
    threads: list[int],
    seconds: float,
    progress: bool = True,
) -> dict:
    """Measure the disk holding `directory` on a scratch file of `size` bytes.

    The scratch file is removed on success, on error and on Ctrl-C.

    Returns:
        The result (schema in docs/PROBE.md).

    Raises:
        FlashError: bad arguments, a missing directory, too little free space, or a
            failed read or write.
    """
    size = size // ALIGN * ALIGN
    if not chunks or not threads or min(threads) < 1 or seconds <= 0:
        raise FlashError("give chunk sizes, thread counts >= 1 and --seconds > 0")
    if any(c % ALIGN for c in chunks) or size < max(chunks):
        raise FlashError(
            "chunk sizes must be multiples of 4 KiB and fit in the file",
            fix="--chunks 4K,...,4M with a --size of at least the largest chunk",
        )
    directory = Path(directory).expanduser().resolve()
    check_directory(directory, size)
    path, fd = create_scratch(directory)
    fds = [fd]
    try:
        if sys.platform == "darwin":  # written pages must not stay cached either
            import fcntl

            fcntl.fcntl(fd, fcntl.F_NOCACHE, 1)
        with tqdm(
            total=size, unit="B", unit_scale=True, desc="write", disable=not progress
        ) as bar:
            fill(fd, size, bar)
        evicted = drop_cache(fd)
        direct_fd, direct = open_unbuffered(path)
        fds += [direct_fd, os.open(path, os.O_RDONLY)]
        result = {
            "schema": SCHEMA,
            "version": VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "platform": f"{sys.platform} {platform.machine()}",
            "directory": str(directory),
            "device": os.stat(directory).st_dev,
            "file_bytes": size,
            "seconds": seconds,
            "chunks": chunks,
            "threads": threads,
            "filesystem": filesystem(directory),
            "direct": direct,
            "evicted": evicted,
        }
        result.update(measure(*fds[1:], size, chunks, threads, seconds, progress))
        result["warnings"] = caveats(result)
        return result
    except OSError as e:
        raise FlashError(
            f"reading or writing the scratch file failed ({e.strerror or e})",
            directory,
            "check the disk (dmesg) or probe another --path",
        ) from None
    finally:
        for fd in fds:
            os.close(fd)
        path.unlink(missing_ok=True)


def measure(
    direct_fd: int,
    buffered_fd: int,
    size: int,
    chunks: list[int],
    threads: list[int],
    seconds: float,
    progress: bool,
) -> dict:
    """The re-read check, then every test: random and sequential reads through
    `direct_fd`, then random reads through an mmap and `buffered_fd`, each trial of
    those started from an emptied page cache and reading at most 1/8 of the file."""
    direct_read = lambda v, o: pread_into(direct_fd, v, o)
    buffered_read = lambda v, o: pread_into(buffered_fd, v, o)
    if hasattr(os, "posix_fadvise"):  # no readahead: random reads waste none of it
        os.posix_fadvise(buffered_fd, 0, 0, os.POSIX_FADV_RANDOM)
    limit, seeds = size // COMPARE_SHARE, itertools.count(1)

    def trial(kind, chunk, t):
        offsets = random_offsets(size, chunk, seed=next(seeds))
        if kind == "sequential":
            offsets = sequential_offsets(size, chunk)
        if kind in ("random", "sequential"):
            return timed_reads(direct_read, offsets, chunk, t, seconds / TRIALS)
        drop_cache(buffered_fd)
        offsets = random_offsets(size, chunk, limit // chunk // t + 1, next(seeds))
        if kind == "buffered":
            return timed_reads(buffered_read, offsets, chunk, t, seconds / TRIALS)
        read, close = mapped_read(buffered_fd)
        try:
            return timed_reads(read, offsets, chunk, t, seconds / TRIALS)
        finally:
            close()

    tests = [("random", c, t) for c in chunks for t in threads]
    tests += [("sequential", max(chunks), t) for t in threads]
    tests += [(kind, c, max(threads)) for kind in ("mmap", "buffered") for c in chunks]
    out = {"reread": reread_check(direct_read, size)}
    out.update({kind: [] for kind in ("random", "sequential", "mmap", "buffered")})
    bar = tqdm(tests, desc="probe", disable=not progress, leave=False)
    for kind, chunk, t in bar:
        bar.set_postfix_str(f"{kind} {fmt_bytes(chunk)} x {t}")
        out[kind].append(median_trial([trial(kind, chunk, t) for _ in range(TRIALS)]))
    drop_cache(buffered_fd)
    return out


def caveats(result: dict) -> list[str]:
    """What makes the numbers something other than the disk's."""
    out = []
    if result["filesystem"] in MEMORY_FILESYSTEMS:
        out.append(f"the directory is on {result['filesystem']}: this measured RAM")
    if not result["direct"]:
        out.append(
            "the filesystem refused direct I/O: the numbers include the page cache"
        )
    if result["reread"]["cached"]:
        out.append(
            "a re-read was faster than the first read: something caches the file "
            "(a virtual disk's host cache?), so the numbers may exceed the device's"
        )
    if not result["evicted"]:
        out.append("the page cache could not be emptied: mmap/buffered read it warm")
    return out


# --- the result: table, JSON, plot, cache -------------------------------------------


def format_table(result: dict) -> str:
    """The result as a markdown table: GB/s (IOPS) per chunk size and thread count."""
    threads, most = result["threads"], max(result["threads"])
    cols = [f"{t} thread{'s' * (t > 1)}" for t in threads]
    cols += [f"mmap, {most} threads", f"buffered, {most} threads"]
    by = {
        (kind, m["chunk"], m["threads"]): m
        for kind in ("random", "mmap", "buffered")
        for m in result[kind]
    }
    mode = "direct I/O" if result["direct"] else "BUFFERED"
    title = (
        f"Random reads of a {fmt_bytes(result['file_bytes'])} file in "
        f"{result['directory']} ({mode}), GB/s (IOPS):"
    )
    lines = [
        title,
        "",
        "| chunk | " + " | ".join(cols) + " |",
        "|---:|" + "---:|" * len(cols),
    ]
    for c in result["chunks"]:
        keys = [("random", c, t) for t in threads]
        keys += [("mmap", c, most), ("buffered", c, most)]
        cells = [
            f"{by[k]['gbps']:.3f} ({by[k]['iops'] / 1e3:.1f}k)" if k in by else "-"
            for k in keys
        ]
        lines.append(f"| {fmt_bytes(c)} | " + " | ".join(cells) + " |")
    seq = ", ".join(f"{m['threads']}: {m['gbps']:.3f}" for m in result["sequential"])
    r = result["reread"]
    reread = (
        f"Re-read check ({fmt_bytes(r['chunk'])} x {r['threads']} threads): first "
        f"{r['first_gbps']:.3f} GB/s, second {r['second_gbps']:.3f} GB/s"
    )
    lines += [
        "",
        f"Sequential {fmt_bytes(max(result['chunks']))} reads, GB/s by threads: {seq}",
        reread,
    ]
    return "\n".join(lines + [f"warning: {w}" for w in result["warnings"]])


def plot(result: dict, path: Path) -> bool:
    """Draw throughput against chunk size, one line per thread count, as a PNG.

    Returns False (after saying how to install it) where matplotlib is missing.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "no plot: matplotlib is not installed (pip install matplotlib)",
            file=sys.stderr,
        )
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for t in result["threads"]:
        rows = [m for m in result["random"] if m["threads"] == t]
        ax.plot(
            [m["chunk"] for m in rows],
            [m["gbps"] for m in rows],
            "o-",
            label=f"{t} thread{'s' * (t > 1)}",
        )
    for kind, style in (("mmap", ":"), ("buffered", "--")):
        rows = result[kind]
        if rows:
            label = f"{kind}, {rows[0]['threads']} threads"
            ax.plot(
                [m["chunk"] for m in rows],
                [m["gbps"] for m in rows],
                "k" + style,
                label=label,
            )
    if result["sequential"]:
        best = max(m["gbps"] for m in result["sequential"])
        ax.axhline(best, color="gray", lw=0.8, label="sequential (best)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(
        result["chunks"], [fmt_bytes(c) for c in result["chunks"]], rotation=45
    )
    ax.set(xlabel="chunk size", ylabel="random-read throughput (GB/s)")
    ax.set_title(f"{result['host']}: {result['directory']}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return True


# --- the command --------------------------------------------------------------------


def setup_arg_parser() -> argparse.ArgumentParser:
    """The probe's options (see docs/PROBE.md)."""
    parser = argparse.ArgumentParser(
        description="Measure the SSD: random-read throughput by chunk size and threads "
        "(paper Figure 2b), page cache bypassed; saves the result for the reader."
    )
    parser.add_argument(
        "--path",
        default=None,
        help="Directory of the scratch file (default: the cache)",
    )
    parser.add_argument(
        "--size", help=f"Scratch file size (default {DEFAULTS['size']})"
    )
    parser.add_argument(
        "--chunks",
        help=f"Chunk sizes; '...' = powers of two (default {DEFAULTS['chunks']})",
    )
    parser.add_argument(
        "--threads", help=f"Thread counts (default {DEFAULTS['threads']})"
    )
    parser.add_argument(
        "--seconds",
        type=float,
        help=f"Seconds per measurement (default {DEFAULTS['seconds']})",
    )
    parser.add_argument("--json", help="Also write the result to this file")
    parser.add_argument("--plot", help="Draw throughput vs chunk size into this PNG")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"A short run: {' '.join(f'--{k} {v}' for k, v in QUICK.items())}",
    )
    parser.add_argument(
        "--no-save", action="store_true", help="Do not save the result for the reader"
    )
    parser.add_argument("--quiet", action="store_true", help="No progress bars")
    return parser


def main(argv=None) -> None:
    """Run the probe; print the table and the reader settings; save and draw it."""
    args = setup_arg_parser().parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    pick = lambda key: preset[key] if getattr(args, key) is None else getattr(args, key)
    try:
        directory = Path(args.path) if args.path else cache_root()
        if args.path is None:
            directory.mkdir(parents=True, exist_ok=True)
        result = run_probe(
            directory,
            parse_size(pick("size")),
            parse_list(pick("chunks"), parse_size),
            parse_list(pick("threads")),
            float(pick("seconds")),
            progress=not args.quiet,
        )
        print(format_table(result))
        settings = reader_settings(result, 4096)
        print(f"\nreader settings for 4 KiB bundles: {settings.describe()}")
        if not args.no_save:
            print(f"saved for the reader: {save_probe(result)}")
        if args.json:
            write_json(result, Path(args.json))
            print(f"wrote {args.json}")
        if args.plot and plot(result, Path(args.plot)):
            print(f"plotted {args.plot}")
    except FlashError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: the scratch file was removed", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()

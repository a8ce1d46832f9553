"""The reader's thread count and coalescing gap, from a saved SSD probe result.

`python -m mlx_flash.probe` measures the disk and saves its result per device in the
cache; `reader_settings` turns a result into settings for reads of one bundle size.
"""

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .options import DEFAULT_GAP_BYTES as DEFAULT_GAP  # without a probe
from .options import DEFAULT_THREADS
from .store.reader import CHUNK

SCHEMA, VERSION = "mlx-flash-probe", 1
MAX_THREADS, MAX_GAP = 32, 1 << 20
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")
NEAR_BEST = 0.95  # fewer threads win when they reach this share of the best throughput


def fmt_bytes(n: float) -> str:
    unit = next(u for u in range(4, -1, -1) if n >= 1024**u or u == 0)
    value = n / 1024**unit
    text = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
    return f"{text} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"


# --- the scratch file ---------------------------------------------------------------


def write_json(result: dict, path: Path) -> None:
    """Write `result` to `path` through a temporary file renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def probe_file(directory: Path) -> Path:
    """Where the result for the device holding `directory` is saved."""
    from .utils import cache_root  # (utils imports this module)

    return cache_root() / "probe" / f"{os.stat(directory).st_dev}.json"


def save_probe(result: dict) -> Path:
    """Save `result` in the cache for the device it measured; returns the file."""
    path = probe_file(Path(result["directory"]))
    write_json(result, path)
    return path


def load_probe(directory) -> dict | None:
    """The saved result for the device holding `directory`, or None (no probe yet,
    or a file of another schema version). The file's path is added as `file`."""
    try:
        path = probe_file(Path(directory))
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or result.get("schema") != SCHEMA:
        return None
    if result.get("version") != VERSION:
        return None
    return {**result, "file": str(path)}


@dataclass(frozen=True)
class ReadSettings:
    """The reader's parallelism and coalescing gap, and where they come from."""

    threads: int
    gap_bytes: int
    source: str

    def describe(self) -> str:
        return (
            f"{self.threads} threads, gap {fmt_bytes(self.gap_bytes)} ({self.source})"
        )


def reader_settings(result: dict | None, bundle_bytes: int) -> ReadSettings:
    """Threads and coalescing gap for reads of `bundle_bytes`-sized bundles.

    Threads: the count with the best random-read throughput at the smallest measured
    chunk that holds a bundle (fewer threads win within 5%), at most 32.

    Gap: with that many reads in flight, a request of `s` bytes costs the device
    `t(s) = a + s / B`, where `B` is the best throughput at chunks of >= 1 MiB (the
    reader's largest request) and `a` the per-request overhead. At the small chunk
    `s0`, `t(s0) = 1 / IOPS(s0)`, so `a = 1 / IOPS(s0) - s0 / B`. Merging two reads
    separated by `g` unneeded bytes saves one `a` and costs `g / B`: worth it while
    `g < a * B = B / IOPS(s0) - s0`. That is the gap, capped at 1 MiB.

    Args:
        result: a probe result (`load_probe`), or None for the defaults (4 threads,
            24 KiB); a result measured through the page cache or on tmpfs also
            gives the defaults.
        bundle_bytes: the bytes of one bundle (one neuron's rows and columns).
    """
    rows = (result or {}).get("random") or []
    memory = (result or {}).get("filesystem") in MEMORY_FILESYSTEMS
    if not rows or not result.get("direct") or memory:
        return ReadSettings(DEFAULT_THREADS, DEFAULT_GAP, "defaults")
    chunks = sorted({m["chunk"] for m in rows})
    small = next((c for c in chunks if c >= bundle_bytes), chunks[-1])
    at_small = {m["threads"]: m for m in rows if m["chunk"] == small}
    allowed = {t: m for t, m in at_small.items() if t <= MAX_THREADS}
    allowed = allowed or {min(at_small): at_small[min(at_small)]}
    best = max(m["gbps"] for m in allowed.values())
    threads = min(t for t, m in allowed.items() if m["gbps"] >= NEAR_BEST * best)
    mine = [m for m in rows if m["threads"] == threads]
    large = [m for m in mine if m["chunk"] >= CHUNK] or [
        max(mine, key=lambda m: m["chunk"])
    ]
    bandwidth = max(m["gbps"] for m in large) * 1e9
    iops = at_small[threads]["iops"]
    gap = bandwidth / iops - small if iops > 0 else 0
    gap = int(min(max(gap, 0), MAX_GAP))
    source = f"probe {result.get('file', result.get('directory'))}"
    return ReadSettings(min(threads, MAX_THREADS), gap, source)

"""`BundleStore`: an opened store directory, checked before any FFN byte is trusted."""

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..errors import FlashError
from .format import (
    ALIGN,
    BUNDLES_NAME,
    DENSE_NAME,
    HEADER_BYTES,
    MANIFEST_NAME,
    Manifest,
    Weight,
    check_header,
    decode_bundles,
)
from .reader import READERS


def neuron_runs(ids: np.ndarray, max_gap: int = 0) -> List[Tuple[int, int]]:
    """Sorted, unique neuron ids -> [first, stop) runs covering them; runs separated by
    at most `max_gap` unneeded neurons are merged into one."""
    if len(ids) == 0:
        return []
    breaks = np.nonzero(np.diff(ids) > max_gap + 1)[0]
    starts = np.concatenate([ids[:1], ids[breaks + 1]])
    stops = np.concatenate([ids[breaks] + 1, ids[-1:] + 1])
    return list(zip(starts.tolist(), stops.tolist()))


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: Path) -> Manifest:
    """Read, parse and validate `flash_config.json` and its agreement with config.json."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    for name in (MANIFEST_NAME, "config.json", DENSE_NAME, BUNDLES_NAME):
        if not (path / name).is_file():
            raise FlashError(
                f"the store has no {name}",
                path,
                "convert the model with `python -m mlx_flash.convert` (a store is a directory)",
            )
    manifest = Manifest.from_json(manifest_path.read_text(), manifest_path)
    manifest.validate(manifest_path)
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise FlashError(
            f"config.json is not valid JSON ({e})", path / "config.json"
        ) from None
    checks = {
        "model_type": manifest.architecture,
        "num_hidden_layers": len(manifest.layers),
        "hidden_size": manifest.hidden_size,
    }
    for key, expected in checks.items():
        if config.get(key) != expected:
            raise FlashError(
                f"config.json says {key}={config.get(key)!r} but flash_config.json was "
                f"written for {expected!r}",
                path / "config.json",
                "restore the store's own config.json or convert the model again",
            )
    return manifest


class BundleStore:
    """The FFN bundles of one converted model, read through one `BundleReader`.

    Args:
        path: the store directory.
        threads: parallel reads in flight.
        reader: ``direct`` (O_DIRECT / F_NOCACHE preadv, the default) or ``mmap``.
    """

    def __init__(self, path: Path, threads: int = 4, reader: str = "direct"):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        bundles = self.path / BUNDLES_NAME
        size = bundles.stat().st_size
        if size != self.manifest.file_bytes:
            raise FlashError(
                f"the bundles file has {size} bytes, the manifest expects "
                f"{self.manifest.file_bytes}: it is truncated or was replaced",
                bundles,
                "convert the model again",
            )
        # Any read of one layer, however sparse, lies within its sections' aligned spans.
        largest = max(
            sum(l.neurons * s.bundle_bytes + 2 * ALIGN for s in l.sections)
            for l in self.manifest.layers
        )
        if reader not in READERS:
            raise FlashError(f"unknown reader {reader!r}", fix="use direct or mmap")
        self.reader = READERS[reader](bundles, max(largest, HEADER_BYTES), threads)
        check_header(bytes(self.reader.read(0, HEADER_BYTES)), self.manifest, bundles)

    @property
    def num_layers(self) -> int:
        return len(self.manifest.layers)

    def read_layer(self, layer: int, dtype: mx.Dtype) -> Dict[str, Weight]:
        """Every neuron of `layer`: component name -> MLX weight (n_neurons, length)."""
        entry, weights = self.manifest.layers[layer], {}
        for section in entry.sections:
            raw = self.reader.read(section.offset, entry.neurons * section.bundle_bytes)
            rows = np.frombuffer(raw, dtype=np.uint8).reshape(
                entry.neurons, section.bundle_bytes
            )
            components = self.manifest.section_components(section)
            weights.update(decode_bundles(rows, components, dtype))
            del rows, raw  # views into the staging buffer; decoding copied out
        return weights

    def read_neurons(
        self,
        layer: int,
        ids: np.ndarray,
        sections: Sequence[int],
        max_gap: int = 0,
        out: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """The bundles of neurons `ids` of `layer` in `sections`: (len(ids), bytes)
        uint8, rows in the order of `ids`, each row the sections' bundles side by side.

        Neighbouring ids are read together: runs closer than `max_gap` unneeded
        neurons merge into one read (a bigger read is cheaper than another request).
        `out`, a preallocated (>= len(ids), bytes) uint8 array, receives the rows
        (decoding generates nothing new per token); without it they are allocated.
        """
        entry, order = self.manifest.layers[layer], np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        runs = neuron_runs(sorted_ids, max_gap)
        chosen = [entry.sections[k] for k in sections]
        ranges = [
            (s.offset + a * s.bundle_bytes, (b - a) * s.bundle_bytes)
            for s in chosen
            for a, b in runs
        ]
        views = iter(self.reader.read_ranges(ranges))
        ends = np.searchsorted(sorted_ids, [b for _, b in runs])
        width = sum(s.bundle_bytes for s in chosen)
        if out is None:
            out = np.empty((len(ids), width), np.uint8)
        if out.shape[0] < len(ids) or out.shape[1] != width:
            raise ValueError(f"out {out.shape} cannot hold {len(ids)} x {width} bytes")
        rows = out[: len(ids)]
        col = 0
        for s in chosen:
            start = 0
            for (a, b), end, view in zip(runs, ends, views):
                run = np.frombuffer(view, np.uint8).reshape(b - a, s.bundle_bytes)
                rows[order[start:end], col : col + s.bundle_bytes] = run[
                    sorted_ids[start:end] - a
                ]
                start = end
            col += s.bundle_bytes
        return rows

    def verify(self, progress: Optional[Callable[[int], None]] = None) -> None:
        """Check every section's SHA-256 against the manifest (reads the whole file)."""
        for i, entry in enumerate(self.manifest.layers):
            for section in entry.sections:
                raw = self.reader.read(
                    section.offset, entry.neurons * section.bundle_bytes
                )
                digest = hashlib.sha256(raw).hexdigest()
                del raw
                if digest != section.sha256:
                    raise FlashError(
                        f"layer {i}: checksum mismatch in bytes {section.offset}-"
                        f"{section.offset + entry.neurons * section.bundle_bytes}: the file is corrupted",
                        self.path / BUNDLES_NAME,
                        "convert the model again",
                    )
            if progress:
                progress(i)

    def close(self) -> None:
        self.reader.close()

"""`BundleStore`: an opened store directory, checked before any FFN byte is trusted."""

import contextlib
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from ..errors import FlashError, ReadError
from .format import (
    ALIGN,
    BUNDLES_NAME,
    DENSE_NAME,
    READ_VERSIONS,
    HEADER_BYTES,
    COLUMNS,
    MANIFEST_NAME,
    Component,
    Manifest,
    Weight,
    LayerEntry,
    Section,
    align_up,
    check_columns_header,
    check_header,
    assemble,
    gather_parts,
)
from .checksums import BlockChecker, checkers, mismatches, meta_error, table_digest
from .reader import READERS, ReadStats, aligned_extents
from .safety import (
    MAX_JSON_BYTES,
    check_model_files,
    check_safetensors,
    read_json_object,
)


def neuron_runs(ids: np.ndarray, max_gap: int = 0) -> List[Tuple[int, int]]:
    """Sorted, unique neuron ids -> [first, stop) runs covering them; runs separated by
    at most `max_gap` unneeded neurons are merged into one."""
    if len(ids) == 0:
        return []
    breaks = np.nonzero(np.diff(ids) > max_gap + 1)[0]
    starts = np.concatenate([ids[:1], ids[breaks + 1]])
    stops = np.concatenate([ids[breaks] + 1, ids[-1:] + 1])
    return list(zip(starts.tolist(), stops.tolist()))


def run_ranges(
    sections: Sequence[Section], runs: List[Tuple[int, int]]
) -> List[Tuple[int, int]]:
    """The byte ranges (offset, size) that reading neuron `runs` of `sections` takes,
    section after section (what `BundleStore.read_runs` asks the reader for)."""
    return [
        (s.offset + a * s.bundle_bytes, (b - a) * s.bundle_bytes)
        for s in sections
        for a, b in runs
    ]


def read_bytes(sections: Sequence[Section], ids: np.ndarray, max_gap: int) -> int:
    """Bytes the reader moves to read bundles `ids` (any order) of `sections`:
    their runs (`max_gap` merged) widened to 4 KiB, touching ones merged — exactly
    `ReadStats.bytes` of that read (the cache simulator's cost of a miss)."""
    runs = neuron_runs(np.unique(ids), max_gap)
    return sum(e - s for s, e in aligned_extents(run_ranges(sections, runs)))


def read_chunks(
    sections: Sequence[Section], ids: np.ndarray, max_gap: int, capacity: int
) -> List[np.ndarray]:
    """`ids` (in read order) cut into consecutive pieces each read within `capacity`
    bytes (`read_bytes`): a staging buffer smaller than a layer reads it piece by
    piece (the FFN is a sum over neurons). One piece when the whole read fits."""
    pieces, start = [], 0

    def size(n: int) -> int:
        return read_bytes(sections, ids[start : start + n], max_gap)

    while start < len(ids):
        take, over = len(ids) - start, None  # the most that fits; the least not
        while (need := size(take)) > capacity:  # shrink by the share that fits ...
            if take == 1:
                raise ValueError(f"one neuron's read exceeds {capacity} bytes")
            over, take = take, max(1, min(take - 1, take * capacity // need))
        while over is not None and over - take > 1:  # ... then search up (a read
            mid = (take + over) // 2  # grows with its piece)
            take, over = (mid, over) if size(mid) <= capacity else (take, mid)
        pieces.append(ids[start : start + take])
        start += take
    return pieces


def align_down(n: int) -> int:
    return n - n % ALIGN


def is_store(path: Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def is_current(path: Path) -> bool:
    """Whether the store at `path` is of a format version this mlx_flash reads (a cheap
    look at its manifest: the full checks are `read_manifest`'s)."""
    try:
        d = read_json_object(Path(path) / MANIFEST_NAME)
    except FlashError:
        return False
    return d.get("format_version") in READ_VERSIONS


def read_manifest(path: Path) -> Manifest:
    """Read, parse and validate `flash_config.json` and its agreement with config.json;
    refuse configs that ask for code to be run or name files outside the store, and
    a dense part whose safetensors header does not fit its file."""
    path = Path(path)
    manifest_path = path / MANIFEST_NAME
    for name in (MANIFEST_NAME, "config.json", DENSE_NAME, BUNDLES_NAME):
        if not (path / name).is_file():
            raise FlashError(
                f"the store has no {name}",
                path,
                "convert the model with `python -m mlx_flash.convert` "
                "(a store is a directory)",
            )
    if manifest_path.stat().st_size > MAX_JSON_BYTES:
        raise FlashError("the manifest is too large", manifest_path, _RECONVERT)
    try:
        text = manifest_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise FlashError(
            "the manifest is not UTF-8", manifest_path, _RECONVERT
        ) from None
    manifest = Manifest.from_json(text, manifest_path)
    manifest.validate(manifest_path)
    fix = "restore the store's own config.json or convert the model again"
    config = read_json_object(path / "config.json", fix)
    checks = {
        "model_type": manifest.architecture,
        "num_hidden_layers": len(manifest.layers),
        "hidden_size": manifest.hidden_size,
        "intermediate_size": manifest.intermediate_size,
    }
    if "intermediate_size" not in config:  # OPT
        config = {**config, "intermediate_size": config.get("ffn_dim")}
    for key, expected in checks.items():
        if config.get(key) != expected or type(config.get(key)) is not type(expected):
            raise FlashError(
                f"config.json says {key}={config.get(key)!r} but flash_config.json was "
                f"written for {expected!r}",
                path / "config.json",
                fix,
            )
    check_model_files(path)
    check_safetensors(path / DENSE_NAME)
    sums = manifest.extension("checksums")
    if sums is not None:
        sizes = {n: (path / n).stat().st_size for n in (BUNDLES_NAME, DENSE_NAME)}
        why = meta_error(sums.meta, sums.bytes, sizes)
        if why:
            raise FlashError(
                f"the checksums extension is inconsistent: {why}",
                manifest_path,
                _RECONVERT,
            )
    return manifest


_RECONVERT = "convert the model again"


class BundleStore:
    """The FFN bundles of one converted model, read through one `BundleReader`.

    Opening runs the cheap checks (manifest, configs, sizes, header and layout
    digest); `verify` (or ``verify=True``) checks every byte against its checksum.
    A read that fails raises a `ReadError` naming the layer and neurons.

    Args:
        path: the store directory.
        threads: parallel reads in flight.
        reader: ``direct`` (O_DIRECT / F_NOCACHE preadv, the default) or ``mmap``.
        verify: also check every checksum now (reads the whole file once).
        manifest: `read_manifest(path)`'s result, when the caller already has it.
    """

    def __init__(
        self,
        path: Path,
        threads: int = 4,
        reader: str = "direct",
        verify: bool = False,
        manifest: Optional[Manifest] = None,
    ):
        self.path = Path(path)
        self.manifest = manifest or read_manifest(self.path)
        bundles = self.path / BUNDLES_NAME
        size = bundles.stat().st_size
        if size != self.manifest.file_bytes:
            raise FlashError(
                f"the bundles file has {size} bytes, the manifest expects "
                f"{self.manifest.file_bytes}: it is truncated or was replaced",
                bundles,
                "convert the model again",
            )
        # Any read of one layer, however sparse, lies within its sections' aligned
        # spans; validation put them inside the file, whose size was just checked.
        self.columns = self.manifest.columns  # per layer, or None (§7.1)
        entries = self.manifest.layers + (self.columns or [])
        largest = max(layer.whole_read() for layer in entries)
        assert largest <= size, "validation bounds every section by the file"
        if reader not in READERS:
            raise FlashError(f"unknown reader {reader!r}", fix="use direct or mmap")
        self._reader_args = (reader, bundles, max(largest, HEADER_BYTES), threads)
        self.reader = READERS[reader](*self._reader_args[1:])
        self.spare = None  # a second reader, for reading ahead (`spare_reader`)
        self.read_ahead = None  # its `read_ahead.ReadAhead`, closed with the store
        try:
            check_header(
                bytes(self.reader.read(0, HEADER_BYTES)), self.manifest, bundles
            )
            if self.columns is not None:
                at = self.manifest.extension(COLUMNS).offset
                head = bytes(self.reader.read(at, HEADER_BYTES))
                check_columns_header(head, self.manifest, bundles)
            self.checkers = self._checkers()
            self.reader.checker = self.checkers.get(BUNDLES_NAME)
            if verify:
                self.verify()
        except BaseException:
            self.reader.close()
            raise

    def _checkers(self) -> Dict[str, BlockChecker]:
        """Each data file's `BlockChecker` over the store's checksum table (read and
        its digest checked now), so every block is checked the first time it is
        read; none for a store written without checksums."""
        sums = self.manifest.extension("checksums")
        if sums is None:
            return {}
        raw = bytes(self.reader.read(sums.offset, sums.bytes))
        if table_digest(raw) != sums.meta["digest"]:
            raise FlashError(
                "the checksum table itself is damaged: the file is corrupted",
                self.path / BUNDLES_NAME,
                _RECONVERT,
            )
        return checkers(self.path, sums.meta, raw)

    @property
    def checks_bytes(self) -> int:
        """DRAM the checks hold: the table and one flag per block."""
        sums = self.manifest.extension("checksums")
        return 0 if sums is None else sums.bytes + sums.bytes // 8  # u64 -> a bool

    @property
    def num_layers(self) -> int:
        return len(self.manifest.layers)

    def entry(self, layer: int, columns: bool = False) -> LayerEntry:
        """Layer `layer`'s neuron bundles, or with `columns` its channel bundles."""
        if not columns:
            return self.manifest.layers[layer]
        if self.columns is None:
            raise FlashError(
                "the store has no gate/up columns by input channel",
                self.path,
                "convert the model with `python -m mlx_flash.convert ... --layout "
                "columns`",
            )
        return self.columns[layer]

    def read_layer(
        self,
        layer: int,
        dtype: mx.Dtype,
        columns: bool = False,
        sections: Optional[Sequence[int]] = None,
    ) -> Dict[str, Weight]:
        """Every neuron of `layer`: component name -> MLX weight (n_neurons, length);
        with `columns`, every input channel's columns (hidden, neurons); `sections`:
        only those sections' components (default all)."""
        entry = self.entry(layer, columns)
        chosen = range(len(entry.sections)) if sections is None else sections
        parts = {}
        for section in (entry.sections[k] for k in chosen):
            with self._naming(layer, [(0, entry.neurons)], [section], columns):
                raw = self.reader.read(
                    section.offset, entry.neurons * section.bundle_bytes
                )
            rows = np.frombuffer(raw, dtype=np.uint8).reshape(
                entry.neurons, section.bundle_bytes
            )
            gather_parts(rows, entry.section_components(section), parts)
            del rows, raw  # views into the staging buffer; decoding copied out
        return {n: assemble(entry.components[n], p, dtype) for n, p in parts.items()}

    def read_runs(
        self,
        layer: int,
        ids: np.ndarray,
        sections: Sequence[int],
        max_gap: int = 0,
        columns: bool = False,
        reader=None,
        stats=None,
        whole: bool = False,
    ) -> List[Tuple[np.ndarray, List[Component], np.ndarray]]:
        """Read the bundles of neurons `ids` of `layer` in `sections`, as pieces
        ``(positions, components, rows)``: `rows` (len(positions), bytes) uint8 are
        the bundles of ``ids[positions]`` holding `components` (one section's). Rows
        of a gapless run are views of the reader's staging buffer, valid until its
        next read: the caller moves them once, to where they are used.

        Neighbouring ids are read together: runs closer than `max_gap` unneeded
        neurons merge into one read (a bigger read is cheaper than another request).
        With `whole`, each run comes whole, a view, the neurons read past in it
        at position -1 (for a product that multiplies them by zero). With `columns`,
        `ids` are input channels and the bundles their columns; `reader`: the
        reader to read with (default: the store's own), counting in `stats`
        (default: the reader's own).
        """
        entry, order = self.entry(layer, columns), np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        runs = neuron_runs(sorted_ids, max_gap)
        chosen = [entry.sections[k] for k in sections]
        ranges = run_ranges(chosen, runs)
        with self._naming(layer, runs, chosen, columns):
            views = iter((reader or self.reader).read_ranges(ranges, stats))
        ends = np.searchsorted(sorted_ids, [b for _, b in runs])
        pieces = []
        for s in chosen:
            components, start = entry.section_components(s), 0
            for (a, b), end, view in zip(runs, ends, views):
                run = np.frombuffer(view, np.uint8).reshape(b - a, s.bundle_bytes)
                first, last = sorted_ids[start] - a, sorted_ids[end - 1] - a
                if whole:  # the run as read, the neurons past at -1
                    positions = np.full(b - a, -1, np.int64)
                    positions[sorted_ids[start:end] - a] = order[start:end]
                    pieces.append((positions, components, run))
                elif last - first + 1 == end - start:  # every neuron of the run:
                    pieces.append((order[start:end], components, run[first : last + 1]))
                else:  # a gap read past unneeded neurons: their rows picked (a copy)
                    rows = run[sorted_ids[start:end] - a]
                    pieces.append((order[start:end], components, rows))
                start = end
        return pieces

    def read_neurons(
        self,
        layer: int,
        ids: np.ndarray,
        sections: Sequence[int],
        max_gap: int = 0,
        out: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """The bundles of neurons `ids` of `layer` in `sections`: (len(ids), bytes)
        uint8, rows in the order of `ids`, each row the sections' bundles side by side
        (`read_runs`, gathered); `out`, a (>= len(ids), bytes) uint8 array, receives
        them, else they are allocated."""
        entry = self.manifest.layers[layer]
        col, width = {}, 0  # each section's first component -> its columns' start
        for s in (entry.sections[k] for k in sections):
            col[s.components[0]] = width
            width += s.bundle_bytes
        if out is None:
            out = np.empty((len(ids), width), np.uint8)
        if out.shape[0] < len(ids) or out.shape[1] != width:
            raise ValueError(f"out {out.shape} cannot hold {len(ids)} x {width} bytes")
        rows = out[: len(ids)]
        for positions, components, piece in self.read_runs(
            layer, ids, sections, max_gap
        ):
            a = col[components[0].name]
            rows[positions, a : a + piece.shape[1]] = piece
        return rows

    def verify(self, progress: Optional[Callable[[int], None]] = None) -> None:
        """Check every 4 KiB block of the bundles and the dense part against the
        store's block checksums (reads the whole store); `progress` receives the
        bytes checked. A mismatch names the layer and neurons (or the dense file)."""
        sums = self.manifest.extension("checksums")
        bundles = self.path / BUNDLES_NAME
        if sums is None:
            raise FlashError(
                "the store has no checksums to verify", bundles, _RECONVERT
            )
        raw = bytes(self.reader.read(sums.offset, sums.bytes))
        if table_digest(raw) != sums.meta["digest"]:
            raise FlashError(
                "the checksum table itself is damaged: the file is corrupted",
                bundles,
                _RECONVERT,
            )
        table = np.frombuffer(raw, "<u8")
        for name, start, stop in mismatches(self.path, sums.meta, table, progress):
            raise FlashError(
                f"bytes {start}-{stop} ({self.describe_bytes(name, start)}) do not "
                "match their checksum: the file is corrupted",
                self.path / name,
                _RECONVERT,
            )
        self._check_zeros(sums.offset + sums.bytes, self.manifest.file_bytes)

    def describe_bytes(self, name: str, at: int) -> str:
        """What byte `at` of a store file holds: a layer's neurons, the header, an
        extension, the dense part."""
        if name == DENSE_NAME:
            return "the dense part"
        if at < HEADER_BYTES:
            return "the header"
        for entries, unit in self.manifest.bundle_kinds():
            for i, entry in enumerate(entries):
                for s in entry.sections:
                    stop = s.offset + entry.neurons * s.bundle_bytes
                    if s.offset <= at < align_up(stop):
                        first = max(0, (at - s.offset) // s.bundle_bytes)
                        last = (at + ALIGN - s.offset) // s.bundle_bytes
                        last = min(last, entry.neurons - 1)
                        return f"layer {i}, {unit} {first}-{last}"
        for e in self.manifest.extensions:
            if e.offset <= at < align_up(e.offset + e.bytes):
                return f"the {e.name} extension"
        return "alignment padding"

    def _check_zeros(self, start: int, stop: int) -> None:
        """The bytes past the checksum table (its block's tail) must be zeros."""
        if start < stop and bytes(self.reader.read(start, stop - start)) != bytes(
            stop - start
        ):
            raise FlashError(
                f"bytes {start}-{stop} should be zero padding: the file is corrupted",
                self.path / BUNDLES_NAME,
                _RECONVERT,
            )

    @contextlib.contextmanager
    def _naming(self, layer: int, runs, sections, columns=False) -> Iterator[None]:
        """Re-raise a failed read as a `ReadError` naming the layer and neurons (or
        input channels): the run holding the failing byte when it is known, else
        all of them."""
        try:
            yield
        except FlashError as e:
            first, last = runs[0][0], runs[-1][1] - 1
            at = getattr(e, "offset", None)
            for s in sections if at is not None else []:
                # the run whose 4 KiB-widened byte range holds the failing byte
                hit = [
                    (a, b)
                    for a, b in runs
                    if align_down(s.offset + a * s.bundle_bytes)
                    <= at
                    < align_up(s.offset + b * s.bundle_bytes)
                ]
                if hit:  # narrowed to the neurons of the failing 4 KiB block
                    a, b = hit[0]
                    block = at - at % ALIGN
                    first = max(a, (block - s.offset) // s.bundle_bytes)
                    last = min(b - 1, (block + ALIGN - 1 - s.offset) // s.bundle_bytes)
                    break
            unit = "channels" if columns else "neurons"
            raise ReadError(
                f"layer {layer}, {unit} {first}-{last}: {e.message}",
                e.path,
                e.fix,
                offset=at,
                layer=layer,
                neurons=(first, last),
            ) from None

    def restage(self, nbytes: int) -> None:
        """Give the reader (and the spare, made again when next asked for) staging
        buffers of `nbytes`: the layers then read in pieces of at most that
        (`read_chunks`); before anything reads ahead."""
        assert self.read_ahead is None, "restaged under a read ahead"
        kind, bundles, _, threads = self._reader_args
        checker = self.reader.checker
        self.reader.close()
        if self.spare is not None:
            self.spare.close()
            self.spare = None
        self._reader_args = (kind, bundles, max(nbytes, HEADER_BYTES), threads)
        self.reader = READERS[kind](*self._reader_args[1:])
        self.reader.checker = checker

    def spare_reader(self):
        """A second reader of the bundles file, of the same kind, size and checks,
        with its own staging buffer (`read_ahead.ReadAhead` reads into it while the
        first one's views are in use); made once."""
        if self.spare is None:
            kind, bundles, capacity, threads = self._reader_args
            self.spare = READERS[kind](bundles, capacity, threads)
            self.spare.checker = self.reader.checker
        return self.spare

    def staged(self, rows: np.ndarray) -> Optional[mx.array]:
        """`rows` read into a reader's staging buffer (`read_runs`' gapless rows) as an
        MLX array sharing their bytes, valid until that reader's next read; None if
        they are not such rows."""
        for reader in (self.reader, self.spare):
            staged = None if reader is None else reader.buffer.mlx(rows)
            if staged is not None:
                return staged
        return None

    def read_totals(self) -> ReadStats:
        """The FFN bundles' reads so far: the layers' own and the reads ahead (into
        either reader, counted apart)."""
        ahead = self.read_ahead
        readers = [self.reader.stats] + ([ahead.stats] if ahead is not None else [])
        return ReadStats.total(readers)

    def close(self) -> None:
        if self.read_ahead is not None:  # nothing may read into a closed reader
            self.read_ahead.close()
        if self.spare is not None:
            self.spare.close()
        self.reader.close()

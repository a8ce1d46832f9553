"""The manifest (`flash_config.json`) and the bundles file's header, format versions 2
and 3 (docs/FORMAT.md §2, §5-§8).

Version 2 gives every layer its own encoding per component (mixed-bit recipes and
Q4_K_M files need them), records where each tensor's values came from and whether that
was exact, and lists optional typed extensions — aligned byte ranges of `ffn.bundles`
that later features add without a version bump (the block checksums are the first). An
extension a reader does not know is ignored unless it is marked `required`, in which
case the store is refused by the extension's name. Version 3 adds one optional
section key, `part`: a planar section holds one part of one component (its packed
words, scales or biases), a row-major matrix computed from where it was read. A store
is written in the oldest version that describes it.
"""

import hashlib
import json
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..errors import FlashError
from .encoding import Component, Encoding, Origin

MAGIC = b"MLXFLASH"
MANIFEST_MAGIC = "mlx-flash-store"
FORMAT_VERSION = 3  # the newest; a store is written in the oldest that describes it
READ_VERSIONS = (2, 3)  # 3 adds planar sections (one part of one component each)
ALIGN = 4096
HEADER_BYTES = 4096
MANIFEST_NAME = "flash_config.json"
BUNDLES_NAME = "ffn.bundles"
DENSE_NAME = "model.safetensors"
ACTIVATIONS = ("silu", "gelu", "gelu_approx", "relu")  # what FlashFFN computes
COLUMNS = "columns"  # gate/up bundled by input channel (docs/FORMAT.md §7.1)
KNOWN_EXTENSIONS = ("checksums", COLUMNS)  # what this reader understands
COLUMNS_MAGIC = b"MLXFCOLS"

# magic, version, header bytes, file bytes, layers, layout digest
_HEADER = struct.Struct("<8sIIQI32s")
# the columns extension's first block: magic, layers, digest of its layout (§7.1)
_COLUMNS_HEADER = struct.Struct("<8sI32s")
HEADER_FIELDS = _HEADER.size  # 60: the header bytes past these are zeros
_RECONVERT = "convert the model again with `python -m mlx_flash.convert`"


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass
class Section:
    """One contiguous run of bundles in a layer: every neuron's `components`, in
    order; with `part` (format 3, the planar layout) one part of one component, so
    that a run of neurons is a row-major matrix as computed with."""

    components: List[str]
    offset: int
    bundle_bytes: int
    part: Optional[str] = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class LayerEntry:
    neurons: int
    components: Dict[str, Component]
    sections: List[Section]

    def section_components(self, section: Section) -> List[Component]:
        """The components a section's bundles hold, in order (with its `part`, that
        part of each)."""
        return [
            replace(self.components[name], part=section.part)
            for name in section.components
        ]

    def bundle_bytes(self, sections: Optional[List[int]] = None) -> int:
        chosen = range(len(self.sections)) if sections is None else sections
        return sum(self.sections[k].bundle_bytes for k in chosen)

    @property
    def end(self) -> int:
        s = self.sections[-1]
        return s.offset + self.neurons * s.bundle_bytes

    def whole_read(self, sections: Optional[List[int]] = None) -> int:
        """Bytes that reading these sections whole takes (each starts on a block and
        is widened to one at its end, for direct I/O); all of them by default."""
        chosen = range(len(self.sections)) if sections is None else sections
        return sum(
            align_up(s.offset + self.neurons * s.bundle_bytes) - s.offset
            for s in (self.sections[k] for k in chosen)
        )


@dataclass
class Extension:
    """An optional typed byte range of `ffn.bundles` (4 KiB-aligned, after the layers);
    `meta` holds its type's own parameters."""

    name: str
    offset: int
    bytes: int
    required: bool = False
    meta: dict = field(default_factory=dict)


@dataclass
class Manifest:
    """`flash_config.json`: everything needed to find and trust one byte of the
    store."""

    architecture: str
    activation: str
    rows: List[str]  # input projections, one row per neuron (gate_proj, up_proj / fc1)
    column: str  # output projection, one column per neuron (down_proj / fc2)
    hidden_size: int
    intermediate_size: int
    layout: str
    layers: List[LayerEntry]
    dense: Dict[str, Origin] = field(default_factory=dict)  # tensor base name ->
    extensions: List[Extension] = field(default_factory=list)
    file_bytes: int = 0
    out_bias: bool = False
    source: dict = field(default_factory=dict)

    def extension(self, name: str) -> Optional[Extension]:
        return next((e for e in self.extensions if e.name == name), None)

    @property
    def columns(self) -> Optional[List[LayerEntry]]:
        """The columns extension's layers (§7.1): per layer, one bundle per input
        channel (``neurons`` counts channels) holding that channel's column of each
        row projection (``length`` = intermediate_size); None without it."""
        ext = self.extension(COLUMNS)
        if ext is None:
            return None
        if "_columns" not in self.__dict__:
            self.__dict__["_columns"] = [_layer(d) for d in ext.meta["layers"]]
        return self.__dict__["_columns"]

    @property
    def format_version(self) -> int:
        """The oldest format version that describes this store (§11)."""
        kinds = [entries for entries, _ in self.bundle_kinds()]
        planar = any(s.part for e in kinds for l in e for s in l.sections)
        return 3 if planar else 2

    def bundle_kinds(self) -> List[Tuple[List[LayerEntry], str]]:
        """(entries, unit) of every kind of bundle the store holds: the layers'
        neurons, and with the columns extension its input channels."""
        columns = self.columns
        return [(self.layers, "neurons")] + ([(columns, "channels")] if columns else [])

    def lossy_steps(self) -> List[str]:
        """Every inexact step the conversion took, one line per (tensor kind, step):
        what the converter prints, `inspect` shows and docs/FORMAT.md §5 defines."""
        steps: Dict[tuple, list] = {}
        for entries, unit in self.bundle_kinds():
            suffix = " columns" if unit == "channels" else ""
            for i, layer in enumerate(entries):
                for c in layer.components.values():
                    if not c.origin.exact:
                        key = (c.name + suffix, c.origin.kind, c.origin.note)
                        steps.setdefault(key, []).append((i, c.origin.error))
        for name, o in self.dense.items():
            if not o.exact:
                steps.setdefault(("dense", o.kind, o.note), []).append((name, o.error))
        lines = []
        for (what, kind, note), where in steps.items():
            errors = [e for _, e in where if e is not None]
            worst = f", max |Δw| {max(errors):.3g}" if errors else ""
            count = (
                f"{len(where)} layers" if what != "dense" else f"{len(where)} tensors"
            )
            lines.append(f"{what} ({kind}, {count}): {note}{worst}")
        return lines

    def to_json(self) -> str:
        d = {
            "magic": MANIFEST_MAGIC,
            "format_version": self.format_version,
            "architecture": self.architecture,
            "activation": self.activation,
            "rows": self.rows,
            "column": self.column,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "layout": self.layout,
            "layers": [layer_dict(l) for l in self.layers],
            "dense": {k: o._asdict() for k, o in self.dense.items()},
            "extensions": [e.__dict__ for e in self.extensions],
            "file_bytes": self.file_bytes,
            "out_bias": self.out_bias,
            "source": self.source,
        }
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, path: Path) -> "Manifest":
        """Parse a manifest, checking its structure and the type of every field;
        `validate` then checks that the values are consistent."""
        try:
            d = json.loads(text)
        except (ValueError, RecursionError) as e:  # also: too many digits, too deep
            raise FlashError(
                f"the manifest is not valid JSON ({e})", path, _RECONVERT
            ) from None
        if not isinstance(d, dict) or d.get("magic") != MANIFEST_MAGIC:
            raise FlashError("not an mlx_flash manifest (bad magic)", path, _RECONVERT)
        version = d.get("format_version")
        if version not in READ_VERSIONS or type(version) is not int:
            raise FlashError(
                f"store format version {version!r}; this mlx_flash reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}",
                path,
                reconvert_fix(d.get("source"), path.parent),
            )
        why = _structure_error(d)
        if why:
            raise FlashError(f"the manifest is malformed: {why}", path, _RECONVERT)
        try:
            layers = [_layer(l) for l in d["layers"]]
            dense = {k: Origin(**o) for k, o in d["dense"].items()}
            extensions = [Extension(**e) for e in d["extensions"]]
            columns = [e for e in extensions if e.name == COLUMNS]
            for e in columns:
                why = _columns_error(e.meta)
                if why:
                    raise FlashError(
                        f"the manifest is malformed: columns extension: {why}",
                        path,
                        _RECONVERT,
                    )
                [_layer(l) for l in e.meta["layers"]]
        except TypeError as e:  # a wrong key or an unhashable value inside
            raise FlashError(
                f"the manifest is malformed ({e})", path, _RECONVERT
            ) from None
        keep = {k: d[k] for k in _REQUIRED if k not in _PARSED}
        optional = {k: d[k] for k in _OPTIONAL if k in d}
        manifest = cls(
            **keep, **optional, layers=layers, dense=dense, extensions=extensions
        )
        if manifest.format_version > version:  # planar sections are version 3's
            raise FlashError(
                f"the manifest says format version {version}, its sections are "
                f"version {manifest.format_version}'s",
                path,
                _RECONVERT,
            )
        return manifest

    def validate(self, path: Path) -> None:
        """Reject a manifest whose layout cannot be right, before any byte is read.

        Every size is checked to be a positive integer and every section and
        extension to lie, in order, inside `file_bytes`; the caller then checks
        `file_bytes` against the file itself. So nothing sized from the manifest can
        exceed the file.
        """

        def bad(why):
            return FlashError(f"the manifest is inconsistent: {why}", path, _RECONVERT)

        for key in ("hidden_size", "intermediate_size", "file_bytes"):
            if not _positive_int(getattr(self, key)):
                raise bad(f"{key} must be a positive integer")
        if self.activation not in ACTIVATIONS:
            raise bad(f"unknown activation {self.activation!r}")
        if not self.layers:
            raise bad("no layers")
        projections = self.rows + [self.column]
        if len(self.rows) not in (1, 2) or len(set(projections)) != len(projections):
            raise bad(
                f"rows {self.rows} and column {self.column!r} must be 1 or 2 "
                "distinct input projections and one output projection"
            )
        allowed = set(projections) | {r + ".bias" for r in self.rows}
        end = HEADER_BYTES
        for i, layer in enumerate(self.layers):
            if not _positive_int(layer.neurons):
                raise bad(f"layer {i} has no neurons")
            if layer.neurons != self.intermediate_size:
                raise bad(
                    f"layer {i} has {layer.neurons} neurons, intermediate_size is "
                    f"{self.intermediate_size}"
                )
            for name in projections:
                if name not in layer.components:
                    raise bad(f"layer {i} has no component {name!r}")
            end = _check_layer(f"layer {i}", layer, allowed, self.hidden_size, end, bad)
        if end > self.file_bytes:
            raise FlashError(
                "the manifest points past the end of the bundles file", path, _RECONVERT
            )
        for e in self.extensions:
            if not (_positive_int(e.bytes) and type(e.offset) is int):
                raise bad(f"extension {e.name!r}: offset and bytes must be integers")
            if e.offset % ALIGN or e.offset < end:
                raise bad(f"extension {e.name!r}: offset {e.offset} is misplaced")
            if e.required and e.name not in KNOWN_EXTENSIONS:
                raise FlashError(
                    f"the store needs the {e.name!r} extension, which this version of "
                    "mlx_flash cannot read",
                    path,
                    "upgrade mlx_flash, or convert the model again with this version",
                )
            end = e.offset + e.bytes
            if e.name == COLUMNS:
                self._check_columns(e, bad)
        if self.file_bytes % ALIGN:
            raise bad(f"file_bytes {self.file_bytes} is not a multiple of {ALIGN}")
        if end > self.file_bytes:
            raise FlashError(
                "the manifest points past the end of the bundles file", path, _RECONVERT
            )

    def _check_columns(self, ext: Extension, bad) -> None:
        """The columns extension (§7.1): one layer per decoder layer, each with one
        bundle per input channel of the row projections' columns, inside the
        extension after its header block."""
        columns = self.columns
        if len(columns) != len(self.layers):
            raise bad(f"the columns extension has {len(columns)} layers")
        end = ext.offset + HEADER_BYTES
        for i, layer in enumerate(columns):
            if layer.neurons != self.hidden_size:
                raise bad(f"columns of layer {i}: {layer.neurons} channels")
            if sorted(layer.components) != sorted(self.rows):
                raise bad(f"columns of layer {i} must hold exactly {self.rows}")
            where = f"columns of layer {i}"
            end = _check_layer(
                where, layer, set(self.rows), self.intermediate_size, end, bad
            )
        if end > ext.offset + ext.bytes:
            raise bad("the columns extension's layers run past its end")

    def layout_digest(self) -> bytes:
        """SHA-256 of the byte layout (docs/FORMAT.md §6): ties the bundles file to
        this manifest. Origins, extension parameters and `source` are not covered."""
        layout = _layout(self.layers)
        ext = [[e.name, e.offset, e.bytes, e.required] for e in self.extensions]
        blob = json.dumps([layout, ext, self.file_bytes], sort_keys=True).encode()
        return hashlib.sha256(blob).digest()

    def columns_digest(self) -> bytes:
        """SHA-256 of the columns extension's layout (§7.1), the same text as §6's
        layers part; its header block holds it, as the file's header holds §6's."""
        return hashlib.sha256(
            json.dumps(_layout(self.columns), sort_keys=True).encode()
        ).digest()


def _layout(layers: List[LayerEntry]) -> list:
    return [
        [
            l.neurons,
            {n: [c.length, c.encoding.to_dict()] for n, c in l.components.items()},
            [
                [s.components, s.offset, s.bundle_bytes] + ([s.part] if s.part else [])
                for s in l.sections
            ],
        ]
        for l in layers
    ]


def layer_dict(l: LayerEntry) -> dict:
    """A layer as the manifest writes it (§5)."""
    return {
        "neurons": l.neurons,
        "components": {
            n: {
                "length": c.length,
                "encoding": c.encoding.to_dict(),
                "origin": c.origin._asdict(),
            }
            for n, c in l.components.items()
        },
        "sections": [s.to_dict() for s in l.sections],
    }


def _layer(l: dict) -> LayerEntry:
    return LayerEntry(
        l["neurons"],
        {
            n: Component(
                n, c["length"], Encoding(**c["encoding"]), Origin(**c["origin"])
            )
            for n, c in l["components"].items()
        },
        [Section(**s) for s in l["sections"]],
    )


def _check_layer(where: str, layer: LayerEntry, allowed, length: int, end: int, bad):
    """One layer's components and sections (§8.3): known components of `length`
    (biases 1, never quantized), each stored once, sections in order from `end`;
    the end of its last section."""
    if not _positive_int(layer.neurons):
        raise bad(f"{where} has no neurons")
    for name, c in layer.components.items():
        if name not in allowed:
            raise bad(f"{where}: component {name!r} is none of {sorted(allowed)}")
        expected = 1 if name.endswith(".bias") else length
        if not _positive_int(c.length) or c.length != expected:
            raise bad(
                f"{where}: component {name} has length {c.length!r}, "
                f"expected {expected}"
            )
        if expected == 1 and c.encoding.quantized:
            raise bad(f"{where}: the bias {name} cannot be quantized")
    named = {n for s in layer.sections for n in s.components}
    if named != set(layer.components):
        raise bad(
            f"{where} stores {sorted(named)}, expected {sorted(layer.components)}"
        )
    for s in layer.sections:
        if not all(type(v) is int for v in (s.offset, s.bundle_bytes)):
            raise bad(f"{where}: offsets and sizes must be integers")
        if not s.components:
            raise bad(f"{where}: a section holds no component")
        if s.part is not None and len(s.components) != 1:
            raise bad(f"{where}: a planar section holds one component's part")
    held = sorted(
        (c.name, p)
        for s in layer.sections
        for c in layer.section_components(s)
        for p, _ in c.parts
    )
    every = sorted(
        (n, p)
        for n, c in layer.components.items()
        for p, _ in c.encoding.parts(c.length)
    )
    if held != every:
        raise bad(f"{where} stores {held}, expected {every} once each")
    for s in layer.sections:
        if s.bundle_bytes != sum(c.nbytes for c in layer.section_components(s)):
            raise bad(f"{where}: bundle size disagrees with its components")
        if s.offset % ALIGN or s.offset < end:
            raise bad(f"{where}: section offset {s.offset} is misplaced")
        end = s.offset + layer.neurons * s.bundle_bytes
    return end


def reconvert_fix(source, store: Path) -> str:
    """The command that rebuilds a store, naming its source when the manifest knows
    it."""
    src = source.get("path") if isinstance(source, dict) else None
    if isinstance(src, str) and src:
        return (
            f"convert it again: python -m mlx_flash.convert {src} -o {store} "
            "--overwrite (a store in mlx_flash's cache is re-converted by itself)"
        )
    return _RECONVERT


_REQUIRED = {
    "magic": str,
    "format_version": int,
    "architecture": str,
    "activation": str,
    "rows": list,
    "column": str,
    "hidden_size": int,
    "intermediate_size": int,
    "layout": str,
    "layers": list,
    "dense": dict,
    "extensions": list,
}
_PARSED = ("magic", "format_version", "layers", "dense", "extensions")
_OPTIONAL = {"file_bytes": int, "out_bias": bool, "source": dict}
_COMPONENT_KEYS = {"length", "encoding", "origin"}
_ENCODING_KEYS = {"mode", "dtype", "bits", "group_size"}
_ORIGIN_KEYS = {"kind", "exact", "note", "error"}
_SECTION_KEYS = {"components", "offset", "bundle_bytes"}  # and optionally "part"
_EXTENSION_KEYS = {"name", "offset", "bytes", "required", "meta"}


def _positive_int(v) -> bool:
    return type(v) is int and v > 0


def _origin_error(o) -> str:
    if not isinstance(o, dict) or set(o) != _ORIGIN_KEYS:
        return f"must have exactly {sorted(_ORIGIN_KEYS)}"
    if not (isinstance(o["kind"], str) and isinstance(o["note"], str)):
        return "kind and note must be strings"
    if not isinstance(o["exact"], bool):
        return "exact must be true or false"
    if o["error"] is not None and type(o["error"]) not in (int, float):
        return "error must be a number or null"
    return ""


def _structure_error(d: dict) -> str:
    """What is wrong with the shape of a parsed manifest (keys, containers, strings),
    or "". Integer values are left to `Manifest.validate` and `Encoding`."""
    unknown = sorted(set(d) - set(_REQUIRED) - set(_OPTIONAL))
    missing = sorted(set(_REQUIRED) - set(d))
    if unknown or missing:
        return f"unknown keys {unknown}, missing keys {missing}"
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key in d and kind is not int and not isinstance(d[key], kind):
            return f"{key} must be a {kind.__name__}"
    if not all(isinstance(r, str) for r in d["rows"]):
        return "rows must be strings"
    why = _layers_error(d["layers"])
    if why:
        return why
    for name, o in d["dense"].items():
        why = _origin_error(o)
        if why:
            return f"dense tensor {name!r}: the origin {why}"
    for e in d["extensions"]:
        if not isinstance(e, dict) or set(e) != _EXTENSION_KEYS:
            return f"an extension must have exactly {sorted(_EXTENSION_KEYS)}"
        if not isinstance(e["name"], str) or not isinstance(e["meta"], dict):
            return "an extension's name must be a string and its meta an object"
        if not isinstance(e["required"], bool):
            return "an extension's required must be true or false"
    return ""


def _columns_error(meta: dict) -> str:
    if set(meta) != {"layers"} or not isinstance(meta["layers"], list):
        return "meta must be exactly {layers: [...]}"
    return _layers_error(meta["layers"])


def _layers_error(layers: list) -> str:
    """What is wrong with the shape of a list of layers (§5), or ""."""
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict) or set(layer) != {
            "neurons",
            "components",
            "sections",
        }:
            return f"layer {i} must have exactly neurons, components and sections"
        if not isinstance(layer["components"], dict):
            return f"layer {i}: components must be an object"
        for name, c in layer["components"].items():
            if not isinstance(c, dict) or set(c) != _COMPONENT_KEYS:
                return (
                    f"layer {i}, component {name!r}: expected {sorted(_COMPONENT_KEYS)}"
                )
            e = c["encoding"]
            if not isinstance(e, dict) or set(e) != _ENCODING_KEYS:
                return (
                    f"layer {i}, component {name!r}: the encoding needs "
                    f"{sorted(_ENCODING_KEYS)}"
                )
            if not (isinstance(e["mode"], str) and isinstance(e["dtype"], str)):
                return f"layer {i}, component {name!r}: mode and dtype must be strings"
            why = _origin_error(c["origin"])
            if why:
                return f"layer {i}, component {name!r}: the origin {why}"
        if not isinstance(layer["sections"], list) or not layer["sections"]:
            return f"layer {i}: sections must be a non-empty list"
        for s in layer["sections"]:
            if not isinstance(s, dict) or set(s) - {"part"} != _SECTION_KEYS:
                return (
                    f"layer {i}: a section must have exactly {sorted(_SECTION_KEYS)} "
                    "and optionally part"
                )
            if not isinstance(s.get("part", ""), str):
                return f"layer {i}: a section's part must be a string"
            comps = s["components"]
            if not isinstance(comps, list) or not all(
                isinstance(c, str) for c in comps
            ):
                return f"layer {i}: section components must be a list of names"
    return ""


def pack_header(manifest: Manifest) -> bytes:
    head = _HEADER.pack(
        MAGIC,
        manifest.format_version,
        HEADER_BYTES,
        manifest.file_bytes,
        len(manifest.layers),
        manifest.layout_digest(),
    )
    return head.ljust(HEADER_BYTES, b"\0")


def check_header(head: bytes, manifest: Manifest, path: Path) -> None:
    """The cheap check run at every load: magic, version, sizes and layout digest."""
    if len(head) < _HEADER.size:
        raise FlashError(
            "the bundles file is shorter than its header", path, _RECONVERT
        )
    magic, version, header_bytes, file_bytes, layers, digest = _HEADER.unpack_from(head)
    if magic != MAGIC:
        raise FlashError("not an mlx_flash bundles file (bad magic)", path, _RECONVERT)
    if version != manifest.format_version:
        raise FlashError(
            f"bundles format version {version}, expected {manifest.format_version}",
            path,
            _RECONVERT,
        )
    if (header_bytes, file_bytes, layers) != (
        HEADER_BYTES,
        manifest.file_bytes,
        len(manifest.layers),
    ):
        raise FlashError(
            "the bundles file and flash_config.json disagree on sizes", path, _RECONVERT
        )
    if digest != manifest.layout_digest():
        raise FlashError(
            "the bundles file was written for another manifest", path, _RECONVERT
        )


def pack_columns_header(manifest: Manifest) -> bytes:
    head = _COLUMNS_HEADER.pack(
        COLUMNS_MAGIC, len(manifest.columns), manifest.columns_digest()
    )
    return head.ljust(HEADER_BYTES, b"\0")


def check_columns_header(head: bytes, manifest: Manifest, path: Path) -> None:
    """The columns extension's first block: its magic, layer count and the digest of
    the layout the manifest gives it (checked at every load, like the header)."""
    magic, layers, digest = _COLUMNS_HEADER.unpack_from(
        head.ljust(_COLUMNS_HEADER.size, b"\0")
    )
    if (magic, layers, digest) != (
        COLUMNS_MAGIC,
        len(manifest.columns),
        manifest.columns_digest(),
    ):
        raise FlashError(
            "the columns extension was written for another manifest", path, _RECONVERT
        )

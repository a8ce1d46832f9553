"""The bundle store's on-disk format, version 1 (specified in docs/FORMAT.md).

A store is a directory: `config.json`, tokenizer files, `model.safetensors` (the dense
part), `ffn.bundles` (every layer's FFN neurons as row-column bundles, paper §3.2) and
`flash_config.json` (the manifest). This module owns the byte layout: encodings, bundle
offsets, the bundles-file header and the manifest. It does no file I/O of its own except
the small manifest and header helpers.
"""

import hashlib
import json
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple, Union

import mlx.core as mx
import numpy as np

from ..errors import FlashError

MAGIC = b"MLXFLASH"
MANIFEST_MAGIC = "mlx-flash-store"
FORMAT_VERSION = 1
ALIGN = 4096
HEADER_BYTES = 4096
MANIFEST_NAME = "flash_config.json"
BUNDLES_NAME = "ffn.bundles"
DENSE_NAME = "model.safetensors"

# what `convert --ffn-format/--down-format` accept: the source's own, a float dtype,
# MLX affine quantization at these bits, or MLX's float quantization modes
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
FLOAT_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}  # bits, group
FFN_FORMATS = (
    ("auto", "float16", "bfloat16", "float32")
    + tuple(f"q{b}" for b in AFFINE_BITS)
    + tuple(FLOAT_MODES)
)

ACTIVATIONS = ("silu", "gelu", "gelu_approx", "relu")  # what FlashFFN computes
FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
_HEADER = struct.Struct(
    "<8sIIQI32s"
)  # magic, version, header bytes, file bytes, layers, layout digest
HEADER_FIELDS = _HEADER.size  # 60: the header bytes past these are zeros

Weight = Union[
    mx.array, Tuple[mx.array, mx.array, mx.array]
]  # float, or (packed, scales, biases)


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Encoding:
    """How one component's values are stored: a float dtype, or MLX affine quantization.

    Affine components hold `[packed uint32 words | scales | biases]`, with scales and
    biases in `dtype` and one pair per `group_size` values, as `mx.quantize` makes them.
    """

    dtype: str = "float16"
    bits: int = 0
    group_size: int = 0

    def __post_init__(self):
        if self.dtype not in FLOAT_DTYPES:
            raise FlashError(
                f"unknown dtype {self.dtype!r}", fix="use " + ", ".join(FLOAT_DTYPES)
            )
        ints = all(type(v) is int for v in (self.bits, self.group_size))
        group_ok = (
            self.group_size in (32, 64, 128) if self.bits else self.group_size == 0
        )
        if not ints or self.bits not in (0, 4, 8) or not group_ok:
            raise FlashError(
                f"unsupported quantization: {self.bits} bits, group size {self.group_size}",
                fix="use 4 or 8 bits with a group size of 32, 64 or 128",
            )

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def itemsize(self) -> int:
        return FLOAT_DTYPES[self.dtype].size

    def parts(self, length: int) -> List[Tuple[str, int]]:
        """Byte size of each part of one row of `length` values."""
        if not self.quantized:
            return [("values", length * self.itemsize)]
        if length % self.group_size:
            raise FlashError(
                f"a row of {length} values does not split into groups of {self.group_size}",
                fix="choose a group size that divides the model's hidden size",
            )
        groups = length // self.group_size * self.itemsize
        return [
            ("packed", length * self.bits // 8),
            ("scales", groups),
            ("biases", groups),
        ]

    def nbytes(self, length: int) -> int:
        return sum(n for _, n in self.parts(length))

    def describe(self) -> str:
        if self.quantized:
            return f"q{self.bits} g{self.group_size} ({self.dtype} scales)"
        return self.dtype

    @classmethod
    def parse(cls, text: str, group_size: int = 64, scale_dtype: str = "float16"):
        """`float16`, `bfloat16`, `float32`, `q4` or `q8` -> Encoding."""
        if text in FLOAT_DTYPES:
            return cls(dtype=text)
        if text in ("q4", "q8"):
            return cls(dtype=scale_dtype, bits=int(text[1]), group_size=group_size)
        raise FlashError(
            f"unknown FFN format {text!r}",
            fix="use float16, bfloat16, float32, q4 or q8",
        )


@dataclass(frozen=True)
class Component:
    """One part of a neuron's bundle: a weight row (`length` = hidden size) or a bias."""

    name: str
    length: int
    encoding: Encoding

    @property
    def nbytes(self) -> int:
        return self.encoding.nbytes(self.length)


def bundle_offsets(components: List[Component]) -> Dict[str, Tuple[int, int]]:
    """Byte (offset, size) of each component inside one bundle, in order."""
    offsets, at = {}, 0
    for c in components:
        offsets[c.name] = (at, c.nbytes)
        at += c.nbytes
    return offsets


def encode_rows(w: Weight, enc: Encoding, length: int) -> np.ndarray:
    """Rows of a component (n, length) -> their stored bytes (n, nbytes) as uint8.

    A float array is cast or quantized; an already-quantized triple with the same bits
    and group size is kept as it is (only its scales cast), so nothing is re-quantized.
    """
    if isinstance(w, tuple):
        if enc.quantized and (enc.bits, enc.group_size) == quant_params(w, length):
            packed, scales, biases = w
            dtype = FLOAT_DTYPES[enc.dtype]
            return _concat_bytes([packed, scales.astype(dtype), biases.astype(dtype)])
        w = dequantize(w, length)
    w = w.astype(mx.float32)
    if enc.quantized:
        packed, scales, biases = mx.quantize(
            w, group_size=enc.group_size, bits=enc.bits
        )
        dtype = FLOAT_DTYPES[enc.dtype]
        return _concat_bytes([packed, scales.astype(dtype), biases.astype(dtype)])
    return _concat_bytes([w.astype(FLOAT_DTYPES[enc.dtype])])


def decode_rows(raw: np.ndarray, component: Component, dtype: mx.Dtype) -> Weight:
    """Stored bytes (n, nbytes) uint8 -> the component's MLX weight, floats in `dtype`."""
    enc, at, out = component.encoding, 0, []
    for _, size in enc.parts(component.length):
        out.append(mx.array(np.ascontiguousarray(raw[:, at : at + size])))
        at += size
    if not enc.quantized:
        return out[0].view(FLOAT_DTYPES[enc.dtype]).astype(dtype)
    packed, scales, biases = out
    stored = FLOAT_DTYPES[enc.dtype]
    return (
        packed.view(mx.uint32),
        scales.view(stored).astype(dtype),
        biases.view(stored).astype(dtype),
    )


def quant_params(
    w: Tuple[mx.array, mx.array, mx.array], length: int
) -> Tuple[int, int]:
    """(bits, group_size) of an MLX affine-quantized triple holding rows of `length`."""
    packed, scales, _ = w
    bits, group_size = packed.shape[-1] * 32 // length, length // scales.shape[-1]
    if (
        packed.shape[-1] * 32 != bits * length
        or group_size * scales.shape[-1] != length
    ):
        raise FlashError(
            f"a quantized tensor {packed.shape} with scales {scales.shape} cannot hold rows "
            f"of {length} values",
            fix="is the checkpoint complete and its config right?",
        )
    return bits, group_size


def decode_bundles(
    rows: np.ndarray, components: List[Component], dtype: mx.Dtype
) -> Dict[str, Weight]:
    """Bundles (n, bytes) uint8 holding `components` in order -> name -> MLX weight."""
    weights, at = {}, 0
    for c in components:
        weights[c.name] = decode_rows(rows[:, at : at + c.nbytes], c, dtype)
        at += c.nbytes
    return weights


def dequantize(w: Weight, length: int) -> mx.array:
    if not isinstance(w, tuple):
        return w
    bits, group_size = quant_params(w, length)
    return mx.dequantize(*w, group_size=group_size, bits=bits)


def _concat_bytes(parts: List[mx.array]) -> np.ndarray:
    n = parts[0].shape[0]
    mx.eval(parts)
    return np.concatenate([_as_bytes(p).reshape(n, -1) for p in parts], axis=1)


def _as_bytes(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:  # numpy has no bfloat16: move the raw bits
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a, copy=False)).view(np.uint8)


# --- the manifest ---------------------------------------------------------------------


@dataclass
class Section:
    """One contiguous run of bundles in a layer: every neuron's `components`, in order."""

    components: List[str]
    offset: int
    bundle_bytes: int
    sha256: str = ""


@dataclass
class LayerEntry:
    neurons: int
    sections: List[Section]


@dataclass
class Manifest:
    """`flash_config.json`: everything needed to find and trust one byte of `ffn.bundles`."""

    architecture: str
    activation: str
    rows: List[str]  # input projections, one row per neuron (gate_proj, up_proj / fc1)
    column: str  # output projection, one column per neuron (down_proj / fc2)
    hidden_size: int
    intermediate_size: int
    layout: str
    components: Dict[str, Component]
    layers: List[LayerEntry]
    file_bytes: int = 0
    out_bias: bool = False
    source: dict = field(default_factory=dict)
    magic: str = MANIFEST_MAGIC
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d["components"] = {
            k: {"length": c.length, "encoding": asdict(c.encoding)}
            for k, c in self.components.items()
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
        if (
            d.get("format_version") != FORMAT_VERSION
            or type(d.get("format_version")) is not int
        ):
            raise FlashError(
                f"store format version {d.get('format_version')!r}, this mlx_flash reads "
                f"version {FORMAT_VERSION}",
                path,
                "convert the model again with this version of mlx_flash",
            )
        why = _structure_error(d)
        if why:
            raise FlashError(f"the manifest is malformed: {why}", path, _RECONVERT)
        try:
            d["components"] = {
                k: Component(k, c["length"], Encoding(**c["encoding"]))
                for k, c in d["components"].items()
            }
        except TypeError as e:  # e.g. an unhashable dtype
            raise FlashError(
                f"the manifest is malformed ({e!r})", path, _RECONVERT
            ) from None
        d["layers"] = [
            LayerEntry(l["neurons"], [Section(**s) for s in l["sections"]])
            for l in d["layers"]
        ]
        return cls(**d)

    def validate(self, path: Path) -> None:
        """Reject a manifest whose layout cannot be right, before any byte is read.

        Every size is checked to be a positive integer and every section to lie, in
        order, inside `file_bytes`; the caller then checks `file_bytes` against the
        file itself. So nothing sized from the manifest can exceed the file.
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
        for name in projections:
            if name not in self.components:
                raise bad(f"no component {name!r}")
        for name, c in self.components.items():
            if name not in allowed:
                raise bad(f"component {name!r} is none of {sorted(allowed)}")
            expected = 1 if name.endswith(".bias") else self.hidden_size
            if not _positive_int(c.length):
                raise bad(f"component {name} has length {c.length!r}")
            if c.length != expected or (expected == 1 and c.encoding.quantized):
                raise bad(
                    f"component {name} has length {c.length}, expected {expected}"
                )
        needed = sorted(
            self.rows
            + [self.column]
            + [n for n in self.components if n.endswith(".bias")]
        )
        end = HEADER_BYTES
        for i, layer in enumerate(self.layers):
            if not _positive_int(layer.neurons):
                raise bad(f"layer {i} has no neurons")
            if layer.neurons != self.intermediate_size:
                raise bad(
                    f"layer {i} has {layer.neurons} neurons, intermediate_size is "
                    f"{self.intermediate_size}"
                )
            named = sorted(n for s in layer.sections for n in s.components)
            if named != needed:
                raise bad(f"layer {i} stores {named}, expected {needed} once each")
            for s in layer.sections:
                if not all(type(v) is int for v in (s.offset, s.bundle_bytes)):
                    raise bad(f"layer {i}: offsets and sizes must be integers")
                if not s.components:
                    raise bad(f"layer {i}: a section holds no component")
                if s.bundle_bytes != sum(c.nbytes for c in self.section_components(s)):
                    raise bad(f"layer {i}: bundle size disagrees with its components")
                if s.offset % ALIGN or s.offset < end:
                    raise bad(f"layer {i}: section offset {s.offset} is misplaced")
                end = s.offset + layer.neurons * s.bundle_bytes
        if self.file_bytes % ALIGN:
            raise bad(f"file_bytes {self.file_bytes} is not a multiple of {ALIGN}")
        if end > self.file_bytes:
            raise FlashError(
                "the manifest points past the end of the bundles file", path, _RECONVERT
            )

    def section_components(self, section: Section) -> List[Component]:
        return [self.components[name] for name in section.components]

    def layout_digest(self) -> bytes:
        """SHA-256 of the byte layout (not the checksums): ties the bundles file to us."""
        layout = [
            [l.neurons, [[s.components, s.offset, s.bundle_bytes] for s in l.sections]]
            for l in self.layers
        ]
        comps = {
            k: [c.length, asdict(c.encoding)]
            for k, c in sorted(self.components.items())
        }
        blob = json.dumps([layout, comps, self.file_bytes], sort_keys=True).encode()
        return hashlib.sha256(blob).digest()


_RECONVERT = "convert the model again with `python -m mlx_flash.convert`"
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
    "components": dict,
    "layers": list,
}
_OPTIONAL = {"file_bytes": int, "out_bias": bool, "source": dict}
_SECTION_KEYS = {"components", "offset", "bundle_bytes", "sha256"}


def _positive_int(v) -> bool:
    return type(v) is int and v > 0


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
    for name, c in d["components"].items():
        if not isinstance(c, dict) or set(c) != {"length", "encoding"}:
            return f"component {name!r} must have exactly a length and an encoding"
        if not isinstance(c["encoding"], dict):
            return f"component {name!r}: the encoding must be an object"
    for i, layer in enumerate(d["layers"]):
        if not isinstance(layer, dict) or set(layer) != {"neurons", "sections"}:
            return f"layer {i} must have exactly neurons and sections"
        if not isinstance(layer["sections"], list) or not layer["sections"]:
            return f"layer {i}: sections must be a non-empty list"
        for s in layer["sections"]:
            if not isinstance(s, dict) or not set(s) <= _SECTION_KEYS:
                return f"layer {i}: a section has keys other than {_SECTION_KEYS}"
            if not {"components", "offset", "bundle_bytes"} <= set(s):
                return f"layer {i}: a section lacks components, offset or bundle_bytes"
            comps = s["components"]
            if not isinstance(comps, list) or not all(
                isinstance(c, str) for c in comps
            ):
                return f"layer {i}: section components must be a list of names"
            if not isinstance(s.get("sha256", ""), str):
                return f"layer {i}: sha256 must be a string"
    return ""


def pack_header(manifest: Manifest) -> bytes:
    head = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
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
    if version != FORMAT_VERSION:
        raise FlashError(
            f"bundles format version {version}, expected {FORMAT_VERSION}",
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

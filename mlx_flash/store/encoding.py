"""How one component of a bundle is stored: encodings, their bytes, and where the values
came from (docs/FORMAT.md §4).

An encoding is a float dtype, MLX affine quantization (1-8 bits, groups of 32/64/128,
scales and biases in a float dtype) or one of MLX's float quantization modes (mxfp4,
mxfp8: groups of 32; nvfp4: groups of 16; uint8 scales, no biases): every layout MLX's
`quantized_matmul` computes with, so a source quantized in any of them is kept bit for
bit.
"""

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple, Union

import mlx.core as mx
import numpy as np

from ..errors import FlashError
from ..parallel import quantized_matmul

FLOAT_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in FLOAT_DTYPES.items()}
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
FLOAT_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}  # bits, group
MODES = ("float", "affine") + tuple(FLOAT_MODES)
# what `convert --ffn-format/--down-format` accept: the source's own, a float dtype,
# MLX affine quantization at these bits, or MLX's float quantization modes
FFN_FORMATS = (
    ("auto",)
    + tuple(FLOAT_DTYPES)
    + tuple(f"q{b}" for b in AFFINE_BITS)
    + tuple(FLOAT_MODES)
)

# float, (packed, scales, biases) affine, or (packed, scales) for the float modes
Weight = Union[mx.array, Tuple[mx.array, ...]]


FLOAT_KINDS = frozenset(
    ("F64", "F32", "F16", "BF16", "float64", "float32", "float16", "bfloat16")
)


class Origin(NamedTuple):
    """Where one tensor's values came from, and whether they are the source's own.

    `kind` is the source's type ("Q5_0", "Q6_K", "F16", "bfloat16", "affine q4 g64",
    "mxfp4 g32"); `exact` is True when the stored values equal the source's bit for
    bit; `note` names the lossy step when they do not, and `error` is its measured
    largest |Δw| (None when not measured).
    """

    kind: str
    exact: bool = True
    note: str = ""
    error: Optional[float] = None

    @property
    def floats(self) -> bool:
        """Whether the source stored this tensor as floats (F16, bfloat16, ...),
        not as a quantized type read back as floats."""
        return self.kind in FLOAT_KINDS


@dataclass(frozen=True)
class Encoding:
    """How one component's values are stored.

    ``mode`` ``float``: `length` values in `dtype`. ``affine``: ``[packed uint32 words |
    scales | biases]``, scales and biases in `dtype`, one pair per `group_size` values,
    as `mx.quantize` makes them. ``mxfp4``/``mxfp8``/``nvfp4``: ``[packed | scales]``
    with uint8 scales (`dtype` is ``uint8``).
    """

    dtype: str = "float16"
    bits: int = 0
    group_size: int = 0
    mode: str = ""  # "" is derived: float without bits, affine with them

    def __post_init__(self):
        if self.mode == "":
            object.__setattr__(self, "mode", "affine" if self.bits else "float")
        why = self._invalid()
        if why:
            raise FlashError(
                f"unsupported encoding: {why}",
                fix="pass --ffn-format/--down-format float16, bfloat16, float32, "
                "q1-q6 or q8 (with --group-size 32, 64 or 128), mxfp4, mxfp8 or nvfp4",
            )

    def _invalid(self) -> str:
        if not all(type(v) is int for v in (self.bits, self.group_size)):
            return "bits and group_size must be integers"
        if self.mode not in MODES:
            return f"mode {self.mode!r}"
        if self.mode == "float":
            if self.dtype not in FLOAT_DTYPES or self.bits or self.group_size:
                return f"float {self.dtype!r} with {self.bits} bits"
        elif self.mode == "affine":
            if self.dtype not in FLOAT_DTYPES:
                return f"affine scales of dtype {self.dtype!r}"
            if self.bits not in AFFINE_BITS or self.group_size not in AFFINE_GROUPS:
                return f"{self.bits} bits, group size {self.group_size}"
        elif (self.bits, self.group_size) != FLOAT_MODES[self.mode] or (
            self.dtype != "uint8"
        ):
            return (
                f"{self.mode} with {self.bits} bits, group size {self.group_size}, "
                f"{self.dtype} scales"
            )
        return ""

    @property
    def quantized(self) -> bool:
        return self.mode != "float"

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"

    @property
    def itemsize(self) -> int:
        """Bytes of one float value (float) or one scale (quantized)."""
        return 1 if self.dtype == "uint8" else FLOAT_DTYPES[self.dtype].size

    def parts(self, length: int) -> List[Tuple[str, int]]:
        """Byte size of each part of one row of `length` values."""
        if not self.quantized:
            return [("values", length * self.itemsize)]
        if length % self.group_size or length * self.bits % 32:
            raise FlashError(
                f"a row of {length} values does not split into groups of "
                f"{self.group_size} (and {self.bits}-bit words)",
                fix=f"pass a --group-size (32, 64 or 128) that divides {length}, or a "
                "float --ffn-format/--down-format",
            )
        groups = length // self.group_size * self.itemsize
        parts = [("packed", length * self.bits // 8), ("scales", groups)]
        return parts + [("biases", groups)] if self.has_biases else parts

    def nbytes(self, length: int) -> int:
        return sum(n for _, n in self.parts(length))

    def describe(self) -> str:
        if self.mode == "affine":
            return f"affine q{self.bits} g{self.group_size} ({self.dtype} scales)"
        if self.quantized:
            return f"{self.mode} g{self.group_size}"
        return self.dtype

    @classmethod
    def parse(cls, text: str, group_size: Optional[int], scale_dtype: str = "float16"):
        """A `FFN_FORMATS` name (not ``auto``) -> Encoding; affine groups default to
        64."""
        if text in FLOAT_DTYPES:
            return cls(dtype=text)
        if text in FLOAT_MODES:
            bits, group = FLOAT_MODES[text]
            return cls("uint8", bits, group, text)
        if text in tuple(f"q{b}" for b in AFFINE_BITS):
            return cls(scale_dtype, int(text[1:]), group_size or 64, "affine")
        raise FlashError(
            f"unknown FFN format {text!r}",
            fix="pass --ffn-format/--down-format " + ", ".join(FFN_FORMATS),
        )

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "dtype": self.dtype,
            "bits": self.bits,
            "group_size": self.group_size,
        }


@dataclass(frozen=True)
class Component:
    """One part of a neuron's bundle: a weight row (`length` = hidden size) or a
    bias; with `part`, only that part of its encoding (a planar section's,
    docs/FORMAT.md §3: "packed", "scales", "biases" or a float's "values")."""

    name: str
    length: int
    encoding: Encoding
    origin: Origin = Origin("float32")
    part: Optional[str] = None

    @property
    def parts(self) -> List[Tuple[str, int]]:
        """(part, bytes per neuron) of what this component holds, in stored order."""
        every = self.encoding.parts(self.length)
        return every if self.part is None else [p for p in every if p[0] == self.part]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.parts)


def quant_params(w: Tuple[mx.array, ...], length: int) -> Encoding:
    """The encoding of an MLX-quantized tuple holding rows of `length` values (as
    mlx-lm infers it: uint8 scales mean a float mode, fixed by bits and group)."""
    packed, scales = w[0], w[1]
    bits, group_size = packed.shape[-1] * 32 // length, length // scales.shape[-1]
    if (
        packed.shape[-1] * 32 != bits * length
        or group_size * scales.shape[-1] != length
    ):
        raise FlashError(
            f"a quantized tensor {packed.shape} with scales {scales.shape} cannot hold "
            f"rows of {length} values",
            fix="is the checkpoint complete and its config right?",
        )
    if scales.dtype == mx.uint8:
        mode = next((m for m, p in FLOAT_MODES.items() if p == (bits, group_size)), "")
        if not mode or len(w) != 2:
            raise FlashError(
                f"uint8 scales with {bits} bits in groups of {group_size} is no MLX "
                "quantization mode",
                fix="convert from the float model",
            )
        return Encoding("uint8", bits, group_size, mode)
    if len(w) != 3:
        raise FlashError(
            "an affine-quantized tensor without biases",
            fix="is the checkpoint complete?",
        )
    return Encoding(DTYPE_NAMES.get(scales.dtype, "float32"), bits, group_size)


def dequantize(w: Weight, length: int) -> mx.array:
    if not isinstance(w, tuple):
        return w
    enc = quant_params(w, length)
    biases = w[2] if enc.has_biases else None
    return mx.dequantize(
        w[0], w[1], biases, group_size=enc.group_size, bits=enc.bits, mode=enc.mode
    )


def quantize(w: mx.array, enc: Encoding) -> Tuple[mx.array, ...]:
    """Float rows -> the parts of `enc` (scales and biases cast to its dtype)."""
    parts = mx.quantize(
        w.astype(mx.float32), group_size=enc.group_size, bits=enc.bits, mode=enc.mode
    )
    if not enc.has_biases:
        return tuple(parts[:2])
    packed, scales, biases = parts
    dtype = FLOAT_DTYPES[enc.dtype]
    return packed, scales.astype(dtype), biases.astype(dtype)


def encode(w: Weight, enc: Encoding, length: int) -> Tuple[Tuple[mx.array, ...], float]:
    """Rows (n, length) as `enc`'s parts, and the largest |Δw| that cost (0: exact).

    A quantized input in the same encoding is kept word for word (only its scales and
    biases cast); anything else is dequantized, then cast or quantized.
    """
    if isinstance(w, tuple):
        source = quant_params(w, length)
        if (source.mode, source.bits, source.group_size) == (
            enc.mode,
            enc.bits,
            enc.group_size,
        ):
            if not enc.has_biases:
                return tuple(w), 0.0
            dtype = FLOAT_DTYPES[enc.dtype]
            parts = (w[0], w[1].astype(dtype), w[2].astype(dtype))
            return parts, _error(dequantize(parts, length), dequantize(w, length))
        w = dequantize(w, length)
    parts = quantize(w, enc) if enc.quantized else (w.astype(FLOAT_DTYPES[enc.dtype]),)
    return parts, _error(dequantize(parts if enc.quantized else parts[0], length), w)


def _error(a: mx.array, b: mx.array) -> float:
    return mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item()


def to_bytes(parts: Tuple[mx.array, ...]) -> np.ndarray:
    """Encoded parts of n rows -> their stored bytes (n, nbytes) uint8, side by side."""
    n = parts[0].shape[0]
    mx.eval(parts)
    return np.concatenate([as_bytes(p).reshape(n, -1) for p in parts], axis=1)


def as_bytes(a: mx.array) -> np.ndarray:
    """An MLX array's raw bytes as uint8 (numpy has no bfloat16: its bits move)."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a, copy=False)).view(np.uint8)


def decode_rows(raw: np.ndarray, component: Component, dtype: mx.Dtype) -> Weight:
    """Stored bytes (n, nbytes) uint8 of a whole component -> its MLX weight, floats in
    `dtype` (the float modes' uint8 scales stay as they are)."""
    return assemble(component, decode_parts(raw, component), dtype)


def decode_parts(raw: np.ndarray, component: Component) -> Dict[str, mx.array]:
    """Stored bytes (n, nbytes) uint8 of `component` -> each part it holds as an
    (n, part bytes) uint8 MLX array of its own."""
    out, at = {}, 0
    for part, size in component.parts:
        # contiguous first: `mx.array` of a strided view copies (and keeps) the whole
        # buffer under it (measured: 7 MB held for a 2 MB part of a Qwen layer)
        out[part] = mx.array(np.ascontiguousarray(raw[:, at : at + size]))
        at += size
    return out


def assemble(
    component: Component, parts: Dict[str, mx.array], dtype: mx.Dtype
) -> Weight:
    """A component's parts as stored, (n, part bytes) uint8 each (copies or views of
    a buffer: `assemble` never copies them) -> its MLX weight: packed words as
    uint32, floats converted to `dtype`, a float mode's scales as they are."""
    enc = component.encoding
    stored = FLOAT_DTYPES.get(enc.dtype)

    def value(a: mx.array) -> mx.array:
        a = a.view(stored)
        return a if stored == dtype else a.astype(dtype)

    if not enc.quantized:
        return value(parts["values"])
    packed = parts["packed"].view(mx.uint32)
    if not enc.has_biases:
        return packed, parts["scales"]
    return packed, value(parts["scales"]), value(parts["biases"])


def matmul(x: mx.array, w: Weight, enc: Encoding, transpose: bool) -> mx.array:
    """`x @ w.T` (transpose) or `x @ w` for `w` stored as `enc` (decoded)."""
    if not enc.quantized:
        return x @ (w.T if transpose else w)
    biases = w[2] if enc.has_biases else None
    return quantized_matmul(
        x, w[0], w[1], biases, transpose, enc.group_size, enc.bits, enc.mode
    )

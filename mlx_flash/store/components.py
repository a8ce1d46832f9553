"""How each source tensor of the FFN becomes a stored component: the encoding chosen
for it, its bytes, and its origin (the source's type, and the lossy step taken, if any).

Pure functions of the source's weights and the converter's options; `writer` calls them
layer by layer.
"""

from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from ..errors import FlashError
from .archs import FFNArch
from .format import (
    AFFINE_BITS,
    DTYPE_NAMES,
    Component,
    Encoding,
    Origin,
    Weight,
    dequantize,
    encode,
    quant_params,
    to_bytes,
)
from .sources import Source


def encode_rows(w: Weight, enc: Encoding, length: int) -> Tuple[np.ndarray, float]:
    """Rows of a component as their stored bytes (n, nbytes) uint8, and the largest
    |Δw| the encoding cost (0.0: exact)."""
    parts, error = encode(w, enc, length)
    return to_bytes(parts), error


def encode_component(
    name: str,
    w: Weight,
    arch: FFNArch,
    hidden: int,
    n_ff: int,
    formats: Tuple[str, str, Optional[int]],
    source: Optional[Origin],
) -> Tuple[Component, np.ndarray]:
    """One component of one layer as stored: its Component and bytes (n_ff, B) uint8.

    `w` is the source's own weight: a row projection (n_ff, hidden), the output
    projection (hidden, n_ff), whose columns become rows (paper §3.2), or a bias.
    """
    ffn_format, down_format, group_size = formats
    # quantized in the source, even when read as floats (GGUF types with no MLX form)
    quantized = isinstance(w, tuple) or not _float_kind(source)
    relaid = name == arch.column and quantized
    if name.endswith(".bias"):
        length, enc, rows = 1, Encoding("float32"), w.reshape(-1, 1)
    elif name == arch.column:
        fmt = down_format
        if fmt == "auto" and not quantized:
            fmt = ffn_format  # a float source's columns follow the rows' format
        length, enc = hidden, column_encoding(w, n_ff, fmt, group_size, quantized)
        rows = dequantize(w, n_ff).T  # a quantized source is re-laid per neuron
    else:
        length, rows = hidden, w
        enc = row_encoding(w, hidden, ffn_format, group_size)
    enc.parts(length)  # a group size that does not divide the rows: a FlashError
    data, error = encode_rows(rows, enc, length)
    source = source or Origin(describe(w, n_ff if name == arch.column else length))
    relaid = "per neuron" if relaid else None
    return Component(name, length, enc, stored_origin(source, enc, error, relaid)), data


def row_encoding(
    w: Weight, length: int, fmt: str, group_size: Optional[int]
) -> Encoding:
    """A row projection's encoding: ``auto`` keeps the source's, bit for bit."""
    source = quant_params(w, length) if isinstance(w, tuple) else None
    if fmt != "auto":
        return Encoding.parse(fmt, group_size or (source and source.group_size))
    if source is not None:
        return source
    if w.dtype not in DTYPE_NAMES:
        raise FlashError(
            f"unsupported weight dtype {w.dtype}",
            fix="use float16, bfloat16 or float32 weights",
        )
    return Encoding(DTYPE_NAMES[w.dtype])


# A quantized source's down re-quantized per neuron at this width by default. Measured
# (benchmarks/drift.py, Qwen2.5-Coder-0.5B Q4_K_M, rows q4 g32, 2,048 WikiText-2
# tokens): 8 bits 62.259, 6 bits 62.287 (+0.05%), 5 bits 62.651 (+0.6%); a neuron's
# down takes 1,344 bytes at 6 bits against 1,728 at 8 on the 1.5B (hidden 1,536)
DOWN_BITS = 6


def column_encoding(
    w: Weight, n_ff: int, fmt: str, group_size: Optional[int], quantized: bool
) -> Encoding:
    """The output projection's encoding. A quantized source's groups run along the
    neuron axis, so its columns cannot be kept: ``auto`` stores them per neuron as
    affine `DOWN_BITS`-bit with float16 scales in the source's group size (32 where
    it had none MLX takes: a named lossy step; ``float32`` keeps them exact)."""
    if not quantized:
        return row_encoding(w, n_ff, fmt, group_size)
    source = quant_params(w, n_ff).group_size if isinstance(w, tuple) else 32
    group = source if source in (64, 128) else 32
    if fmt == "auto":
        return Encoding("float16", DOWN_BITS, group_size or group)
    return Encoding.parse(fmt, group_size or group)


def column_bits(rows: Encoding) -> Encoding:
    """The columns' default encoding: the rows' float dtype, or for quantized rows
    affine with one bit more (8 past 6) and the rows' group size and scales. Measured
    on Qwen2.5-Coder-0.5B (q4 g32 rows, 2,048 WikiText-2 tokens, dense 59.43):
    every channel's columns at q4 give 61.87 (+4.1%), at q5 57.00, at q8 56.42 (the
    rows are themselves a re-quantization of the file's Q5_0); q5 reads 1.2x the
    rows' bytes, q8 1.8x."""
    if not rows.quantized:
        return rows
    bits = next((b for b in AFFINE_BITS if b > rows.bits), 8)
    dtype = rows.dtype if rows.mode == "affine" else "float16"
    return Encoding(dtype, bits, rows.group_size)


def _float_kind(origin: Optional[Origin]) -> bool:
    """Whether a source tensor was stored as floats (F16, bfloat16, ...), not as a
    quantized type read back as floats."""
    return origin is None or origin.floats


def stored_origin(
    source: Origin, enc: Encoding, error: float, relaid: Optional[str] = None
) -> Origin:
    """A stored component's origin: the source's, plus this store's own step when it
    changed a value (`error` > 0); `relaid` ("per neuron", "per input channel"): the
    source was dequantized and transposed to be stored that way."""
    steps = [source.note] if source.note else []
    if relaid:
        steps.append(f"dequantized, transposed, stored {relaid} as {enc.describe()}")
    elif error > 0:
        steps.append(f"stored as {enc.describe()}")
    exact = source.exact and error == 0
    return Origin(
        source.kind,
        exact,
        "; ".join(steps) if not exact else source.note,
        error if error > 0 else source.error,
    )


def describe(w: Weight, length: int) -> str:
    """A source tensor's type, in the words of `Origin.kind`."""
    if isinstance(w, tuple):
        return quant_params(w, length).describe()
    return DTYPE_NAMES.get(w.dtype, str(w.dtype).removeprefix("mlx.core."))


def dense_origins(src: Source, dense: Dict[str, mx.array]) -> Dict[str, Origin]:
    """The origin of every dense tensor (by base name), the source's where it has
    one."""
    q = src.config.get("quantization") or {}
    out = {}
    for base in sorted({k.rsplit(".", 1)[0] for k in dense}):
        if base in src.origins:
            out[base] = src.origins[base]
        elif base + ".scales" in dense:
            params = q.get(base) if isinstance(q.get(base), dict) else q
            mode = params.get("mode", "affine")
            bits = params.get("bits", 4)
            out[base] = Origin(f"{mode} q{bits} g{params.get('group_size', 64)}")
        else:
            t = dense.get(base + ".weight", dense.get(base + ".bias"))
            out[base] = Origin(describe(t, 1) if t is not None else "float")
    return out


def channel_columns(
    weights: Dict[str, Weight],
    arch: FFNArch,
    src: Source,
    i: int,
    formats: Tuple[str, str, Optional[int], str],
    hidden: int,
) -> Tuple[Dict[str, Component], np.ndarray]:
    """Layer `i`'s row projections bundled by input channel (docs/FORMAT.md §7.1):
    their components (``length`` = neurons) and bytes (hidden, B) uint8, channel
    `c`'s bundle holding column `c` of each row projection in `arch.rows` order.

    A quantized source's groups run along the input axis, so its columns are
    re-quantized along the neuron axis (a named lossy step); a float source's are
    transposed exactly. ``auto``: `column_bits` of the rows' encoding."""
    ffn_format, _, group_size, fmt = formats
    components, blocks = {}, []
    for name in arch.rows:
        w = weights[name]
        n_ff = (w[0] if isinstance(w, tuple) else w).shape[0]
        rows = row_encoding(w, hidden, ffn_format, group_size)
        if fmt == "auto":
            enc = column_bits(rows)
        else:
            enc = Encoding.parse(fmt, group_size or rows.group_size or None)
        if enc.quantized and n_ff % enc.group_size:
            enc = Encoding(enc.dtype, enc.bits, 32, enc.mode)
        enc.parts(n_ff)  # a group size that does not divide the columns: FlashError
        columns = dequantize(w, hidden).T  # (hidden, n_ff)
        data, error = encode_rows(columns, enc, n_ff)
        quantized = isinstance(w, tuple) or enc.quantized
        origin = src.origins.get(arch.name(i, name)) or Origin(describe(w, hidden))
        relaid = "per input channel" if quantized and error > 0 else None
        stored = stored_origin(origin, enc, error, relaid)
        components[name] = Component(name, n_ff, enc, stored)
        blocks.append(data)
    return components, np.concatenate(blocks, axis=1)

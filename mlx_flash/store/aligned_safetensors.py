"""The dense part as a safetensors file whose large tensors start 4 KiB-aligned.

Any tensor may later be streamed with direct I/O like the bundles (the planner reads
attention and LM-head rows from here), so every tensor of at least one block starts on
a 4096-byte boundary of the file. The safetensors format allows no holes, so the gaps
are filled by uint8 tensors named `PAD_PREFIX` + n, which every reader of a store
drops (`without_pads`); the header is padded with spaces, as the format allows.
"""

import json
import struct
from pathlib import Path
from typing import Dict

import mlx.core as mx

from .encoding import as_bytes
from .manifest import ALIGN, align_up

PAD_PREFIX = "__flash_pad__."
_DTYPES = {
    mx.float32: "F32",
    mx.float16: "F16",
    mx.bfloat16: "BF16",
    mx.uint32: "U32",
    mx.uint16: "U16",
    mx.uint8: "U8",
    mx.int32: "I32",
    mx.int16: "I16",
    mx.int8: "I8",
    mx.int64: "I64",
    mx.uint64: "U64",
    mx.bool_: "BOOL",
}
# a safetensors dtype name -> the MLX dtype its bytes are read as
MLX_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def without_pads(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    return {k: v for k, v in weights.items() if not k.startswith(PAD_PREFIX)}


def write_aligned(path: Path, weights: Dict[str, mx.array], metadata: dict) -> None:
    """Write `weights` (tensors >= 4 KiB aligned; largest first, then the small ones
    packed together) as one safetensors file."""
    order = sorted(weights, key=lambda k: (weights[k].nbytes < ALIGN, k))
    header, layout, at, pads = {"__metadata__": metadata}, [], 0, 0
    for name in order:
        a = weights[name]
        if a.dtype not in _DTYPES:
            raise ValueError(f"{name}: no safetensors dtype for {a.dtype}")
        if a.nbytes >= ALIGN and at % ALIGN:
            gap = align_up(at) - at
            pad = f"{PAD_PREFIX}{pads}"
            header[pad] = {
                "dtype": "U8",
                "shape": [gap],
                "data_offsets": [at, at + gap],
            }
            layout.append((pad, gap))
            at, pads = at + gap, pads + 1
        header[name] = {
            "dtype": _DTYPES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [at, at + a.nbytes],
        }
        layout.append((name, a.nbytes))
        at += a.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text = text.ljust(align_up(8 + len(text)) - 8, b" ")  # data starts 4 KiB-aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, nbytes in layout:
            if name.startswith(PAD_PREFIX) and name not in weights:
                f.write(bytes(nbytes))
            else:
                mx.eval(weights[name])
                f.write(as_bytes(weights[name]).tobytes())

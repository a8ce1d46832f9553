"""The bundle store's on-disk format, versions 2 and 3 (specified in docs/FORMAT.md;
3 adds planar sections, one part of one component each).

A store is a directory: `config.json`, tokenizer files, `model.safetensors` (the dense
part, large tensors 4 KiB-aligned), `ffn.bundles` (a header, every layer's FFN neurons
as row-column bundles, paper §3.2, then typed extensions such as the block checksums)
and `flash_config.json` (the manifest). The format lives in three modules, gathered
here for their readers: `encoding` (how a component's values are stored and where they
came from), `manifest` (the manifest and the header) and `checksums`.
"""

from dataclasses import replace
from typing import Dict, List

import mlx.core as mx
import numpy as np

from .encoding import (  # noqa: F401
    AFFINE_BITS,
    DTYPE_NAMES,
    FFN_FORMATS,
    FLOAT_DTYPES,
    FLOAT_MODES,
    Component,
    Encoding,
    Origin,
    Weight,
    assemble,
    decode_parts,
    decode_rows,
    dequantize,
    encode,
    matmul,
    quant_params,
    to_bytes,
)
from .manifest import (  # noqa: F401
    ACTIVATIONS,
    ALIGN,
    BUNDLES_NAME,
    COLUMNS,
    DENSE_NAME,
    FORMAT_VERSION,
    READ_VERSIONS,
    HEADER_BYTES,
    HEADER_FIELDS,
    MAGIC,
    MANIFEST_MAGIC,
    MANIFEST_NAME,
    Extension,
    LayerEntry,
    Manifest,
    Section,
    align_up,
    check_columns_header,
    layer_dict,
    check_header,
    pack_columns_header,
    pack_header,
)


def decode_bundles(
    rows: np.ndarray, components: List[Component], dtype: mx.Dtype
) -> Dict[str, Weight]:
    """Bundles (n, bytes) uint8 holding `components` in order -> name -> MLX weight
    (a planar layer's parts, side by side in section order, come together)."""
    parts = gather_parts(rows, components, {})
    whole = {c.name: replace(c, part=None) for c in components}
    return {name: assemble(whole[name], p, dtype) for name, p in parts.items()}


def gather_parts(rows: np.ndarray, components: List[Component], into: dict) -> dict:
    """The parts of each component in bundles (n, bytes) uint8, copied into
    ``into[name][part]``; returns `into`."""
    at = 0
    for c in components:
        into.setdefault(c.name, {}).update(decode_parts(rows[:, at : at + c.nbytes], c))
        at += c.nbytes
    return into

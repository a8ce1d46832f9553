"""The bundle store's on-disk format, version 2 (specified in docs/FORMAT.md).

A store is a directory: `config.json`, tokenizer files, `model.safetensors` (the dense
part, large tensors 4 KiB-aligned), `ffn.bundles` (a header, every layer's FFN neurons
as row-column bundles, paper §3.2, then typed extensions such as the block checksums)
and `flash_config.json` (the manifest). The format lives in three modules, gathered
here for their readers: `encoding` (how a component's values are stored and where they
came from), `manifest` (the manifest and the header) and `checksums`.
"""

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


def bundle_offsets(components: List[Component]) -> Dict[str, tuple]:
    """Byte (offset, size) of each component inside one bundle, in order."""
    offsets, at = {}, 0
    for c in components:
        offsets[c.name] = (at, c.nbytes)
        at += c.nbytes
    return offsets


def decode_bundles(
    rows: np.ndarray, components: List[Component], dtype: mx.Dtype
) -> Dict[str, Weight]:
    """Bundles (n, bytes) uint8 holding `components` in order -> name -> MLX weight."""
    weights, at = {}, 0
    for c in components:
        weights[c.name] = decode_rows(rows[:, at : at + c.nbytes], c, dtype)
        at += c.nbytes
    return weights

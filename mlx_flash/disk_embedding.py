"""Token embeddings read from the store per token instead of held in DRAM.

A model whose LM head is a matrix of its own (``tie_word_embeddings: false``) uses its
embedding table only to look up the tokens it is given: one row per token. For
Qwen2.5-Coder-1.5B that table is 151,936 x 1,536 (139 MiB at 4 bits, a quarter of its
dense part); read from the dense file per token it costs three reads of a few KiB (the
row's packed weights, scales and biases) and no DRAM. The DRAM planner decides: an
untied table saves little per token when held, so it stays here unless everything else
fits. A tied table is also the LM head, read whole every token: the planner holds it
when it can, and when it cannot, `head` streams it in vocabulary chunks (`as_linear`).
"""

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import FlashError, ReadError
from .store.aligned_safetensors import MLX_DTYPES
from .store.encoding import dequantize, quant_params
from .store.safety import check_safetensors
from .streamed import NUMPY, TensorAt, to_array

PREFIX = "model.embed_tokens."
TABLE_DTYPES = ("U32", "U8", "F32", "F16", "BF16")  # packed words, scales, floats


@dataclass(frozen=True)
class Rows:
    """One tensor of the table in the file: where its rows start and their size."""

    offset: int
    row_bytes: int
    dtype: str
    width: int


class DiskEmbedding(nn.Module):
    """`nn.Embedding` / `nn.QuantizedEmbedding` whose rows stay in `path`."""

    def __init__(
        self, path: Path, tensors: Dict[str, Rows], encoding=None, checker=None
    ):
        super().__init__()
        self._path, self._tensors = Path(path), tensors
        self._checker = checker  # each row's blocks checked when first read
        self._encoding = encoding  # None: a float table
        self._fd = os.open(self._path, os.O_RDONLY)
        self.compute_dtype: Optional[mx.Dtype] = None  # set by `load`
        self.bytes_read = 0
        self._decoding = False
        self.stats = None  # the model's FlashStats: decoding's row reads count there
        self.head = None  # a tied table's StreamedHead (`as_linear`), set by the plan

    def as_linear(self, x: mx.array) -> mx.array:
        if self.head is None:
            raise FlashError("this table is no LM head", self._path)
        return self.head(x)

    def __del__(self):
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def _rows(self, name: str, ids: np.ndarray) -> mx.array:
        t = self._tensors[name]
        starts = [t.offset + int(i) * t.row_bytes for i in ids]
        for i, start in zip(ids, starts) if self._checker is not None else ():
            try:
                self._checker.check_file(self._fd, start, start + t.row_bytes)
            except ReadError as e:
                raise e.within(f"the token table's {name}, row {int(i)}") from None
        raw = b"".join(os.pread(self._fd, t.row_bytes, start) for start in starts)
        if len(raw) != t.row_bytes * len(ids):
            raise FlashError("the embedding table is cut short", self._path)
        self.bytes_read += len(raw)
        if self.stats is not None and self._decoding:
            self.stats.bytes += len(raw)
        return to_array(raw, TensorAt(name, t.dtype, (len(ids), t.width), 0), None)

    def __call__(self, ids: mx.array) -> mx.array:
        flat = np.array(ids).reshape(-1)  # the token ids, on the host
        self._decoding = flat.size == 1
        unique, inverse = np.unique(flat, return_inverse=True)
        weight = self._rows("weight", unique)
        if self._encoding is not None:
            parts = [weight] + [
                self._rows(p, unique)
                for p in ("scales", "biases")
                if p in self._tensors
            ]
            if self._encoding.has_biases:  # as mlx-lm's table after set_dtype: the
                # scales in the compute dtype before dequantizing, not after
                dtype = self.compute_dtype or mx.float32
                parts = [parts[0]] + [p.astype(dtype) for p in parts[1:]]
            rows = dequantize(
                tuple(parts), self._encoding.group_size * parts[1].shape[-1]
            )
        else:
            rows = weight
        if self.compute_dtype is not None:
            rows = rows.astype(self.compute_dtype)
        return rows[mx.array(inverse)].reshape(*ids.shape, -1)


def table_on_disk(
    path: Path, vocab: int, dims: int, prefix: str = PREFIX, checker=None
) -> Optional[DiskEmbedding]:
    """A DiskEmbedding of the dense file's token table (None: the file has none);
    `checker` checks each row's blocks the first time they are read."""
    header = check_safetensors(path)
    if prefix + "weight" not in header:
        return None
    tensors = {}
    for part in ("weight", "scales", "biases"):
        if prefix + part not in header:
            continue
        dtype, shape, offset = header[prefix + part]
        if len(shape) != 2 or shape[0] != vocab or dtype not in TABLE_DTYPES:
            raise FlashError(
                f"{prefix + part} is {dtype} {shape}, expected {vocab} rows",
                path,
                "convert the model again",
            )
        itemsize = np.dtype(NUMPY[dtype]).itemsize
        tensors[part] = Rows(offset, shape[1] * itemsize, dtype, shape[1])
    if "biases" in tensors and "scales" not in tensors:
        raise FlashError("the embedding has biases but no scales", path)
    encoding = None
    if "scales" in tensors:  # affine, or a float mode (uint8 scales, no biases)
        shapes = [
            (1, tensors[p].width)
            for p in ("weight", "scales", "biases")
            if p in tensors
        ]
        probe = tuple(
            mx.zeros(s, MLX_DTYPES[tensors[p].dtype])
            for s, p in zip(shapes, ("weight", "scales", "biases"))
        )
        encoding = quant_params(probe, dims)
    return DiskEmbedding(path, tensors, encoding, checker)

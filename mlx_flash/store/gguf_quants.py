"""GGUF quantized blocks -> MLX affine codes, scales and biases, bit for bit; the
other types -> the `gguf` package's float dequantization, rounded to a float dtype.

Pure numpy: each function takes raw blocks and returns arrays.
"""

from typing import Tuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

Q = GGMLQuantizationType


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def unpack_legacy(blocks: np.ndarray, qtype: GGMLQuantizationType):
    """Split Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks into codes, scales and biases, exactly.

    A block of 32 values is ``d * q + m`` (``m = -d * 2**(bits-1)`` where the type
    stores no minimum): MLX's affine ``scale * q + bias``.

    Args:
        blocks: ``(rows, n_blocks, block_bytes)`` uint8.
        qtype: the block type.

    Returns:
        ``codes`` ``(rows, n_blocks * 32)`` uint8, ``scales`` and ``biases``
        ``(rows, n_blocks)`` float32.
    """
    rows = blocks.shape[0]
    d = _f16(blocks[..., 0:2])
    if qtype == Q.Q8_0:
        codes = blocks[..., 2:] ^ np.uint8(0x80)  # int8 q + 128 as uint8
        return codes.reshape(rows, -1), d, -128 * d
    has_min = qtype in (Q.Q4_1, Q.Q5_1)
    five = qtype in (Q.Q5_0, Q.Q5_1)
    start = 4 if has_min else 2
    qs = blocks[..., start + 4 * five :]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # values j and j + 16
    if five:  # bit i of the 32-bit qh is bit 4 of value i
        qh = np.unpackbits(blocks[..., start : start + 4], axis=-1, bitorder="little")
        codes |= qh << 4
    biases = _f16(blocks[..., 2:4]) if has_min else -(16 if five else 8) * d
    return codes.reshape(rows, -1), d, biases


def _k_scales(blocks: np.ndarray):
    """Q4_K/Q5_K super-block header -> per-group scales ``d * sc`` and biases
    ``-dmin * m`` (float32; each product of an f16 and a 6-bit integer is exact)."""
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    lo, mid, hi = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    sc = np.concatenate([lo & 63, (hi & 15) | (lo >> 6 << 4)], -1)  # (rows, n, 8)
    m = np.concatenate([mid & 63, (hi >> 4) | (mid >> 6 << 4)], -1)
    rows = blocks.shape[0]
    scales, biases = d[..., None] * sc, -dmin[..., None] * m
    return scales.reshape(rows, -1), biases.reshape(rows, -1)


def _low_nibbles(qs: np.ndarray) -> np.ndarray:
    """``qs`` (rows, n, 128): each 32-byte chunk holds two groups, the low nibbles
    the first, the high nibbles the second -> (rows, n, 8, 32)."""
    chunks = qs.reshape(*qs.shape[:2], 4, 1, 32)
    return np.concatenate([chunks & 0xF, chunks >> 4], axis=-2).reshape(
        *qs.shape[:2], 8, 32
    )


def unpack_q4_k(blocks: np.ndarray):
    """Split Q4_K super-blocks into codes, scales and biases, exactly.

    A 256-value super-block (f16 ``d`` and ``dmin``, 12 bytes of 6-bit scales and
    mins, 128 bytes of 4-bit codes) holds eight groups of 32:
    value = d * sc * q - dmin * m.

    Args:
        blocks: ``(rows, n_blocks, 144)`` uint8.

    Returns:
        ``codes`` ``(rows, n_blocks * 256)`` uint8, ``scales`` and ``biases``
        ``(rows, n_blocks * 8)`` float32.
    """
    codes = _low_nibbles(blocks[..., 16:])
    return (codes.reshape(blocks.shape[0], -1), *_k_scales(blocks))


def unpack_q5_k(blocks: np.ndarray):
    """Split Q5_K super-blocks into codes, scales and biases, exactly.

    As Q4_K, with a fifth bit per value: the 32 bytes of ``qh`` before the 128 bytes
    of ``qs``, bit ``j`` of byte ``i`` being bit 4 of value ``i`` of group ``j``.

    Args:
        blocks: ``(rows, n_blocks, 176)`` uint8.

    Returns:
        ``codes`` ``(rows, n_blocks * 256)`` uint8 (each below 32), ``scales`` and
        ``biases`` ``(rows, n_blocks * 8)`` float32.
    """
    qh = blocks[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]
    codes = _low_nibbles(blocks[..., 48:]) | (qh & 1) << 4  # (rows, n, 8, 32)
    return (codes.reshape(blocks.shape[0], -1), *_k_scales(blocks))


EXACT_BITS = {Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5, Q.Q8_0: 8, Q.Q4_K: 4}
EXACT_BITS[Q.Q5_K] = 5
"""The GGUF types that map exactly onto MLX affine quantization at group size 32."""


def unpack(blocks: np.ndarray, qtype: GGMLQuantizationType):
    """Codes, scales and biases (float32) of blocks of any type in `EXACT_BITS`.

    Args:
        blocks: ``(rows, n_blocks, block_bytes)`` uint8.
        qtype: the block type.

    Returns:
        ``codes`` ``(rows, cols)`` uint8, ``scales`` and ``biases``
        ``(rows, cols // 32)`` float32, with ``scales * codes + biases`` equal to
        ``gguf.quants.dequantize`` bit for bit.
    """
    if qtype == Q.Q4_K:
        return unpack_q4_k(blocks)
    if qtype == Q.Q5_K:
        return unpack_q5_k(blocks)
    return unpack_legacy(blocks, qtype)


def affine_dtype(scales: np.ndarray, biases: np.ndarray) -> type:
    """``np.float16`` if every scale and bias is exactly a (finite) float16, else
    ``np.float32``: storing them so keeps the mapping bit for bit."""
    for a in (scales, biases):
        with np.errstate(over="ignore"):
            if not np.array_equal(a.astype(np.float16).astype(np.float32), a):
                return np.float32
    return np.float16


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-wide codes into MLX's uint32 words (a little-endian bit stream).

    Args:
        codes: ``(rows, cols)`` uint8, each below ``2**bits``; ``cols % 32 == 0``.
        bits: the code width.

    Returns:
        ``(rows, cols * bits // 32)`` uint32.
    """
    if bits == 8:
        return np.ascontiguousarray(codes).view(np.uint32)
    if bits == 4:
        return (codes[:, 0::2] | (codes[:, 1::2] << 4)).view(np.uint32)
    eights = codes.reshape(len(codes), -1, 8)
    words = np.zeros(eights.shape[:2], np.uint64)  # 8 codes fill `bits` bytes
    for i in range(8):
        words |= eights[..., i].astype(np.uint64) << np.uint64(i * bits)
    packed = words[..., None].view(np.uint8)[..., :bits]
    return np.ascontiguousarray(packed).reshape(len(codes), -1).view(np.uint32)


FLOAT_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
"""The dtypes a tensor of a type outside `EXACT_BITS` may be stored in (bfloat16 as its
uint16 bits: numpy has no bfloat16)."""


def dequantize_rows(
    rows: np.ndarray, qtype: GGMLQuantizationType, float_dtype: str, chunk: int = 4096
) -> Tuple[np.ndarray, bool]:
    """Dequantize rows with the `gguf` package, rounded to `float_dtype`.

    Float32 gives ``gguf.quants.dequantize`` bit for bit; float16 rounds to nearest
    even as numpy does, bfloat16 as ggml does (``gguf.quants``' BF16). Rows go
    `chunk` at a time, so the float32 values of a whole tensor never exist at once.

    Args:
        rows: ``(n, row_bytes)`` uint8.
        qtype: the block type.
        float_dtype: a key of `FLOAT_DTYPES`.
        chunk: rows per step.

    Returns:
        The ``(n, cols)`` values (bfloat16 as uint16 bits), and whether every one of
        them survived the rounding unchanged.
    """
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    out = np.empty(
        (len(rows), rows.shape[1] // block_bytes * block), FLOAT_DTYPES[float_dtype]
    )
    exact = True
    for at in range(0, len(rows), chunk):
        w = np.asarray(quants.dequantize(rows[at : at + chunk], qtype), np.float32)
        part = out[at : at + chunk]
        if float_dtype == "float32":
            part[...] = w
            continue
        if float_dtype == "bfloat16":
            part[...] = quants.quantize(w, Q.BF16).view(np.uint16)
            back = (part.astype(np.uint32) << 16).view(np.float32)
        else:
            part[...] = w
            back = part.astype(np.float32)
        exact = exact and np.array_equal(back, w, equal_nan=True)
    return out, exact

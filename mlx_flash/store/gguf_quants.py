"""GGUF quantized blocks -> MLX affine codes, scales and biases, bit for bit.

Pure numpy: each function takes raw blocks and returns what MLX's affine layout holds.
"""

import numpy as np
from gguf import GGMLQuantizationType

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


def unpack_q4_k(blocks: np.ndarray):
    """Split Q4_K super-blocks into codes, scales and biases, exactly.

    A 256-value super-block holds eight groups of 32: value = d * sc * q - dmin * m,
    with 6-bit ``sc`` and ``m`` per group. Each 32-byte chunk of ``qs`` holds two
    groups: the low nibbles the first, the high nibbles the second.

    Args:
        blocks: ``(rows, n_blocks, 144)`` uint8.

    Returns:
        ``codes`` ``(rows, n_blocks * 256)`` uint8, ``scales`` and ``biases``
        ``(rows, n_blocks * 8)`` float32.
    """
    rows = blocks.shape[0]
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    lo, mid, hi = blocks[..., 4:8], blocks[..., 8:12], blocks[..., 12:16]
    sc = np.concatenate([lo & 63, (hi & 15) | (lo >> 6 << 4)], -1)  # (rows, n, 8)
    m = np.concatenate([mid & 63, (hi >> 4) | (mid >> 6 << 4)], -1)
    qs = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 1, 32)
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-2)  # (rows, n, chunk, lo/hi, 32)
    scales, biases = d[..., None] * sc, -dmin[..., None] * m
    return codes.reshape(rows, -1), scales.reshape(rows, -1), biases.reshape(rows, -1)


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

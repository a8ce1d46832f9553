"""Quantized matrix products split across the CPU's cores.

MLX's CPU backend runs each op on its stream's one thread: a decode step's quantized
matrix-vector products use one core of the machine, where float32 products go to BLAS
and use them all (mlx-lm holding a float32 model is bandwidth-bound; the same model at
4 bits is bound by one core's unpacking, ~0.9 G weights/s on this 2-vCPU x86 machine
at any bit width). A product whose weight is large is cut into row blocks, one per
CPU stream, evaluated side by side and joined:

- ``x @ W.T`` (a linear layer, an LM head, a bundle's gate/up rows): the blocks are
  output rows, concatenated; each output is the same arithmetic as one product
  (exactly equal).
- ``x @ W`` (a bundle store's down rows, one per neuron): the blocks are rows of the
  contraction; their partial sums are added (equal to rounding).

One setting for the process, like MLX's own default device: `set_threads`, from the
`compute_threads` option at `load`. On a GPU nothing is split.
"""

import os
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

# Split a product only when each block keeps at least this many weights: a block's
# cross-stream wait costs ~0.05 ms (128 x 896 at 4 bits: 0.15 ms whole); measured on a
# 2-vCPU x86 machine, Qwen2.5-Coder-0.5B at 4 bits with everything resident:
# 518 ms/token on one core, 380 splitting products of >= 1M weights, 345 of >= 128k.
MIN_BLOCK = 1 << 16

# the CPU streams past the calling thread's default, each unique per thread (MLX's
# streams belong to the thread that made them: a server generates on its own thread)
_streams: List[mx.ThreadLocalStream] = []
_threads = 1


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity on Linux)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """Every core the process may use on the CPU backend; 1 on a GPU."""
    return available_cores() if mx.default_device() == mx.cpu else 1


def set_threads(n: Optional[int]) -> int:
    """Split large quantized products into `n` blocks (None: `default_threads()`);
    returns the number set."""
    global _threads
    _threads = max(1, n if n is not None else default_threads())
    while len(_streams) < _threads - 1:
        _streams.append(mx.new_thread_local_stream(mx.cpu))
    return _threads


def threads() -> int:
    return _threads


def blocks(rows: int, weights: int) -> int:
    """How many row blocks a product of `rows` rows and `weights` weights is cut into
    (1: not split)."""
    if _threads < 2 or mx.default_device() != mx.cpu:
        return 1
    return max(1, min(_threads, rows, weights // MIN_BLOCK))


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array],
    transpose: bool,
    group_size: int,
    bits: int,
    mode: str = "affine",
) -> mx.array:
    """`mx.quantized_matmul`, split into row blocks on the CPU streams when large."""
    rows = w.shape[0]
    k = blocks(rows, rows * w.shape[1] * 32 // bits)
    kw = dict(transpose=transpose, group_size=group_size, bits=bits, mode=mode)
    if k == 1:
        return mx.quantized_matmul(x, w, scales, biases, **kw)

    def block(a: int, b: int, stream) -> mx.array:
        cut = None if biases is None else biases[a:b]
        xb = x if transpose else x[..., a:b]
        return mx.quantized_matmul(xb, w[a:b], scales[a:b], cut, stream=stream, **kw)

    cuts = [rows * i // k for i in range(k + 1)]
    streams = [None] + _streams[: k - 1]  # the first block on the caller's stream
    parts = [block(a, b, s) for a, b, s in zip(cuts, cuts[1:], streams)]
    if transpose:  # output rows
        return mx.concatenate(parts, axis=-1)
    out = parts[0]  # contraction rows: partial sums
    for p in parts[1:]:
        out = out + p
    return out


def _product(m: nn.Module, x: mx.array) -> mx.array:
    """A quantized layer's `x @ W.T`, split."""
    return quantized_matmul(
        x, m["weight"], m["scales"], m.get("biases"), True, m.group_size, m.bits, m.mode
    )


class QuantizedLinear(nn.QuantizedLinear):
    """`nn.QuantizedLinear` whose product is split across the CPU's cores."""

    def __call__(self, x: mx.array) -> mx.array:
        y = _product(self, x)
        return y + self["bias"] if "bias" in self else y


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """`nn.QuantizedEmbedding` whose `as_linear` (a tied LM head) is split."""

    def as_linear(self, x: mx.array) -> mx.array:
        return _product(self, x)


PARALLEL = {
    nn.QuantizedLinear: QuantizedLinear,
    nn.QuantizedEmbedding: QuantizedEmbedding,
}


def parallel_modules(model: nn.Module) -> None:
    """Give the model's quantized linear and embedding layers the split product, in
    place (the same arrays and attributes, a subclass)."""
    for m in model.modules():
        cls = PARALLEL.get(type(m))
        if cls is not None:
            m.__class__ = cls  # a subclass adding no state: only the product changes

"""The module swapped into each layer in place of the FFN: its neurons come from the store.

This is the paper's "naive" configuration: every token reads every neuron of the layer.
"""

from typing import Dict

import mlx.core as mx
import mlx.nn as nn

from .store.format import Encoding, Weight
from .store.store import BundleStore

ACTIVATIONS = {
    "silu": nn.silu,
    "gelu": nn.gelu,
    "gelu_approx": nn.gelu_approx,
    "relu": nn.relu,
}


class OutBias(nn.Module):
    """The output projection's bias: one dense vector per layer, not part of any bundle."""

    def __init__(self, dims: int):
        super().__init__()
        self.bias = mx.zeros((dims,))


class FlashFFN(nn.Module):
    """A layer's FFN computed from neuron bundles read from a `BundleStore`.

    Args:
        store: the opened store.
        layer: this layer's index.

    Bundles are decoded to the dtype of the layer's input, the compute dtype.
    """

    def __init__(self, store: BundleStore, layer: int):
        super().__init__()
        m = store.manifest
        self._store, self._layer = store, layer
        self._rows, self._column = m.rows, m.column
        self._encodings = {n: c.encoding for n, c in m.components.items()}
        self._activation = ACTIVATIONS[m.activation]
        if m.out_bias:
            setattr(self, self._column, OutBias(m.hidden_size))

    def __call__(self, x: mx.array) -> mx.array:
        w = self._store.read_layer(self._layer, x.dtype)
        h = [self._project(x, w, name) for name in self._rows]  # each (B, L, n_ff)
        a = self._activation(h[0]) * h[1] if len(h) == 2 else self._activation(h[0])
        y = matmul(a, w[self._column], self._encodings[self._column], transpose=False)
        if self._column in self:
            y = y + self[self._column].bias
        # Evaluate now: the layer's decoded neurons are freed before the next layer
        # reads its own, so DRAM holds one layer's FFN at a time, never the model's.
        mx.eval(y)
        return y  # (B, L, D)

    def _project(self, x: mx.array, w: Dict[str, Weight], name: str) -> mx.array:
        h = matmul(x, w[name], self._encodings[name], transpose=True)
        bias = w.get(name + ".bias")
        return h if bias is None else h + bias.reshape(-1)


def matmul(x: mx.array, w: Weight, enc: Encoding, transpose: bool) -> mx.array:
    """`x @ w.T` (transpose) or `x @ w` for a float or affine-quantized `w`."""
    if enc.quantized:
        packed, scales, biases = w
        return mx.quantized_matmul(
            x,
            packed,
            scales,
            biases,
            transpose=transpose,
            group_size=enc.group_size,
            bits=enc.bits,
        )
    return x @ (w.T if transpose else w)

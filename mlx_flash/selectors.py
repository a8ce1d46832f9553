"""Selectors: a layer's input x -> the neuron ids to use for this token.

- ``all``: every neuron (the exactness reference; the paper's naive baseline).
- ``oracle``: the true activations, computed from every weight (reads the whole layer):
  the ceiling any predictor can reach, for tests and measurements.
- ``gate``: gate (or fc1) rows resident in DRAM give the true pre-activation; only the
  up/down (fc2) part of the chosen neurons is read — exact selection, one matrix of
  DRAM.
- ``input``: input sparsity (TEAL-like, `input_sparse.py`): the FFN input's smallest
  channels dropped, then the smallest |act(gate)·up|, by thresholds calibrated per layer
  for a share of FFN bytes (`--sparsity`); needs a store with columns by input channel.
- ``shadow``: a low-bit copy (2, 3 or 4 bits) of every layer's gate and up rows held
  in DRAM estimates |act(gate)·up| for every neuron; the top `fraction` (or those
  above `threshold`) are read whole and computed exactly.
- ``lowrank``: the learned low-rank predictor (`predictor.py`): no FFN weight in DRAM
  decides; neurons whose logit passes the layer's threshold calibrated for a target
  recall (or the top `fraction` by logit).

ReLU models select where the activation is > 0; gated SiLU/GELU models have no exact
zeros and select the top `fraction` by |activation| (or those above `threshold`).
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import numpy as np

from .parallel import quantized_matmul
from .store.format import Weight

SELECTORS = ("all", "oracle", "gate", "lowrank", "input", "shadow")
SHADOW_BITS = (2, 3, 4)
SHADOW_GROUP = 32  # the shadow's quantization group (its scales and biases: float32)


@dataclass
class Selection:
    ids: np.ndarray  # neuron ids, most important first
    pre: Optional[mx.array] = None  # their first-row pre-activations, when known


def top_ids(scores: np.ndarray, fraction: Optional[float], threshold: Optional[float]):
    """Ids by descending score: those above `threshold`, at most a `fraction` of all."""
    n = len(scores)
    if threshold is not None:
        ids = np.nonzero(scores > threshold)[0]
        ids = ids[np.argsort(-scores[ids], kind="stable")]
        return ids if fraction is None else ids[: max(1, round(fraction * n))]
    k = n if fraction is None else max(1, min(n, round(fraction * n)))
    ids = np.argpartition(-scores, k - 1)[:k] if k < n else np.arange(n)
    return ids[np.argsort(-scores[ids], kind="stable")]


def relu_threshold(gated: bool, threshold: Optional[float]) -> Optional[float]:
    """ReLU-style FFNs select where the activation is > 0 unless told otherwise."""
    return threshold if gated or threshold is not None else 0.0


class AllSelector:
    def __init__(self, n_neurons: int):
        self.ids = np.arange(n_neurons)

    def __call__(self, x: mx.array) -> Selection:
        return Selection(self.ids)


class OracleSelector:
    """The true top activations from the full layer (reads every neuron: a
    reference)."""

    def __init__(self, ffn, fraction, threshold):
        self.ffn, self.fraction, self.threshold = ffn, fraction, threshold

    def __call__(self, x: mx.array) -> Selection:
        w = self.ffn.read_all(x.dtype)
        h = [self.ffn.project(x, w, name) for name in self.ffn.rows]
        scores = mx.abs(self.ffn.activate(h)).reshape(
            -1
        )  # |act(gate) * up| or act(fc1)
        scores = np.array(scores)  # the host sync: the decision
        threshold = relu_threshold(self.ffn.gated, self.threshold)
        return Selection(top_ids(scores, self.fraction, threshold))


class GateSelector:
    """Exact pre-activations from resident gate/fc1 rows (paper's "gate" ablation).

    Args:
        rows: the layer's gate (fc1) rows, resident, and their per-neuron bias if any;
            or a function that reads both (rows the DRAM plan streams).
    """

    def __init__(self, ffn, rows: Weight, bias, fraction, threshold):
        self.ffn, self.rows, self.bias = ffn, rows, bias
        self.fraction, self.threshold = fraction, threshold

    def __call__(self, x: mx.array) -> Selection:
        rows, bias = self.rows() if callable(self.rows) else (self.rows, self.bias)
        pre = self.ffn.matmul_rows(x, rows, self.ffn.rows[0])
        if bias is not None:
            pre = pre + bias
        pre = pre.reshape(-1)
        scores = np.array(mx.abs(self.ffn.activation(pre)))  # the host sync
        ids = top_ids(
            scores, self.fraction, relu_threshold(self.ffn.gated, self.threshold)
        )
        return Selection(ids, pre[mx.array(ids.astype(np.uint32))])


class LowRankSelector:
    """The layer's learned predictor: logits -> ids above `threshold` (at most a
    `fraction` of all), or the top `fraction` when no threshold is given."""

    def __init__(self, predictor, fraction, threshold):
        self.predictor, self.fraction, self.threshold = predictor, fraction, threshold

    def __call__(self, x: mx.array) -> Selection:
        logits = self.predictor(x.reshape(1, -1)).reshape(-1)
        scores = np.array(logits)  # the host sync
        return Selection(top_ids(scores, self.fraction, self.threshold))


class Shadow:
    """A low-bit copy of a layer's gate and up rows, kept in DRAM to score neurons by
    an estimate of |act(gate) * up| (cheap resident information: the estimate
    decides, the stored rows compute)."""

    def __init__(self, activation: Callable, bits: int, group_size: int = SHADOW_GROUP):
        self.activation, self.bits, self.group_size = activation, bits, group_size
        self.layer, self.copies = None, None  # the current layer's, quantized once

    def quantize(self, layer: int, w: Dict[str, mx.array], rows: List[str]):
        if layer != self.layer:
            self.layer = layer
            self.copies = [mx.quantize(w[n], self.group_size, self.bits) for n in rows]
        return self.copies

    def scores(self, x: mx.array, copies) -> mx.array:
        gate, up = (
            quantized_matmul(x, *c, True, self.group_size, self.bits) for c in copies
        )
        return mx.abs(self.activation(gate) * up)

    @staticmethod
    def nbytes(copies) -> int:
        return sum(a.nbytes for c in copies for a in c)

    def bytes_for(self, neurons: int, dims: int, rows: int = 2) -> int:
        """What `quantize` makes of `rows` (neurons, dims) float32 matrices: the
        packed values and a float32 scale and bias per group."""
        groups = neurons * (dims // self.group_size)
        return rows * (neurons * dims * self.bits // 8 + groups * 2 * 4)


class ShadowSelector:
    """The top `fraction` (or those above `threshold`) by the shadow's estimate."""

    def __init__(self, shadow: Shadow, copies, fraction, threshold):
        self.shadow, self.copies = shadow, copies
        self.fraction, self.threshold = fraction, threshold

    def __call__(self, x: mx.array) -> Selection:
        scores = self.shadow.scores(x.reshape(1, -1), self.copies).reshape(-1)
        return Selection(top_ids(np.array(scores), self.fraction, self.threshold))

"""Input sparsity for gated FFNs: decide on each matrix's input, before reading it.

TEAL (Liu et al. 2024) and WINA (Chen et al. 2025) sparsify the *input* of each
matrix: for the FFN, the input channels x_j with the smallest |x_j| are dropped, so
only the gate/up *columns* of the kept channels are read (a store converted with
``--layout columns``); a = act(gate)·up is then known exactly (from the sparsified
input) and its smallest |a| are dropped, so only the kept neurons' down rows are read.
Both decisions are thresholds calibrated per layer on a text (`calibrate.py`), their
sparsity allocated across layers and the two stages greedily under one global share
of FFN bytes (TEAL §4.2); the thresholds live beside the store in `sparsity.json`.

Pure selection math here; `sparse_ffn.FlashFFN` reads and computes.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import mlx.core as mx
import numpy as np

from .errors import FlashError
from .selectors import top_ids

SPARSITY_NAME = "sparsity.json"


def kept(scores: np.ndarray, threshold: float) -> np.ndarray:
    """Ids whose score exceeds `threshold`, the largest first (at least one)."""
    ids = top_ids(scores, None, threshold)
    return ids if len(ids) else np.array([int(np.argmax(scores))])


@dataclass
class LayerSparsity:
    """One layer's calibrated stages: the share dropped and its threshold, for the
    FFN input's channels (|x|) and the neurons (|a|)."""

    channels: float
    channel_threshold: float
    neurons: float
    neuron_threshold: float
    # WINA's per-channel weights (the norm of each channel's gate/up columns) that
    # |x_j| is multiplied by before its threshold; None: |x_j| alone (TEAL's)
    channel_scale: Optional[List[float]] = None

    def channel_scores(self, x):
        """Each input channel's score, the quantity its threshold applies to: |x_j|
        (TEAL), or |x_j| times the norm of its gate/up columns (WINA); `x` (..., D),
        MLX or numpy."""
        if self.channel_scale is None:
            return abs(x)
        key = "_np" if isinstance(x, np.ndarray) else "_mx"  # converted once each
        if key not in self.__dict__:
            scale = np.asarray(self.channel_scale, np.float32)
            self.__dict__[key] = scale if key == "_np" else mx.array(scale)
        return abs(x) * self.__dict__[key]


class InputSelector:
    """Layer thresholds: x -> the input channels to keep; a -> the neurons."""

    def __init__(self, layer: LayerSparsity):
        self.layer = layer

    def channels(self, x: mx.array) -> np.ndarray:
        """Input channels scoring above the threshold, the largest first."""
        scores = np.array(x.reshape(-1).astype(mx.float32))  # the host sync
        return kept(self.layer.channel_scores(scores), self.layer.channel_threshold)

    def neurons(self, a: mx.array) -> np.ndarray:
        """Neurons with |a| above the threshold, the largest first."""
        scores = np.abs(np.array(a.reshape(-1).astype(mx.float32)))  # the host sync
        return kept(scores, self.layer.neuron_threshold)


@dataclass
class Calibration:
    """The thresholds of one global target: every layer's stages, and what they were
    calibrated on."""

    target: float  # the share of FFN bytes not touched, over the model
    layers: List[LayerSparsity]


def save_calibrations(store: Path, calibrations: List[Calibration], meta: Dict) -> Path:
    """Write `sparsity.json` beside the store (to a temporary name, then renamed)."""
    path = Path(store) / SPARSITY_NAME
    body = {
        **meta,
        "targets": [
            {
                "target": c.target,
                "layers": [
                    {k: v for k, v in vars(layer).items() if not k.startswith("_")}
                    for layer in c.layers
                ],
            }
            for c in calibrations
        ],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(path)
    return path


def load_calibration(store: Path, sparsity: float, layers: int) -> Calibration:
    """The calibration of `sparsity` (one of the targets `calibrate` wrote)."""
    path = Path(store) / SPARSITY_NAME
    fix = (
        f"calibrate it: python -m mlx_flash.calibrate {store} --text TEXT "
        f"--sparsity {sparsity:g}"
    )
    if not path.is_file():
        raise FlashError("the store has no calibrated input sparsity", path, fix)
    try:
        body = json.loads(path.read_text())
        targets = {
            round(t["target"], 6): Calibration(
                t["target"], [LayerSparsity(**k) for k in t["layers"]]
            )
            for t in body["targets"]
        }
    except (ValueError, KeyError, TypeError) as e:
        raise FlashError(f"{path.name} is malformed ({e})", path, fix) from None
    found = targets.get(round(sparsity, 6))
    if found is None:
        have = ", ".join(f"{t:g}" for t in sorted(targets)) or "none"
        raise FlashError(
            f"no calibration for sparsity {sparsity:g} (calibrated: {have})", path, fix
        )
    if len(found.layers) != layers:
        raise FlashError(
            f"{path.name} has {len(found.layers)} layers, the store {layers}",
            path,
            fix,
        )
    return found

"""The low-rank neuron predictor (paper §3.1, after Deja Vu): per layer, the FFN's input
-> one logit per neuron, trained on the model's own activations.

`Linear(D, r) -> [activation] -> Linear(r, n_ff)`; the hidden activation (``relu``)
makes it the small MLP Deja Vu uses, ``none`` the paper's purely low-rank map.
Stored in the model's store as ``predictors.safetensors`` + ``predictors.json``.
"""

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .errors import FlashError
from .sidecar import sha256_file, write_sidecar
from .store.safety import check_safetensors, read_json_object

WEIGHTS_NAME, MANIFEST_NAME = "predictors.safetensors", "predictors.json"
MAGIC, VERSION = "MLXFLASH-PREDICTORS", 1
RECALLS = (0.5, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)  # calibrated thresholds kept
PREDICTOR_BITS = 8  # decoding's predictors: 3.5x smaller than float32, same picks


class Predictor(nn.Module):
    def __init__(self, dims: int, rank: int, neurons: int, activation: str = "relu"):
        super().__init__()
        self.down = nn.Linear(dims, rank, bias=activation != "none")
        self.up = nn.Linear(rank, neurons)
        self.activation = activation

    def __call__(self, x: mx.array) -> mx.array:
        h = self.down(x)
        return self.up(nn.relu(h) if self.activation == "relu" else h)  # logits

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for _, p in nn.utils.tree_flatten(self.parameters()))


def top_fraction_targets(scores: mx.array, fraction: float) -> mx.array:
    """Per row, True for the top `fraction` of `scores` (N, n) -> (N, n) bool."""
    k = max(1, min(scores.shape[-1], round(fraction * scores.shape[-1])))
    kth = mx.topk(scores, k, axis=-1).min(axis=-1, keepdims=True)
    return scores >= kth


def mass_targets(scores: mx.array, share: float) -> mx.array:
    """Per row, True for the fewest largest `scores` (N, n), non-negative, whose sum
    reaches `share` of the row's: the neurons that carry that share of the FFN's
    |activation| mass, as many as each token needs (a token whose activations are
    concentrated needs few, a diffuse one many) -> (N, n) bool."""
    ranked = -mx.sort(-scores, axis=-1)  # descending
    mass = mx.cumsum(ranked, axis=-1)
    k = (mass < share * mass[..., -1:]).sum(axis=-1, keepdims=True)
    k = mx.minimum(k, scores.shape[-1] - 1)
    return scores >= mx.take_along_axis(ranked, k, axis=-1)


TARGET_KINDS = ("top", "mass", "relu")


def target_error(target: dict) -> str:
    """Why `target` (``{"kind": "top", "fraction": f}``, ``{"kind": "mass",
    "share": s}`` or ``{"kind": "relu"}``) is not one, or ""."""
    kind = target.get("kind")
    key = {"top": "fraction", "mass": "share"}.get(kind)
    if key is not None:
        v = target.get(key)
        if type(v) not in (int, float) or not 0 < v <= 1:
            return f"target {key} {v!r} must be in (0, 1]"
    elif kind != "relu":
        return f"unknown target {kind!r}"
    return ""


def targets_for(target: dict) -> Callable[[mx.array], mx.array]:
    """The rule that marks the neurons that matter from a layer's activations `a`
    (act(gate) * up, or act(fc1)), for a target `target_error` accepts."""
    if target["kind"] == "top":
        return lambda a: top_fraction_targets(mx.abs(a), target["fraction"])
    if target["kind"] == "mass":
        return lambda a: mass_targets(mx.abs(a), target["share"])
    return lambda a: a > 0


@dataclass
class LayerMetrics:
    rank: int
    epochs: int
    loss: float  # held-out balanced BCE
    recall: Dict[str, float] = field(default_factory=dict)  # at the saved thresholds
    precision: Dict[str, float] = field(default_factory=dict)
    selected: Dict[str, float] = field(default_factory=dict)  # fraction of neurons
    thresholds: Dict[str, float] = field(default_factory=dict)  # logit, per recall
    positives: float = 0.0  # fraction of neurons that are targets
    seconds: float = 0.0


def balanced_bce(logits: mx.array, targets: mx.array, pos_weight: float) -> mx.array:
    """Binary cross-entropy with the rare positives weighted up to balance them."""
    t = targets.astype(logits.dtype)
    loss = pos_weight * t * nn.softplus(-logits) + (1 - t) * nn.softplus(logits)
    return loss.mean()


def train_layer(
    x: np.ndarray,
    targets: np.ndarray,
    rank: int,
    activation: str = "relu",
    epochs: int = 20,
    batch: int = 256,
    lr: float = 1e-3,
    held_out: float = 0.1,
    patience: int = 2,
    seed: int = 0,
) -> Tuple[Predictor, LayerMetrics]:
    """Fit one layer's predictor with Adam; stop when the held-out loss stops falling.

    Args:
        x: (N, D) float32 FFN inputs; targets: (N, n) bool, the neurons that matter.
        held_out: share of the tokens (the last ones) kept for early stopping and
            calibration.
    """
    tic = time.perf_counter()
    n_val = max(1, int(len(x) * held_out))
    xt, yt = mx.array(x[:-n_val]), mx.array(targets[:-n_val])
    xv, yv = mx.array(x[-n_val:]), mx.array(targets[-n_val:])
    p = float(targets[:-n_val].mean())
    pos_weight = (1 - p) / max(p, 1e-6)
    mx.random.seed(seed)
    model = Predictor(x.shape[1], rank, targets.shape[1], activation)
    optimizer = optim.Adam(learning_rate=lr)

    def loss_fn(m, xb, yb):
        return balanced_bce(m(xb), yb, pos_weight)

    step = nn.value_and_grad(model, loss_fn)
    best, best_params, stale, done = math.inf, None, 0, 0
    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = mx.array(rng.permutation(len(xt)).astype(np.uint32))
        for s in range(0, len(xt), batch):
            idx = order[s : s + batch]
            _, grads = step(model, xt[idx], yt[idx])
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
        val = balanced_bce(model(xv), yv, pos_weight).item()
        done = epoch + 1
        if val < best - 1e-4:
            best, stale = val, 0
            best_params = nn.utils.tree_map(lambda a: a, model.parameters())
        else:
            stale += 1
            if stale >= patience:
                break
    model.update(best_params)
    metrics = calibrate(model(xv), yv)
    metrics.rank, metrics.epochs, metrics.loss = rank, done, best
    metrics.positives, metrics.seconds = p, time.perf_counter() - tic
    return model, metrics


def calibrate(logits: mx.array, targets: mx.array) -> LayerMetrics:
    """Per target recall in `RECALLS`: the logit threshold that reaches it on these
    held-out tokens, with the precision and share of neurons it then selects."""
    logits, targets = np.array(logits), np.array(targets)
    positives = np.sort(logits[targets])
    m = LayerMetrics(rank=0, epochs=0, loss=0.0)
    for r in RECALLS:
        t = float(positives[int((1 - r) * len(positives))]) if len(positives) else 0.0
        chosen = logits >= t
        key = f"{r:g}"
        m.thresholds[key] = t
        m.recall[key] = float((chosen & targets).sum() / max(targets.sum(), 1))
        m.precision[key] = float((chosen & targets).sum() / max(chosen.sum(), 1))
        m.selected[key] = float(chosen.mean())
    return m


@dataclass
class PredictorSet:
    """Every layer's predictor and how it was made."""

    predictors: List[Predictor]
    metrics: List[LayerMetrics]
    activation: str
    target: Dict[str, object]  # {"kind": "top" | "relu", "fraction": f}
    text: Dict[str, object]  # {"name", "sha256", "tokens"}

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.predictors)

    def threshold(self, layer: int, recall: float) -> float:
        key = f"{recall:g}"
        thresholds = self.metrics[layer].thresholds
        if key not in thresholds:
            raise FlashError(
                f"no threshold calibrated for recall {recall}",
                fix="use one of " + ", ".join(thresholds),
            )
        return thresholds[key]


def save(store: Path, ps: PredictorSet) -> None:
    """Write both files under temporary names and rename them into place; the
    manifest, renamed last, names the weights' SHA-256."""
    store = Path(store)
    weights = {
        f"layers.{i}.{k}": v.astype(mx.float16)
        for i, p in enumerate(ps.predictors)
        for k, v in nn.utils.tree_flatten(p.parameters())
    }
    write_sidecar(
        store,
        WEIGHTS_NAME,
        MANIFEST_NAME,
        weights,
        {
            "magic": MAGIC,
            "version": VERSION,
            "activation": ps.activation,
            "target": ps.target,
            "text": ps.text,
            "layers": [asdict(m) for m in ps.metrics],
        },
    )


def load_predictors(
    store: Path, dims: int, neurons: List[int], bits: Optional[int] = None
) -> PredictorSet:
    """Read and check the store's predictors: float32 for compute, or quantized to
    `bits` (group size 64; decoding uses 8 bits: 3.5x smaller, logits within ~0.01).

    The manifest is checked field by field and every weight's shape against the
    model before anything is built from it, so a damaged or hostile file is refused
    with a `FlashError`, never a `KeyError` or an allocation it cannot justify.
    """
    store = Path(store)
    path, weights_path = store / MANIFEST_NAME, store / WEIGHTS_NAME
    fix = "train them: python -m mlx_flash.train_predictors STORE --text FILE"
    if not path.is_file() or not weights_path.is_file():
        raise FlashError("the store has no trained predictors", store, fix)
    try:
        m = read_json_object(path, fix)
        ok = m.get("magic") == MAGIC and m.get("version") == VERSION
    except FlashError:
        ok = False
    if not ok:
        raise FlashError("not a predictors manifest of this version", path, fix)
    why = _manifest_error(m)
    if why:
        raise FlashError(f"the predictors manifest is malformed: {why}", path, fix)
    if m["weights_sha256"] != sha256_file(weights_path):
        raise FlashError(
            "the predictor weights do not match their manifest", weights_path, fix
        )
    if len(m["layers"]) != len(neurons):
        raise FlashError(
            f"{len(m['layers'])} predictors for {len(neurons)} layers", path, fix
        )
    check_safetensors(weights_path, fix)
    flat = mx.load(str(weights_path))
    predictors, metrics = [], []
    for i, (entry, n) in enumerate(zip(m["layers"], neurons)):
        rank = entry["rank"]
        down = flat.get(f"layers.{i}.down.weight")
        if down is None or tuple(down.shape) != (rank, dims):
            shape = None if down is None else tuple(down.shape)
            raise FlashError(
                f"layer {i}: down.weight is {shape}, expected {(rank, dims)}",
                weights_path,
                fix,
            )
        p = Predictor(dims, rank, n, m["activation"])
        layer = {
            k.split(".", 2)[2]: v.astype(mx.float32)
            for k, v in flat.items()
            if k.startswith(f"layers.{i}.")
        }
        try:
            p.load_weights(list(layer.items()))
            metrics.append(LayerMetrics(**entry))
        except (ValueError, TypeError) as e:
            raise FlashError(f"layer {i}: {e}", weights_path, fix) from None
        if bits:
            nn.quantize(p, 64, bits, class_predicate=lambda _, m: _quantizable(m))
        predictors.append(p)
    return PredictorSet(predictors, metrics, m["activation"], m["target"], m["text"])


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.weight.shape[-1] % 64 == 0


def _manifest_error(m: dict) -> str:
    """What is wrong with the fields of a predictors manifest, or ""."""
    if not isinstance(m.get("weights_sha256"), str):
        return "weights_sha256 must be a string"
    if m.get("activation") not in ("relu", "none"):
        return f"unknown activation {m.get('activation')!r}"
    if not isinstance(m.get("target"), dict) or not isinstance(m.get("text"), dict):
        return "target and text must be objects"
    if target_error(m["target"]):
        return target_error(m["target"])
    layers = m.get("layers")
    if not isinstance(layers, list):
        return "layers must be a list"
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            return f"layer {i} must be an object"
        rank = entry.get("rank")
        if type(rank) is not int or rank <= 0:
            return f"layer {i}: rank {rank!r} must be a positive integer"
        for key in ("recall", "precision", "selected", "thresholds"):
            if not isinstance(entry.get(key, {}), dict):
                return f"layer {i}: {key} must be an object"
    return ""

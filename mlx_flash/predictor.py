"""The low-rank neuron predictor (paper §3.1, after Deja Vu): per layer, the FFN's input
-> one logit per neuron, trained on the model's own activations.

`Linear(D, r) -> [activation] -> Linear(r, n_ff)`; the hidden activation (``relu``)
makes it the small MLP Deja Vu uses, ``none`` the paper's purely low-rank map.
Stored in the model's store as ``predictors.safetensors`` + ``predictors.json``.
"""

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .allocation import greedy
from .errors import FlashError
from .sidecar import sha256_file, write_sidecar
from .store.safety import check_safetensors, read_json_object

WEIGHTS_NAME, MANIFEST_NAME = "predictors.safetensors", "predictors.json"
MAGIC, VERSION = "MLXFLASH-PREDICTORS", 1
# calibrated thresholds kept (older stores hold 0.5 and 0.8-0.99 only)
RECALLS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)
RANKS = (32, 64, 128, 256)  # --rank auto: trained at the largest, cut to the smallest
RANK_TOLERANCE = 0.02  # ... whose share selected at recall 0.9 is within this of it
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
    # per recall, what the neurons left out would have added, |dy|^2 relative to
    # the hidden state leaving the block |h|^2 (else to the FFN's output |y|^2),
    # averaged over the held-out tokens: what the recalls are allocated by
    error: Dict[str, float] = field(default_factory=dict)
    # --rank auto: the share selected at recall 0.9 at each rank tried
    ranks: Dict[str, float] = field(default_factory=dict)
    positives: float = 0.0  # fraction of neurons that are targets
    seconds: float = 0.0


def balanced_bce(logits: mx.array, targets: mx.array, pos_weight: float) -> mx.array:
    """Binary cross-entropy with the rare positives weighted up to balance them."""
    t = targets.astype(logits.dtype)
    loss = pos_weight * t * nn.softplus(-logits) + (1 - t) * nn.softplus(logits)
    return loss.mean()


@dataclass
class HeldOut:
    """What the calibration measures the predictor's picks against, besides the
    targets: the held-out tokens' activations (N_val, n), the layer's down (fc2)
    matrix (n, D) and, when known, the hidden states leaving the block (N_val, D),
    so each recall's error can be measured (`LayerMetrics.error`)."""

    activations: np.ndarray
    down: mx.array
    residual: Optional[mx.array] = None

    def errors(self, dropped: Dict[str, np.ndarray]) -> Dict[str, float]:
        """Per key, the mean over tokens of |dropped neurons' output|^2 / |h|^2 (or
        / |y|^2): each token counts once, as in perplexity (a ratio of sums is
        ruled by the few tokens whose hidden states are huge)."""
        a = mx.array(self.activations.astype(np.float32))
        ref = self.residual if self.residual is not None else a @ self.down
        norm = mx.maximum((ref * ref).sum(axis=-1), 1e-12)
        out = {}
        for key, mask in dropped.items():
            d = (a * mx.array(mask)) @ self.down
            out[key] = float(((d * d).sum(axis=-1) / norm).mean().item())
        return out


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
    ffn: Optional[HeldOut] = None,
) -> Tuple[Predictor, LayerMetrics]:
    """Fit one layer's predictor with Adam; stop when the held-out loss stops falling.

    Args:
        x: (N, D) float32 FFN inputs; targets: (N, n) bool, the neurons that matter.
        held_out: share of the tokens (the last ones) kept for early stopping and
            calibration.
        ffn: the held-out tokens' activations and the down matrix: each recall's
            error is measured too (`LayerMetrics.error`).
    """
    tic = time.perf_counter()
    n_val = held_out_count(len(x), held_out)
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
    metrics = calibrate(model(xv), yv, ffn)
    metrics.rank, metrics.epochs, metrics.loss = rank, done, best
    metrics.positives, metrics.seconds = p, time.perf_counter() - tic
    return model, metrics


def held_out_count(tokens: int, held_out: float) -> int:
    """How many of the last tokens `train_layer` keeps for calibration."""
    return max(1, int(tokens * held_out))


def truncate(p: Predictor, x: np.ndarray, rank: int) -> Predictor:
    """The best rank-`rank` approximation of a low-rank predictor's logits on inputs
    like `x` (N, D): the SVD of its map weighted by the inputs' second moment, so
    the directions the inputs use are the ones kept (activation "none" only)."""
    w = np.array(p.up.weight, np.float64) @ np.array(p.down.weight, np.float64)
    c = x.T.astype(np.float64) @ x.astype(np.float64) / len(x)
    lam, v = np.linalg.eigh(c)
    lam = np.maximum(lam, lam.max() * 1e-8)
    root, inv_root = (v * np.sqrt(lam)) @ v.T, (v / np.sqrt(lam)) @ v.T
    u, sigma, qt = np.linalg.svd(w @ root, full_matrices=False)
    cut = Predictor(x.shape[1], rank, w.shape[0], "none")
    cut.up.weight = mx.array((u[:, :rank] * sigma[:rank]).astype(np.float32))
    cut.up.bias = p.up.bias
    cut.down.weight = mx.array((qt[:rank] @ inv_root).astype(np.float32))
    return cut


def rank_candidates(dims: int, neurons: int) -> Tuple[int, ...]:
    """`RANKS` up to the map's own rank (a rank above min(D, n) adds nothing)."""
    full = min(dims, neurons)
    return tuple(r for r in RANKS if r < full) + (min(full, RANKS[-1]),)


TRAINED = ("epochs", "loss", "positives", "seconds")  # a cut keeps its training's


def choose_rank(
    p: Predictor,
    metrics: LayerMetrics,
    x: np.ndarray,
    targets: np.ndarray,
    held_out: float,
    ffn: Optional[HeldOut] = None,
) -> Tuple[Predictor, LayerMetrics]:
    """`p` (trained, `metrics` its calibration) cut to the smallest rank of `RANKS`
    below its own whose truncation selects at most `RANK_TOLERANCE` more of the
    neurons at recall 0.9 on the held-out tokens -> (the predictor, its metrics,
    with the share selected at each rank tried in `ranks`). Measured on
    Qwen2.5-Coder-0.5B (layer 3, 32k tokens): a cut equals a predictor trained at
    that rank (selected at recall 0.9: 78.7% vs 78.6% at 128, 80.4% vs 80.4% at 64),
    and fine-tuning the cut gains nothing."""
    n_val = held_out_count(len(x), held_out)
    xv, yv = mx.array(x[-n_val:]), mx.array(targets[-n_val:])
    full = metrics.rank
    shares = {full: metrics.selected["0.9"]}
    for rank in [r for r in RANKS if r < full]:
        cut = truncate(p, x[:-n_val], rank)
        shares[rank] = calibrate(cut(xv), yv).selected["0.9"]
        if shares[rank] <= shares[full] + RANK_TOLERANCE:  # chosen: its errors too
            trained = {k: getattr(metrics, k) for k in TRAINED}
            p, metrics = cut, replace(calibrate(cut(xv), yv, ffn), rank=rank, **trained)
            break
    metrics.ranks = {str(r): v for r, v in sorted(shares.items())}
    return p, metrics


def calibrate(
    logits: mx.array, targets: mx.array, ffn: Optional[HeldOut] = None
) -> LayerMetrics:
    """Per target recall in `RECALLS`: the logit threshold that reaches it on these
    held-out tokens, with the precision and share of neurons it then selects, and,
    given the tokens' activations and down matrix, the error of leaving the others
    out (`HeldOut.errors`)."""
    logits, targets = np.array(logits), np.array(targets)
    positives = np.sort(logits[targets])
    m = LayerMetrics(rank=0, epochs=0, loss=0.0)
    dropped = {}
    for r in RECALLS:
        t = float(positives[int((1 - r) * len(positives))]) if len(positives) else 0.0
        chosen = logits >= t
        key = f"{r:g}"
        m.thresholds[key] = t
        m.recall[key] = float((chosen & targets).sum() / max(targets.sum(), 1))
        m.precision[key] = float((chosen & targets).sum() / max(chosen.sum(), 1))
        m.selected[key] = float(chosen.mean())
        if ffn is not None:
            dropped[key] = ~chosen
    if ffn is not None:
        m.error = ffn.errors(dropped)
    return m


@dataclass
class PredictorSet:
    """Every layer's predictor and how it was made."""

    predictors: List[Predictor]
    metrics: List[LayerMetrics]
    activation: str
    target: Dict[str, object]  # {"kind": "top" | "relu", "fraction": f}
    text: Dict[str, object]  # {"name", "sha256", "tokens"}
    _allocated: Dict[float, List[float]] = field(default_factory=dict, repr=False)

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

    def allocated(self, sparsity: float) -> List[float]:
        """Each layer's logit threshold for a model-wide `sparsity` (the share of
        FFN neurons left unused per token), the recalls allocated by TEAL's greedy
        (`allocation.greedy`) from each layer's measured error per recall (relative
        to the hidden state: after an RMSNorm what matters is a perturbation's share
        of it): a layer whose left-out neurons move the hidden state little gives
        up more. A layer may stay whole (-inf)."""
        if sparsity not in self._allocated:
            self._allocated[sparsity] = self._allocate(sparsity)
        return self._allocated[sparsity]

    def _allocate(self, sparsity: float) -> List[float]:
        total = sum(p.up.weight.shape[0] for p in self.predictors)
        curves, keys = [], []
        for p, m in zip(self.predictors, self.metrics):
            ranked = sorted(m.error, key=float, reverse=True)  # recall 0.99 first
            if not ranked:
                raise FlashError(
                    "these predictors have no measured error per recall (trained "
                    "before mlx_flash measured it): --sparsity cannot allocate them",
                    fix="retrain them (python -m mlx_flash.train_predictors), or "
                    "give one --recall for every layer",
                )
            share = p.up.weight.shape[0] / total
            saved = [0.0] + [(1 - m.selected[k]) * share for k in ranked]
            error = [0.0] + [m.error[k] for k in ranked]
            curves.append((np.array(saved), np.array(error)))
            keys.append(ranked)
        (at,) = greedy(curves, [sparsity])
        return [
            -math.inf if k == 0 else m.thresholds[ks[k - 1]]
            for k, ks, m in zip(at, keys, self.metrics)
        ]


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
        for key in ("recall", "precision", "selected", "thresholds", "error", "ranks"):
            if not isinstance(entry.get(key, {}), dict):
                return f"layer {i}: {key} must be an object"
    return ""

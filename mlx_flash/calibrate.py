"""Calibrate the `input` selector: per-layer thresholds for global shares of FFN bytes.

    python -m mlx_flash.calibrate STORE --text TEXT --sparsity 0.2,0.3,0.4

The text runs through the dense model layer by layer (`layerwise.py`). For each layer
and each candidate share s of the grid, the error that dropping s of the FFN input's
channels (by |x|) costs, and the error that dropping s of the neurons (by |a|) costs,
are measured as the FFN output's squared change relative to the hidden state leaving
the block, averaged over the text's tokens (`LayerTables`); the thresholds
are the quantiles of |x| and |a| that drop those shares (|a| computed from the
sparsified input, for every input share). TEAL's greedy allocation (Liu et al. 2024,
§4.2; `allocation.py`) then raises, one grid step at a time, the stage of the layer
whose step costs the least error per FFN byte saved (a channel's gate/up columns or a
neuron's down row, as stored), until the model-wide share of bytes not touched reaches
each target. The two stages' errors are taken as additive. By default
(``--allocate block``, as TEAL) every layer leaves the same share unused and the greedy
chooses between its two stages; ``--allocate global`` lets it move bytes between layers
too. Written to STORE/sparsity.json.
"""

import argparse
from pathlib import Path
from typing import Callable, Dict, List

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .allocation import greedy
from .blas import run_offline
from .errors import FlashError
from .input_sparse import Calibration, LayerSparsity, save_calibrations
from .layerwise import Lane, for_many_tokens, read_text, run_layers, text_tokens
from .sparse_ffn import ACTIVATIONS
from .utils import load

GRID = np.round(np.arange(0, 0.951, 0.05), 2)  # candidate shares of each stage
SAMPLE = 1 << 18  # values a quantile is taken from (a random sample of the text's)


def sample_quantiles(values: mx.array, shares: np.ndarray, rng) -> np.ndarray:
    """The `shares` quantiles of |values|, from a random sample of them."""
    flat = mx.abs(values).reshape(-1)
    if flat.size > SAMPLE:
        flat = flat[mx.array(rng.integers(0, flat.size, SAMPLE).astype(np.uint32))]
    v = np.sort(np.array(flat.astype(mx.float32)))
    return np.array(
        [-1.0 if s <= 0 else v[min(int(s * len(v)), len(v) - 1)] for s in shares]
    )


class LayerTables:
    """One layer's measurements: the error and threshold of every share of each
    stage, and the layer's column share of FFN bytes.

    An error is the mean over the text's tokens of |change of the FFN output|^2
    relative to the token's hidden state leaving the block (`relative_to`; after an
    RMSNorm what matters is a perturbation's share of it), or until then to the
    token's FFN output: each token counts once, as in perplexity (a ratio of sums
    is ruled by the few tokens whose hidden states are huge)."""

    def __init__(self, column_share: float):
        self.column_share = column_share
        self.channel_error = np.zeros(len(GRID))
        self.neuron_error = np.zeros(len(GRID))
        self.channel_threshold = np.zeros(len(GRID))
        # the |a| threshold of each neuron share, for each channel share
        self.neuron_threshold = np.zeros((len(GRID), len(GRID)))

    def measure(self, x, w, rows, column, activation: Callable, rng, wina: bool):
        def ffn(xs):
            return activation(xs @ w[rows[0]].T) * (xs @ w[rows[1]].T)

        self.channel_scale = None
        if wina:  # the norm of each input channel's gate and up columns
            norms = mx.sqrt(
                (w[rows[0]] ** 2).sum(axis=0) + (w[rows[1]] ** 2).sum(axis=0)
            )
            self.channel_scale = np.array(norms).tolist()
        score = LayerSparsity(0, 0, 0, 0, self.channel_scale).channel_scores(x)
        a = ffn(x)
        y = a @ w[column]
        # per grid point, each token's squared change of the FFN output
        self.channel_sq = np.zeros((len(GRID), x.shape[0]), np.float32)
        self.neuron_sq = np.zeros((len(GRID), x.shape[0]), np.float32)
        self.channel_threshold = sample_quantiles(score, GRID, rng)
        for k, t in enumerate(self.channel_threshold):
            xs = x * (score > t) if t >= 0 else x
            a_s = ffn(xs) if t >= 0 else a
            d = a_s @ w[column] - y
            self.channel_sq[k] = np.array((d * d).sum(axis=-1))
            self.neuron_threshold[k] = sample_quantiles(a_s, GRID, rng)
        for j, t in enumerate(self.neuron_threshold[0]):
            if t >= 0:
                d = (a * (mx.abs(a) > t)) @ w[column] - y
                self.neuron_sq[j] = np.array((d * d).sum(axis=-1))
        self.relative_to(y)

    def relative_to(self, h: mx.array) -> None:
        """The errors relative to each token's |h|^2 (N, D), then averaged."""
        norm = np.maximum(np.array((h * h).sum(axis=-1)), 1e-12)
        self.channel_error = (self.channel_sq / norm).mean(axis=1).astype(float)
        self.neuron_error = (self.neuron_sq / norm).mean(axis=1).astype(float)


def allocate(tables: List[LayerTables], targets: List[float]) -> List[Calibration]:
    """TEAL's greedy (`allocation.greedy`) over every layer's two stages: a grid step
    of a layer's channels saves its column share of the layer's bytes, one of its
    neurons the rest."""
    L = len(tables)
    curves = []
    for t in tables:
        for share, errors in (
            (t.column_share, t.channel_error),
            (1 - t.column_share, t.neuron_error),
        ):
            curves.append((GRID * share / L, errors))
    out = []
    for target, at in zip(sorted(targets), greedy(curves, targets)):
        layers = [
            LayerSparsity(
                float(GRID[c]),
                float(t.channel_threshold[c]),
                float(GRID[n]),
                float(t.neuron_threshold[c, n]),
                t.channel_scale,
            )
            for t, (c, n) in zip(tables, at.reshape(L, 2))
        ]
        out.append(Calibration(target, layers))
    return out


ALLOCATIONS = ("block", "global")


def allocate_blocks(
    tables: List[LayerTables], targets: List[float]
) -> List[Calibration]:
    """TEAL's own allocation: every layer (block) leaves the same share of its bytes
    unused, its two stages chosen greedily within it (`allocate` on that layer)."""
    per_layer = [allocate([t], targets) for t in tables]
    return [
        Calibration(target, [calibs[k].layers[0] for calibs in per_layer])
        for k, target in enumerate(sorted(targets))
    ]


def calibrate(args) -> Path:
    model, tokenizer = load(args.model, progress=False)
    for_many_tokens(model)
    store, m = model.flash_store, model.flash_store.manifest
    if len(m.rows) != 2:
        raise FlashError(
            "input sparsity is for gated FFNs (gate_proj and up_proj)", store.path
        )
    store.entry(0, columns=True)  # a store the input selector can run: else the fix
    text, sha = read_text(Path(args.text), "the calibration text")
    tokens = text_tokens(tokenizer, text, args.tokens, args.seq_len, args.skip)
    activation, rng = ACTIVATIONS[m.activation], np.random.default_rng(args.seed)
    tables: Dict[int, LayerTables] = {}

    def record(layer, x, a, pre, w):
        if layer not in tables:
            columns = store.columns[layer].bundle_bytes() * m.hidden_size
            down = m.layers[layer].components[m.column].nbytes * m.intermediate_size
            tables[layer] = LayerTables(columns / (columns + down))
            wina = args.score == "wina"
            tables[layer].measure(x, w, m.rows, m.column, activation, rng, wina)
        return None

    lane = Lane(record)

    def done(layer):  # the hidden states leaving the block: what errors are against
        tables[layer].relative_to(lane.h.reshape(-1, lane.h.shape[-1]))
        del tables[layer].channel_sq, tables[layer].neuron_sq
        bar.update(1)

    with tqdm(total=len(m.layers), desc="layers", disable=not args.progress) as bar:
        # one batch of every sequence: each layer measured on the whole text at once
        run_layers(model, tokens, [lane], batch=tokens.shape[0], progress=done)
    how = allocate_blocks if args.allocate == "block" else allocate
    calibrations = how([tables[i] for i in range(len(m.layers))], args.sparsity)
    meta = {
        "text_sha256": sha,
        "tokens": int(tokens.size),
        "skip": args.skip,
        "allocate": args.allocate,
        "score": args.score,
        "grid": GRID.tolist(),
        "column_share": [tables[i].column_share for i in range(len(m.layers))],
        "channel_error": [
            tables[i].channel_error.tolist() for i in range(len(m.layers))
        ],
        "neuron_error": [tables[i].neuron_error.tolist() for i in range(len(m.layers))],
    }
    path = save_calibrations(store.path, calibrations, meta)
    for c in calibrations:
        ch = [k.channels for k in c.layers]
        ne = [k.neurons for k in c.layers]
        print(
            f"[mlx_flash] sparsity {c.target:g}: channels {np.mean(ch):.0%} and "
            f"neurons {np.mean(ne):.0%} dropped on average (layers "
            f"{min(ch):.0%}-{max(ch):.0%} and {min(ne):.0%}-{max(ne):.0%})"
        )
    print(f"[mlx_flash] wrote {path}")
    return path


def shares(text: str) -> List[float]:
    values = [float(t) for t in text.split(",") if t]
    if not values or not all(0 <= v < 0.9 for v in values):
        raise argparse.ArgumentTypeError(f"shares in [0, 0.9), not {text!r}")
    return values


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Calibrate the input selector's thresholds of a flash store"
    )
    parser.add_argument("model", help="A flash store converted with --layout columns")
    parser.add_argument("--text", required=True, help="A UTF-8 calibration text")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--skip", type=int, default=0, help="Text tokens to skip first")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument(
        "--sparsity",
        type=shares,
        default=[0.2, 0.3, 0.4],
        help="Shares of FFN bytes to leave unused per token, one calibration each",
    )
    parser.add_argument(
        "--allocate",
        choices=ALLOCATIONS,
        default="block",
        help="block: every layer leaves the same share unused, its two stages "
        "chosen greedily (TEAL's); global: the greedy across layers too",
    )
    parser.add_argument(
        "--score",
        choices=("teal", "wina"),
        default="teal",
        help="What a channel's threshold applies to: |x_j| (TEAL) or |x_j| times "
        "the norm of its gate/up columns (WINA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="No progress bar"
    )
    return parser


def main(argv=None):
    run_offline(setup_arg_parser(), calibrate, argv)


if __name__ == "__main__":
    main()

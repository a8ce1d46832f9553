"""`python -m mlx_flash.train_predictors MODEL --text FILE`: learn each layer's
neuron predictor from the model's own activations on a text, and save them in the store.

The text runs through the model one layer at a time (`layerwise`): collect that
layer's FFN inputs and targets, train its predictor, free them, go on. DRAM holds one
layer's FFN, the text's hidden states and one layer's (inputs, targets); never every
layer's at once. Targets: activation > 0 for ReLU models; for gated SiLU/GELU models,
each token's top `--fraction` of neurons by |act(gate) * up| (no exact zeros there),
or with ``--target mass`` the fewest neurons that carry `--mass` of it. Each layer is
saved as it is trained: an interrupted run resumes where it stopped
(`training_progress`).
"""

import argparse
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
from tqdm import tqdm

from .blas import run_offline
from .errors import FlashError
from .layerwise import Lane, for_many_tokens, read_text, run_layers, text_tokens
from .predictor import (
    PREDICTOR_BITS,
    RANKS,
    HeldOut,
    PredictorSet,
    choose_rank,
    held_out_count,
    load_predictors,
    rank_candidates,
    save,
    target_error,
    targets_for,
    train_layer,
)
from .training_progress import Progress
from .utils import load


def parse_ranks(spec: str, layers: int) -> List[Optional[int]]:
    """``128``, ``auto`` or ``128,26-29:256`` (a default, then per-layer overrides)
    -> ranks; None: chosen from held-out recall (`predictor.choose_rank`)."""
    parts = spec.split(",")
    try:
        first = None if parts[0] == "auto" else int(parts[0])
        ranks = [first] * layers
        for part in parts[1:]:
            span, rank = part.split(":")
            first, _, last = span.partition("-")
            for i in range(int(first), int(last or first) + 1):
                ranks[i] = int(rank)
    except (ValueError, IndexError):
        raise FlashError(
            f"cannot read --rank {spec!r} for {layers} layers",
            fix="e.g. --rank auto, --rank 128 or --rank 128,26-29:256 (layers 26 to 29 "
            "at 256)",
        ) from None
    if any(r is not None and r < 1 for r in ranks):
        raise FlashError(f"--rank {spec!r} has a rank below 1")
    return ranks


def dram_estimate(model, tokens: int, held_out: float) -> int:
    """Bytes held while training: the dense part, one layer's FFN in float32, the
    text's hidden states, one layer's inputs (float32) and targets (bool), and the
    held-out tokens' activations (float16)."""
    m = model.flash_store.manifest
    dense = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    n_ff = max(layer.neurons for layer in m.layers)
    layer = (len(m.rows) + 1) * n_ff * m.hidden_size * 4
    held = held_out_count(tokens, held_out) * n_ff * 2
    return dense + layer + tokens * (2 * m.hidden_size * 4 + n_ff) + held


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Train the low-rank neuron predictors of a flash store"
    )
    parser.add_argument("model", help="A flash store (or a source converted once)")
    parser.add_argument("--text", required=True, help="A UTF-8 training text")
    parser.add_argument("--tokens", type=int, default=16384, help="Tokens to train on")
    parser.add_argument("--skip", type=int, default=0, help="Text tokens to skip first")
    parser.add_argument("--seq-len", type=int, default=256, help="Tokens per sequence")
    parser.add_argument(
        "--rank",
        default="auto",
        help="auto (each layer trained at the largest of "
        f"{', '.join(map(str, RANKS))} and cut to the smallest rank that selects at "
        "most 2%% more at recall 0.9 on the held-out tokens), a rank (128), or per "
        "layer: 128,26-29:256",
    )
    parser.add_argument(
        "--activation",
        choices=["relu", "none"],
        default="none",
        help="Between the two linear maps: none (the paper's low rank; measured better "
        "on SmolLM2) or relu (Deja Vu's MLP)",
    )
    parser.add_argument(
        "--target",
        choices=["top", "mass"],
        default="top",
        help="Gated models, which neurons the predictor learns to find: each token's "
        "top --fraction by |act(gate) * up| (top), or the fewest that carry --mass of "
        "that token's |act(gate) * up| (mass: as many as each token needs)",
    )
    parser.add_argument(
        "--fraction",
        type=float,
        default=0.25,
        help="--target top: each token's top share of neurons are the targets",
    )
    parser.add_argument(
        "--mass",
        type=float,
        default=0.9,
        help="--target mass: the share of each token's |activation| mass to cover",
    )
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--restart",
        action="store_true",
        help="Discard the progress of an interrupted run (by default a run with the "
        "same arguments resumes it: each layer is saved as it is trained)",
    )
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="No progress bar"
    )
    return parser


def train(args) -> PredictorSet:
    model, tokenizer = load(args.model, progress=False)
    for_many_tokens(model)
    store, m = model.flash_store, model.flash_store.manifest
    text_path = Path(args.text)
    text, text_sha256 = read_text(text_path, "the training text")
    tokens = text_tokens(tokenizer, text, args.tokens, args.seq_len, args.skip)
    ranks = parse_ranks(args.rank, len(m.layers))
    gated = len(m.rows) == 2
    target = {"kind": "relu"}
    if gated:
        target = (
            {"kind": "mass", "share": args.mass}
            if args.target == "mass"
            else {"kind": "top", "fraction": args.fraction}
        )
    if args.activation != "none" and None in ranks:
        raise FlashError(
            "--rank auto cuts a low-rank map: it needs --activation none",
            fix="give --activation none, or a rank (--rank 128)",
        )
    why = target_error(target)
    if why:
        raise FlashError(why, fix="give --fraction / --mass in (0, 1]")
    marks = targets_for(target)
    inputs, targets, predictors, metrics = [], [], [], []
    n_val = held_out_count(int(tokens.size), args.held_out)
    held = {"rows": 0, "activations": [], "down": None}  # this layer's held-out part
    run = {
        "text_sha256": text_sha256,
        "tokens": int(tokens.size),
        "skip": args.skip,
        "seq_len": args.seq_len,
        "ranks": ranks,
        "activation": args.activation,
        "target": target,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "held_out": args.held_out,
        "seed": args.seed,
    }
    progress = Progress(store.path, run, args.restart)
    resumed = progress.finished()

    def record(layer, x, a, pre, w):
        if layer < resumed:  # trained before: only its output is needed
            return None
        t = marks(a)
        inputs.append(np.array(x.astype(mx.float32)))
        targets.append(np.array(t))
        first = int(tokens.size) - n_val - held["rows"]  # of this batch's, held out
        if first < len(x):
            held["activations"].append(np.array(a[max(first, 0) :].astype(mx.float16)))
        held["rows"] += len(x)
        held["down"] = w[m.column]
        return None  # the FFN stays dense: the next layer sees the true model

    def fit(layer):
        if layer < resumed:
            n = m.layers[layer].neurons
            p, metric = progress.load(layer, m.hidden_size, n, args.activation)
            predictors.append(p), metrics.append(metric)
            bar.update(1)
            return
        x, t = np.concatenate(inputs), np.concatenate(targets)
        h = lane.h.reshape(-1, lane.h.shape[-1])[-n_val:]  # leaving this block
        ffn = HeldOut(np.concatenate(held["activations"]), held["down"], h)
        inputs.clear(), targets.clear()
        held.update(rows=0, activations=[], down=None)
        auto = ranks[layer] is None
        p, metric = train_layer(
            x,
            t,
            rank_candidates(m.hidden_size, m.layers[layer].neurons)[-1]
            if auto
            else ranks[layer],
            args.activation,
            args.epochs,
            args.batch_size,
            args.learning_rate,
            args.held_out,
            seed=args.seed + layer,
            ffn=ffn,
        )
        if auto:
            p, metric = choose_rank(p, metric, x, t, args.held_out, ffn)
        progress.save(layer, p, metric)
        predictors.append(p), metrics.append(metric)
        bar.update(1)
        bar.set_postfix(
            loss=f"{metric.loss:.3f}", sel90=f"{metric.selected['0.9']:.0%}"
        )
        bar.write(
            f"[mlx_flash] layer {layer:3d}: rank {metric.rank}, {metric.epochs} "
            f"epochs, held-out loss {metric.loss:.4f}, at recall 0.9 selects "
            f"{metric.selected['0.9']:.1%} with precision "
            f"{metric.precision['0.9']:.1%} "
            f"({metric.seconds:.1f} s)"
            + (
                "; ranks tried (selected at recall 0.9): "
                + ", ".join(f"{r} {v:.1%}" for r, v in metric.ranks.items())
                if metric.ranks
                else ""
            )
        )

    print(
        f"[mlx_flash] training {len(m.layers)} predictors on {tokens.size} tokens of "
        f"{text_path.name} (targets: {target}); DRAM held: "
        f"{dram_estimate(model, tokens.size, args.held_out) / 2**30:.2f} GiB + "
        "MLX's working memory",
        flush=True,
    )
    if resumed:
        print(f"[mlx_flash] resuming: layers 0-{resumed - 1} were trained before")
    lane = Lane(record)
    with tqdm(total=len(m.layers), desc="layers", disable=not args.progress) as bar:
        try:
            run_layers(model, tokens, [lane], progress=fit)
        except KeyboardInterrupt:
            print(
                f"\n[mlx_flash] interrupted: {progress.finished()} layers saved in "
                f"{progress.path}; the same command resumes",
                flush=True,
            )
            raise
    ps = PredictorSet(
        predictors,
        metrics,
        args.activation,
        target,
        {
            "name": text_path.name,
            "sha256": text_sha256,
            "tokens": int(tokens.size),
            "skip": args.skip,
        },
    )
    save(store.path, ps)
    progress.remove()
    m = store.manifest
    runtime = load_predictors(
        store.path, m.hidden_size, [l.neurons for l in m.layers], bits=PREDICTOR_BITS
    )
    print(
        f"[mlx_flash] saved {len(predictors)} predictors into {store.path} "
        f"({runtime.nbytes / 2**20:.1f} MiB in DRAM at run time, {PREDICTOR_BITS}-bit)"
    )
    return ps


def main(argv=None):
    run_offline(setup_arg_parser(), train, argv)


if __name__ == "__main__":
    main()

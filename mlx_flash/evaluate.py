"""`python -m mlx_flash.evaluate MODEL --text FILE`: what each neuron selection costs in
perplexity, with every token's own selection.

Each configuration is a lane of `layerwise.run_layers`: the text advances through the
layers with that configuration's per-token masks on the FFN activations — the exact
result of decoding token by token with that selection (a dense FFN computed, then the
unselected neurons zeroed), never a union over a prefill chunk. Configurations: dense;
oracle top-k (the true |activation|) and `gate` (|act(gate pre-activation)|) at each
`--fractions`; low-bit shadows of gate+up (`--shadow-bits`); on the FFN's input
(`--input-sparsity`: TEAL- and WINA-like, the input's smallest channels zeroed, then
the same share of neurons by the |a| they give); and with trained predictors,
`lowrank` at each calibrated `--recalls` and at each fraction (top-k by predicted
logit). Each row also gives the share of the FFN's bytes a token touches (the
oracle reads gate and up whole; `gate` its rows; an input selection the kept
columns of gate and up and the kept down rows).
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .blas import run_offline
from .cache_simulator import Replay
from .errors import FlashError
from .layerwise import (
    Lane,
    float_weights,
    for_many_tokens,
    run_layers,
    text_tokens,
    token_nll,
)
from .predictor import (
    PredictorSet,
    load_predictors,
    targets_for,
    top_fraction_targets,
)
from .input_sparse import kept, load_calibration
from .selectors import Shadow
from .sparse_ffn import ACTIVATIONS
from .store.format import dequantize
from .utils import load


@dataclass
class Config:
    name: str
    # (layer, x, a, pre, w) -> (N, n) bool, or None: dense; or (mask, activations)
    # for a selection that changes the FFN's input (input sparsity)
    mask: Optional[Callable]
    # the share of the FFN's bytes a token touches, from the share of neurons used
    touched: Callable[[float], float] = lambda used: used
    lane: Optional[Lane] = None
    # per layer: [selected, neurons x tokens, selected targets, targets]
    sums: Dict[int, np.ndarray] = field(default_factory=dict)
    nll: float = math.nan

    def per_layer(self, k: int, of: int) -> List[float]:
        return [s[k] / max(s[of], 1) for _, s in sorted(self.sums.items())]


def input_sparse(
    activation: Callable, rows: List[str], sparsity: float, wina: bool
) -> Callable:
    """A selection on the FFN's input (TEAL; WINA with `wina`): per token, zero the
    `sparsity` share of input channels with the smallest |x_j| (WINA: |x_j| x the
    norm of column j of gate and up), so only the other columns of gate and up are
    needed; then keep the same share of neurons by the |a| computed from that input,
    so only their down rows are needed."""
    keep, norms = 1 - sparsity, {}  # layer -> its gate/up column norms (WINA)

    def select(layer, x, a, pre, w):
        score = mx.abs(x)
        if wina:
            if layer not in norms:  # once per layer, not per batch of sequences
                stacked = mx.concatenate([w[n] for n in rows], axis=0)  # (2n, D)
                norms.clear()
                norms[layer] = mx.sqrt((stacked * stacked).sum(axis=0))
            score = score * norms[layer]
        channels = top_fraction_targets(score, keep) if keep < 1 else None
        xs = x if channels is None else x * channels
        h = [xs @ w[n].T for n in rows]
        a_s = activation(h[0]) * h[1]
        return top_fraction_targets(mx.abs(a_s), keep), a_s

    return select


class TokenReads:
    """Each token's bytes read, summed over the layers, from per-layer replays
    (`cache_simulator.Replay`) stepped token by token in text order, as decoding
    runs them: ``read[t]`` is token t's."""

    def __init__(self):
        self.read, self.at, self.layer = [], 0, None

    def step(self, layer: int, *replayed: Tuple[Replay, np.ndarray]) -> None:
        """One token of `layer`: each replay stepped with its ids (best first)."""
        if layer != self.layer:  # the first token of this layer's pass
            self.layer, self.at = layer, 0
        if self.at >= len(self.read):
            self.read.append(0)
        self.read[self.at] += sum(r.step(ids) for r, ids in replayed)
        self.at += 1


def calibrated(activation: Callable, store, calibration, replays=None) -> Callable:
    """The input selector exactly as it runs (`input_sparse.py`): per token, the
    channels with |x_j| above the layer's threshold, gate and up computed from the
    store's own columns of those channels (their stored precision: re-quantized
    columns cost what they cost), then the neurons with |a| above the second.

    `replays`, per layer a (channels, neurons) pair of `cache_simulator.Replay`,
    replay each token's selections through the caches of a plan, in text order:
    ``select.reads.read[t]`` is then token t's bytes read, summed over the layers."""
    m, columns = store.manifest, {}

    def select(layer, x, a, pre, w):
        if layer not in columns:  # once per layer, not per batch of sequences
            columns.clear()
            weights = store.read_layer(layer, mx.float32, columns=True)
            columns[layer] = [
                dequantize(weights[n], m.intermediate_size) for n in m.rows
            ]
        t = calibration.layers[layer]
        keep = t.channel_scores(x) > t.channel_threshold
        select.channels += [keep.sum().item(), keep.size]
        xs = x * keep
        gate, up = (xs @ c for c in columns[layer])
        a_s = activation(gate) * up
        chosen = mx.abs(a_s) > t.neuron_threshold
        if replays is not None:
            xa, aa = np.array(t.channel_scores(x)), np.abs(np.array(a_s))
            channels, neurons = replays[layer]
            for k in range(xa.shape[0]):  # token by token, as decoding reads
                select.reads.step(
                    layer,
                    (channels, kept(xa[k], t.channel_threshold)),
                    (neurons, kept(aa[k], t.neuron_threshold)),
                )
        return chosen, a_s

    select.channels = np.zeros(2)  # input channels kept, of all (tokens x D)
    select.reads = TokenReads()
    return select


def replayed_top(scores: mx.array, chosen: mx.array, replays, layer, reads) -> None:
    """Step `replays[layer]` with each token's chosen ids, best `scores` first (a
    neuron selector's order: `selectors.top_ids`)."""
    sc, ch = np.array(scores), np.array(chosen)
    for k in range(sc.shape[0]):
        ids = np.nonzero(ch[k])[0]
        reads.step(layer, (replays[layer], ids[np.argsort(-sc[k, ids], kind="stable")]))


def predicted_config(
    name: str, ps: PredictorSet, cuts: List[float], replays=None, down=None
) -> Config:
    """The lowrank selector as it runs: per layer, the neurons whose predicted
    logit passes its threshold (`cuts`: one recall's, or `PredictorSet.allocated`'s).
    With `down` (a share of the layer's neurons), a combination not yet run by the
    runtime: the predicted neurons' gate/up rows give their exact |a|, and only the
    top `down` share by it (among the predicted) have their down rows read."""
    predicted = np.zeros(2)  # neurons predicted, of all (tokens x n)

    def select(layer, x, a, pre, w):
        logits = ps.predictors[layer](x)
        chosen = logits >= cuts[layer]
        predicted[:] += [chosen.sum().item(), chosen.size]
        if down is not None:
            chosen = top_fraction_targets(mx.abs(a) * chosen, down) & chosen
        elif replays is not None:
            replayed_top(logits, chosen, replays, layer, select.reads)
        return chosen

    select.reads = TokenReads()
    if down is None:
        return Config(name, select)
    # gate and up rows of the predicted, down rows of the kept (a third each)
    return Config(name, select, lambda u: (2 * predicted[0] / predicted[1] + u) / 3)


def shadow_config(
    name: str, shadow: Shadow, rows: List[str], fraction: float, replays=None
) -> Config:
    """The shadow selector as it runs: the top `fraction` by the low-bit copy's
    estimate of |act(gate)·up|, read whole (`selectors.ShadowSelector`)."""

    def select(layer, x, a, pre, w):
        scores = shadow.scores(x, shadow.quantize(layer, w, rows))
        chosen = top_fraction_targets(scores, fraction)
        if replays is not None:
            replayed_top(scores, chosen, replays, layer, select.reads)
        return chosen

    select.reads = TokenReads()
    return Config(name, select)


def calibrated_config(
    name: str, activation: Callable, store, calibration, replays=None
) -> Config:
    """The calibrated input selector as a lane (`calibrated`); the bytes it touches
    from the shares of channels and of neurons it kept, as counted."""
    share = float(np.mean(store_column_share(store)))
    select = calibrated(activation, store, calibration, replays)
    return Config(
        name,
        select,
        lambda u: (
            share * select.channels[0] / max(select.channels[1], 1) + (1 - share) * u
        ),
    )


def configurations(
    activation: Callable,
    gated: bool,
    fractions: List[float],
    recalls: List[float],
    ps: Optional[PredictorSet],
    rows: List[str],
    shadow_bits: List[int],
    input_sparsities: List[float] = (),
    calibrations: list = (),
    store=None,
) -> List[Config]:
    top = top_fraction_targets
    configs = [Config("dense", None, lambda used: 1.0)]
    # the oracle reads gate and up (or fc1) whole to know |a|; `gate` reads its rows
    oracle = (lambda u: (2 + u) / 3) if gated else (lambda u: (1 + u) / 2)
    if not gated:
        configs.append(
            Config("oracle relu (a > 0)", lambda i, x, a, pre, w: a > 0, oracle)
        )
    for f in fractions:
        configs.append(
            Config(
                f"oracle top {f:g}",
                lambda i, x, a, pre, w, f=f: top(mx.abs(a), f),
                oracle,
            )
        )
        if gated:  # ReLU models: the gate rows give the true activation (= oracle)
            configs.append(
                Config(
                    f"gate top {f:g}",
                    lambda i, x, a, pre, w, f=f: top(mx.abs(activation(pre)), f),
                    lambda u: (1 + 2 * u) / 3,
                )
            )
    for s in input_sparsities if gated else []:
        for wina in (False, True):
            configs.append(
                Config(
                    f"input {'WINA' if wina else 'TEAL'} {s:g}",
                    input_sparse(activation, rows, s, wina),
                    lambda u, s=s: (2 * (1 - s) + u) / 3,
                )
            )
    for c in calibrations:
        name = f"input calibrated {c.target:g}"
        configs.append(calibrated_config(name, activation, store, c))
    for bits in shadow_bits if gated else []:
        shadow = Shadow(activation, bits)
        for f in fractions:
            configs.append(
                Config(
                    f"shadow {bits}-bit top {f:g}",
                    lambda i, x, a, pre, w, f=f, s=shadow: top(
                        s.scores(x, s.quantize(i, w, rows)), f
                    ),
                )
            )
    if ps is not None:
        logits = lambda i, x: ps.predictors[i](x)  # noqa: E731
        for r in recalls:
            configs.append(
                Config(
                    f"lowrank recall {r:g}",
                    lambda i, x, a, pre, w, r=r: logits(i, x) >= ps.threshold(i, r),
                )
            )
        for f in fractions:
            configs.append(
                Config(
                    f"lowrank top {f:g}",
                    lambda i, x, a, pre, w, f=f: top(logits(i, x), f),
                )
            )
    return configs


def store_column_share(store) -> List[float]:
    """Per layer, the gate/up columns' share of the FFN bytes (the rest: down rows)."""
    m, out = store.manifest, []
    for entry, columns in zip(m.layers, store.columns):
        c = columns.bundle_bytes() * m.hidden_size
        out.append(c / (c + entry.components[m.column].nbytes * entry.neurons))
    return out


def _hook(config: Config, targets: Callable):
    """The lane's FFN hook: apply the config's mask and count what it selects."""

    def hook(layer, x, a, pre, w):
        if config.mask is None:
            return None
        chosen, instead = config.mask(layer, x, a, pre, w), None
        if isinstance(chosen, tuple):
            chosen, instead = chosen
        t = targets(a)
        counts = [chosen.sum(), chosen.size, (chosen & t).sum(), t.sum()]
        s = config.sums.setdefault(layer, np.zeros(4))
        s += [float(c.item()) if isinstance(c, mx.array) else c for c in counts]
        mask = chosen.astype(a.dtype)
        return mask if instead is None else (mask, instead)

    return hook


def evaluate(args) -> Dict:
    model, tokenizer = load(args.model, progress=False)
    for_many_tokens(model)
    m = model.flash_store.manifest
    gated = len(m.rows) == 2
    text_path = Path(args.text)
    if not text_path.is_file():
        raise FlashError("the evaluation text does not exist", text_path)
    text = text_path.read_text(encoding="utf-8", errors="replace")
    tokens = text_tokens(tokenizer, text, args.tokens, args.seq_len, args.skip)
    ps = None
    if not args.no_predictors:
        try:
            neurons = [layer.neurons for layer in m.layers]
            ps = load_predictors(model.flash_store.path, m.hidden_size, neurons)
        except FlashError as e:
            print(f"[mlx_flash] no lowrank rows: {e}", file=sys.stderr)
    # the neurons that matter, as the predictors were trained to find them
    targets = targets_for(ps.target if ps is not None else {"kind": "relu"})
    activation = ACTIVATIONS[m.activation]
    configs = configurations(
        activation,
        gated,
        args.fractions,
        args.recalls,
        ps,
        m.rows,
        args.shadow_bits,
        args.input_sparsity,
        [
            load_calibration(model.flash_store.path, s, len(m.layers))
            for s in args.calibrated
        ],
        model.flash_store,
    )
    for c in configs:
        c.lane = Lane(_hook(c, targets))
    with tqdm(total=len(m.layers), desc="layers", disable=not args.progress) as bar:
        lanes = [c.lane for c in configs]
        run_layers(model, tokens, lanes, progress=lambda i: bar.update(1))
    for c in configs:
        nll = [
            token_nll(model, tokens[s : s + 8], c.lane.h[s : s + 8])
            for s in range(0, tokens.shape[0], 8)
        ]
        c.nll = mx.concatenate(nll).mean().item()
    costs = selector_costs(model, ps, args.shadow_bits if gated else [], activation)
    return report(args, configs, tokens, ps, text_path, costs)


def _ms(fn, repeat: int = 30) -> float:
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - tic)
    return 1e3 * float(np.median(times))


def selector_costs(model, ps, shadow_bits, activation) -> List[Dict]:
    """What each way of choosing neurons holds in DRAM and costs per decoded token
    (one token through every layer's selector; measured on layer 0's shapes)."""
    store = model.flash_store
    m, layers = store.manifest, len(model.layers)
    ffn, stored = model.layers[0].mlp, store.read_layer(0, mx.float32)
    x = mx.random.normal((1, m.hidden_size))
    gate, enc = stored[m.rows[0]], m.layers[0].components[m.rows[0]].encoding
    kind = f"{enc.bits}-bit" if enc.quantized else enc.dtype
    gate_bytes = sum(a.nbytes for a in gate) if isinstance(gate, tuple) else gate.nbytes
    costs = [
        {
            "selector": f"gate ({kind} rows)",
            "dram_bytes": gate_bytes * layers,
            "ms_per_token": _ms(lambda: ffn.matmul_rows(x, gate, m.rows[0])) * layers,
        }
    ]
    w = float_weights(stored, m.hidden_size)
    for bits in shadow_bits:
        shadow = Shadow(activation, bits)
        copies = shadow.quantize(0, w, m.rows)
        costs.append(
            {
                "selector": f"shadow {bits}-bit gate+up",
                "dram_bytes": Shadow.nbytes(copies) * layers,
                "ms_per_token": _ms(lambda: shadow.scores(x, copies)) * layers,
            }
        )
    if ps is not None:
        costs.append(
            {
                "selector": f"lowrank ({ps.activation}, float32)",
                "dram_bytes": ps.nbytes,
                "ms_per_token": sum(_ms(lambda p=p: p(x)) for p in ps.predictors),
            }
        )
    return costs


def report(args, configs, tokens, ps, text_path, costs) -> Dict:
    dense = math.exp(configs[0].nll)
    rows = []
    for c in configs:
        ppl, used = math.exp(c.nll), c.per_layer(0, 1)
        lowrank = c.name.startswith("lowrank")
        rows.append(
            {
                "config": c.name,
                "ppl": ppl,
                "delta": ppl / dense - 1,
                "neurons_used": float(np.mean(used)) if used else 1.0,
                "ffn_touched": c.touched(float(np.mean(used)) if used else 1.0),
                "per_layer_used": used,
                "per_layer_recall": c.per_layer(2, 3) if lowrank else None,
                "per_layer_precision": c.per_layer(2, 0) if lowrank else None,
            }
        )
    result = {
        "model": str(args.model),
        "text": text_path.name,
        "tokens": int(tokens.size),
        "skip": args.skip,
        "seq_len": args.seq_len,
        "configs": rows,
        "selector_costs": costs,
        "predictors": None
        if ps is None
        else {
            "activation": ps.activation,
            "target": ps.target,
            "trained_on": ps.text,
            "bytes_float32": ps.nbytes,
            "per_layer": [
                {
                    "rank": m.rank,
                    "bytes_float32": p.nbytes,
                    "held_out": {
                        k: getattr(m, k) for k in ("recall", "precision", "selected")
                    },
                }
                for p, m in zip(ps.predictors, ps.metrics)
            ],
        },
    }
    print(table(result))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    return result


def table(result: Dict) -> str:
    lines = [
        f"Perplexity on {result['tokens']} tokens of {result['text']} "
        f"(sequences of {result['seq_len']}, after skipping {result['skip']}):",
        "",
        "| selection | perplexity | vs dense | FFN neurons used per token | FFN bytes "
        "touched per token |",
        "|---|---|---|---|---|",
    ]
    for r in result["configs"]:
        lines.append(
            f"| {r['config']} | {r['ppl']:.2f} | {r['delta']:+.1%} | "
            f"{r['neurons_used']:.1%} | {r['ffn_touched']:.1%} |"
        )
    lines += [
        "",
        "What choosing costs per decoded token (all layers):",
        "",
        "| selector | DRAM MiB | ms/token |",
        "|---|---|---|",
    ]
    for c in result["selector_costs"]:
        lines.append(
            f"| {c['selector']} | {c['dram_bytes'] / 2**20:.1f} | "
            f"{c['ms_per_token']:.2f} |"
        )
    lowrank = [r for r in result["configs"] if r["per_layer_recall"]]
    if lowrank:
        p = result["predictors"]
        lines += [
            "",
            f"Predictors: {p['activation']}, {p['bytes_float32'] / 2**20:.1f} MiB "
            f"(float32), trained on {p['trained_on']['tokens']} tokens of "
            f"{p['trained_on']['name']}; per layer, recall / precision / "
            "share selected:",
            "",
            "| layer | rank | KiB | " + " | ".join(r["config"] for r in lowrank) + " |",
            "|---|---|---|" + "---|" * len(lowrank),
        ]
        for i, layer in enumerate(p["per_layer"]):
            cells = [
                f"{r['per_layer_recall'][i]:.0%} / {r['per_layer_precision'][i]:.0%} / "
                f"{r['per_layer_used'][i]:.0%}"
                for r in lowrank
            ]
            lines.append(
                f"| {i} | {layer['rank']} | {layer['bytes_float32'] / 1024:.0f} | "
                + " | ".join(cells)
                + " |"
            )
    return "\n".join(lines)


def floats(text: str) -> List[float]:
    return [float(t) for t in text.split(",") if t]


def setup_arg_parser():
    parser = argparse.ArgumentParser(
        description="Perplexity of a flash store under per-token neuron selections"
    )
    parser.add_argument("model", help="A flash store (or a source converted once)")
    parser.add_argument("--text", required=True, help="A held-out UTF-8 text")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--skip", type=int, default=0, help="Text tokens to skip first")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--fractions", type=floats, default=[0.1, 0.25, 0.5])
    parser.add_argument("--recalls", type=floats, default=[0.8, 0.9, 0.95])
    parser.add_argument(
        "--shadow-bits",
        type=lambda t: [int(b) for b in t.split(",") if b],
        default=[2, 4],
        help="Gated models: score neurons with gate/up copies at these bits",
    )
    parser.add_argument(
        "--input-sparsity",
        type=floats,
        default=[],
        help="Gated models: also select on the FFN's input at these sparsities (e.g. "
        "0.25,0.5): per token the smallest |x_j| channels zeroed (TEAL), or by |x_j| "
        "x the norm of gate/up column j (WINA), then the same share of neurons by the "
        "|a| that input gives",
    )
    parser.add_argument(
        "--calibrated",
        type=floats,
        default=[],
        help="Gated models with columns: the input selector at these calibrated "
        "sparsities (python -m mlx_flash.calibrate), computed from the stored columns",
    )
    parser.add_argument(
        "--no-predictors", action="store_true", help="Skip the lowrank rows"
    )
    parser.add_argument("--json", default=None, help="Also write the results here")
    parser.add_argument(
        "--no-progress", dest="progress", action="store_false", help="No progress bar"
    )
    return parser


def main(argv=None):
    run_offline(setup_arg_parser(), evaluate, argv)


if __name__ == "__main__":
    main()

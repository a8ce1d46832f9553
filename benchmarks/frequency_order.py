"""Would storing each layer's neurons (down rows) and input channels (gate/up columns)
in order of their selection frequency cut what the `input` selector reads (issue #14's
optional "order neurons on disk by frequency so cold reads coalesce")?

The calibrated selector's choices are recorded on a calibration text (frequencies)
and on held-out text (reads); each held-out token's bytes are counted with the
reader's own rule (`read_bytes`: runs merged across the gap, 4 KiB pages) in the
store's order and in frequency order, with no cache. Counts, not timings.

    python benchmarks/frequency_order.py STORE [--sparsity 0.3] [--tokens 1024]
"""

import argparse

import numpy as np

from mlx_flash.evaluate import calibrated
from mlx_flash.input_sparse import load_calibration
from mlx_flash.layerwise import Lane, for_many_tokens, run_layers, text_tokens
from mlx_flash.options import DEFAULT_GAP_BYTES
from mlx_flash.sparse_ffn import ACTIVATIONS
from mlx_flash.store.store import read_bytes
from mlx_flash.utils import load
from models import WIKITEXT


class Recorder:
    """Stands in for a cache replay: keeps each token's ids."""

    def __init__(self):
        self.ids = []

    def step(self, ids):
        self.ids.append(np.sort(ids))
        return 0


def record(model, tokenizer, calibration, text, tokens, skip):
    """Per layer, (channels, neurons) recorders of the selector's choices."""
    store, m = model.flash_store, model.flash_store.manifest
    recorders = [(Recorder(), Recorder()) for _ in m.layers]
    select = calibrated(ACTIVATIONS[m.activation], store, calibration, recorders)

    def hook(layer, x, a, pre, w):
        chosen, a_s = select(layer, x, a, pre, w)
        return chosen.astype(a.dtype), a_s

    run_layers(model, text_tokens(tokenizer, text, tokens, 128, skip), [Lane(hook)])
    return recorders


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("store")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--tokens", type=int, default=1024)
    args = p.parse_args()
    model, tokenizer = load(args.store, progress=False)
    for_many_tokens(model)
    m = model.flash_store.manifest
    calibration = load_calibration(args.store, args.sparsity, len(m.layers))
    text = WIKITEXT.read_text(encoding="utf-8", errors="replace")
    calib = record(model, tokenizer, calibration, text, args.tokens, 0)
    held = record(model, tokenizer, calibration, text, args.tokens, 200_000)
    totals = {}
    for i, entry in enumerate(m.layers):
        down = [s for s in entry.sections if m.column in s.components]
        for k, (stage, sections, n) in enumerate(
            [
                ("channels", m.columns[i].sections, m.columns[i].neurons),
                ("neurons", down, entry.neurons),
            ]
        ):
            width = sum(s.bundle_bytes for s in sections)
            freq = np.zeros(n)
            for ids in calib[i][k].ids:
                freq[ids] += 1
            rank = np.empty(n, np.int64)
            rank[np.argsort(-freq, kind="stable")] = np.arange(n)
            tokens = held[i][k].ids
            for gap in (0, DEFAULT_GAP_BYTES // width):
                for order, perm in (("store", None), ("frequency", rank)):
                    read = sum(
                        read_bytes(sections, ids if perm is None else perm[ids], gap)
                        for ids in tokens
                    )
                    key = (stage, gap, order)
                    totals[key] = totals.get(key, 0) + read / len(tokens)
            share = np.quantile(freq / len(calib[i][k].ids), [0.1, 0.5, 0.9])
            print(f"layer {i} {stage}: selected share 10/50/90% {np.round(share, 2)}")
    for (stage, gap, order), v in sorted(totals.items()):
        print(f"{stage}, gap {gap}, {order} order: {v / 1e6:.2f} MB/token")


if __name__ == "__main__":
    main()

"""Setting up a loaded flash model: its DRAM plan, each layer's selector and cache.

`FlashModel.setup_flash` (utils.py) calls `setup` once after the dense part is loaded:
the model sets up its own layers, as an mlx-lm model makes its own caches. Each step
is a small function: which sections a selector keeps resident, the selector state it
loads (predictors, gate rows), the plan, and what each layer receives.
"""

from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .budget import Plan, plan
from .errors import FlashError
from .neuron_cache import NeuronCache
from .options import FlashOptions
from .predictor import PREDICTOR_BITS, PredictorSet, load_predictors
from .selectors import AllSelector, GateSelector, LowRankSelector, OracleSelector
from .store.format import ALIGN, Component, LayerEntry, align_up, decode_bundles
from .store.store import BundleStore


@dataclass
class Sections:
    """Which of every layer's sections stay resident (the gate selector's gate rows)
    and which go through the neuron cache."""

    resident: List[int]
    cached: List[int]

    def components(self, layer: LayerEntry, resident: bool) -> List[Component]:
        chosen = self.resident if resident else self.cached
        return [c for k in chosen for c in layer.section_components(layer.sections[k])]


def split_sections(store: BundleStore, selector: str) -> Sections:
    """All sections are cached, except the gate/fc1 rows the `gate` selector keeps
    resident (a store converted with ``--layout gate``)."""
    m = store.manifest
    sections = m.layers[0].sections  # every layer has the same sections
    everything = list(range(len(sections)))
    if selector != "gate":
        return Sections([], everything)
    first = {m.rows[0], m.rows[0] + ".bias"}
    apart = [k for k, s in enumerate(sections) if set(s.components) <= first]
    if m.rows[0] not in [c for k in apart for c in sections[k].components]:
        raise FlashError(
            "the gate selector keeps gate/fc1 rows resident and reads the rest: it "
            "needs a store whose gate rows are stored apart",
            store.path,
            "convert the model with `python -m mlx_flash.convert ... --layout gate`",
        )
    return Sections(apart, [k for k in everything if k not in apart])


def make_selector(
    options: FlashOptions,
    store: BundleStore,
    i: int,
    ffn: nn.Module,
    sections: Sections,
    predictors: Optional[PredictorSet],
    dtype: mx.Dtype,
):
    """Layer `i`'s selector: what it scores with, and how much it keeps."""
    m, n = store.manifest, store.manifest.layers[i].neurons
    fraction = options.fraction_for(gated=len(m.rows) == 2)
    if options.selector == "all":
        return AllSelector(n)
    if options.selector == "oracle":
        return OracleSelector(ffn, fraction, options.threshold)
    if options.selector == "lowrank":
        recall = options.recall_for()
        cut = options.threshold if recall is None else predictors.threshold(i, recall)
        return LowRankSelector(predictors.predictors[i], fraction, cut)
    rows = store.read_neurons(i, np.arange(n), sections.resident)
    gate = decode_bundles(rows, sections.components(m.layers[i], True), dtype)
    bias = gate.get(m.rows[0] + ".bias")
    bias = None if bias is None else bias.reshape(-1)
    return GateSelector(ffn, gate[m.rows[0]], bias, fraction, options.threshold)


def setup(
    model: nn.Module,
    store: BundleStore,
    options: FlashOptions,
    dtype: mx.Dtype,
    budget: Optional[int],
    gap_bytes: int,
    working: int,
) -> Plan:
    """Plan the DRAM `budget` (bytes, or None) and give every layer's FlashFFN its
    selector, its neuron cache and its view of the shared scratch.

    `naive` (the paper's baseline) has no cache: each layer streams whole. Otherwise
    every layer has a cache the plan sizes: with `all` (the exact default) a cache of
    the whole layer computes from its slots with no reads after the first token, and
    a smaller one is the paper's hybrid (the first `capacity` neurons stay cached,
    the rest stream every token).
    """
    m = store.manifest
    sections = split_sections(store, options.selector)
    predictors = None
    if options.selector == "lowrank":
        neurons = [layer.neurons for layer in m.layers]
        predictors = load_predictors(
            store.path, m.hidden_size, neurons, bits=PREDICTOR_BITS
        )
    dense = sum(p.nbytes for _, p in nn.utils.tree_flatten(model.parameters()))
    p = plan(
        store,
        budget,
        dense,
        [sections.components(layer, False) for layer in m.layers],
        [sections.components(layer, True) for layer in m.layers],
        dtype,
        predictors.nbytes if predictors else 0,
        working,
    )
    use_cache = not options.naive
    if not use_cache:
        p.capacity = p.scratch = 0  # no caches: the dense part and the reader only
    p.expected_bytes = expected_bytes(m.layers, sections, options, p.capacity)
    # the layers take turns: one scratch serves them all, each viewing its own width
    scratch = np.empty(p.scratch, np.uint8) if use_cache else None
    cache_dtype = mx.float32 if dtype == mx.float32 else mx.float16
    for i, layer in enumerate(model.layers):
        entry, ffn = m.layers[i], layer.mlp
        select = make_selector(options, store, i, ffn, sections, predictors, dtype)
        width = entry.bundle_bytes(sections.cached)
        gap = options.gap if options.gap is not None else gap_bytes // width
        cache = rows = None
        if use_cache:
            cached = sections.components(entry, False)
            n = entry.neurons
            cache = NeuronCache(cached, n, min(p.capacity, n), cache_dtype, options.window)
            rows = scratch[: n * width].reshape(n, width)
        ffn.setup(select, cache, sections.cached, gap, rows)
    return p


def expected_bytes(
    layers: List[LayerEntry], sections: Sections, options: FlashOptions, capacity: int
) -> Optional[int]:
    """Bytes read per decoded token once the caches are warm, where the plan alone
    decides it: `naive` reads every layer whole; `all` the neurons its caches cannot
    hold (the paper's hybrid streams the rest). Other selectors: None."""
    if options.naive:  # each section read whole (aligned: it starts on a block)
        return sum(
            align_up(s.offset + layer.neurons * s.bundle_bytes) - s.offset
            for layer in layers
            for s in layer.sections
        )
    if options.selector != "all":
        return None
    total = 0
    for layer in layers:  # the streamed tail [capacity, n) of each cached section,
        for k in sections.cached:  # read as one run widened to 4 KiB for direct I/O
            s = layer.sections[k]
            if capacity < layer.neurons:
                start = s.offset + capacity * s.bundle_bytes
                stop = s.offset + layer.neurons * s.bundle_bytes
                total += align_up(stop) - (start - start % ALIGN)
    return total

"""Setting up a loaded flash model: its DRAM plan, what streams, each layer's cache.

`FlashModel.setup_flash` (utils.py) calls `setup` once the model is built and its dense
part loaded lazily (nothing read yet): the model sets up its own layers, as an mlx-lm
model makes its own caches. Each step is a small function: which sections a selector
keeps resident, the selector state it loads (predictors, gate rows), the weight groups
and neurons the planner weighs (`planner.py`), and what each layer receives. Only then
are the resident weights read; the streamed ones never are, until used.
"""

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx.utils import tree_flatten

from .budget import (
    MIN_PREFILL,
    PREFILL_COST,
    RUNTIME,
    decoded_bytes,
    in_flight_bytes,
    parse_budget,
    pool_bytes,
    prefill_bytes,
    prefill_step,
    staged_bytes,
    working_bytes,
)
from .disk_embedding import table_on_disk
from .errors import FlashError
from .hot_set import OnlineHotSet, propose_split
from .input_sparse import Calibration, InputSelector, load_calibration
from .neuron_cache import NeuronCache, Slots
from .neuron_profile import NeuronProfile, has_profile, load_profile
from .options import DEFAULT_FRACTION, FlashOptions
from .planner import PREFILL, Group, Neurons, Plan, plan_residency
from .read_ahead import ReadAhead
from .predictor import PREDICTOR_BITS, PredictorSet, load_predictors
from .selectors import (
    SHADOW_GROUP,
    AllSelector,
    GateSelector,
    LowRankSelector,
    OracleSelector,
    Shadow,
    ShadowSelector,
)
from .sparse_ffn import ACTIVATIONS, Columns
from .stats import FlashStats
from .store.encoding import Encoding
from .store.format import (
    ALIGN,
    DENSE_NAME,
    Component,
    LayerEntry,
    decode_bundles,
    dequantize,
)
from .store.aligned_safetensors import MLX_DTYPES
from .store.store import BundleStore, read_bytes, read_chunks
from .streamed import (
    DenseStream,
    StreamedHead,
    StreamedModule,
    TensorAt,
    dense_tensors,
    head_rows,
    span,
)

# A run computed where it was read costs a few MLX ops of its own (its products, its
# scales converted: ~30 us each on a 2-core x86). The `input` selector's columns (a
# channel's bundle 13 KB on Qwen2.5-Coder-1.5B, ~76% of them kept) read with the
# reader's 24 KiB gap came in ~72 runs a layer: 2,029-2,189 ms a token against
# 1,489-1,682 with runs merged across 256 KiB (868 MB read instead of 836; at 580
# MiB, no limit, 2026-12-08). So its channels merge across gaps up to this many
# bytes, their unneeded columns read and multiplied by zero. (Its down rows keep the
# reader's gap: they already come in ~2 runs a layer, and a wider gap would read
# past the neurons the cache holds.)
IN_PLACE_RUN_BYTES = 256 * 1024

# A streamed LM head is read in chunks of vocabulary rows of about this many bytes:
# one chunk in flight, so the floor does not hold a whole head
HEAD_CHUNK_BYTES = 1 << 20  # (or the largest attention read, if larger)


@dataclass
class Sections:
    """Which of every layer's sections stay resident (the gate selector's gate rows)
    and which go through the neuron cache (None: all of a layer's; a planar store's
    layers may have different numbers, one per part of each layer's encodings)."""

    resident: List[int]
    cached: Optional[List[int]]

    def chosen(self, layer: LayerEntry, resident: bool) -> List[int]:
        if resident:
            return self.resident
        return list(range(len(layer.sections))) if self.cached is None else self.cached

    def components(self, layer: LayerEntry, resident: bool) -> List[Component]:
        return [
            c
            for k in self.chosen(layer, resident)
            for c in layer.section_components(layer.sections[k])
        ]


def split_sections(store: BundleStore, selector: str) -> Sections:
    """All sections are cached, except the gate/fc1 rows the `gate` selector keeps
    resident (a store converted with ``--layout gate``); the `input` selector reads
    the output projection's rows alone (its gate/up come by column: ``--layout
    columns``)."""
    m = store.manifest
    sections = m.layers[0].sections  # every layer has the same sections
    everything = list(range(len(sections)))
    if selector == "input":
        store.entry(0, columns=True)  # the columns, or the error naming the fix
        down = [k for k, s in enumerate(sections) if s.components == [m.column]]
        if not down:
            raise FlashError(
                "the input selector reads down rows alone: it needs a store whose "
                "down rows are stored apart",
                store.path,
                "convert the model with `python -m mlx_flash.convert ... --layout "
                "columns`",
            )
        return Sections([], down)
    if selector != "gate":
        return Sections([], None)
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


@dataclass
class SelectorState:
    """What a selector scores with, loaded once for every layer: the predictors
    (lowrank), the thresholds (input), the shadow (its copies are made per layer),
    and the layers whose gate rows the plan streams (gate)."""

    predictors: Optional[PredictorSet] = None
    calibration: Optional[Calibration] = None
    shadow: Optional[Shadow] = None
    gate_streamed: set = field(default_factory=set)


def selector_state(store: BundleStore, options: FlashOptions) -> SelectorState:
    m, state = store.manifest, SelectorState()
    if options.selector == "lowrank":
        neurons = [layer.neurons for layer in m.layers]
        state.predictors = load_predictors(
            store.path, m.hidden_size, neurons, bits=PREDICTOR_BITS
        )
    if options.selector == "input":
        state.calibration = load_calibration(
            store.path, options.sparsity_for(), len(m.layers)
        )
    if options.selector == "shadow":
        if len(m.rows) != 2 or m.hidden_size % SHADOW_GROUP:
            raise FlashError(
                f"the shadow selector copies gate and up rows in groups of "
                f"{SHADOW_GROUP}: it needs a gated FFN whose hidden size divides by "
                f"{SHADOW_GROUP} (this one: {'/'.join(m.rows)}, {m.hidden_size})",
                store.path,
                "use --selector gate, lowrank or input",
            )
        state.shadow = Shadow(ACTIVATIONS[m.activation], options.shadow_bits)
    return state


def shadow_bytes(store: BundleStore, shadow: Optional[Shadow]) -> int:
    m = store.manifest
    if shadow is None:
        return 0
    return sum(shadow.bytes_for(layer.neurons, m.hidden_size) for layer in m.layers)


def make_selector(
    options: FlashOptions,
    store: BundleStore,
    i: int,
    ffn: nn.Module,
    sections: Sections,
    state: SelectorState,
    dtype: mx.Dtype,
):
    """Layer `i`'s selector: what it scores with, and how much it keeps (`gate`:
    its rows held, or, where the plan streams them, read for every token;
    `shadow`: its low-bit copy of the layer's gate and up rows, made now)."""
    m, n = store.manifest, store.manifest.layers[i].neurons
    fraction = options.fraction_for(gated=len(m.rows) == 2)
    if options.selector == "all":
        return AllSelector(n)
    if options.selector == "input":
        return InputSelector(state.calibration.layers[i])
    if options.selector == "oracle":
        return OracleSelector(ffn, fraction, options.threshold)
    if options.selector == "lowrank":
        predictors = state.predictors
        recall, sparsity = options.recall_for(), options.sparsity_for()
        cut = options.threshold
        if sparsity is not None:
            cut = predictors.allocated(sparsity)[i]
        elif recall is not None:
            cut = predictors.threshold(i, recall)
        return LowRankSelector(predictors.predictors[i], fraction, cut)
    if options.selector == "shadow":  # gate and up read once, down not at all
        gate_up = [
            k
            for k, s in enumerate(m.layers[i].sections)
            if set(s.components) & set(m.rows)
        ]
        w = store.read_layer(i, mx.float32, sections=gate_up)
        rows = {name: dequantize(w[name], m.hidden_size) for name in m.rows}
        copies = state.shadow.quantize(i, rows, m.rows)
        del w, rows
        mx.eval(copies)
        return ShadowSelector(state.shadow, copies, fraction, options.threshold)

    def gate_rows():
        rows = store.read_neurons(i, np.arange(n), sections.resident)
        gate = decode_bundles(rows, sections.components(m.layers[i], True), dtype)
        bias = gate.get(m.rows[0] + ".bias")
        return gate[m.rows[0]], None if bias is None else bias.reshape(-1)

    if i in state.gate_streamed:  # read with each token (the plan could not hold them)
        return GateSelector(ffn, gate_rows, None, fraction, options.threshold)
    rows, bias = gate_rows()
    mx.eval(rows, [] if bias is None else bias)
    return GateSelector(ffn, rows, bias, fraction, options.threshold)


@dataclass
class Candidate:
    """A weight group the planner weighs, and how to make it stream."""

    group: Group
    stream: Callable[[DenseStream], None]
    dense: bool = True  # read from the dense file (else from the bundles, by the store)


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))


def module_paths(model: nn.Module) -> Dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def attention_candidates(
    model: nn.Module, tensors: Dict[str, TensorAt]
) -> List[Candidate]:
    """Each layer's modules beside the FFN that hold matrices (the attention): read
    whole every token when streamed."""
    paths, found = module_paths(model), []
    for layer in model.layers:
        for name, child in layer.children().items():
            if name == "mlp" or not isinstance(child, nn.Module):
                continue
            params = tree_flatten(child.parameters())
            prefix = paths[id(child)] + "."
            if not any(p.ndim >= 2 for _, p in params):
                continue  # norms: too small to stream
            if any(prefix + k not in tensors for k, _ in params):
                continue  # not stored under the model's names: stays resident
            ts = [tensors[prefix + k] for k, _ in params]
            group = Group(
                prefix[:-1].removeprefix("model."),
                parameter_bytes(child),
                span(ts),
                span(ts),
                converted(params, ts),
            )

            def stream(s, layer=layer, name=name, child=child, prefix=prefix):
                setattr(layer, name, StreamedModule(child, prefix, tensors, s))

            found.append(Candidate(group, stream))
    return found


def head_chunk(attention: List[Candidate]) -> int:
    """Bytes per chunk of a streamed LM head: `HEAD_CHUNK_BYTES`, or the largest
    attention read where larger (the stream's buffer holds that anyway)."""
    return max([HEAD_CHUNK_BYTES] + [c.group.staging for c in attention])


def encoding_of(module: nn.Module) -> Encoding:
    """How a linear layer's or a table's weight is stored (for `matmul`)."""
    if not hasattr(module, "bits"):
        return Encoding("float32")
    mode = getattr(module, "mode", "affine")
    return Encoding(
        "float32" if mode == "affine" else "uint8", module.bits, module.group_size, mode
    )


def parent_of(model: nn.Module, path: str) -> Tuple[nn.Module, str]:
    *parents, name = path.split(".")
    at = model
    for p in parents:
        at = at[int(p)] if isinstance(at, list) else getattr(at, p)
    return at, name


def head_candidates(
    model: nn.Module,
    tensors: Dict[str, TensorAt],
    dims: int,
    dense_path: Path,
    chunk: int,
    checker=None,
) -> List[Candidate]:
    """The LM head (an untied `lm_head`, or the tied token table) and an untied token
    table (its rows' blocks checked by `checker` when first read)."""
    paths = module_paths(model)
    table = next(
        (
            m
            for m in model.modules()
            if isinstance(m, (nn.Embedding, nn.QuantizedEmbedding))
            and paths.get(id(m), "").endswith("embed_tokens")
        ),
        None,
    )
    found = []
    head = model.get("lm_head")
    if isinstance(head, nn.Module) and head.parameters():
        parts = {
            k: tensors["lm_head." + k]
            for k, _ in tree_flatten(head.parameters())
            if "lm_head." + k in tensors
        }
        if "weight" in parts and len(parts) == len(tree_flatten(head.parameters())):

            def stream(s, head=head, parts=parts):
                model.lm_head = streamed_head(parts, encoding_of(head), s, chunk)

            group = head_group("lm_head", head, parts, chunk)
            found.append(Candidate(group, stream))
    if table is None:
        return found
    path = paths[id(table)]
    parts = {k: tensors.get(f"{path}.{k}") for k in ("weight", "scales", "biases")}
    parts = {k: v for k, v in parts.items() if v is not None}
    if len(parts) != len(tree_flatten(table.parameters())) or "weight" not in parts:
        return found  # not stored under the model's names: stays resident
    tied = head is None or not isinstance(head, nn.Module)
    vocab = parts["weight"].shape[0]

    def stream(s, table=table, parts=parts, path=path):
        disk = table_on_disk(dense_path, vocab, dims, path + ".", checker)
        if tied:
            disk.head = streamed_head(parts, encoding_of(table), s, chunk)
        parent, name = parent_of(model, path)
        setattr(parent, name, disk)

    row = sum(t.nbytes // t.shape[0] for t in parts.values())  # one per token, pread
    if tied:  # the head's chunks and the token's row
        group = head_group(path + " (tied LM head)", table, parts, chunk)
        group = replace(group, streamed=group.streamed + row)
    else:
        group = Group(path.removeprefix("model."), parameter_bytes(table), row, 0, 0)
    found.append(Candidate(group, stream))
    return found


def head_group(
    name: str, module: nn.Module, parts: Dict[str, TensorAt], chunk: int
) -> Group:
    rows = head_rows(parts, chunk)
    vocab = parts["weight"].shape[0]
    chunks = [(a, min(a + rows, vocab)) for a in range(0, vocab, rows)]
    per_chunk = [span([t.rows(a, b) for t in parts.values()]) for a, b in chunks]
    params = [(k, p) for k, p in tree_flatten(module.parameters()) if k in parts]
    arrays = converted(params, [parts[k] for k, _ in params])
    arrays = -(-max(b - a for a, b in chunks) * arrays // vocab)  # one chunk's
    return Group(name, parameter_bytes(module), sum(per_chunk), max(per_chunk), arrays)


def converted(params: List[Tuple[str, mx.array]], tensors: List[TensorAt]) -> int:
    """DRAM a streamed pass of these parameters takes beside the staging buffer its
    arrays view: the floats stored in another dtype than the parameter's."""
    return sum(
        p.nbytes
        for (_, p), t in zip(params, tensors)
        if t.floating and MLX_DTYPES[t.dtype] != p.dtype
    )


def streamed_head(
    parts: Dict[str, TensorAt], encoding: Encoding, s: DenseStream, chunk: int
) -> StreamedHead:
    return StreamedHead(parts, encoding, head_rows(parts, chunk), s)


def gate_candidates(
    store: BundleStore, sections: Sections, dtype: mx.Dtype, streamed: set
) -> List[Candidate]:
    """The `gate` selector's rows of each layer: held, or read whole every token
    (then the selection costs that read, and stays exact)."""
    found = []
    for i, entry in enumerate(store.manifest.layers):
        cs = sections.components(entry, True)
        if not cs:
            continue
        read = entry.whole_read(sections.resident)
        group = Group(
            f"layers.{i}.gate rows",
            entry.neurons * decoded_bytes(cs, dtype),
            read,
            read,
            entry.neurons * in_flight_bytes(cs, dtype),
        )
        found.append(Candidate(group, lambda s, i=i: streamed.add(i), dense=False))
    return found


def neuron_profile(
    store: BundleStore, options: FlashOptions
) -> Optional[NeuronProfile]:
    """The store's neuron profile, for a selector that picks a share of the neurons
    (`all` and `naive` use every neuron: no profile needed)."""
    if options.selector in ("all", "input") or options.naive:
        return None  # (input: its channels and neurons are as likely as any other)
    if not has_profile(store.path):
        return None
    return load_profile(store.path, store.manifest)


def page_bytes(bundle: int, share: float, gap: int = 0) -> int:
    """What reading one selected bundle of `bundle` bytes costs when a random `share`
    of a section's bundles is read the way the reader reads them (`read_bytes`):
    runs at most `gap` unneeded bundles apart merged, each run widened to 4 KiB.
    After a selected bundle come l unneeded ones with probability
    share x (1 - share)^l; they are read whole when l <= gap or when they span
    less than a page (both neighbours' pages cover them), else only the two ends'
    alignment: P - g on average (g = gcd(bundle, P): bundle offsets fall on
    multiples of g; a bundle of whole pages has none). Measured: Qwen2.5-Coder-0.5B's
    down rows (1,008 bytes, 4 a page) at 44% selected read 96% of their section;
    its q5 columns (7,296 bytes, gap 3) at 78% kept, 97% (the plan's estimate missed
    the gap and fell 13% short of the race's measured bytes)."""
    if share >= 1:
        return bundle
    share = max(share, 1e-6)
    slack = ALIGN - math.gcd(bundle, ALIGN)  # a long gap's two ends, on average
    last = max(gap, -(-ALIGN // bundle))  # past it, every gap costs `slack`
    lengths = np.arange(1, last + 1)
    chance = share * (1 - share) ** lengths
    gaps = lengths * bundle
    read = np.where((lengths <= gap) | (gaps < ALIGN), gaps, np.minimum(gaps, slack))
    tail = slack * (1 - share) ** (last + 1)
    return int(bundle + float((chance * read).sum()) + tail)


def channel_gap(entry: LayerEntry, gap_bytes: int, in_place: bool) -> int:
    """The `input` selector's read gap in channels: the reader's gap in bytes over a
    channel's bundle, at least `IN_PLACE_RUN_BYTES` where the runs are computed as
    read (`computed_where_read`)."""
    return (max(gap_bytes, IN_PLACE_RUN_BYTES) if in_place else gap_bytes) // (
        entry.bundle_bytes()
    )


def neuron_gap(entry: LayerEntry, sections: Sections, options, gap_bytes: int) -> int:
    """A layer's read gap in neurons: `--gap`, else the reader's gap in bytes over
    the width of a cached bundle."""
    if options.gap is not None:
        return options.gap
    return gap_bytes // entry.bundle_bytes(sections.chosen(entry, False))


def neuron_layers(
    store: BundleStore,
    sections: Sections,
    options: FlashOptions,
    dtype: mx.Dtype,
    profile: Optional[NeuronProfile],
    calibration: Optional[Calibration] = None,
    gap_bytes: int = 0,
    where_read: bool = False,
) -> List[Neurons]:
    """Each layer's neurons as the planner weighs them: their decoded and stored
    bytes and how often a token selects each (a profile's frequencies, most frequent
    first; else the selector's share; `all`: every neuron every token). With a
    `calibration` (the input selector), each layer's down rows, then each layer's
    input channels (their gate/up columns), at the calibrated shares."""
    m, layers = store.manifest, []
    share = options.fraction_for(gated=len(m.rows) == 2) or DEFAULT_FRACTION
    if calibration is not None:
        kinds = [
            (
                m.layers,
                lambda e: sections.chosen(e, False),
                lambda e: neuron_gap(e, sections, options, gap_bytes),
                "neurons",
            ),
            (
                m.columns,
                lambda e: list(range(len(e.sections))),
                lambda e: channel_gap(e, gap_bytes, where_read),
                "channels",
            ),
        ]
        for entries, chosen, gap, stage in kinds:
            for entry, k in zip(entries, calibration.layers):
                ks, share = chosen(entry), 1 - getattr(k, stage)
                cs = [
                    c for j in ks for c in entry.section_components(entry.sections[j])
                ]
                read = section_pages([entry.sections[j] for j in ks], share, gap(entry))
                use = np.full(entry.neurons, share)
                layers.append(Neurons(decoded_bytes(cs, dtype), read, use))
        return layers
    for i, entry in enumerate(m.layers):
        cs = sections.components(entry, False)
        if options.selector == "all":
            use = np.ones(entry.neurons)
        elif profile is not None:
            counts = profile.layers[i]
            use = counts.frequency()[counts.hot_ids(entry.neurons)]
        else:
            use = np.full(entry.neurons, share)
        layers.append(Neurons(decoded_bytes(cs, dtype), sum(c.nbytes for c in cs), use))
    return layers


def setup(
    model: nn.Module,
    store: BundleStore,
    options: FlashOptions,
    dtype: mx.Dtype,
    budget: Optional[int],
    gap_bytes: int,
    kv_cache: int,
    context: int,
    config: dict,
    stats: FlashStats,
    threads: int,
) -> Plan:
    """Plan the DRAM `budget` (bytes, or None), make what the plan streams stream,
    and give every layer's FlashFFN its selector, its neuron cache (the hot part
    read now) and the pool its streamed neurons are decoded into.

    `naive` (the paper's baseline) has no neuron cache: each layer's FFN streams
    whole. Otherwise every layer has the cache the plan sizes: with `all` (the exact
    default) whole layers are cached first, which compute from their slots with no
    reads after the first token; a partial one is the paper's hybrid (the first
    `capacity` neurons stay cached, the rest stream every token); the others stream.
    The KV cache (`kv_cache` bytes for `context` tokens) and the working memory of
    decoding and of one prefill step are fixed; the prefill step is the largest
    that costs decoding at most `PREFILL_COST` more bytes per token and fits its
    share of the budget (`budget.prefill_step`).
    """
    m = store.manifest
    where_read = computed_where_read(store, options)
    sections = split_sections(store, options.selector)
    state = selector_state(store, options)
    calibration = state.calibration
    profile = neuron_profile(store, options)
    tensors = dense_tensors(store.path / DENSE_NAME)
    candidates = attention_candidates(model, tensors)
    chunk = head_chunk(candidates)
    dense_checker = store.checkers.get(DENSE_NAME)
    candidates += head_candidates(
        model, tensors, m.hidden_size, store.path / DENSE_NAME, chunk, dense_checker
    )
    dense_groups = sum(c.group.resident for c in candidates)
    candidates += gate_candidates(store, sections, dtype, state.gate_streamed)
    groups = [c.group for c in candidates]
    layers = []
    if not options.naive:
        layers = neuron_layers(
            store,
            sections,
            options,
            dtype,
            profile,
            calibration,
            gap_bytes,
            where_read,
        )
    # a layer's streamed neurons decoded (the whole layer at most), one per shape;
    # computed where they were read, only their floats converted (no pool), a
    # piece at a time
    if options.stream_piece is not None and not where_read:
        raise FlashError(
            "--stream-piece streams layers computed where they are read: a planar "
            "store with --selector all (or --naive) and no --window",
            store.path,
            "drop --stream-piece, or convert the model with --layout planar",
        )
    if options.stream_piece is not None:
        # its two staging buffers (one computing, one reading ahead) hold a piece
        # each, not a layer (2 x 27 MiB on Qwen2.5-Coder-1.5B): the rest is cached
        whole = max(e.whole_read() for e in m.layers)
        piece = parse_budget(options.stream_piece, whole)
        # (a piece holds a neuron at least: a block per section, and one more each)
        least = max(e.bundle_bytes() + 2 * ALIGN * len(e.sections) for e in m.layers)
        store.restage(min(whole, max(piece, least)))
    per_neuron = staged_bytes if where_read else pool_bytes
    # (with `calibration`, also the kept channels' columns streamed past the cache)
    flight = 0
    for cs, n in (
        *pool_shapes(m.layers).values(),
        *(pool_shapes(m.columns).values() if calibration is not None else ()),
    ):
        if where_read:  # the most neurons one piece holds
            n = min(n, len(store.reader.buffer) // sum(c.nbytes for c in cs))
        flight += n * per_neuron(cs, dtype)
    fixed = {
        "dense (small tensors)": parameter_bytes(model) - dense_groups,
        "KV cache and working memory": working_bytes(
            config, m.hidden_size, kv_cache, dtype
        ),
        # earlier requests' KV caches a server keeps (its prompt cache)
        "prompt caches": options.prompt_caches * kv_cache,
        PREFILL: 0,  # below
        "FFN reader": len(store.reader.buffer),
        # a second staging buffer, the next layer's read in flight (read_ahead.py)
        "FFN read-ahead": len(store.reader.buffer) if reads_ahead(options) else 0,
        "FFN in flight": flight,
        "predictors": state.predictors.nbytes if state.predictors else 0,
        "shadow": shadow_bytes(store, state.shadow),
        "checksums": store.checks_bytes,  # the table, a flag per block
        "runtime": RUNTIME,
    }
    # a selector with no profile: every layer the same slots (an LRU hits nowhere
    # without); input's columns and down rows differ, each weighed by its own worth
    even = options.selector not in ("all", "input") and profile is None

    def prefill(n: int) -> int:
        args = (config, m.hidden_size, m.intermediate_size, n, context, dtype)
        return prefill_bytes(*args)

    def plan(step: int) -> Plan:
        p = plan_residency(
            budget, {**fixed, PREFILL: prefill(step)}, groups, layers, even, store.path
        )
        p.prefill_step = step
        return p

    # Decoding first: the smallest step, then doubled while that costs decoding at
    # most PREFILL_COST more bytes per token (at Qwen2.5-Coder-0.5B's 50% an eighth
    # of the budget for prefill would have pushed its 166 MiB head out: +48% reads)
    cap = prefill_step(budget, prefill, options.prefill_step_size)
    p = plan(min(MIN_PREFILL, cap))
    least, best = dict(p.fixed), p.estimate()  # the floor's fixed part; its reads
    while p.prefill_step < cap:
        try:
            bigger = plan(min(p.prefill_step * 2, cap))
        except FlashError:
            break
        if bigger.estimate() > best * (1 + PREFILL_COST):
            break
        p = bigger
    p.least_fixed = least
    if calibration is not None:
        p.channels_from = len(m.layers)
    if options.naive:
        p.capacities = [0] * len(m.layers)
    staging = max(
        (c.group.staging for c, h in zip(candidates, p.held) if c.dense and not h),
        default=0,
    )
    stream = None
    if staging:  # the dense part's own reader, sized for its largest read
        stream = DenseStream(
            store.path / DENSE_NAME,
            staging,
            threads,
            options.reader,
            stats,
            store.checkers.get(DENSE_NAME),
        )
        stream.dtype = dtype
    for c, h in zip(candidates, p.held):
        if not h:
            c.stream(stream)
    model.flash_stream = stream
    p.pinned = [0] * len(m.layers)
    if profile is not None:
        p.pinned = [
            propose_split(profile.layers[i], c) for i, c in enumerate(p.capacities)
        ]
    give_layers_their_caches(
        model,
        store,
        options,
        dtype,
        gap_bytes,
        p,
        sections,
        state,
        profile,
        where_read,
    )
    streamed = sum(g.streamed for g in p.streamed())
    ffn = expected_ffn_bytes(
        m.layers, sections, options, p.capacities, len(store.reader.buffer)
    )
    if ffn is not None:
        p.expected_bytes = streamed + ffn
    elif calibration is not None:  # an estimate: the shares past the caches,
        p.expected_bytes = int(p.estimate())  # each bundle's pages counted
    elif profile is not None or options.fraction_for(len(m.rows) == 2) is not None:
        # an estimate: the frequencies (or the share a token takes) past the caches
        p.expected_bytes = streamed + int(
            sum(
                selected_reads(e, sections, float(n.use[c:].sum()), gap)
                for e, n, c in zip(m.layers, p.layers, p.capacities)
                for gap in [neuron_gap(e, sections, options, gap_bytes)]
            )
        )
    return p


def selected_reads(entry: LayerEntry, sections: Sections, selected: float, gap: int):
    """Bytes a layer reads for `selected` neurons a token (on average) past its
    cache, spread over the layer: each cached section read the reader's way
    (`page_bytes`: runs `gap` neurons apart merged, widened to pages), a planar
    store's parts each in a section of its own. (The planner weighs a neuron by its
    bundle bytes alone: counted with its pages here, the caches looked worth more
    than they are and the plans read 7-15% more, SmolLM2 with `shadow`.)"""
    chosen = [entry.sections[k] for k in sections.chosen(entry, False)]
    return selected * section_pages(chosen, selected / entry.neurons, gap)


def section_pages(chosen: list, share: float, gap: int) -> int:
    """What reading one selected bundle of the `chosen` sections costs when a
    random `share` is selected: each section read the reader's way (`page_bytes`),
    a planar store's parts each in a section of its own."""
    return sum(page_bytes(s.bundle_bytes, share, gap) for s in chosen)


def give_layers_their_caches(
    model,
    store,
    options,
    dtype,
    gap_bytes,
    p: Plan,
    sections,
    state: SelectorState,
    profile,
    where_read: bool,
) -> None:
    """Every layer's selector, cache and pool; `where_read`: the streamed neurons
    are computed from the staging buffer (`computed_where_read`), so the layers' pool
    takes no rows."""
    m, calibration = store.manifest, state.calibration
    sparse = options.selector != "all" and not options.naive
    # layers with a cache: every layer of a sparse selector (the overflow streams past
    # even an empty cache); with `all`, those the plan caches (naive plans none); the
    # others stream whole. The layers take turns: one pool per shape serves them all.
    pools = {
        key: Slots(cs, 0 if where_read else n, dtype, convert=False)
        for key, (cs, n) in pool_shapes(m.layers).items()
    }
    pools.update(
        (key, Slots(cs, 0 if where_read else n, dtype, convert=False))
        for key, (cs, n) in pool_shapes(m.columns or []).items()
    )
    ffns = [layer.mlp for layer in model.layers]
    ahead = ReadAhead(store, ffns) if reads_ahead(options) else None
    model.flash_read_ahead = ahead
    # no profile: a selector that picks a share of the neurons counts them as it
    # decodes and pins its caches' hot parts from the counts (hot_set.OnlineHotSet)
    online = None
    if sparse and options.selector != "input" and profile is None and any(p.capacities):
        online = OnlineHotSet([e.neurons for e in m.layers])
    model.flash_hot_set = online
    for i, layer in enumerate(model.layers):
        entry, ffn = m.layers[i], layer.mlp
        select = make_selector(options, store, i, ffn, sections, state, dtype)
        gap = neuron_gap(entry, sections, options, gap_bytes)
        cache = None
        if sparse or p.capacities[i] > 0:
            n = entry.neurons
            pinned = profile.hot_ids(i, p.pinned[i]) if profile is not None else None
            cache = NeuronCache(
                sections.components(entry, False),
                n,
                min(p.capacities[i], n),
                dtype,
                options.window,
                pinned,
            )
            if pinned is not None and len(pinned):  # the hot part, read once
                pieces = store.read_runs(i, pinned, sections.chosen(entry, False))
                for positions, components, rows in pieces:
                    cache.put(positions, components, rows)
        columns = None
        if calibration is not None:
            c_entry, capacity = m.columns[i], p.capacities[len(m.layers) + i]
            c_cache = NeuronCache(
                list(c_entry.components.values()),
                c_entry.neurons,
                min(capacity, c_entry.neurons),
                dtype,
                options.window,
            )
            c_gap = channel_gap(c_entry, gap_bytes, where_read)
            every = list(range(len(c_entry.sections)))
            columns = Columns(c_cache, pools[shape_key(c_entry)], c_gap, every)
        pool = pools[shape_key(entry)]
        cached = sections.chosen(entry, False)
        ffn.setup(select, cache, cached, gap, pool, columns, ahead, online)


def reads_ahead(options: FlashOptions) -> bool:
    """Whether the layers read ahead (`read_ahead.py`): `all` and `naive`, whose
    reads are known before the layer runs, unless `no_read_ahead`."""
    return options.selector == "all" and not options.no_read_ahead


def shape_key(entry: LayerEntry) -> tuple:
    return tuple((c.name, c.length, c.encoding) for c in entry.components.values())


def pool_shapes(layers: List[LayerEntry]) -> Dict[tuple, Tuple[List[Component], int]]:
    """The layers' distinct bundle shapes (components and encodings): each one's
    components and the most neurons a layer of it has."""
    shapes = {}
    for entry in layers:
        key = shape_key(entry)
        n = max(entry.neurons, shapes[key][1] if key in shapes else 0)
        shapes[key] = (list(entry.components.values()), n)
    return shapes


def computed_where_read(store: BundleStore, options: FlashOptions) -> bool:
    """Whether every streamed neuron is computed from the staging buffer it was read
    into, never copied into the pool: `all` (and naive) with no window on a planar
    store, whose layers stream whole or from a neuron on, one run per section
    (`FlashFFN._staged`); `input` on a store whose rows and columns are planar, its
    runs read whole and the neurons read past masked (`FlashFFN._in_place`)."""
    m = store.manifest
    planar = all(s.part for e in m.layers for s in e.sections)
    if options.selector == "input":  # both stages' runs read whole, masked
        return planar and all(s.part for e in m.columns or [] for s in e.sections)
    return planar and options.selector == "all" and options.window is None


def expected_ffn_bytes(
    layers: List[LayerEntry],
    sections: Sections,
    options: FlashOptions,
    capacities: List[int],
    staging: int,
) -> Optional[int]:
    """FFN bytes read per decoded token once the caches are warm, where the plan
    alone decides it: `naive` and uncached layers read whole; `all` the neurons its
    caches cannot hold (the paper's hybrid streams the rest), each read in the
    pieces a `staging`-byte buffer takes (`read_chunks`), its runs widened to 4 KiB
    for direct I/O. Other selectors: None."""
    if not options.naive and options.selector != "all":
        return None
    total = 0
    for layer, capacity in zip(layers, capacities):
        if capacity == 0 or options.naive:  # every section, whole
            chosen, ids = layer.sections, np.arange(layer.neurons)
        else:  # the streamed tail [capacity, n) of the chosen sections
            chosen = [layer.sections[k] for k in sections.chosen(layer, False)]
            ids = np.arange(capacity, layer.neurons)
        if len(ids):
            pieces = read_chunks(chosen, ids, 0, staging)
            total += sum(read_bytes(chosen, piece, 0) for piece in pieces)
    return total

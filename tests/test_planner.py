"""The DRAM planner: its invariants (property-based), and every budget above the floor
running exact `all` decoding, down to one that streams attention and the LM head."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import ARCHS, make_checkpoint
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

import mlx_flash.flash_setup as flash_setup
from mlx_flash import convert, load
from mlx_flash.errors import FlashError
from mlx_flash.planner import Group, Neurons, floor_bytes, plan_residency
from mlx_flash.store.safety import check_safetensors
from mlx_flash.store.store import read_manifest as store_manifest
from mlx_flash.streamed import StreamedHead, StreamedModule

PROMPT = [1, 5, 6, 7, 8, 9, 10, 3]

sizes = st.integers(1, 5000)
groups = st.lists(
    st.builds(
        lambda r, s, k, f: Group("g", r, s, k, f),
        sizes,
        sizes,
        st.integers(0, 3000),
        st.integers(0, 3000),
    ),
    max_size=6,
)
layers = st.lists(
    st.builds(
        lambda r, s, use: Neurons(r, s, np.sort(np.array(use))[::-1]),
        st.integers(1, 300),
        st.integers(1, 300),
        st.lists(st.floats(0, 1), min_size=1, max_size=40),
    ),
    max_size=4,
)
fixed = st.dictionaries(st.sampled_from(["kv", "reader", "runtime"]), sizes, min_size=1)


@settings(max_examples=300, deadline=None)
@given(
    fixed,
    groups,
    layers,
    st.booleans(),
    st.integers(0, 60000),
    st.integers(0, 60000),
)
def test_planner_invariants(fixed, groups, layers, even, a, b):
    """Every group held or streamed, each cache within its layer; the total within
    the budget; more budget never means more bytes per token; below the floor, the
    error."""
    plans = []
    for budget in sorted((a, b)):
        try:
            p = plan_residency(budget, fixed, groups, layers, even)
        except FlashError as e:
            assert "floor" in str(e) and "--dram-budget" in str(e)
            held = sum(fixed.values()) + sum(g.resident for g in groups if g.staging)
            assert budget < min(floor_bytes(fixed, groups), held)
            plans.append(None)
            continue
        assert len(p.held) == len(groups)
        assert len(p.streamed()) == len(groups) - sum(p.held)
        assert all(0 <= c <= n.count for c, n in zip(p.capacities, layers))
        assert p.total <= budget
        if even:
            assert (
                max(p.capacities, default=0) - min(p.capacities, default=0)
                <= max(n.count for n in layers)
                if layers
                else True
            )
        plans.append(p)
    small, large = plans
    if small is not None:
        assert large is not None and large.estimate() <= small.estimate() + 1e-6


def test_no_budget_holds_everything():
    g = [Group("a", 100, 100, 100, 100)]
    n = [Neurons(10, 10, np.ones(5))]
    p = plan_residency(None, {"kv": 1}, g, n)
    assert p.held == [True] and p.capacities == [5] and p.estimate() == 0


# every load names its context: the default one shrinks with the budget, which would
# move the floor between two loads


def greedy(model, n=12):
    steps = generate_step(
        mx.array(PROMPT), model, max_tokens=n, sampler=lambda l: mx.argmax(l, -1)
    )
    return [int(t) for t, _ in steps]


def reads_ahead_after(model, reader, warm: int, steps: int):
    """Greedy steps from the prompt (the first), the model's stats counted from step
    `warm` on: the reads ahead `reader` had taken and dropped since."""
    from mlx_lm.models.cache import make_prompt_cache

    cache, y = make_prompt_cache(model), mx.array([PROMPT])
    for step in range(steps):
        if step == warm:
            model.flash_stats.reset()
            taken, dropped = reader.taken, reader.dropped
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(y)
    return reader.taken - taken, reader.dropped - dropped


@pytest.fixture
def small_chunks(monkeypatch):
    """Heads streamed in several chunks even on a tiny vocabulary."""
    monkeypatch.setattr(flash_setup, "head_chunk", lambda attention: 1024)


PIECE = 6 * 4096  # a few blocks: a tiny float32 layer (96 KiB) in 5 pieces


@pytest.fixture(params=["whole", "pieces"])
def pieces(request):
    """The options that stream layers computed where read whole, or in pieces of a
    few KiB (their staging buffers smaller than a layer)."""
    return {"stream_piece": PIECE} if request.param == "pieces" else {}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["float32", "q4"])
def test_all_at_the_floor_is_exact(tmp_path, arch, fmt, small_chunks, pieces):
    """At the floor every attention and the LM head stream (in chunks), no neuron is
    cached, and decoding gives the dense logits and greedy tokens."""
    make_checkpoint(tmp_path / "hf", arch, num_hidden_layers=6)  # groups > buffers
    quantize = (
        {"quantize": True, "q_bits": 4, "q_group_size": 32} if fmt == "q4" else {}
    )
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False, **quantize)
    roomy, _ = load(str(store), max_kv_size=256, progress=False, **pieces)
    expected_logits = roomy(mx.array([PROMPT]))
    expected = greedy(roomy)
    p = roomy.flash_plan
    floor = p.floor
    assert floor == floor_bytes(p.least_fixed, p.groups)
    model, _ = load(
        str(store), max_kv_size=256, dram_budget=floor, progress=False, **pieces
    )
    p = model.flash_plan
    assert p.total <= floor and p.capacities == [0] * len(model.layers)
    names = [g.name for g in p.streamed()]
    assert sum("self_attn" in n for n in names) == len(model.layers), names
    assert any("lm_head" in n or "tied LM head" in n for n in names), names
    assert isinstance(model.layers[0].self_attn, StreamedModule)
    logits = model(mx.array([PROMPT]))
    assert mx.allclose(logits, expected_logits, atol=1e-5, rtol=1e-5)
    assert greedy(model) == expected
    heads = [m for m in model.modules() if isinstance(m, StreamedHead)]
    assert len(heads) == 1 and len(heads[0].chunks()) > 1
    # decoding read every pass ahead but a token's first (after the prompt)
    stream = heads[0]._stream
    assert stream.taken > 0 and stream.dropped == 0
    whole = max(e.whole_read() for e in store_manifest(store).layers)
    staging = len(model.flash_store.reader.buffer)
    assert staging == p.fixed["FFN reader"]
    # (a q4 layer of the tiny model takes a block per section: no smaller piece)
    assert (staging < whole) == (bool(pieces) and fmt == "float32")
    # nothing of the streamed groups is held between tokens
    held = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert held == p.fixed["dense (small tensors)"] + p.resident_groups


def test_every_streamed_pass_is_read_ahead(tmp_path, small_chunks, capsys):
    """Decoding at the floor: once two decoded tokens have shown the order of its
    passes (each streamed attention, each chunk of the head; the second shows that
    the next token's first attention follows the head's last chunk), every pass of
    the tokens after them was read while the pass before it computed, none on the
    decoding thread, and the bytes per token are the plan's."""

    make_checkpoint(tmp_path / "hf", "qwen2", num_hidden_layers=6)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    floor = load(str(store), max_kv_size=256, progress=False)[0].flash_plan.floor
    model, _ = load(str(store), max_kv_size=256, dram_budget=floor, progress=False)
    stream = model.flash_stream
    head = next(m for m in model.modules() if isinstance(m, StreamedHead))
    passes = len(head.chunks()) + sum(
        isinstance(layer.self_attn, StreamedModule) for layer in model.layers
    )
    assert passes > len(head.chunks()) > 1
    taken, dropped = reads_ahead_after(model, stream, warm=3, steps=7)
    s = model.flash_stats
    assert taken == 4 * passes and dropped == 0
    assert s.bytes / s.tokens == model.flash_plan.expected_bytes
    from mlx_flash.generate import print_stats

    print_stats(model)  # --stats counts the dense part's reads beside the bundles'
    dense = stream.read_totals().bytes
    assert f"+ {dense / 1e6:.1f} MB of the dense part in" in capsys.readouterr().out
    assert dense > 0


def test_a_streamed_pass_computes_from_its_staging_buffer():
    """A streamed tensor's array is a view of the bytes where the reader put them
    (what the reader writes there next shows through); floats stored in another
    dtype are converted; bytes outside a staging buffer are copied."""
    from mlx_flash.store.reader import Staging
    from mlx_flash.streamed import TensorAt, to_array

    staging = Staging(2 * 4096)
    staging.host[:16] = np.arange(16, dtype=np.uint8)
    packed = TensorAt("w", "U32", (2, 2), 0)
    a = to_array(staging.view[:16], packed, mx.float32, staging)
    mx.eval(a)
    assert a.dtype == mx.uint32 and a[0, 0].item() == 0x03020100
    staging.host[:4] = 0xFF
    assert a[0, 0].item() == 0xFFFFFFFF  # the buffer's bytes, not a copy of them
    staging.host[16:24] = np.array([1, 2, 3, 4], np.float16).view(np.uint8)
    scales = TensorAt("s", "F16", (4,), 16)
    half = to_array(staging.view[16:24], scales, mx.float32, staging)
    assert half.dtype == mx.float32 and half.tolist() == [1, 2, 3, 4]
    copied = to_array(memoryview(bytes(16)), packed, None, staging)
    assert copied.tolist() == [[0, 0], [0, 0]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_every_budget_runs_and_reads_what_the_plan_expects(tmp_path, arch, pieces):
    """From the floor to everything: exact tokens, the plan within its budget, the
    bytes read per token exactly the plan's expectation, and fewer as it grows."""
    make_checkpoint(tmp_path / "hf", arch)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    roomy, _ = load(str(store), max_kv_size=256, progress=False, **pieces)
    expected = greedy(roomy)
    floor, total = roomy.flash_plan.floor, roomy.flash_plan.total
    last = None
    for budget in np.linspace(floor, total, 7).astype(int):
        model, _ = load(
            str(store),
            max_kv_size=256,
            dram_budget=int(budget),
            progress=False,
            **pieces,
        )
        p = model.flash_plan
        assert p.total <= budget
        greedy(model, 3)  # warm the caches
        model.flash_stats.reset()
        assert greedy(model, 6)[:6] == expected[:6]
        s = model.flash_stats
        assert s.bytes / s.tokens == p.expected_bytes, p.describe()
        assert last is None or p.expected_bytes <= last
        last = p.expected_bytes
    assert last == 0


def test_below_the_floor_the_error_names_it(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    floor = load(str(store), max_kv_size=256, progress=False)[0].flash_plan.floor
    with pytest.raises(FlashError, match="below this model's floor") as e:
        load(str(store), max_kv_size=256, dram_budget=floor // 2, progress=False)
    assert f"at least {-(-floor // 2**20)} MiB" in str(e.value)
    assert str(store) in str(e.value)


def test_the_plan_accounts_for_every_tensor_once(tmp_path):
    """Resident + streamed = every tensor of the dense file exactly once."""
    make_checkpoint(tmp_path / "hf", "qwen2")
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    roomy, _ = load(str(store), max_kv_size=256, progress=False)
    budget = (roomy.flash_plan.floor + roomy.flash_plan.total) // 2
    model, _ = load(str(store), max_kv_size=256, dram_budget=budget, progress=False)
    header = check_safetensors(store / "model.safetensors")
    stored = {k for k in header if not k.startswith("__flash_pad__")}
    resident = {k for k, v in tree_flatten(model.parameters()) if v.size}
    streamed = set()
    for m in model.modules():
        if isinstance(m, StreamedModule):
            streamed |= {t.name for t in m._tensors}
        if isinstance(m, StreamedHead):
            streamed |= {t.name for t in m._parts.values()}
    assert resident.isdisjoint(streamed)
    assert resident | streamed == stored


def test_streaming_holds_no_growing_memory(tmp_path):
    """Decoding at the floor: MLX's active memory is the same after every step."""
    make_checkpoint(tmp_path / "hf", "llama")
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    floor = load(str(store), max_kv_size=256, progress=False)[0].flash_plan.floor
    model, _ = load(str(store), max_kv_size=256, dram_budget=floor, progress=False)
    from mlx_lm.models.cache import make_prompt_cache

    cache, y, seen = make_prompt_cache(model), mx.array([PROMPT]), []
    for _ in range(8):
        logits = model(y, cache=cache)
        y = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        mx.eval(y)
        seen.append(mx.get_active_memory())
    assert len(set(seen[2:])) == 1, seen


def test_without_max_kv_size_the_context_shrinks_to_the_budget(tmp_path):
    """The default context (2,048 tokens) halves while its KV cache would take more
    than a quarter of the budget; past it, the stated error, never an overrun."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_flash.kv_cache import DEFAULT_CONTEXT, MIN_CONTEXT, kv_cache_bytes

    # a KV cache of 16 KiB per token: it, not the runtime, decides the floor
    make_checkpoint(
        tmp_path / "hf", "llama", num_hidden_layers=32, num_key_value_heads=4
    )
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    roomy, _ = load(str(store), progress=False)
    assert roomy.flash_context == DEFAULT_CONTEXT
    per_token = kv_cache_bytes(roomy) / DEFAULT_CONTEXT
    budget = int(per_token * 600 * 4)  # a quarter of it holds 600 tokens: 512
    model, _ = load(str(store), dram_budget=budget, progress=False)
    assert model.flash_context == 512 >= MIN_CONTEXT
    assert model.flash_plan.total <= budget
    cache = make_prompt_cache(model)
    model(mx.array([[1] * 500]), cache=cache)
    with pytest.raises(FlashError, match="--max-kv-size"):
        model(mx.array([[1] * 13]), cache=cache)


def test_every_evaluation_of_a_decode_step_is_counted(tmp_path, small_chunks):
    """Ours per token: none where every layer is cached whole (mlx-lm's one
    evaluation runs the step); one per layer's FFN when it reads (plus the
    selection's host sync); one per streamed attention and head chunk."""
    make_checkpoint(tmp_path / "hf", "llama", num_hidden_layers=6)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)

    def per_token(model):
        from mlx_lm.models.cache import make_prompt_cache

        greedy(model, 3)  # warm the caches
        cache, y = make_prompt_cache(model), mx.array([PROMPT])
        for step in range(6):
            if step == 1:  # decoding only, from here
                model.flash_stats.reset()
            y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True)
            mx.eval(y)
        s = model.flash_stats
        return s.evals / s.tokens, s.syncs / s.tokens

    roomy, _ = load(str(store), max_kv_size=256, progress=False)
    assert per_token(roomy) == (0, 0)
    sparse, _ = load(str(store), selector="oracle", fraction=0.5, max_kv_size=256)
    assert per_token(sparse) == (6, 6)
    floor = roomy.flash_plan.floor
    model, _ = load(str(store), max_kv_size=256, dram_budget=floor, progress=False)
    heads = [m for m in model.modules() if isinstance(m, StreamedHead)]
    streamed = sum(
        isinstance(layer.self_attn, StreamedModule) for layer in model.layers
    )
    assert per_token(model) == (6 + streamed + len(heads[0].chunks()), 0)


def test_a_miss_moves_into_its_slot_with_no_numpy_allocation(tmp_path):
    """The first decoded token misses every neuron of a cache that holds the layer:
    the misses are read into the staging buffer and decoded straight into their slots
    (tracemalloc: no numpy allocation of the bytes read)."""
    import tracemalloc

    from mlx_lm.models.cache import make_prompt_cache

    make_checkpoint(tmp_path / "hf", "llama", intermediate_size=2048)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    model, _ = load(str(store), max_kv_size=256, progress=False)
    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1], -1, keepdims=True)
    mx.eval(y)  # the prompt streams dense: the caches are still empty
    model.flash_stats.reset()
    tracemalloc.start()
    mx.eval(model(y, cache=cache))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    s = model.flash_stats
    assert s.loaded == 2 * 2048 and s.bytes > 2 << 20  # every neuron missed and read
    # ids and masks only: a few int64 per neuron, never its 768-byte bundle
    assert peak < 64 * s.loaded < s.bytes / 8, (peak, s.bytes)


@pytest.mark.parametrize("options", [{}, {"naive": True}])
def test_streamed_layers_stay_within_their_planned_flight(tmp_path, options):
    """Layers streamed whole (naive) or past a partial cache (the hybrid): their
    bytes go from the staging buffer into the pool's preallocated rows (no numpy
    allocation of the bytes read, none in MLX either: its active memory does not grow
    across steps)."""
    import tracemalloc

    from mlx_lm.models.cache import make_prompt_cache

    make_checkpoint(tmp_path / "hf", "llama", intermediate_size=2048)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    pinned = {"max_kv_size": 256, "prefill_step_size": 16}
    roomy, _ = load(str(store), progress=False, **pinned)
    budget = (roomy.flash_plan.floor + roomy.flash_plan.total) // 2
    model, _ = load(str(store), dram_budget=budget, **pinned, **options)
    if not options:
        assert 0 < sum(model.flash_plan.capacities) < 2 * 2048  # a hybrid
    cache, y, active = make_prompt_cache(model), mx.array([PROMPT]), []
    for step in range(8):
        if step == 2:
            model.flash_stats.reset()
            tracemalloc.start()
        y = mx.argmax(model(y, cache=cache)[:, -1], axis=-1, keepdims=True)
        mx.eval(y)
        active.append(mx.get_active_memory())
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    s = model.flash_stats
    assert s.bytes / s.tokens > 1 << 20  # megabytes read per token
    # ids and masks only, a few int64 per neuron: never the megabytes read
    assert peak < min(64 * 2 * 2048, s.bytes / s.tokens / 8), (peak, s.bytes)
    assert len(set(active[3:])) == 1, active


def test_the_gate_selector_runs_with_its_rows_streamed(tmp_path):
    """The gate selector's rows are a group like any other: under a budget too small
    to hold them they are read with every token, and the selection (exact top
    activations) is the same."""
    make_checkpoint(
        tmp_path / "hf", "llama", num_hidden_layers=4, intermediate_size=512
    )
    store = convert(tmp_path / "hf", tmp_path / "store", layout="gate", progress=False)
    options = {"selector": "gate", "fraction": 0.5, "max_kv_size": 256}
    roomy, _ = load(str(store), progress=False, **options)
    assert not any("gate rows" in g.name for g in roomy.flash_plan.streamed())
    expected = greedy(roomy)
    floor = roomy.flash_plan.floor
    model, _ = load(str(store), dram_budget=floor, progress=False, **options)
    streamed = [g.name for g in model.flash_plan.streamed()]
    assert sum("gate rows" in n for n in streamed) == 4, streamed
    assert model.flash_plan.total <= floor
    assert greedy(model) == expected


def test_a_prompt_goes_through_in_the_plans_prefill_steps(tmp_path, small_chunks):
    """A prompt longer than the plan's prefill step, given whole (mlx-lm's default
    step is 2,048): it goes through in steps of that many tokens, each into the KV
    cache before the next, with the same logits (the streamed head's a lazy graph,
    exact when evaluated) and greedy tokens as one unbudgeted pass."""
    from mlx_lm.models.cache import make_prompt_cache

    make_checkpoint(tmp_path / "hf", "llama", num_hidden_layers=4)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    prompt = mx.array([[(7 * i) % 60 + 1 for i in range(100)]])
    roomy, _ = load(str(store), max_kv_size=256, progress=False)
    assert roomy.flash_plan.prefill_step >= 100  # one step
    expected = roomy(prompt, cache=make_prompt_cache(roomy))
    floor = roomy.flash_plan.floor
    model, _ = load(str(store), max_kv_size=256, dram_budget=floor, progress=False)
    p = model.flash_plan
    assert p.prefill_step == 16 and any("lm_head" in g.name for g in p.streamed()), (
        p.describe()
    )
    model.flash_stats.reset()
    logits = model(prompt, cache=make_prompt_cache(model))
    assert model.flash_stats.dense_layers == 4 * 7  # ceil(100 / 16) steps, 4 layers
    assert mx.allclose(logits, expected, atol=1e-5, rtol=1e-5)
    steps = lambda m: generate_step(  # noqa: E731
        prompt[0], m, max_tokens=6, sampler=lambda l: mx.argmax(l, -1)
    )
    assert [int(t) for t, _ in steps(model)] == [int(t) for t, _ in steps(roomy)]


def test_the_prefill_step_shrinks_with_the_budget_and_is_in_the_plan(tmp_path):
    """The plan holds one prefill step's activations: 16 tokens, doubled while that
    costs decoding at most 1% more bytes per token and takes at most an eighth of
    the budget; a step asked for is an upper bound; the floor is the smallest
    step's."""
    from mlx_flash.budget import MIN_PREFILL, PREFILL_COST, PREFILL_SHARE
    from mlx_flash.planner import PREFILL

    make_checkpoint(tmp_path / "hf", "llama", intermediate_size=2048)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    roomy, _ = load(str(store), max_kv_size=256, progress=False)
    floor = roomy.flash_plan.floor
    steps = []
    for budget in (floor, floor * 2, floor * 8, floor * 64):
        p = load(str(store), max_kv_size=256, dram_budget=budget)[0].flash_plan
        assert p.total <= budget
        assert p.prefill_step == MIN_PREFILL or (
            p.fixed[PREFILL] <= PREFILL_SHARE * budget
        )
        least = load(
            str(store), max_kv_size=256, dram_budget=budget, prefill_step_size=16
        )[0].flash_plan
        assert p.estimate() <= least.estimate() * (1 + PREFILL_COST)
        steps.append(p.prefill_step)
    assert steps == sorted(steps) and steps[0] == MIN_PREFILL < steps[-1]
    asked = load(str(store), max_kv_size=256, prefill_step_size=100)[0].flash_plan
    assert asked.prefill_step == 100


def test_a_layer_streams_in_pieces_each_read_ahead(tmp_path):
    """Staging buffers smaller than a layer: naive decoding reads every layer in
    pieces, each read while the piece before it computes (the first piece of a
    layer during the layer before), none dropped once decoding; one evaluation per
    piece; the dense tokens and logits; the bytes the plan expects."""

    make_checkpoint(tmp_path / "hf", "llama", num_hidden_layers=4)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    roomy, _ = load(str(store), max_kv_size=256, progress=False)
    expected, expected_logits = greedy(roomy), roomy(mx.array([PROMPT]))
    model, _ = load(
        str(store), naive=True, stream_piece=PIECE, max_kv_size=256, progress=False
    )
    ffn, staging = model.layers[0].mlp, len(model.flash_store.reader.buffer)
    entry = model.flash_store.manifest.layers[0]
    every = list(range(len(entry.sections)))
    chunks = ffn._chunks(np.arange(entry.neurons), every, 0)
    assert len(chunks) > 2 and staging < entry.whole_read()
    assert np.array_equal(np.concatenate(chunks), np.arange(entry.neurons))
    assert mx.allclose(model(mx.array([PROMPT])), expected_logits, atol=1e-5)
    assert greedy(model) == expected
    taken, dropped = reads_ahead_after(model, model.flash_read_ahead, warm=2, steps=5)
    s, layers = model.flash_stats, len(model.layers)
    assert taken == 3 * layers * len(chunks) and dropped == 0
    assert s.evals / s.tokens == layers * len(chunks)
    assert s.bytes / s.tokens == model.flash_plan.expected_bytes


def test_pieces_are_refused_where_layers_are_not_computed_where_read(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    store = convert(tmp_path / "hf", tmp_path / "store", layout="split", progress=False)
    with pytest.raises(FlashError, match="--stream-piece") as e:
        load(str(store), stream_piece="1MiB", progress=False)
    assert "--layout planar" in e.value.fix

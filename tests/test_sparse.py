"""Sparse decoding: selectors, the neuron cache in the model, the DRAM budget."""

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_checkpoint
from mlx_lm.generate import generate_step

from mlx_flash import FlashError, convert, load
from mlx_flash.budget import parse_budget
from mlx_flash.selectors import top_ids

PROMPT = [1, 5, 6, 7, 8, 9, 10, 3]


def greedy(model, n=24):
    steps = generate_step(
        mx.array(PROMPT), model, max_tokens=n, sampler=lambda x: mx.argmax(x, -1)
    )
    return [int(t) for t, _ in steps]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sparse")
    out = {}
    for arch in ("llama", "opt"):
        make_checkpoint(tmp / arch, arch, **({"seed": 1} if arch == "opt" else {}))
        for layout in ("bundled", "split", "gate"):
            out[arch, layout] = convert(
                tmp / arch,
                tmp / f"{arch}-{layout}",
                ffn_format="q8",
                layout=layout,
                progress=False,
            )
    return out


def dense_tokens(store):
    model, _ = load(str(store), progress=False)
    return greedy(model)


def test_all_neurons_cached_reads_each_neuron_once(stores):
    store = stores["llama", "bundled"]
    model, _ = load(str(store), dram_budget=10**9, progress=False)
    assert greedy(model) == dense_tokens(store)
    s = model.flash_stats
    assert s.loaded == model.flash_store.manifest.intermediate_size * 2  # 2 layers
    # one selection per layer for the first token; then every neuron is cached and
    # `all` computes from the slots with no selection (no host sync) and no reads
    assert s.hits == s.selected - s.loaded and s.syncs == 2


@pytest.mark.parametrize("layout", ["split", "gate"])
def test_layouts_compute_the_same(stores, layout):
    model, _ = load(str(stores["llama", layout]), dram_budget=10**9, progress=False)
    assert greedy(model) == dense_tokens(stores["llama", "bundled"])


@pytest.mark.parametrize("selector", ["oracle", "gate"])
def test_relu_selection_is_exact(stores, selector):
    """OPT's ReLU: neurons with activation <= 0 contribute nothing; skipping is
    exact."""
    model, _ = load(str(stores["opt", "gate"]), selector=selector, progress=False)
    assert greedy(model) == dense_tokens(stores["opt", "bundled"])
    s = model.flash_stats
    assert 0 < s.selected < s.tokens * 2 * 256  # really sparse


@pytest.mark.parametrize("selector", ["oracle", "gate"])
def test_gated_selection_of_every_neuron_is_exact(stores, selector):
    model, _ = load(
        str(stores["llama", "gate"]), selector=selector, fraction=1.0, progress=False
    )
    assert greedy(model) == dense_tokens(stores["llama", "bundled"])


def test_gate_selector_needs_the_gate_layout(stores):
    with pytest.raises(FlashError, match="--layout gate"):
        load(str(stores["llama", "bundled"]), selector="gate", progress=False)


def test_selection_larger_than_the_cache_streams_the_overflow(stores):
    """A small budget costs reads, never quality: the same tokens as a roomy cache."""
    store = stores["llama", "bundled"]
    options = {"selector": "oracle", "fraction": 0.5, "prefill_step_size": 16}
    roomy, _ = load(str(store), progress=False, **options)
    expected = greedy(roomy)
    plan = roomy.flash_plan
    budget = plan.budget_for_slots(20)  # 20 slots
    model, _ = load(str(store), dram_budget=budget, progress=False, **options)
    assert model.flash_plan.capacity == 20 and model.flash_plan.total <= budget
    # the plan counts exactly what the caches allocated
    assert (
        sum(layer.mlp._cache.nbytes for layer in model.layers)
        == model.flash_plan.caches
    )
    # the pool (as stored) and what MLX converts of it while the layer computes
    assert model.layers[0].mlp._pool.nbytes <= model.flash_plan.fixed["FFN in flight"]
    assert greedy(model) == expected
    s = model.flash_stats
    assert s.selected == 64 * 2 * s.tokens  # half of 128 neurons, 2 layers
    assert s.loaded >= (64 - 20) * 2 * s.tokens  # the overflow is read every token
    for layer in model.layers:
        assert len(layer.mlp._cache.cached_ids()) <= 20


@pytest.mark.parametrize("window", [1, 3])
def test_strict_window(stores, window):
    model, _ = load(
        str(stores["llama", "bundled"]),
        selector="oracle",
        fraction=0.25,
        window=window,
        progress=False,
    )
    greedy(model)
    for layer in model.layers:
        cache = layer.mlp._cache
        assert cache.strict and len(cache.cached_ids()) <= 32 * window


def test_budget_too_small_names_the_minimum(stores):
    with pytest.raises(FlashError, match="at least .* MiB"):
        load(str(stores["llama", "bundled"]), dram_budget=1000, progress=False)


def test_parse_budget():
    assert parse_budget("2GiB", 0) == 2 << 30
    assert parse_budget("500MB", 0) == 500 << 20
    assert parse_budget("0.5", 1000) == 500
    assert parse_budget(123456, 0) == 123456
    assert parse_budget("1.5 kib", 0) == 1536
    for bad in ("lots", "abct", "GiB"):
        with pytest.raises(FlashError, match="cannot read"):
            parse_budget(bad, 0)


def test_top_ids():
    scores = np.array([0.1, 5.0, -1.0, 3.0, 0.0])
    assert top_ids(scores, 0.4, None).tolist() == [1, 3]
    assert top_ids(scores, None, 0.0).tolist() == [1, 3, 0]
    assert top_ids(scores, 0.2, 0.0).tolist() == [1]
    assert top_ids(scores, None, None).tolist() == [1, 3, 0, 4, 2]


def test_gate_selector_without_bundling(stores):
    """The split layout also keeps gate rows apart: gate selection without bundling."""
    model, _ = load(str(stores["opt", "split"]), selector="gate", progress=False)
    assert greedy(model) == dense_tokens(stores["opt", "bundled"])
    assert model.layers[0].mlp._sections == [1]  # fc2; fc1 and fc1.bias stay resident


def test_bytes_read_are_the_missing_bundles_plus_alignment(stores):
    from mlx_lm.models.cache import make_prompt_cache

    store = stores["llama", "gate"]
    model, _ = load(str(store), selector="gate", fraction=0.25, gap=0, progress=False)
    reader, s = model.flash_store.reader, model.flash_stats
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)  # prefill: dense passes
    bundle = model.flash_store.manifest.layers[0].sections[1].bundle_bytes
    for token in (11, 12, 13):
        before, loaded = reader.stats.bytes, s.loaded
        model(mx.array([[token]]), cache=cache)
        needed = (s.loaded - loaded) * bundle
        read = reader.stats.bytes - before
        # each run of neighbouring neurons widens to pages: at most 2 pages per run
        assert needed <= read <= needed + 2 * 4096 * (s.loaded - loaded)
        assert read % 4096 == 0


def test_mmap_reader_computes_the_same(stores):
    store = stores["llama", "gate"]
    model, _ = load(
        str(store), selector="gate", fraction=0.5, reader="mmap", progress=False
    )
    direct, _ = load(str(store), selector="gate", fraction=0.5, progress=False)
    assert greedy(model) == greedy(direct)
    assert model.flash_store.reader.stats.bytes > 0


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3_text"])
def test_plan_holds_the_kv_cache_of_its_context(stores, arch, tmp_path):
    """The plan's working memory covers what decoding allocates beside the weights:
    the KV cache of the whole context it holds, allocated once (and one step's
    logits); past that context: refused by default, rotating with max_kv_size."""
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_flash.kv_cache import DEFAULT_CONTEXT

    path = stores.get((arch, "bundled"))
    if path is None:
        make_checkpoint(tmp_path / "hf", arch)
        path = tmp_path / "hf"
    model, _ = load(str(path), progress=False)
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)
    kv = sum(c.nbytes for c in cache)
    assert max(c.keys.shape[2] for c in cache) == DEFAULT_CONTEXT  # allocated whole
    assert kv <= model.flash_plan.fixed["KV cache and working memory"] < kv + 64 * 1024
    for _ in range(3):  # generating inside the context allocates nothing more
        model(mx.array([[3]]), cache=cache)
    assert sum(c.nbytes for c in cache) == kv


def test_a_context_past_the_plan_is_refused_or_rotates(stores):
    from mlx_lm.models.cache import make_prompt_cache

    path = str(stores["llama", "bundled"])
    model, _ = load(path, max_kv_size=16, progress=False)
    cache = make_prompt_cache(model)
    for _ in range(40):  # rotates past 16 tokens: the cache never grows
        model(mx.array([[3]]), cache=cache)
    assert all(c.keys.shape[2] == 16 for c in cache)
    model, _ = load(path, progress=False)
    cache = make_prompt_cache(model)
    with pytest.raises(FlashError, match="max-kv-size"):
        model(mx.array([[3] * 3000]), cache=cache)

"""The neuron-frequency profile: measured token by token, stored beside the store,
validated, refused when damaged, malformed or from another model; the hot part of a
cache built from it."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_checkpoint
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash import FlashError, convert, load
from mlx_flash.hot_set import FrequencyCounter
from mlx_flash.layerwise import text_tokens
from mlx_flash.neuron_cache import NeuronCache
from mlx_flash.neuron_profile import (
    MANIFEST_NAME,
    WEIGHTS_NAME,
    NeuronProfile,
    load_profile,
    main,
    save_profile,
    store_identity,
)
from mlx_flash.selectors import Selection
from mlx_flash.store.store import BundleStore, read_manifest

TEXT = " ".join("the cat sat on the mat and then it ran far a big red dog".split() * 40)
SEQ, TOKENS = 16, 64


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("profile")
    (tmp / "text.txt").write_text(TEXT)
    out = {"text": tmp / "text.txt", "tmp": tmp}
    for name, arch, seed in (
        ("llama", "llama", 0),
        ("opt", "opt", 1),
        ("other", "llama", 5),
    ):
        make_checkpoint(tmp / name, arch, seed=seed)
        out[name] = convert(tmp / name, tmp / f"{name}-store", progress=False)
        main([str(out[name]), "--text", str(out["text"]), "--tokens", str(TOKENS),
              "--seq-len", str(SEQ), "--no-progress"])  # fmt: skip
    return out


@pytest.fixture
def copy(stores, tmp_path):
    """A copy of the llama store with its profile, to damage."""
    return shutil.copytree(stores["llama"], tmp_path / "store")


def profile_of(store):
    return load_profile(store, read_manifest(store))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_the_profile_counts_what_decoding_selects_token_by_token(stores, arch):
    """The layer-by-layer count equals the oracle's selections while decoding the
    same sequences one token at a time (top half by |act(gate) * up|; ReLU: > 0),
    every layer computed dense as the profile's pass does."""
    p = profile_of(stores[arch])
    model, tokenizer = load(
        str(stores[arch]),
        selector="oracle",
        fraction=0.5 if arch == "llama" else None,  # OPT: every activation > 0
        progress=False,
    )
    tokens = text_tokens(tokenizer, TEXT, TOKENS, SEQ)
    n = model.flash_store.manifest.intermediate_size
    counter = FrequencyCounter([n] * len(model.layers))
    for i, layer in enumerate(model.layers):

        def select(x, inner=layer.mlp._selector, i=i):
            counter.update(i, inner(x).ids)
            return Selection(np.arange(n))  # computed dense: the true model

        layer.mlp._selector = select
    for row in tokens:
        cache = make_prompt_cache(model)
        for t in range(SEQ):
            mx.eval(model(row[None, t : t + 1], cache=cache))
        counter.end_sequence()
    for ours, decoded in zip(p.layers, counter.layers):
        assert (ours.tokens, ours.pairs) == (TOKENS, TOKENS - TOKENS // SEQ)
        assert (decoded.tokens, decoded.pairs) == (ours.tokens, ours.pairs)
        assert (ours.selected == decoded.selected).all()
        assert (ours.repeated == decoded.repeated).all()
        assert 0 < ours.repeated.sum() < ours.selected.sum()
    target = p.target
    assert target == (
        {"kind": "top", "fraction": 0.5} if arch == "llama" else {"kind": "relu"}
    )
    if arch == "llama":  # each token selects exactly half of the neurons
        assert all(c.selected.sum() == TOKENS * n // 2 for c in p.layers)


def test_the_profile_is_stored_beside_the_store(stores):
    store = stores["llama"]
    m = json.loads((store / MANIFEST_NAME).read_text())
    assert m["text"]["name"] == "text.txt" and m["text"]["tokens"] == TOKENS
    assert m["text"]["seq_len"] == SEQ and len(m["text"]["sha256"]) == 64
    assert m["store"] == store_identity(read_manifest(store))
    assert not [p.name for p in store.iterdir() if "tmp" in p.name]
    BundleStore(store).close()  # the store itself is untouched and still opens


def test_a_damaged_profile_is_refused(copy):
    raw = bytearray((copy / WEIGHTS_NAME).read_bytes())
    raw[-3] ^= 0x40
    (copy / WEIGHTS_NAME).write_bytes(bytes(raw))
    with pytest.raises(FlashError, match="do not match") as e:
        profile_of(copy)
    assert e.value.path == copy / WEIGHTS_NAME and "neuron_profile" in e.value.fix


def edit(store, change):
    path = store / MANIFEST_NAME
    m = json.loads(path.read_text())
    change(m)
    path.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.update(magic="MLXFLASH-PREDICTORS"), "not a neuron profile"),
        (lambda m: m.update(version=2), "not a neuron profile"),
        (lambda m: m.update(pairs=-1), "pairs"),
        (lambda m: m.update(pairs=10**6), "more token pairs"),
        (lambda m: m["text"].update(tokens="64"), "text.tokens"),
        (lambda m: m.update(target={"kind": "top", "fraction": 2}), "fraction"),
        (lambda m: m.update(target={"kind": "gelu"}), "unknown target"),
        (lambda m: m.pop("store"), "store must be an object"),
        (lambda m: m.update(weights_sha256=None), "weights_sha256"),
        (lambda m: m["store"].update(neurons=[64, 64]), "another store"),
    ],
)
def test_a_malformed_profile_is_refused(copy, change, message):
    edit(copy, change)
    with pytest.raises(FlashError, match=message) as e:
        profile_of(copy)
    assert e.value.path == copy / MANIFEST_NAME and e.value.fix


def test_counts_that_cannot_be_are_refused(copy):
    """Counts with a matching checksum are still checked: shapes, range."""
    import hashlib

    for name, bad in (
        ("layers.0.selected", mx.zeros((7,), mx.int32)),
        ("layers.1.repeated", mx.full((128,), TOKENS + 1, mx.int32)),
    ):
        flat = mx.load(str(copy / WEIGHTS_NAME))
        flat[name] = bad
        mx.save_safetensors(str(copy / WEIGHTS_NAME), flat)
        digest = hashlib.sha256((copy / WEIGHTS_NAME).read_bytes()).hexdigest()
        edit(copy, lambda m: m.update(weights_sha256=digest))
        with pytest.raises(FlashError, match="layer [01]") as e:
            profile_of(copy)
        assert e.value.path == copy / WEIGHTS_NAME


@pytest.mark.parametrize("other", ["other", "opt"])
def test_a_profile_of_another_model_is_refused(stores, copy, other):
    """Same architecture and shape, other weights (the content digest differs); or
    another architecture."""
    for name in (MANIFEST_NAME, WEIGHTS_NAME):
        shutil.copy(stores[other] / name, copy / name)
    with pytest.raises(FlashError, match="another store or model"):
        profile_of(copy)


def test_no_profile(stores, tmp_path):
    store = shutil.copytree(stores["llama"], tmp_path / "bare")
    (store / MANIFEST_NAME).unlink()
    with pytest.raises(FlashError, match="no neuron profile") as e:
        profile_of(store)
    assert "python -m mlx_flash.neuron_profile" in e.value.fix


def test_the_command_refuses_bad_input(stores, tmp_path, capsys):
    for argv in (
        [str(stores["llama"]), "--text", str(tmp_path / "missing.txt")],
        [str(stores["llama"]), "--text", str(stores["text"]), "--fraction", "0"],
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_the_hot_part_holds_exactly_the_profiles_top_neurons(stores):
    store = BundleStore(stores["llama"])
    p, m = profile_of(stores["llama"]), store.manifest
    sections = list(range(len(m.layers[0].sections)))
    for i, counts in enumerate(p.layers):
        k = 20
        pinned = p.hot_ids(i, k)
        rest = np.setdiff1d(np.arange(128), pinned)
        assert counts.selected[pinned].min() >= counts.selected[rest].max()
        entry = m.layers[i]
        components = [c for s in entry.sections for c in entry.section_components(s)]
        cache = NeuronCache(components, 128, 48, mx.float32, pinned=pinned)
        # the caller reads the hot part's bundles once and fills its slots
        cache.fill(np.arange(k), store.read_neurons(i, cache.pinned, sections))
        assert cache.cached_ids().tolist() == sorted(pinned.tolist())
        rng = np.random.default_rng(i)
        for _ in range(30):
            ids = rng.permutation(128)[:64]
            ids = ids[cache.admissible(ids)]
            slots, load_ids, load_slots = cache.admit(ids)
            cache.fill(load_slots, store.read_neurons(i, load_ids, sections))
            assert not set(load_ids.tolist()) & set(pinned.tolist())
        reference = NeuronCache(components, 128, 128, mx.float32)
        reference.fill(np.arange(128), store.read_neurons(i, np.arange(128), sections))
        got, want = cache.gather(cache.slot_of[pinned]), reference.gather(pinned)
        for name in want:
            a, b = got[name], want[name]
            for x, y in zip(*(w if isinstance(w, tuple) else (w,) for w in (a, b))):
                assert mx.array_equal(x, y)
    store.close()


def test_online_counts_round_trip_through_the_store(copy):
    """A FrequencyCounter's counts (a store without a profile, counted while
    decoding) save and load as a profile; layers that disagree are refused."""
    m = read_manifest(copy)
    counter, rng = FrequencyCounter([128, 128]), np.random.default_rng(0)
    for _ in range(40):
        for layer in (0, 1):
            counter.update(layer, rng.permutation(128)[: rng.integers(1, 64)])
    text = {"name": "decoded", "sha256": "", "tokens": 40, "skip": 0, "seq_len": 40}
    target = {"kind": "top", "fraction": 0.5}
    save_profile(copy, m, NeuronProfile(counter.layers, target, text))
    loaded = profile_of(copy)
    for a, b in zip(loaded.layers, counter.layers):
        assert (a.selected == b.selected).all() and (a.repeated == b.repeated).all()
        assert (a.tokens, a.pairs) == (b.tokens, b.pairs) == (40, 39)
    counter.update(0, np.array([1]))
    with pytest.raises(ValueError):
        save_profile(copy, m, NeuronProfile(counter.layers, target, text))


def test_load_pins_the_profiles_hot_neurons_where_the_plan_says(stores):
    """With a profile, the planner weighs each neuron by its frequency, splits each
    layer's cache into a hot part (`propose_split`) and a recency part, and the hot
    part, read at load, holds exactly the profile's top neurons."""
    from mlx_flash.hot_set import propose_split

    path = stores["llama"]
    options = {"selector": "oracle", "fraction": 0.5, "prefill_step_size": 16}
    roomy, _ = load(str(path), progress=False, **options)
    budget = roomy.flash_plan.budget_for_slots(40)
    model, _ = load(str(path), dram_budget=budget, progress=False, **options)
    p, profile = model.flash_plan, profile_of(path)
    assert p.total <= budget and 0 < sum(p.capacities) < 256
    assert p.expected_bytes is not None  # estimated from the frequencies
    for i, layer in enumerate(model.layers):
        cache, counts = layer.mlp._cache, profile.layers[i]
        assert cache.capacity == p.capacities[i]
        k = propose_split(counts, p.capacities[i])
        assert p.pinned[i] == k and cache.pinned.tolist() == counts.hot_ids(k).tolist()
        assert set(cache.pinned.tolist()) <= set(cache.cached_ids().tolist())
    prompt = mx.array([[3, 4, 5, 6]])

    def tokens(m):
        cache, y, out = make_prompt_cache(m), prompt, []
        for _ in range(8):
            y = mx.argmax(m(y, cache=cache)[:, -1], axis=-1, keepdims=True)
            out.append(int(y[0, 0]))
        return out

    assert tokens(model) == tokens(roomy)  # the cache changes reads, never picks

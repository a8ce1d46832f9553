"""The planar layout (format 3, docs/FORMAT.md §3): each part of each component in
its own section, so a streamed layer is computed from the staging buffer it was read
into — the same values as the bundled layout, and no copy of the bytes read."""

import json

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_checkpoint, stepwise_logits

from mlx_flash import FlashError, convert, load
from mlx_flash.store.format import BUNDLES_NAME, MANIFEST_NAME
from mlx_flash.store.manifest import Manifest
from mlx_flash.store.store import BundleStore, read_manifest

PROMPT, STEPS = [1, 5, 9, 3, 7, 2], [4, 8, 6, 11, 3, 5]


def stores(tmp_path, arch="qwen2", fmt="q4", **kwargs):
    make_checkpoint(tmp_path / "hf", arch, num_hidden_layers=3, **kwargs)
    made = {}
    for layout in ("bundled", "planar"):
        made[layout] = convert(
            tmp_path / "hf",
            tmp_path / layout,
            ffn_format=fmt,
            layout=layout,
            progress=False,
        )
    return made


@pytest.mark.parametrize("arch", ["qwen2", "opt"])
@pytest.mark.parametrize("fmt", ["q4", "q8", "float16", "bfloat16", "mxfp4"])
def test_planar_sections_decode_to_the_bundled_values(tmp_path, arch, fmt):
    """Every layer's weights read from a planar store equal the bundled store's bit
    for bit, each part of each component in a section of its own (format 3; a
    bundled store stays format 2, readable by older readers)."""
    made = stores(tmp_path, arch, fmt, **({"mlp_bias": True} if arch != "opt" else {}))
    planar, bundled = BundleStore(made["planar"]), BundleStore(made["bundled"])
    assert planar.manifest.format_version == 3
    assert bundled.manifest.format_version == 2
    for i, entry in enumerate(planar.manifest.layers):
        parts = [(s.components[0], s.part) for s in entry.sections]
        expected = [
            (name, p) for name, c in entry.components.items() for p, _ in c.parts
        ]
        assert parts == expected
        a, b = planar.read_layer(i, mx.float32), bundled.read_layer(i, mx.float32)
        assert a.keys() == b.keys()
        for name in a:
            for x, y in zip(
                *(w if isinstance(w, tuple) else (w,) for w in (a[name], b[name]))
            ):
                assert mx.array_equal(x, y), (i, name)
    planar.close()
    bundled.close()


def edit_manifest(store, change):
    d = json.loads((store / MANIFEST_NAME).read_text())
    change(d)
    (store / MANIFEST_NAME).write_text(json.dumps(d))


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda d: d.update(format_version=2), "version 3's"),
        (lambda d: d["layers"][1]["sections"].pop(1), "expected"),
        (
            lambda d: d["layers"][0]["sections"][0].update(part="nope"),
            "disagrees|expected",
        ),
        (
            lambda d: d["layers"][0]["sections"][0].update(
                components=["gate_proj", "up_proj"]
            ),
            "one component",
        ),
        (lambda d: d["layers"][0]["sections"][0].update(part=3), "must be a string"),
    ],
)
def test_a_damaged_planar_manifest_is_refused(tmp_path, change, why):
    store = stores(tmp_path)["planar"]
    edit_manifest(store, change)
    with pytest.raises(FlashError, match=why):
        read_manifest(store)


def test_the_digest_of_a_bundled_store_is_format_2s(tmp_path):
    """A section without a part is written and digested as format 2 wrote it, so
    stores converted before format 3 keep loading."""
    store = stores(tmp_path)["bundled"]
    d = json.loads((store / MANIFEST_NAME).read_text())
    assert d["format_version"] == 2
    assert all("part" not in s for layer in d["layers"] for s in layer["sections"])
    m = Manifest.from_json((store / MANIFEST_NAME).read_text(), store)
    with open(store / BUNDLES_NAME, "rb") as f:
        assert f.read(64)[28:60] == m.layout_digest()


def partial_budget(store) -> int:
    whole, _ = load(str(store), max_kv_size=256)
    caches = sum(layer.mlp._cache.nbytes for layer in whole.layers)
    return whole.flash_plan.floor + caches // 3


@pytest.mark.parametrize("options", [{}, {"naive": True}])
@pytest.mark.parametrize("ahead", [True, False])
def test_streamed_planar_layers_are_computed_where_they_were_read(
    tmp_path, options, ahead
):
    """`all` under a budget (the hybrid) and naive on a planar store: the logits of
    the bundled store, and no byte read is copied into the pool (its `put` fails
    the test); bytes per token are the plan's."""
    made = stores(tmp_path)
    kw = dict(max_kv_size=256, no_read_ahead=not ahead, **options)
    budget = max(partial_budget(made[k]) for k in made)
    planar, _ = load(str(made["planar"]), dram_budget=budget, **kw)
    bundled, _ = load(str(made["bundled"]), dram_budget=budget, **kw)

    def copied(*args, **kwargs):
        pytest.fail("a streamed planar neuron was copied into the pool")

    pools = {id(layer.mlp._pool): layer.mlp._pool for layer in planar.layers}
    for pool in pools.values():
        assert pool.capacity == 0  # planned: the pool holds nothing
        pool.put = copied
    # the bytes of a layer in flight are not in the plan twice (staging and pool)
    flight = "FFN in flight"
    assert planar.flash_plan.fixed[flight] < bundled.flash_plan.fixed[flight] / 2
    streamed = [layer for layer in planar.layers if not layer.mlp._whole]
    assert streamed
    a = stepwise_logits(planar, PROMPT, STEPS)
    b = stepwise_logits(bundled, PROMPT, STEPS)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert (a.argmax(-1) == b.argmax(-1)).all()
    stats = planar.flash_stats
    stats.reset()
    stepwise_logits(planar, PROMPT, STEPS)
    assert stats.bytes / stats.tokens == pytest.approx(
        planar.flash_plan.expected_bytes, rel=0.02
    )
    if ahead:
        assert planar.flash_read_ahead.taken >= len(streamed) * (len(STEPS) - 1)


def test_planar_decoding_allocates_nothing_across_steps(tmp_path):
    """Views of the staging buffer, not new arrays: MLX's active memory does not
    grow from one decoded token to the next."""
    from mlx_lm.models.cache import make_prompt_cache

    made = stores(tmp_path)
    model, _ = load(str(made["planar"]), naive=True, max_kv_size=256)
    cache = make_prompt_cache(model)
    y = mx.argmax(model(mx.array([PROMPT]), cache=cache)[:, -1], -1, keepdims=True)
    sizes = []
    for _ in range(4):
        y = mx.argmax(model(y, cache=cache)[:, -1], -1, keepdims=True)
        mx.eval(y)
        sizes.append(mx.get_active_memory())
    assert sizes[-1] <= sizes[1], sizes

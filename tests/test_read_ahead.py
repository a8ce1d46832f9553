"""Reading the next layer ahead (`read_ahead.py`): the same logits and bytes as
reading in turn, every layer's read taken once the caches are full, a request that
changed dropped, and a failed read raised in its own layer."""

import numpy as np
import pytest
from conftest import make_checkpoint, stepwise_logits

from mlx_flash import convert, load
from mlx_flash.errors import ReadError
from mlx_flash.read_ahead import ReadAhead, Request
from mlx_flash.store.format import BUNDLES_NAME
from mlx_flash.store.store import BundleStore

PROMPT, STEPS = [1, 5, 9, 3, 7, 2], [4, 8, 6, 11, 3, 5]


@pytest.fixture(params=["bundled", "planar"])
def store(tmp_path, request):
    make_checkpoint(tmp_path / "hf", "qwen2", num_hidden_layers=4)
    return convert(
        tmp_path / "hf", tmp_path / "store", layout=request.param, progress=False
    )


def decode(model):
    """Prefill, then one token at a time: the logits of every step."""
    return stepwise_logits(model, PROMPT, STEPS)


def partial_budget(store) -> int:
    """A budget that caches part of the FFN and streams the rest (the hybrid): the
    floor and a third of what every layer's cache holds whole."""
    whole, _ = load(str(store), max_kv_size=256)
    caches = sum(layer.mlp._cache.nbytes for layer in whole.layers)
    return whole.flash_plan.floor + caches // 3


@pytest.mark.parametrize("options", [{}, {"naive": True}])
def test_reading_ahead_changes_nothing_but_the_wait(store, options):
    """`all` under a budget (part cached, the rest streamed) and `naive`: the logits
    are those of reading in turn; every decoded layer takes a read made ahead; the
    bytes per token are the plan's."""
    budget = partial_budget(store)
    kw = dict(dram_budget=budget, max_kv_size=256, **options)
    ahead, _ = load(str(store), **kw)
    turn, _ = load(str(store), no_read_ahead=True, **kw)
    assert ahead.flash_plan.fixed["FFN read-ahead"] > 0
    assert turn.flash_plan.fixed["FFN read-ahead"] == 0
    assert turn.flash_read_ahead is None
    # (the read-ahead buffer leaves the caches fewer slots: the FFN sums its
    # neurons in another order, so equal up to float rounding)
    a, t = decode(ahead), decode(turn)
    np.testing.assert_allclose(a, t, rtol=1e-5, atol=1e-5)
    assert (a.argmax(-1) == t.argmax(-1)).all()
    reads = ahead.flash_read_ahead
    layers = len(ahead.layers)
    streamed = sum(not layer.mlp._whole for layer in ahead.layers)
    assert streamed > 0 and (options or sum(ahead.flash_plan.capacities) > 0)
    # after the first decoded token every streamed layer's read is taken
    assert reads.taken >= streamed * (len(STEPS) - 1)
    stats = ahead.flash_stats
    expected = ahead.flash_plan.expected_bytes
    ahead.flash_stats.reset()
    before = ahead.flash_store.read_totals().bytes  # both readers
    decode(ahead)
    assert stats.bytes / stats.tokens == pytest.approx(expected, rel=0.02)
    assert reads.dropped <= 2 * layers  # the prompt's and the last token's
    assert before < ahead.flash_store.read_totals().bytes


def test_a_changed_request_is_dropped_and_read_again(store):
    """A read ahead whose request is not the one the layer makes is dropped (its
    bytes counted: they were read), and the layer reads its own."""
    s = BundleStore(store)
    entry = s.manifest.layers[1]
    ahead = ReadAhead(s)
    every = list(range(len(entry.sections)))
    ahead.start(Request(1, np.arange(entry.neurons), every, 0))
    assert ahead.take(Request(2, np.arange(entry.neurons), every, 0)) is None
    assert ahead.dropped == 1 and ahead.bytes > 0  # dropped: its buffer is free
    assert ahead.take(Request(1, np.arange(4), every, 0)) is None
    ahead.start(Request(1, np.arange(3), every, 0))
    assert ahead.dropped == 1
    pieces = ahead.take(Request(1, np.arange(3), every, 0))
    assert ahead.taken == 1
    direct = s.read_runs(1, np.arange(3), every)
    for (p1, c1, r1), (p2, c2, r2) in zip(pieces, direct):
        np.testing.assert_array_equal(p1, p2)
        np.testing.assert_array_equal(r1, r2)
    s.close()


def test_a_failed_read_ahead_raises_in_its_own_layer(store):
    """A damaged block read ahead is the `ReadError` of the layer that takes it,
    naming that layer (the reader's checksums run on the read-ahead thread)."""
    m = BundleStore(store).manifest
    layer = 2
    section = m.layers[layer].sections[-1]
    at = section.offset + 5 * section.bundle_bytes + 1
    with open(store / BUNDLES_NAME, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))
    model, _ = load(str(store), naive=True, max_kv_size=256)
    assert model.flash_read_ahead is not None
    with pytest.raises(ReadError, match=f"layer {layer}, neurons"):
        decode(model)

"""Issue #16: every block's checksum checked the first time the runtime reads it.

One flipped bit in any data section is caught on the first use of its block (no
token comes from it), one in a tensor loaded at load refuses the load; a checked
block costs nothing when read again."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from conftest import make_checkpoint
from mlx_flash import load
from mlx_flash.errors import ReadError
from mlx_flash.store.format import BUNDLES_NAME, DENSE_NAME
from mlx_flash.store.store import BundleStore
from mlx_flash.store.writer import convert
from mlx_flash.streamed import StreamedHead, dense_tensors

PROMPT = [1, 5, 9, 3]


def flip_bit(path, at, bit):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)[0]
        f.seek(at)
        f.write(bytes([b ^ (1 << bit)]))


def decode(model, steps=3):
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([PROMPT]), cache=cache))
    for t in range(steps):
        mx.eval(model(mx.array([[t + 2]]), cache=cache))


@pytest.fixture
def store(tmp_path):
    make_checkpoint(tmp_path / "hf", "qwen2")
    return convert(
        tmp_path / "hf", tmp_path / "store", layout="columns", progress=False
    )


def floor_budget(store, **options):
    free, _ = load(str(store), **options)
    return free.flash_plan.floor


@pytest.mark.parametrize("seed", [0, 1])
def test_a_flipped_bit_in_every_section_is_caught_on_first_use(store, seed):
    """One bit at a random position of every data section in turn — each layer's row
    sections and its column bundles: the read that brings the block raises, naming
    the layer and the neurons (or channels) of that block; nothing was produced from
    it. (The dense part's tensors: the tests below.)"""
    from test_input_sparse import calibrate

    calibrate(store, store.parent, "0")  # (it reads the store: before the damage)
    rng = np.random.default_rng(seed)
    m = BundleStore(store).manifest
    places = [
        (layer, unit, entry, section)
        for layer in range(len(m.layers))
        for unit, entry in (
            ("neurons", m.layers[layer]),
            ("channels", m.columns[layer]),
        )
        for section in entry.sections
    ]
    # planar rows and columns: each part of each component a section of its own
    assert {(unit, s.components[0]) for _, unit, _, s in places} == {
        ("neurons", "gate_proj"),
        ("neurons", "up_proj"),
        ("neurons", "down_proj"),
        ("channels", "gate_proj"),
        ("channels", "up_proj"),
    }
    for layer, unit, entry, section in places:
        neuron = int(rng.integers(entry.neurons))
        at = section.offset + neuron * section.bundle_bytes
        at += int(rng.integers(section.bundle_bytes))
        bit = int(rng.integers(8))
        flip_bit(store / BUNDLES_NAME, at, bit)
        # zero sparsity: every channel and neuron, so every block is read
        model, _ = load(str(store), selector="input", sparsity=0)
        with pytest.raises(ReadError, match=f"layer {layer}, {unit} .*checksum") as e:
            decode(model)
        span = e.value.message.split(f"{unit} ")[1].split(":")[0]
        first, last = map(int, span.split("-"))
        assert (
            first <= neuron <= last and last - first < 4096 // section.bundle_bytes + 2
        )
        assert f"bytes {at - at % 4096}-" in e.value.message
        flip_bit(store / BUNDLES_NAME, at, bit)  # undo: the next place alone


def test_every_block_of_the_bundles_is_covered(store):
    """Exact `all` decoding at the floor streams every layer whole: one bit flipped
    in each of several layers is caught, each on its own store."""
    m = BundleStore(store).manifest
    budget = floor_budget(store)
    for layer in range(len(m.layers)):
        s = m.layers[layer].sections[-1]
        flip_bit(store / BUNDLES_NAME, s.offset + 3 * s.bundle_bytes + 1, 3)
        model, _ = load(str(store), dram_budget=budget)
        with pytest.raises(ReadError, match=f"layer {layer}, neurons"):
            decode(model)
        flip_bit(store / BUNDLES_NAME, s.offset + 3 * s.bundle_bytes + 1, 3)  # undo


def test_a_resident_tensor_is_checked_at_load(store):
    """With no budget everything is resident: a bit in the middle of the token table
    (large: its blocks are its own) refuses the load; so does one among the small
    tensors that share blocks, naming them and the byte range."""
    tensors = dense_tensors(store / DENSE_NAME)
    t = tensors["model.embed_tokens.weight"]
    flip_bit(store / DENSE_NAME, t.offset + t.nbytes // 2, 5)
    with pytest.raises(ReadError, match="tensor model.embed_tokens.weight: bytes"):
        load(str(store))
    flip_bit(store / DENSE_NAME, t.offset + t.nbytes // 2, 5)  # undo
    load(str(store))
    t = tensors["model.norm.weight"]
    flip_bit(store / DENSE_NAME, t.offset + 2, 5)
    with pytest.raises(ReadError, match=r"tensors .*: bytes \d+-\d+ do not match"):
        load(str(store))


def test_a_streamed_tensor_is_checked_when_first_read(tmp_path):
    """At the floor the attention streams (six layers: groups larger than the
    buffers): a flipped bit in a projection loads, and the first token that reads
    it raises, naming the tensor."""
    make_checkpoint(tmp_path / "hf", "qwen2", num_hidden_layers=6)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    budget = floor_budget(store, max_kv_size=256)
    model, _ = load(str(store), dram_budget=budget, max_kv_size=256)
    assert "layers.1.self_attn" in [g.name for g in model.flash_plan.streamed()]
    name = "model.layers.1.self_attn.o_proj.weight"
    t = dense_tensors(store / DENSE_NAME)[name]
    flip_bit(store / DENSE_NAME, t.offset + t.nbytes // 2, 0)
    model, _ = load(str(store), dram_budget=budget, max_kv_size=256)
    with pytest.raises(ReadError, match=f"tensor {name}: bytes .*checksum"):
        decode(model)


def test_a_damaged_head_chunk_read_ahead_raises_in_the_head(tmp_path, monkeypatch):
    """The streamed LM head reads its next chunk on a thread while one computes: a
    flipped bit in its last chunk is the head's `ReadError`, naming the tensor, on the
    decoding thread (and the output of that step is never computed)."""
    from mlx_flash import flash_setup

    monkeypatch.setattr(flash_setup, "head_chunk", lambda attention: 1024)  # chunks
    make_checkpoint(tmp_path / "hf", "qwen2", num_hidden_layers=6)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    budget = floor_budget(store, max_kv_size=256)
    model, _ = load(str(store), dram_budget=budget, max_kv_size=256)
    head = next(m for m in model.modules() if isinstance(m, StreamedHead))
    a, b = head.chunks()[-1]
    assert a > 0  # several chunks: the last one is read ahead
    t = head._parts["weight"].rows(a, b)
    flip_bit(store / DENSE_NAME, t.offset + t.nbytes // 2, 0)
    model, _ = load(str(store), dram_budget=budget, max_kv_size=256)
    with pytest.raises(ReadError, match=f"tensor {t.name}: bytes .*checksum"):
        decode(model)


def test_checked_blocks_cost_nothing_when_read_again(store):
    """Steady state: after the first tokens every block read has been checked, so
    later tokens hash nothing; the flags are in the plan."""
    model, _ = load(str(store), dram_budget=floor_budget(store))
    checkers = model.flash_store.checkers
    decode(model, 2)
    hashed = sum(c.blocks for c in checkers.values())
    assert hashed > 0
    decode(model, 4)
    assert sum(c.blocks for c in checkers.values()) == hashed
    assert model.flash_plan.fixed["checksums"] == model.flash_store.checks_bytes > 0


def test_the_mmap_reader_checks_too(store):
    m = BundleStore(store).manifest
    s = m.layers[0].sections[0]
    flip_bit(store / BUNDLES_NAME, s.offset + 7, 1)
    model, _ = load(str(store), dram_budget=floor_budget(store), reader="mmap")
    with pytest.raises(ReadError, match="layer 0, neurons 0-"):
        decode(model)


def test_the_disk_token_table_checks_each_row_when_first_read(tmp_path):
    """An untied table read by row: a damaged row's block raises when a token
    needs it, naming the row; the other rows still read."""
    from mlx_flash.disk_embedding import DiskEmbedding

    make_checkpoint(tmp_path / "hf", "llama")  # tie_word_embeddings: false
    store = convert(
        tmp_path / "hf", tmp_path / "store", ffn_format="q8", progress=False
    )
    roomy, _ = load(str(store), prefill_step_size=16)
    p = roomy.flash_plan
    table_bytes = next(g.resident for g in p.groups if g.name.endswith("embed_tokens"))
    budget = p.total - table_bytes // 2
    t = dense_tensors(store / DENSE_NAME)["model.embed_tokens.weight"]
    row = t.nbytes // t.shape[0]
    k = t.shape[0] // 2
    flip_bit(store / DENSE_NAME, t.offset + k * row + 3, 2)
    model, _ = load(str(store), dram_budget=budget, prefill_step_size=16)
    table = model.model.embed_tokens
    assert isinstance(table, DiskEmbedding)
    table(mx.array([[1, 2]]))  # rows far from the damage
    with pytest.raises(ReadError, match=f"token table's weight, row {k}: bytes"):
        table(mx.array([[k]]))

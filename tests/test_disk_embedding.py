"""Untied token embeddings stay on disk: rows read per token equal the table's."""

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from conftest import make_checkpoint

from mlx_flash import FlashError, convert, load
from mlx_flash.disk_embedding import DiskEmbedding, table_on_disk


def write_table(path, quantized: bool, vocab=50, dims=64):
    table = mx.random.normal((vocab, dims), key=mx.random.key(1))
    if quantized:
        w, s, b = mx.quantize(table, group_size=32, bits=4)
        weights = {"weight": w, "scales": s, "biases": b}
        table = mx.dequantize(w, s, b, group_size=32, bits=4)
    else:
        weights = {"weight": table.astype(mx.float16)}
        table = table.astype(mx.float16)
    mx.save_safetensors(
        str(path),
        {"model.embed_tokens." + k: v for k, v in weights.items()}
        | {"lm_head.weight": mx.zeros((vocab, dims))},
    )
    return table


@pytest.mark.parametrize("quantized", [True, False])
def test_rows_equal_the_table(tmp_path, quantized):
    path = tmp_path / "model.safetensors"
    table = write_table(path, quantized)
    emb = table_on_disk(path, 50, 64)
    ids = mx.array([[3, 7, 3], [49, 0, 7]])
    assert mx.array_equal(emb(ids), table[ids])
    assert emb.bytes_read > 0


def test_a_file_without_the_table_has_none(tmp_path):
    path = tmp_path / "model.safetensors"
    write_table(path, True)
    assert table_on_disk(path, 50, 64, prefix="model.decoder.embed_tokens.") is None


def test_a_table_of_the_wrong_size_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_table(path, True)
    with pytest.raises(FlashError, match="expected 51 rows"):
        table_on_disk(path, 51, 64)


def test_a_cut_file_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    write_table(path, False)
    emb = table_on_disk(path, 50, 64)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 200)
    with pytest.raises(FlashError, match="cut short"):
        emb(mx.array([49]))


def test_an_untied_table_stays_on_disk_unless_everything_fits(tmp_path):
    """One row per token is all an untied table saves when held: the planner holds
    it last. Held when everything fits; read from disk by row when not."""
    make_checkpoint(tmp_path / "hf", "llama")  # tie_word_embeddings: false
    store = convert(
        tmp_path / "hf", tmp_path / "store", ffn_format="q8", progress=False
    )
    roomy, _ = load(str(store), prefill_step_size=16, progress=False)  # (a budget's
    # own step would move the plan: pinned)
    assert isinstance(roomy.model.embed_tokens, nn.Embedding)
    p = roomy.flash_plan
    table_bytes = next(g.resident for g in p.groups if g.name.endswith("embed_tokens"))
    budget = p.total - table_bytes // 2  # a row per token beats 40 neurons per token
    model, _ = load(
        str(store), dram_budget=budget, prefill_step_size=16, progress=False
    )
    table = model.model.embed_tokens
    assert isinstance(table, DiskEmbedding)
    assert [g.name for g in model.flash_plan.streamed()] == ["embed_tokens"]
    params = dict(tree_flatten(model.parameters()))
    assert not any("embed_tokens" in k for k in params)  # never loaded
    assert (
        sum(v.nbytes for v in params.values())
        == p.resident_groups - table_bytes + (p.fixed["dense (small tensors)"])
    )
    full = mx.load(str(store / "model.safetensors"))["model.embed_tokens.weight"]
    ids = mx.array([[1, 5, 9]])
    assert mx.allclose(table(ids), full[ids].astype(mx.float32))
    assert generated(model) == generated(roomy)


def generated(model):
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array([1, 5, 9, 3]), model, max_tokens=6, sampler=lambda l: mx.argmax(l, -1)
    )
    return [int(t) for t, _ in steps]

"""Quantized products split across the CPU's cores (`parallel.py`): a split product
equals the whole one (output rows: exactly; contraction rows: to rounding), what is
split and what is not, and a model with its products split gives the logits and
greedy tokens of one computing on one core, resident and streamed."""

import threading

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_checkpoint, stepwise_logits
from mlx_lm.convert import convert as mlx_lm_convert

from mlx_flash import convert, load, parallel

PROMPT, STEPS = [1, 5, 9, 3, 7, 2], [4, 8, 6, 11, 3, 5]


@pytest.fixture
def split_everything(monkeypatch):
    """Every product of at least a few rows split, whatever its size."""
    monkeypatch.setattr(parallel, "MIN_BLOCK", 1)
    before = parallel.threads()
    yield
    parallel.set_threads(before)


def quantized(rows, cols, bits, group, mode="affine"):
    w = mx.random.normal((rows, cols), key=mx.random.key(rows + bits))
    return mx.quantize(w, group_size=group, bits=bits, mode=mode)


@pytest.mark.parametrize(
    "bits,group,mode", [(4, 64, "affine"), (8, 32, "affine"), (4, 32, "mxfp4")]
)
@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("tokens", [1, 5])
def test_a_split_product_equals_the_whole(
    split_everything, bits, group, mode, k, tokens
):
    q = quantized(96, 128, bits, group, mode)
    w, scales, biases = q[0], q[1], (q[2] if len(q) > 2 else None)
    x = mx.random.normal((1, tokens, 128), key=mx.random.key(1))
    a = mx.random.normal((1, tokens, 96), key=mx.random.key(2))
    kw = dict(group_size=group, bits=bits, mode=mode)
    parallel.set_threads(1)
    rows_one = parallel.quantized_matmul(x, w, scales, biases, True, group, bits, mode)
    sums_one = parallel.quantized_matmul(a, w, scales, biases, False, group, bits, mode)
    parallel.set_threads(k)
    assert parallel.blocks(96, 96 * 128) == k
    rows = parallel.quantized_matmul(x, w, scales, biases, True, group, bits, mode)
    sums = parallel.quantized_matmul(a, w, scales, biases, False, group, bits, mode)
    mlx_rows = mx.quantized_matmul(x, w, scales, biases, transpose=True, **kw)
    assert np.array_equal(np.array(rows), np.array(mlx_rows))  # the same arithmetic
    assert np.array_equal(np.array(rows), np.array(rows_one))
    np.testing.assert_allclose(np.array(sums), np.array(sums_one), rtol=1e-5, atol=1e-4)


def test_what_is_split(monkeypatch):
    before = parallel.threads()
    try:
        parallel.set_threads(1)
        assert parallel.blocks(4864, 4864 * 896) == 1  # one core: nothing split
        parallel.set_threads(4)
        assert parallel.blocks(4864, 4864 * 896) == 4
        assert parallel.blocks(128, 128 * 896) == 1  # too small to pay for its wait
        assert parallel.blocks(896, 3 * parallel.MIN_BLOCK) == 3
        assert parallel.blocks(2, 10**9) == 2  # never more blocks than rows
        monkeypatch.setattr(parallel.mx, "default_device", lambda: mx.gpu)
        assert parallel.blocks(4864, 4864 * 896) == 1  # a GPU: its own kernels
    finally:
        parallel.set_threads(before)


def test_the_default_is_every_core_on_the_cpu():
    assert parallel.default_threads() == parallel.available_cores() >= 1


def decode(model):
    """Prefill, then one token at a time: the logits of every step."""
    return stepwise_logits(model, PROMPT, STEPS)


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text"])
@pytest.mark.parametrize("budget", [None, "floor"])
def test_a_split_model_decodes_as_one_core(tmp_path, split_everything, arch, budget):
    """mlx-lm's 4-bit model as a store (its linear layers and head quantized, and
    split), resident and at its floor (attention and the head streamed, the FFN read
    ahead): the logits of one core within rounding, the same greedy tokens."""
    make_checkpoint(tmp_path / "hf", arch, num_hidden_layers=3, hidden_size=128)
    mlx_lm_convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), quantize=True)
    store = convert(tmp_path / "mlx", tmp_path / "store", progress=False)
    kw = dict(max_kv_size=256)
    if budget == "floor":
        kw["dram_budget"] = load(str(store), **kw)[0].flash_plan.floor
    one, _ = load(str(store), compute_threads=1, **kw)
    assert parallel.threads() == 1
    expected = decode(one)
    split, _ = load(str(store), compute_threads=3, **kw)
    assert parallel.threads() == 3
    kinds = {type(m) for m in split.modules()}
    assert parallel.QuantizedLinear in kinds or parallel.QuantizedEmbedding in kinds
    got = decode(split)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_a_split_product_runs_on_any_thread(split_everything):
    """MLX's streams belong to their thread: a server's generation thread computes
    with streams of its own."""
    parallel.set_threads(2)
    w, scales, biases = quantized(64, 128, 4, 64)
    x = mx.random.normal((1, 128), key=mx.random.key(3))
    here = np.array(parallel.quantized_matmul(x, w, scales, biases, True, 64, 4))
    out = {}

    def run():
        out["y"] = np.array(
            parallel.quantized_matmul(x, w, scales, biases, True, 64, 4)
        )

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert np.array_equal(out["y"], here)

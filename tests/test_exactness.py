"""All neurons from the store => the same logits and greedy tokens as the dense
model."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from conftest import ARCHS, make_checkpoint
from mlx_lm.generate import generate_step
from opt_reference import numpy_opt_logits

from mlx_flash import convert, load
from mlx_flash.store.dense import export_dense

PROMPT = [1, 5, 6, 7, 8, 9, 10, 3]


def reference_logits(path, arch):
    """Dense logits of a Hugging Face directory: mlx-lm, or numpy for OPT (never
    ours)."""
    if arch == "opt":
        return mx.array(numpy_opt_logits(path, PROMPT).astype(np.float32))
    model, _ = mlx_lm.load(str(path))
    model.set_dtype(mx.float32)
    return model(mx.array([PROMPT]))[0]


def greedy(model, n=32):
    steps = generate_step(
        mx.array(PROMPT), model, max_tokens=n, sampler=lambda l: mx.argmax(l, -1)
    )
    return [int(t) for t, _ in steps]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["auto", "float16", "bfloat16", "q8", "q4"])
def test_store_matches_dense(tmp_path, arch, fmt):
    make_checkpoint(tmp_path / "hf", arch)
    convert(tmp_path / "hf", tmp_path / "store", ffn_format=fmt, progress=False)
    model, _ = load(str(tmp_path / "store"))
    # Lossless formats compare with the original weights; the others with the store's
    # own weights, dequantized into a plain mlx-lm directory.
    ref_dir = tmp_path / "hf"
    if fmt != "auto":
        # (the numpy OPT reference reads float matrices only)
        ref_dir = export_dense(tmp_path / "store", tmp_path / "dense", arch != "opt")
    ours = model(mx.array([PROMPT]))[0]
    ref = reference_logits(ref_dir, arch)
    assert np.allclose(
        np.array(ours), np.array(ref), atol=1e-4 * float(mx.abs(ref).max())
    )
    if arch != "opt":
        dense, _ = mlx_lm.load(str(ref_dir))
        dense.set_dtype(mx.float32)
        tokens = greedy(model)
        assert tokens == greedy(dense)
        assert len(set(tokens)) > 3  # a model stuck on one token would prove nothing


@pytest.mark.parametrize("fmt", ["auto", "q4"])
def test_opt_greedy_matches_numpy(tmp_path, fmt):
    make_checkpoint(tmp_path / "hf", "opt", seed=1)
    convert(tmp_path / "hf", tmp_path / "store", ffn_format=fmt, progress=False)
    ref = (
        tmp_path / "hf"
        if fmt == "auto"
        else export_dense(tmp_path / "store", tmp_path / "dense", keep_quantized=False)
    )
    model, _ = load(str(tmp_path / "store"))
    ids = list(PROMPT)
    for _ in range(32):
        ids.append(int(np.argmax(numpy_opt_logits(ref, ids)[-1])))
    expected = ids[len(PROMPT) :]
    assert greedy(model, 32) == expected
    assert len(set(expected)) > 2


def test_mlx_quantized_source(tmp_path):
    """An mlx-community style directory: gate/up kept bit for bit, down re-quantized."""
    import mlx.nn as nn
    from mlx_lm.utils import load_model, save_model

    make_checkpoint(tmp_path / "hf", "qwen3")
    model, config = load_model(tmp_path / "hf")
    nn.quantize(model, group_size=64, bits=4)
    (tmp_path / "mlx").mkdir()
    save_model(tmp_path / "mlx", model)
    config["quantization"] = {"group_size": 64, "bits": 4}
    (tmp_path / "mlx" / "config.json").write_text(__import__("json").dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "mlx" / name).write_bytes((tmp_path / "hf" / name).read_bytes())
    convert(tmp_path / "mlx", tmp_path / "store", progress=False)
    flash, _ = load(str(tmp_path / "store"))
    rows = flash.flash_store.read_layer(1, mx.float32)
    source = mx.load(str(tmp_path / "mlx" / "model.safetensors"))
    assert mx.array_equal(
        rows["up_proj"][0], source["model.layers.1.mlp.up_proj.weight"]
    )
    dense, _ = mlx_lm.load(str(export_dense(tmp_path / "store", tmp_path / "dense")))
    dense.set_dtype(mx.float32)
    x = mx.array([PROMPT])
    assert np.allclose(np.array(flash(x)), np.array(dense(x)), atol=1e-4)
    assert greedy(flash) == greedy(dense)


def test_batch_generate(tmp_path):
    from mlx_flash import batch_generate

    make_checkpoint(tmp_path / "hf", "llama")
    convert(tmp_path / "hf", tmp_path / "store", progress=False)
    model, tokenizer = load(str(tmp_path / "store"))
    dense, _ = mlx_lm.load(str(tmp_path / "hf"))
    dense.set_dtype(mx.float32)
    prompts = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13]]
    ours = batch_generate(model, tokenizer, prompts, max_tokens=8)
    theirs = batch_generate(dense, tokenizer, prompts, max_tokens=8)
    assert ours.texts == theirs.texts


def test_float16_source_against_original(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama", dtype=mx.float16)
    convert(tmp_path / "hf", tmp_path / "store", progress=False)
    model, _ = load(str(tmp_path / "store"))
    ref = reference_logits(tmp_path / "hf", "llama")
    assert np.allclose(np.array(model(mx.array([PROMPT]))[0]), np.array(ref), atol=1e-4)


@pytest.mark.parametrize("layout", ["split", "planar"])
def test_split_layout_matches(tmp_path, layout):
    make_checkpoint(tmp_path / "hf", "llama")
    convert(
        tmp_path / "hf",
        tmp_path / "store",
        ffn_format="q4",
        layout=layout,
        progress=False,
    )
    convert(tmp_path / "hf", tmp_path / "bundled", ffn_format="q4", progress=False)
    a, _ = load(str(tmp_path / "store"))
    b, _ = load(str(tmp_path / "bundled"))
    x = mx.array([PROMPT])
    assert mx.array_equal(a(x), b(x))


def test_bias_mlp_roundtrip(tmp_path):
    """Per-neuron row biases ride inside the bundle; the output bias stays dense."""
    make_checkpoint(tmp_path / "hf", "llama", mlp_bias=True)
    convert(tmp_path / "hf", tmp_path / "store", progress=False)
    model, _ = load(str(tmp_path / "store"))
    ref = reference_logits(tmp_path / "hf", "llama")
    assert np.allclose(np.array(model(mx.array([PROMPT]))[0]), np.array(ref), atol=1e-4)

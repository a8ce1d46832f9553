"""store/quantize.py: a source quantized, cast, dequantized as mlx-lm's convert does."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_checkpoint
from mlx.utils import tree_flatten
from mlx_lm.convert import convert as mlx_lm_convert
from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config

from mlx_flash import FlashError, convert, load
from mlx_flash.store.quantize import (
    build_model,
    cast_source,
    dequantize_source,
    quantize_source,
)
from mlx_flash.store.sources import open_source
from mlx_flash.utils import get_classes

PROMPT = [1, 5, 6, 7, 8, 9, 10, 3]
SETTINGS = [
    (bits, group, "affine", None) for bits in (2, 3, 4, 6, 8) for group in (32, 64)
]
SETTINGS += [(None, None, mode, None) for mode in ("mxfp4", "mxfp8", "nvfp4")]
SETTINGS += [(None, 64, "affine", "mixed_3_6")]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny float32 checkpoints; `llama-bf16` says torch_dtype bfloat16."""
    tmp = tmp_path_factory.mktemp("quantize")
    for arch in ("llama", "qwen2", "gemma3_text", "opt"):
        make_checkpoint(tmp / arch, arch)
    make_checkpoint(tmp / "llama-bf16", "llama", seed=1, torch_dtype="bfloat16")
    return tmp


def mlx_lm_quantized(hf, out, bits, group, mode, recipe):
    """mlx-lm's own `convert -q` of `hf`: its weights and config."""
    mlx_lm_convert(
        str(hf),
        str(out),
        quantize=True,
        q_bits=bits,
        q_group_size=group,
        q_mode=mode,
        quant_predicate=recipe,
    )
    return mx.load(str(out / "model.safetensors")), json.loads(
        (out / "config.json").read_text()
    )


def mlx_lm_model(src, path):
    """mlx-lm's `load_model` on `src` saved as a directory (our classes for OPT)."""
    path.mkdir()
    mx.save_safetensors(str(path / "model.safetensors"), src.weights)
    save_config(dict(src.config), path / "config.json")
    return mlx_lm_model_of(path)


def mlx_lm_model_of(path):
    return load_model(path, get_model_classes=get_classes)[0]


def assert_same_tensors(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype, k
        assert mx.array_equal(ours[k], v).item(), k


@pytest.mark.parametrize("bits,group,mode,recipe", SETTINGS)
def test_quantize_source_equals_mlx_lm_convert(
    checkpoints, tmp_path, bits, group, mode, recipe
):
    src = open_source(checkpoints / "llama")
    ours = quantize_source(src, bits, group, mode, recipe)
    weights, config = mlx_lm_quantized(
        checkpoints / "llama", tmp_path / "mlx", bits, group, mode, recipe
    )
    assert_same_tensors(ours.weights, weights)
    assert ours.config["quantization"] == config["quantization"]
    assert ours.kind == "mlx"
    gate = ours.origins["model.layers.0.mlp.gate_proj"]
    assert not gate.exact and gate.kind == "float32"
    label = f"affine q{bits or 3} g{group}" if mode == "affine" else mode
    assert gate.note.startswith(f"float32 quantized to {label}")
    assert all(o.exact is False for o in ours.origins.values())
    assert "model.norm" not in ours.origins  # norms stay float, exactly
    if recipe:  # the recipe's high bits where mlx-lm puts them
        assert "q6" in ours.origins["model.layers.1.mlp.down_proj"].note
        assert "q3" in ours.origins["model.layers.0.mlp.down_proj"].note


@pytest.mark.parametrize("arch", ["qwen2", "gemma3_text", "llama-bf16"])
def test_quantize_source_equals_mlx_lm_convert_per_arch(checkpoints, tmp_path, arch):
    """Tied embeddings (qwen2, gemma3: a quantized embedding serves as the head), and
    mlx-lm's cast to config.json's torch_dtype before quantizing (llama-bf16)."""
    ours = quantize_source(open_source(checkpoints / arch), 4, 64)
    weights, config = mlx_lm_quantized(
        checkpoints / arch, tmp_path / "mlx", 4, 64, "affine", None
    )
    assert_same_tensors(ours.weights, weights)
    assert ours.config["quantization"] == config["quantization"]
    if arch == "llama-bf16":
        assert ours.weights["model.norm.weight"].dtype == mx.bfloat16
        norm = ours.origins["model.norm"]
        assert not norm.exact and "float32 cast to bfloat16" in norm.note


def test_quantize_source_opt_keeps_hugging_face_names(checkpoints):
    """OPT (our model class): mlx-lm's quantize_model on it, under HF names."""
    src = open_source(checkpoints / "opt")
    ours = quantize_source(src, 4, 64)
    assert "model.decoder.layers.0.fc1.scales" in ours.weights
    assert not any(".mlp." in k for k in ours.weights)
    model, _, _ = build_model(src)
    model, config = quantize_model(model, src.config, 64, 4)
    expected = dict(tree_flatten(model.parameters()))
    rebuilt, renamed, _ = build_model(ours, load=False)  # our names -> the model's
    assert_same_tensors(renamed, expected)
    assert ours.config["quantization"] == config["quantization"]
    assert not ours.origins["model.decoder.layers.1.fc2"].exact


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_convert_quantize_computes_what_mlx_lm_computes(checkpoints, tmp_path, arch):
    """`mlx_flash.convert(quantize=True)`, down kept as float32 columns, computes the
    logits of mlx-lm's quantized model: `mlx_lm.convert`'s own for llama; for OPT,
    which mlx-lm lacks, mlx-lm's loader on quantize_source's weights."""
    convert(
        hf_path=str(checkpoints / arch),
        mlx_path=str(tmp_path / "store"),
        quantize=True,
        q_bits=4,
        q_group_size=64,
        down_format="float32",
        progress=False,
    )
    model, _ = load(str(tmp_path / "store"), progress=False)
    ours = model(mx.array([PROMPT]))[0]
    if arch == "llama":
        mlx_lm_convert(str(checkpoints / arch), str(tmp_path / "mlx"), quantize=True)
        reference = mlx_lm_model_of(tmp_path / "mlx")
    else:
        src = quantize_source(open_source(checkpoints / arch), 4, 64)
        reference = mlx_lm_model(src, tmp_path / "q")
    mlp = reference.layers[0].mlp
    assert isinstance(getattr(mlp, "fc2", None) or mlp.down_proj, nn.QuantizedLinear)
    ref = reference(mx.array([PROMPT]))[0].astype(mx.float32)
    scale = float(mx.abs(ref).max())
    assert np.allclose(np.array(ours), np.array(ref), atol=1e-4 * scale)


def test_already_quantized_source_is_refused(checkpoints):
    quantized = quantize_source(open_source(checkpoints / "llama"), 4, 64)
    with pytest.raises(FlashError, match="already quantized"):
        quantize_source(quantized, 8, 64)


@pytest.mark.parametrize(
    "bits,group,mode,recipe,message",
    [
        (7, 64, "affine", None, "7 bits"),
        (4, 16, "affine", None, "groups of 16"),
        (8, 32, "mxfp4", None, "mxfp4 quantizes 4 bits"),
        (None, None, "int4", None, "unknown quantization mode"),
        (None, None, "affine", "mixed_9_9", "unknown quantization recipe"),
        (None, None, "mxfp4", "mixed_3_6", "cannot use mxfp4"),
    ],
)
def test_bad_quantization_is_refused(checkpoints, bits, group, mode, recipe, message):
    src = open_source(checkpoints / "llama")
    with pytest.raises(FlashError, match=message):
        quantize_source(src, bits, group, mode, recipe)


def test_recipe_on_a_model_without_down_proj_is_refused(checkpoints):
    with pytest.raises(FlashError, match="recipe does not apply to opt"):
        quantize_source(
            open_source(checkpoints / "opt"), None, 64, "affine", "mixed_3_6"
        )


def test_cast_source(checkpoints):
    src = open_source(checkpoints / "llama")
    half = cast_source(src, "bfloat16")
    assert {v.dtype for v in half.weights.values()} == {mx.bfloat16}
    assert half.config["torch_dtype"] == "bfloat16"
    gate = half.origins["model.layers.0.mlp.gate_proj"]
    assert not gate.exact and gate.note == "float32 cast to bfloat16 (asked)"
    back = cast_source(half, "float32")  # widening: exact, and no new notes
    assert back.origins == half.origins
    for k, v in half.weights.items():
        assert mx.array_equal(back.weights[k].astype(mx.bfloat16), v).item()
    assert cast_source(src, "float32").origins == {}  # nothing changed
    with pytest.raises(FlashError, match="unknown dtype"):
        cast_source(src, "int8")


def test_cast_of_a_quantized_source_casts_its_scales(checkpoints):
    q = quantize_source(open_source(checkpoints / "llama"), 4, 64)
    half = cast_source(q, "float16")
    key = "model.layers.0.mlp.up_proj"
    assert half.weights[key + ".weight"].dtype == mx.uint32
    assert half.weights[key + ".scales"].dtype == mx.float16
    assert "scales float32 cast to float16" in half.origins[key].note


@pytest.mark.parametrize("mode", ["affine", "mxfp4", "nvfp4"])
def test_dequantize_round_trip(checkpoints, tmp_path, mode):
    """Dequantized weights are the quantized model's values: quantizing them again
    lie near the originals (each group's error within a quarter of its peak), and equal
    mlx-lm's own dequantize_model."""
    src = open_source(checkpoints / "llama")
    q = quantize_source(src, None, None, mode)
    dq = dequantize_source(q)
    assert sorted(dq.weights) == sorted(src.weights)
    assert "quantization" not in dq.config and "quantization_config" not in dq.config
    assert dq.kind == "hf"
    note = dq.origins["model.layers.0.mlp.gate_proj"].note
    assert "dequantized to" in note and "quantized to" in note
    model = mlx_lm_model(q, tmp_path / "q")  # our config and weights load as they are
    assert isinstance(model.layers[0].mlp.gate_proj, nn.QuantizedLinear)
    model = dequantize_model(model)
    expected = dict(tree_flatten(model.parameters()))
    assert_same_tensors(dq.weights, expected)
    gate = "model.layers.0.mlp.gate_proj.weight"
    group = {"affine": 64, "mxfp4": 32, "nvfp4": 16}[mode]
    w = src.weights[gate]
    error = mx.abs(dq.weights[gate] - w).reshape(w.shape[0], -1, group)
    peak = mx.abs(w).reshape(w.shape[0], -1, group).max(-1, keepdims=True)
    assert (error <= peak / 4).all().item()  # 4-bit grids: within a quarter of the peak
    assert (error > 0).any().item()  # and lossy indeed

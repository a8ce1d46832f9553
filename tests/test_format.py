"""Store format v2 (docs/FORMAT.md): encodings, MLX-quantized sources kept bit for bit,
the aligned dense part, origins and lossy steps, older stores."""

import importlib
import json
import struct

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from checkpoints import write_tiny
from safetensors.numpy import load_file

from mlx_flash import FlashError, load
from mlx_flash.store.aligned_safetensors import PAD_PREFIX
from mlx_flash.store.writer import convert
from mlx_flash.store.encoding import (
    AFFINE_BITS,
    FLOAT_MODES,
    Component,
    Encoding,
    decode_rows,
    encode,
    to_bytes,
)
from mlx_flash.store.format import ALIGN, DENSE_NAME, MANIFEST_NAME
from mlx_flash.store.store import BundleStore
from mlx_flash.utils import resolve_store

mlx_convert = importlib.import_module("mlx_lm.convert").convert

MODES = [("affine", b, g) for b in AFFINE_BITS for g in (32, 64, 128)]
MODES += [(m, b, g) for m, (b, g) in FLOAT_MODES.items()]
PROMPT = [[1, 5, 9, 3, 17, 4, 8, 2]]


def encoding(mode, bits, group):
    if mode == "affine":
        return Encoding("float16", bits, group)
    return Encoding("uint8", bits, group, mode)


@pytest.mark.parametrize("mode, bits, group", MODES)
def test_every_encoding_decodes_to_what_mlx_quantized(mode, bits, group):
    w = mx.random.normal((16, 128))
    enc = encoding(mode, bits, group)
    parts, error = encode(w, enc, 128)
    raw = to_bytes(parts)
    assert raw.shape == (16, enc.nbytes(128))
    decoded = decode_rows(raw, Component("up_proj", 128, enc), mx.float32)
    for a, b in zip(decoded, parts):
        assert mx.array_equal(a, b.astype(a.dtype))
    assert error > 0  # quantizing random floats loses something, and says so


@pytest.mark.parametrize("bad", [(7, 64), (4, 16), (3, 256), (0, 32)])
def test_encodings_mlx_cannot_compute_are_refused(bad):
    with pytest.raises(FlashError, match="unsupported encoding"):
        Encoding("float16", *bad, mode="affine")
    with pytest.raises(FlashError, match="unsupported encoding"):
        Encoding("uint8", 4, 32, "nvfp4")


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "llama"
    write_tiny(path, "llama", hidden_size=128, intermediate_size=256)
    return path


@pytest.mark.parametrize("mode, bits, group", MODES)
def test_mlx_quantized_sources_are_kept_bit_for_bit(hf, tmp_path, mode, bits, group):
    """mlx-lm's own convert quantizes the model; the store keeps every gate/up row and
    every dense tensor word for word, and computes what mlx-lm computes on its
    dense-out (down is re-laid per neuron: a named lossy step)."""
    src = tmp_path / "mlx"
    mlx_convert(
        str(hf), str(src), quantize=True, q_bits=bits, q_group_size=group, q_mode=mode
    )
    convert(src, tmp_path / "store", dense_out=tmp_path / "dense", progress=False)
    source = mx.load(str(src / "model.safetensors"))
    store = BundleStore(tmp_path / "store")
    m = store.manifest
    for i in range(len(m.layers)):
        rows = store.read_layer(i, mx.float32)
        for name in ("gate_proj", "up_proj"):
            c = m.layers[i].components[name]
            assert (c.encoding.mode, c.encoding.bits, c.encoding.group_size) == (
                mode,
                bits,
                group,
            )
            assert c.origin.exact
            key = f"model.layers.{i}.mlp.{name}"
            for part, got in zip(("weight", "scales", "biases"), rows[name]):
                want = source[f"{key}.{part}"]
                assert mx.array_equal(got, want.astype(got.dtype)), (name, part)
        assert not m.layers[i].components["down_proj"].origin.exact
    ours = mx.load(str(tmp_path / "store" / DENSE_NAME))
    for k, v in source.items():
        if ".mlp." not in k:
            assert mx.array_equal(ours[k], v) and ours[k].dtype == v.dtype, k
    assert any("down_proj" in line for line in m.lossy_steps())
    store.close()
    if (mode, bits, group) in [("affine", 4, 64), ("affine", 3, 32), ("mxfp4", 4, 32)]:
        model, _ = load(str(tmp_path / "store"), progress=False)
        dense, _ = mlx_lm.load(str(tmp_path / "dense"))
        dense.set_dtype(mx.float32)
        a, b = model(mx.array(PROMPT)), dense(mx.array(PROMPT))
        assert mx.abs(a - b).max().item() < 1e-4


def test_float_source_is_exact_and_lossy_steps_are_named(hf, tmp_path, capsys):
    convert(hf, tmp_path / "exact", progress=False)
    m = BundleStore(tmp_path / "exact").manifest
    assert m.lossy_steps() == []
    assert all(c.origin.exact for layer in m.layers for c in layer.components.values())
    convert(hf, tmp_path / "q4", ffn_format="q4", progress=True)
    printed = capsys.readouterr().out
    m = BundleStore(tmp_path / "q4").manifest
    steps = m.lossy_steps()
    assert len(steps) == 3 and all("affine q4 g64" in s for s in steps)
    assert all(f"lossy: {s}" in printed for s in steps)
    recorded = json.loads((tmp_path / "q4" / MANIFEST_NAME).read_text())
    origin = recorded["layers"][0]["components"]["gate_proj"]["origin"]
    assert origin["exact"] is False and origin["error"] > 0


def test_dense_part_is_aligned_and_valid_safetensors(hf, tmp_path):
    convert(hf, tmp_path / "store", progress=False)
    path = tmp_path / "store" / DENSE_NAME
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    assert (8 + n) % ALIGN == 0
    for name, t in header.items():
        if name == "__metadata__":
            continue
        start, stop = t["data_offsets"]
        if stop - start >= ALIGN and not name.startswith(PAD_PREFIX):
            assert (8 + n + start) % ALIGN == 0, name
    strict = load_file(str(path))  # the safetensors library's own checks: no holes
    original = mx.load(str(hf / "model.safetensors"))
    for k, v in original.items():
        if ".mlp." not in k:
            assert np.array_equal(strict[k], np.array(v)), k
    model, _ = load(str(tmp_path / "store"), progress=False)  # pads never reach it


def downgrade(store):
    """Make a store look like one an older mlx_flash wrote (format version 1)."""
    d = json.loads((store / MANIFEST_NAME).read_text())
    d["format_version"] = 1
    (store / MANIFEST_NAME).write_text(json.dumps(d))


def test_older_stores_are_refused_with_the_command_that_rebuilds_them(hf, tmp_path):
    convert(hf, tmp_path / "store", progress=False)
    downgrade(tmp_path / "store")
    with pytest.raises(FlashError, match="version 1") as e:
        load(str(tmp_path / "store"), progress=False)
    assert f"python -m mlx_flash.convert {hf} -o" in str(e.value)


def test_an_older_store_in_the_cache_is_converted_again(hf, tmp_path):
    cached = resolve_store(hf, progress=False)
    downgrade(cached)
    assert resolve_store(hf, progress=False) == cached
    assert json.loads((cached / MANIFEST_NAME).read_text())["format_version"] == 3
    load(str(hf), progress=False)


def test_a_group_size_that_does_not_divide_the_rows_is_refused(hf, tmp_path):
    """hidden 128 takes groups of 32-128; the check runs before any quantizing."""
    with pytest.raises(FlashError, match="--group-size") as e:
        convert(hf, tmp_path / "out", ffn_format="q3", group_size=256, progress=False)
    assert "unsupported encoding" in str(e.value)
    small = tmp_path / "small"
    write_tiny(small, "llama")  # hidden 64
    with pytest.raises(FlashError, match="does not split into groups of 128"):
        convert(
            small, tmp_path / "out", ffn_format="q4", group_size=128, progress=False
        )
    assert not (tmp_path / "out").exists()


def test_a_mixed_recipe_keeps_each_layers_own_bits(hf, tmp_path):
    """mlx-lm's mixed_3_6 gives layers' down/v_proj different bits: each layer's
    components record their own source type, rows are kept word for word, and the
    dense part's mixed tensors are the source's."""
    src = tmp_path / "mlx"
    mlx_convert(str(hf), str(src), quantize=True, quant_predicate="mixed_3_6")
    convert(src, tmp_path / "store", progress=False)
    source = mx.load(str(src / "model.safetensors"))
    store = BundleStore(tmp_path / "store")
    seen = set()
    for i, layer in enumerate(store.manifest.layers):
        rows = store.read_layer(i, mx.float32)
        for name in ("gate_proj", "up_proj"):
            key, c = f"model.layers.{i}.mlp.{name}", layer.components[name]
            assert c.encoding.bits * 128 == source[key + ".weight"].shape[-1] * 32
            assert mx.array_equal(rows[name][0], source[key + ".weight"])
        seen.add(layer.components["down_proj"].origin.kind)
    assert len(seen) > 1, seen  # the recipe did mix bit widths, layer by layer
    dense = mx.load(str(tmp_path / "store" / DENSE_NAME))
    for k, v in source.items():
        if ".mlp." not in k:
            assert mx.array_equal(dense[k], v), k
    store.close()

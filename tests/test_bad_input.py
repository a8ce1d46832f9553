"""Bad input raises FlashError naming the file and the fix, and writes nothing."""

import json
import os
import shutil

import mlx.core as mx
import pytest
from conftest import make_checkpoint

from mlx_flash import FlashError, convert, load
from mlx_flash.store import components
from mlx_flash.store.format import BUNDLES_NAME, MANIFEST_NAME
from mlx_flash.store.store import BundleStore


@pytest.fixture
def store(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    # bundled: the manifest edits below are its layout's (test_planar.py: planar's)
    return convert(
        tmp_path / "hf",
        tmp_path / "store",
        ffn_format="q4",
        layout="bundled",
        progress=False,
    )


def listing(path):
    return sorted(p.name for p in path.iterdir())


def test_missing_source(tmp_path):
    with pytest.raises(FlashError, match="no such file"):
        convert(tmp_path / "nope", tmp_path / "out", progress=False)
    assert listing(tmp_path) == []


def test_missing_config(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "config.json").unlink()
    with pytest.raises(FlashError, match="no config.json"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_ffn_tensor(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    w = mx.load(str(tmp_path / "hf" / "model.safetensors"))
    del w["model.layers.1.mlp.up_proj.weight"]
    mx.save_safetensors(str(tmp_path / "hf" / "model.safetensors"), w)
    with pytest.raises(FlashError, match="up_proj"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert listing(tmp_path) == ["hf"]  # no store, no temporary directory


def test_unsupported_architecture(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FlashError, match="supported architectures: llama"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert listing(tmp_path) == ["hf"]


def test_pickle_checkpoints_refused(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    (tmp_path / "hf" / "model.safetensors").rename(
        tmp_path / "hf" / "pytorch_model.bin"
    )
    with pytest.raises(FlashError, match="pickle"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)


def test_existing_output_refused(tmp_path, store):
    before = {p.name: p.stat().st_mtime_ns for p in store.iterdir()}
    with pytest.raises(FlashError, match="already exists"):
        convert(tmp_path / "hf", store, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in store.iterdir()} == before
    convert(tmp_path / "hf", store, overwrite=True, progress=False)
    BundleStore(store).verify()


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch, failure):
    make_checkpoint(tmp_path / "hf", "llama")
    real, calls = components.encode_rows, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 4:  # in the second layer
            raise failure
        return real(*args)

    monkeypatch.setattr(components, "encode_rows", failing)
    with pytest.raises(type(failure)):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert listing(tmp_path) == ["hf"]
    monkeypatch.setattr(components, "encode_rows", real)
    convert(tmp_path / "hf", tmp_path / "out", progress=False)  # a rerun succeeds


def test_truncated_bundles(store):
    path = store / BUNDLES_NAME
    os.truncate(path, path.stat().st_size - 4096)
    with pytest.raises(FlashError, match="truncated") as e:
        load(str(store))
    assert str(path) in str(e.value) and "convert the model again" in str(e.value)


def test_corrupted_bundles_fail_verification(store):
    path = store / BUNDLES_NAME
    data = bytearray(path.read_bytes())
    data[4096 + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(FlashError, match="layer 0, neurons 0-.* match their checksum"):
        BundleStore(store).verify()


def test_corrupted_header(store):
    path = store / BUNDLES_NAME
    data = bytearray(path.read_bytes())
    data[0:8] = b"NOTFLASH"
    path.write_bytes(bytes(data))
    with pytest.raises(FlashError, match="bad magic"):
        BundleStore(store)


def edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_wrong_format_version(store):
    edit_json(store / MANIFEST_NAME, format_version=99)
    with pytest.raises(FlashError, match="version 99"):
        load(str(store))


def test_manifest_and_config_disagree(store):
    edit_json(store / "config.json", num_hidden_layers=3)
    with pytest.raises(FlashError, match="num_hidden_layers"):
        load(str(store))


def test_manifest_offsets_past_the_file(store):
    d = json.loads((store / MANIFEST_NAME).read_text())
    d["layers"][1]["sections"][0]["offset"] = 1 << 40
    (store / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(FlashError, match="past the end"):
        load(str(store))


def test_malformed_manifest(store):
    (store / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(FlashError, match="not valid JSON"):
        load(str(store))
    (store / MANIFEST_NAME).write_text(
        json.dumps({"magic": "mlx-flash-store", "format_version": 1})
    )
    with pytest.raises(FlashError, match="malformed"):
        load(str(store))


def test_missing_store_file(store):
    (store / BUNDLES_NAME).unlink()
    with pytest.raises(FlashError, match="no ffn.bundles"):
        load(str(store))


def test_inapplicable_options(store):
    with pytest.raises(FlashError, match="quantize-activations"):
        load(str(store), model_config={"quantize_activations": True})


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda d: d["layers"][0]["sections"][0]["components"].remove("down_proj"),
            "expected",
        ),
        (lambda d: d.update(activation="swish9"), "unknown activation"),
        (lambda d: d.update(layers=[]), "no layers"),
        (lambda d: d["layers"][0]["sections"][0].update(offset="4096"), "integers"),
        (
            lambda d: d["layers"][0]["components"]["up_proj"]["encoding"].update(
                bits=4.0
            ),
            "unsupported encoding",
        ),
        (
            lambda d: d["layers"][1]["components"]["up_proj"].update(length=65),
            "length 65",
        ),
        (
            lambda d: d["layers"][1]["components"]["up_proj"]["encoding"].update(
                mode="affine", bits=7, group_size=64
            ),
            "unsupported encoding",
        ),
        (
            lambda d: d["extensions"].append(
                {
                    "name": "experts",
                    "offset": 1 << 20,
                    "bytes": 8,
                    "required": True,
                    "meta": {},
                }
            ),
            "needs the 'experts' extension",
        ),
    ],
)
def test_inconsistent_manifest(store, edit, message):
    d = json.loads((store / MANIFEST_NAME).read_text())
    edit(d)
    (store / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(FlashError, match=message):
        load(str(store))


def test_failed_store_write_removes_the_dense_output_too(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "hf", "llama")

    def failing(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(components, "encode_rows", failing)
    with pytest.raises(RuntimeError):
        convert(
            tmp_path / "hf",
            tmp_path / "out",
            dense_out=tmp_path / "dense",
            progress=False,
        )
    assert listing(tmp_path) == ["hf"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 256 KiB filesystem (tmpfs), mounted where root may; else skipped."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
        capture_output=True,
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {made.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_conversion_onto_a_really_full_disk(tmp_path, small_filesystem):
    """A store (~330 KB) onto a 256 KiB filesystem: one FlashError that names the
    filesystem to free (mount point, device, what is free), and nothing left on it."""
    make_checkpoint(tmp_path / "hf", "qwen2")
    before = sorted(small_filesystem.iterdir())
    with pytest.raises(FlashError, match="nothing was left behind") as e:
        convert(tmp_path / "hf", small_filesystem / "store", progress=False)
    message = str(e.value)
    assert f"free space on the filesystem mounted at {small_filesystem}" in message
    assert "(tmpfs; " in message and "MiB free)" in message
    assert sorted(small_filesystem.iterdir()) == before  # no store, no temporary
    assert shutil.disk_usage(small_filesystem).used < 16 << 10

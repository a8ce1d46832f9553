"""Fuzzing the parsers of untrusted files (issue #7): the store manifest, the bundles
header, safetensors headers and GGUF headers. Whatever the input, the only exception
is FlashError, nothing hangs, and nothing is sized beyond what the file justifies.

The number of cases is bounded for CI (`max_examples`); raise it locally with
``HYPOTHESIS_FUZZ=2000 pytest tests/test_fuzz.py``.
"""

import copy
import json
import os
import re
import shutil
import struct
from datetime import timedelta
from pathlib import Path
from unittest import mock

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from mlx_flash import FlashError, convert
from mlx_flash.store import store as store_module
from mlx_flash.store.format import (
    BUNDLES_NAME,
    MANIFEST_NAME,
    Manifest,
    check_header,
)
from mlx_flash.store.gguf_file import read_header
from mlx_flash.store.reader import BundleReader
from mlx_flash.store.safety import check_safetensors
from mlx_flash.store.store import BundleStore

N = int(os.environ.get("HYPOTHESIS_FUZZ", "0"))
FUZZ = settings(
    max_examples=N or 150,
    deadline=timedelta(seconds=10),  # "no hang": an example takes milliseconds
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

# --- JSON values and mutations --------------------------------------------------------

INTERESTING = [0, -1, 1, 60, 4095, 4096, 4097, 36864, 2**31, 2**32, 2**63, 2**64]
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.sampled_from(INTERESTING),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["../x", "/etc/passwd", "float16", "q4", "gate_proj", "silu"]),
)
values = st.recursive(
    leaves,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c),
    max_leaves=6,
)


def paths(obj, at=()):
    """Every path (tuple of keys / indexes) into a JSON value."""
    yield at
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, at + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, at + (i,))


def mutate(obj, path, op, value, delta):
    """Apply one mutation at `path`; a path that no longer exists is skipped."""
    if not path:
        return value if op == "replace" else obj
    parent = obj
    try:
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        old = parent[key]
    except (KeyError, IndexError, TypeError):
        return obj
    if not isinstance(parent, (dict, list)):
        return obj  # a character of a string
    if op == "delete":
        del parent[key]
    elif op == "replace":
        parent[key] = value
    elif op == "nudge" and type(old) is int:
        parent[key] = old + delta
    elif op == "scale" and type(old) is int:
        parent[key] = old * (1 << (delta % 64)) or -1
    elif op == "dup" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(old))
    elif op == "retype":
        parent[key] = str(old) if not isinstance(old, str) else [old]
    return obj


def mutations(base):
    return st.lists(
        st.tuples(
            st.sampled_from(list(paths(base))),
            st.sampled_from(["delete", "replace", "nudge", "scale", "dup", "retype"]),
            values,
            st.integers(-5000, 5000),
        ),
        min_size=1,
        max_size=3,
    )


def mutated(base, changes):
    obj = copy.deepcopy(base)
    for change in changes:
        obj = mutate(obj, *change)
    return obj


# --- the store manifest ---------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    make_checkpoint(tmp / "hf", "llama", mlp_bias=True)  # 5 components
    store = convert(
        tmp / "hf", tmp / "store", ffn_format="q4", layout="gate", progress=False
    )
    return store, json.loads((store / MANIFEST_NAME).read_text())


def sized_reader(path, capacity, threads):
    """The real reader, after checking that its staging buffer fits the file."""
    assert capacity <= os.path.getsize(path), (capacity, os.path.getsize(path))
    return BundleReader(path, capacity, threads)


def outcome(e: FlashError) -> str:
    """The kind of a refusal, for `--hypothesis-show-statistics`."""
    return re.sub(r"[0-9'\[(].*", "", e.message)[:48]


def open_and_read(store, record=event):
    """Open the store; if it opens, read everything. Only FlashError may escape."""
    with mock.patch.dict(store_module.READERS, direct=sized_reader):
        try:
            s = BundleStore(store)
        except FlashError as e:
            record(outcome(e))
            return False
    record("opened")
    try:
        for i in range(s.num_layers):
            s.read_layer(i, mx.float32)
            ids = np.arange(0, s.manifest.layers[i].neurons, 3)
            s.read_neurons(i, ids, range(len(s.manifest.layers[i].sections)), 2)
        s.verify()
    except FlashError:
        pass
    finally:
        s.close()
    return True


@pytest.fixture(scope="module")
def workdir(base, tmp_path_factory):
    store, _ = base
    return Path(shutil.copytree(store, tmp_path_factory.mktemp("f") / "store"))


def test_the_unmutated_store_opens(base, workdir):
    assert open_and_read(workdir, record=print)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_json(base, workdir, data):
    """Keys deleted, values retyped, sizes huge or negative, offsets past the file,
    sections duplicated (overlapping), strings with `../`."""
    _, manifest = base
    obj = mutated(manifest, data.draw(mutations(manifest)))
    (workdir / MANIFEST_NAME).write_text(json.dumps(obj))
    open_and_read(workdir)


@FUZZ
@given(data=st.data())
def test_fuzz_manifest_bytes(base, data):
    """Raw text damage: bytes flipped, cut, inserted."""
    _, manifest = base
    text = bytearray(json.dumps(manifest).encode())
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and at < len(text):
            text[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del text[at : at + data.draw(st.integers(1, 64))]
        else:
            text[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    try:
        m = Manifest.from_json(text.decode("utf-8", "replace"), Path("m.json"))
        m.validate(Path("m.json"))
        event("accepted")
    except FlashError as e:
        event(outcome(e))


# --- the bundles header ---------------------------------------------------------------


@FUZZ
@given(head=st.binary(max_size=128))
def test_fuzz_header_random_bytes(base, head):
    store, manifest = base
    m = Manifest.from_json(json.dumps(manifest), store)
    valid = (store / BUNDLES_NAME).read_bytes()[:60]
    try:
        check_header(head, m, store)
    except FlashError:
        return
    assert head[:60] == valid


@FUZZ
@given(at=st.integers(0, 4095), byte=st.integers(1, 255))
def test_fuzz_header_every_field_byte_is_checked(base, workdir, at, byte):
    """Any change to the 60 field bytes is refused at load; the zero tail is checked
    by verify."""
    store, _ = base
    shutil.copy(store / MANIFEST_NAME, workdir / MANIFEST_NAME)
    data = bytearray((store / BUNDLES_NAME).read_bytes())
    data[at] ^= byte
    (workdir / BUNDLES_NAME).write_bytes(bytes(data))
    if at < 60:
        with pytest.raises(FlashError):
            BundleStore(workdir)
    else:
        s = BundleStore(workdir)
        with pytest.raises(
            FlashError, match=r"\(the header\) do not match their checksum"
        ):
            s.verify()
        s.close()
    shutil.copy(store / BUNDLES_NAME, workdir / BUNDLES_NAME)


# --- safetensors headers --------------------------------------------------------------

ST_BASE = {
    "__metadata__": {"format": "mlx"},
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    "c": {"dtype": "U8", "shape": [0, 5], "data_offsets": [32, 32]},
}
ST_DTYPES = {"F32": mx.float32, "BF16": mx.bfloat16, "U8": mx.uint8}


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path, data):
    header = mutated(ST_BASE, data.draw(mutations(ST_BASE)))
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(range(32)))
    try:
        check_safetensors(path)
    except FlashError as e:
        event(outcome(e))
        return
    event("accepted")
    loaded = mx.load(str(path))  # what passed must load exactly as it says
    for name, t in header.items():
        if name != "__metadata__":
            assert list(loaded[name].shape) == t["shape"]


# --- GGUF headers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_string("tokenizer.ggml.model", "gpt2")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])
    w.add_array("tokenizer.ggml.scores", [0.0, 1.0, 2.0])
    w.add_tensor("token_embd.weight", np.ones((3, 32), np.float32))
    w.add_tensor("blk.0.ffn_up.weight", np.ones((4, 32), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_header(gguf_bytes, data):
    buf = bytearray(gguf_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(4, len(buf) - 1))  # keep the magic
        op = data.draw(st.sampled_from(["byte", "u64", "u32", "cut"]))
        if op == "byte":
            buf[at] = data.draw(st.integers(0, 255))
        elif op == "cut":
            del buf[at:]
            buf += b"\0"
        else:
            size = 8 if op == "u64" else 4
            value = data.draw(st.sampled_from([0, 1, 5, 2**31, 2**32 - 1, 2**63]))
            buf[at : at + size] = value.to_bytes(8, "little")[:size]
    try:
        _, tensors = read_header(bytes(buf), Path("m.gguf"))
    except FlashError as e:
        event(outcome(e))
        return
    event("accepted")
    for t in tensors:  # what passed lies inside the file
        assert 0 <= t.offset and t.offset + t.nbytes <= len(buf)


def test_gguf_alignment_zero_and_too_many_dims(gguf_bytes):
    key = b"general.alignment"
    assert key not in gguf_bytes  # the writer left the default: add one by hand
    buf = bytearray(gguf_bytes)
    n_kv_at = 4 + 4 + 8
    n_kv = int.from_bytes(buf[n_kv_at : n_kv_at + 8], "little")
    buf[n_kv_at : n_kv_at + 8] = (n_kv + 1).to_bytes(8, "little")
    entry = struct.pack("<Q", len(key)) + key + struct.pack("<II", 4, 0)  # u32 0
    buf[24:24] = entry
    with pytest.raises(FlashError, match="alignment"):
        read_header(bytes(buf), Path("m.gguf"))
    buf = bytearray(gguf_bytes)
    name = b"token_embd.weight"
    dims_at = gguf_bytes.index(name) + len(name)
    buf[dims_at : dims_at + 4] = struct.pack("<I", 2**31)
    with pytest.raises(FlashError, match="dimensions"):
        read_header(bytes(buf), Path("m.gguf"))

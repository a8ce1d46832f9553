"""Issue #7: hostile stores are refused early, failing disks fail loudly, interrupted
conversions leave nothing, and two processes share a store.

Complements tests/test_bad_input.py (which already covers pickles, truncation at load,
checksum mismatches, a bad header magic, offsets past the file, a config that
disagrees, and conversion interrupted by an exception or KeyboardInterrupt).
"""

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from conftest import make_checkpoint
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash import FlashError, convert, load
from mlx_flash.errors import ReadError
from mlx_flash.inspect import main as inspect_main
from mlx_flash.predictor import (
    LayerMetrics,
    Predictor,
    PredictorSet,
    load_predictors,
    save,
)
from mlx_flash.store import components
from mlx_flash.store import writer as convert_module
from mlx_flash.store import store as store_module
from mlx_flash.store.format import ALIGN, BUNDLES_NAME, DENSE_NAME, MANIFEST_NAME
from mlx_flash.store.reader import MmapReader
from mlx_flash.store.store import BundleStore

PROMPT = [1, 5, 6, 7, 8, 9, 10, 3]
SPARSE = {"selector": "oracle", "fraction": 0.5, "window": 2}
GATE = {"selector": "gate", "fraction": 0.5, "window": 2}  # reads neurons, not layers
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    make_checkpoint(tmp / "hf", "llama")
    # bundled: the byte positions below are its layout's (test_planar.py: planar's)
    return convert(
        tmp / "hf", tmp / "store", ffn_format="q4", layout="bundled", progress=False
    )


@pytest.fixture
def store(pristine, tmp_path):
    return Path(shutil.copytree(pristine, tmp_path / "store"))


@pytest.fixture
def gate_store(pristine, tmp_path):
    hf = pristine.parent / "hf"
    kind = {"ffn_format": "q4", "layout": "gate"}
    return convert(hf, tmp_path / "gate", progress=False, **kind)


def greedy(model, n=12):
    steps = generate_step(
        mx.array(PROMPT), model, max_tokens=n, sampler=lambda x: mx.argmax(x, -1)
    )
    return [int(t) for t, _ in steps]


def edit(path, change):
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def listing(path):
    return sorted(p.name for p in Path(path).iterdir())


def snapshot(path):
    return {
        p.name: (p.stat().st_size, p.stat().st_mtime_ns, sha256(p))
        for p in sorted(Path(path).iterdir())
    }


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --- untrusted input: code ------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickles_are_never_unpickled(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    marker = tmp_path / "pwned"
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))
    convert(tmp_path / "hf", tmp_path / "store", progress=False)  # safetensors used
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(FlashError, match="never loads pickles"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, key, value",
    [
        ("tokenizer_config.json", "auto_map", {"AutoTokenizer": ["evil.Tok", None]}),
        ("config.json", "auto_map", {"AutoModel": "evil.Model"}),
        ("config.json", "model_file", "evil.py"),
    ],
)
def test_stores_never_run_model_code(store, tmp_path, name, key, value):
    marker = tmp_path / "pwned"
    (store / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    edit(store / name, lambda d: d.update({key: value}))
    with pytest.raises(FlashError, match="never run"):
        load(str(store), progress=False)
    assert not marker.exists()


def test_converter_drops_code_and_outside_paths(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    edit(tmp_path / "hf" / "config.json", lambda d: d.update(auto_map={"A": "x.Y"}))
    edit(
        tmp_path / "hf" / "tokenizer_config.json",
        lambda d: d.update(
            auto_map={"AutoTokenizer": ["x.T", None]},
            tokenizer_file="/root/.cache/somewhere/tokenizer.json",
            vocab_file="vocab.json",  # inside: kept
        ),
    )
    out = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "auto_map" not in tok_config and "tokenizer_file" not in tok_config
    assert tok_config["vocab_file"] == "vocab.json"
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    load(str(out), progress=False)


# --- untrusted input: hostile stores --------------------------------------------------


@pytest.mark.parametrize(
    "name, change",
    [
        ("tokenizer_config.json", {"vocab_file": "../../etc/passwd"}),
        ("tokenizer_config.json", {"merges_file": "/etc/passwd"}),
        ("config.json", {"vision_config": {"weights_path": "../x.safetensors"}}),
        ("config.json", {"adapter_files": ["ok.json", "../../secret"]}),
    ],
)
def test_file_names_escaping_the_store_are_refused(store, name, change):
    edit(store / name, lambda d: d.update(change))
    with pytest.raises(FlashError, match="a file outside"):
        BundleStore(store)


def test_names_inside_the_store_are_fine(store):
    edit(
        store / "tokenizer_config.json",
        lambda d: d.update(vocab_file="vocab.json", name_or_path="/home/someone/m"),
    )
    edit(store / "config.json", lambda d: d.update(_name_or_path="/abs/path/is/fine"))
    BundleStore(store).close()


def layer(i, **section):
    return lambda d: d["layers"][i]["sections"][0].update(section)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["layers"][0].update(neurons=2**70), "neurons"),
        (lambda d: d["layers"][0].update(neurons=-128), "no neurons"),
        (lambda d: d["layers"][0].update(neurons=float("inf")), "no neurons"),
        (lambda d: d["layers"][0].update(neurons="128"), "no neurons"),
        (layer(0, offset=-4096), "misplaced"),
        (layer(1, offset=4096), "misplaced"),  # overlaps layer 0
        (layer(0, offset=4097), "misplaced"),
        (layer(0, bundle_bytes=2**62), "bundle size"),
        (layer(0, bundle_bytes=-108), "bundle size"),
        (layer(0, components=[]), "expected"),
        (layer(0, sha256="ab"), "a section must have exactly"),
        (
            lambda d: d["layers"][0]["components"]["up_proj"].update(origin={}),
            "the origin must have exactly",
        ),
        (
            lambda d: d["layers"][0]["components"]["up_proj"]["origin"].update(
                exact="yes"
            ),
            "exact must be true or false",
        ),
        (lambda d: d["extensions"][0].update(offset=4097), "misplaced"),
        (lambda d: d["extensions"][0]["meta"].update(algorithm="md5"), "xxh3_64"),
        (lambda d: d["extensions"][0]["meta"]["ranges"].pop(), "blocks need"),
        (  # found by the fuzzer: an unhashable file name
            lambda d: d["extensions"][0]["meta"]["ranges"][1].update(file=[]),
            "no data file",
        ),
        (lambda d: d.update(dense=[]), "dense must be a dict"),
        (
            lambda d: d["layers"][0]["components"]["up_proj"].update(length=-64),
            "length",
        ),
        (
            lambda d: d["layers"][0]["components"]["up_proj"].update(length=2**40),
            "length",
        ),
        (
            lambda d: d["layers"][0]["components"].update(
                extra=d["layers"][0]["components"]["up_proj"]
            ),
            "extra",
        ),
        (lambda d: d.update(rows=["gate_proj", "gate_proj"]), "distinct"),
        (lambda d: d.update(rows=["nope", "up_proj"]), "no component"),
        (lambda d: d.update(file_bytes=-1), "file_bytes"),
        (lambda d: d.update(file_bytes=36865), "multiple of 4096"),
        (lambda d: d.update(hidden_size=True), "hidden_size"),
        (lambda d: d.update(surprise=1), "unknown keys"),
        (lambda d: d.pop("layers"), "missing keys"),
        (lambda d: d.update(layers={"0": 1}), "layers must be a list"),
        (
            lambda d: d["layers"][0]["components"]["up_proj"].update(encoding=[]),
            "encoding",
        ),
        (
            lambda d: d["layers"][0]["components"]["up_proj"]["encoding"].update(
                dtype=["f"]
            ),
            "malformed",
        ),
        (
            lambda d: d["layers"][0]["components"]["up_proj"]["encoding"].update(
                group_size=0
            ),
            "unsupported encoding",
        ),
    ],
)
def test_hostile_manifest_refused_before_any_read(store, monkeypatch, change, message):
    opened = []
    monkeypatch.setattr(store_module, "READERS", {"direct": opened.append})
    edit(store / MANIFEST_NAME, change)
    with pytest.raises(FlashError, match=message):
        BundleStore(store)
    assert not opened  # no staging buffer was sized from the manifest


def test_huge_layer_claim_is_refused_before_the_staging_buffer(store, monkeypatch):
    """A manifest claiming a terabyte layer and a file to match: the real file's size
    refuses it before the reader (and its buffer sized from the manifest) exists."""
    opened = []
    monkeypatch.setattr(store_module, "READERS", {"direct": opened.append})

    def claim(d):
        d["layers"][1]["neurons"] = d["layers"][0]["neurons"] = 2**33
        d["intermediate_size"] = 2**33
        d["layers"][1]["sections"][0]["offset"] = 2**40
        d["extensions"][0]["offset"] = 2**41 - 4096
        d["file_bytes"] = 2**41

    edit(store / MANIFEST_NAME, claim)
    edit(store / "config.json", lambda d: d.update(intermediate_size=2**33))
    with pytest.raises(FlashError, match=r"bundles file has \d+ bytes, the manifest"):
        BundleStore(store)
    assert not opened


@pytest.mark.parametrize("change", ["dtype", "bits"])
def test_encoding_mismatch_is_caught_at_load(store, change):
    """The manifest changed to describe other bytes, consistently with itself: the
    header's sizes or its layout digest refuse it at every load."""

    def other(d):
        for entry in d["layers"]:
            for c in entry["components"].values():
                if change == "dtype":  # float16 -> bfloat16 scales: same sizes
                    c["encoding"]["dtype"] = "bfloat16"
                else:  # q4 -> q8: bundles of 3 x (64 + 2 + 2) bytes
                    c["encoding"]["bits"] = 8
        if change == "bits":
            for entry in d["layers"]:
                entry["sections"][0]["bundle_bytes"] = 3 * 68
            d["layers"][1]["sections"][0]["offset"] = 4096 * 8
            d["extensions"][0]["offset"] = 4096 * 15
            d["file_bytes"] = 4096 * 16

    edit(store / MANIFEST_NAME, other)
    if change == "bits":
        os.truncate(store / BUNDLES_NAME, 4096 * 16)
    message = "another manifest" if change == "dtype" else "disagree on sizes"
    with pytest.raises(FlashError, match=message):
        load(str(store), progress=False)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"intermediate_size": 256}, "intermediate_size"),
        ({"hidden_size": 64.0}, "hidden_size"),
        ({"model_type": "qwen2"}, "model_type"),
    ],
)
def test_config_disagreeing_with_the_manifest(store, change, message):
    edit(store / "config.json", lambda d: d.update(change))
    with pytest.raises(FlashError, match=message):
        BundleStore(store)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100000, "not valid JSON"),  # nested too deep
        ("1" * 5000, "not valid JSON"),  # too many digits
        ('{"magic": "mlx-flash-store", "format_version": 1.0}', "version"),
        ("[]", "bad magic"),
    ],
)
def test_manifest_text_that_breaks_parsers(store, text, message):
    (store / MANIFEST_NAME).write_text(text)
    with pytest.raises(FlashError, match=message):
        BundleStore(store)
    (store / MANIFEST_NAME).write_bytes(b"\xff\xfe{}")
    with pytest.raises(FlashError, match="UTF-8"):
        BundleStore(store)


@pytest.mark.parametrize("what", ["config", "tokenizer_config"])
def test_other_jsons_that_break_parsers(store, what):
    (store / f"{what}.json").write_text("[" * 100000 if what == "config" else "[1, 2]")
    if what == "config":
        with pytest.raises(FlashError, match="not valid JSON"):
            BundleStore(store)
    else:
        BundleStore(store).close()  # not an object: nothing in it to run or escape


def write_safetensors(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize(
    "header, message",
    [
        (
            {"w": {"dtype": "F32", "shape": [2**62 + 4], "data_offsets": [0, 16]}},
            "shape",
        ),
        ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, "shape"),
        (
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}},
            "outside",
        ),
        ({"w": {"dtype": "F32", "shape": [8], "data_offsets": [0, 16]}}, "needs 32"),
        ({"w": {"dtype": "X9", "shape": [4], "data_offsets": [0, 16]}}, "dtype"),
        (
            {
                "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
                "b": {"dtype": "U8", "shape": [8], "data_offsets": [8, 16]},
            },
            "share bytes",
        ),
    ],
)
def test_hostile_dense_part_refused_before_mlx_reads_it(store, header, message):
    write_safetensors(store / DENSE_NAME, header, bytes(16))
    with pytest.raises(FlashError, match=message):
        load(str(store), progress=False)


def test_safetensors_header_length_past_the_file(store, tmp_path):
    (store / DENSE_NAME).write_bytes((1 << 62).to_bytes(8, "little") + b"{}")
    with pytest.raises(FlashError, match="header of"):
        BundleStore(store)
    make_checkpoint(tmp_path / "hf", "llama")  # sources are checked the same way
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(FlashError, match="8-byte header"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)


# --- predictors -----------------------------------------------------------------------


def write_predictors(store, rank=4):
    ps = PredictorSet(
        [Predictor(64, rank, 128) for _ in range(2)],
        [LayerMetrics(rank=rank, epochs=0, loss=0.0, thresholds={"0.9": 0.0})] * 2,
        "relu",
        {"kind": "top", "fraction": 0.5},
        {"name": "x"},
    )
    save(store, ps)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["layers"][0].update(rank=10**12), "down.weight is"),
        (lambda m: m["layers"][0].update(rank=-1), "rank"),
        (lambda m: m["layers"][0].update(surprise=1), "surprise"),
        (lambda m: m.pop("weights_sha256"), "weights_sha256"),
        (lambda m: m.update(layers="x"), "layers"),
        (lambda m: m.update(activation="gelu"), "activation"),
    ],
)
def test_hostile_predictors_refused(store, change, message):
    write_predictors(store)
    load_predictors(store, 64, [128, 128])
    edit(store / "predictors.json", change)
    with pytest.raises(FlashError, match=message):
        load_predictors(store, 64, [128, 128])


# --- checksums ------------------------------------------------------------------------


def flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


def test_cheap_check_at_every_load_catches_a_header_digest_flip(store):
    flip(store / BUNDLES_NAME, 40)  # inside the layout digest
    with pytest.raises(FlashError, match="another manifest"):
        BundleStore(store)


def test_full_check_on_demand(store):
    flip(store / BUNDLES_NAME, 20480 + 5 * 108)  # layer 1, neuron 5
    BundleStore(store).close()  # the cheap check cannot see it
    with pytest.raises(
        FlashError, match="layer 1, neurons [0-5]-.*match their checksum"
    ):
        BundleStore(store, verify=True)


@pytest.mark.parametrize(
    "at, what",
    [(100, "the header"), (17920 + 10, "layer 0, neurons 113-127"), (-1, "zero")],
)
def test_verify_checks_padding_too(store, at, what):
    """Header, the gap after a layer and the file's tail are checked too."""
    flip(store / BUNDLES_NAME, at % (store / BUNDLES_NAME).stat().st_size)
    BundleStore(store).close()
    with pytest.raises(FlashError, match=what):
        BundleStore(store).verify()


def test_verify_checks_the_dense_part_and_the_table(store):
    flip(store / "model.safetensors", 5000)
    with pytest.raises(FlashError, match="the dense part"):
        BundleStore(store).verify()
    flip(store / "model.safetensors", 5000)
    sums = BundleStore(store).manifest.extensions[0]
    flip(store / BUNDLES_NAME, sums.offset + 3)
    with pytest.raises(FlashError, match="checksum table itself"):
        BundleStore(store).verify()


def test_inspect_verifies_everything(store, capsys):
    write_predictors(store)
    inspect_main([str(store), "--verify"])
    out = capsys.readouterr().out
    assert "matches its checksum" in out and "predictors match" in out
    flip(store / "predictors.safetensors", 200)
    with pytest.raises(SystemExit) as e:
        inspect_main([str(store)])
    assert e.value.code == 2 and "do not match" in capsys.readouterr().err
    (store / "predictors.json").unlink()
    flip(store / BUNDLES_NAME, 4096 + 3)
    inspect_main([str(store), "--no-verify"])  # the cheap checks pass
    with pytest.raises(SystemExit):
        inspect_main([str(store), "--verify"])
    assert "match their checksum" in capsys.readouterr().err


# --- faults while reading -------------------------------------------------------------


def inject(monkeypatch, path, start, stop, mode):
    """Make `os.preadv` of `path` fail for reads touching bytes [start, stop): ``eio``
    raises EIO; ``short`` returns the bytes before `start`, then end of file; ``once``
    returns short reads once per call site, then behaves (a transient short read)."""
    real, inode, seen = os.preadv, os.stat(path).st_ino, set()

    def preadv(fd, buffers, offset):
        n = sum(len(b) for b in buffers)
        if os.fstat(fd).st_ino != inode or not (offset < stop and offset + n > start):
            return real(fd, buffers, offset)
        if mode == "eio":
            raise OSError(errno.EIO, "Input/output error")
        if mode == "short":
            if offset >= start:
                return 0
            return real(fd, [buffers[0][: start - offset]], offset)
        if offset not in seen and n > ALIGN:  # "once"
            seen.add(offset)
            return real(fd, [buffers[0][:ALIGN]], offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)


def section(store, i):
    """Layer `i`'s last section: [start, stop) and bundle bytes."""
    m = BundleStore(store)
    s, n = m.manifest.layers[i].sections[-1], m.manifest.layers[i].neurons
    m.close()
    return s.offset, s.offset + n * s.bundle_bytes, s.bundle_bytes


def decode_one(model):
    """Prefill the prompt (dense), then decode one token (the sparse path)."""
    cache = make_prompt_cache(model)
    logits = model(mx.array([PROMPT]), cache=cache)
    nxt = mx.argmax(logits[:, -1], -1)
    return model(nxt[None], cache=cache)


@pytest.mark.parametrize("mode", ["eio", "short"])
@pytest.mark.parametrize("options", [{}, SPARSE, GATE], ids=["all", "oracle", "gate"])
def test_failed_read_names_layer_and_neurons(
    store, gate_store, monkeypatch, mode, options
):
    """Whole layers (`all`, and `oracle`, which scores every neuron) and selected
    neurons (`gate`) alike: a failing read names the layer and the neurons."""
    store = gate_store if options is GATE else store
    start, stop, bundle = section(store, 1)
    model, _ = load(str(store), progress=False, **options)
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)  # prefill: every layer read once
    fault = start + 40 * bundle - (start + 40 * bundle) % ALIGN  # page of neuron 40
    inject(monkeypatch, store / BUNDLES_NAME, fault, stop, mode)
    with pytest.raises(ReadError) as e:
        model(mx.array([[5]]), cache=cache)
    err = e.value
    assert err.layer == 1 and str(err).startswith(str(store / BUNDLES_NAME))
    first, last = err.neurons
    assert f"layer 1, neurons {first}-{last}" in str(err)
    assert first <= (fault - start) // bundle + 1 and last >= (fault - start) // bundle
    assert ("EIO" in str(err)) if mode == "eio" else ("truncated" in str(err))


def test_transient_short_reads_give_exact_results(store, monkeypatch):
    model, _ = load(str(store), progress=False, **SPARSE)
    want = greedy(model)
    start, stop, _ = section(store, 0)
    inject(monkeypatch, store / BUNDLES_NAME, start, stop + 20480, "once")
    model, _ = load(str(store), progress=False, **SPARSE)
    assert greedy(model) == want


@pytest.mark.parametrize("reader", ["direct", "mmap"])
def test_file_truncated_under_a_loaded_store(store, reader):
    model, _ = load(str(store), progress=False, reader=reader, **SPARSE)
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)
    start, _, _ = section(store, 1)
    os.truncate(store / BUNDLES_NAME, start)  # layer 1 is gone
    # mmap: without the size check before every copy this would be SIGBUS (death)
    with pytest.raises(ReadError, match="layer 1, neurons .*truncated after"):
        model(mx.array([[5]]), cache=cache)


def test_mmap_reader_checks_the_size_before_every_batch(tmp_path):
    path = tmp_path / BUNDLES_NAME
    path.write_bytes(bytes(range(256)) * 64)  # 16 KiB
    reader = MmapReader(path, 1 << 16)
    assert bytes(reader.read(8192, 16)) == bytes(range(16))
    os.truncate(path, 4096)
    assert bytes(reader.read(0, 16)) == bytes(range(16))  # still inside: fine
    with pytest.raises(ReadError, match="ends at byte 4096") as e:
        reader.read_ranges([(0, 16), (8192, 16)])
    assert e.value.offset == 4096
    reader.close()


def test_a_failed_read_waits_for_every_worker(store, monkeypatch):
    """The error is raised only once every worker has finished, so that no late
    write lands in the staging buffer of the next read."""
    bundles = BundleStore(store, threads=2)
    ranges = [(4096, 100), (20480, 100)]  # two pieces, one per thread
    want = [bytes(v) for v in bundles.reader.read_ranges(ranges)]
    real, finished = os.preadv, []

    def preadv(fd, buffers, offset):
        if offset == 4096:
            raise OSError(errno.EIO, "Input/output error")
        time.sleep(0.3)  # the other worker is slow
        n = real(fd, buffers, offset)
        finished.append(offset)
        return n

    with monkeypatch.context() as m:
        m.setattr(os, "preadv", preadv)
        with pytest.raises(ReadError, match="layer|EIO"):
            bundles.reader.read_ranges(ranges)
        assert finished == [20480]  # already done when the error arrived
    assert [bytes(v) for v in bundles.reader.read_ranges(ranges)] == want
    bundles.close()


def test_after_a_failed_read_the_next_generation_is_exact(gate_store, monkeypatch):
    store = gate_store
    clean, _ = load(str(store), progress=False, **GATE)
    want = decode_one(clean)
    model, _ = load(str(store), progress=False, **GATE)
    start, stop, _ = section(store, 1)
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)
    with monkeypatch.context() as m:
        inject(m, store / BUNDLES_NAME, start, stop, "eio")
        with pytest.raises(ReadError):  # a decoding step fails in layer 1
            model(mx.array([[int(mx.argmax(want[0, -1]))]]), cache=cache)
    # a new request (fresh KV cache) on the same model, as a server would serve it
    assert np.allclose(np.array(decode_one(model)), np.array(want), atol=1e-5)


# --- interrupted conversion -----------------------------------------------------------


def test_sigint_during_conversion_leaves_nothing(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "hf", "llama")
    real, calls = components.encode_rows, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:
            signal.raise_signal(signal.SIGINT)  # a real signal: Ctrl-C
        return real(*args)

    monkeypatch.setattr(components, "encode_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert listing(tmp_path) == ["hf"]
    monkeypatch.setattr(components, "encode_rows", real)
    convert(tmp_path / "hf", tmp_path / "out", progress=False)


def run_python(code, *args, env=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def test_killed_conversion_is_cleaned_up_by_the_next(tmp_path):
    """SIGKILL cannot be caught: the next conversion removes what it left."""
    make_checkpoint(tmp_path / "hf", "llama")
    p = run_python(
        """
        import sys, time
        from mlx_flash.store import components as c
        from mlx_flash.store.writer import convert
        real, calls = c.encode_rows, []
        def slow(*args):
            calls.append(1)
            if len(calls) == 4:
                print("ready", flush=True)
                time.sleep(120)
            return real(*args)
        c.encode_rows = slow
        convert(sys.argv[1], sys.argv[2], progress=False)
        """,
        tmp_path / "hf",
        tmp_path / "out",
    )
    assert p.stdout.readline().strip() == "ready"
    p.kill()
    p.wait()
    assert listing(tmp_path) == [".out.partial-%d" % p.pid, "hf"]
    convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert listing(tmp_path) == ["hf", "out"]
    BundleStore(tmp_path / "out").verify()


@pytest.mark.parametrize("fmt", ["float32", "q4"])  # bundles, or the dense part, fail
def test_disk_full_during_conversion(tmp_path, fmt):
    """A real write failure: the file size limit (RLIMIT_FSIZE) makes writes past
    64 KiB fail with EFBIG, as a full disk fails them with ENOSPC."""
    make_checkpoint(tmp_path / "hf", "llama")
    p = run_python(
        """
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
        from mlx_flash import FlashError, convert
        try:
            convert(sys.argv[1], sys.argv[2], ffn_format=sys.argv[3], progress=False)
        except FlashError as e:
            print(e)
            sys.exit(3)
        """,
        tmp_path / "hf",
        tmp_path / "out",
        fmt,
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3, err
    assert (
        "writing the store failed" in out
        and "free space on the filesystem mounted at" in out
    )
    assert listing(tmp_path) == ["hf"]
    convert(tmp_path / "hf", tmp_path / "out", ffn_format=fmt, progress=False)


def test_dense_write_failure_inside_mlx_is_a_flash_error(tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "hf", "llama")

    def full(*args, **kwargs):
        raise RuntimeError(
            "[eval] a lazy tensor failed while the dense part was written"
        )

    monkeypatch.setattr(convert_module, "write_aligned", full)
    with pytest.raises(FlashError, match="writing the store failed"):
        convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert listing(tmp_path) == ["hf"]


# --- two processes --------------------------------------------------------------------


def test_two_processes_generate_from_one_store_at_once(pristine, tmp_path):
    store = Path(shutil.copytree(pristine, tmp_path / "store"))
    before = snapshot(store)
    code = """
        import json, os, sys, time, mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_flash import load
        store, options, prompt, barrier, me = sys.argv[1:]
        model, _ = load(store, progress=False, **json.loads(options))
        open(os.path.join(barrier, me), "w").close()
        while len(os.listdir(barrier)) < 2:  # both loaded: generate at once
            time.sleep(0.01)
        for _ in range(3):
            steps = generate_step(mx.array(json.loads(prompt)), model,
                                  max_tokens=48, sampler=lambda x: mx.argmax(x, -1))
            print(json.dumps([int(t) for t, _ in steps]))
        """
    (tmp_path / "barrier").mkdir()
    procs = [
        run_python(
            code, store, json.dumps(SPARSE), json.dumps(PROMPT), tmp_path / "barrier", i
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1] + outs[1][1]
    runs = [json.loads(line) for o, _ in outs for line in o.strip().splitlines()]
    model, _ = load(str(store), progress=False, **SPARSE)
    assert len(runs) == 6 and all(r == greedy(model, 48) for r in runs)
    assert snapshot(store) == before  # read-only at run time


def test_a_running_conversion_is_not_cleaned_up(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    live = tmp_path / f".out.partial-{os.getppid()}"  # a process that is running
    dead = tmp_path / ".out.partial-999999999"
    live.mkdir()
    dead.mkdir()
    convert(tmp_path / "hf", tmp_path / "out", progress=False)
    assert listing(tmp_path) == [live.name, "hf", "out"]

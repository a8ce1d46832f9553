"""The real Q4_K_M GGUFs (Gemma-3-270M, Qwen2.5-Coder-0.5B-Instruct), end to end.

Each is converted once with the defaults (store and ``--dense-out``), then: every
stored tensor against the `gguf` package's own dequantization of the file, the `all`
selector's logits against mlx-lm's on the dense directory, and greedy decoding.
Install the files with ``python tools/install_real_models.py``.
"""

import importlib.util
import math
import mmap
import time
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants
from mlx_lm.generate import generate_step

import mlx_flash
from mlx_flash.store.aligned_safetensors import without_pads
from mlx_flash.store.writer import convert
from mlx_flash.store.format import DENSE_NAME
from mlx_flash.store.gguf_file import hf_name, read_header
from mlx_flash.store.gguf_quants import EXACT_BITS
from mlx_flash.store.store import BundleStore, read_manifest

pytestmark = pytest.mark.real

_TOOL = Path(__file__).parents[1] / "tools" / "install_real_models.py"
_spec = importlib.util.spec_from_file_location("install_real_models", _TOOL)
install_real_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install_real_models)
# Resolved now, at collection: conftest points $MLX_FLASH_CACHE at a temp dir per test.
PATHS = {
    name: install_real_models.model_path(name) for name in install_real_models.MODELS
}

TEXT = (
    "The capital of France is Paris. The Eiffel Tower was built in Paris for the "
    "World's Fair of 1889."
)
FFN = ("gate_proj", "up_proj", "down_proj")
F16_STEP = 2.0**-11  # float16's relative rounding (half an ulp), normal values
F16_TINY = 2.0**-25  # half float16's smallest subnormal
EXACT_TYPES = set(EXACT_BITS) | {Q.F32, Q.F16, Q.BF16}


class Converted(NamedTuple):
    gguf: Path
    store: Path
    dense: Path
    arch: str
    types: dict  # Hugging Face name (with .weight/.bias) -> GGML type
    reference: dict  # Hugging Face name -> the gguf package's float32 values


def reference_values(path: Path):
    """Every tensor of the file as `gguf.quants.dequantize` gives it (float32), under
    its Hugging Face name; Gemma's norms minus the 1 the file adds."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta, tensors = read_header(buf, path)
    arch = meta["general.architecture"]
    types, values = {}, {}
    for t in tensors:
        raw = np.frombuffer(buf, np.uint8, t.nbytes, t.offset)
        rows = raw.reshape(-1, t.nbytes // math.prod(t.shape[:-1]))
        if t.qtype == Q.F32:
            w = rows.view(np.float32)
        else:
            w = np.asarray(quants.dequantize(rows, t.qtype), np.float32)
        name = hf_name(t.name, arch)
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - np.float32(1)
        types[name], values[name] = t.qtype, w.reshape(t.shape)
    return arch, types, values


@pytest.fixture(scope="module", params=list(PATHS))
def converted(request, tmp_path_factory):
    path = PATHS[request.param]
    if not path.is_file():
        pytest.skip(f"{path} is missing: run python tools/install_real_models.py")
    work = tmp_path_factory.mktemp(request.param)
    start = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:  # nothing lands in the user's cache
        mp.setenv("MLX_FLASH_CACHE", str(work / "cache"))
        store = convert(path, work / "store", dense_out=work / "dense", progress=False)
    print(f"\n{request.param}: converted in {time.perf_counter() - start:.1f} s")
    arch, types, reference = reference_values(path)
    return Converted(path, store, work / "dense", arch, types, reference)


@pytest.fixture(scope="module")
def models(converted):
    """The store through mlx_flash.load (selector `all`) and the dense directory
    through mlx_lm.load, both computing in float32."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_FLASH_CACHE", str(converted.store.parent / "cache"))
        flash, tokenizer = mlx_flash.load(
            str(converted.store), compute_dtype=mx.float32, progress=False
        )
    dense, _ = mlx_lm.load(str(converted.dense))
    dense.set_dtype(mx.float32)
    return flash, tokenizer, dense


def values(w, length: int) -> np.ndarray:
    """A float array, or an MLX affine triple over rows of `length`, in float32."""
    if not isinstance(w, tuple):
        return np.array(w.astype(mx.float32))
    packed, scales, biases = w
    bits, group_size = packed.shape[-1] * 32 // length, length // scales.shape[-1]
    f32 = mx.float32
    return np.array(
        mx.dequantize(packed, scales.astype(f32), biases.astype(f32), group_size, bits)
    )


def triples(weights: dict) -> dict:
    """Safetensors contents -> base name -> weight (a float array or a triple)."""
    out = {}
    for k, v in weights.items():
        if k.endswith((".scales", ".biases")):
            continue
        base = k.removesuffix(".weight")
        if f"{base}.scales" in weights:
            v = (v, weights[f"{base}.scales"], weights[f"{base}.biases"])
        out[k] = v
    return out


def assert_source_values(got: np.ndarray, qtype, expected: np.ndarray, name: str):
    """Exact for the types that map exactly; within float16's rounding otherwise."""
    assert got.shape == expected.shape, name
    if qtype in EXACT_TYPES:
        np.testing.assert_array_equal(got, expected, err_msg=name)
    else:
        bound = F16_STEP * np.abs(expected) + F16_TINY
        assert (np.abs(got - expected) <= bound).all(), name


def dense_part(directory: Path) -> dict:
    return without_pads(mx.load(str(directory / DENSE_NAME)))


def test_dense_part_is_the_gguf_values(converted):
    """The store's dense part: every non-FFN tensor of the file, with its origin."""
    dense = triples(dense_part(converted.store))
    expected = {k for k in converted.reference if k.rsplit(".", 2)[-2] not in FFN}
    assert set(dense) == expected
    origins = read_manifest(converted.store).dense
    for name, w in dense.items():
        length = converted.reference[name].shape[-1]
        qtype = converted.types[name]
        assert_source_values(values(w, length), qtype, converted.reference[name], name)
        assert isinstance(w, tuple) == (qtype in EXACT_BITS), name
        if name.endswith(".weight"):  # the manifest keys modules (a bias: F32)
            origin = origins[name.removesuffix(".weight")]
            assert origin[:2] == (qtype.name, qtype in EXACT_TYPES), name


def test_ffn_rows_are_the_gguf_values(converted):
    """gate/up rows exactly the file's; down, re-laid per neuron, exactly where its
    origin in the manifest says so, else within one quantization step (or the float
    rounding) of the encoding the manifest records for that layer."""
    store = BundleStore(converted.store)
    try:
        hidden = store.manifest.hidden_size
        for i, layer in enumerate(store.manifest.layers):
            rows, components = store.read_layer(i, mx.float32), layer.components
            for c in ("gate_proj", "up_proj"):
                name = f"model.layers.{i}.mlp.{c}.weight"
                qtype = converted.types[name]
                assert qtype in EXACT_BITS, name  # Q5_0 in both
                got = values(rows[c], hidden)
                np.testing.assert_array_equal(got, converted.reference[name], name)
                assert components[c].origin[:2] == (qtype.name, True), name
            name = f"model.layers.{i}.mlp.down_proj.weight"
            expected = converted.reference[name].T  # (n_ff, hidden): one row a neuron
            got = values(rows["down_proj"], hidden)
            down = components["down_proj"]
            assert down.origin.kind == converted.types[name].name, name
            # a fallback source type (Q6_K) was rounded to float16 when read
            bound = np.zeros_like(expected)
            if converted.types[name] not in EXACT_TYPES:
                bound += F16_STEP * np.abs(expected) + F16_TINY
            if down.origin.exact:
                pass  # stored as read
            elif isinstance(rows["down_proj"], tuple):
                # MLX's affine quantize keeps the larger end of a group exact and may
                # clip the other by up to a step; rounding and float16 scales and
                # biases add under half of one (measured: at most 1.14 steps)
                scales = np.array(rows["down_proj"][1].astype(mx.float32))
                step = np.repeat(np.abs(scales), hidden // scales.shape[-1], axis=-1)
                bound += 1.5 * step
            else:
                rel = {"float32": 0, "float16": F16_STEP, "bfloat16": 2.0**-8}
                bound += rel[down.encoding.dtype] * np.abs(expected) + F16_TINY
            assert (np.abs(got - expected) <= bound).all(), name
    finally:
        store.close()


def test_dense_out_holds_what_the_store_computes_with(converted):
    """--dense-out: the store's dense tensors as they are, and its FFN exactly as the
    store's rows hold it (down included, in whatever form expresses it)."""
    dense_out = mx.load(str(converted.dense / "model.safetensors"))
    store_dense = dense_part(converted.store)
    ffn = triples({k: v for k, v in dense_out.items() if k.rsplit(".", 2)[-2] in FFN})
    assert set(dense_out) - set(store_dense) == {
        k for k in dense_out if k.rsplit(".", 2)[-2] in FFN
    }
    for key, a in store_dense.items():  # the rest: the store's own tensors
        assert a.dtype == dense_out[key].dtype, key
        assert mx.array_equal(a, dense_out[key]).item(), key
    store = BundleStore(converted.store)
    try:
        hidden = store.manifest.hidden_size
        for i in range(store.num_layers):
            rows = store.read_layer(i, mx.float32)
            for c in FFN:
                name = f"model.layers.{i}.mlp.{c}.weight"
                got = values(ffn[name], converted.reference[name].shape[-1])
                got = got.T if c == "down_proj" else got
                np.testing.assert_array_equal(got, values(rows[c], hidden), name)
    finally:
        store.close()


def prompt_ids(tokenizer) -> mx.array:
    ids = tokenizer.encode(TEXT)[:16]
    assert len(ids) == 16
    return mx.array(ids)


def test_all_selector_logits_equal_mlx_lm(models):
    flash, tokenizer, dense = models
    ids = prompt_ids(tokenizer)[None]
    ours, theirs = flash(ids), dense(ids)
    assert ours.dtype == theirs.dtype == mx.float32
    diff = mx.abs(ours - theirs).max().item()
    print(f"max |logit difference| {diff:.2e}")
    assert diff <= 1e-4


def greedy(model, prompt: mx.array, n: int):
    steps = generate_step(prompt, model, max_tokens=n, sampler=lambda x: x.argmax(-1))
    return [int(t) for t, _ in steps]


def test_greedy_tokens_equal_mlx_lm(models):
    flash, tokenizer, dense = models
    prompt = prompt_ids(tokenizer)
    ours, theirs = greedy(flash, prompt, 32), greedy(dense, prompt, 32)
    assert ours == theirs, (tokenizer.decode(ours), tokenizer.decode(theirs))


def test_dense_model_reads_english(models):
    """A wrong mapping shared by both sides would pass the tests above: the dense
    model's perplexity on plain English (measured: Gemma 6.5, Qwen 7.1; 19 with
    wrong q/k norms)."""
    _, tokenizer, dense = models
    ids = mx.array(tokenizer.encode(TEXT))[None]
    loss = nn.losses.cross_entropy(dense(ids[:, :-1]), ids[:, 1:]).mean().item()
    assert math.exp(loss) < 10

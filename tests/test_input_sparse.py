"""The input selector: columns by input channel (store), calibrated thresholds, and
the runtime path that reads gate/up by column and down by neuron."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from conftest import make_checkpoint, traced_decoding
from mlx_flash import load
from mlx_flash.cache_simulator import input_replays
from mlx_flash.calibrate import main as calibrate_main
from mlx_flash.errors import FlashError
from mlx_flash.input_sparse import SPARSITY_NAME, kept, load_calibration
from mlx_flash.store.format import BUNDLES_NAME, COLUMNS, MANIFEST_NAME, dequantize
from mlx_flash.store.store import BundleStore
from mlx_flash.store.writer import convert

GATED = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
WORDS = "the quick brown fox jumps over the lazy dog while a cat sleeps in the sun"
TEXT = " ".join(WORDS.split() * 80)
HELD_OUT = " ".join(list(reversed(WORDS.split())) * 20)
NAMES = ("gate_proj", "up_proj", "down_proj")
PROMPT, STEPS = [1, 5, 9, 3], [9, 3, 7, 11, 2, 4, 8, 6]


def columns_store(tmp, arch="qwen2", **kwargs):
    make_checkpoint(tmp / "hf", arch)
    return convert(
        tmp / "hf", tmp / "store", layout="columns", progress=False, **kwargs
    )


def calibrate(store, tmp, shares="0,0.3", score="teal"):
    (tmp / "text.txt").write_text(TEXT)
    calibrate_main(
        [str(store), "--text", str(tmp / "text.txt"), "--tokens", "1024"]
        + ["--seq-len", "8", "--sparsity", shares, "--score", score, "--no-progress"]
    )


def decode(model, steps=STEPS):
    """Logits of each decoded token after a short prompt."""
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)
    return mx.concatenate([model(mx.array([[t]]), cache=cache) for t in steps], axis=1)


@pytest.mark.parametrize("ffn_format", ["auto", "q4"])
def test_columns_round_trip(tmp_path, ffn_format):
    """Decoded columns are the source's matrices transposed: exactly for a float
    store, within the recorded re-quantization error for a quantized one."""
    store = BundleStore(columns_store(tmp_path, ffn_format=ffn_format))
    source = dict(mx.load(str(tmp_path / "hf" / "model.safetensors")))
    m = store.manifest
    for entries in (m.layers, m.columns):  # planar: each part of each component
        parts = [(s.components, s.part) for s in entries[0].sections]
        assert parts == [
            ([name], part)
            for name, c in entries[0].components.items()
            for part, _ in c.parts
        ]
    assert m.format_version == 3
    for i in range(store.num_layers):
        columns = store.read_layer(i, mx.float32, columns=True)
        for name in m.rows:
            c = store.columns[i].components[name]
            w = source[f"model.layers.{i}.mlp.{name}.weight"]  # (n_ff, D)
            got = dequantize(columns[name], c.length).T
            error = float(mx.abs(got - w).max())
            if ffn_format == "auto":
                assert c.origin.exact and error == 0
            else:
                assert not c.origin.exact and 0 < error <= c.origin.error * 1.01
    store.verify()  # the checksums cover the extension


def test_columns_of_a_quantized_source(tmp_path):
    """An MLX q4 source: columns re-quantized along the neurons, within its error."""
    make_checkpoint(tmp_path / "hf", "llama")
    quantization = {"bits": 4, "group_size": 32}
    out = convert(
        tmp_path / "hf",
        tmp_path / "store",
        layout="columns",
        column_format="q8",
        quantization=quantization,
        progress=False,
    )
    store = BundleStore(out)
    rows = store.read_layer(0, mx.float32)
    columns = store.read_layer(0, mx.float32, columns=True)
    D, n = store.manifest.hidden_size, store.manifest.intermediate_size
    for name in store.manifest.rows:
        c = store.columns[0].components[name]
        assert c.encoding.bits == 8 and "per input channel" in c.origin.note
        diff = dequantize(columns[name], n).T - dequantize(rows[name], D)
        # (the recorded error is measured before the scales' float16 rounding)
        assert 0 < float(mx.abs(diff).max()) <= c.origin.error * 1.1


@pytest.mark.parametrize("arch", GATED)
def test_zero_sparsity_is_dense(tmp_path, arch):
    """At zero sparsity the input selector keeps every channel and neuron: the
    dense logits (to float summation order)."""
    make_checkpoint(tmp_path / "hf", arch)
    store = convert(
        tmp_path / "hf", tmp_path / "store", layout="columns", progress=False
    )
    calibrate(store, tmp_path, "0")
    dense, _ = load(str(store))
    model, _ = load(str(store), selector="input", sparsity=0)
    assert float(mx.abs(decode(model) - decode(dense)).max()) < 1e-4
    stats, m = model.flash_stats, model.flash_store.manifest
    layers = len(m.layers) * len(STEPS)
    assert stats.channels == layers * m.hidden_size
    assert stats.selected == layers * m.intermediate_size
    assert stats.syncs == 2 * layers


@pytest.mark.parametrize("score", ["teal", "wina"])
def test_sparse_decoding_follows_its_thresholds(tmp_path, score):
    """At 0.3 each layer keeps exactly the channels (by |x_j|, or WINA's |x_j| x
    its columns' norm) and neurons above its thresholds, and the output is that
    selection's (checked against a reference computed from the source's weights)."""
    store = columns_store(tmp_path)
    calibrate(store, tmp_path, score=score)
    model, _ = load(str(store), selector="input", sparsity=0.3)
    calibration = load_calibration(store, 0.3, 2)
    source = dict(mx.load(str(tmp_path / "hf" / "model.safetensors")))
    seen = []
    for i, layer in enumerate(model.layers):
        ffn, t = layer.mlp, calibration.layers[i]
        assert 0 < t.channels < 1 or 0 < t.neurons < 1

        def watch(x, ffn=ffn, i=i, t=t):
            y = type(ffn).__call__(ffn, x)
            if x.shape[1] > 1:  # the prompt: dense
                return y
            w = {n: source[f"model.layers.{i}.mlp.{n}.weight"] for n in NAMES}
            xs = x.reshape(-1)
            scores = mx.abs(xs)
            if score == "wina":
                g, u = w["gate_proj"], w["up_proj"]
                norms = mx.sqrt((g * g).sum(axis=0) + (u * u).sum(axis=0))
                scores = scores * norms
                assert np.allclose(np.array(norms), t.channel_scale, rtol=1e-5)
            xs = xs * (scores > t.channel_threshold)
            gate, up = xs @ w["gate_proj"].T, xs @ w["up_proj"].T
            a = gate * mx.sigmoid(gate) * up  # silu
            a = a * (mx.abs(a) > t.neuron_threshold)
            seen.append(float(mx.abs(y.reshape(-1) - a @ w["down_proj"].T).max()))
            return y

        layer.mlp = watch
    decode(model)
    assert len(seen) == 2 * len(STEPS) and max(seen) < 1e-4


def test_calibrated_share_holds_on_held_out_text(tmp_path):
    """Calibrated on one text, decoding another touches the target share of FFN
    bytes within 0.1 (a tiny random model on a short text: per layer the
    thresholds are quantiles of 1,024 tokens)."""
    store = columns_store(tmp_path)
    calibrate(store, tmp_path, "0.3")
    model, tokenizer = load(str(store), selector="input", sparsity=0.3)
    ids = tokenizer.encode(HELD_OUT)[:64]
    decode(model, ids)
    stats, m = model.flash_stats, model.flash_store.manifest
    share = json.loads((store / SPARSITY_NAME).read_text())["column_share"]
    per = stats.tokens * len(m.layers)
    kept_channels = stats.channels / (per * m.hidden_size)
    kept_neurons = stats.selected / (per * m.intermediate_size)
    c = float(np.mean(share))
    touched = c * kept_channels + (1 - c) * kept_neurons
    assert abs((1 - touched) - 0.3) <= 0.1, (kept_channels, kept_neurons)


def test_under_a_budget_columns_and_neurons_stream(tmp_path):
    """A budget too small for the caches: what does not fit streams past them, and
    the tokens are the unbudgeted input selector's."""
    store = columns_store(tmp_path)
    calibrate(store, tmp_path)
    free, _ = load(str(store), selector="input", sparsity=0.3)
    floor = free.flash_plan.floor
    tight, _ = load(
        str(store),
        selector="input",
        sparsity=0.3,
        dram_budget=floor + 4096,
        prefill_step_size=16,
    )
    assert float(mx.abs(decode(tight) - decode(free)).max()) < 1e-4
    assert tight.flash_stats.loaded > free.flash_stats.loaded
    assert "channels" in tight.flash_plan.describe()


@pytest.mark.parametrize("above", [4096, 16384])  # bytes above the floor
def test_streamed_columns_and_rows_are_computed_where_they_were_read(tmp_path, above):
    """A planar columns store (format 3): both stages' runs are read whole and
    computed from the staging buffer, the channels and neurons read past in them
    multiplied by zero; only the caches' own rows move (the pools hold nothing and
    are never written), and the logits are the unbudgeted selector's."""
    store = columns_store(tmp_path, ffn_format="q4")
    calibrate(store, tmp_path, shares="0.3")
    free, _ = load(str(store), selector="input", sparsity=0.3)
    tight, _ = load(
        str(store),
        selector="input",
        sparsity=0.3,
        dram_budget=free.flash_plan.floor + above,
        prefill_step_size=16,
        gap=2,  # runs merged past unneeded neurons and channels
    )
    pools = {}
    for layer in tight.layers:
        for pool in (layer.mlp._pool, layer.mlp._columns.pool):
            pools[id(pool)] = pool
    for pool in pools.values():
        assert pool.capacity == 0

        def copied(*args, **kwargs):
            pytest.fail("a streamed neuron or channel was copied into a pool")

        pool.put = copied
    runs = []  # each run computed in place: (rows, rows multiplied by zero)
    for layer in tight.layers:
        ffn, inner = layer.mlp, layer.mlp._in_place

        def counted(pieces, sections, at, n, past, count, *rest, inner=inner):
            out = inner(pieces, sections, at, n, past, count, *rest)
            runs.extend((len(index), int((index == count).sum())) for index, _ in out)
            return out

        ffn._in_place = counted
    assert float(mx.abs(decode(tight) - decode(free)).max()) < 1e-4
    s = tight.flash_stats
    assert s.loaded > 0 and s.channels_loaded > 0
    assert runs and any(masked for _, masked in runs)  # read past, multiplied by 0
    assert all(masked < rows for rows, masked in runs)


def test_kept_is_largest_first_and_never_empty():
    scores = np.array([0.1, 0.5, 0.3, 0.05])
    assert kept(scores, 0.2).tolist() == [1, 2]
    assert kept(scores, 9.0).tolist() == [1]  # at least the largest
    assert kept(scores, -1.0).tolist() == [1, 2, 0, 3]


def test_input_selector_needs_columns_and_a_calibration(tmp_path):
    make_checkpoint(tmp_path / "hf", "qwen2")
    bundled = convert(tmp_path / "hf", tmp_path / "bundled", progress=False)
    with pytest.raises(FlashError, match="--layout columns"):
        load(str(bundled), selector="input")
    store = convert(
        tmp_path / "hf", tmp_path / "store", layout="columns", progress=False
    )
    with pytest.raises(FlashError, match="mlx_flash.calibrate"):
        load(str(store), selector="input")
    calibrate(store, tmp_path, "0.3")
    with pytest.raises(FlashError, match=r"calibrated: 0.3"):
        load(str(store), selector="input", sparsity=0.2)
    with pytest.raises(FlashError, match="sparsity must be"):
        load(str(store), selector="input", sparsity=1.5)
    (store / SPARSITY_NAME).write_text("{not json")
    with pytest.raises(FlashError, match="malformed"):
        load(str(store), selector="input", sparsity=0.3)


def test_columns_layout_refuses_ungated_models(tmp_path):
    make_checkpoint(tmp_path / "hf", "opt")
    with pytest.raises(FlashError, match="gated"):
        convert(tmp_path / "hf", tmp_path / "store", layout="columns", progress=False)
    assert not (tmp_path / "store").exists()


def test_damaged_columns_are_refused(tmp_path):
    """The columns' header block ties them to the manifest; their bytes are
    covered by the block checksums; a manifest whose columns disagree is refused."""
    store = columns_store(tmp_path)
    m = json.loads((store / MANIFEST_NAME).read_text())
    ext = next(e for e in m["extensions"] if e["name"] == COLUMNS)
    bad = tmp_path / "bad"
    shutil.copytree(store, bad)
    with open(bad / BUNDLES_NAME, "r+b") as f:  # the header block's digest
        f.seek(ext["offset"] + 20)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(FlashError, match="columns extension was written for another"):
        BundleStore(bad)
    shutil.rmtree(bad)
    shutil.copytree(store, bad)
    with open(bad / BUNDLES_NAME, "r+b") as f:  # one column byte
        f.seek(ext["meta"]["layers"][1]["sections"][0]["offset"] + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(FlashError, match="layer 1, channels"):
        BundleStore(bad).verify()
    for edit, why in (
        (
            lambda e: e["meta"]["layers"][0]["components"]["gate_proj"].update(
                length=7
            ),
            "length",
        ),
        (lambda e: e["meta"]["layers"].pop(), "columns extension has 1 layers"),
        (lambda e: e["meta"].update(extra=1), "meta must be exactly"),
    ):
        broken = json.loads(json.dumps(m))
        edit(next(e for e in broken["extensions"] if e["name"] == COLUMNS))
        (bad / MANIFEST_NAME).write_text(json.dumps(broken))
        with pytest.raises(FlashError, match=why):
            BundleStore(bad)


def test_replay_reads_what_decoding_reads(tmp_path):
    """The cache simulator replaying decoding's own selections, with the plan's
    capacities and gaps, counts exactly the bytes the reader read."""
    store = columns_store(tmp_path)
    calibrate(store, tmp_path)
    free, _ = load(str(store), selector="input", sparsity=0.3)
    budget = free.flash_plan.floor + 40_000  # some slots, not all
    model, _ = load(
        str(store), selector="input", sparsity=0.3, dram_budget=budget, gap=1
    )
    traced_decoding(model, PROMPT, STEPS * 2)
    plan, simulated = model.flash_plan, 0
    assert 0 < sum(plan.capacities) < sum(n.count for n in plan.layers)
    for layer, (channels, neurons) in zip(model.layers, input_replays(model)):
        for c, ids in layer.mlp.trace:
            simulated += channels.step(c) + neurons.step(ids)
    assert simulated == model.flash_stats.bytes > 0


def test_page_bytes_counts_the_pages_a_share_touches():
    """Small bundles read at a share cost their pages: the planner's per-bundle
    figure for the input selector (a bundle of a page or more costs itself)."""
    from mlx_flash.flash_setup import page_bytes

    assert page_bytes(1008, 1.0) == 1008
    assert page_bytes(8192, 0.5) == 8192
    # 4 rows a page, 44% selected: 96% of the pages, so ~2.2x per selected row
    assert 2000 < page_bytes(1008, 0.44) < 2200
    assert page_bytes(512, 0.01) < 512 * 8


@pytest.mark.parametrize(
    "bundle, share, gap",
    [
        (1008, 0.44, 0),
        (1008, 0.44, 24),  # down rows at the reader's 24 KiB gap: the section whole
        (960, 0.6, 0),
        (7296, 0.78, 3),  # Qwen 0.5B's q5 columns: gaps of 3 channels merged
        (13440, 0.7, 1),
        (13440, 0.3, 1),
        (2304, 0.78, 10),
        (8192, 0.5, 0),  # whole pages: no slack
        (512, 0.05, 0),
    ],
)
def test_page_bytes_is_what_the_reader_reads_of_a_random_share(bundle, share, gap):
    """The planner's cost of a selected bundle agrees with the reader's own byte
    count (`read_bytes`: runs merged across `gap`, widened to 4 KiB) over random
    selections of that share, within 2%."""
    from mlx_flash.flash_setup import page_bytes
    from mlx_flash.store.manifest import Section
    from mlx_flash.store.store import read_bytes

    n, rng = 4096, np.random.default_rng(0)
    sections = [Section(["down"], 0, bundle)]
    read = selected = 0
    for _ in range(20):
        ids = np.nonzero(rng.random(n) < share)[0]
        read += read_bytes(sections, ids, gap)
        selected += len(ids)
    assert page_bytes(bundle, share, gap) == pytest.approx(read / selected, rel=0.02)


def test_evaluate_runs_the_calibrated_selector(tmp_path):
    """`evaluate --calibrated`: at zero sparsity the dense perplexity (float columns
    are the rows transposed); at 0.3 a higher one, touching about 70% of the FFN."""
    from mlx_flash.evaluate import main as evaluate_main

    store = columns_store(tmp_path)
    calibrate(store, tmp_path)
    out = tmp_path / "eval.json"
    evaluate_main(
        [str(store), "--text", str(tmp_path / "text.txt"), "--tokens", "256"]
        + ["--seq-len", "32", "--fractions", "", "--shadow-bits", "", "--calibrated"]
        + ["0,0.3", "--no-predictors", "--no-progress", "--json", str(out)]
    )
    rows = {r["config"]: r for r in json.loads(out.read_text())["configs"]}
    zero, sparse = rows["input calibrated 0"], rows["input calibrated 0.3"]
    assert abs(zero["ppl"] / rows["dense"]["ppl"] - 1) < 1e-4
    assert zero["ffn_touched"] == pytest.approx(1.0)
    assert sparse["ppl"] != zero["ppl"] and 0.55 < sparse["ffn_touched"] < 0.85


def test_inspect_and_the_converter_name_the_columns_lossy_step(tmp_path):
    from mlx_flash.inspect import describe

    store = BundleStore(columns_store(tmp_path, ffn_format="q4"))
    text = describe(store)
    assert "gate_proj cols   affine q5 g64" in text
    for name in ("gate_proj", "up_proj"):  # planar: each part a section
        for part in ("packed", "scales", "biases"):
            assert f"{name} cols {part}" in text
    steps = store.manifest.lossy_steps()
    assert any(
        s.startswith("gate_proj columns") and "per input channel" in s for s in steps
    )

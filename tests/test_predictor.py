"""Learned predictors: layer-by-layer passes, training, calibration, storage, the
`lowrank` selector, and `evaluate`'s per-token masks."""

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import make_checkpoint
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from mlx_flash import FlashError, convert, load
from mlx_flash.evaluate import main as evaluate_main
from mlx_flash.layerwise import Lane, run_layers, text_tokens, token_nll
from mlx_flash.predictor import (
    RANK_TOLERANCE,
    RECALLS,
    WEIGHTS_NAME,
    load_predictors,
    top_fraction_targets,
    train_layer,
)
from mlx_flash.train_predictors import main as train_main
from mlx_flash.train_predictors import parse_ranks

TEXT = " ".join(
    "the quick brown fox jumps over the lazy dog while a cat sleeps in the sun".split()
    * 60
)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("predictor")
    (tmp / "text.txt").write_text(TEXT)
    out = {"text": tmp / "text.txt"}
    for arch in ("llama", "opt", "qwen2"):
        make_checkpoint(tmp / arch, arch, **({"seed": 1} if arch == "opt" else {}))
        out[arch] = convert(tmp / arch, tmp / f"{arch}-store", progress=False)
    return out


def tokens_of(model, tokenizer, n=64, seq_len=16):
    return text_tokens(tokenizer, TEXT, n, seq_len)


@pytest.mark.parametrize("arch", ["llama", "opt", "qwen2"])  # qwen2: pipeline layers
def test_layer_by_layer_equals_the_whole_model(stores, arch):
    model, tokenizer = load(str(stores[arch]), progress=False)
    tokens = tokens_of(model, tokenizer)
    lane = Lane(None)
    run_layers(model, tokens, [lane], batch=2)
    ours = token_nll(model, tokens, lane.h)
    logits = model(tokens).astype(mx.float32)
    theirs = nn.losses.cross_entropy(logits[:, :-1], tokens[:, 1:], reduction="none")
    assert mx.allclose(ours, theirs, atol=1e-4).item()


def test_masks_equal_decoding_token_by_token_with_the_oracle(stores):
    """evaluate's lanes are exactly what sparse decoding computes, token by token."""
    model, tokenizer = load(str(stores["llama"]), progress=False)
    tokens = tokens_of(model, tokenizer, n=16, seq_len=16)
    lane = Lane(lambda i, x, a, pre, w: top_fraction_targets(mx.abs(a), 0.5))
    run_layers(model, tokens, [lane])
    ours = token_nll(model, tokens, lane.h)[0]

    sparse, _ = load(
        str(stores["llama"]), selector="oracle", fraction=0.5, progress=False
    )
    cache, logits = make_prompt_cache(sparse), []
    for t in range(tokens.shape[1] - 1):
        logits.append(sparse(tokens[:, t : t + 1], cache=cache)[0, -1])
    decoded = nn.losses.cross_entropy(mx.stack(logits), tokens[0, 1:], reduction="none")
    assert mx.allclose(ours, decoded, atol=1e-3).item()


def test_training_learns_a_low_rank_rule_and_calibration_reaches_its_recall():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 32)).astype(np.float32)
    w = rng.normal(size=(32, 4)) @ rng.normal(size=(4, 96))  # rank 4
    targets = x @ w > 1.0
    predictor, m = train_layer(x, targets, rank=8, epochs=30, batch=128, lr=3e-3)
    assert m.epochs >= 2 and m.loss < 0.3
    for r in ("0.8", "0.9", "0.95"):
        assert m.recall[r] >= float(r) - 0.02
    assert m.precision["0.9"] > 0.8  # a learnable rule is learned, not guessed
    logits = np.array(predictor(mx.array(x[-400:])))
    chosen = logits >= m.thresholds["0.9"]
    assert (chosen & targets[-400:]).sum() / targets[-400:].sum() >= 0.88


def test_parse_ranks():
    assert parse_ranks("8", 3) == [8, 8, 8]
    assert parse_ranks("8,1-2:16", 4) == [8, 16, 16, 8]
    assert parse_ranks("8,3:32", 4) == [8, 8, 8, 32]
    assert parse_ranks("auto,0:16", 3) == [16, None, None]
    for bad in ("x", "8,9:4", "8,1-2", "0", "auto,1:0"):
        with pytest.raises(FlashError):
            parse_ranks(bad, 4)


@pytest.fixture(scope="module")
def trained(stores):
    store = stores["llama"]
    train_main(
        [
            str(store),
            "--text",
            str(stores["text"]),
            "--tokens",
            "512",
            "--seq-len",
            "32",
            "--rank",
            "auto,1:16",
            "--epochs",
            "3",
            "--no-progress",
        ]
    )
    return store


def test_training_saves_predictors_into_the_store(trained):
    manifest = json.loads((trained / "predictors.json").read_text())
    first, second = manifest["layers"]
    assert second["rank"] == 16 and not second["ranks"]
    # auto: trained at the map's own rank (64 = D), cut to the smallest rank within
    # the tolerance of it on the held-out tokens
    assert set(first["ranks"]) <= {"32", "64"} and "64" in first["ranks"]
    chosen = first["rank"]
    assert first["ranks"][str(chosen)] <= first["ranks"]["64"] + RANK_TOLERANCE
    if chosen == 64:  # the smaller rank was tried and selected too many
        assert first["ranks"]["32"] > first["ranks"]["64"] + RANK_TOLERANCE
    # every recall's FFN output error, measured on the held-out tokens
    errors = [first["error"][f"{r:g}"] for r in RECALLS]
    assert all(0 <= e <= 1.5 for e in errors) and errors[0] > errors[-1]
    assert manifest["target"] == {"kind": "top", "fraction": 0.25}
    assert manifest["text"]["tokens"] == 512 and len(manifest["text"]["sha256"]) == 64
    ps = load_predictors(trained, 64, [128, 128])
    assert ps.predictors[1].down.weight.shape == (16, 64)
    assert ps.predictors[0].down.weight.shape == (chosen, 64)
    assert ps.threshold(0, 0.9) == manifest["layers"][0]["thresholds"]["0.9"]
    assert not list(trained.glob("tmp.*"))


def test_8bit_predictors_pick_what_float_ones_pick(trained):
    """Decoding quantizes the predictors to 8 bits: 3.5x less DRAM, the same picks."""
    full = load_predictors(trained, 64, [128, 128])
    small = load_predictors(trained, 64, [128, 128], bits=8)
    assert small.nbytes < full.nbytes  # here only down (64 -> r) has 64-wide groups
    assert isinstance(small.predictors[0].down, nn.QuantizedLinear)
    x = mx.random.normal((256, 64), key=mx.random.key(3))
    for i in range(2):
        cut = full.threshold(i, 0.9)
        a, b = full.predictors[i](x) > cut, small.predictors[i](x) > cut
        agree = (a == b).astype(mx.float32).mean().item()
        assert agree > 0.97, (i, agree)


def test_lowrank_selector_decodes_and_counts_its_cost(trained):
    dense, _ = load(str(trained), progress=False)
    model, _ = load(str(trained), selector="lowrank", fraction=1.0, progress=False)
    prompt = mx.array([1, 5, 6, 7, 8, 9])
    greedy = lambda m: [  # noqa: E731
        int(t)
        for t, _ in generate_step(
            prompt, m, max_tokens=8, sampler=lambda l: l.argmax(-1)
        )
    ]
    assert greedy(model) == greedy(dense)  # every neuron selected: exact
    s = model.flash_stats
    assert s.syncs == 2 * s.tokens and s.seconds["select"] > 0
    assert model.flash_plan.fixed["predictors"] == sum(
        layer.mlp._selector.predictor.nbytes for layer in model.layers
    )
    sparse, _ = load(str(trained), selector="lowrank", recall=0.8, progress=False)
    greedy(sparse)
    assert sparse.flash_stats.selected < 128 * 2 * sparse.flash_stats.tokens


def test_lowrank_sparsity_allocates_each_layers_recall(trained):
    """--sparsity: each layer's recall chosen by its measured error (TEAL's greedy),
    at least the asked share of neurons unused on the held-out tokens."""
    ps = load_predictors(trained, 64, [128, 128])
    for sparsity in (0.2, 0.4):
        cuts = ps.allocated(sparsity)
        keys = [
            next((k for k, t in m.thresholds.items() if t == c), None)
            for c, m in zip(cuts, ps.metrics)
        ]
        unused = [
            0.0 if k is None else 1 - m.selected[k] for k, m in zip(keys, ps.metrics)
        ]
        assert np.mean(unused) >= sparsity - 1e-9, (sparsity, keys)
    model, _ = load(str(trained), selector="lowrank", sparsity=0.4, progress=False)
    cuts = [layer.mlp._selector.threshold for layer in model.layers]
    assert cuts == ps.allocated(0.4)
    with pytest.raises(FlashError, match="takes no --recall"):
        load(str(trained), selector="lowrank", sparsity=0.4, recall=0.9)


def test_allocation_gives_up_where_the_error_is_small():
    """Two layers, the first 100x less sensitive: it is cut first and further."""
    from mlx_flash.predictor import LayerMetrics, Predictor, PredictorSet

    keys = ["0.99", "0.9", "0.5"]
    selected = {"0.99": 0.9, "0.9": 0.6, "0.5": 0.3}

    def metrics(scale):
        error = {"0.99": 0.001 * scale, "0.9": 0.01 * scale, "0.5": 0.1 * scale}
        thresholds = {k: float(i) for i, k in enumerate(keys)}
        return LayerMetrics(8, 1, 0.0, {}, {}, selected, thresholds, error=error)

    ps = PredictorSet(
        [Predictor(64, 8, 128, "none") for _ in range(2)],
        [metrics(1), metrics(100)],
        "none",
        {"kind": "top", "fraction": 0.5},
        {},
    )
    assert ps.allocated(0.05) == [0.0, -math.inf]  # 0.99 in the cheap layer alone
    assert ps.allocated(0.4) == [2.0, 0.0]  # 0.7 + 0.1 of each layer: mean 0.4
    with pytest.raises(FlashError, match="beyond"):
        ps.allocated(0.8)
    ps.metrics[0].error.clear()
    with pytest.raises(FlashError, match="no measured error"):
        PredictorSet(ps.predictors, ps.metrics, "none", {}, {}).allocated(0.1)


def test_damaged_predictors_are_refused(trained, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(trained, copy)
    with open(copy / WEIGHTS_NAME, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(FlashError, match="do not match"):
        load(str(copy), selector="lowrank", progress=False)
    (copy / "predictors.json").write_text("{not json")
    with pytest.raises(FlashError, match="not a predictors manifest"):
        load(str(copy), selector="lowrank", progress=False)
    (copy / "predictors.json").unlink()
    with pytest.raises(FlashError, match="train_predictors"):
        load(str(copy), selector="lowrank", progress=False)
    with pytest.raises(FlashError, match="recall"):
        load(str(trained), selector="lowrank", recall=0.42, progress=False)


def test_evaluate_reports_every_selection(trained, stores, tmp_path, capsys):
    out = tmp_path / "eval.json"
    evaluate_main(
        [
            str(trained),
            "--text",
            str(stores["text"]),
            "--tokens",
            "256",
            "--seq-len",
            "32",
            "--fractions",
            "0.25,1.0",
            "--recalls",
            "0.9",
            "--json",
            str(out),
            "--no-progress",
        ]
    )
    result = json.loads(out.read_text())
    rows = {r["config"]: r for r in result["configs"]}
    assert set(rows) == {
        "dense",
        "oracle top 0.25",
        "gate top 0.25",
        "oracle top 1",
        "gate top 1",
        "lowrank recall 0.9",
        "lowrank top 0.25",
        "lowrank top 1",
        "shadow 2-bit top 0.25",
        "shadow 2-bit top 1",
        "shadow 4-bit top 0.25",
        "shadow 4-bit top 1",
    }
    assert rows["dense"]["delta"] == 0
    assert rows["oracle top 1"]["ppl"] == pytest.approx(rows["dense"]["ppl"], 1e-5)
    assert rows["oracle top 0.25"]["neurons_used"] == pytest.approx(0.25, abs=0.01)
    assert len(rows["lowrank recall 0.9"]["per_layer_recall"]) == 2
    assert rows["shadow 4-bit top 1"]["ppl"] == pytest.approx(
        rows["dense"]["ppl"], 1e-5
    )
    costs = {c["selector"]: c for c in result["selector_costs"]}
    assert set(costs) == {
        "gate (float32 rows)",  # as the tiny checkpoint was converted
        "shadow 2-bit gate+up",
        "shadow 4-bit gate+up",
        "lowrank (none, float32)",
    }
    manifest = json.loads((trained / "predictors.json").read_text())
    r0 = manifest["layers"][0]["rank"]  # chosen by --rank auto
    assert costs["lowrank (none, float32)"]["dram_bytes"] == 4 * (
        (64 * r0 + r0 * 128 + 128) + (64 * 16 + 16 * 128 + 128)  # no hidden bias
    )
    assert all(c["ms_per_token"] > 0 for c in costs.values())
    assert "| lowrank recall 0.9 |" in capsys.readouterr().out


def test_evaluate_on_a_relu_model_without_predictors(stores, tmp_path, capsys):
    evaluate_main(
        [
            str(stores["opt"]),
            "--text",
            str(stores["text"]),
            "--tokens",
            "128",
            "--seq-len",
            "32",
            "--fractions",
            "0.5",
            "--no-progress",
        ]
    )
    out = capsys.readouterr().out
    assert "| oracle relu (a > 0) |" in out and "gate top" not in out
    relu = next(l for l in out.splitlines() if l.startswith("| oracle relu"))
    assert "+0.0%" in relu  # exact zeros dropped: the same model


def test_commands_refuse_a_missing_text(stores, tmp_path, capsys):
    for main in (train_main, evaluate_main):
        with pytest.raises(SystemExit) as e:
            main([str(stores["llama"]), "--text", str(tmp_path / "none.txt")])
        assert e.value.code == 2
        assert "does not exist" in capsys.readouterr().err


def test_an_interrupted_training_resumes_where_it_stopped(stores, tmp_path):
    """Each layer is saved as it is trained: after a Ctrl-C during layer 1 the same
    command trains layer 1 only and saves what an uninterrupted run saves; other
    arguments are refused (naming --restart), which discards the progress."""
    import shutil

    import mlx_flash.train_predictors as tp
    from mlx_flash.training_progress import PARTIAL_NAME

    def copy(name):  # the store with no predictors (another test may have trained)
        out = shutil.copytree(stores["llama"], tmp_path / name)
        for f in ("predictors.json", "predictors.safetensors"):
            (out / f).unlink(missing_ok=True)
        return out

    args = ["--text", str(stores["text"]), "--tokens", "256", "--seq-len", "32"]
    args += ["--rank", "8", "--epochs", "2", "--no-progress"]
    whole, cut = copy("whole"), copy("cut")
    train_main([str(whole), *args])
    real, calls = tp.train_layer, []

    def interrupted(*a, **k):
        calls.append(k["seed"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    tp.train_layer = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            train_main([str(cut), *args])
        assert (cut / PARTIAL_NAME / "layer-000.json").is_file()
        assert not (cut / PARTIAL_NAME / "layer-001.json").exists()
        assert not (cut / "predictors.json").exists()
        with pytest.raises(SystemExit):  # a one-line error naming the fix
            train_main([str(cut), *args[:-3], "--epochs", "3", "--no-progress"])
        calls.clear()
        train_main([str(cut), *args])
    finally:
        tp.train_layer = real
    assert calls == [1]  # layer 1 only (its seed), layer 0 loaded
    assert not (cut / PARTIAL_NAME).exists()
    a = mx.load(str(whole / "predictors.safetensors"))
    b = mx.load(str(cut / "predictors.safetensors"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]) for k in a)
    first = json.loads((whole / "predictors.json").read_text())["layers"]
    again = json.loads((cut / "predictors.json").read_text())["layers"]
    assert [l["thresholds"] for l in first] == [l["thresholds"] for l in again]
    # --restart: the progress of other arguments discarded, every layer trained
    other = copy("other")
    tp.train_layer, calls[:] = interrupted, []
    try:
        with pytest.raises(KeyboardInterrupt):
            train_main([str(other), *args])
        calls.clear()
        tp.train_layer = lambda *a, **k: calls.append(k["seed"]) or real(*a, **k)
        restart = [*args[:-3], "--epochs", "3", "--no-progress", "--restart"]
        train_main([str(other), *restart])
    finally:
        tp.train_layer = real
    assert calls == [0, 1] and not (other / PARTIAL_NAME).exists()


def test_mass_targets_are_the_fewest_neurons_that_carry_the_share():
    from mlx_flash.predictor import mass_targets

    row = mx.array([[1.0, 4.0, 2.0, 3.0]])  # total 10
    assert mass_targets(row, 0.5).tolist() == [[False, True, False, True]]  # 4 + 3
    assert mass_targets(row, 0.4).tolist() == [[False, True, False, False]]
    assert mass_targets(row, 1.0).tolist() == [[True] * 4]
    rng = np.random.default_rng(0)
    scores = np.abs(rng.standard_normal((64, 97))).astype(np.float32) ** 3
    for share in (0.3, 0.8, 0.95):
        mask = np.array(mass_targets(mx.array(scores), share))
        for s, m in zip(scores, mask):
            kept = np.sort(s[m])
            assert kept.sum() >= share * s.sum() * (1 - 1e-5)  # reaches the share
            assert kept[1:].sum() < share * s.sum()  # minus its smallest: it does not
            assert kept.min() >= s[~m].max(initial=0)  # the largest ones


def test_training_on_the_mass_target(stores, tmp_path):
    """--target mass: the manifest records it, load and the selector accept it, and a
    target outside (0, 1] in a manifest is refused as malformed."""
    import shutil

    store = shutil.copytree(stores["llama"], tmp_path / "store")
    args = ["--text", str(stores["text"]), "--tokens", "256", "--seq-len", "32"]
    train_main(
        [str(store), *args, "--target", "mass", "--mass", "0.8", "--epochs", "1"]
    )
    manifest = json.loads((store / "predictors.json").read_text())
    assert manifest["target"] == {"kind": "mass", "share": 0.8}
    assert len(load_predictors(store, 64, [128, 128]).predictors) == 2
    model, _ = load(str(store), selector="lowrank", recall=0.9, progress=False)
    steps = generate_step(
        mx.array([1, 5, 9]), model, max_tokens=3, sampler=lambda l: mx.argmax(l, -1)
    )
    assert len([t for t, _ in steps]) == 3
    manifest["target"]["share"] = 2
    (store / "predictors.json").write_text(json.dumps(manifest))
    with pytest.raises(FlashError, match="share"):
        load_predictors(store, 64, [128, 128])


def test_input_sparse_rows_are_dense_at_zero_and_touch_their_share(stores, tmp_path):
    """TEAL- and WINA-like selections on the FFN's input: at sparsity 0 the dense
    perplexity; at s the share 1 - s of neurons used and of FFN bytes touched (the
    oracle touches gate and up whole)."""
    out = tmp_path / "eval.json"
    evaluate_main(
        [str(stores["llama"]), "--text", str(stores["text"]), "--tokens", "256"]
        + ["--seq-len", "32", "--fractions", "0.25", "--input-sparsity", "0,0.5"]
        + ["--shadow-bits", "", "--no-predictors", "--json", str(out), "--no-progress"]
    )
    rows = {r["config"]: r for r in json.loads(out.read_text())["configs"]}
    dense = rows["dense"]["ppl"]
    for name in ("input TEAL 0", "input WINA 0"):
        assert rows[name]["ppl"] == pytest.approx(dense, 1e-5)
        assert rows[name]["ffn_touched"] == pytest.approx(1.0)
    for name in ("input TEAL 0.5", "input WINA 0.5"):
        assert rows[name]["ppl"] != pytest.approx(dense, 1e-4)
        assert rows[name]["neurons_used"] == pytest.approx(0.5, abs=0.01)
        assert rows[name]["ffn_touched"] == pytest.approx(0.5, abs=0.01)
    assert rows["oracle top 0.25"]["ffn_touched"] == pytest.approx(0.75, abs=0.01)
    assert rows["gate top 0.25"]["ffn_touched"] == pytest.approx(0.5, abs=0.01)

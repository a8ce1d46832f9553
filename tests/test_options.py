"""The flash options are named once: the command line, `load` and the setup agree."""

import argparse
from dataclasses import fields

import mlx.core as mx
import pytest
from conftest import make_checkpoint

from mlx_flash import FlashError, load
from mlx_flash.options import (
    DEFAULT_FRACTION,
    DEFAULT_RECALL,
    FlashOptions,
    add_flash_args,
)


def parse(*argv):
    parser = argparse.ArgumentParser()
    add_flash_args(parser)
    return FlashOptions.from_args(parser.parse_args(list(argv)))


def test_every_option_is_a_flag_with_the_same_default():
    assert parse() == FlashOptions()
    flags = {
        "selector": "gate",
        "fraction": "0.25",
        "threshold": "0.5",
        "recall": "0.95",
        "window": "4",
        "dram_budget": "125%",
        "gap": "3",
        "reader": "mmap",
        "threads": "2",
        "compute_threads": "3",
        "compute_dtype": "float16",
        "max_kv_size": "512",
        "prefill_step_size": "256",
        "sparsity": "0.4",
        "shadow_bits": "2",
        "prompt_caches": "1",
        "stream_piece": "8MiB",
    }
    argv = [a for k, v in flags.items() for a in ("--" + k.replace("_", "-"), v)]
    got = parse(*argv, "--verify", "--no-read-ahead")
    assert got.verify and got.selector == "gate" and got.dram_budget == "125%"
    assert got.no_read_ahead and not FlashOptions().no_read_ahead
    assert (got.fraction, got.window, got.threads, got.max_kv_size) == (0.25, 4, 2, 512)
    assert got.prefill_step_size == 256 and got.sparsity == 0.4
    assert got.stream_piece == "8MiB" and FlashOptions().stream_piece is None
    assert got.shadow_bits == 2 and got.prompt_caches == 1 and got.compute_threads == 3
    assert {f.name for f in fields(FlashOptions)} == set(flags) | {
        "verify",
        "naive",
        "no_read_ahead",
    }
    assert parse("--naive").naive


@pytest.mark.parametrize(
    "selector, given, fraction, recall",
    [
        ("oracle", {}, DEFAULT_FRACTION, None),
        ("oracle", {"threshold": 0.1}, None, None),
        ("lowrank", {}, None, DEFAULT_RECALL),
        ("lowrank", {"fraction": 0.3}, 0.3, None),
        ("lowrank", {"recall": 0.8}, None, 0.8),
        ("lowrank", {"sparsity": 0.3}, None, None),  # recalls allocated per layer
        ("shadow", {}, DEFAULT_FRACTION, None),
    ],
)
def test_defaults_are_decided_in_one_place(selector, given, fraction, recall):
    options = FlashOptions(selector=selector, **given)
    assert options.fraction_for(gated=True) == fraction
    assert options.recall_for() == recall
    assert FlashOptions(selector="oracle").fraction_for(gated=False) is None  # ReLU


@pytest.mark.parametrize(
    "bad",
    [
        {"fraction": 0},
        {"window": 0},
        {"selector": "magic"},
        {"dram_budget": -5},
        {"naive": True, "selector": "gate"},
    ],
)
def test_bad_options_are_refused_when_made(bad):
    with pytest.raises(FlashError):
        FlashOptions(**bad)


def test_load_takes_options_or_keywords_not_both(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama")
    a, _ = load(str(tmp_path / "hf"), options=FlashOptions(selector="oracle"))
    b, _ = load(str(tmp_path / "hf"), selector="oracle", compute_dtype=mx.float32)
    x = mx.array([[1, 2, 3, 4]])
    assert mx.array_equal(a(x), b(x))
    with pytest.raises(FlashError, match="not both"):
        load(str(tmp_path / "hf"), options=FlashOptions(), selector="oracle")
    with pytest.raises(TypeError, match="unexpected"):
        load(str(tmp_path / "hf"), selectr="oracle")


def test_the_default_is_exact_and_never_naive(tmp_path):
    """No flags: `all` with the whole layer cached under the default budget; after the
    first token no reads, no selection, no gather. `naive` streams every token."""
    make_checkpoint(tmp_path / "hf", "llama")
    dense, _ = load(str(tmp_path / "hf"), naive=True)
    model, _ = load(str(tmp_path / "hf"))
    assert model.flash_plan.budget is not None  # a share of the memory available
    assert model.layers[0].mlp._cache is not None and dense.layers[0].mlp._cache is None
    from mlx_lm.generate import generate_step

    def run(m):
        m.flash_stats.reset()
        steps = generate_step(
            mx.array([1, 5, 9, 3]), m, max_tokens=8, sampler=lambda l: mx.argmax(l, -1)
        )
        return [int(t) for t, _ in steps]

    assert run(model) == run(dense)
    reads = model.flash_store.reader.stats.bytes
    run(model)  # every neuron is cached now: not even the prefill reads
    assert model.flash_store.reader.stats.bytes == reads
    assert model.flash_stats.hits == model.flash_stats.selected > 0
    assert dense.flash_stats.bytes > 0


@pytest.mark.parametrize("budget_slots", [None, 40])
def test_expected_bytes_per_token_are_what_all_reads(tmp_path, budget_slots):
    """`all`: the plan's expectation (warm caches) equals what decoding reads."""
    make_checkpoint(tmp_path / "hf", "llama")
    model, _ = load(str(tmp_path / "hf"), naive=True)
    naive = model.flash_plan.expected_bytes
    options = {"prefill_step_size": 16}  # (a budget's own step would move the plan)
    if budget_slots:
        p = load(str(tmp_path / "hf"), **options)[0].flash_plan
        options["dram_budget"] = p.budget_for_slots(budget_slots)
    model, _ = load(str(tmp_path / "hf"), **options)
    from mlx_lm.generate import generate_step

    def decode(m, n):
        steps = generate_step(
            mx.array([1, 5, 9, 3]), m, max_tokens=n, sampler=lambda l: mx.argmax(l, -1)
        )
        return [int(t) for t, _ in steps]

    decode(model, 2)  # warm the caches
    model.flash_stats.reset()
    decode(model, 6)
    s = model.flash_stats
    assert s.bytes / s.tokens == model.flash_plan.expected_bytes
    dense, _ = load(str(tmp_path / "hf"), naive=True)
    decode(dense, 6)
    assert dense.flash_stats.bytes / dense.flash_stats.tokens == naive
    assert (model.flash_plan.expected_bytes == 0) == (budget_slots is None)
    assert 0 < model.flash_plan.expected_bytes < naive or budget_slots is None


def test_a_flag_mlx_lm_already_has_is_read_not_added_again():
    """generate's and chat's parsers are mlx-lm's, which has --max-kv-size: the flash
    group leaves it to them and reads the same value."""
    from mlx_flash.generate import setup_arg_parser

    args = setup_arg_parser().parse_args(["--max-kv-size", "300", "--prompt", "x"])
    assert FlashOptions.from_args(args).max_kv_size == 300


def test_the_default_budget_is_a_share_of_the_memory_available():
    from mlx_flash.budget import DEFAULT_BUDGET_SHARE, available_memory, default_budget

    available = available_memory()
    assert available is None or default_budget() == int(
        available * DEFAULT_BUDGET_SHARE
    )
    if available is not None:  # MemAvailable, within a cgroup's limit when there is one
        meminfo = open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0]
        assert available <= int(meminfo) * 1024 * 1.1

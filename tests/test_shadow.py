"""The shadow selector: a low-bit copy of gate and up held in DRAM scores every
neuron, the chosen ones are read and computed exactly."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from conftest import make_checkpoint, traced_decoding
from mlx_flash import load
from mlx_flash.errors import FlashError
from mlx_flash.store.writer import convert

GATED = ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"]
PROMPT, STEPS = [1, 5, 9, 3], [9, 3, 7, 11, 2, 4, 8, 6]


def decode(model):
    cache = make_prompt_cache(model)
    model(mx.array([PROMPT]), cache=cache)
    return mx.concatenate([model(mx.array([[t]]), cache=cache) for t in STEPS], axis=1)


@pytest.mark.parametrize("arch", GATED)
def test_every_neuron_is_dense(tmp_path, arch):
    """Selecting every neuron by the shadow's estimate: the dense logits."""
    make_checkpoint(tmp_path / "hf", arch)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    dense, _ = load(str(store))
    model, _ = load(str(store), selector="shadow", fraction=1.0, shadow_bits=2)
    assert float(mx.abs(decode(model) - decode(dense)).max()) < 1e-4
    stats, m = model.flash_stats, model.flash_store.manifest
    assert stats.selected == len(m.layers) * len(STEPS) * m.intermediate_size


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_shadow_picks_near_the_oracle_and_is_planned(tmp_path, bits):
    """The copy's top half overlaps the true top half by |act(gate)·up| (more with
    more bits), and its DRAM is in the plan: exactly the copies' bytes."""
    make_checkpoint(tmp_path / "hf", "llama")
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    oracle, _ = load(str(store), selector="oracle", fraction=0.5)
    shadow, _ = load(str(store), selector="shadow", fraction=0.5, shadow_bits=bits)
    picks = {}
    for name, model in (("oracle", oracle), ("shadow", shadow)):
        picks[name] = []
        for layer in model.layers:
            layer.mlp.trace = picks[name]
        decode(model)
    overlap = np.mean(
        [
            len(np.intersect1d(a, b)) / len(a)
            for (_, a), (_, b) in zip(picks["oracle"], picks["shadow"])
        ]
    )
    assert overlap > {2: 0.7, 3: 0.8, 4: 0.85}[bits], overlap
    copies = sum(
        a.nbytes
        for layer in shadow.layers
        for c in layer.mlp._selector.copies
        for a in c
    )
    assert shadow.flash_plan.fixed["shadow"] == copies


def test_shadow_needs_a_gated_ffn(tmp_path):
    make_checkpoint(tmp_path / "hf", "opt")
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    with pytest.raises(FlashError, match="gated FFN"):
        load(str(store), selector="shadow")
    with pytest.raises(FlashError, match="shadow_bits must be 2, 3 or 4"):
        load(str(store), selector="shadow", shadow_bits=5)


def test_replay_reads_what_decoding_reads(tmp_path):
    """A neuron selector's decoding replayed through the plan's caches (the
    frontier's figure for shadow and lowrank rows) counts the reader's bytes."""
    from mlx_flash.cache_simulator import neuron_replays

    make_checkpoint(tmp_path / "hf", "qwen2")
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    options = {"selector": "shadow", "fraction": 0.4, "gap": 1}
    free, _ = load(str(store), **options)
    model, _ = load(str(store), dram_budget=free.flash_plan.floor + 40_000, **options)
    traced_decoding(model, PROMPT, STEPS * 2)
    plan = model.flash_plan
    assert 0 < sum(plan.capacities) < sum(n.count for n in plan.layers)
    simulated = sum(
        replay.step(ids)
        for layer, replay in zip(model.layers, neuron_replays(model))
        for _, ids in layer.mlp.trace
    )
    assert simulated == model.flash_stats.bytes > 0

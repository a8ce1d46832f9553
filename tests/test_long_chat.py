"""Issue #16: a long conversation against the plan. Chat-like traffic (turns of a
user message, then a reply, one prompt cache for the whole conversation) for many
times the context the plan holds: the KV cache rotates at --max-kv-size (mlx-lm's
behaviour, the first 4 tokens kept), MLX's memory stays inside the DRAM plan, and
the logits equal those of an unbudgeted model on the same conversation (its first
turns: see below)."""

import mlx.core as mx
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache

from conftest import make_checkpoint
from mlx_flash import load
from mlx_flash.store.writer import convert

CONTEXT, TURNS, REPLY = 64, 12, 40


def reset_peak_rss() -> None:
    """Linux: VmHWM back to the current RSS (5 into clear_refs), where allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def status_bytes(key: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def message(turn):
    return [(turn * 7 + k) % 90 + 2 for k in range(12)]


def conversation(model):
    """The turns a greedy model holds: each a 12-token message and its reply."""
    cache, turns = make_prompt_cache(model), []
    for turn in range(TURNS):
        steps = generate_step(
            mx.array(message(turn)),
            model,
            max_tokens=REPLY,
            sampler=lambda l: mx.argmax(l, -1),
            prompt_cache=cache,
        )
        turns.append((message(turn), [int(t) for t, _ in steps]))
    return turns


def replay(model, turns):
    """The conversation fed to `model` (each message at once, each reply token by
    token, as decoding feeds them): every reply step's logits, and the cache."""
    cache, logits = make_prompt_cache(model), []
    for said, reply in turns:
        out = model(mx.array([said]), cache=cache)[:, -1]
        for t in reply:
            logits.append(out)
            out = model(mx.array([[t]]), cache=cache)[:, -1]
            mx.eval(out)
    return mx.concatenate(logits), cache


def test_a_long_conversation_rotates_and_stays_in_the_plan(tmp_path):
    make_checkpoint(tmp_path / "hf", "llama", num_hidden_layers=4)
    store = convert(tmp_path / "hf", tmp_path / "store", progress=False)
    free, _ = load(str(store), max_kv_size=CONTEXT)
    budget = free.flash_plan.floor + 60_000  # some neurons cached, not all
    model, _ = load(str(store), max_kv_size=CONTEXT, dram_budget=budget)
    plan = model.flash_plan
    assert 0 < sum(plan.capacities) < sum(n.count for n in plan.layers)
    turns = conversation(free)
    mx.synchronize()
    mx.reset_peak_memory()
    reset_peak_rss()
    got, cache = replay(model, turns)
    peak, peak_rss = mx.get_peak_memory(), status_bytes("VmHWM")
    total = TURNS * (12 + REPLY)
    assert total > 9 * CONTEXT  # many times the context the plan holds
    assert all(c.max_size == CONTEXT and c.keys.shape[2] <= CONTEXT for c in cache)
    assert all(c.offset == total for c in cache)  # every token through the cache
    assert peak <= plan.total, (peak, plan.total)
    # the process's peak: the budget + what the process held beside it at load
    if peak_rss is not None:
        assert peak_rss <= budget + sum(plan.outside.values()), (peak_rss, budget)
    # The first 5 turns (260 tokens: the context rotated 3 times) give the unbudgeted
    # model's logits. Later ones are not compared: past ~400 tokens a rotating
    # cache's results depend on the process's history even in mlx-lm alone (its own
    # model, fresh vs after generate_step: logits apart by ~0.2 from turn 8 on this
    # tiny random model; README, issue #16 section).
    expected, _ = replay(free, turns)
    early = 5 * REPLY
    assert mx.allclose(got[:early], expected[:early], atol=1e-4, rtol=1e-4)

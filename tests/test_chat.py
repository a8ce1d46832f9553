"""`mlx_flash.chat`: scripted sessions on stdin, the prompt cache, Ctrl-C."""

import io
import os
import re
import signal
import subprocess
import sys

import pytest
from conftest import make_checkpoint
from mlx_lm.generate import stream_generate

from mlx_flash import chat, convert, load
from mlx_flash.stats import FlashStats

QUERIES = ["the cat", "a dog ran far", "then it was big"]
REPLY, MAKE_CACHE = chat.reply, chat.make_prompt_cache
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]|[\x01\x02]")  # rich's colours and cursor


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat")
    make_checkpoint(tmp / "hf", "llama")
    return convert(tmp / "hf", tmp / "store", ffn_format="q8", progress=False)


@pytest.fixture
def session(store, monkeypatch, capsys):
    """Run a chat session on `queries` (stdin); return the turns and the output."""

    def run(queries, *flags):
        turns, caches = [], []

        def recorded_reply(model, tokenizer, prompt, cache, *args):
            response, outcome = REPLY(model, tokenizer, prompt, cache, *args)
            turns.append((len(prompt), response, outcome, caches[-1][0].offset, model))
            return response, outcome

        def recorded_cache(*args):
            caches.append(MAKE_CACHE(*args))
            return caches[-1]

        monkeypatch.setattr(chat, "reply", recorded_reply)
        monkeypatch.setattr(chat, "make_prompt_cache", recorded_cache)
        monkeypatch.setattr(
            "sys.stdin", io.StringIO("".join(q + "\n" for q in queries))
        )
        chat.main(["--model", str(store), "--max-tokens", "8", *flags])
        return turns, caches, ANSI.sub("", capsys.readouterr().out)

    return run


def test_three_turns_reuse_one_prompt_cache(session):
    turns, caches, out = session(QUERIES, "--stats")
    assert len(caches) == 1 and len(turns) == 3
    context = 0
    for n_prompt, response, outcome, offset, _ in turns:
        assert outcome == "done" and response.generation_tokens > 0
        # only this turn's tokens were processed: the rest came from the cache
        assert response.prompt_tokens == n_prompt
        context += n_prompt + response.generation_tokens
        assert offset == context
    assert [f"context {t[3]} tokens" in out for t in turns] == [True] * 3
    assert out.rstrip().endswith("bye")
    # --stats: this turn's decode steps, not the session's
    counts = [int(n) for n in re.findall(r"; (\d+) tokens; prefill", out)]
    assert len(counts) == 3 and max(counts) <= 8 + max(t[0] for t in turns)


def test_the_command_on_a_script(store):
    command = [sys.executable, "-m", "mlx_flash.chat", "--model", str(store), "-m", "4"]
    script = "".join(q + "\n" for q in QUERIES)
    run = subprocess.run(
        command, input=script, capture_output=True, text=True, check=True
    )
    out = ANSI.sub("", run.stdout)
    assert out.count("tokens · ") == 3 and out.rstrip().endswith("bye")


def interrupting(monkeypatch, after_tokens=None, in_prefill=False, escape=False):
    """Make the stream press Ctrl-C (SIGINT to ourselves), once, in the first turn."""
    pressed = []

    def ctrl_c():
        if not pressed:
            pressed.append(True)
            if escape:  # what a second Ctrl-C inside a layer looks like
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)

    def stream(*args, prompt_progress_callback, **kwargs):
        def progress(done, total):
            if in_prefill and done > 0:
                ctrl_c()
            prompt_progress_callback(done, total)

        for i, response in enumerate(
            stream_generate(*args, prompt_progress_callback=progress, **kwargs)
        ):
            if i + 1 == after_tokens:  # pressed while this token was computed
                ctrl_c()
            yield response

    monkeypatch.setattr(chat, "stream_generate", stream)


def test_ctrl_c_ends_the_reply_not_the_session(session, monkeypatch):
    interrupting(monkeypatch, after_tokens=3)
    turns, caches, out = session(QUERIES[:2])
    (n1, first, outcome1, offset1, _), (n2, second, outcome2, offset2, _) = turns
    assert (outcome1, first.generation_tokens) == ("stopped", 3)
    assert "interrupted" in out and "the reply so far stays" in out
    assert offset1 == n1 + 3  # the cache holds what was shown, as after any reply
    assert outcome2 == "done" and second.generation_tokens == 8
    assert offset2 == offset1 + n2 + 8 and len(caches) == 1
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_the_prefill_undoes_the_turn(session, monkeypatch):
    interrupting(monkeypatch, in_prefill=True)
    turns, _, out = session(QUERIES[1:], "--prefill-step-size", "1")
    assert [t[2] for t in turns] == ["undone", "done"]
    assert turns[0][3] == 0 and "the turn is undone" in out  # trimmed back
    assert turns[1][3] == turns[1][0] + turns[1][1].generation_tokens


def test_an_interrupt_inside_a_layer_rebuilds_the_caches(session, monkeypatch):
    fresh, _, _ = session(QUERIES[1:2], "--selector", "oracle")
    emptied = []
    monkeypatch.setattr(chat, "empty_neuron_caches", emptied.append)
    interrupting(monkeypatch, after_tokens=3, escape=True)
    turns, caches, out = session(QUERIES[:2], "--selector", "oracle")
    assert [t[2] for t in turns] == ["rebuild", "done"]
    assert "context cleared" in out and len(caches) == 2
    assert emptied == [turns[0][4]]  # the model's neuron caches
    # the next turn starts afresh, as the first turn of a new session
    assert turns[1][3] == turns[1][0] + turns[1][1].generation_tokens
    assert turns[1][1].text == fresh[0][1].text


def test_emptied_neuron_caches_hold_nothing(store):
    model, tokenizer = load(str(store), selector="oracle", progress=False)
    list(stream_generate(model, tokenizer, "the cat", max_tokens=4))
    assert all(layer.mlp._cache.cached_ids().size for layer in model.layers)
    chat.empty_neuron_caches(model)
    assert all(layer.mlp._cache.cached_ids().size == 0 for layer in model.layers)
    again = list(stream_generate(model, tokenizer, "the cat", max_tokens=4))
    assert len(again) == 4


def test_stats_since_counts_one_turn():
    before = FlashStats(tokens=3, bytes=10)
    before.seconds["io"] = 1.0
    now = FlashStats(tokens=5, bytes=30)
    now.seconds["io"] = 1.5
    delta = now.since(before)
    assert (delta.tokens, delta.bytes, delta.seconds["io"]) == (2, 20, 0.5)


def test_parser_has_mlx_lms_flags_and_ours():
    args = chat.setup_arg_parser().parse_args(
        ["--max-kv-size", "64", "--system-prompt", "be brief", "--temp", "0.7"]
        + ["--dram-budget", "0.5", "--selector", "oracle", "--window", "4"]
    )
    assert (args.max_kv_size, args.system_prompt, args.temp) == (64, "be brief", 0.7)
    assert (args.dram_budget, args.selector, args.window) == ("0.5", "oracle", 4)
    assert args.model is None and args.seed == 0

"""Issue #16, the load test's short version: 8 clients for a few seconds of mixed
requests (streamed and not, long and short, clients that leave, malformed bodies)
against a tiny model served in-process under a DRAM budget. Every request is
accounted for, the greedy reference stays `generate`'s, nothing leaks."""

import sys
import threading
from pathlib import Path

import mlx.core as mx
import pytest
from conftest import make_checkpoint
from mlx_lm.sample_utils import make_logits_processors

from mlx_flash import convert, generate, load
from mlx_flash.server import make_server, setup_arg_parser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from server_load import KINDS, REFERENCE, growth, process_sample, run_load  # noqa: E402

NO_EOS = {"2": -100}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    make_checkpoint(tmp / "hf", "llama")
    store = convert(tmp / "hf", tmp / "store", ffn_format="q8", progress=False)
    # the server's plan holds one earlier request's KV cache (--prompt-cache-size 1)
    free, _ = load(str(store), prompt_caches=1, progress=False)
    budget = str(free.flash_plan.floor + 200_000)  # some of the FFN streams
    args = ["--model", str(store), "--port", "0", "--dram-budget", budget]
    server = make_server(setup_arg_parser().parse_args(args))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    model, tokenizer = load(
        str(store), dram_budget=budget, prompt_caches=1, progress=False
    )
    bias = make_logits_processors({int(k): v for k, v in NO_EOS.items()})
    reference = generate(
        model, tokenizer, REFERENCE, max_tokens=8, logits_processors=bias
    )
    yield server, reference
    server.shutdown()
    server.server_close()
    thread.join()


def test_mixed_load_is_all_accounted_for(served):
    import os

    server, reference = served
    generator = server.response_generator
    before = len(generator.served)
    report = run_load(
        server.server_address[1],
        seconds=8,
        clients=8,
        reference=reference,
        sample=lambda: {
            **process_sample(os.getpid()),
            "mlx_mb": mx.get_active_memory() / 2**20,
        },
        no_eos=NO_EOS,
        long_words=40,  # inside the tiny plan's context (past it: a 400, tested apart)
    )
    sent, ok = sum(report.sent.values()), sum(report.ok.values())
    assert set(report.sent) == set(KINDS) and sent > 40, report.sent
    assert not report.errors and ok == sent, (report.errors, report.sent, report.ok)
    assert report.reference_mismatches == 0
    # the server's own record: every accepted request that reached its turn was
    # served whole or cut short when its client left; none is still pending
    served = generator.served[before:]
    accepted = sent - report.sent["bad"] - report.sent["leave_queue"]
    assert accepted <= len(served) <= sent - report.sent["bad"]
    assert generator.requests.qsize() == 0
    assert all(r.finished >= r.started >= r.arrived > 0 for r in served)
    s = report.samples
    assert growth(s, "fds") <= 2 and growth(s, "threads") <= 2, s
    assert report.after["fds"] <= s[0]["fds"] + 1, report.after  # all closed again
    assert report.after["threads"] <= s[0]["threads"] + 1, report.after
    plan = server.response_generator.model_provider.model.flash_plan
    kept = plan.fixed["prompt caches"]  # an earlier request's KV cache, planned
    assert kept > 0 and growth(s, "mlx_mb") * 2**20 <= kept + 100_000, s
    assert max(x["mlx_mb"] for x in s) * 2**20 <= plan.total


def test_the_plans_context_bounds_each_request(served):
    """No silent overrun: a prompt with no room left in the context the plan holds
    is refused with OpenAI's context_length_exceeded before generating; a reply
    that would pass the context's end stops there."""
    import http.client
    import json

    server, _ = served
    provider = server.response_generator.model_provider
    context, tokenizer = provider.context, provider.tokenizer
    assert context < 1 << 15  # the plan's, not the model's 32k

    def ask(words, max_tokens):
        prompt = " ".join(["cat"] * words)
        body = {"prompt": prompt, "max_tokens": max_tokens, "logit_bias": NO_EOS}
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
        conn.request("POST", "/v1/completions", body=json.dumps(body))
        r = conn.getresponse()
        return r.status, json.loads(r.read()), len(tokenizer.encode(prompt))

    status, body, n = ask(context + 10, 4)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert str(context) in body["error"]["message"]
    words = next(
        w
        for w in range(context, 0, -1)
        if len(tokenizer.encode(" ".join(["cat"] * w))) <= context - 3
    )
    status, body, n = ask(words, 50)
    assert status == 200
    assert body["usage"]["completion_tokens"] == context - n
    assert body["choices"][0]["finish_reason"] == "length"

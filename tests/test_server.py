"""`mlx_flash.server` with real clients (the `openai` package, curl) on loopback."""

import http.client
import itertools
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import make_checkpoint
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from mlx_lm.sample_utils import make_logits_processors

from mlx_flash import FlashError, convert, generate, load
from mlx_flash.server import main as server_main
from mlx_flash.server import make_server, setup_arg_parser

openai = pytest.importorskip("openai")

PROMPT = "the cat sat on the mat"
NO_EOS = {"2": -100}  # the tiny random model may end at once: keep it talking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("server")
    make_checkpoint(tmp / "hf", "llama")
    return convert(tmp / "hf", tmp / "store", ffn_format="q8", progress=False)


@pytest.fixture(scope="module")
def server(store):
    args = ["--model", str(store), "--port", "0"]
    server = make_server(setup_arg_parser().parse_args(args))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def client(server):
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    return openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=30)


def reference(store, prompt, n):
    """What mlx_flash.generate gives for the same prompt (a string or token ids)."""
    model, tokenizer = load(str(store), progress=False)
    bias = make_logits_processors({int(k): v for k, v in NO_EOS.items()})
    return generate(model, tokenizer, prompt, max_tokens=n, logits_processors=bias)


def post(server, path, body):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    conn.request("POST", path, body=body)
    response = conn.getresponse()
    if response.getheader("Content-type") == "text/event-stream":
        events = response.read().decode().split("\n\n")
        return response.status, [e for e in events if e.startswith("data: ")]
    return response.status, json.loads(response.read())


def test_openai_client_completions_streamed_and_not(server, client, store):
    (model,) = [m.id for m in client.models.list().data]
    assert model == str(store)
    text = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logit_bias=NO_EOS
    )
    assert text.choices[0].text == reference(store, PROMPT, 8)
    assert text.usage.completion_tokens == 8 and text.choices[0].finish_reason
    chunks = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, logit_bias=NO_EOS, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == text.choices[0].text

    messages = [{"role": "user", "content": "the cat"}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, logit_bias=NO_EOS
    )
    tokenizer = load(str(store), progress=False)[1]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat.choices[0].message.content == reference(store, ids, 8)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=8, logit_bias=NO_EOS, stream=True
    )
    deltas = [c.choices[0].delta.content for c in stream if c.choices]
    assert "".join(d for d in deltas if d) == chat.choices[0].message.content


@pytest.mark.parametrize(
    "kwargs, status, param, code",
    [
        ({"model": "gpt-4"}, 404, "model", "model_not_found"),
        ({"max_tokens": 10**9}, 400, "max_tokens", None),
        ({"prompt": "the cat " * 200}, 400, "prompt", "context_length_exceeded"),
        ({"temperature": -1}, 400, "temperature", None),
        ({"logit_bias": {"99999": 1}}, 400, None, None),
    ],
)
def test_bad_requests_get_an_openai_error(client, kwargs, status, param, code):
    kwargs = {"model": "default_model", "prompt": PROMPT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**kwargs)
    assert e.value.status_code == status
    error = e.value.response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        param,
        code,
    )


@pytest.mark.parametrize(
    "path, body, status",
    [
        ("/v1/completions", b'{"prompt": "the cat",', 400),  # malformed JSON
        ("/v1/completions", b"\xff\xfe", 400),
        ("/v1/completions", b'["a list"]', 400),
        ("/v1/completions", b'{"prompt": ["the", 7]}', 400),
        ("/v1/completions", b'{"prompt": ""}', 400),
        ("/v1/completions", b'{"prompt": "a", "stream_options": {}}', 400),
        ("/v1/completions", b'{"prompt": "a", "stop": 5}', 400),
        ("/v1/chat/completions", b'{"messages": "the cat"}', 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "tools": 7}', 400),
        (
            "/v1/chat/completions",
            (
                b'{"messages": [{"role": "user", "content": [{"type": "image_url", '
                b'"image_url": {"url": "http://127.0.0.1:9/x.png"}}]}]}'
            ),
            400,
        ),
        ("/v1/embeddings", b"{}", 404),
    ],
)
def test_nothing_a_client_sends_crashes_the_server(server, client, path, body, status):
    got, answer = post(server, path, body)
    assert got == status and set(answer["error"]) == {
        "message",
        "type",
        "param",
        "code",
    }
    # still healthy, still serving
    assert client.completions.create(model="default_model", prompt="a", max_tokens=2)


@pytest.mark.parametrize(
    "head, status",
    [
        (b"Content-Length: 999999999999", 413),  # refused before reading
        (b"Content-Type: application/json", 411),
        (b"Content-Length: 12abc", 411),
    ],
)
def test_bodies_that_are_not_read(server, head, status):
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\n" + head + b"\r\n\r\n")
    with sock.makefile("rb") as reply:
        assert reply.readline().split()[1] == str(status).encode()
        assert b'"error": {"message": ' in reply.read()
    sock.close()


def test_a_prompt_the_prompt_cache_holds_whole(client):
    """The server's prompt cache holds prompt + reply; asking exactly that next needs
    one token recomputed (mlx-lm's own sequential path fails there)."""
    ask = {"model": "default_model", "logit_bias": {"3": 100}}  # 3: "the"
    first = client.completions.create(prompt="a cat sat", max_tokens=1, **ask)
    assert first.choices[0].text == "the"
    again = client.completions.create(prompt="a cat sat the", max_tokens=2, **ask)
    assert again.usage.prompt_tokens_details.cached_tokens == 3
    assert again.choices[0].text == "the the"


def test_health_and_models(server, store):
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    for path, status in [
        ("/health", 200),
        (f"/v1/models/{store}", 200),
        ("/v1/models/gpt-4", 404),
        ("/nowhere", 404),
    ]:
        conn.request("GET", path)
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == status, path
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1])
    assert body["error"]["code"] == "unknown_url"


def test_a_burst_of_20_is_served_one_at_a_time_in_order_of_arrival(server, client):
    """The i-th client starts 15 ms after the (i-1)-th; a request takes longer than
    that, so they queue. The server records when each joined its queue (arrived),
    started and finished."""
    n, results, errors = 20, {}, []

    def ask(i):
        time.sleep(0.015 * i)
        try:
            r = client.completions.create(
                model="default_model",
                prompt=f"{PROMPT} {i}",
                max_tokens=24,
                logit_bias=NO_EOS,
            )
            results[i] = r.usage.completion_tokens
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    before = len(server.response_generator.served)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    assert not errors and results == {i: 24 for i in range(n)}
    served = server.response_generator.served[before:]
    assert sorted(r.prompt for r in served) == sorted(f"{PROMPT} {i}" for i in range(n))
    assert all(a.arrived < b.arrived for a, b in itertools.pairwise(served))
    assert all(a.finished <= b.started for a, b in itertools.pairwise(served))
    sent = [int(r.prompt.split()[-1]) for r in served]
    late = sum(a > b for a, b in itertools.pairwise(sent))  # a client thread's jitter
    waiting = [sum(r.arrived <= s.started < r.started for r in served) for s in served]
    assert max(waiting) >= 3, waiting  # it was a burst: requests did queue
    wait = [s.started - s.arrived for s in served]
    print(
        f"\n20 requests x 24 tokens: {wall:.2f} s wall, serving "
        f"{sum(s.finished - s.started for s in served):.2f} s, wait in queue "
        f"max {max(wait) * 1e3:.0f} ms, mean {sum(wait) / n * 1e3:.0f} ms, "
        f"queue depth max {max(waiting)}; {late} out of the order sent"
    )


def request(server, body: dict) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.server_address[1]))
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nContent-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def test_a_client_that_goes_away_frees_the_slot(server, client):
    generator = server.response_generator
    before = len(generator.served)

    def long(prompt, **kwargs):
        body = {"prompt": prompt, "max_tokens": 250, "logit_bias": NO_EOS, **kwargs}
        return request(server, body)

    streaming, received = long("the cat", stream=True), b""
    while b"data: " not in received:  # a token has come
        received += streaming.recv(4096)
    queued = long("the dog")
    while generator.requests.qsize() == 0:  # it waits behind the stream
        time.sleep(0.001)
    queued.close()  # gone before its turn
    streaming.close()  # gone mid-stream
    waiting = long("the mat")  # not streamed: gone while it is generated
    time.sleep(0.15)
    waiting.close()
    r = client.completions.create(
        model="default_model", prompt=PROMPT, max_tokens=4, logit_bias=NO_EOS
    )
    assert r.usage.completion_tokens == 4
    tokens = {s.prompt: s.tokens for s in generator.served[before:]}
    assert tokens["the dog"] == 0 and tokens[PROMPT] == 4, tokens
    # gone mid-stream: noticed at the first write that fails after the close (a few
    # tokens; more on a loaded machine: 10 seen with the benchmarks beside the suite)
    assert tokens["the cat"] < 25 and 0 < tokens["the mat"] < 250, tokens


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_the_command_with_curl(store):
    """`python -m mlx_flash.server` binds to localhost and stops on Ctrl-C."""
    command = [sys.executable, "-m", "mlx_flash.server", "--model", str(store)]
    process = subprocess.Popen(command + ["--port", "0"], stderr=subprocess.PIPE)
    try:
        line = b""
        while b"serving" not in line:
            line = process.stderr.readline()
        url = line.decode().split(" on ")[1].split(",")[0]
        assert url.startswith("http://127.0.0.1:")
        threading.Thread(target=process.stderr.read, daemon=True).start()  # drain

        def curl(*args):
            command = ["curl", "-sS", "--max-time", "30", *args]
            return subprocess.run(command, capture_output=True, text=True, check=True)

        assert json.loads(curl(url + "/health").stdout) == {"status": "ok"}
        body = {"messages": [{"role": "user", "content": "the cat"}], "max_tokens": 6}
        body["logit_bias"] = NO_EOS
        once = curl(url + "/v1/chat/completions", "-d", json.dumps(body))
        text = json.loads(once.stdout)["choices"][0]["message"]["content"]
        body["stream"] = True
        stream = curl("-N", url + "/v1/chat/completions", "-d", json.dumps(body))
        events = [e for e in stream.stdout.split("\n\n") if e.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:])["choices"][0]["delta"] for e in events[:-1]]
        assert "".join(c.get("content", "") for c in chunks) == text
        bad = curl("-w", "%{http_code}", url + "/v1/completions", "-d", "{")
        assert bad.stdout.endswith("400") and '"invalid_json"' in bad.stdout
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0


def test_a_model_that_cannot_load_stops_the_command(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        server_main(["--model", str(tmp_path / "absent"), "--port", "0"])
    assert e.value.code == 2 and "absent" in capsys.readouterr().err
    with pytest.raises(FlashError):
        make_server(setup_arg_parser().parse_args(["--model", str(tmp_path)]))


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-3, 300)
    | st.floats()
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | JSON},
    optional={"content": st.text(max_size=12) | JSON},
)
FIELDS = {  # each a plausible value or any JSON at all
    "messages": st.lists(MESSAGE, min_size=1, max_size=3),
    "prompt": st.text(max_size=12),
    "stream": st.booleans(),
    "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "logit_bias": st.dictionaries(st.integers(-2, 70).map(str), st.floats(-5, 5)),
    "logprobs": st.booleans(),
    "top_logprobs": st.integers(-1, 12),
    "seed": st.integers(-1, 5),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "model": st.just("default_model"),
    "tools": st.none(),
    "chat_template_kwargs": st.none(),
    "role_mapping": st.none(),
    "repetition_penalty": st.floats(0, 2),
}
VALID = st.fixed_dictionaries({"max_tokens": st.integers(1, 3)}, optional=FIELDS)


@st.composite
def bodies(draw):
    """A plausible request with one field, sometimes, any JSON at all."""
    body = draw(VALID)
    key = draw(st.sampled_from([None, "max_tokens", *FIELDS]))
    return body if key is None else {**body, key: draw(JSON)}


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), body=bodies())
def test_fuzzed_requests_get_an_answer_below_500(server, path, body):
    status, answer = post(server, path, json.dumps(body).encode())
    event(str(status))
    assert status < 500, (status, answer)
    if status != 200:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    elif isinstance(answer, list):  # streamed
        assert answer[-1] == "data: [DONE]"

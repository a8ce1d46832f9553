"""`python -m mlx_flash.server`: mlx-lm's OpenAI-compatible server on a flash model.

mlx-lm's parser, request handler, prompt cache and generation thread serve its API:
`/v1/chat/completions`, `/v1/completions` (streamed as server-sent events or not),
`/v1/models`, `/health`. What changes:

- the one model is loaded by our `load`, with the flash options, before serving;
- requests are served one at a time, in order of arrival, never batched (the neuron
  cache is per process): the others wait in mlx-lm's queue, they do not fail;
- a client that goes away, queued or mid-reply, frees the slot at the next token;
- a bad request (malformed JSON, unknown model, absurd `max_tokens`, a prompt longer
  than `--max-prompt-tokens`) gets OpenAI's error object with a 4xx status.
"""

import argparse
import copy
import io
import json
import logging
import socket
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path
from queue import Queue
from threading import Event
from typing import Any

import mlx.core as mx
import mlx_lm.server as mlx_server
from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache
from mlx_lm.server import APIHandler, CompletionRequest, GenerationContext, Response
from mlx_lm.utils import load as mlx_load

from .chat import MODEL_HELP
from .default_model import default_model_path
from .blas import prefer_fast_blas
from .errors import FlashError, exit_on_error
from .generate import load_kwargs
from .options import add_flash_args
from .server_checks import (
    MAX_BODY_BYTES,
    APIError,
    _no_constant,
    check_body,
    client_gone,
)
from .utils import load

log = logging.getLogger(__name__)
COMPLETIONS = ("/v1/completions", "/v1/chat/completions", "/chat/completions")


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx-lm's server parser, with the flash options, our limits and default model."""
    parser = _mlx_server_parser()
    parser.description = (
        "OpenAI-compatible server, FFN streamed from the SSD (mlx_flash)"
    )
    parser._option_string_actions["--model"].help = MODEL_HELP
    limits = parser.add_argument_group("limits (default: the model's context length)")
    limits.add_argument("--max-prompt-tokens", type=int, help="Refuse longer prompts")
    limits.add_argument("--max-tokens-limit", type=int, help="Refuse more max_tokens")
    add_flash_args(parser)
    cache = parser._option_string_actions["--prompt-cache-size"]
    cache.default = 1  # mlx-lm keeps 10: each is a whole KV cache in the DRAM plan
    cache.help = (
        "Earlier requests' KV caches kept to reuse their prefix (default 1; each "
        "holds the plan's whole context and counts in the DRAM plan)"
    )
    parser._option_string_actions["--prompt-caches"].help = argparse.SUPPRESS
    return parser


class _Parser(Exception):
    pass


def _mlx_server_parser() -> argparse.ArgumentParser:
    """`mlx_lm.server` builds its parser in `main` and parses at once: take it there."""

    def capture(parser, *args, **kwargs):
        raise _Parser(parser)

    parse_args = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        mlx_server.main()
    except _Parser as e:
        return e.args[0]
    finally:
        argparse.ArgumentParser.parse_args = parse_args
    raise RuntimeError("mlx_lm.server.main did not parse arguments")


class _Refusal(BaseException):
    """Carries an APIError past mlx-lm's handler, which would answer any Exception
    with a bare 404, to `do_POST`."""


@dataclass
class TrackedRequest(CompletionRequest):
    """mlx-lm's request with its client's socket and its times (`perf_counter`)."""

    connection: Any = None
    arrived: float = 0.0  # joined the queue
    started: float = 0.0
    finished: float = 0.0
    tokens: int = 0  # generated


class FlashModelProvider(mlx_server.ModelProvider):
    """mlx-lm's model provider for the server's one model, loaded by our `load`."""

    def __init__(self, cli_args):
        given = cli_args.model
        cli_args.model = given or str(default_model_path())
        super().__init__(cli_args)
        self.model_id = given or Path(cli_args.model).stem  # what /v1/models lists
        self.names = {"default_model", self.model_id, cli_args.model}
        if Path(cli_args.model).exists():
            self.names.add(str(Path(cli_args.model).resolve()))
        self.loaded, self.load_error = Event(), None
        self.max_prompt_tokens = self.max_tokens_limit = self.vocab_size = None
        self.context = None  # tokens of context the KV cache holds

    def load_default(self):
        try:
            super().load_default()
        except Exception as e:  # noqa: BLE001 (main() reports it)
            self.load_error = e
        finally:
            self.loaded.set()

    def load(self, model_path, adapter_path=None, draft_model_path=None):
        # Requests were checked to name this model: never load another.
        return super().load("default_model", None, "default_model")

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        self.reset()
        a = self.cli_args
        model, tokenizer, config = load(
            model_path,
            adapter_path=adapter_path,
            tokenizer_config=self._tokenizer_config,
            return_config=True,
            trust_remote_code=a.trust_remote_code,
            options=replace(
                load_kwargs(a)["options"], prompt_caches=a.prompt_cache_size
            ),
        )
        if a.use_default_chat_template and tokenizer.chat_template is None:
            tokenizer.chat_template = tokenizer.default_chat_template
        draft_model = None
        if draft_model_path is not None:  # an ordinary dense mlx-lm model
            draft_model, draft_tokenizer = mlx_load(draft_model_path)
            if draft_tokenizer.vocab_size != tokenizer.vocab_size:
                raise FlashError("the draft model's tokenizer does not match")
        context = config.get("max_position_embeddings", 1 << 15)
        # without --max-kv-size the KV cache holds the plan's context, no more
        self.context = min(context, getattr(model, "flash_context", context))
        context = self.context
        self.vocab_size = config.get("vocab_size", tokenizer.vocab_size)
        self.max_prompt_tokens = a.max_prompt_tokens or context
        self.max_tokens_limit = a.max_tokens_limit or context
        self.model_key = (model_path, adapter_path, draft_model_path)
        self.model, self.tokenizer, self.draft_model = model, tokenizer, draft_model
        self.is_batchable = False  # one request at a time: one neuron cache


class FlashResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generation thread, serving one request at a time in arrival order."""

    def __init__(self, model_provider, prompt_cache):
        self.served: list[TrackedRequest] = []  # in the order served
        super().__init__(model_provider, prompt_cache)
        self.requests = _ArrivalQueue()  # before any request: the server is not up

    def _run_generate(self):
        try:
            super()._run_generate()
        finally:  # else the process may abort as it exits (ml-explore/mlx#3126)
            mx.clear_streams()

    def _tokenize(self, tokenizer, request, args):
        try:
            tokenized = super()._tokenize(tokenizer, request, args)
        except Exception as e:  # the request's messages, tools or template arguments
            raise APIError(400, f"cannot build the prompt: {e}") from e
        n, limit = len(tokenized[0]), self.model_provider.max_prompt_tokens
        if n == 0:
            raise APIError(400, "the prompt is empty")
        param = "messages" if request.request_type == "chat" else "prompt"
        if n > limit:
            message = f"the prompt has {n} tokens, more than this server's {limit}"
            raise APIError(400, message, param, "context_length_exceeded")
        context = self.model_provider.context
        if n >= context:  # no room for one token: refused now, not while generating
            message = (
                f"the prompt has {n} tokens; this server's DRAM plan holds a context "
                f"of {context} (start it with --max-kv-size N for a rotating context, "
                "or a larger --dram-budget)"
            )
            raise APIError(400, message, param, "context_length_exceeded")
        # the reply stops where the context ends (finish_reason "length")
        args.max_tokens = min(args.max_tokens, context - n)
        return tokenized

    def _serve_single(self, request, stream):
        rqueue, tracked, args = request
        tracked.started = time.perf_counter()
        if client_gone(tracked.connection):
            rqueue.put(APIError(499, "the client closed the request"))
        else:
            stats = copy.deepcopy(self.model_provider.model.flash_stats)
            super()._serve_single((_Watched(rqueue, tracked), tracked, args), stream)
            if self.cli_args.stats:
                now = self.model_provider.model.flash_stats
                log.info(now.since(stats).summary())
        tracked.finished = time.perf_counter()
        self.served.append(tracked)

    def generate(self, request, generation_args, progress_callback=None):
        try:
            return super().generate(request, generation_args, progress_callback)
        except APIError as e:
            raise _Refusal(e) from None
        except RuntimeError as e:  # the generation thread died
            raise _Refusal(APIError(503, str(e))) from None
        except Exception as e:  # noqa: BLE001 (a server error, reported to the client)
            raise _Refusal(APIError(500, f"{type(e).__name__}: {e}")) from None


class _PromptCache(LRUPromptCache):
    """mlx-lm's prompt cache, never matching a whole prompt: generating needs at least
    one new token (mlx-lm's sequential path fails on an exact match)."""

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        if cache is None or rest:
            return cache, rest
        if not can_trim_prompt_cache(cache):
            return None, tokens
        trim_prompt_cache(cache, 1)  # a copy of the stored cache
        return cache, tokens[-1:]


class _ArrivalQueue(Queue):
    """mlx-lm's request queue (first in, first out), stamping each request's arrival
    under the queue's lock: the stamps are in queue order."""

    def _put(self, item):
        item[1].arrived = time.perf_counter()
        super()._put(item)


class _Watched:
    """A request's response queue that watches its client: once the client has gone,
    the generation stops at the next token (mlx-lm's own `ctx.stop`)."""

    def __init__(self, queue, request: TrackedRequest):
        self.queue, self.request, self.ctx = queue, request, None

    def put(self, item):
        if isinstance(item, GenerationContext):
            self.ctx = item
        elif isinstance(item, Response):
            self.request.tokens += 1
            if self.ctx is not None and client_gone(self.request.connection):
                self.ctx.stop()
        self.queue.put(item)


class FlashAPIHandler(APIHandler):
    """mlx-lm's handler, refusing bad requests with OpenAI's error object."""

    _headers_sent = False

    def do_POST(self):
        try:
            self._check_request()
            super().do_POST()
        except APIError as e:
            self._send(e.status, e.body())
        except _Refusal as r:
            self._send(r.args[0].status, r.args[0].body())
        except ConnectionError:
            raise  # the client went away: no one to answer
        except Exception as e:  # a server error while replying: logged
            log.exception("error while replying")
            error = APIError(500, f"{type(e).__name__}: {e}")
            if self._headers_sent:  # streaming: the status has gone already
                self.wfile.write(b"data: " + error.body() + b"\n\n")
            else:
                self._headers_buffer = []
                self._send(error.status, error.body())

    def end_headers(self):
        self._headers_sent = True
        super().end_headers()

    def _send(self, status: int, body: bytes):
        self._set_completion_headers(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _check_request(self):
        """Everything mlx-lm's handler or generation thread would take badly."""
        if self.path not in COMPLETIONS:
            raise APIError(404, f"no endpoint POST {self.path}", code="unknown_url")
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise APIError(411, "a Content-Length header is required")
        if int(length) > MAX_BODY_BYTES:
            raise APIError(413, f"the body exceeds {MAX_BODY_BYTES} bytes")
        raw = self.rfile.read(int(length))
        self.rfile = io.BytesIO(raw)  # for mlx-lm's handler to read again
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json")
        check_body(body, self.path, self.response_generator.model_provider)

    def validate_model_parameters(self):
        try:
            super().validate_model_parameters()
        except ValueError as e:
            raise APIError(400, str(e), param=str(e).split(" ")[0]) from None
        limit = self.response_generator.model_provider.max_tokens_limit
        if "max_tokens" not in self.body and "max_completion_tokens" not in self.body:
            self.max_tokens = min(self.max_tokens, limit)
        elif self.max_tokens > limit:
            message = f"max_tokens is {self.max_tokens}; this server allows {limit}"
            raise APIError(400, message, param="max_tokens")
        if self.seed is not None and not 0 <= self.seed < 1 << 64:
            raise APIError(400, "seed must be from 0 to 2**64 - 1", param="seed")
        vocab = self.response_generator.model_provider.vocab_size
        if any(not 0 <= t < vocab for t in self.logit_bias or {}):
            raise APIError(400, f"logit_bias: token ids go from 0 to {vocab - 1}")

    def handle_chat_completions(self):
        return self._tracked(super().handle_chat_completions())

    def handle_text_completions(self):
        return self._tracked(super().handle_text_completions())

    def _tracked(self, request: CompletionRequest) -> TrackedRequest:
        return TrackedRequest(**vars(request), connection=self.connection)

    def do_GET(self):
        path = self.path.split("?")[0].rstrip("/")
        provider = self.response_generator.model_provider
        model = {"id": provider.model_id, "object": "model", "created": self.created}
        model["owned_by"] = "mlx_flash"
        if path == "/health":
            self.handle_health_check()
        elif path == "/v1/models":
            self._send(200, json.dumps({"object": "list", "data": [model]}).encode())
        elif path.startswith("/v1/models/") and path[11:] in provider.names:
            self._send(200, json.dumps(model).encode())
        else:
            code = (
                "model_not_found" if path.startswith("/v1/models/") else "unknown_url"
            )
            e = APIError(404, f"no such model or endpoint: {path}", code=code)
            self._send(e.status, e.body())


class FlashHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server whose requests queue for the one generation thread."""

    daemon_threads = True
    request_queue_size = 128  # a burst of clients waits in the backlog, not refused

    def __init__(self, host: str, port: int, handler, response_generator):
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self.address_family, address = info[0], info[4]
        self.response_generator = response_generator
        super().__init__(address, handler)

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], ConnectionError):
            log.info(f"{client_address[0]} went away")
        else:
            super().handle_error(request, client_address)

    def server_close(self):
        super().server_close()
        self.response_generator.stop_and_join()


def make_server(args) -> FlashHTTPServer:
    """Load the model (in the generation thread, as mlx-lm does) and bind the socket;
    `serve_forever` serves, `shutdown` and `server_close` stop."""
    provider = FlashModelProvider(args)
    # the prompt cache keeps what the DRAM plan holds (`prompt_caches`): at most
    # --prompt-cache-size earlier requests' KV caches, each the plan's whole context
    generator = FlashResponseGenerator(provider, _PromptCache(args.prompt_cache_size))
    provider.loaded.wait()
    if provider.load_error is not None:
        generator.stop_and_join()
        raise provider.load_error
    fingerprint = mlx_server.get_system_fingerprint()
    handler = partial(FlashAPIHandler, generator, system_fingerprint=fingerprint)
    return FlashHTTPServer(args.host, args.port, handler, generator)


def main(argv=None):
    if argv is None:  # a command, not a call from Python
        prefer_fast_blas(hint=False)
    args = setup_arg_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s - %(levelname)s - %(message)s",
    )
    with exit_on_error():
        server = make_server(args)
    host, port = server.server_address[:2]
    model = server.response_generator.model_provider.model_id
    log.info(f"serving {model} on http://{host}:{port}, one request at a time")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()

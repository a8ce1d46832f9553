"""The server's request checks: what a client may send, OpenAI's error object for
what it may not, and whether it is still there."""

import json
import socket

MAX_BODY_BYTES = 16 << 20


class APIError(Exception):
    """A refused request: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param=None, code=None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> bytes:
        kind = "server_error" if self.status >= 500 else "invalid_request_error"
        error = {"message": str(self), "type": kind, "param": self.param}
        return json.dumps({"error": {**error, "code": self.code}}).encode()


def client_gone(connection) -> bool:
    """Whether the client closed its end: the socket reads end-of-file at once."""
    if connection is None:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:  # open, nothing to read
        return False
    except OSError:
        return True


def check_body(body, path: str, provider) -> None:
    """Raise an APIError for a request body mlx-lm would not answer with a 4xx."""
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    model = body.get("model", "default_model")
    if not isinstance(model, str) or model not in provider.names:
        message = f"this server serves {provider.model_id!r} only"
        raise APIError(404, message, "model", "model_not_found")
    for key, default in (("adapters", None), ("draft_model", "default_model")):
        if body.get(key, default) != default:
            raise APIError(400, f"{key} cannot be chosen per request", key)
    options = body.get("stream_options")
    if options is not None and not (
        isinstance(options, dict) and isinstance(options.get("include_usage"), bool)
    ):
        raise APIError(400, "stream_options needs include_usage", "stream_options")
    stop = body.get("stop") or []
    if not isinstance(stop, str) and not _list_of(stop, str):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if path == "/v1/completions":
        if not isinstance(body.get("prompt"), str):
            raise APIError(400, "prompt must be a string", "prompt")
        return
    messages = body.get("messages")  # the template checks them; mlx-lm reads images
    if not messages or not _list_of(messages, dict):
        raise APIError(400, "messages must be a non-empty list of objects", "messages")
    content = [m.get("content") for m in messages]
    parts = [p for c in content if isinstance(c, list) for p in c]
    if not all(isinstance(p, dict) and p.get("type") == "text" for p in parts):
        raise APIError(400, "this server takes text content only", "messages")


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _list_of(value, kind) -> bool:
    return isinstance(value, list) and all(isinstance(v, kind) for v in value)

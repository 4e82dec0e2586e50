"""Serve's own HTTP answers (uvicorn's protocol errors, the proxy's 5xx/404) in the error envelope."""

from __future__ import annotations

import asyncio
import json

import pytest

from livelens.serving import proxy_hooks


def _run(app) -> list[dict]:
    out: list[dict] = []

    async def send(message: dict) -> None:
        out.append(message)

    asyncio.run(proxy_hooks.EnvelopeMiddleware(app)({"type": "http"}, None, send))
    return out


def _plain(status: int, chunks: list[bytes]):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"x-request-id", b"rid-1")]})
        for i, c in enumerate(chunks):
            await send({"type": "http.response.body", "body": c, "more_body": i < len(chunks) - 1})
    return app


def test_a_plain_proxy_500_becomes_a_503_to_retry_in_the_envelope():
    start, body = _run(_plain(500, [b"ray.exceptions.ActorDiedError: The actor died ", b"unexpectedly"]))
    assert start["status"] == 503
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    doc = json.loads(body["body"])
    assert doc == {"error": {"type": "usage_limit", "code": "replica_unavailable",
                             "message": "the serving replica was lost while answering; retry"},
                   "request_id": "rid-1"}
    assert int(headers[b"content-length"]) == len(body["body"])
    assert "ActorDiedError" not in body["body"].decode()  # no internals leak to the client


def test_an_exception_before_any_answer_is_a_503_and_after_one_it_propagates():
    async def dies(scope, receive, send):
        raise RuntimeError("ActorDiedError: the gateway replica was killed")

    async def silent(scope, receive, send):
        return None  # the proxy gave up on a dead replica without a word

    for app in (dies, silent):
        start, body = _run(app)
        assert start["status"] == 503 and json.loads(body["body"])["error"]["code"] == "replica_unavailable"

    async def dies_late(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("mid-stream")

    with pytest.raises(RuntimeError, match="mid-stream"):
        _run(dies_late)


def test_a_plain_404_keeps_its_status_and_json_answers_pass_untouched():
    start, body = _run(_plain(404, [b"Path '/nope' not found."]))
    doc = json.loads(body["body"])
    assert start["status"] == 404 and doc["error"]["type"] == "not_found" and "/nope" in doc["error"]["message"]

    async def gateway(scope, receive, send):
        await send({"type": "http.response.start", "status": 422, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"error": {}}', "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    out = _run(gateway)
    assert [m.get("status") for m in out] == [422, None, None] and out[1]["body"] == b'{"error": {}}'


@pytest.mark.parametrize("module", ["h11_impl", "httptools_impl"])
def test_install_patches_uvicorns_400_to_write_the_envelope(module, monkeypatch):
    import importlib

    mod = importlib.import_module(f"uvicorn.protocols.http.{module}")
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("Protocol") and hasattr(getattr(mod, n), "send_400_response"))
    monkeypatch.setattr(cls, "send_400_response", cls.send_400_response)  # restored after the test
    middlewares = proxy_hooks.install()
    assert [m.cls for m in middlewares] == [proxy_hooks.EnvelopeMiddleware]

    class Transport:
        data, closed = b"", False

        def write(self, b: bytes) -> None:
            self.data += b

        def close(self) -> None:
            self.closed = True

    proto = cls.__new__(cls)
    proto.transport = Transport()
    cls.send_400_response(proto, "Invalid HTTP request received.")
    head, _, body = proto.transport.data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and proto.transport.closed
    doc = json.loads(body)
    assert doc["error"]["code"] == "bad_http_request" and f"x-request-id: {doc['request_id']}".encode() in head
    assert f"content-length: {len(body)}".encode() in head

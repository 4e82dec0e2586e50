"""Make the answers Serve's HTTP layer writes itself use livelens's error envelope.

Two kinds of answer never come from the gateway's code:

- A request that is not HTTP at all (a bad request line, a header without a colon, a broken
  chunk) never reaches an ASGI app: uvicorn answers it with a plain-text ``400 Invalid HTTP
  request received.``.
- When the gateway replica dies mid-request, or no replica is there, Serve's proxy answers with a
  plain-text 500 carrying the Ray exception, or 404 for a path no app serves.

Clients that parse every error as ``{"error": {...}, "request_id"}`` then fail on exactly the
answers they most need to read, and a 500 says "our bug" where the truth is "retry".

Ray Serve calls :func:`install` in every process that runs its uvicorn (the proxy, and each
ingress replica under direct ingress) when ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` names it
in the raylet's environment (``serve_apps.common.SERVE_MODES`` puts it there). It swaps the
``send_400_response`` of each uvicorn HTTP protocol for one that writes the envelope, and returns
:class:`EnvelopeMiddleware`, which rewrites the proxy's own non-JSON errors: a 5xx becomes a
``503 replica_unavailable`` with ``Retry-After``, a 4xx keeps its status.
"""

from __future__ import annotations

import importlib
import json
import logging
from typing import Any

from livelens.errors import InvalidArgumentError, LivelensError, OverloadedError
from livelens.serving.envelope import REQUEST_ID_HEADER, error_body, new_request_id

logger = logging.getLogger(__name__)

#: The value ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` takes.
IMPORT_PATH = "livelens.serving.proxy_hooks.install"

# uvicorn's HTTP/1 protocol implementations that answer malformed requests themselves.
_PROTOCOL_MODULES = (
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.protocols.http.httptools_impl",
    "uvicorn.protocols.http.zttp_impl",
)


def protocol_error_response(message: str) -> bytes:
    """The whole HTTP/1.1 answer (status line, headers, JSON body) to a malformed request.

    Args:
        message: uvicorn's description of what was wrong (ASCII, no request data in it).

    Returns:
        Raw bytes to write to the socket before closing it.
    """
    request_id = new_request_id()
    err = InvalidArgumentError(f"malformed HTTP request: {message}", code="bad_http_request")
    body = json.dumps(error_body(err, request_id)).encode()
    head = (
        "HTTP/1.1 400 Bad Request\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"{REQUEST_ID_HEADER.lower()}: {request_id}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _send_400_response(self: Any, msg: str) -> None:
    # Every protocol class keeps its asyncio transport as `self.transport`; writing raw bytes
    # there bypasses h11's state machine, which is fine because the connection closes next.
    self.transport.write(protocol_error_response(str(msg)))
    self.transport.close()


class ProxyRefusedError(LivelensError):
    """A 4xx the proxy wrote itself (mostly 404: no application serves the path)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message, code="not_found" if status == 404 else "bad_request")
        self.type = "not_found" if status == 404 else "invalid_argument"
        self.http_status = status


def _rewritten(status: int, text: str) -> tuple[int, LivelensError, list[tuple[bytes, bytes]]]:
    if status >= 500:
        # The proxy's own 5xx means the replica that held the request died or none is up yet:
        # nothing in the request was wrong, and the same request succeeds once one is back.
        err = OverloadedError("the serving replica was lost while answering; retry", code="replica_unavailable")
        return 503, err, [(b"retry-after", b"1")]
    return status, ProxyRefusedError(text.strip()[:200] or "refused by the HTTP proxy", status), []


class EnvelopeMiddleware:
    """ASGI middleware for Serve's proxy: its own non-JSON error answers get the envelope.

    Answers from the gateway are JSON (errors included) and pass through untouched, streamed as
    they come; only a plain-text error is held back (it is short) and replaced.

    Args:
        app: The proxy's ASGI app.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        held: dict[str, Any] = {}
        started = False

        async def send_wrapped(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = dict(message.get("headers") or [])
                ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
                if message["status"] >= 400 and ctype != b"application/json":
                    held.update(start=message, body=b"", request_id=headers.get(b"x-request-id", b"").decode())
                    return
            elif message["type"] == "http.response.body" and "start" in held:
                held["body"] += message.get("body", b"")
                if message.get("more_body"):
                    return
                status, err, extra = _rewritten(held["start"]["status"], held["body"].decode("utf-8", "replace"))
                request_id = held["request_id"] or new_request_id()
                body = json.dumps(error_body(err, request_id)).encode()
                await send({"type": "http.response.start", "status": status,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (REQUEST_ID_HEADER.lower().encode(), request_id.encode()), *extra]})
                await send({"type": "http.response.body", "body": body})
                return
            await send(message)

        try:
            await self.app(scope, receive, send_wrapped)
        except Exception:
            if started:
                raise
            logger.warning("request failed in the proxy; answered 503 to retry", exc_info=True)
        if not started:
            # When the replica holding the request dies, the proxy can end the request without
            # any answer (or with an exception), and uvicorn then writes its own plain-text
            # "Internal Server Error". The request did nothing wrong: a 503 to retry.
            await send_wrapped({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", b"text/plain")]})
            await send_wrapped({"type": "http.response.body", "body": b"no answer from the proxy"})


def install() -> list:
    """Patch uvicorn's protocol-error answers in this process; Serve's callback entry point.

    Returns:
        The Starlette middleware list Serve adds to its HTTP app: :class:`EnvelopeMiddleware`.
    """
    from starlette.middleware import Middleware

    patched = []
    for name in _PROTOCOL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # an optional parser (httptools) or a uvicorn without this module
            continue
        for attr in dir(module):
            cls = getattr(module, attr)
            if isinstance(cls, type) and attr.endswith("Protocol") and hasattr(cls, "send_400_response"):
                cls.send_400_response = _send_400_response
                patched.append(f"{name}.{attr}")
    logger.info("livelens: protocol errors answered in the envelope by %s", ", ".join(patched) or "nothing")
    return [Middleware(EnvelopeMiddleware)]

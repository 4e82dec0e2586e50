"""Python client of the livelens HTTP API.

    from livelens.client import Client
    c = Client("http://127.0.0.1:8000", api_key="ll_...")
    result = c.analyze("frame.jpg")
    for path, res in c.analyze_folder("frames/"):
        ...

Errors come back as :class:`ApiError` carrying the envelope's type, code, message, HTTP status and
request id; 503 and 429 answers are retried after their ``Retry-After``. No answer at all (wrong
URL, service down) is a :class:`ServiceUnreachableError`. ``LIVELENS_URL`` and ``LIVELENS_API_KEY``
give the defaults of ``base_url`` and ``api_key``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from livelens.errors import InvalidArgumentError, LivelensError, OverloadedError, unwrap

# The server's own check: ids it would refuse, or that a URL would rewrite (``demo/../x`` → ``x``),
# are refused before anything is sent.
from livelens.serving.streams import check_stream_id

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
DEFAULT_URL = "http://127.0.0.1:8000"
ROUTES = {"analyze": "/v1/analyze", "moderate": "/v1/moderate", "ocr": "/v1/ocr", "quality": "/v1/quality"}


class ApiError(LivelensError):
    """An error answer of the service (its envelope, with the HTTP status and request id)."""

    def __init__(self, status: int, type_: str, code: str, message: str, request_id: str | None):
        super().__init__(f"{status} {type_}/{code}: {message} (request {request_id})", code=code)
        self.type, self.http_status, self.request_id, self.detail = type_, status, request_id, message

    def to_dict(self) -> dict[str, str]:
        """The service's ``error`` object, as it was sent."""
        return {"type": self.type, "code": self.code, "message": self.detail}


class ServiceUnreachableError(LivelensError):
    """No answer at all: the URL is wrong, the service is not running, or the network is in the way."""

    type = "unreachable"
    code = "unreachable"

    def __init__(self, url: str, exc: BaseException):
        reason = str(exc).strip() or type(exc).__name__
        super().__init__(f"cannot reach {url} ({type(exc).__name__}: {reason[:200]}); is the service running "
                         "(`make run`), and are --url / LIVELENS_URL right?", code="unreachable")
        self.url = url


def _content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
            ".bmp": "image/bmp", ".gif": "image/gif"}.get(suffix, "application/octet-stream")


class Client:
    """A synchronous client.

    Args:
        base_url: The service URL (``make run`` prints it); default ``$LIVELENS_URL``, then
            ``http://127.0.0.1:8000``.
        api_key: The key; default ``$LIVELENS_API_KEY``.
        timeout_s: Per-request timeout.
        retries: How often 503/429 answers are retried (after their Retry-After).
    """

    def __init__(self, base_url: str | None = None, api_key: str | None = None,
                 timeout_s: float = 60.0, retries: int = 3):
        base_url = base_url or os.environ.get("LIVELENS_URL") or DEFAULT_URL
        self.base_url = base_url.rstrip("/")
        key = api_key or os.environ.get("LIVELENS_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retries = retries
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                r = self._http.request(method, path, **kw)
            except httpx.TransportError as exc:
                raise ServiceUnreachableError(self.base_url, exc) from None
            if r.status_code in (429, 503) and attempt < self.retries:
                time.sleep(min(30.0, float(r.headers.get("retry-after", 1))))
                continue
            break
        try:
            body = r.json()
        except ValueError:
            body = {}
        if r.status_code >= 400:
            err = body.get("error") or {}
            raise ApiError(r.status_code, err.get("type", "http_error"), err.get("code", str(r.status_code)),
                           err.get("message", r.text[:300]), body.get("request_id") or r.headers.get("x-request-id"))
        return body

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/healthz")

    def models(self) -> dict[str, Any]:
        return self._request("GET", "/v1/models")

    def taxonomy(self) -> dict[str, Any]:
        """Categories and labels (what ``categories=`` accepts), with the live thresholds."""
        return self._request("GET", "/v1/taxonomy")

    @staticmethod
    def _params(evidence: str = "boxes", min_confidence: float | None = None,
                categories: Sequence[str] | str | None = None, model: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"evidence": evidence}
        if min_confidence is not None:
            params["min_confidence"] = min_confidence
        if categories:
            params["categories"] = categories if isinstance(categories, str) else ",".join(categories)
        if model:
            params["model"] = model
        return params

    def _post_image(self, route: str, image: str | Path | bytes, evidence: str = "boxes",
                    name: str = "frame.jpg", *, min_confidence: float | None = None,
                    categories: Sequence[str] | str | None = None, model: str | None = None) -> dict[str, Any]:
        if isinstance(image, str | Path):
            name, data = Path(image).name, Path(image).read_bytes()
        else:
            data = bytes(image)
        files = {"file": (name, data, _content_type(name))}
        return self._request("POST", route, files=files,
                             params=self._params(evidence, min_confidence, categories, model))

    def analyze(self, image: str | Path | bytes, evidence: str = "boxes", **options: Any) -> dict[str, Any]:
        """Moderation, OCR and quality of one image (a path or encoded bytes).

        Args:
            image: A file path or the encoded bytes.
            evidence: ``none``, ``boxes``, ``heatmap`` or ``polygons``.
            **options: ``min_confidence`` (float), ``categories`` (names or "a,b"), ``model`` (``safety@N``).
        """
        return self._post_image(ROUTES["analyze"], image, evidence, **options)

    def moderate(self, image: str | Path | bytes, evidence: str = "boxes", **options: Any) -> dict[str, Any]:
        """Safety labels of one image; options as :meth:`analyze`."""
        return self._post_image(ROUTES["moderate"], image, evidence, **options)

    def ocr(self, image: str | Path | bytes, evidence: str = "boxes", **options: Any) -> dict[str, Any]:
        """Text lines, entities and text regions of one image; options as :meth:`analyze`."""
        return self._post_image(ROUTES["ocr"], image, evidence, **options)

    def quality(self, image: str | Path | bytes, evidence: str = "boxes", **options: Any) -> dict[str, Any]:
        """Picture quality of one image; options as :meth:`analyze`."""
        return self._post_image(ROUTES["quality"], image, evidence, **options)

    def batch(self, task: str, images: Sequence[str | Path | bytes], evidence: str = "boxes",
              **options: Any) -> list[dict[str, Any]]:
        """Several images in one request (``/v1/{task}/batch``): one result or error item per image, in order.

        Args:
            task: ``analyze``, ``moderate``, ``ocr`` or ``quality``.
            images: Paths or encoded bytes (at most 32).
            evidence: As :meth:`analyze`.
            **options: As :meth:`analyze`.
        """
        if task not in ROUTES:
            raise InvalidArgumentError(f"task must be one of {sorted(ROUTES)}, got {task!r}")
        files = []
        for i, image in enumerate(images):
            if isinstance(image, str | Path):
                files.append(("files", (Path(image).name, Path(image).read_bytes(), _content_type(str(image)))))
            else:
                files.append(("files", (f"image{i}.jpg", bytes(image), "application/octet-stream")))
        body = self._request("POST", f"{ROUTES[task]}/batch", files=files, params=self._params(evidence, **options))
        return body["results"]

    def stream_frame(self, stream_id: str, image: str | Path | bytes, ts: float | None = None,
                     evidence: str = "boxes", **options: Any) -> dict[str, Any]:
        """Send one frame of a live stream; the answer has the stream's verdict under ``stream``.

        Raises:
            InvalidArgumentError: ``stream_id`` is not a valid id (checked before anything is sent).
        """
        sid = quote(check_stream_id(stream_id), safe="")
        data = Path(image).read_bytes() if isinstance(image, str | Path) else bytes(image)
        params = self._params(evidence, **options)
        if ts is not None:
            params["ts"] = ts
        return self._request("POST", f"/v1/streams/{sid}/frames", params=params,
                             files={"file": ("frame.jpg", data, "application/octet-stream")})

    def stream(self, stream_id: str) -> dict[str, Any]:
        """A stream's state (window, escalation, evidence)."""
        return self._request("GET", f"/v1/streams/{quote(check_stream_id(stream_id), safe='')}")

    def analyze_folder(self, folder: str | Path, task: str = "analyze",
                       evidence: str = "boxes", **options: Any) -> Iterator[tuple[Path, dict[str, Any] | ApiError]]:
        """Each image of a folder (sorted, recursive) with its result or its error; never stops early."""
        for path in iter_images(folder):
            try:
                yield path, self._post_image(ROUTES[task], path, evidence, **options)
            except ApiError as exc:
                yield path, exc


def iter_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` by suffix, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


async def answer_all(call: Callable[[Any], Awaitable[Any]], items: Sequence[Any], *, concurrency: int = 8,
                     tries: int = 6, max_pause_s: float = 10.0) -> list[Any]:
    """Every item's answer from a Serve handle, in order, with at most ``concurrency`` in flight.

    For notebooks and jobs inside the cluster, which call the app's handle rather than HTTP. Firing
    a whole dataset at once lets the app's admission control refuse the tail (its queue would pass
    the route's deadline), so calls are bounded, and an overload answer (:class:`OverloadedError`
    or Serve's ``BackPressureError``) is retried after its ``retry_after_s``, as :class:`Client`
    retries 503s.

        handle = serve.get_app_handle("livelens")
        answers = await answer_all(lambda b: handle.analyze_image.remote(b, ["moderate"]), images)

    Args:
        call: Sends one item and returns the awaitable answer (e.g. a handle call).
        items: What to send.
        concurrency: Calls in flight at once.
        tries: Attempts per item before its overload error is raised.
        max_pause_s: Cap on one pause between attempts.

    Raises:
        InvalidArgumentError: ``concurrency`` or ``tries`` is below 1.
        OverloadedError: An item stayed refused for ``tries`` attempts; any other error of a call
            is raised as it came (unwrapped from Ray's task error).
    """
    import asyncio

    from ray.serve.exceptions import BackPressureError

    if concurrency < 1 or tries < 1:
        raise InvalidArgumentError(f"concurrency and tries must be at least 1, got {concurrency} and {tries}")
    gate = asyncio.Semaphore(concurrency)

    async def one(item: Any) -> Any:
        for attempt in range(tries):
            async with gate:
                try:
                    return await call(item)
                except Exception as exc:
                    cause = unwrap(exc)
                    if not isinstance(cause, OverloadedError | BackPressureError) or attempt + 1 == tries:
                        raise cause from None
                    pause = float(getattr(cause, "retry_after_s", None) or 1.0) * (attempt + 1)
            # The pause is taken outside the gate, so the calls in flight drain the queue meanwhile.
            await asyncio.sleep(min(max_pause_s, pause))
        raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one(item) for item in items)))

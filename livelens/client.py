"""Python client of the livelens HTTP API.

    from livelens.client import Client
    c = Client("http://127.0.0.1:8000", api_key="ll_...")
    result = c.analyze("frame.jpg")
    for path, res in c.analyze_folder("frames/"):
        ...

Errors come back as :class:`ApiError` carrying the envelope's type, code, message, HTTP status and
request id; 503 and 429 answers are retried after their ``Retry-After``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from livelens.errors import LivelensError

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
ROUTES = {"analyze": "/v1/analyze", "moderate": "/v1/moderate", "ocr": "/v1/ocr", "quality": "/v1/quality"}


class ApiError(LivelensError):
    """An error answer of the service (its envelope, with the HTTP status and request id)."""

    def __init__(self, status: int, type_: str, code: str, message: str, request_id: str | None):
        super().__init__(f"{status} {type_}/{code}: {message} (request {request_id})", code=code)
        self.type, self.http_status, self.request_id, self.detail = type_, status, request_id, message


def _content_type(name: str) -> str:
    suffix = Path(name).suffix.lower()
    return {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp",
            ".bmp": "image/bmp", ".gif": "image/gif"}.get(suffix, "application/octet-stream")


class Client:
    """A synchronous client.

    Args:
        base_url: The service URL (``make run`` prints it).
        api_key: The key; default ``$LIVELENS_API_KEY``.
        timeout_s: Per-request timeout.
        retries: How often 503/429 answers are retried (after their Retry-After).
    """

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None,
                 timeout_s: float = 60.0, retries: int = 3):
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
            r = self._http.request(method, path, **kw)
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

    def _post_image(self, route: str, image: str | Path | bytes, evidence: str = "boxes",
                    name: str = "frame.jpg") -> dict[str, Any]:
        if isinstance(image, str | Path):
            name, data = Path(image).name, Path(image).read_bytes()
        else:
            data = bytes(image)
        files = {"file": (name, data, _content_type(name))}
        return self._request("POST", route, files=files, params={"evidence": evidence})

    def analyze(self, image: str | Path | bytes, evidence: str = "boxes") -> dict[str, Any]:
        """Moderation, OCR and quality of one image (a path or encoded bytes)."""
        return self._post_image(ROUTES["analyze"], image, evidence)

    def moderate(self, image: str | Path | bytes, evidence: str = "boxes") -> dict[str, Any]:
        return self._post_image(ROUTES["moderate"], image, evidence)

    def ocr(self, image: str | Path | bytes) -> dict[str, Any]:
        return self._post_image(ROUTES["ocr"], image)

    def quality(self, image: str | Path | bytes) -> dict[str, Any]:
        return self._post_image(ROUTES["quality"], image)

    def stream_frame(self, stream_id: str, image: str | Path | bytes, ts: float | None = None) -> dict[str, Any]:
        """Send one frame of a live stream; the answer has the stream's verdict under ``stream``."""
        data = Path(image).read_bytes() if isinstance(image, str | Path) else bytes(image)
        params = {"ts": ts} if ts is not None else {}
        return self._request("POST", f"/v1/streams/{stream_id}/frames", params=params,
                             files={"file": ("frame.jpg", data, "application/octet-stream")})

    def stream(self, stream_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/streams/{stream_id}")

    def analyze_folder(self, folder: str | Path, task: str = "analyze",
                       evidence: str = "boxes") -> Iterator[tuple[Path, dict[str, Any] | ApiError]]:
        """Each image of a folder (sorted, recursive) with its result or its error; never stops early."""
        for path in iter_images(folder):
            try:
                yield path, self._post_image(ROUTES[task], path, evidence)
            except ApiError as exc:
                yield path, exc


def iter_images(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` by suffix, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

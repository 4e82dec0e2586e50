"""Turning HTTP payloads into encoded image bytes, before anything is decoded.

Three forms are accepted: a multipart file, the raw bytes as the body (``image/*`` or
``application/octet-stream``), or JSON with base64 (``{"image": "<b64>"}`` or ``{"images": [...]}``).
URLs are refused unless their host is on an explicit allowlist: fetching arbitrary URLs from
inside the cluster is a server-side request forgery hole.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from livelens.errors import (
    ForbiddenError,
    ImageTooLargeError,
    InvalidArgumentError,
    UnsupportedMediaTypeError,
)
from livelens.imageio import DEFAULT_LIMITS, ImageLimits

RAW_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/webp", "image/bmp", "image/gif",
                       "application/octet-stream"})
MAX_BATCH = 32


@dataclass(frozen=True)
class InputPolicy:
    """What the gateway accepts.

    Attributes:
        limits: Byte and pixel limits (bytes are checked here, pixels at decode time).
        url_allowlist: Hosts that ``{"url": ...}`` may name; empty means no fetching at all.
        max_batch: Most images in one batch request.
    """

    limits: ImageLimits = DEFAULT_LIMITS
    url_allowlist: frozenset[str] = field(default_factory=frozenset)
    max_batch: int = MAX_BATCH


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header, lowercased."""
    return (content_type or "").split(";")[0].strip().lower()


def check_declared_length(content_length: str | None, policy: InputPolicy, n_images: int = 1) -> None:
    """Refuse an oversize body from its Content-Length, before reading it."""
    if content_length is None:
        return
    try:
        n = int(content_length)
    except ValueError:
        raise InvalidArgumentError(f"bad Content-Length {content_length!r}") from None
    # base64 and multipart framing add about a third, so allow that much slack per image.
    if n > policy.limits.max_bytes * 4 // 3 * max(1, n_images) + 64 * 1024:
        raise ImageTooLargeError(f"request body is {n} bytes; the limit is {policy.limits.max_bytes} per image")


def decode_b64(value: object, what: str, policy: InputPolicy) -> bytes:
    """Decode one base64 image string (a ``data:`` URL prefix is allowed)."""
    if not isinstance(value, str):
        raise InvalidArgumentError(f"{what} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) * 3 // 4 > policy.limits.max_bytes + 3:
        raise ImageTooLargeError(f"{what} is about {len(value) * 3 // 4} bytes; the limit is {policy.limits.max_bytes}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgumentError(f"{what} is not valid base64: {exc}") from exc


def check_url(url: object, policy: InputPolicy) -> str:
    """Allow a URL only for an allowlisted host over http(s); else raise."""
    if not isinstance(url, str):
        raise InvalidArgumentError("url must be a string")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgumentError(f"url must be http(s) with a host, got {url[:100]!r}")
    if parts.hostname.lower() not in policy.url_allowlist:
        raise ForbiddenError(f"fetching from {parts.hostname!r} is not allowed: URL fetching is off unless the "
                             "host is on the service's url_allowlist", code="url_not_allowed")
    return url


def fetch_url(url: str, policy: InputPolicy, timeout_s: float = 5.0,
              headers: dict[str, str] | None = None) -> bytes:
    """Fetch an allowlisted URL, without redirects (a redirect could leave the allowlist), size-capped.

    ``headers`` (e.g. a Label Studio token) go only to that allowlisted host, never to a redirect.
    """
    import httpx

    check_url(url, policy)
    try:
        with httpx.Client(follow_redirects=False, timeout=timeout_s) as client, \
                client.stream("GET", url, headers=headers) as resp:
            if resp.status_code != 200:
                raise InvalidArgumentError(f"fetching {url[:100]} gave HTTP {resp.status_code}",
                                           code="url_fetch_failed")
            buf = bytearray()
            for chunk in resp.iter_bytes():
                buf += chunk
                if len(buf) > policy.limits.max_bytes:
                    raise ImageTooLargeError(f"{url[:100]} is over {policy.limits.max_bytes} bytes")
            return bytes(buf)
    except httpx.HTTPError as exc:
        # An allowlisted host that is down, slow or not speaking HTTP: the client's URL failed, not us.
        raise InvalidArgumentError(f"fetching {url[:100]} failed: {type(exc).__name__}",
                                   code="url_fetch_failed") from None


#: Largest JSON body that is not an image carrier (admin and option bodies).
MAX_OPTIONS_BYTES = 64 * 1024


def parse_json_object(body: bytes, policy: InputPolicy | None = None, max_bytes: int = MAX_OPTIONS_BYTES) -> dict:
    """A small JSON object body (settings, not images).

    Raises:
        ImageTooLargeError: Over ``max_bytes`` (413).
        InvalidArgumentError: Not JSON, or not an object.
    """
    if len(body) > max_bytes:
        raise ImageTooLargeError(f"body is {len(body)} bytes; settings bodies are at most {max_bytes}",
                                 code="body_too_large")
    try:
        doc = json.loads(body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgumentError(f"body is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(doc, dict):
        raise InvalidArgumentError("the body must be a JSON object")
    return doc


def images_from_json(body: bytes, policy: InputPolicy, batch: bool,
                     fetch: Callable[[str, InputPolicy], bytes] = fetch_url) -> tuple[list[bytes | Exception], dict]:
    """Parse a JSON body into image bytes (or a per-item error) plus the remaining options.

    Args:
        body: The raw JSON.
        policy: Limits and URL allowlist.
        batch: Whether a list (``images``) is expected rather than one ``image``.
        fetch: How to fetch an allowlisted URL (injectable for tests).

    Returns:
        The images, each bytes or the error that item raised (batch items fail one by one), and
        the JSON object's other fields (options such as ``evidence``).
    """
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgumentError(f"body is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        # A few KB of '[' nest deeper than the parser's recursion limit: a client error, not a 500.
        raise InvalidArgumentError("body is not valid JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidArgumentError("JSON body must be an object with 'image' (base64) or 'url'")

    def one(item: object, what: str) -> bytes:
        if isinstance(item, dict) and "url" in item:
            return fetch(check_url(item["url"], policy), policy)
        if isinstance(item, dict) and "image" in item:
            item = item["image"]
        return decode_b64(item, what, policy)

    if batch:
        items = doc.get("images")
        if not isinstance(items, list) or not items:
            raise InvalidArgumentError("a batch needs a non-empty 'images' list (base64 strings or {'url': ...})")
        if len(items) > policy.max_batch:
            raise InvalidArgumentError(f"a batch holds at most {policy.max_batch} images, got {len(items)}")
        out: list[bytes | Exception] = []
        for i, item in enumerate(items):
            try:
                out.append(one(item, f"images[{i}]"))
            except Exception as exc:
                out.append(exc)
        rest = {k: v for k, v in doc.items() if k != "images"}
        return out, rest
    if "url" in doc:
        data = fetch(check_url(doc["url"], policy), policy)
    elif "image" in doc:
        data = decode_b64(doc["image"], "image", policy)
    else:
        raise InvalidArgumentError("JSON body needs 'image' (base64) or 'url'")
    return [data], {k: v for k, v in doc.items() if k not in ("image", "url")}


def check_raw(content_type: str | None, body: bytes, policy: InputPolicy) -> bytes:
    """Accept a raw image body with an image (or octet-stream) content type."""
    mt = media_type(content_type)
    if mt not in RAW_TYPES:
        raise UnsupportedMediaTypeError(
            f"content type {mt or '(none)'!r} is not accepted: send multipart/form-data with a 'file', "
            f"application/json with base64, or the raw bytes as one of {sorted(RAW_TYPES)}")
    if len(body) > policy.limits.max_bytes:
        raise ImageTooLargeError(f"payload is {len(body)} bytes; the limit is {policy.limits.max_bytes}")
    return body

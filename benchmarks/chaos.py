"""``make chaos``: hostile requests from a table of cases (``make chaos`` then runs the overload bench).

Every case is a request a hostile or broken client sends: truncated, random and
header-then-garbage bodies, a decompression bomb, an animated GIF, wrong and lying content types,
bad JSON, bad base64, SSRF URLs, JSON nested 3,000 deep, bad options and timestamps, path tricks,
missing and wrong keys, an oversized header and an oversized batch. The service must answer every
one in the error envelope, with a 4xx (or 429/503 for limits), never a 5xx, and stay up.

It prints one table: case → status codes, 5xx count, answers outside the envelope, and the
gateway's ``/healthz`` before and after. The test suite runs a short version against its app
(``tests/test_serve_http.py``); this runs the long one against a fresh local app:

    python -m benchmarks.chaos [--requests 10000] [--concurrency 16] [--out runs/bench/chaos.json]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Case:
    """One hostile request: ``build(key) -> (method, path, headers, body)``.

    ``answerable``: the request is odd but valid (a JPEG labelled PNG, an animated GIF, a 16 KB
    header), so a 200 is a right answer too.
    """

    name: str
    build: Callable[[str], tuple[str, str, dict[str, str], bytes]]
    answerable: bool = False


def _jpeg(side: int = 64, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _bomb_png(side: int = 60_000) -> bytes:
    """A PNG whose header says ``side`` × ``side`` pixels (3.6 GP) in a few hundred bytes of zeros."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 100_000, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gif(frames: int = 200) -> bytes:
    imgs = [Image.new("P", (640, 360), i % 256) for i in range(frames)]
    buf = io.BytesIO()
    imgs[0].save(buf, "GIF", save_all=True, append_images=imgs[1:], duration=40)
    return buf.getvalue()


def _multipart(parts: list[tuple[str, bytes]], boundary: str = "chaosboundary") -> tuple[str, bytes]:
    body = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="f.jpg"\r\n'
                    f"Content-Type: image/jpeg\r\n\r\n".encode() + data + b"\r\n" for name, data in parts)
    return f"multipart/form-data; boundary={boundary}", body + f"--{boundary}--\r\n".encode()


def cases() -> list[Case]:
    """The hostile table."""
    jpg = _jpeg()
    bomb, gif = _bomb_png(), _gif()

    def auth(key: str, ctype: str = "image/jpeg") -> dict[str, str]:
        return {"authorization": f"Bearer {key}", "content-type": ctype}

    def post(path: str, body: bytes, ctype: str = "image/jpeg") -> Callable:
        return lambda key: ("POST", path, auth(key, ctype), body)

    def js(path: str, doc: Any) -> Callable:
        return post(path, doc if isinstance(doc, bytes) else json.dumps(doc).encode(), "application/json")

    big_batch_type, big_batch = _multipart([("files", jpg)] * 80)
    no_file_type, no_file = _multipart([("other", jpg)])
    ssrf = ["http://127.0.0.1/", "http://2130706433/", "http://[::1]/", "gopher://127.0.0.1:6379/_INFO",
            "ftp://example.com/a.jpg", "file:///etc/passwd", "http://localhost:8265/api/jobs/"]
    table = [
        Case("truncated_jpeg", post("/v1/analyze", jpg[: len(jpg) // 2])),
        Case("random_bytes", post("/v1/moderate", os.urandom(4096))),
        Case("png_header_then_garbage", post("/v1/ocr", b"\x89PNG\r\n\x1a\n" + os.urandom(2048), "image/png")),
        Case("empty_body", post("/v1/analyze", b"")),
        Case("text_content_type", post("/v1/moderate", jpg, "text/plain")),
        Case("lying_content_type", post("/v1/quality", jpg, "image/png"), answerable=True),
        Case("decompression_bomb", post("/v1/analyze", bomb, "image/png")),
        Case("animated_gif", post("/v1/quality", gif, "image/gif"), answerable=True),
        Case("bad_json", js("/v1/analyze", b"{not json")),
        Case("bad_base64", js("/v1/moderate", {"image": "@@@not base64@@@"})),
        Case("nested_json", js("/v1/analyze", b"[" * 3000)),
        Case("json_wrong_types", js("/v1/analyze", {"image": 12, "evidence": ["x"]})),
        *[Case(f"ssrf_{i}", js("/v1/analyze", {"url": u})) for i, u in enumerate(ssrf)],
        Case("bad_min_confidence", lambda key: ("POST", "/v1/moderate?min_confidence=abc", auth(key), jpg)),
        Case("bad_category", lambda key: ("POST", "/v1/moderate?categories=nope", auth(key), jpg)),
        Case("bad_model_pin", lambda key: ("POST", "/v1/moderate?model=..%2F..%2Fetc@1", auth(key), jpg)),
        Case("bad_evidence", lambda key: ("POST", "/v1/moderate?evidence=%00", auth(key), jpg)),
        Case("ts_inf", lambda key: ("POST", "/v1/streams/chaos/frames?ts=inf", auth(key), jpg)),
        Case("ts_nan", lambda key: ("POST", "/v1/streams/chaos/frames?ts=nan", auth(key), jpg)),
        Case("bad_stream_id", lambda key: ("POST", "/v1/streams/" + "x" * 300 + "/frames", auth(key), jpg)),
        Case("unknown_route", post("/v1/etc/passwd", jpg)),
        Case("missing_key", lambda key: ("POST", "/v1/moderate", {"content-type": "image/jpeg"}, jpg)),
        Case("wrong_key", lambda key: ("POST", "/v1/moderate", auth("ll_wrong"), jpg)),
        Case("huge_header", lambda key: ("POST", "/v1/moderate", {**auth(key), "x-junk": "a" * 16_000}, jpg),
             answerable=True),
        Case("lying_content_length", lambda key: ("POST", "/v1/moderate", {**auth(key),
                                                                            "content-length": "999999999"}, jpg)),
        Case("oversized_batch", lambda key: ("POST", "/v1/moderate/batch", auth(key, big_batch_type), big_batch)),
        Case("multipart_without_file", lambda key: ("POST", "/v1/ocr", auth(key, no_file_type), no_file)),
        Case("admin_with_wrong_body", lambda key: ("PUT", "/v1/admin/live/gateway", auth(key, "application/json"),
                                                    b'{"deadlines_s": {"analyze": "soon"}}')),
        Case("get_on_post_route", lambda key: ("GET", "/v1/analyze", auth(key), b"")),
    ]
    return table


@dataclass
class Tally:
    """What one case got back."""

    codes: dict[int, int] = field(default_factory=dict)
    outside_envelope: int = 0

    def add(self, status: int, body: bytes) -> None:
        self.codes[status] = self.codes.get(status, 0) + 1
        if status >= 400:
            try:
                doc = json.loads(body)
                ok = set(doc) == {"error", "request_id"} and {"type", "code", "message"} <= set(doc["error"])
            except (ValueError, TypeError):
                ok = False
            self.outside_envelope += not ok


def _lying_length(headers: dict[str, str]) -> bool:
    return headers.get("content-length") not in (None, "")


async def run_hostile(url: str, key: str, n: int, concurrency: int = 8) -> dict[str, Tally]:
    """Send ``n`` hostile requests, cycling through the table; what each case got back."""
    import httpx

    table = cases()
    built = [(c.name, c.build(key)) for c in table]
    tallies: dict[str, Tally] = {c.name: Tally() for c in table}
    todo = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            name, (method, path, headers, body) = built[i % len(built)]
            try:
                if _lying_length(headers):
                    # httpx would correct the length; a raw socket sends the lie (and then stops early).
                    status, data = await _raw(url, method, path, headers, body)
                else:
                    r = await client.request(method, url.rstrip("/") + path, headers=headers, content=body)
                    status, data = r.status_code, r.content
            except (httpx.HTTPError, OSError) as exc:
                status, data = 599, str(exc).encode()  # no answer at all: counted as a failure
            tallies[name].add(status, data)

    async with httpx.AsyncClient(timeout=120) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return tallies


async def _raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    from urllib.parse import urlsplit

    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    try:
        head = f"{method} {u.path.rstrip('/')}{path} HTTP/1.1\r\nhost: {u.hostname}\r\nconnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        # The body is shorter than declared and the connection stays open: the service should answer
        # from the header (413) instead of waiting for bytes that never come.
        data = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 599
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


def table_rows(tallies: dict[str, Tally]) -> list[dict[str, Any]]:
    """One row per case: codes, 5xx count (503 is a limit, not a failure), answers outside the
    envelope, and ``wrong_2xx``: successes for a request that should have been refused."""
    answerable = {c.name for c in cases() if c.answerable}
    return [{"case": name, "codes": dict(sorted(t.codes.items())),
             "5xx": sum(v for c, v in t.codes.items() if c >= 500 and c != 503),
             "outside_envelope": t.outside_envelope,
             "wrong_2xx": 0 if name in answerable else sum(v for c, v in t.codes.items() if c < 400)}
            for name, t in tallies.items()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=10_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--out", default="runs/bench/chaos.json")
    a = p.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    from serve_apps.common import SERVE_MODES

    os.environ.update(SERVE_MODES["throughput"])
    import httpx
    import ray
    from ray import serve

    from benchmarks.loadgen import start_local_ray
    from serve_apps.gateway import build_app

    key, key_file, port = start_local_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"gateway": {"key_file": key_file}, "streams": {"db_path": "runs/chaos_streams.sqlite"}}),
                  name="livelens", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        before = httpx.get(f"{url}/healthz", timeout=30).json()
        rows = table_rows(asyncio.run(run_hostile(url, key, a.requests, a.concurrency)))
        after = httpx.get(f"{url}/healthz", timeout=30)
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {"requests": a.requests, "cases": rows, "total_5xx": sum(r["5xx"] for r in rows),
              "outside_envelope": sum(r["outside_envelope"] for r in rows), "healthz_after": after.status_code,
              "uptime_before_s": before["uptime_s"]}
    for r in rows:
        print(f"{r['case']:28s} {json.dumps(r['codes']):40s} 5xx={r['5xx']} outside_envelope={r['outside_envelope']}")
    print(json.dumps({k: v for k, v in result.items() if k != "cases"}))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    return 0 if result["total_5xx"] == 0 and result["outside_envelope"] == 0 and not any(
        r["wrong_2xx"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""A lean HTTP/1.1 load generator on asyncio streams, for loopback benchmarks on small machines.

httpx costs about 2.3 CPU-ms per request here (measured from /proc during the serving bench). On a
2-core box that CPU comes out of the server being measured, so the load generator itself lowered the
served figure. This client keeps one keep-alive connection per concurrent worker and does only what
the benchmark needs: send a request, read the status, headers and body (Content-Length or chunked).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit


@dataclass
class Response:
    """One HTTP answer."""

    status: int
    headers: dict[str, str]
    body: bytes


class Connection:
    """One keep-alive HTTP/1.1 connection (reconnects when the server closes it)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def _connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = self._reader = None

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: dict[str, str] | None = None) -> Response:
        """Send one request and read its whole answer."""
        if self._writer is None:
            await self._connect()
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        assert self._writer is not None and self._reader is not None
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        await self._writer.drain()
        status_line = await self._reader.readuntil(b"\r\n")
        status = int(status_line.split(b" ", 2)[1])
        raw = await self._reader.readuntil(b"\r\n\r\n")
        hdrs: dict[str, str] = {}
        for line in raw.decode("latin-1").split("\r\n"):
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    break
                chunks.append(await self._reader.readexactly(size))
                await self._reader.readexactly(2)
            data = b"".join(chunks)
        else:
            data = await self._reader.readexactly(int(hdrs.get("content-length", "0")))
        if hdrs.get("connection", "").lower() == "close":
            await self.close()
        return Response(status, hdrs, data)


async def run_load(url: str, path: str, bodies: list[bytes], n: int, concurrency: int,
                   headers: dict[str, str], params: dict[str, str] | None = None,
                   on_response: Callable[[int, Response, float], Any] | None = None) -> float:
    """Send ``n`` requests with ``concurrency`` connections; returns the wall time in seconds.

    ``on_response(i, response, latency_ms)`` is called for every answer.
    """
    # The URL's own path is the app's route prefix ("http://host:port/colo"): requests go below it.
    prefix = urlsplit(url).path.rstrip("/")
    full = prefix + path + ("?" + urlencode(params) if params else "")
    todo = iter(range(n))

    async def worker() -> None:
        conn = Connection(url)
        try:
            for i in todo:
                t0 = time.perf_counter()
                try:
                    r = await conn.request("POST", full, bodies[i % len(bodies)], headers)
                except (OSError, asyncio.IncompleteReadError):
                    await conn.close()
                    r = Response(599, {}, b"")  # a dropped connection counts as a failed request
                if on_response is not None:
                    on_response(i, r, (time.perf_counter() - t0) * 1000)
        finally:
            await conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


@dataclass
class Multipart:
    """A multipart/form-data body built once (for batch routes)."""

    files: list[tuple[str, str, bytes, str]]
    boundary: str = "livelensbenchboundary7f3a"
    body: bytes = field(init=False)

    def __post_init__(self) -> None:
        parts = []
        for name, filename, data, ctype in self.files:
            parts.append((f"--{self.boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                          f"filename=\"{filename}\"\r\nContent-Type: {ctype}\r\n\r\n").encode() + data + b"\r\n")
        self.body = b"".join(parts) + f"--{self.boundary}--\r\n".encode()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"


def start_local_ray(num_cpus: int = 4) -> tuple[str, str, int]:
    """A bench API key (stored in ``runs/bench_keys.json``, no rate limit), a free loopback port, and a local Ray.

    Returns:
        ``(key, key_file, port)``.
    """
    import socket

    import ray

    from livelens.serving.auth import add_key_to_file, generate_key

    key, key_file = generate_key(), "runs/bench_keys.json"
    add_key_to_file(key_file, key, "bench", rate_per_s=1e6, burst=1e6)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=num_cpus, object_store_memory=512 * 1024 * 1024, include_dashboard=False,
             log_to_driver=False)
    return key, key_file, port

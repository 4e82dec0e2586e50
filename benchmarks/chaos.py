"""``make chaos``: hostile requests, killed replicas and a soak, against a fresh local app.

Every hostile case is a request a hostile or broken client sends: truncated, random and
header-then-garbage bodies, a decompression bomb, an animated GIF, wrong and lying content types,
bad JSON, bad base64, SSRF URLs, JSON nested 3,000 deep, bad options and timestamps, path tricks,
missing and wrong keys, an oversized header, an oversized batch, and broken HTTP on a raw socket
(a garbage request line, a header without a colon, a bad chunk, HTTP/9.9, a TLS hello). The
service must answer every one in the error envelope, with a 4xx (or 429/503 for limits), never a
5xx, and stay up.

Then each listed deployment's replicas are killed while requests are in flight (a non-gateway
kill must lose none; a gateway kill may fail its in-flight requests only with a 503 to retry),
and good traffic runs at saturation for ``--soak-s`` seconds while the RSS, open files and
threads of every Serve process are compared after warm-up and at the end.

It prints one table: case → status codes, 5xx count, answers outside the envelope; the kills
(codes, lost requests, seconds until ``/healthz`` answers again); the soak's growth per role;
and RSS/USS per deployment. The test suite runs a short version against its own app
(``tests/test_serve_http.py``).

    python -m benchmarks.chaos [--requests 10000] [--kill Quality,Gateway] [--soak-s 600] [--out F]
    python -m benchmarks.chaos --cluster    # a worker raylet of a local multi-node cluster killed
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
    #: Bytes written verbatim to a socket instead of a request (not HTTP at all, or broken HTTP);
    #: ``build`` is then unused.
    raw: bytes | None = None


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
        Case("persons_truncated", post("/v1/persons", jpg[: len(jpg) // 3])),
        Case("persons_batch_random", post("/v1/persons/batch", os.urandom(2048))),
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
        # Broken HTTP, answered by the HTTP server before any route (livelens.serving.proxy_hooks).
        *[Case(f"malformed_http_{i}", lambda key: ("", "", {}, b""), raw=raw) for i, raw in enumerate([
            b"GARBAGE\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            b"POST /v1/moderate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
            b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32),  # a TLS hello on the plain port
        ])],
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
    built = [(c.name, c.build(key), c.raw) for c in table]
    tallies: dict[str, Tally] = {c.name: Tally() for c in table}
    todo = iter(range(n))

    async def worker(client: httpx.AsyncClient) -> None:
        for i in todo:
            name, (method, path, headers, body), verbatim = built[i % len(built)]
            try:
                if verbatim is not None:
                    status, data = await _raw(url, "", "", {}, b"", verbatim)
                elif _lying_length(headers):
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


async def exchange(url: str, payload: bytes, timeout_s: float = 20.0) -> bytes:
    """Write ``payload`` verbatim to the service's socket and read everything it answers."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    try:
        writer.write(payload)
        await writer.drain()
        # The body is shorter than declared and the connection stays open: the service should answer
        # from the header (413) instead of waiting for bytes that never come.
        return await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()


async def _raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes,
               verbatim: bytes | None = None) -> tuple[int, bytes]:
    from urllib.parse import urlsplit

    if verbatim is None:
        u = urlsplit(url)
        head = f"{method} {u.path.rstrip('/')}{path} HTTP/1.1\r\nhost: {u.hostname}\r\nconnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        verbatim = head.encode() + body
    data = await exchange(url, verbatim)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 599
    return status, data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in data else b""


def _valid_requests(n: int = 15) -> list[tuple[str, bytes]]:
    """Good requests over the image routes: generated stream frames (text banners, QR codes, game
    HUDs, photos) at their own size, and some scaled to 720p and 1080p as a large source sends."""
    from livelens.data.frames import generate_frames

    routes = ("/v1/moderate", "/v1/quality", "/v1/analyze", "/v1/ocr", "/v1/persons")
    rows = generate_frames(0, n, seed=11)
    out = []
    for i, row in enumerate(rows[:n]):
        body = row["image_bytes"]
        size = (i // len(routes)) % 3  # each route gets every size: native, 720p, 1080p
        if size:
            img = Image.open(io.BytesIO(body)).convert("RGB")
            w, h = (1280, 720) if size == 1 else (1920, 1080)
            buf = io.BytesIO()
            img.resize((w, h) if img.width >= img.height else (h, w), Image.BILINEAR).save(buf, "JPEG", quality=85)
            body = buf.getvalue()
        out.append((routes[i % len(routes)], body))
    return out


async def soak(url: str, key: str, seconds: float, concurrency: int = 16, warmup_s: float | None = None,
               app: str | None = None, sample_s: float = 5.0, settle_max_s: float = 0.0,
               settle_frac: float = 0.03) -> dict[str, Any]:
    """Good requests at saturation for ``seconds``; codes, and Serve's processes after warm-up and at the end.

    Args:
        url: The app's base URL.
        key: An API key with every image scope.
        seconds: Length of the measured part.
        concurrency: Requests in flight (enough to keep every replica busy and the queues full).
        warmup_s: Load before the first snapshot (default: a fifth of ``seconds``, at least 10 s),
            so one-time growth (first large image, lazy pools) is not counted as a leak.
        app: The Serve application whose replicas are measured (None: every one on this host).
        sample_s: Seconds between snapshots of every Serve process.
        settle_max_s: After ``warmup_s``, keep warming up for at most this long until every Serve
            process's RSS has settled: the floor of its last two snapshots grown less than
            ``settle_frac`` over the floor of the two before. A slower host takes more requests to meet every image size on every replica,
            and growth still under way when the measured part starts reads as a trend, not a leak.
            0: a fixed warm-up.
        settle_frac: The growth under which a process counts as settled.

    Returns:
        ``codes`` (status → count), ``unexpected`` (answers other than 200/429/503, or none at all),
        ``warmup_s`` (the warm-up it took, settling included), ``settled`` (False: ``settle_max_s`` ran out),
        ``before``/``after`` rows per Serve role (first and last snapshot), and ``growth`` per role:
        RSS and anonymous memory per process as a trend (a least-squares line through every snapshot:
        fitted end / fitted start − 1; ``make chaos`` holds it under 5 %), as windows (the mean
        over the last fifth of the soak against the mean over the first fifth) and as floors
        (``rss_floor``: the lowest snapshot of the last third against the lowest of the first
        third; a replica's RSS rises and falls with the frames in flight, by more than its own
        size for a text detector, and a leak is what raises the lows); the change in
        shared-memory pages mapped (MB); and the change in fds, threads and processes. ``series``
        keeps every snapshot (seconds, RSS MB, anonymous MB) per role.
    """
    import httpx

    from benchmarks.procstats import as_rows, serve_process_stats

    good = _valid_requests()
    codes: dict[int, int] = {}
    by_route: dict[str, dict[str, int]] = {}
    warmup_s = max(10.0, seconds / 5) if warmup_s is None else warmup_s
    loop = asyncio.get_running_loop()
    stop_at = [loop.time() + warmup_s]
    counter = iter(range(10**12))

    async def worker(client: httpx.AsyncClient) -> None:
        while loop.time() < stop_at[0]:
            path, body = good[next(counter) % len(good)]
            try:
                r = await client.post(url.rstrip("/") + path, content=body, params={"evidence": "none"},
                                      headers={"authorization": f"Bearer {key}", "content-type": "image/jpeg"})
                status, what = r.status_code, str(r.status_code)
            except (httpx.HTTPError, OSError) as exc:
                status, what = 599, type(exc).__name__
            codes[status] = codes.get(status, 0) + 1
            route = by_route.setdefault(path, {})
            route[what] = route.get(what, 0) + 1

    samples: list[tuple[float, dict]] = []

    async def sampler() -> None:
        # RSS saw-tooths (the heap trimmer gives memory back every few seconds), so one snapshot at
        # each end can catch a peak at one and a trough at the other: compare means over windows.
        while loop.time() < stop_at[0]:
            samples.append((loop.time(), await asyncio.to_thread(serve_process_stats, app)))
            await asyncio.sleep(sample_s)

    settled = [settle_max_s <= 0]

    async def settle() -> None:
        # Ends the warm-up (by moving stop_at) once no Serve process's RSS still climbs.
        t_start, hist = loop.time(), []
        while loop.time() < stop_at[0]:
            stats = await asyncio.to_thread(serve_process_stats, app)
            hist.append({role: st.rss_mb / max(1, st.processes) for role, st in stats.items()})
            now = loop.time()
            # Settled: each process's floor (the lower of two snapshots: RSS swings with the frames
            # in flight) no higher than the floor of the two before.
            if len(hist) >= 4 and now - t_start >= warmup_s and all(
                    all(role in h for h in hist[-4:])
                    and min(h[role] for h in hist[-2:]) <= min(h[role] for h in hist[-4:-2]) * (1 + settle_frac)
                    for role in hist[-1]):
                settled[0] = True
                stop_at[0] = now
                return
            if now - t_start >= warmup_s + settle_max_s:
                stop_at[0] = now
                return
            await asyncio.sleep(sample_s)

    async with httpx.AsyncClient(timeout=120) as client:
        if settle_max_s > 0:
            stop_at[0] = loop.time() + warmup_s + settle_max_s + sample_s
            t_warm = loop.time()
            await asyncio.gather(settle(), *(worker(client) for _ in range(concurrency)))
            warmup_s = round(loop.time() - t_warm, 1)
        else:
            await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        warm_codes = dict(codes)
        codes.clear()
        by_route.clear()
        t0 = loop.time()
        stop_at[0] = t0 + seconds
        await asyncio.gather(sampler(), *(worker(client) for _ in range(concurrency)))
    # The client has just closed its 16 keep-alive connections; give the proxy a moment to close its
    # ends, so the last snapshot's fds count what stayed open (a leak), not sockets still closing.
    await asyncio.sleep(1.0)
    samples.append((loop.time(), await asyncio.to_thread(serve_process_stats, app)))
    window = max(sample_s, seconds / 5)
    first = [st for t, st in samples if t <= t0 + window]
    last = [st for t, st in samples if t >= stop_at[0] - window]
    before, after = samples[0][1], samples[-1][1]

    def mean(stats: list[dict], role: str, attr: str) -> float:
        """Mean per process of ``attr`` over the snapshots that have ``role``."""
        vals = [getattr(st[role], attr) / st[role].processes for st in stats if role in st]
        return sum(vals) / max(1, len(vals))

    def trend(role: str, attr: str) -> float:
        """Growth over the soak by a least-squares line through every snapshot: fitted end / fitted start − 1.

        Under saturation RSS moves with the work in flight and with each heap trim; a leak is the
        slope under that noise, and a line through ~120 snapshots finds it where two windows can't."""
        pts = [(t - t0, getattr(st[role], attr) / st[role].processes) for t, st in samples if role in st]
        if len(pts) < 3:
            return 0.0
        xs, ys = np.array(pts).T
        slope, icept = np.polyfit(xs, ys, 1)
        return float((icept + slope * xs[-1]) / icept - 1) if icept > 0 else 0.0

    # Per process: autoscaling may add a replica during the soak, which is not a leak.
    def floor(role: str) -> float:
        """Lowest RSS per process in the last third of the measured part over the lowest in the first, − 1."""
        pts = [(t - t0, st[role].rss_mb / st[role].processes) for t, st in samples if role in st]
        third = (stop_at[0] - t0) / 3
        lo = [y for x, y in pts if x <= third]
        hi = [y for x, y in pts if x >= 2 * third]
        return round(min(hi) / min(lo) - 1, 4) if lo and hi and min(lo) > 0 else 0.0

    growth = {role: {"rss_floor": floor(role),
                     "rss_trend": round(trend(role, "rss_mb"), 4), "anon_trend": round(trend(role, "anon_mb"), 4),
                     "rss": round(mean(last, role, "rss_mb") / mean(first, role, "rss_mb") - 1, 4),
                     "anon": round(mean(last, role, "anon_mb") / max(1e-9, mean(first, role, "anon_mb")) - 1, 4),
                     "shmem_mb": round(mean(last, role, "shmem_mb") - mean(first, role, "shmem_mb"), 1),
                     "fds": after[role].fds - b.fds, "threads": after[role].threads - b.threads,
                     "processes": after[role].processes - b.processes}
              for role, b in before.items() if role in after}
    return {"seconds": seconds, "warmup_s": warmup_s, "settled": settled[0],
            "warmup_codes": dict(sorted(warm_codes.items())),
            "codes": dict(sorted(codes.items())), "by_route": by_route,
            "unexpected": sum(v for c, v in codes.items() if c not in (200, 429, 503)),
            "samples": len(samples), "window_s": window,
            "series": {role: [[round(t - t0, 1), round(st[role].rss_mb, 1), round(st[role].anon_mb, 1)]
                              for t, st in samples if role in st] for role in before},
            "before": as_rows(before), "after": as_rows(after), "growth": growth}


def replica_names(app: str, deployment: str) -> list[str]:
    """Serve's actor names of ``deployment``'s replicas (via the GCS; needs no dashboard)."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and f"{app}#{deployment}#" in a["name"]]


#: The route whose requests pass through each deployment (a kill is measured on traffic it serves).
KILL_ROUTES = {"Quality": "/v1/quality", "Moderation": "/v1/moderate", "Ocr": "/v1/ocr",
               "TextDetector": "/v1/ocr", "TextRecognizer": "/v1/ocr", "Persons": "/v1/persons",
               "Gateway": "/v1/quality"}


async def kill_under_load(url: str, key: str, app: str, deployment: str, route: str | None = None,
                          n: int = 24, concurrency: int = 4, delay_s: float = 0.5) -> dict[str, Any]:
    """Kill every replica of ``deployment`` while ``n`` requests to ``route`` are in flight.

    Args:
        url: The app's base URL (through the proxy).
        key: An API key.
        app: The Serve application.
        deployment: The deployment whose replicas are killed (``Gateway`` for the ingress).
        route: The route the load goes to (default: one the deployment serves, :data:`KILL_ROUTES`).
        n: Requests sent in all.
        concurrency: Requests in flight.
        delay_s: Load time before the kill, so requests are inside the replicas.

    Returns:
        ``killed`` replicas, ``answers`` (status, or (status, body) for non-200s), and
        ``recovered_s``: seconds from the kill to the first good ``/healthz`` through the proxy.
    """
    import time

    import httpx
    import ray

    names = replica_names(app, deployment)
    route = route or KILL_ROUTES.get(deployment, "/v1/analyze")
    jpg = _valid_requests(2)[1][1]  # 360×640

    async def one(client: httpx.AsyncClient, sem: asyncio.Semaphore) -> Any:
        async with sem:
            try:
                r = await client.post(url.rstrip("/") + route, content=jpg, params={"evidence": "none"},
                                      headers={"authorization": f"Bearer {key}", "content-type": "image/jpeg"})
            except (httpx.HTTPError, OSError) as exc:
                return 599, type(exc).__name__
            return r.status_code if r.status_code == 200 else (r.status_code, r.text[:300])

    async with httpx.AsyncClient(timeout=180) as client:
        sem = asyncio.Semaphore(concurrency)
        tasks = [asyncio.ensure_future(one(client, sem)) for _ in range(n)]
        await asyncio.sleep(delay_s)
        t_kill = time.perf_counter()
        for name in names:
            await asyncio.to_thread(ray.kill, ray.get_actor(name, namespace="serve"), no_restart=True)
        answers = list(await asyncio.gather(*tasks))
        recovered = None
        while time.perf_counter() - t_kill < 300:
            try:
                if (await client.get(url.rstrip("/") + "/healthz", timeout=60)).status_code == 200:
                    recovered = time.perf_counter() - t_kill
                    break
            except (httpx.HTTPError, OSError):
                pass
            await asyncio.sleep(0.5)
    return {"deployment": deployment, "killed": len(names), "answers": answers,
            "recovered_s": None if recovered is None else round(recovered, 1)}


def kill_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Counts of a :func:`kill_under_load` run: 200s, fast 503s to retry, and lost requests."""
    codes: dict[int, int] = {}
    for a in result["answers"]:
        code = a if isinstance(a, int) else a[0]
        codes[code] = codes.get(code, 0) + 1
    return {"deployment": result["deployment"], "killed": result["killed"], "codes": dict(sorted(codes.items())),
            "lost": sum(v for c, v in codes.items() if c not in (200, 503)), "recovered_s": result["recovered_s"]}


def cluster_kill(load_s: float = 60.0, kill_after_s: float = 10.0, concurrency: int = 4,
                 out_dir: str = "runs/chaos_cluster") -> dict[str, Any]:
    """Serve spread over a two-raylet :class:`cluster.local.LocalCluster`; a worker raylet is SIGKILLed under load.

    The gateway, moderation and quality run two replicas each (Serve spreads them over the two
    worker raylets; the head holds the controller and the HTTP proxy). Good requests run at
    ``concurrency`` for ``load_s`` seconds, and the worker raylet holding the stream-state replica
    is killed ``kill_after_s`` into it, with every replica it held. A stream's state is written before the kill and read after it. OCR is
    off to fit two raylets' models on a small machine.

    Returns:
        ``codes`` before and after the kill, ``lost`` (answers other than 200/503, or none),
        ``stream_state_kept``, and the replicas per node before the kill.
    """
    import socket
    import time

    import httpx

    from cluster.local import LocalCluster
    from livelens.serving.auth import add_key_to_file, generate_key
    from serve_apps.common import SERVE_MODES

    # Serve's flags (and the envelope hook) reach its processes through the raylets' environment.
    os.environ.update(SERVE_MODES["throughput"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key, key_file = generate_key(), str(out / "keys.json")
    add_key_to_file(key_file, key, "chaos", rate_per_s=1e6, burst=1e6)
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    two = {"min_replicas": 2, "max_replicas": 2}
    args = {"gateway": {"key_file": key_file, "deploy": two}, "moderation": {"deploy": two},
            "quality": {"deploy": two}, "ocr": None,
            "streams": {"db_path": str((out / "streams.sqlite").resolve()), "window": 4, "k": 2}}
    with LocalCluster(num_workers=2, cpus_per_worker=2, object_store_mb=300, include_dashboard=False) as c:
        os.environ.update(c.client_env())
        import ray
        from ray import serve

        from serve_apps.gateway import build_app

        ray.init()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "HeadOnly"})
            # Its own app name, so a single-node chaos run on the same host counts its processes apart.
            serve.run(build_app(args), name="chaos_cluster", route_prefix="/", blocking=False)
            deadline = time.time() + 900
            while (st := serve.status().applications.get("chaos_cluster")) is None or st.status != "RUNNING":
                if time.time() > deadline or (st is not None and st.status == "DEPLOY_FAILED"):
                    raise RuntimeError(f"app did not start on the cluster: {st}")
                time.sleep(3)
            url = f"http://127.0.0.1:{port}"
            node_names = {n["node_id"]: n["name"] for n in c.nodes()}
            placement = _replicas_by_node(node_names)
            # The raylet to lose is the one holding the stream state's replica, so its survival is tested.
            victim = next((node for node, names in placement.items() if any("#Streams#" in n for n in names)), "w1")
            if victim not in ("w0", "w1"):
                victim = "w1"
            h = {"authorization": f"Bearer {key}"}
            frame = _valid_requests(2)[1][1]
            sid = f"cluster-{int(time.time())}"
            for i in range(2):
                r = httpx.post(f"{url}/v1/streams/{sid}/frames", params={"ts": 1000 + i, "evidence": "none"},
                               headers=h, files={"file": ("f.jpg", frame, "image/jpeg")}, timeout=120)
                r.raise_for_status()
            state_before = r.json()["stream"]

            async def load() -> tuple[dict[int, int], dict[int, int]]:
                good = [g for g in _valid_requests() if g[0] in ("/v1/moderate", "/v1/quality", "/v1/analyze")]
                before: dict[int, int] = {}
                after: dict[int, int] = {}
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                killed = asyncio.ensure_future(asyncio.sleep(kill_after_s))
                killed.add_done_callback(lambda _f: loop.run_in_executor(None, c.kill_node, victim))
                n = iter(range(10**9))

                async def worker(client: httpx.AsyncClient) -> None:
                    while loop.time() - t0 < load_s:
                        path, body = good[next(n) % len(good)]
                        bucket = after if killed.done() else before
                        try:
                            rr = await client.post(url + path, content=body, params={"evidence": "none"},
                                                   headers={**h, "content-type": "image/jpeg"})
                            code = rr.status_code
                        except (httpx.HTTPError, OSError):
                            code = 599
                        bucket[code] = bucket.get(code, 0) + 1

                async with httpx.AsyncClient(timeout=120) as client:
                    await asyncio.gather(*(worker(client) for _ in range(concurrency)))
                return before, after

            before, after = asyncio.run(load())
            state_after = httpx.get(f"{url}/v1/streams/{sid}", headers=h, timeout=120).json()["stream"]
            kept = all(state_after[k] == state_before[k] for k in ("frame_count", "escalated", "window"))
        finally:
            serve.shutdown()
            ray.shutdown()
    lost = sum(v for code, v in after.items() if code not in (200, 503))
    return {"replicas_by_node": placement, "killed": victim, "codes_before_kill": dict(sorted(before.items())),
            "codes_after_kill": dict(sorted(after.items())), "lost": lost, "stream_state_kept": kept}


def _replicas_by_node(node_names: dict[str, str]) -> dict[str, list[str]]:
    """Which node holds each Serve replica (node names of the LocalCluster)."""
    import ray

    placement: dict[str, list[str]] = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] != "serve" or not a["name"].startswith("SERVE_REPLICA::"):
            continue
        handle = ray.get_actor(a["name"], namespace="serve")
        node = ray.get(handle.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
        placement.setdefault(node_names.get(node, node[:8]), []).append(a["name"].split("::", 1)[1])
    return placement


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
    p.add_argument("--kill", default="Quality,Moderation,Ocr,Persons,Gateway",
                   help="deployments whose replicas are killed under load, one after another ('' for none)")
    p.add_argument("--soak-s", type=float, default=600.0, help="seconds of saturating good traffic (0: no soak)")
    p.add_argument("--soak-concurrency", type=int, default=16)
    p.add_argument("--cluster", action="store_true",
                   help="instead: Serve spread over a two-raylet local cluster, one worker raylet killed under load")
    p.add_argument("--out", default="runs/bench/chaos.json")
    a = p.parse_args(argv)
    os.environ["RAY_AUTH_MODE"] = "token"
    if a.cluster:
        res = cluster_kill()
        print(json.dumps(res, indent=2))
        out = Path(a.out).with_name(Path(a.out).stem + "_cluster.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(res, indent=2))
        return 0 if res["lost"] == 0 and res["stream_state_kept"] else 1
    from serve_apps.common import SERVE_MODES

    os.environ.update(SERVE_MODES["throughput"])
    import httpx
    import ray
    from ray import serve

    from benchmarks.loadgen import start_local_ray
    from benchmarks.procstats import as_rows, format_table, serve_process_stats
    from serve_apps.gateway import build_app

    key, key_file, port = start_local_ray()
    result: dict[str, Any] = {"requests": a.requests}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"gateway": {"key_file": key_file}, "streams": {"db_path": "runs/chaos_streams.sqlite"},
                             "persons": {}}),
                  name="livelens", route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        before = httpx.get(f"{url}/healthz", timeout=30).json()
        result["rss_start"] = as_rows(serve_process_stats("livelens"))
        rows = table_rows(asyncio.run(run_hostile(url, key, a.requests, a.concurrency)))
        result["kills"] = [kill_summary(asyncio.run(kill_under_load(url, key, "livelens", d, n=48)))
                           for d in filter(None, a.kill.split(","))]
        if a.soak_s > 0:
            result["soak"] = asyncio.run(soak(url, key, a.soak_s, a.soak_concurrency, app="livelens"))
        after = httpx.get(f"{url}/healthz", timeout=60)
        final = serve_process_stats("livelens", uss=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    result.update(cases=rows, total_5xx=sum(r["5xx"] for r in rows),
                  outside_envelope=sum(r["outside_envelope"] for r in rows), healthz_after=after.status_code,
                  uptime_before_s=before["uptime_s"], rss_end=as_rows(final))
    for r in rows:
        print(f"{r['case']:28s} {json.dumps(r['codes']):40s} 5xx={r['5xx']} outside_envelope={r['outside_envelope']}")
    for k in result["kills"]:
        print(f"kill {k['deployment']:12s} replicas={k['killed']} codes={json.dumps(k['codes'])} lost={k['lost']} "
              f"back_in={k['recovered_s']} s")
    if "soak" in result:
        sk = result["soak"]
        print(f"soak {sk['seconds']:.0f} s: codes={json.dumps(sk['codes'])} unexpected={sk['unexpected']}")
        for role, g in sk["growth"].items():
            print(f"  {role:32s} rss trend {g['rss_trend']:+.1%} windows {g['rss']:+.1%} anon trend "
                  f"{g['anon_trend']:+.1%} windows {g['anon']:+.1%} shm {g['shmem_mb']:+.0f} MB "
                  f"fds {g['fds']:+d} threads {g['threads']:+d} processes {g['processes']:+d}")
    print(format_table(final))
    print(json.dumps({k: v for k, v in result.items() if k in ("requests", "total_5xx", "outside_envelope",
                                                                "healthz_after")}))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=2))
    lost = sum(k["lost"] for k in result["kills"] if k["deployment"] != "Gateway")
    soak_ok = "soak" not in result or (result["soak"]["unexpected"] == 0 and all(
        g["rss_trend"] < 0.05 for g in result["soak"]["growth"].values()))
    return 0 if (result["total_5xx"] == 0 and result["outside_envelope"] == 0 and lost == 0 and soak_ok
                 and not any(r["wrong_2xx"] for r in rows)) else 1


if __name__ == "__main__":
    sys.exit(main())

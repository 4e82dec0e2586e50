"""The serving benchmark's load generator reads real HTTP/1.1 answers correctly."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.loadgen import Connection, Multipart, run_load


class _Echo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        out = json.dumps({"path": self.path, "n": len(body), "ctype": self.headers.get("Content-Type"),
                          "head": body[:40].decode("latin-1")}).encode()
        self.send_response(200 if self.path.startswith("/ok") else 418)
        if self.path.startswith("/ok/chunked"):
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(out), 7):
                piece = out[i:i + 7]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
            return
        self.send_header("Content-Length", str(len(out)))
        if self.path.startswith("/ok/close"):
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server_url():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


@pytest.mark.parametrize("path", ["/ok/plain", "/ok/chunked", "/ok/close"])
def test_connection_reads_whole_answers_and_reuses_or_reconnects(server_url, path):
    async def go():
        conn = Connection(server_url)
        answers = [await conn.request("POST", path, b"x" * (1000 * k), {"Content-Type": "image/jpeg"})
                   for k in range(3)]
        await conn.close()
        return answers

    answers = asyncio.run(go())
    assert [r.status for r in answers] == [200, 200, 200]
    assert [json.loads(r.body)["n"] for r in answers] == [0, 1000, 2000]
    assert json.loads(answers[0].body)["ctype"] == "image/jpeg"


def test_run_load_counts_every_request_with_its_status(server_url):
    seen: dict[int, int] = {}
    wall = asyncio.run(run_load(server_url, "/teapot", [b"a", b"bb"], 25, 4, {}, {"evidence": "none"},
                                lambda i, r, ms: seen.__setitem__(i, r.status)))
    assert sorted(seen) == list(range(25)) and set(seen.values()) == {418}
    assert wall > 0


def test_run_load_sends_requests_below_the_urls_route_prefix(server_url):
    paths: list[str] = []
    asyncio.run(run_load(server_url + "/ok/app", "/v1/moderate", [b"x"], 3, 1, {}, {"evidence": "none"},
                         lambda i, r, ms: paths.append(json.loads(r.body)["path"])))
    assert paths == ["/ok/app/v1/moderate?evidence=none"] * 3


def test_multipart_body_parses_back_into_its_files():
    from email.parser import BytesParser

    mp = Multipart([("files", "0.jpg", b"\xff\xd8one", "image/jpeg"), ("files", "1.jpg", b"\xff\xd8two", "image/jpeg")])
    msg = BytesParser().parsebytes(f"Content-Type: {mp.content_type}\r\n\r\n".encode() + mp.body)
    parts = msg.get_payload()
    assert [p.get_filename() for p in parts] == ["0.jpg", "1.jpg"]
    assert [p.get_payload(decode=True) for p in parts] == [b"\xff\xd8one", b"\xff\xd8two"]

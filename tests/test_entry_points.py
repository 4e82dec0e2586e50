"""The ways in, without a cluster: answer options, job submission helpers, the dev key, committed notebooks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from livelens.errors import ConfigError, InvalidArgumentError
from livelens.serving import options
from livelens.taxonomy import load_taxonomy

REPO = Path(__file__).resolve().parents[1]
TAX = load_taxonomy()


def _answer() -> dict:
    labels = [TAX.describe("ads_phone", 0.9), TAX.describe("game_moba", 0.7), TAX.describe("ads_qrcode", 0.3)]
    for lab in labels:
        lab["model"] = "safety@1"
    return {"labels": labels, "decision": TAX.worst([lab["decision"] for lab in labels]),
            "moderation": {"heatmaps": [{"label": "ads_phone"}, {"label": "game_moba"}]}}


def test_options_parse_and_refuse_bad_values_with_what_is_allowed():
    parsed = options.parse_options({"evidence": "None", "min_confidence": "0.5", "categories": "ads, game",
                                    "model": "safety@2"}, TAX)
    assert parsed == options.AnswerOptions("none", 0.5, frozenset({"ads", "game"}), "safety@2")
    assert options.parse_options({}, TAX) == options.AnswerOptions()
    for bad, match in (({"evidence": "all"}, "evidence"), ({"min_confidence": "1.5"}, r"\[0, 1\]"),
                       ({"min_confidence": "inf"}, r"\[0, 1\]"), ({"min_confidence": "x"}, "number"),
                       ({"categories": "ads,nope"}, "nope"), ({"categories": ","}, "categories"),
                       ({"model": "ocr@1"}, "safety"), ({"model": "safety@1/../x"}, "safety")):
        with pytest.raises(InvalidArgumentError, match=match):
            options.parse_options(bad, TAX)


def test_filters_keep_matching_labels_and_recompute_the_decision():
    answer = options.apply(_answer(), options.AnswerOptions(categories=frozenset({"game"})), TAX)
    assert [lab["name"] for lab in answer["labels"]] == ["game_moba"]
    assert answer["decision"] == "pass" and answer["filters"]["decision_unfiltered"] == "block"
    assert answer["filters"]["labels_dropped"] == 2
    assert [h["label"] for h in answer["moderation"]["heatmaps"]] == ["game_moba"]
    answer = options.apply(_answer(), options.AnswerOptions(min_confidence=0.5), TAX)
    assert [lab["name"] for lab in answer["labels"]] == ["ads_phone", "game_moba"] and answer["decision"] == "block"
    untouched = _answer()
    assert options.apply(untouched, options.AnswerOptions(), TAX) == _answer()  # no filter, no change


def test_category_of_every_leaf_is_its_group():
    assert options.category_of(TAX, "ads_phone") == "ads"
    assert options.category_of(TAX, "porn_none") == "porn"
    assert options.category_of(TAX, "no_such_label") is None
    doc = options.taxonomy_document(TAX)
    leaves: list[str] = []

    def walk(nodes):
        for n in nodes:
            if "labels" in n:
                walk(n["labels"])
            else:
                leaves.append(n["name"])

    for cat in doc["categories"]:
        walk(cat["labels"])
    assert sorted(leaves) == sorted(n for n in TAX.leaves if n not in TAX.groups)


def test_stream_ids_that_a_url_would_rewrite_are_refused():
    from livelens.client import check_stream_id

    assert check_stream_id("demo:1 cam") == "demo:1 cam"
    for bad in ("demo/../x", "..", ".", "a\\b", "x?y", "x#y", "50%", " x", "", "a" * 200, "tab\there"):
        with pytest.raises(InvalidArgumentError):
            check_stream_id(bad)


def test_job_helpers_build_the_entrypoint_env_and_absolute_paths(tmp_path, monkeypatch):
    from livelens import jobs

    (tmp_path / "runs" / "data").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    args = jobs.absolutise(["--manifest", "runs/data", "--epochs", "3", "--storage-path=runs", "--x=s3://b/c",
                            "missing/dir"])
    assert args == ["--manifest", str(tmp_path / "runs/data"), "--epochs", "3", f"--storage-path={tmp_path / 'runs'}",
                    "--x=s3://b/c", "missing/dir"]
    assert jobs.entrypoint("safety", ["--epochs", "3"], "/venv/bin/python") == \
        "/venv/bin/python -m train_jobs.safety --epochs 3"
    with pytest.raises(ConfigError, match="unknown job 'safty'"):
        jobs.entrypoint("safty", [])
    monkeypatch.setenv("LIVELENS_MODEL_STORE", "s3://bucket/models")
    env = jobs.job_runtime_env()
    assert env["env_vars"]["LIVELENS_MODEL_STORE"] == "s3://bucket/models"
    assert "/datasets" in env["excludes"] and "/runs" in env["excludes"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_DASHBOARD_ADDRESS", raising=False)
    assert jobs.dashboard_address() == jobs.DEFAULT_DASHBOARD
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.5:8265/")
    assert jobs.dashboard_address() == "http://10.0.0.5:8265"
    assert jobs.dashboard_address("127.0.0.1:9999") == "http://127.0.0.1:9999"
    assert jobs.is_loopback("http://127.0.0.1:8265") and not jobs.is_loopback("http://10.0.0.5:8265")


def test_cli_jobs_without_a_cluster_is_one_line(capsys):
    from livelens.cli import main

    assert main(["jobs", "status", "raysubmit_x", "--address", "http://127.0.0.1:1"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("livelens jobs: cannot reach") and len(err.strip().splitlines()) == 1
    assert main(["jobs", "submit", "nope"]) == 2


def test_make_run_keeps_the_dev_key_until_it_is_rotated_or_revoked(tmp_path):
    from livelens.serving.auth import KeyStore
    from serve_apps.__main__ import dev_key

    key_file = str(tmp_path / "runs" / "api_keys.json")
    first, new = dev_key(key_file)
    assert new and KeyStore.load(key_file, env={}).authenticate(first, "analyze").id == "dev"
    assert os.stat(tmp_path / "runs" / "dev_key").st_mode & 0o077 == 0
    again, new = dev_key(key_file)
    assert again == first and not new  # a restart keeps the key clients hold
    rotated, new = dev_key(key_file, rotate=True)
    assert new and rotated != first
    store = KeyStore.load(key_file, env={})
    assert store.authenticate(rotated, "analyze").id == "dev"
    # Revoked by hand (the entry removed from the key file): the next start makes a new one.
    Path(key_file).write_text(json.dumps({"keys": []}))
    fresh, new = dev_key(key_file)
    assert new and fresh != rotated


def test_committed_notebooks_carry_no_outputs():
    import nbformat

    books = sorted((REPO / "notebooks").glob("*.ipynb"))
    assert [b.stem[:2] for b in books] == ["01", "02", "03", "04"]
    for path in books:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} carries outputs"


def test_jobs_submit_splits_its_own_flags_from_the_jobs(monkeypatch):
    from livelens import cli, jobs

    seen = {}

    def fake_submit(job, args, **kw):
        seen.update(job=job, args=args, **kw)
        return "raysubmit_test"

    monkeypatch.setattr(jobs, "submit", fake_submit)
    monkeypatch.setattr(jobs, "wait", lambda sid, address=None: "SUCCEEDED")
    code = cli.main(["jobs", "submit", "safety", "--address", "http://127.0.0.1:9", "--wait", "--store", "/s",
                     "--", "--epochs", "3", "--wait"])
    assert code == 0 and seen["job"] == "safety" and seen["args"] == ["--epochs", "3", "--wait"]
    assert seen["address"] == "http://127.0.0.1:9" and seen["store"] == "/s"
    assert cli.main(["health", "--", "--x"]) == 2


def test_frame_timestamps_must_be_finite_and_not_far_ahead():
    from livelens.serving.streams import MAX_TS_AHEAD_S, check_ts

    now = 1_800_000_000.0
    assert check_ts(None, now) is None and check_ts("", now) is None
    assert check_ts("1000", now) == 1000.0 and check_ts(now + MAX_TS_AHEAD_S - 1, now) == now + MAX_TS_AHEAD_S - 1
    for bad in ("inf", "-inf", "nan", "abc", -1, now + MAX_TS_AHEAD_S + 1, [1]):
        with pytest.raises(InvalidArgumentError, match="ts must be"):
            check_ts(bad, now)


def test_deeply_nested_json_is_an_invalid_argument():
    from livelens.serving.inputs import InputPolicy, images_from_json

    for batch in (False, True):
        with pytest.raises(InvalidArgumentError, match="nested too deeply"):
            images_from_json(b"[" * 100_000, InputPolicy(), batch)


def test_batches_pay_per_image_and_failed_key_checks_are_limited_per_address():
    from livelens.errors import AuthError, RateLimitedError
    from livelens.serving.auth import ApiKey, KeyStore, hash_key

    store = KeyStore([ApiKey(id="k", sha256=hash_key("good"), rate_per_s=1, burst=10)])
    entry = store.authenticate("good", "ocr", "10.0.0.1")
    store.charge(entry, 8)  # 1 + 8 of 10 tokens
    with pytest.raises(RateLimitedError, match="images/s") as exc:
        store.charge(entry, 5)
    assert exc.value.retry_after_s > 0
    with pytest.raises(RateLimitedError, match="at once"):
        store.charge(entry, 11)  # more than the burst can never succeed: a clear message, not a wait
    codes = []
    for _ in range(int(KeyStore.FAILED_AUTH_BURST) + 5):
        try:
            store.authenticate("guess", "ocr", "10.0.0.9")
        except AuthError:
            codes.append(401)
        except RateLimitedError:
            codes.append(429)
    assert codes.count(401) == KeyStore.FAILED_AUTH_BURST and codes[-1] == 429
    with pytest.raises(AuthError):  # another address is not held back
        store.authenticate("guess", "ocr", "10.0.0.10")


def test_the_notebooks_manifest_is_written_once_with_frames_to_validate_on(tmp_path):
    """Notebooks 02 and 03 both call demo_manifest, so the training notebook runs without the data one."""
    from livelens.data.frames import demo_manifest
    from livelens.data.manifest import load_card, read_manifest

    path = tmp_path / "frames"
    assert demo_manifest(path) == path
    splits = read_manifest(path).column("split").to_pylist()
    assert len(splits) >= 48 and splits.count("val") >= 3 and splits.count("train") > splits.count("val")
    card = load_card(path)
    assert card["seed"] == 3 and card["slots"] == 48
    stamp = (path / "card.json").stat().st_mtime_ns
    demo_manifest(path)  # a second call (the second notebook) keeps the set it finds
    assert (path / "card.json").stat().st_mtime_ns == stamp

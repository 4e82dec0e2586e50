"""Retrain → gate → publish: the gate's decisions, the merge's leak guard, and one tiny turn end to end."""

from __future__ import annotations

import math

import pytest

from livelens.data.manifest import read_manifest
from livelens.errors import ConfigError
from livelens.loop.labels import LabelStore
from livelens.loop.retrain import RetrainJob, gate, merge_labelled
from tests.test_train_jobs import make_frames_manifest


def m(recall: float, precision: float) -> dict:
    return {"recall": recall, "precision": precision}


def test_the_gate_blocks_a_covered_label_that_regresses_and_names_it():
    served = {"ads_qrcode": m(0.96, 0.97), "ads_phone": m(0.90, 0.95), "ads_logo": m(0.0, math.nan)}
    ok = gate(served, {"ads_qrcode": m(0.95, 0.98), "ads_phone": m(0.91, 0.94), "ads_logo": m(0.8, 0.9)}, 0.02)
    assert ok["passed"] and ok["covered"] == ["ads_phone", "ads_qrcode"]
    assert ok["gained"] == [{"label": "ads_logo", "recall": 0.8}]  # the served model found none
    bad = gate(served, {"ads_qrcode": m(0.80, 0.98), "ads_phone": m(0.91, 0.90)}, 0.02)
    assert not bad["passed"]
    assert [(b["label"], b["metric"], b["drop"]) for b in bad["blocked"]] == [
        ("ads_qrcode", "recall", 0.16), ("ads_phone", "precision", 0.05)]  # worst first
    # A label the candidate never predicts has an undefined precision: it counts as 0, not as a pass.
    assert gate(served, {"ads_qrcode": m(0.96, math.nan), "ads_phone": m(0.9, 0.95)}, 0.02)["blocked"][0][
        "metric"] == "precision"
    assert gate(served, {"ads_qrcode": m(0.80, 0.98), "ads_phone": m(0.91, 0.90)}, 0.2)["passed"]
    with pytest.raises(ConfigError, match="tolerance"):
        RetrainJob(tolerance=1.5)


def test_labelled_frames_join_train_and_a_held_out_frame_is_refused(tmp_path):
    base = make_frames_manifest(tmp_path / "frames", slots=12)
    rows = read_manifest(base, columns=["id", "split"]).to_pylist()
    train_id = next(r["id"] for r in rows if r["split"] == "train")
    test_id = next(r["id"] for r in rows if r["split"] == "test")
    store = LabelStore.create(tmp_path / "labels", base)
    store.commit([train_id, test_id], add=["ads_logo"], by="alice")
    merged = merge_labelled(base, store.materialise(tmp_path / "labelled"), tmp_path / "merged", base)
    assert merged["refused_heldout"] == [test_id] and merged["replaced"] == 1 and merged["added"] == 0
    out = {r["id"]: r for r in read_manifest(merged["manifest"], columns=["id", "split", "labels"]).to_pylist()}
    assert len(out) == len(rows) and out[train_id]["labels"] == ["ads_logo"] and out[train_id]["split"] == "train"
    assert out[test_id]["split"] == "test" and "ads_logo" not in (out[test_id]["labels"] or [])


# One tiny turn end to end (labels, Ray Train candidate, both models on the held-out split through
# the service's evaluation, gate, publish) runs from the labelling page's button, as the child job
# below starts it: tests/test_serve_http.py::test_the_page_exports_tasks_and_its_retrain_button_trains_gates_and_publishes.


def test_the_job_goes_to_its_child_process_flag_for_flag():
    from livelens.cli_config import config_argv, config_from_args, config_parser

    job = RetrainJob(labels="l", base="b", limit=4, app="", train={"epochs": 1, "image_size": 64})
    back = config_from_args(RetrainJob(labels="other"), config_parser(RetrainJob).parse_args(config_argv(job)))
    assert back == job


def test_the_page_runner_starts_one_run_and_reports_a_failed_one_with_its_log(tmp_path):
    """A run whose label store is gone fails in the child; the status says so, with the child's own error."""
    import time

    from livelens.errors import ConflictError
    from livelens.loop.retrain import RetrainRunner

    with pytest.raises(ConfigError, match="does not exist"):
        RetrainRunner(RetrainJob(labels=str(tmp_path / "labels"), base=str(tmp_path / "none"))).start("alice")
    base = make_frames_manifest(tmp_path / "frames", slots=4)
    runner = RetrainRunner(RetrainJob(labels=str(tmp_path / "no-labels"), base=str(base), out=str(tmp_path / "runs")))
    assert runner.status() == {"state": "idle"}
    st = runner.start("alice")
    assert st["state"] == "running" and st["by"] == "alice"
    with pytest.raises(ConflictError):
        runner.start("bob")
    deadline = time.time() + 120
    while (st := runner.status())["state"] == "running":
        assert time.time() < deadline
        time.sleep(0.5)
    assert st["state"] == "failed" and st["exit_code"] == 2 and "not a label store" in st["log_tail"], st

"""Retrain → gate → publish: the gate's decisions, the merge's leak guard, and one tiny turn end to end."""

from __future__ import annotations

import json
import math

import pytest

from livelens.data.manifest import read_manifest
from livelens.errors import ConfigError
from livelens.loop.labels import LabelStore
from livelens.loop.retrain import RetrainJob, format_report, gate, merge_labelled
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


@pytest.mark.slow
@pytest.mark.ray
def test_one_tiny_turn_trains_evaluates_both_gates_and_publishes(ray_session, tmp_path):
    """Labels → merged manifest → Ray Train candidate (staging) → served vs candidate through the
    service's evaluation → gate → the user store. A tolerance of 1 lets the tiny candidate pass."""
    from livelens.store import ModelStore, store_chain

    base = make_frames_manifest(tmp_path / "frames", slots=16)
    rows = read_manifest(base, columns=["id", "split", "labels"]).to_pylist()
    store = LabelStore.create(tmp_path / "labels", base)
    logos = [r["id"] for r in rows if r["split"] == "train"][:3]
    store.commit(logos, add=["ads_logo"], by="alice")
    job = RetrainJob(labels=str(tmp_path / "labels"), base=str(base), out=str(tmp_path / "runs"), tolerance=1.0,
                     store=str(tmp_path / "user"), limit=4,
                     train={"pretrained": False, "freeze_backbone": False, "evidence_crop": False, "image_size": 64,
                            "num_workers": 1, "cpus_per_worker": 0.5, "epochs": 1, "batch_size": 8})
    from livelens.loop.retrain import retrain

    report = retrain(job)
    assert report["manifest"]["replaced"] == 3 and report["served"]["ref"] == "safety"
    assert report["served"]["rows"] == report["candidate"]["rows"] == min(4, sum(r["split"] == "test" for r in rows))
    # Published above every safety version the serving chain holds: an empty store's "safety@1"
    # would share its ref with the shipped model, and a swap to it would change nothing.
    served_versions = [int(v) for st in store_chain() for v in ModelStore(st).versions("safety") if v.isdigit()]
    assert report["gate"]["passed"] and report["published"] == f"safety@{max(served_versions) + 1}"
    card = ModelStore(str(tmp_path / "user")).card(report["published"])
    assert card["gate"]["gate"]["tolerance"] == 1.0 and card["gate"]["served"]["ref"] == "safety"
    # The same figures at tolerance 0 block exactly where the candidate fell behind.
    strict = gate({k: v["served"] for k, v in report["per_label"].items() if v["served"]},
                  {k: v["candidate"] for k, v in report["per_label"].items() if v["candidate"]}, 0.0)
    behind = {lab for lab, v in report["per_label"].items() if v["served"] and v["candidate"]
              and (v["served"]["recall"] or 0) > 0 and v["candidate"]["recall"] < v["served"]["recall"]}
    assert behind <= {b["label"] for b in strict["blocked"]}
    saved = json.loads((tmp_path / "runs" / report["dir"].split("/")[-1] / "report.json").read_text())
    assert saved["published"] == report["published"] and "# Retrain: passed" in format_report(saved)

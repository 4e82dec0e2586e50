"""The shared fusion rules, label coverage and the service-level evaluation (precision and recall first)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from livelens import fusion
from livelens.coverage import coverage_rows, safety_covers, served_models, summary, to_markdown
from livelens.errors import ManifestError
from livelens.evaluation import (
    evaluate_service,
    evaluate_services,
    format_table,
    frame_predictions,
    label_metrics,
    meets_goal,
)
from livelens.taxonomy import load_taxonomy

TAX = load_taxonomy()


def test_label_metrics_count_tp_fp_fn_and_leave_undefined_figures_nan():
    truth = [{"a"}, {"a", "b"}, set(), set()]
    pred = [{"a"}, {"b"}, {"a"}, set()]
    m = label_metrics(truth, pred, ["a", "b", "c"])
    assert (m["a"]["tp"], m["a"]["fp"], m["a"]["fn"]) == (1, 1, 1)
    assert m["a"]["precision"] == 0.5 and m["a"]["recall"] == 0.5 and m["a"]["support"] == 2
    assert m["b"]["precision"] == m["b"]["recall"] == 1.0 and meets_goal(m["b"])
    assert math.isnan(m["c"]["precision"]) and math.isnan(m["c"]["recall"]) and not meets_goal(m["c"])
    with pytest.raises(ValueError):
        label_metrics(truth, pred[:2], ["a"])


def _lab(name: str, score: float, model: str) -> dict:
    return fusion.make_label(TAX, name, score, model)


def test_fires_uses_the_served_threshold_and_ignores_overruled_labels():
    review = TAX.labels["ads_logo"].review
    assert fusion.fires(TAX, _lab("ads_logo", review, "safety@1"))
    assert not fusion.fires(TAX, _lab("ads_logo", review - 0.01, "safety@1"))
    tag = TAX.labels["game_honor_of_kings"]
    assert _lab("game_honor_of_kings", 0.99, "safety@1")["decision"] == "pass"  # a tag never blocks...
    assert fusion.fires(TAX, _lab("game_honor_of_kings", tag.threshold, "safety@1"))  # ...but it is predicted
    assert not fusion.fires(TAX, {**_lab("ads_phone", 0.9, "safety@1"), "overruled": "OCR read none"})


def test_frame_predictions_score_each_source_alone_and_left_out():
    parts = {"moderate": {"labels": [_lab("ads_phone", 0.9, "safety@1"), _lab("ads_logo", 0.95, "safety@1")]},
             "ocr": {"labels": [_lab("ads_url", 1.0, "ppocr@rapidocr-3.10.0"), _lab("ads_logo", 0.8, "ads_regions@3")]}}
    got = frame_predictions(TAX, parts)
    # OCR ran and read no phone: the classifier's phone is overruled; the logo has two sources.
    assert got["fused"] == {"ads_url", "ads_logo"}
    assert got["alone"]["classifier"] == {"ads_phone", "ads_logo"} and got["alone"]["entities"] == {"ads_url"}
    assert got["without"]["regions"] == {"ads_url", "ads_logo"} and got["without"]["entities"] == {"ads_logo"}
    assert got["without"]["classifier"] == {"ads_url", "ads_logo"}


class ToyAnalyzer:
    """Calls every frame a watermark; OCR "reads" a phone where the truth has one."""

    tax = TAX

    def __init__(self, rows):
        self.truth = {r["id"]: set(r["labels"] or []) for r in rows}
        self.seen = 0

    def parts(self, image):
        self.seen += 1
        return {"moderate": {"labels": [_lab("ads_watermark", 0.9, "safety@9")]}, "ocr": {"labels": []}}

    def models(self):
        return ["safety@9"]


def test_evaluate_service_on_a_generated_manifest(tmp_path):
    from livelens.data import read_manifest, write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames

    cfg = FrameConfig()
    manifest = write_manifest(generate_frames(0, 12, seed=5, cfg=cfg), tmp_path / "frames", frames_card(5, 12, cfg),
                              contact_sheet=False)
    rows = read_manifest(manifest).to_pylist()
    toy = ToyAnalyzer(rows)
    res = evaluate_service(toy, str(manifest), split="train", limit=6, progress=lambda d, n: None)
    assert res["rows"] == 6 == toy.seen and res["models"] == ["safety@9"]
    wm = res["fused"]["ads_watermark"]
    train = [r for r in rows if r["split"] == "train"][:6]
    positives = sum("ads_watermark" in (r["labels"] or []) for r in train)
    assert wm["predicted"] == 6 and wm["support"] == positives and wm["tp"] == positives
    assert wm["precision"] == pytest.approx(positives / 6)
    assert res["without"]["classifier"]["ads_watermark"]["predicted"] == 0
    assert "quality_frozen" not in res["fused"]  # temporal labels are not per-frame truth
    table = format_table(res)
    assert table.splitlines()[0].startswith("| label | support | fused P | fused R |") and "ads_watermark" in table
    with pytest.raises(ManifestError, match="no rows in split 'nope'"):
        evaluate_service(toy, str(manifest), split="nope")


def test_two_analysers_sharing_stages_run_them_once_per_frame_and_score_as_each_alone(tmp_path):
    """The retrain gate compares two safety models: the stages they share run once per frame."""
    from livelens.analyzer import LocalAnalyzer
    from livelens.data import write_manifest
    from livelens.data.frames import FrameConfig, frames_card, generate_frames

    cfg = FrameConfig()
    manifest = str(write_manifest(generate_frames(0, 8, seed=7, cfg=cfg), tmp_path / "frames",
                                  frames_card(7, 8, cfg), contact_sheet=False))
    caps = ("moderate", "quality")
    a = LocalAnalyzer(caps=caps, use_open_nsfw=False, evidence="none", threads=1)
    b = LocalAnalyzer(caps=caps, use_open_nsfw=False, evidence="none", threads=1, share_from=a)
    assert b.quality is a.quality and b.moderation is not a.moderation and b.tax is a.tax
    calls = []
    assess = a.quality.assess
    # Frames only: models() also asks the quality stage for its refs, on a 16×16 probe.
    a.quality.assess = lambda rgb: (rgb.shape[0] > 16 and calls.append(rgb.shape)) or assess(rgb)
    both = evaluate_services({"a": a, "b": b}, manifest, split="train", limit=4)
    assert len(calls) == 4  # not 8
    alone = evaluate_service(b, manifest, split="train", limit=4)
    assert len(calls) == 8

    def counts(res):
        return {lab: (m["tp"], m["fp"], m["fn"]) for lab, m in res["fused"].items()}

    assert counts(both["a"]) == counts(both["b"]) == counts(alone) and both["b"]["rows"] == 4
    assert any(m["predicted"] for m in alone["fused"].values())
    with pytest.raises(ValueError, match="at least one"):
        evaluate_services({}, manifest)


def test_coverage_lists_every_leaf_and_says_which_have_no_source():
    rows = coverage_rows(TAX, served_models())
    by = {r["label"]: r for r in rows}
    assert set(by) == set(TAX.leaves) and len(rows) == len(TAX.leaves)
    assert by["ads_qrcode"]["status"] == "covered" and by["quality_frozen"]["sources"][0]["source"] == "stream_state"
    assert by["exposure_genitals"]["status"] == "category" and by["weapon_gun"]["status"] == "none"
    assert by["ads_logo"]["sources"] and any(s["source"] == "text_regions" for s in by["ads_logo"]["sources"])
    s = summary(rows)
    assert s["covered"] + s["category"] + s["none"] == s["leaves"] == len(TAX.leaves)
    text = to_markdown(rows)
    assert f"{s['covered']} of {s['leaves']} leaf labels" in text and "| weapon_gun | violence | none |" in text


def test_a_head_covers_only_labels_it_was_trained_on():
    card = {"datasets": ["frames@1"], "eval_split": "test", "threshold_rule": "served",
            "train_label_counts": {"ads_phone": 12},
            "metrics": {"per_label": {"ads": {"labels": {
                "ads_none": {"precision": 1, "recall": 1, "support": 5},
                "ads_phone": {"precision": 0.9, "recall": 0.8, "f1": 0.85, "support": 4},
                "ads_logo": {"precision": 0.0, "recall": 0.0, "support": 0}}}}}}
    covers = safety_covers(card)
    assert [c["label"] for c in covers] == ["ads_phone"] and covers[0]["metrics"]["recall"] == 0.8
    # Older cards without training counts: held-out support is the only evidence they carry.
    old = {k: v for k, v in card.items() if k != "train_label_counts"}
    assert [c["label"] for c in safety_covers(old)] == ["ads_phone"]


def test_assemble_is_what_the_gateway_answers():
    results = {"moderate": {"labels": [_lab("ads_qrcode", 0.95, "safety@1")], "models": ["safety@1"], "heatmaps": []},
               "quality": {"labels": [_lab("quality_blur", 1.0, fusion.QUALITY_MODEL)], "models": [fusion.QUALITY_MODEL]}}
    out = fusion.assemble(TAX, results, (640, 360))
    assert out["decision"] == "block" and out["image"] == {"width": 640, "height": 360}
    assert out["models"] == sorted(["safety@1", fusion.QUALITY_MODEL]) and "heatmaps" in out["moderation"]
    assert [lab["name"] for lab in out["labels"]] == ["quality_blur", "ads_qrcode"]  # by score
    assert np.isclose(out["labels"][1]["score"], 0.95)


def test_the_region_model_decides_overlay_labels_only_when_it_ran():
    moderate = {"labels": [_lab("ads_watermark", 0.9, "safety@1"), _lab("ads_url", 0.9, "safety@1")],
                "models": ["safety@1"]}
    with_regions = {"labels": [], "models": ["ppocr@x", "ads_regions@3"]}
    out = fusion.assemble(TAX, {"moderate": moderate, "ocr": with_regions}, (640, 360))
    by = {lab["name"]: lab for lab in out["labels"]}
    assert out["decision"] == "pass" and by["ads_watermark"]["overruled"] and by["ads_url"]["overruled"]
    assert not fusion.fired(TAX, out["labels"])
    # OCR without the region model still decides the contact labels, but not the overlays.
    out = fusion.assemble(TAX, {"moderate": moderate, "ocr": {"labels": [], "models": ["ppocr@x"]}}, (640, 360))
    assert fusion.fired(TAX, out["labels"]) == {"ads_watermark"}
    # A hit of the region model itself stands, and the classifier's (higher) score is merged into it.
    hit = _lab("ads_watermark", 0.7, "ads_regions@3")
    out = fusion.assemble(TAX, {"moderate": moderate, "ocr": {**with_regions, "labels": [hit]}}, (640, 360))
    assert fusion.fired(TAX, out["labels"]) == {"ads_watermark"}
    (mark,) = [lab for lab in out["labels"] if lab["name"] == "ads_watermark"]
    assert np.isclose(mark["score"], 0.9) and not mark.get("overruled")


def test_photos_other_packages_ship_are_found_where_they_are_installed():
    """imgaug's quokka (a dependency here), insightface's group photo (installed by the setup without
    its dependencies) and Label Studio's samples (the setup's .venv-ls)."""
    from pathlib import Path

    import livelens
    from livelens.evaluation import PACKAGE_PHOTOS, package_photo_paths
    from livelens.imageio import load_image

    found = package_photo_paths()
    wanted = {f"{pkg}/{n}" for pkg, _, names in PACKAGE_PHOTOS for n in names}
    assert set(found) == wanted, sorted(wanted - set(found))  # make setup installs both
    for path in found.values():
        # Read where the package put it, never from a copy in the repository's code.
        assert path.is_file() and not path.is_relative_to(Path(livelens.__file__).parent)
        assert min(load_image(path).shape[:2]) >= 300

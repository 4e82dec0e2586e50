"""The multi-task person-attribute network: crops, drawn glasses and hats, its data, serving and training."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from livelens.errors import ConfigError
from livelens.persons import attrdata
from livelens.persons.attributes import (
    CROP_SIZE,
    HEADS,
    AttributeModel,
    attr_crop,
    create_attribute_net,
    crop_matrix,
    draw_glasses,
    draw_hat,
)
from livelens.persons.engine import PersonsEngine, PersonsSettings

EYES = [(40.0, 50.0), (60.0, 50.0), (50.0, 60.0), (42.0, 70.0), (58.0, 70.0)]


def test_the_crop_centres_the_face_with_room_above_and_pads_outside_the_image_black():
    rgb = np.full((200, 300, 3), 200, np.uint8)
    box = [100, 80, 140, 120]
    m = crop_matrix(box)
    cx, cy = m[:, :2] @ np.array([120.0, 100.0]) + m[:, 2]
    assert cx == pytest.approx(CROP_SIZE / 2) and cy > CROP_SIZE / 2  # the face sits below centre: a hat fits
    crop = attr_crop(rgb, box)
    assert crop.shape == (CROP_SIZE, CROP_SIZE, 3) and crop.dtype == np.uint8 and (crop == 200).all()
    edge = attr_crop(rgb, [0, 0, 40, 40])  # a face in the corner: its top-left context is off the image
    assert (edge[:5, :5] == 0).all() and (edge[-5:, -5:] == 200).all()
    big = attr_crop(np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (4, 4000, 3))[:1024], [0, 0, 3000, 1000])
    assert big.shape == (CROP_SIZE, CROP_SIZE, 3)  # a huge box is shrunk first, not aliased away


def test_glasses_are_drawn_over_the_eyes_and_hats_above_them_only():
    grey = np.full((120, 100, 3), 128, np.uint8)
    for seed in range(5):
        g = np.abs(draw_glasses(grey, EYES, np.random.default_rng(seed)).astype(int) - 128).sum(2) > 0
        ys, xs = np.nonzero(g)
        assert g.sum() > 20 and ys.min() >= 50 - 15 and ys.max() <= 50 + 15, seed  # a band around the eye line
        assert xs.min() >= 40 - 25 and xs.max() <= 60 + 25
        h = np.abs(draw_hat(grey, EYES, np.random.default_rng(seed)).astype(int) - 128).sum(2) > 0
        ys, _ = np.nonzero(h)
        assert h.sum() > 200 and ys.max() < 50 - 5, seed  # all of it above the eyes
    # Turned landmarks turn the drawing: a face lying on its side gets its hat to the side.
    side = [(50.0, 60.0), (50.0, 40.0), (60.0, 50.0), (70.0, 58.0), (70.0, 42.0)]
    h = np.abs(draw_hat(grey, side, np.random.default_rng(0)).astype(int) - 128).sum(2) > 0
    assert np.nonzero(h)[1].max() < 50 - 5
    with pytest.raises(ConfigError, match="coincide"):
        draw_glasses(grey, [(5.0, 5.0)] * 5, np.random.default_rng(0))


def test_the_pools_are_photo_disjoint_and_the_test_faces_are_hand_labelled(shared_data):
    train_photos, train = attrdata.real_faces("train")
    test_photos, test = attrdata.real_faces("test")
    assert not set(train_photos) & set(test_photos)
    assert len(test) == 25 and all(f.gender in ("female", "male") for f in test)
    assert sum(f.glasses for f in test) == 1 and len(train) >= 40
    assert sum(f.photo == "insightface/t1.jpg" for f in train) == 6  # read where the package put it
    assert {f.photo for f in train if f.glasses and f.hat} == {"grace_hopper"}
    with pytest.raises(ConfigError, match="split"):
        attrdata.real_faces("validation")


def test_samples_are_reproducible_and_labelled_by_what_was_drawn(shared_data):
    a, b = attrdata.make_sample(3, 11), attrdata.make_sample(3, 11)
    assert np.array_equal(a["crop"], b["crop"]) and a["crop"].shape == (CROP_SIZE, CROP_SIZE, 3)
    assert a["gender"].sum() == pytest.approx(1, abs=1e-4) and a["age"].shape == (81,)
    none = attrdata.make_sample(0, 5, p_glasses=0.0, p_hat=0.0)
    both = attrdata.make_sample(0, 5, p_glasses=1.0, p_hat=1.0)
    assert (both["glasses"], both["hat"]) == (1, 1)
    assert not np.array_equal(none["crop"], both["crop"])


def test_an_in_memory_network_serves_through_the_engine_with_glasses_hat_and_minors():
    torch.manual_seed(0)
    net = create_attribute_net(pretrained=False)
    with torch.no_grad():  # bias every head: a child with glasses and no hat
        for name, cls in (("age", 8), ("glasses", 1), ("hat", 0), ("gender", 1)):
            layer = net.head.fc[name]
            layer.weight.zero_()
            layer.bias.fill_(0)
            layer.bias[cls] = 20.0
    eng = PersonsEngine(attribute_model=AttributeModel(net))
    out = eng.analyze(skimage.data.astronaut())
    attrs = out["faces"][0]["attributes"]
    assert attrs["gender"]["value"] == "male" and attrs["glasses"]["value"] is True and attrs["hat"]["value"] is False
    assert attrs["age"]["value"] == 8 and attrs["age"]["band"] == "minors_child"
    labels = {lab["name"]: lab for lab in out["labels"]}
    assert set(labels) >= {"minors_present", "minors_child"} and labels["minors_child"]["model"] == "in-memory"
    assert out["models"][-1] == "in-memory" and eng.teacher is None


def test_bad_attribute_models_are_refused(tmp_path, monkeypatch):
    from pydantic import ValidationError

    from livelens.store import ModelStore
    from serve_apps.persons import PersonsConfig

    with pytest.raises(ConfigError, match="attribute_model"):
        PersonsSettings(attribute_model="../x")
    with pytest.raises(ValidationError):
        PersonsConfig(attribute_model="Teacher!")
    store = ModelStore(str(tmp_path))
    ref = store.save("not_attrs", {"w": torch.zeros(1)}, {"task": "object_detection"})
    with pytest.raises(ConfigError, match="not a person-attribute model"):
        AttributeModel(ref, [str(tmp_path)])


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_attribute_run_publishes_a_model_the_persons_stage_serves(ray_session, tmp_path, monkeypatch, shared_data):
    """Ray Train on the shared loop → the store (card: heads, crop, distillation, held-out figures) → the engine."""
    from livelens.persons.attr_train import AttrTrainConfig, run
    from livelens.store import ModelStore
    from train_jobs.persons_attr import parse_args, preset_config

    cfg = preset_config("smoke")
    cfg = AttrTrainConfig(**{**cfg.__dict__, "store": str(tmp_path / "store"), "storage_path": str(tmp_path / "ray")})
    out = run(cfg)
    assert out["ref"] == "persons_attr@1"
    card = ModelStore(cfg.store).card(out["ref"])
    assert card["task"] == "person_attributes" and set(card["arch"]["heads"]) == set(HEADS)
    assert "distilled" in card["licence"]["teacher"] and card["arch"]["crop"]["size"] == CROP_SIZE
    m = card["metrics"]
    assert m["global_step"] == 2 and np.isfinite(m["train_loss"])
    assert m["test_instances"] == 25 and 0 <= m["test_glasses_recall"] <= 1 and 0 <= m["test_gender_accuracy"] <= 1
    monkeypatch.setenv("LIVELENS_MODEL_STORE", cfg.store)
    eng = PersonsEngine(PersonsSettings(attribute_model="persons_attr"))
    answer = eng.analyze(skimage.data.astronaut())
    assert answer["models"][-1] == "persons_attr@1" and set(answer["faces"][0]["attributes"]) == {
        "gender", "age", "glasses", "hat"}
    assert parse_args(["--preset", "cpu", "--samples", "50"]).preset == "cpu"

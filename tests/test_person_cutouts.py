"""Whole-person cut-outs: mediapipe's selfie segmentation in its own virtualenv, split per person."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from livelens.errors import ConfigError
from livelens.persons import cutouts as C

# The astronaut's face as face_photos boxes it (MTCNN mapped to dlib's style).
ASTRONAUT_FACE = [172.8, 73.3, 276.0, 169.6]


def test_the_astronaut_is_cut_out_head_to_waist_without_the_studio_behind_her():
    cuts = C.segment_people([("skimage/astronaut", skimage.data.astronaut(), [ASTRONAUT_FACE])])
    assert len(cuts) == 1
    c = cuts[0]
    face_h = c.face[3] - c.face[1]
    assert C._covered(c.alpha, c.face) > 0.9  # her face is in the mask
    assert c.body[3] - c.face[3] > 2.5 * face_h  # the suit below it too
    assert c.body[0] <= c.face[0] and c.body[2] >= c.face[2]
    # The dark studio backdrop in the top corners is not her.
    assert (c.alpha[:60, :60] < C.BODY_ALPHA).mean() > 0.95 and (c.alpha[:60, -60:] < C.BODY_ALPHA).mean() > 0.95
    assert c.rgb.shape[:2] == c.alpha.shape


def test_a_joined_mask_is_split_between_two_people_side_by_side():
    alpha = np.zeros((200, 300), np.uint8)
    alpha[20:200, 40:260] = 255  # two people shoulder to shoulder: segmentation joins them
    faces = [[60, 20, 110, 70], [190, 20, 240, 70]]
    left, right = (C.own_share(alpha, [0, 0], faces, k) for k in range(2))
    assert C._covered(left, faces[0]) == 1.0 and C._covered(left, faces[1]) == 0.0
    assert C._covered(right, faces[1]) == 1.0 and C._covered(right, faces[0]) == 0.0
    assert ((left > 0) & (right > 0)).sum() == 0 and (left > 0).sum() + (right > 0).sum() == (alpha > 0).sum()


def test_every_cut_out_of_the_group_photos_is_one_person_and_testing_xml_never_enters(shared_data):
    from livelens.data.importers import import_dlib_xml
    from livelens.persons.detdata import face_photos

    photos = face_photos(str(shared_data))
    testing = {r["attributes"]["file"] for r in import_dlib_xml(shared_data / "faces" / "testing.xml")}
    assert not {n.rsplit("/", 1)[-1] for n, _, _ in photos} & testing
    groups = [p for p in photos if p[0].startswith(("shared/faces/", "insightface/")) and p[0] not in C.COLLAGES]
    cuts = C.segment_people(groups)
    # 8 of training.xml's four group photos, Tom Cruise, and insightface's six at a table.
    assert len(cuts) >= 12 and sum(c.photo == "insightface/t1.jpg" for c in cuts) >= 5, [c.photo for c in cuts]
    faces_of = {n: f for n, _, f in groups}
    for c in cuts:
        assert C._covered(c.alpha, c.face) >= C.MIN_FACE_COVER
        # No other face of the photo is inside this person's mask.
        dx, dy = c.origin
        shifted = [[f[0] - dx, f[1] - dy, f[2] - dx, f[3] - dy] for f in faces_of[c.photo]]
        others = [f for f in shifted if not np.allclose(f, c.face)]
        assert len(others) == len(shifted) - 1
        assert all(C._covered(c.alpha, o) <= C.MAX_OTHER_COVER for o in others)


def test_the_headshot_grid_gives_faces_and_no_person(shared_data, monkeypatch):
    from livelens.persons.detdata import face_photos

    photos = {n: b for n, _, b in face_photos(str(shared_data))}
    assert len(photos["shared/faces/bald_guys.jpg"]) == 24  # every tile's face is boxed
    segmented: list[str] = []
    monkeypatch.setattr(C, "segment_people", lambda ps: segmented.extend(p[0] for p in ps) or [])
    C.person_cutouts(str(shared_data))
    assert "insightface/t1.jpg" in segmented and "shared/faces/bald_guys.jpg" not in segmented
    assert set(segmented) == set(photos) - C.COLLAGES


def test_without_the_side_virtualenv_the_error_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LIVELENS_MP_PYTHON", str(tmp_path / "none" / "python"))
    with pytest.raises(ConfigError, match="make setup"):
        C.segment_people([("x", np.zeros((64, 64, 3), np.uint8), [[10, 10, 30, 30]])])

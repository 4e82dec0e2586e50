"""The containment rule shared by the cut-outs, the engine and the evaluation."""

from livelens.persons.boxes import face_holder, holds


def test_a_face_is_held_by_the_smallest_box_covering_most_of_it():
    face = [10, 10, 20, 20]
    assert holds([0, 0, 100, 100], face) and holds([11, 10, 20, 20], face)  # 90% covered
    assert not holds([15, 10, 20, 20], face)  # half
    assert not holds([30, 30, 40, 40], face) and not holds([0, 0, 5, 5], [0, 0, 0, 0])
    people = [[0, 0, 200, 200], [5, 5, 40, 60], [12, 0, 30, 30]]
    assert face_holder(face, people) == 2  # it covers exactly 80%, and is the smallest of the three
    assert face_holder(face, people[:2]) == 1
    assert face_holder(face, [[30, 30, 40, 40]]) is None and face_holder(face, []) is None

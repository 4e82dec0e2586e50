"""The label taxonomy: the shipped file's shape, the decision policy, and broken files."""

from __future__ import annotations

import pytest

from livelens.errors import TaxonomyError
from livelens.taxonomy import load_taxonomy, parse_taxonomy


def test_default_taxonomy_has_three_levels_and_enough_labels():
    tax = load_taxonomy()
    assert len(tax) >= 120
    assert {lab.level for lab in tax.labels.values()} == {1, 2, 3}
    # The seed's examples are all present in the hierarchy.
    assert tax.labels["exposure_female_breast"].parent == "porn_exposure"
    assert tax.ancestors("ads_qrcode") == ["ads_contact", "ads"]
    assert tax.ancestors("weapon_gun") == ["weapon", "violence"]
    for name in ("gambling", "drugs", "smoking", "minors", "religion", "jade", "game", "quality"):
        assert tax.labels[name].level == 1
    for name in ("quality_black", "quality_frozen", "quality_blur", "quality_dark", "quality_occluded"):
        assert tax.labels[name].group == "quality"


def test_groups_put_the_negative_first_and_cover_every_leaf_once():
    tax = load_taxonomy()
    seen: list[str] = []
    for group in tax.groups.values():
        assert group.classes[0] == group.negative
        assert group.negative not in tax.labels
        seen.extend(group.positives)
    assert sorted(seen) == sorted(n for n in tax.leaves if n not in tax.groups)
    assert len(seen) == len(set(seen))
    assert tax.class_of("ads_phone")[0] == "ads"
    assert tax.class_of("porn_none") == ("porn", 0)


@pytest.mark.parametrize(
    ("label", "score", "expected"),
    [
        ("ads_phone", 0.95, "block"),
        ("ads_phone", 0.55, "review"),
        ("ads_phone", 0.10, "pass"),
        ("smoking_cigarette", 0.99, "review"),  # action: review caps at review
        ("game_dota2", 0.99, "pass"),  # action: tag never blocks
        ("porn_none", 0.99, "pass"),  # negatives always pass
    ],
)
def test_decision_policy(label, score, expected):
    tax = load_taxonomy()
    assert tax.decide(label, score) == expected
    described = tax.describe(label, score)
    assert described["decision"] == expected
    assert set(described) == {"name", "parent", "level", "score", "threshold", "decision"}


def test_worst_decision():
    tax = load_taxonomy()
    assert tax.worst(["pass", "block", "review"]) == "block"
    assert tax.worst([]) == "pass"


GOOD = """\
version: "t1"
groups:
  - {name: a, kind: exclusive, negative: a_none, threshold: 0.8, review: 0.5}
labels:
  - {name: a}
  - {name: a_x, parent: a}
  - {name: a_x_1, parent: a_x}
"""


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        (GOOD.replace("parent: a_x}", "parent: nope}"), "unknown parent 'nope'", 7),
        (GOOD + "  - {name: a_x, parent: a}\n", "duplicate label name 'a_x'", 8),
        (GOOD.replace("threshold: 0.8", "threshold: 1.5"), "threshold must be in [0, 1]", 3),
        (GOOD.replace("{name: a_x, parent: a}", "{name: a_x, parent: a_x_1}"), "cycle in parents", 6),
        (GOOD + "  - {name: a_x_1_deep, parent: a_x_1}\n", "at most 3 levels", 8),
        (GOOD.replace("negative: a_none, ", ""), "explicit negative", 3),
        (GOOD.replace("{name: a_x_1, parent: a_x}", "{name: a_x_1, parent: a_x, colour: red}"), "unknown label keys", 7),
    ],
)
def test_broken_taxonomy_names_the_offending_line(text, message, line):
    with pytest.raises(TaxonomyError) as err:
        parse_taxonomy(text, source="tax.yaml")
    assert message in str(err.value)
    assert f"tax.yaml:{line}:" in str(err.value)


def test_good_minimal_taxonomy_parses_and_missing_file_is_typed(tmp_path):
    tax = parse_taxonomy(GOOD)
    assert tax.groups["a"].classes == ("a_none", "a_x_1")
    with pytest.raises(TaxonomyError, match="not found"):
        load_taxonomy(tmp_path / "missing.yaml")
    with pytest.raises(TaxonomyError, match="not valid YAML"):
        parse_taxonomy("version: [unclosed", source="bad.yaml")

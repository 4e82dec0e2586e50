"""The model store: versions, atomic publish, cards, and weights_only loading."""

from __future__ import annotations

import pytest
import torch

from livelens.errors import ConfigError, ModelNotFoundError
from livelens.store import ModelStore, parse_ref


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 4, generator=g), "b": torch.zeros(3)}


@pytest.mark.parametrize("as_uri", [False, True])
def test_save_load_round_trip_and_versions(tmp_path, as_uri):
    root = f"file://{tmp_path}/store" if as_uri else tmp_path / "store"
    store = ModelStore(root)
    assert store.names() == []
    ref1 = store.save("safety", _state(1), {"metrics": {"acc": 0.5}})
    ref2 = store.save("safety", _state(2), {"metrics": {"acc": 0.9}})
    assert (ref1, ref2) == ("safety@1", "safety@2")
    assert store.resolve("safety") == "safety@2"
    assert store.resolve("safety@latest") == "safety@2"
    loaded = store.load("safety@1")
    assert torch.equal(loaded.state_dict["w"], _state(1)["w"])
    assert loaded.card["metrics"] == {"acc": 0.5}
    assert loaded.card["ref"] == "safety@1" and "git_sha" in loaded.card and "created_at" in loaded.card
    assert [c["ref"] for c in store.list()] == ["safety@1", "safety@2"]


def test_a_new_version_skips_every_version_of_the_serving_chain(tmp_path):
    """A store first in a chain must not publish a ref a later store already serves."""
    served, user = ModelStore(tmp_path / "served"), ModelStore(tmp_path / "user")
    served.save("safety", _state(1), {})
    served.save("safety", _state(2), {}, version="3")
    assert user.save("safety", _state(3), {}) == "safety@1"  # alone, a store counts from 1
    assert user.save("safety", _state(4), {}, avoid=[str(tmp_path / "served"), str(tmp_path / "none")]) == "safety@4"
    assert user.save("other", _state(5), {}, avoid=[str(tmp_path / "served")]) == "other@1"  # per name


def test_half_written_versions_are_invisible(tmp_path):
    store = ModelStore(tmp_path)
    store.save("m", _state(0), {})
    (tmp_path / "m" / ".tmp-2-deadbeef").mkdir()  # a crash mid-publish leaves only this
    (tmp_path / "m" / "3").mkdir()  # no card: never published
    assert store.versions("m") == ["1"]
    assert store.resolve("m") == "m@1"


def test_missing_and_bad_refs_are_typed(tmp_path):
    store = ModelStore(tmp_path)
    with pytest.raises(ModelNotFoundError):
        store.load("nothing")
    store.save("m", _state(0), {}, version="1")
    with pytest.raises(ModelNotFoundError, match="m@7"):
        store.load("m@7")
    with pytest.raises(ConfigError):
        store.save("m", _state(0), {}, version="1")
    with pytest.raises(ConfigError):
        parse_ref("Bad Name@1")
    # A store object where a path is expected means that store; anything else is refused, not
    # turned into a folder named after its repr.
    assert ModelStore(store).versions("m") == ["1"]
    with pytest.raises(ConfigError, match="path or URI"):
        ModelStore(42)


def test_pickled_objects_are_refused(tmp_path):
    """State dicts load with weights_only=True: a pickle carrying code is rejected."""
    store = ModelStore(tmp_path)
    store.save("m", _state(0), {})
    torch.save({"w": torch.zeros(1), "evil": ConfigError("x")}, tmp_path / "m" / "1" / "model.pt")
    with pytest.raises(Exception, match=r"[Ww]eights only"):
        store.load("m@1")


def test_cards_are_strict_json(tmp_path):
    """A NaN metric (AUC of a label with no positives) is stored as null, so HTTP can serve the card."""
    import json

    store = ModelStore(tmp_path)
    store.save("m", _state(0), {"metrics": {"auc": float("nan"), "per": [float("inf"), 1.0]}})
    text = (tmp_path / "m" / "1" / "card.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["metrics"] == {"auc": None, "per": [None, 1.0]}


def test_model_history_lists_versions_across_the_chain_with_their_diffs(tmp_path):
    """The page's model history: oldest first over the chain, the gate's verdict, per-label changes."""
    from livelens.store import model_history

    def card(when: str, labels: dict, gate: dict | None = None) -> dict:
        per = {"ads": {"labels": {k: {"precision": p, "recall": r} for k, (p, r) in labels.items()}}}
        out = {"created_at": when, "datasets": [f"d@{when[:4]}"], "metrics": {"macro_f1": 0.5, "per_label": per}}
        return {**out, "gate": {"gate": gate}} if gate else out

    shipped, user = tmp_path / "shipped", tmp_path / "user"
    w = {"w": torch.zeros(1)}
    ModelStore(shipped).save("safety", w, card("2026-01-01T00:00:00Z", {"ads_qrcode": (0.8, 0.5), "ads_url": (1, 0)}))
    gate = {"passed": True, "covered": 2, "gained": [{"label": "game_racing", "recall": 0.9}], "blocked": []}
    ModelStore(user).save("safety", w, card("2026-02-01T00:00:00Z", {"ads_qrcode": (0.8, 0.75),
                                                                     "game_racing": (1.0, 0.9)}, gate),
                          avoid=[str(shipped)])
    h = model_history("safety", [str(user), str(shipped)])
    assert [e["ref"] for e in h] == ["safety@1", "safety@2"] and h[0]["store"] == str(shipped)
    assert h[0]["diff"] == {} and h[0]["gate"] is None
    assert h[1]["diff"] == {"ads_qrcode": {"precision": 0.0, "recall": 0.25},
                            "ads_url": {"dropped": {"precision": 1.0, "recall": 0.0}},
                            "game_racing": {"new": {"precision": 1.0, "recall": 0.9}}}
    assert h[1]["gate"]["passed"] is True and h[1]["gate"]["gained"][0]["label"] == "game_racing"
    with pytest.raises(ModelNotFoundError):
        model_history("persons_attr", [str(user), str(shipped)])
    with pytest.raises(ConfigError):
        model_history("../etc", [str(user)])


def test_model_history_marks_a_copy_that_an_earlier_store_shadows(tmp_path):
    """Serving loads a ref from the first store holding it: a later store's copy is listed, not diffed."""
    from livelens.store import model_history

    def card(when: str, recall: float) -> dict:
        per = {"ads": {"labels": {"ads_qrcode": {"precision": 1.0, "recall": recall}}}}
        return {"created_at": when, "metrics": {"macro_f1": recall, "per_label": per}}

    user, shipped = tmp_path / "user", tmp_path / "shipped"
    w = {"w": torch.zeros(1)}
    ModelStore(shipped).save("safety", w, card("2026-01-01T00:00:00Z", 0.5), version="1")
    ModelStore(user).save("safety", w, card("2026-03-01T00:00:00Z", 0.9), version="1")  # an old user store
    ModelStore(shipped).save("safety", w, card("2026-02-01T00:00:00Z", 0.7), version="2")
    h = model_history("safety", [str(user), str(shipped)])
    assert [(e["ref"], e["store"], e["shadowed"]) for e in h] == [
        ("safety@1", str(shipped), True), ("safety@2", str(shipped), False), ("safety@1", str(user), False)]
    assert h[0]["diff"] == {} and h[1]["diff"] == {}  # @2 is the first served entry: nothing before it
    assert h[2]["diff"] == {"ads_qrcode": {"precision": 0.0, "recall": 0.2}}

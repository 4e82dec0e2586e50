"""HUD reader on generated frames of both game layouts, plus a layout added as a data file."""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import pytest
import yaml

from livelens.data.frames import FrameConfig, generate_slot
from livelens.errors import ConfigError
from livelens.imageio import decode_image
from livelens.ocr import PpOcrEngine, create_engine
from livelens.ocr.hud import load_layout, load_layouts, parse_layout, random_values, read_hud, render_hud

FRAMES_PER_LAYOUT = 3


@pytest.fixture(scope="module")
def engine() -> PpOcrEngine:
    return create_engine("ppocr")


def truth(hud: dict) -> dict:
    """Ground truth from the generator's ``attributes`` in our typed form."""
    conv = {"ammo": lambda v: [int(x) for x in v.split("/")], "distance": lambda v: int(str(v).rstrip("m")),
            "kda": lambda v: [int(x) for x in v.split("/")], "score": lambda v: [int(x) for x in v.split("-")]}
    return {k: conv.get(k, lambda v: v)(v) for k, v in hud.items() if k not in ("layout", "hero")}


def game_frames() -> list[tuple[np.ndarray, dict]]:
    cfg = FrameConfig(p_negative=0, p_ads=0, p_game=1, p_black=0, p_frozen=0, portrait=0.0)
    per: dict[str, list] = defaultdict(list)
    slot = 0
    while min((len(per[k]) for k in ("game_battle_royale", "game_honor_of_kings")), default=0) < FRAMES_PER_LAYOUT:
        row = generate_slot(7, slot, cfg)[0]
        attrs = row["attributes"] if isinstance(row["attributes"], dict) else json.loads(row["attributes"])
        hud = attrs["hud"]
        if len(per[hud["layout"]]) < FRAMES_PER_LAYOUT:
            per[hud["layout"]].append((decode_image(row["image_bytes"]), hud))
        slot += 1
    return [x for v in per.values() for x in v]


@pytest.mark.slow
def test_reads_generated_hud_frames_of_both_layouts(engine: PpOcrEngine) -> None:
    hits: dict[str, list[bool]] = defaultdict(list)
    for img, hud in game_frames():
        res = read_hud(img, engine=engine)  # layout auto-detected from label text
        assert res["layout"] == hud["layout"]
        for name, want in truth(hud).items():
            got = res["fields"][name]
            hits[f"{hud['layout']}.{name}"].append(got["value"] == want)
            assert 0.0 <= got["confidence"] <= 1.0
            if got["value"] is None:
                assert got["confidence"] == 0.0
    per_field = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    overall = sum(sum(v) for v in hits.values()) / sum(len(v) for v in hits.values())
    print("HUD per-field accuracy:", json.dumps(per_field), f"overall={overall:.3f}")
    assert overall >= 0.8, per_field


def test_layout_added_as_data_file_is_read(engine: PpOcrEngine, tmp_path) -> None:
    # A new game: two fields at the bottom left, defined only in YAML.
    spec = {"name": "new_game", "panel": [0.02, 0.80, 0.30, 0.97], "text_height": 0.04, "fields": [
        {"name": "coins", "type": "int", "label": "金币", "region": [0.03, 0.81, 0.29, 0.88], "range": [0, 9999]},
        {"name": "kda", "type": "ratio", "label": "战绩", "region": [0.03, 0.89, 0.29, 0.96], "range": [0, 20]}]}
    (tmp_path / "new_game.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    layouts = {**load_layouts(), **load_layouts(tmp_path)}
    lay = layouts["new_game"]
    frame = render_hud(lay, {"coins": 4821, "kda": [7, 2, 11]})
    res = read_hud(frame, engine=engine, layouts=layouts)
    assert res["layout"] == "new_game"
    assert res["fields"]["coins"]["value"] == 4821 and res["fields"]["kda"]["value"] == [7, 2, 11]
    assert res["fields"]["coins"]["confidence"] > 0.8
    # The same lines read with the seed panel layout: no fields found, score 0.
    assert read_hud(frame, "seed_stats_panel", engine=engine)["score"] == 0.0


def test_seed_panel_layout_renders_and_reads(engine: PpOcrEngine) -> None:
    lay = load_layouts()["seed_stats_panel"]
    values = random_values(lay, np.random.default_rng(3))
    res = read_hud(render_hud(lay, values), engine=engine)
    assert res["layout"] == "seed_stats_panel"
    got = {k: v["value"] for k, v in res["fields"].items()}
    assert sum(got[k] == v for k, v in values.items()) >= len(values) - 1, (got, values)


def test_every_packaged_layout_is_valid_and_bad_ones_are_rejected(tmp_path) -> None:
    layouts = load_layouts()
    assert {"game_battle_royale", "game_honor_of_kings", "seed_stats_panel"} <= set(layouts)
    bad = [
        {"name": "x", "fields": []},
        {"name": "x", "fields": [{"name": "a", "type": "float", "label": "A", "region": [0, 0, 1, 1]}]},
        {"name": "x", "fields": [{"name": "a", "type": "int", "region": [0, 0, 1, 1]}]},
        {"name": "x", "fields": [{"name": "a", "type": "int", "label": "A", "region": [0.5, 0, 0.2, 1]}]},
        {"name": "x", "fields": [{"name": "a", "type": "int", "pattern": "\\d+", "region": [0, 0, 1, 1]}]},
    ]
    for spec in bad:
        with pytest.raises(ConfigError):
            parse_layout(spec)
    (tmp_path / "broken.yaml").write_text("name: [unclosed", encoding="utf-8")
    with pytest.raises(ConfigError):
        load_layout(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError):
        read_hud(np.zeros((8, 8, 3), np.uint8), "no_such_game")


def test_degenerate_frames_give_empty_result(engine: PpOcrEngine) -> None:
    assert read_hud(np.zeros((1, 1, 3), np.uint8), engine=engine)["fields"] == {}
    assert read_hud(np.zeros((360, 640, 3), np.uint8), engine=engine) == {"layout": None, "score": 0.0, "fields": {}}

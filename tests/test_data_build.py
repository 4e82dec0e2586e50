"""``python -m livelens.data.build`` (make data): argument checks and a tiny build on Ray."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from livelens.data import build
from livelens.data.manifest import load_card, read_manifest
from livelens.errors import ConfigError


def test_bad_arguments_are_config_errors(capsys):
    with pytest.raises(ConfigError, match="unknown sets"):
        build.parse_args(["--only", "frames,cats"])
    with pytest.raises(ConfigError, match="width"):
        build.parse_args(["--width", "10"])
    assert build.main(["--only", "nope"]) == 2
    assert "unknown sets" in capsys.readouterr().err


def test_datasets_folder_is_not_a_package():
    # datasets/ holds cards only: with no __init__.py it can at most be a namespace package, which
    # any installed regular `datasets` package (HuggingFace's) outranks on import.
    repo = Path(__file__).resolve().parents[1]
    assert not (repo / "datasets" / "__init__.py").exists()
    assert not list((repo / "datasets").glob("*.py"))
    spec = importlib.util.find_spec("datasets")
    if spec is not None and spec.origin is not None:
        assert repo not in Path(spec.origin).parents


@pytest.mark.ray
def test_tiny_build_on_ray(tmp_path, ray_session):
    args = build.parse_args(["--out", str(tmp_path), "--frames", "6", "--text-lines", "12", "--text-det", "2",
                             "--quality", "8", "--width", "256", "--height", "144",
                             "--only", "frames,text_lines,text_det,quality"])
    summary = build.build(args)
    for name in ("frames", "text_lines", "text_det", "quality"):
        table = read_manifest(tmp_path / name)
        assert table.num_rows == summary[name]["rows"] > 0
        card = load_card(tmp_path / name)
        assert card["name"] == name and card["counts"]["rows"] == table.num_rows
        assert (tmp_path / name / "contact_sheet.png").is_file()
    assert read_manifest(tmp_path / "text_lines").num_rows == 12
    assert load_card(tmp_path / "quality")["seed"] == 0

"""`make bench-gpu` runs unchanged on a lent device: its dry run exercises every code path here."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the real run applies")
def test_without_cuda_it_says_so_and_exits_2(tmp_path, capsys):
    from benchmarks.bench_gpu import main

    assert main(["--out", str(tmp_path / "r.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_dry_run_measures_every_part_with_ratios(tmp_path):
    from benchmarks.bench_gpu import main

    out = tmp_path / "r.json"
    assert main(["--dry-run", "--skip-ocr", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    r, s = res["resnet50"], res["serving"]
    assert r["fp32_images_per_s"] > 0 and r["bf16_vs_fp32"] == pytest.approx(r["bf16_images_per_s"] / r["fp32_images_per_s"])
    assert s["model"].startswith("safety@")
    for k in ("decode_only_images_per_s", "model_only_images_per_s", "pipeline_images_per_s"):
        assert s[k] > 0, k
    # The whole pipeline cannot beat the slower of its two halves by much.
    assert 0 < s["pipeline_vs_bound"] < 1.5

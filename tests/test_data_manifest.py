"""Manifest schema: round trips through pyarrow and Ray Data, atomic writes, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from livelens.data import manifest as mf
from livelens.errors import ManifestError
from livelens.imageio import encode_jpeg, encode_png


def _rows(n: int = 6) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = rng.integers(0, 255, size=(40 + i, 60, 3), dtype=np.uint8)
        rows.append(
            {
                "image_bytes": encode_png(img),
                "width": 60,
                "height": 40 + i,
                "source": "unit",
                "labels": ["ads_qrcode"] if i % 2 else [],
                "boxes": [{"label": "ads_qrcode", "x0": 1, "y0": 2, "x1": 30, "y1": 35}] if i % 2 else [],
                "texts": [{"polygon": [0, 0, 10, 0, 10, 5, 0, 5], "text": f"行{i}"}],
                "quality": {"distortion": "blur", "level": i % 5, "score": 90.0 - i} if i % 3 == 0 else None,
                "attributes": {"payload": f"https://x.example/{i}"},
            }
        )
    return rows


def test_roundtrip_pyarrow(tmp_path):
    rows = _rows()
    out = mf.write_manifest(rows, tmp_path / "m", {"name": "unit", "seed": 1})
    table = mf.read_manifest(out)
    assert table.schema.equals(mf.SCHEMA, check_metadata=False)
    back = table.to_pylist()
    assert [r["id"] for r in back] == [mf.content_id(r["image_bytes"]) for r in rows]
    assert back[1]["boxes"][0]["label"] == "ads_qrcode"
    assert back[2]["texts"][0]["text"] == "行2"
    assert back[3]["quality"] == {"distortion": "blur", "level": 3, "score": 87.0}
    assert back[1]["quality"] is None
    assert json.loads(back[4]["attributes"]) == {"payload": "https://x.example/4"}
    assert all(r["split"] == mf.split_for_key(r["id"]) for r in back)
    # Plain pyarrow with no livelens code reads the same file.
    plain = pq.read_table(out / "manifest.parquet")
    assert plain.num_rows == len(rows)
    card = mf.load_card(out)
    assert card["name"] == "unit" and card["counts"]["rows"] == 6
    assert sum(card["counts"]["labels"]["ads_qrcode"].values()) == 3
    assert (out / "contact_sheet.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_is_deterministic_and_balanced():
    keys = [f"k{i}" for i in range(2000)]
    splits = [mf.split_for_key(k) for k in keys]
    assert splits == [mf.split_for_key(k) for k in keys]
    frac = {s: splits.count(s) / len(splits) for s in mf.SPLITS}
    assert 0.76 < frac["train"] < 0.84 and 0.07 < frac["val"] < 0.13 and 0.07 < frac["test"] < 0.13


def test_unknown_label_and_bad_box_rejected(tmp_path):
    rows = _rows(2)
    rows[0]["labels"] = ["not_a_label"]
    with pytest.raises(ManifestError, match="not_a_label"):
        mf.write_manifest(rows, tmp_path / "m", {"name": "x"})
    rows = _rows(2)
    rows[1]["boxes"] = [{"label": "ads_qrcode", "x0": 10, "y0": 2, "x1": 999, "y1": 30}]
    with pytest.raises(ManifestError, match="outside"):
        mf.write_manifest(rows, tmp_path / "m", {"name": "x"})
    with pytest.raises(ManifestError, match="unknown manifest columns"):
        mf.write_manifest([{**_rows(1)[0], "colour": "red"}], tmp_path / "m", {"name": "x"})
    assert not (tmp_path / "m").exists()


def test_corrupt_and_truncated_files_raise_manifest_error(tmp_path):
    out = mf.write_manifest(_rows(), tmp_path / "m", {"name": "unit"})
    file = out / "manifest.parquet"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match="corrupt or truncated"):
        mf.read_manifest(out)
    file.write_bytes(b"not parquet at all")
    with pytest.raises(ManifestError, match="corrupt or truncated"):
        mf.read_manifest(out)
    with pytest.raises(ManifestError, match="no manifest"):
        mf.read_manifest(tmp_path / "missing")
    pq.write_table(pa.table({"id": ["a"]}), file)
    with pytest.raises(ManifestError, match="missing columns"):
        mf.read_manifest(out)


def test_crash_mid_write_keeps_previous_version(tmp_path, monkeypatch):
    out = mf.write_manifest(_rows(4), tmp_path / "m", {"name": "v1"})
    before = (out / "manifest.parquet").read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(mf.pq, "write_table", boom)
    with pytest.raises(OSError, match="simulated"):
        mf.write_manifest(_rows(6), tmp_path / "m", {"name": "v2"})
    assert (out / "manifest.parquet").read_bytes() == before
    assert mf.load_card(out)["name"] == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # the temporary directory is cleaned up


def test_interrupted_swap_falls_back_to_previous(tmp_path):
    out = mf.write_manifest(_rows(3), tmp_path / "m", {"name": "v1"})
    # The state a crash between the two renames leaves behind.
    out.rename(tmp_path / ".m.previous")
    assert mf.read_manifest(tmp_path / "m").num_rows == 3
    mf.write_manifest(_rows(5), tmp_path / "m", {"name": "v2"})
    assert mf.read_manifest(tmp_path / "m").num_rows == 5
    assert not (tmp_path / ".m.previous").exists()


def test_decode_batch_bytes_uri_and_resize(tmp_path):
    img = np.full((30, 50, 3), 200, np.uint8)
    path = tmp_path / "a.jpg"
    path.write_bytes(encode_jpeg(img))
    batch = {
        "id": np.array(["a", "b"]),
        "image_bytes": np.array([encode_png(img), None], dtype=object),
        "image_uri": np.array([None, f"file://{path}"], dtype=object),
    }
    out = mf.decode_batch(batch)
    assert out["image"][0].shape == (30, 50, 3) and out["image"][1].shape == (30, 50, 3)
    assert "image_bytes" not in out
    out = mf.decode_batch(batch, size=(16, 8))
    assert out["image"].shape == (2, 8, 16, 3)


@pytest.mark.ray
@pytest.mark.slow
def test_roundtrip_ray_data_with_embeddings(tmp_path, ray_session):
    import ray.data

    out = mf.write_manifest(_rows(), tmp_path / "m", {"name": "unit"})
    # Two executions only: each costs Ray Data worker start-ups on a 2-core machine.
    decoded = mf.read_ray(out, split="train").map_batches(mf.decode_batch, batch_size=8).take_all()
    train = [r for r in mf.read_manifest(out).to_pylist() if r["split"] == "train"]
    assert sorted(r["id"] for r in decoded) == sorted(r["id"] for r in train)
    assert all(r["image"].shape == (r["height"], 60, 3) for r in decoded)

    # Embeddings computed in Ray land as canonical Arrow fixed-shape tensors that plain pyarrow reads.
    def embed(batch):
        batch["embedding"] = np.stack([np.full(4, len(b), np.float32) for b in batch["image_bytes"]])
        return batch

    ds = mf.read_ray(out, columns=["id", "image_bytes"]).map_batches(embed, batch_size=3)
    emb = pa.concat_tables([ray.get(r) for r in ds.to_arrow_refs()])
    assert isinstance(emb.schema.field("embedding").type, pa.FixedShapeTensorType)
    table = mf.attach_column(mf.read_manifest(out), emb.column("id"), emb.column("embedding"), "embedding")
    out2 = mf.write_manifest(table, tmp_path / "m2", {"name": "emb"}, contact_sheet=False)
    plain = pq.read_table(out2 / "manifest.parquet")
    emb_type = plain.schema.field("embedding").type
    assert isinstance(emb_type, pa.FixedShapeTensorType) and emb_type.shape == [4]
    assert plain.column("embedding").combine_chunks().to_numpy_ndarray().shape == (6, 4)
    with pytest.raises(ManifestError):
        mf.read_ray(tmp_path / "nope")


def test_read_manifest_rows_reads_only_needed_row_groups_in_order(tmp_path, monkeypatch):
    out = mf.write_manifest(_rows(600), tmp_path / "m", {"name": "unit", "seed": 1})  # row groups of 256
    whole = mf.read_manifest(out, columns=["id", "image_bytes"])
    wanted = [599, 3, 300, 3, 256, 255]
    read_groups = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kwargs):
        read_groups.append(list(groups))
        return real(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    got = mf.read_manifest_rows(out, wanted, columns=["id", "image_bytes"])
    assert got.to_pylist() == whole.take(wanted).to_pylist()
    assert read_groups == [[0, 1, 2]]
    assert mf.read_manifest_rows(out, [10, 20], columns=["id"])["id"].to_pylist() == whole.take([10, 20])["id"].to_pylist()
    assert read_groups[-1] == [0]
    with pytest.raises(ManifestError, match="out of range"):
        mf.read_manifest_rows(out, [600])

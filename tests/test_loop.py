"""The positive cycle's engine: embeddings, clustering, near-duplicates, selection and capture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from livelens.data.frames import generate_frames
from livelens.data.manifest import read_manifest, write_manifest
from livelens.errors import ConfigError, EmbeddingError, ManifestError, ModelNotFoundError
from livelens.imageio import decode_image
from livelens.loop import active, capture, cluster, dedupe
from livelens.loop.embed import (
    EmbedConfig,
    check_compatible,
    embed_manifest,
    load_embedder,
    read_embeddings,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _kind(attrs: dict) -> str:
    """A frame's kind as a person would sort them: black, game HUD, photo or synthetic scene."""
    if attrs["recipe"] in ("black", "game"):
        return attrs["recipe"]
    return attrs.get("background", "").split(":")[0] or attrs["recipe"]


@pytest.fixture(scope="module")
def frames():
    rows = generate_frames(0, 110, seed=21)
    return rows


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory, frames):
    out = tmp_path_factory.mktemp("loop") / "m"
    write_manifest(frames[:48], out, {"name": "loop-test"}, contact_sheet=False, row_group_size=16)
    return out


@pytest.fixture(scope="module")
def embedder():
    return load_embedder("mobilenet_v2")


@pytest.fixture(scope="module")
def frame_vectors(frames, embedder):
    rgb = [decode_image(r["image_bytes"]) for r in frames]
    x = np.concatenate([embedder(rgb[s:s + 16]) for s in range(0, len(rgb), 16)])
    return x, [_kind(r["attributes"]) for r in frames]


# ---- embeddings ---------------------------------------------------------------------------------


def test_embedding_job_writes_arrow_tensors_and_resumes_only_missing_blocks(ray_session, small_manifest,
                                                                              tmp_path, embedder):
    out = tmp_path / "emb"
    cfg = EmbedConfig(str(small_manifest), str(out), actors=2, cpus_per_actor=0.5, batch_size=8, progress=False)
    first = embed_manifest(cfg)
    assert (first["blocks"], first["embedded_blocks"], first["rows_embedded"]) == (3, 3, 48)
    # Plain pyarrow reads the parts: canonical fixed-shape tensors, the model ref in the metadata.
    part = pq.read_table(out / "part-00001.parquet")
    assert isinstance(part.schema.field("embedding").type, pa.FixedShapeTensorType)
    assert part.schema.field("embedding").type.shape == [1280]
    assert part.schema.metadata[b"livelens.embedding.model"] == b"mobilenet_v2:imagenet"
    before = read_embeddings(out)
    assert before.vectors.shape == (48, 1280) and before.model == "mobilenet_v2:imagenet"
    # The job's vectors are the in-process embedder's (one preprocessing, one model).
    rows = read_manifest(small_manifest)
    pos = {r: i for i, r in enumerate(rows.column("id").to_pylist())}
    direct = embedder([decode_image(rows.column("image_bytes")[pos[i]].as_py()) for i in before.ids[:4]])
    np.testing.assert_allclose(before.vectors[:4], direct, rtol=1e-4, atol=1e-4)
    # Resume: a lost part is embedded again, the others are skipped.
    (out / "part-00001.parquet").unlink()
    again = embed_manifest(cfg)
    assert (again["embedded_blocks"], again["skipped_blocks"], again["rows_embedded"]) == (1, 2, 16)
    after = read_embeddings(out)
    assert after.ids == before.ids
    np.testing.assert_allclose(after.vectors, before.vectors, rtol=1e-4, atol=1e-4)


def test_avgmax_embedding_is_the_average_and_the_strongest_cell_of_the_same_map(small_manifest, embedder):
    import torch

    emb = load_embedder("mobilenet_v2", pool="avgmax")
    assert emb.ref == "mobilenet_v2:imagenet:avgmax" and emb.dim == 2 * embedder.dim
    rgb = [decode_image(r) for r in read_manifest(small_manifest).column("image_bytes").to_pylist()[:2]]
    v = emb(rgb)
    np.testing.assert_allclose(v[:, :1280], embedder(rgb), rtol=1e-4, atol=1e-4)  # the average half
    from livelens.models.transforms import preprocess

    with torch.inference_mode():
        fmap = emb.module.forward_features(preprocess(rgb, emb.input_hw, emb.mean, emb.std))
    np.testing.assert_allclose(v[:, 1280:], fmap.amax(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-4)


def test_embedding_with_the_served_safety_models_backbone(small_manifest, tmp_path):
    from livelens.moderation import load_safety

    emb = load_embedder("safety")
    served = load_safety("safety")
    assert emb.ref == served.ref and emb.dim == served.model.num_features
    rgb = [decode_image(r) for r in read_manifest(small_manifest).column("image_bytes").to_pylist()[:3]]
    assert emb(rgb).shape == (3, served.model.num_features)


def test_embedding_bad_inputs_are_typed_errors(ray_session, small_manifest, tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither a backbone"):
        embed_manifest(EmbedConfig(str(small_manifest), str(tmp_path / "x"), model="nosuch@3", progress=False))
    empty = tmp_path / "empty"
    write_manifest([], empty, {"name": "empty"}, contact_sheet=False)
    with pytest.raises(ManifestError, match="no rows"):
        embed_manifest(EmbedConfig(str(empty), str(tmp_path / "y"), progress=False))
    with pytest.raises(ManifestError):
        embed_manifest(EmbedConfig(str(tmp_path / "missing"), str(tmp_path / "z"), progress=False))
    # A directory holding another model's parts is refused, not mixed.
    other = tmp_path / "other"
    other.mkdir()
    table = pa.table({"id": ["a"], "embedding": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((1, 4), np.float32))})
    pq.write_table(table.replace_schema_metadata({b"livelens.embedding.model": b"resnet18:imagenet"}),
                   other / "part-00000.parquet")
    with pytest.raises(EmbeddingError, match="resnet18"):
        embed_manifest(EmbedConfig(str(small_manifest), str(other), progress=False))
    # Parts of different widths cannot be read as one set.
    pq.write_table(pa.table({"id": ["b"], "embedding": pa.FixedShapeTensorArray.from_numpy_ndarray(
        np.ones((1, 8), np.float32))}).replace_schema_metadata({b"livelens.embedding.model": b"resnet18:imagenet"}),
        other / "part-00001.parquet")
    with pytest.raises(EmbeddingError, match="mismatched widths"):
        read_embeddings(other)
    with pytest.raises(EmbeddingError, match="mismatched widths"):
        check_compatible(np.ones((3, 4)), np.ones((2, 5)))
    with pytest.raises(EmbeddingError, match="non-empty"):
        check_compatible(np.ones((0, 4)))


# ---- clustering ---------------------------------------------------------------------------------


def test_clustering_separates_generated_frame_kinds(frame_vectors, frames, tmp_path):
    x, kinds = frame_vectors
    assert len(set(kinds)) == 4
    cl = cluster.kmeans(x, 8, seed=0)
    assert cl.backend == "faiss" and cl.k == 8
    p = cluster.purity(cl.assign, kinds)
    # Chance purity is the largest kind's share; the features must do far better than that.
    majority = max(kinds.count(k) for k in set(kinds)) / len(kinds)
    assert p >= 0.75 and p > majority + 0.2, (p, majority)
    assert cluster.nmi(cl.assign, kinds) > 0.3
    ids = [f"f{i}" for i in range(len(x))]
    labels = [r["labels"] for r in frames]
    summary = cluster.summarize(x, cl, ids, labels)
    assert sum(c["size"] for c in summary["clusters"]) == len(x)
    assert all(len(c["medoids"]) == min(4, c["size"]) for c in summary["clusters"])
    # The medoid is the member nearest the centroid.
    c0 = summary["clusters"][0]
    members = np.flatnonzero(cl.assign == c0["cluster"])
    sims = cluster.normalise(x[members]) @ cl.centroids[0]
    assert c0["medoids"][0] == ids[members[int(np.argmax(sims))]]
    # sklearn gives a comparable clustering; HDBSCAN finds clusters and may call some noise.
    assert cluster.purity(cluster.kmeans(x, 8, backend="sklearn").assign, kinds) >= 0.7
    h = cluster.hdbscan(x, min_cluster_size=5)
    assert h.k >= 2 and h.assign.shape == (len(x),)
    chosen = cluster.kmeans(x, None, k_range=(2, 4, 8))
    assert chosen.k in (2, 4, 8) and set(chosen.scores) == {2, 4, 8}
    with pytest.raises(ConfigError):
        cluster.kmeans(x, 1)


def test_cluster_summary_writes_contact_sheets(ray_session, small_manifest, tmp_path):
    e = read_embeddings(_embedded(small_manifest, tmp_path))
    cl = cluster.kmeans(e.vectors, 3)
    summary = cluster.summarize(e.vectors, cl, e.ids, e.labels)
    out = cluster.write_summary(tmp_path / "clusters", summary, cl, e.ids, small_manifest)
    written = json.loads((out / "summary.json").read_text())
    assert {c["sheet"] for c in written["clusters"]} == {f"sheets/cluster_{c:03d}.png" for c in range(3)}
    assert all((out / c["sheet"]).stat().st_size > 1000 for c in written["clusters"])
    assert pq.read_table(out / "clusters.parquet").num_rows == 48
    assert 0 < written["purity"] <= 1 and 0 <= written["nmi"] <= 1


def _embedded(manifest, tmp_path):
    out = tmp_path / "emb"
    embed_manifest(EmbedConfig(str(manifest), str(out), actors=1, cpus_per_actor=0.5, progress=False))
    return out


# ---- near-duplicates ----------------------------------------------------------------------------


def test_near_duplicates_found_and_distinct_photos_kept_apart(embedder):
    import cv2

    from livelens.evaluation import real_photos

    bases = []
    for _, rgb in real_photos()[:16]:
        h, w = rgb.shape[:2]
        s = min(1.0, 480 / max(h, w))
        bases.append(cv2.resize(rgb, (int(w * s), int(h * s)), interpolation=cv2.INTER_AREA) if s < 1 else rgb)
    frames, group, kind = dedupe.near_duplicate_set(bases, seed=3)
    x = np.concatenate([embedder(frames[s:s + 16]) for s in range(0, len(frames), 16)])
    found = dedupe.find_duplicates(dedupe.hashes(frames), x)
    scores = dedupe.pair_scores(found.pairs, group)
    assert scores["precision"] >= 0.95 and scores["recall"] >= 0.85, scores
    # No two originals (distinct photos) are judged duplicates.
    originals = [i for i, k in enumerate(kind) if k == "original"]
    assert not any(i in originals and j in originals for i, j in found.pairs.tolist())
    # Re-encodes and resizes are caught by the hash alone.
    h = dedupe.hashes(frames)
    for i, k in enumerate(kind):
        if k in ("resized", "recompressed", "text_changed"):
            o = originals[group[i]]
            assert dedupe.hamming(h[i], h[o]) <= 8, (k, i)
    assert len(found.keep) <= len(bases) + 3
    with pytest.raises(EmbeddingError):
        dedupe.find_duplicates(h[:3], x[:4])


def test_deduplicated_manifest_drops_repeats(tmp_path, embedder):
    rows = generate_frames(0, 6, seed=4)[:6]
    rows = [*rows, {**rows[0], "id": "dup-" + rows[0]["id"][:8]}]  # the same frame again
    write_manifest(rows, tmp_path / "m", {"name": "d"}, contact_sheet=False)
    table = read_manifest(tmp_path / "m")
    rgb = [decode_image(b) for b in table.column("image_bytes").to_pylist()]
    ids = table.column("id").to_pylist()
    found = dedupe.find_duplicates(dedupe.hashes(rgb), embedder(rgb))
    report = dedupe.write_deduplicated(tmp_path / "m", ids, found, tmp_path / "dedup")
    assert report["dropped"] >= 1 and report["rows_out"] == report["rows_in"] - report["dropped"]
    kept = read_manifest(tmp_path / "dedup").column("id").to_pylist()
    assert not ({rows[0]["id"], rows[-1]["id"]} <= set(kept))
    assert json.loads((tmp_path / "dedup" / "duplicates.json").read_text())


# ---- selection ----------------------------------------------------------------------------------


def test_uncertainty_scores_rank_known_cases():
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.3, 0.1]])
    for fn in (active.entropy, active.margin, active.least_confidence):
        u = fn(p)
        assert u[0] == pytest.approx(0, abs=1e-9) and u.argmax() in (1, 2), fn.__name__
    assert active.entropy(p)[2] == pytest.approx(1.0)
    assert active.margin(p)[1] == pytest.approx(1.0)  # a tie between the top two
    assert active.least_confidence(p)[2] == pytest.approx(1.0)
    assert active.binary_uncertainty(np.array([[0.5], [0.99], [0.01]]))[:, None].ravel().tolist() == \
        pytest.approx([1.0, 0.02, 0.02])
    with pytest.raises(ConfigError):
        active.entropy(np.array([[0.7, 0.7]]))


def test_disagreement_and_labelwise_round_robin():
    d = active.disagreement({"classifier": np.array([0.9, 0.1, 0.5]), "ocr": np.array([0.9, 0.9, np.nan])})
    assert d.tolist() == pytest.approx([0.0, 0.8, 0.0])
    with pytest.raises(ConfigError):
        active.disagreement({"classifier": np.zeros(3)})
    # Label 0 has many borderline frames, label 1 one: round-robin still gives label 1 its frame.
    s = np.array([[0.5, 0.0], [0.51, 0.0], [0.49, 0.0], [0.0, 0.5], [1.0, 1.0]])
    assert set(active.labelwise_uncertain(s, 2)) == {0, 3}


def test_k_center_greedy_covers_every_cluster():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 16) * 10
    x = np.concatenate([c + rng.normal(0, 0.1, (30, 16)) for c in centres])
    picked = active.k_center_greedy(x, 4, seed=1)
    assert sorted(i // 30 for i in picked) == [0, 1, 2, 3]
    # With cluster 0 labelled, three picks cover the other three.
    picked = active.k_center_greedy(x, 3, labelled=[0, 1])
    assert sorted(i // 30 for i in picked) == [1, 2, 3]


def test_select_batch_budget_labelled_and_reasons():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 8))
    u = np.linspace(0, 1, 100)
    picks = active.select_batch(active.SelectionConfig(10, pool_factor=1.0), uncertainty=u, labelled=[99, 98])
    assert [p["index"] for p in picks] == list(range(97, 87, -1))  # the most uncertain unlabelled ones
    picks = active.select_batch(active.SelectionConfig(10, pool_factor=3.0, random_share=0.2), uncertainty=u,
                                embeddings=x, labelled=[99])
    idx = [p["index"] for p in picks]
    assert len(idx) == len(set(idx)) == 10 and 99 not in idx
    assert sum(p["reason"] == "random" for p in picks) == 2
    assert all(i >= 69 for i, p in zip(idx, picks, strict=True) if p["reason"] == "diverse")
    with pytest.raises(ConfigError):
        active.select_batch(active.SelectionConfig(5), uncertainty=u, embeddings=x[:50])
    with pytest.raises(ConfigError):
        active.SelectionConfig(0)


def test_write_queue_is_a_manifest_with_reasons(small_manifest, tmp_path):
    ids = read_manifest(small_manifest).column("id").to_pylist()
    picks = [{"index": 3, "score": 0.9, "reason": "diverse"}, {"index": 7, "score": 0.1, "reason": "random"}]
    out = active.write_queue(small_manifest, ids, picks, tmp_path / "queue", round_no=2, model="safety@1")
    q = read_manifest(out)
    assert q.column("id").to_pylist() == [ids[3], ids[7]]
    meta = json.loads(q.column("attributes")[0].as_py())["queue"]
    assert meta == {"rank": 0, "score": 0.9, "reason": "diverse", "round": 2, "model": "safety@1"}
    with pytest.raises(ConfigError):
        active.write_queue(small_manifest, ids, [], tmp_path / "q2")


def test_simulated_loop_runs_every_arm_on_the_same_budget(frame_vectors):
    from livelens.loop.simulate import LoopConfig, run_loop

    x, kinds = frame_vectors
    names = sorted(set(kinds))
    y = np.asarray([[k == n for n in names] for k in kinds], np.int8)
    res = run_loop(LoopConfig(seed_size=10, round_size=10, rounds=3), x[:80], y[:80], x[80:], y[80:])
    for arm, curve in res["curves"].items():
        assert [p["labels"] for p in curve] == [10, 20, 30, 40], arm
    assert res["curves"]["random"][0] == res["curves"]["active"][0]  # the same seed set
    with pytest.raises(ConfigError, match="buys"):
        run_loop(LoopConfig(seed_size=50, round_size=20, rounds=3), x[:80], y[:80], x[80:], y[80:])


# ---- capture ------------------------------------------------------------------------------------


def _answer(score: float, overruled: bool = False) -> dict:
    lab = {"name": "ads_phone", "score": score, "threshold": 0.6, "decision": "pass"}
    if overruled:
        lab["overruled"] = "OCR read the frame and found no such entity"
    return {"labels": [lab], "decision": "pass", "models": ["safety@1"], "image": {"width": 4, "height": 3}}


def test_sampling_favours_uncertain_and_disagreeing_frames():
    import random

    cfg = capture.CaptureConfig(enabled=True, keys=["*"], random_share=0.0)
    rng = random.Random(0)
    assert capture.sampling_reason(_answer(0.55), cfg, rng)[0] == "near_threshold"
    assert capture.sampling_reason(_answer(0.02, overruled=True), cfg, rng)[0] == "disagreeing"
    assert capture.sampling_reason(_answer(0.99), cfg, rng)[0] is None
    some = capture.CaptureConfig(enabled=True, keys=["*"], random_share=0.2)
    kept = sum(capture.sampling_reason(_answer(0.99), some, rng)[0] == "random" for _ in range(2000))
    assert 300 < kept < 500
    assert capture.uncertainty_of(_answer(0.6)) == pytest.approx(1.0)


def test_sample_store_is_bounded_rotating_and_respects_keys_and_privacy(tmp_path):
    cfg = capture.CaptureConfig(enabled=True, uri=str(tmp_path / "cap"), keys=["k1"], max_rows=20, shard_rows=5,
                                random_share=0.0)
    store = capture.SampleStore(cfg, start=False)
    for i in range(60):
        assert store.offer(image=b"img%d" % i, answer=_answer(0.55), key_id="k1") == "near_threshold"
        if i % 5 == 4:
            store.flush(drain=True)
    assert store.offer(image=b"x", answer=_answer(0.55), key_id="other") is None  # key not opted in
    store.close()
    table = capture.read_samples(cfg.uri)
    assert table.num_rows == 20 and store.stats["rotated_shards"] == 8
    # The newest samples are kept.
    assert sorted(table.column("image_bytes").to_pylist()) == sorted(b"img%d" % i for i in range(40, 60))
    assert json.loads(table.column("answer")[0].as_py())["models"] == ["safety@1"]
    off = capture.SampleStore(cfg.model_copy(update={"privacy_mode": True, "uri": str(tmp_path / "p")}),
                              start=False)
    assert off.offer(image=b"x", answer=_answer(0.55), key_id="k1") is None
    off.close()
    assert capture.read_samples(str(tmp_path / "p")).num_rows == 0


def test_sample_store_never_blocks_or_raises(tmp_path):
    cfg = capture.CaptureConfig(enabled=True, uri=str(tmp_path / "cap"), keys=["*"], queue_size=3, random_share=1.0)
    store = capture.SampleStore(cfg, start=False)
    reasons = [store.offer(image=b"x", answer=_answer(0.99), key_id=None) for _ in range(10)]
    assert reasons.count("random") == 3 and store.stats["dropped_full"] == 7
    # A hostile answer (not JSON-serialisable at all) costs the sample, not the caller.
    assert store.offer(image=b"x", answer={"labels": "nonsense"}, key_id=None) is None
    store.close()
    with pytest.raises(ConfigError):
        capture.SampleStore(capture.CaptureConfig(enabled=True, keys=["*"], uri="nosuchscheme://x/y"))
    with pytest.raises(ValueError):
        capture.CaptureConfig(max_rows=10, shard_rows=20)


CRASH_WRITER = r"""
import sys, time
from livelens.loop.capture import CaptureConfig, SampleStore
cfg = CaptureConfig(enabled=True, uri=sys.argv[1], keys=["*"], shard_rows=4, flush_s=0.05, random_share=1.0)
store = SampleStore(cfg)
ans = {"labels": [], "decision": "pass", "models": ["safety@1"], "image": {"width": 1, "height": 1}}
i = 0
while True:
    store.offer(image=b"%08d" % i + b"\0" * 20000, answer=ans, key_id=None)
    i += 1
    if i % 4 == 0:
        print(i, flush=True)
    time.sleep(0.002)
"""


def test_a_killed_writer_loses_no_committed_sample(tmp_path):
    uri = str(tmp_path / "cap")
    proc = subprocess.Popen([sys.executable, "-c", CRASH_WRITER, uri], stdout=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": REPO})
    deadline = time.time() + 60
    while time.time() < deadline and len(list((tmp_path / "cap").glob("shard-*.parquet"))) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    shards = sorted((tmp_path / "cap").glob("shard-*.parquet"))
    assert len(shards) >= 5
    # Every committed shard is whole and holds the rows its name says; temp files are never read.
    for s in shards:
        assert pq.read_table(s).num_rows == int(s.stem.rsplit("-r", 1)[1])
    table = capture.read_samples(uri)
    ids = sorted(int(b[:8]) for b in table.column("image_bytes").to_pylist())
    assert len(ids) == len(set(ids)) == table.num_rows


def test_queue_round_scores_through_the_serving_code_and_skips_labelled(ray_session, small_manifest, tmp_path):
    from livelens.analyzer import LocalAnalyzer
    from livelens.loop.queue import QueueJob, answer_disagreement, build_queue, disagreement_detail

    emb = _embedded(small_manifest, tmp_path)
    ids = read_manifest(small_manifest, columns=["id"]).column("id").to_pylist()
    done = read_manifest(small_manifest).take(pa.array([0, 1, 2, 3], pa.int64()))
    write_manifest(done, tmp_path / "labelled", {"name": "labelled"}, contact_sheet=False)
    analyzer = LocalAnalyzer(caps=("moderate",), use_open_nsfw=False, evidence="none", threads=1)
    job = QueueJob(str(small_manifest), str(emb), str(tmp_path / "queue"), budget=8, random_share=0.25,
                   labelled=str(tmp_path / "labelled"))
    result = build_queue(job, analyzer)
    q = read_manifest(result["queue"])
    assert q.num_rows == 8 and not set(q.column("id").to_pylist()) & set(ids[:4])
    assert result["reasons"].get("random") == 2 and result["scored"] == 48
    meta = [json.loads(a)["queue"] for a in q.column("attributes").to_pylist()]
    assert [m["rank"] for m in meta] == list(range(8))
    assert all(m["model"] and "safety@" in m["model"] for m in meta)
    assert answer_disagreement({"labels": [{"name": "ads_phone", "score": 0.9, "overruled": "OCR"}]}) == 1.0
    assert answer_disagreement({"labels": [{"name": "porn", "score": 0.9}, {"name": "porn", "score": 0.2}]}) == \
        pytest.approx(0.7)
    # What a reviewer sees: which label, which sources, how far apart (or why it was overruled).
    two = {"labels": [{"name": "porn", "score": 0.9, "model": "safety@1"},
                      {"name": "porn", "score": 0.2, "model": "open_nsfw@1.1"}, {"name": "ads_url", "score": 0.5}]}
    assert disagreement_detail(two) == {"score": pytest.approx(0.7), "label": "porn",
                                        "sources": {"safety@1": 0.9, "open_nsfw@1.1": 0.2}}
    assert disagreement_detail({"labels": [{"name": "ads_url", "score": 0.5}]}) is None
    assert disagreement_detail({"labels": [{"name": "ads_phone", "score": 0.8, "overruled": "OCR read no phone"}]}
                               )["overruled"] == "OCR read no phone"
    kept = [m["disagreement"] for m in meta if "disagreement" in m]  # the queue keeps it for the review view
    assert all(0 < d["score"] <= 1 and d["label"] and d["sources"] for d in kept)


def test_captured_samples_become_an_unlabelled_manifest(tmp_path, frames):
    cfg = capture.CaptureConfig(enabled=True, uri=str(tmp_path / "cap"), keys=["*"], random_share=1.0)
    store = capture.SampleStore(cfg, start=False)
    for i, r in enumerate(frames[:5] + frames[:2]):  # two frames served twice
        labels = [] if i else [{"name": "ads_phone", "score": 0.9, "decision": "block", "model": "safety@1"},
                               {"name": "ads_phone", "score": 0.1, "decision": "block", "model": "ocr"}]
        ans = {"labels": labels, "decision": "block" if labels else "pass", "models": ["safety@1"],
               "image": {"width": r["width"], "height": r["height"]}}
        store.offer(image=r["image_bytes"], answer=ans, key_id="k", route="/v1/moderate")
    store.close()
    out = capture.samples_to_manifest(cfg.uri, str(tmp_path / "set"))
    table = read_manifest(out)
    assert table.num_rows == 5 and set(table.column("split").to_pylist()) == {"train"}
    kept = [json.loads(a)["capture"] for a in table.column("attributes").to_pylist()]
    assert {k["reason"] for k in kept} == {"random"}
    # The labels each answer raised (the analysis scores them) and where its sources disagreed.
    first = next(k for k in kept if k["predicted"])
    assert first["predicted"] == ["ads_phone"] and first["disagreement"]["score"] == pytest.approx(0.8)
    assert sum(bool(k["predicted"]) for k in kept) == 1 and all(k["disagreement"] is None for k in kept if k != first)
    with pytest.raises(ConfigError):
        capture.samples_to_manifest(str(tmp_path / "nothing"), str(tmp_path / "set2"))

"""Human labels: versioned commits, concurrent labellers, who and when, and a manifest for training."""

from __future__ import annotations

import json
import threading

import pytest

from livelens.data.frames import generate_frames
from livelens.data.manifest import read_manifest, write_manifest
from livelens.errors import InvalidArgumentError, NotFoundError
from livelens.loop.labels import LabelStore


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    rows = generate_frames(0, 6, seed=3)
    for r in rows:
        r["labels"] = []  # captured traffic: nobody has labelled it yet
    return write_manifest(rows, tmp_path_factory.mktemp("q") / "queue", {"name": "queue"}, contact_sheet=False)


def test_commits_make_versions_with_who_and_when(frames, tmp_path):
    store = LabelStore.create(tmp_path / "labels", frames)
    ids = store.frame_ids()
    assert store.latest() == 0 and store.labels() == {}
    c1 = store.commit(ids[:3], add=["ads_qrcode"], by="ana", note="cluster 2")
    c2 = store.commit(ids[2:4], add=["ads_qrcode", "ads_phone"], by="bo@example.com")
    assert (c1.version, c1.added, c2.version, c2.added) == (1, 3, 2, 3)  # ids[2] already had the QR label
    now = store.labels()
    assert set(now) == set(ids[:4])
    assert now[ids[2]]["ads_qrcode"]["by"] == "ana"  # a label already set keeps who set it first
    assert now[ids[3]]["ads_phone"]["by"] == "bo@example.com" and now[ids[3]]["ads_phone"]["at"] >= c1.at
    undo = store.commit(ids[:3], remove=["ads_qrcode"], by="ana", note="undo")
    assert undo.removed == 3 and store.counts() == {"ads_phone": 2, "ads_qrcode": 1}
    assert store.labels(version=1)[ids[0]]["ads_qrcode"]["by"] == "ana"  # old versions stay readable
    assert [e["version"] for e in store.events()] == [1, 2, 3] and store.events()[0]["note"] == "cluster 2"
    out = store.materialise(tmp_path / "train")
    table = read_manifest(out)
    assert sorted(table.column("id").to_pylist()) == sorted(ids[2:4])
    row = table.to_pylist()[0]
    attrs = json.loads(row["attributes"])
    assert attrs["label_version"] == 3 and set(attrs["labelled_by"]) == set(row["labels"])
    assert row["image_bytes"]  # the frames themselves travel into the training manifest


def test_two_labellers_at_once_lose_nothing(frames, tmp_path):
    store_root = tmp_path / "labels"
    LabelStore.create(store_root, frames)
    ids = LabelStore(store_root).frame_ids()
    labels = ["ads_qrcode", "ads_phone", "ads_watermark", "ads_text_banner", "ads_contact"]
    errors: list[BaseException] = []

    def labeller(who: str, offset: int) -> None:
        store = LabelStore(store_root)  # each labeller has its own handle, as two replicas would
        try:
            for i in range(20):
                store.commit([ids[(i + offset) % len(ids)]], add=[labels[i % len(labels)]], by=who)
        except BaseException as e:  # collected, and asserted empty in the main thread
            errors.append(e)

    threads = [threading.Thread(target=labeller, args=(f"u{k}", k)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = LabelStore(store_root)
    assert store.latest() == 40 and len(store.events()) == 40  # every commit got its own version
    want = {(ids[(i + k) % len(ids)], labels[i % len(labels)]) for k in range(2) for i in range(20)}
    got = {(rid, lab) for rid, labs in store.labels().items() for lab in labs}
    assert got == want


def test_bad_commits_are_refused_and_change_nothing(frames, tmp_path):
    store = LabelStore.create(tmp_path / "labels", frames)
    ids = store.frame_ids()
    with pytest.raises(InvalidArgumentError, match="unknown labels"):
        store.commit(ids[:1], add=["not.a.label"], by="ana")
    with pytest.raises(NotFoundError):
        store.commit(["nope"], add=["ads_qrcode"], by="ana")
    with pytest.raises(InvalidArgumentError, match="labeller"):
        store.commit(ids[:1], add=["ads_qrcode"], by="a b/../c")
    with pytest.raises(InvalidArgumentError, match="both added and removed"):
        store.commit(ids[:1], add=["ads_qrcode"], remove=["ads_qrcode"], by="ana")
    with pytest.raises(InvalidArgumentError, match="nothing to do"):
        store.commit(ids[:1], by="ana")
    with pytest.raises(NotFoundError):
        store.table(version=7)
    assert store.latest() == 0 and store.events() == []
    with pytest.raises(NotFoundError):
        LabelStore(tmp_path / "elsewhere")


def test_the_cluster_gallery_groups_frames_and_counts_their_labels(frames, tmp_path):
    """Issue 16's gallery: a cluster run attached to the store, sizes, medoids and labels per cluster."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from livelens.errors import ConfigError
    from livelens.loop.__main__ import main as loop_main

    store = LabelStore.create(tmp_path / "labels", frames)
    ids = store.frame_ids()
    assert store.clusters()["clusters"] == []  # nothing attached, and generated frames carry no cluster
    run = tmp_path / "run"
    run.mkdir()
    assign = [0, 0, 1, 1, 1, 2][: len(ids)]
    pq.write_table(pa.table({"id": [*ids, "not-a-frame"], "cluster": [*assign, 0]}), run / "clusters.parquet")
    (run / "summary.json").write_text(json.dumps({"clusters": [{"cluster": 1, "medoids": [ids[4], "not-a-frame"]}]}))
    assert loop_main(["labels", "--store", str(store.root), "--clusters", str(run)]) == 0
    store.commit(ids[2:4], add=["ads_qrcode"], by="ana")
    g = store.clusters()
    assert g["source"] == str(run) and g["version"] == 1
    by = {c["cluster"]: c for c in g["clusters"]}
    assert [c["cluster"] for c in g["clusters"]] == [1, 0, 2]  # largest first
    assert by[1]["size"] == 3 and by[1]["medoids"] == [ids[4]]  # its medoid first, unknown ids dropped
    assert by[1]["labelled"] == 2 and by[1]["counts"] == {"ads_qrcode": 2}
    assert by[0]["medoids"] == ids[:2] and by[0]["labelled"] == 0 and by[0]["counts"] == {}
    assert store.cluster_groups()[0][2] == ids[5:6]
    with pytest.raises(ConfigError, match="none of the 1 clustered ids"):
        store.attach_clusters({"nope": 3})
    with pytest.raises(NotFoundError, match=r"no clusters\.parquet"):
        store.attach_cluster_run(tmp_path)
    assert store.clusters()["source"] == str(run)  # a refused attach leaves the grouping as it was


def test_the_analysis_counts_splits_and_scores_the_captured_answers(tmp_path):
    """Issue 16's dataset analysis: labels per split, the served answer's per-label P/R and confusion, coverage."""
    from livelens.loop.capture import _answer_doc, _decided_labels

    rows = generate_frames(0, 6, seed=3)[:6]
    preds = [["ads_qrcode"], ["ads_qrcode", "ads_phone"], [], ["ads_phone"], None, ["ads_phone"]]
    for i, (r, pred) in enumerate(zip(rows, preds, strict=True)):
        r["labels"], r["split"] = [], "val" if i == 5 else "train"
        r["attributes"] = json.dumps({} if pred is None else {"capture": {"predicted": pred}})
    store = LabelStore.create(tmp_path / "labels", write_manifest(rows, tmp_path / "q", {"name": "q"},
                                                                  contact_sheet=False))
    ids = [r["id"] for r in rows]
    store.commit([ids[0], ids[1], ids[4]], add=["ads_qrcode"], by="ana")
    store.commit([ids[2], ids[5]], add=["ads_phone"], by="bo")  # ids[3] stays unlabelled: not scored
    a = store.analysis()
    assert a["version"] == 2
    assert a["splits"] == {"train": {"frames": 5, "labelled": 4, "counts": {"ads_phone": 1, "ads_qrcode": 3}},
                           "val": {"frames": 1, "labelled": 1, "counts": {"ads_phone": 1}}}
    served = a["served"]
    assert served["frames"] == 4  # ids[4] has no captured answer
    assert served["per_label"] == {
        "ads_phone": {"tp": 1, "fp": 1, "fn": 1, "precision": 0.5, "recall": 0.5},
        "ads_qrcode": {"tp": 2, "fp": 0, "fn": 0, "precision": 1.0, "recall": 1.0}}
    assert served["confusion"] == {"ads_phone": {"(none)": 1, "ads_phone": 1},
                                   "ads_qrcode": {"ads_phone": 1, "ads_qrcode": 2}}
    assert a["coverage"][:2] == [{"label": "ads_qrcode", "labelled": 3, "raised": 2},
                                 {"label": "ads_phone", "labelled": 2, "raised": 2}]
    assert len(a["coverage"]) == len(store.vocabulary) and a["coverage"][2]["labelled"] == 0
    assert store.analysis(version=1)["served"]["per_label"]["ads_qrcode"]["fp"] == 0  # any version
    # What samples_to_manifest keeps of a served answer: the labels it raised, nothing that passed.
    answer = {"labels": [{"name": "ads_qrcode", "decision": "block"}, {"name": "ads_phone", "decision": "review"},
                         {"name": "ads_url", "decision": "pass"}]}
    assert _decided_labels(_answer_doc(json.dumps(answer))) == ["ads_phone", "ads_qrcode"]
    assert _decided_labels(_answer_doc("not json")) == [] and _decided_labels(_answer_doc(None)) == []

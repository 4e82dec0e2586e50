"""One measured turn of the labelling loop, end to end: a kind the service has never seen → learned.

``make loop-e2e`` (``python -m benchmarks.loop_e2e``). Starting from the shipped safety model:

1. **Traffic.** Generated frames, a share of them with a racing-game HUD (``game_racing``), a
   kind no shipped model was trained on (the generator draws it only when asked). The frames go
   in unlabelled; their truth is kept aside for the scripted annotator.
2. **Embed** (the Ray Data job of ``livelens.loop.embed``) and **cluster** (k-means).
3. **Label.** A scripted annotator looks at each cluster's medoids (what the page's contact sheet
   shows) and, where most of them are racing frames, labels the whole cluster ``game_racing`` and
   ``scene_game_screen`` through the label store, as the page does.
4. **Retrain → gate → publish** (``livelens.loop.retrain``): the shipped recipe (frozen ImageNet
   backbone, 128 px, 4 epochs) on the frames manifest plus the labels; served and candidate are
   scored through the service's evaluation on one fixed held-out set: the frames' test split and
   racing frames from a seed that no other step used.

The figure: ``game_racing``'s held-out recall, served (0) against the candidate (goal ≥ 0.9), the
gate's decision, and the wall time of each step (goal: the whole turn under 1 h). The published
model goes to a store under ``--out``, never to the user store that serving reads.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

NEW = "game_racing"


def racing_config():
    from livelens.data.frames import FrameConfig

    return FrameConfig(p_negative=0, p_ads=0, p_game=1, p_black=0, p_frozen=0, game_layouts=(NEW,))


def write_traffic(out: Path, n: int, share: float, seed: int) -> Path:
    """``n`` unlabelled frames, ``share`` of them racing; each row's truth in ``attributes.truth``."""
    from livelens.data.frames import FrameConfig, generate_slot
    from livelens.data.manifest import write_manifest

    rng = np.random.default_rng(seed)
    rows = []
    for slot in range(n):
        cfg = racing_config() if rng.random() < share else FrameConfig(p_frozen=0)
        row = generate_slot(seed, slot, cfg)[0]
        row["attributes"] = {**row["attributes"], "truth": row["labels"]}
        rows.append({**row, "labels": [], "split": "train"})
    return write_manifest(rows, out, {"name": "traffic", "version": 1, "generator": "benchmarks.loop_e2e",
                                      "seed": seed}, contact_sheet=False)


def write_heldout(base: str, out: Path, n_new: int, seed: int) -> tuple[Path, int]:
    """Racing frames of an unused seed, first, then the base manifest's test split."""
    from livelens.data.frames import generate_slot
    from livelens.data.manifest import read_manifest, write_manifest

    new = [{**generate_slot(seed, s, racing_config())[0], "split": "test"} for s in range(n_new)]
    old = [r for r in read_manifest(base).to_pylist() if r["split"] == "test"]
    for r in old:
        r["attributes"] = json.loads(r["attributes"] or "{}") if isinstance(r["attributes"], str) else r["attributes"]
    path = write_manifest(new + old, out, {"name": "heldout", "version": 1, "generator": "benchmarks.loop_e2e",
                                           "seed": seed}, contact_sheet=False)
    return path, len(new) + len(old)


def annotate(traffic: Path, emb_dir: Path, store_dir: Path, k: int) -> dict[str, Any]:
    """Cluster, then label whole clusters whose medoids are mostly racing frames."""
    from livelens.data.manifest import read_manifest
    from livelens.loop import cluster
    from livelens.loop.embed import read_embeddings
    from livelens.loop.labels import LabelStore

    e = read_embeddings(str(emb_dir))
    cl = cluster.kmeans(e.vectors, k, seed=0)
    med = cluster.medoids(e.vectors, cl, n=4)
    truth = {r["id"]: json.loads(r["attributes"])["truth"]
             for r in read_manifest(traffic, columns=["id", "attributes"]).to_pylist()}
    store = LabelStore.create(store_dir, traffic)
    ids = np.asarray(e.ids)
    picked, looked = [], 0
    for c, members in med.items():
        looked += len(members)
        if sum(NEW in truth[ids[i]] for i in members) * 2 > len(members):
            frames = [str(x) for x in ids[cl.assign == c]]
            store.commit(frames, add=[NEW, "scene_game_screen"], by="annotator", note=f"cluster {c}")
            picked += frames
    racing = {i for i, t in truth.items() if NEW in t}
    return {"clusters": len(med), "medoids_looked_at": looked, "commits": store.latest(),
            "frames_labelled": len(picked), "labelled_racing": len(racing & set(picked)),
            "labelled_not_racing": len(set(picked) - racing), "racing_in_traffic": len(racing),
            "racing_missed": len(racing - set(picked))}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/data/frames", help="the shipped model's training frames (make data)")
    p.add_argument("--traffic", type=int, default=600)
    p.add_argument("--share", type=float, default=0.3, help="share of racing frames in the traffic")
    p.add_argument("--heldout-new", type=int, default=100)
    p.add_argument("--heldout-limit", type=int, default=300, help="held-out rows scored (racing ones first)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--out", default="runs/loop-e2e")
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    from livelens.loop.embed import EmbedConfig, embed_manifest
    from livelens.loop.retrain import RetrainJob, retrain
    from livelens.train.driver import init_ray

    out = Path(a.out) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True)
    t: dict[str, float] = {}
    t0 = time.time()
    traffic = write_traffic(out / "traffic", a.traffic, a.share, seed=101)
    heldout, n_held = write_heldout(a.base, out / "heldout", a.heldout_new, seed=103)
    t["traffic_s"] = time.time() - t0
    # The job's own Ray, with more logical CPUs than cores: with one per core the Train workers
    # leave Ray Data none to read the manifest, and training stalls (livelens.train.driver.init_ray).
    init_ray()
    try:
        t1 = time.time()
        emb = embed_manifest(EmbedConfig(manifest=str(traffic), out=str(out / "emb"), progress=False))
        t["embed_s"] = time.time() - t1
        t2 = time.time()
        labelled = annotate(traffic, out / "emb", out / "labels", a.k)
        t["cluster_label_s"] = time.time() - t2
        job = RetrainJob(labels=str(out / "labels"), base=a.base, heldout=str(heldout), served="safety",
                         tolerance=a.tolerance, out=str(out / "retrain"), store=str(out / "store"),
                         limit=a.heldout_limit,
                         train={"freeze_backbone": True, "image_size": 128, "epochs": a.epochs})
        report = retrain(job)
    finally:
        ray.shutdown()
    t.update({f"retrain_{k}_s": v for k, v in report["seconds"].items() if k != "total"})
    t["total_s"] = time.time() - t0
    row = report["per_label"].get(NEW, {})
    res = {"new_label": NEW, "served_recall": (row.get("served") or {}).get("recall"),
           "candidate_recall": (row.get("candidate") or {}).get("recall"),
           "candidate_precision": (row.get("candidate") or {}).get("precision"),
           "gate": report["gate"], "published": report["published"], "labelling": labelled,
           "embedding": {k: emb.get(k) for k in ("rows", "seconds", "per_s")},
           "heldout_rows_scored": report["served"]["rows"], "heldout_rows": n_held,
           "seconds": {k: round(v, 1) for k, v in t.items()}, "dir": str(out), "report": report["dir"]}
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

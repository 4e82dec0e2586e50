"""One measured turn of the labelling loop, end to end: a kind the service has never seen → learned → served.

``make loop-e2e`` (``python -m benchmarks.loop_e2e --serve``). Starting from the shipped safety model:

1. **Traffic.** Generated frames, a share of them with a racing-game HUD (``game_racing``), a
   kind no shipped model was trained on (the generator draws it only when asked). Their truth is
   kept aside for the scripted annotator. With ``--serve`` the shipped Serve app is started on
   this Ray (the config of ``make run``) with capture on, the frames are sent to ``/v1/moderate``
   (the route most of a platform's frames take),
   and the gateway's sample store (uncertain frames, and ``--random-share`` of the rest) becomes
   the manifest the loop works on; without it the frames go in directly.
2. **Embed** (the Ray Data job of ``livelens.loop.embed``) and **cluster** (k-means).
3. **Label.** The clusters are attached to a new label store (the page's gallery). A scripted
   annotator looks at each cluster's medoids; where most of them are racing frames it drills into
   the cluster and selects the racing frames (``--whole-clusters``: labels all of it), then
   commits ``game_racing`` and ``scene_game_screen``. With ``--serve`` it does all of this through
   the page's routes (``/v1/label/clusters``, ``/v1/label/frames?cluster=``, ``/v1/label/commit``).
4. **Retrain → gate → publish → swap** (``livelens.loop.retrain``): the shipped recipe (frozen
   ImageNet backbone, 128 px, 4 epochs) on the frames manifest plus the labels; served and
   candidate are scored through the service's evaluation on one fixed held-out set: the frames'
   test split and racing frames from a seed that no other step used. A candidate that passes is
   published to a store under ``--out`` (never the user store that ``make run`` reads) and, with
   ``--serve``, swapped into the running app while a client sends a request every 0.5 s.
5. **Check** (``--serve``): the held-out racing frames go through ``/v1/moderate`` of the app
   that now serves the new model.

The figures: ``game_racing``'s held-out recall, served (0) against the candidate (goal ≥ 0.9), the
gate's decision, failed requests through the swap, and the wall time of each step (goal: the whole
turn under 1 h).
"""

from __future__ import annotations

import argparse
import asyncio
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


def truth_by_content(traffic: Path) -> dict[str, list[str]]:
    """Each traffic frame's truth by content id (sha256 of its bytes: what a captured frame's id is)."""
    from livelens.data.manifest import content_id, read_manifest

    return {content_id(r["image_bytes"]): json.loads(r["attributes"])["truth"]
            for r in read_manifest(traffic, columns=["image_bytes", "attributes"]).to_pylist()}


def annotate(frames: Path, emb_dir: Path, store_dir: Path, k: int, truth: dict[str, list[str]],
             review: bool = True, api: Service | None = None) -> dict[str, Any]:
    """Cluster, attach the clusters to a new label store, then label the racing clusters.

    The scripted annotator works as a person on the page does: it looks at each cluster's medoids
    in the gallery; where most of them are racing frames it drills into the cluster and selects
    the racing frames (or, with ``review=False``, labels the whole cluster), then commits
    ``game_racing`` and ``scene_game_screen``.

    Args:
        frames: The manifest embedded into ``emb_dir`` (its ids are content ids).
        emb_dir: The embeddings.
        store_dir: The label store to create over ``frames``.
        k: Clusters.
        truth: Each frame's labels by content id, which the annotator "sees" in a thumbnail.
        review: Select only the racing frames of a chosen cluster.
        api: Read the gallery and commit through the running service's ``/v1/label`` routes
            (default: the label store's own methods, which those routes call).
    """
    from livelens.loop import cluster
    from livelens.loop.embed import read_embeddings
    from livelens.loop.labels import LabelStore

    e = read_embeddings(str(emb_dir))
    cl = cluster.kmeans(e.vectors, k, seed=0)
    med = cluster.medoids(e.vectors, cl, n=4)
    ids = [str(x) for x in e.ids]
    store = LabelStore.create(store_dir, frames)
    store.attach_clusters(dict(zip(ids, (int(c) for c in cl.assign), strict=True)),
                          {c: [ids[i] for i in m] for c, m in med.items()}, source=f"k-means, k={k}, {emb_dir}")
    gallery = api.clusters() if api else store.clusters()
    groups = None if api else store.cluster_groups()[0]
    picked, looked, drilled = [], 0, 0
    for entry in gallery["clusters"]:
        looked += len(entry["medoids"])
        if sum(NEW in truth[m] for m in entry["medoids"]) * 2 <= len(entry["medoids"]):
            continue
        members = api.cluster_frames(entry["cluster"]) if api else groups[entry["cluster"]]
        drilled += len(members)
        chosen = [f for f in members if NEW in truth[f]] if review else members
        note = f"cluster {entry['cluster']}" + (" (reviewed)" if review else "")
        if not chosen:
            continue
        if api:
            api.commit(chosen, [NEW, "scene_game_screen"], note)
        else:
            store.commit(chosen, add=[NEW, "scene_game_screen"], by="annotator", note=note)
        picked += chosen
    racing = {i for i, t in truth.items() if NEW in t} & set(ids)
    return {"clusters": len(gallery["clusters"]), "medoids_looked_at": looked, "review": review,
            "through": "the service's /v1/label routes" if api else "the label store",
            "frames_looked_at_in_chosen_clusters": drilled if review else 0, "version": store.latest(),
            "frames_labelled": len(picked), "labelled_racing": len(racing & set(picked)),
            "labelled_not_racing": len(set(picked) - racing), "racing_in_traffic": len(racing),
            "racing_missed": len(racing - set(picked))}


class Service:
    """The shipped Serve app on this Ray, with capture on, a label store and the loop's model store.

    The app is deployed from ``serve_apps/config/livelens.yaml`` (as ``make run`` does), so that
    ``serve_apps.admin.set_live`` can swap its safety model later.
    """

    APP = "livelens"

    def __init__(self, out: Path, random_share: float, port: int = 0):
        import socket

        from ray import serve

        from livelens.serving.auth import add_key_to_file, generate_key
        from livelens.serving.config import validate_serve_config
        from livelens.store import store_chain
        from serve_apps.__main__ import deploy_config

        if not port:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
        self.capture_uri, self.labels, self.store = str(out / "capture"), out / "labels", out / "store"
        self.key = generate_key()
        # The scopes of a moderation team's key: no persons (faces are personal data, and not
        # what this turn learns), so /v1/analyze runs moderation, OCR and quality.
        add_key_to_file(out / "keys.json", self.key, "annotator", rate_per_s=1000, burst=1000,
                        scopes=["moderate", "ocr", "quality", "analyze", "models", "label", "admin"])
        spec = {**deploy_config()["applications"][0], "name": self.APP, "route_prefix": "/"}
        args = spec["args"]
        args["gateway"] = {**(args.get("gateway") or {}), "key_file": str(out / "keys.json"),
                           "audit_dir": str(out / "audit"),
                           "live": {"capture": {"enabled": True, "keys": ["*"], "uri": self.capture_uri,
                                                "random_share": random_share, "flush_s": 1.0}}}
        args["labelling"] = {"store": str(self.labels)}
        # Where the loop publishes comes first, so the admin check finds the new version.
        args["moderation"] = {**(args.get("moderation") or {}), "stores": [str(self.store), *store_chain()]}
        schema = validate_serve_config({"applications": [spec]})
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.context._get_global_client().deploy_apps(schema)
        deadline = time.time() + 900
        while (st := serve.status().applications.get(self.APP)) is None or st.status != "RUNNING":
            if (st is not None and st.status in ("DEPLOY_FAILED", "UNHEALTHY")) or time.time() > deadline:
                raise RuntimeError(f"the service did not start: {st}")
            time.sleep(2)
        self.url = f"http://127.0.0.1:{port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key}"}

    def replay(self, bodies: list[bytes], route: str = "/v1/moderate", concurrency: int = 2,
               retries: int = 30) -> list[dict | None]:
        """POST each frame as a well-behaved client: a 503 or 429 is retried after its Retry-After.

        Returns:
            The answers in order (None where every try was refused); ``self.refusals`` counts the
            refused tries (the gateway's admission control sheds what would miss its deadline).
        """
        import httpx

        self.refusals = 0

        async def go() -> list[dict | None]:
            sem = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(body: bytes) -> dict | None:
                    async with sem:
                        for _ in range(retries):
                            r = await client.post(self.url + route, content=body, params={"evidence": "none"},
                                                  headers={**self.headers, "content-type": "image/jpeg"})
                            if r.status_code == 200:
                                return r.json()
                            if r.status_code not in (429, 503):
                                return None
                            self.refusals += 1
                            await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                        return None
                return await asyncio.gather(*(one(b) for b in bodies))

        return asyncio.run(go())

    def wait_captured(self, quiet_s: float = 4.0, timeout_s: float = 120.0) -> int:
        """Committed samples, once no new shard has come for ``quiet_s``."""
        from livelens.loop.capture import read_samples

        last, since, t_end = -1, time.time(), time.time() + timeout_s
        while time.time() < t_end:
            n = read_samples(self.capture_uri, columns=["sample_id"]).num_rows
            if n != last:
                last, since = n, time.time()
            elif time.time() - since >= quiet_s:
                break
            time.sleep(1)
        return last

    def clusters(self) -> dict[str, Any]:
        """``GET /v1/label/clusters``: the gallery."""
        import httpx

        r = httpx.get(self.url + "/v1/label/clusters", headers=self.headers, timeout=60)
        r.raise_for_status()
        return r.json()

    def cluster_frames(self, c: int) -> list[str]:
        """Every frame id of cluster ``c``, page by page (``GET /v1/label/frames?cluster=``)."""
        import httpx

        out: list[str] = []
        while True:
            r = httpx.get(self.url + "/v1/label/frames", params={"cluster": c, "offset": len(out), "limit": 500},
                          headers=self.headers, timeout=60)
            r.raise_for_status()
            page = r.json()
            out += [f["id"] for f in page["frames"]]
            if not page["frames"] or len(out) >= page["total"]:
                return out

    def commit(self, ids: list[str], add: list[str], note: str) -> None:
        """``POST /v1/label/commit``, in chunks the route accepts."""
        import httpx

        for i in range(0, len(ids), 5000):
            r = httpx.post(self.url + "/v1/label/commit", json={"ids": ids[i:i + 5000], "add": add, "note": note},
                           headers=self.headers, timeout=60)
            r.raise_for_status()


class Prober:
    """Requests at a steady pace through a swap: every answer's status and the model that gave it."""

    def __init__(self, svc: Service, body: bytes, every_s: float = 0.5):
        import threading

        self.svc, self.body, self.every_s = svc, body, every_s
        self.codes: dict[int, int] = {}
        self.models: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import httpx

        with httpx.Client(timeout=60) as client:
            while not self._stop.wait(self.every_s):
                try:
                    r = client.post(self.svc.url + "/v1/moderate", content=self.body, params={"evidence": "none"},
                                    headers={**self.svc.headers, "content-type": "image/jpeg"})
                    code = r.status_code
                    if code == 200:
                        self.models.append(next((m for m in r.json().get("models", []) if m.startswith("safety@")),
                                                ""))
                except httpx.HTTPError:
                    code = 599
                self.codes[code] = self.codes.get(code, 0) + 1

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=70)
        # 503 and 429 are the admission control's typed refusals (with Retry-After) while training
        # holds the cores; a failure is anything else that is not a 200.
        return {"codes": dict(sorted(self.codes.items())), "requests": sum(self.codes.values()),
                "refused": sum(v for c, v in self.codes.items() if c in (429, 503)),
                "failed": sum(v for c, v in self.codes.items() if c not in (200, 429, 503)),
                "models_seen": sorted(set(self.models)),
                "first_new_model_at": next((i for i, m in enumerate(self.models) if m != self.models[0]), None)
                if self.models else None}


def served_figures(svc: Service, heldout: Path, limit: int) -> dict[str, Any]:
    """``game_racing``'s recall and precision on the held-out frames as the running service answers."""
    from livelens import fusion
    from livelens.data.manifest import read_manifest
    from livelens.taxonomy import load_taxonomy

    tax = load_taxonomy()
    rows = [r for r in read_manifest(heldout, columns=["image_bytes", "labels", "split"]).to_pylist()
            if r["split"] == "test"][:limit]
    answers = svc.replay([r["image_bytes"] for r in rows])
    tp = fp = fn = 0
    for r, a in zip(rows, answers, strict=True):
        want = NEW in (r["labels"] or [])
        got = a is not None and any(lab["name"] == NEW and fusion.fires(tax, lab) for lab in a.get("labels", []))
        tp, fp, fn = tp + (want and got), fp + (got and not want), fn + (want and not got)
    models = sorted({m for a in answers if a for m in a.get("models", []) if m.startswith("safety@")})
    return {"rows": len(rows), "failed": sum(a is None for a in answers), "models": models,
            "recall": round(tp / max(1, tp + fn), 4), "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "tp": tp, "fp": fp, "fn": fn}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="runs/data/frames", help="the shipped model's training frames (make data)")
    p.add_argument("--traffic", type=int, default=1000)
    p.add_argument("--share", type=float, default=0.3, help="share of racing frames in the traffic")
    p.add_argument("--heldout-new", type=int, default=100)
    p.add_argument("--heldout-limit", type=int, default=300, help="held-out rows scored (racing ones first)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--whole-clusters", action="store_true",
                   help="label whole clusters from their medoids, without reviewing their frames")
    p.add_argument("--serve", action="store_true",
                   help="through a running service: traffic replayed to /v1/moderate and captured by the "
                        "gateway, labels posted to /v1/label/commit, the new model swapped in live")
    p.add_argument("--random-share", type=float, default=0.25,
                   help="with --serve: share of confident frames the gateway captures (uncertain ones: all)")
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
    truth = truth_by_content(traffic)
    t["traffic_s"] = time.time() - t0
    # The job's own Ray, with more logical CPUs than cores: with one per core the Train workers
    # leave Ray Data none to read the manifest, and training stalls (livelens.train.driver.init_ray).
    init_ray()
    res: dict[str, Any] = {"new_label": NEW, "mode": "service" if a.serve else "library"}
    try:
        svc = frames = None
        if a.serve:
            from livelens.data.manifest import content_id, read_manifest
            from livelens.loop.capture import read_samples, samples_to_manifest

            t1 = time.time()
            svc = Service(out, a.random_share)
            t["service_start_s"] = time.time() - t1
            t1 = time.time()
            bodies = [r["image_bytes"] for r in read_manifest(traffic, columns=["image_bytes"]).to_pylist()]
            answers = svc.replay(bodies)
            captured = svc.wait_captured()
            frames = Path(samples_to_manifest(svc.capture_uri, str(out / "captured")))
            reasons: dict[str, int] = {}
            racing_reasons: dict[str, int] = {}
            for r in read_samples(svc.capture_uri, columns=["reason", "image_bytes"]).to_pylist():
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
                if NEW in truth.get(content_id(r["image_bytes"]), []):
                    racing_reasons[r["reason"]] = racing_reasons.get(r["reason"], 0) + 1
            res["capture"] = {"sent": len(bodies), "answered": sum(x is not None for x in answers),
                              "refused_tries": svc.refusals,
                              "captured": captured, "by_reason": reasons, "racing_by_reason": racing_reasons,
                              "random_share": a.random_share}
            t["replay_capture_s"] = time.time() - t1
        else:
            frames = traffic
        t1 = time.time()
        emb = embed_manifest(EmbedConfig(manifest=str(frames), out=str(out / "emb"), progress=False))
        t["embed_s"] = time.time() - t1
        t2 = time.time()
        res["labelling"] = annotate(frames, out / "emb", out / "labels", a.k, truth, review=not a.whole_clusters,
                                    api=svc)
        t["cluster_label_s"] = time.time() - t2
        job = RetrainJob(labels=str(out / "labels"), base=a.base, heldout=str(heldout), served="safety",
                         tolerance=a.tolerance, out=str(out / "retrain"), store=str(out / "store"),
                         limit=a.heldout_limit, app=svc.APP if svc else "",
                         train={"freeze_backbone": True, "image_size": 128, "epochs": a.epochs})
        probe = Prober(svc, bodies[0]) if svc else None
        try:
            report = retrain(job)
        finally:
            if probe:
                res["requests_during_retrain_and_swap"] = probe.stop()
        if svc and report.get("published"):
            t3 = time.time()
            res["served_after_swap"] = served_figures(svc, heldout, a.heldout_new)
            t["served_check_s"] = time.time() - t3
    finally:
        ray.shutdown()
    t.update({f"retrain_{k}_s": v for k, v in report["seconds"].items() if k != "total"})
    t["total_s"] = time.time() - t0
    row = report["per_label"].get(NEW, {})
    res.update({"served_recall": (row.get("served") or {}).get("recall"),
                "candidate_recall": (row.get("candidate") or {}).get("recall"),
                "candidate_precision": (row.get("candidate") or {}).get("precision"),
                "gate": report["gate"], "published": report["published"], "live": report.get("live"),
                "embedding": {k: emb[k] for k in ("model", "rows_embedded", "seconds", "embeddings_per_s")},
                "heldout_rows_scored": report["served"]["rows"], "heldout_rows": n_held,
                "seconds": {k: round(v, 1) for k, v in t.items()}, "dir": str(out), "report": report["dir"]})
    (out / "result.json").write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()

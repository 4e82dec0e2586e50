"""Human labelling behind the gateway's /v1/label routes (scope ``label``).

One replica (``max_replicas=1``) owns the label store (:class:`livelens.loop.labels.LabelStore`):
the store's lock already makes concurrent commits safe, and one replica keeps the frames it serves
in one cache. The store is opened on every call, so a store created (or replaced) by
``python -m livelens.loop labels`` while the service runs is picked up without a restart, and a
killed replica loses nothing: every commit is on disk before it is answered.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import replace
from typing import Any

from pydantic import ConfigDict, Field
from ray import serve

from livelens.errors import NotFoundError
from livelens.loop.retrain import RetrainJob, RetrainRunner
from livelens.serving.envelope import quiet_expected_errors
from livelens.serving.heap import start_heap_trimmer
from serve_apps.common import Args, DeployOptions

MAX_PAGE = 500


class LabellingArgs(Args):
    """Labelling settings.

    Attributes:
        store: The label store directory (``python -m livelens.loop labels --manifest Q --store S``
            creates it over a labelling queue).
        thumb_side: Long side of the JPEG a labeller is shown.
        retrain: What the page's *Retrain* button runs (``make retrain``'s job; its ``labels`` is
            always this store): the base and held-out manifests, the gate's tolerance, the store a
            passed model is published to, the app it is swapped into, training overrides.
    """

    model_config = ConfigDict(extra="forbid")
    store: str = "runs/loop/labels"
    thumb_side: int = Field(320, ge=32, le=2048)
    retrain: RetrainJob = Field(default_factory=RetrainJob)
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(num_cpus=0.05, max_ongoing_requests=16))


#: The review view lists frames whose sources' scores for one label lie at least this far apart
#: (or a label OCR or the regions overruled, which counts 1).
REVIEW_MIN_DISAGREEMENT = 0.5


def _attributes(row: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads(row.get("attributes") or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _disagreement(attrs: dict[str, Any]) -> dict[str, Any] | None:
    """Where a frame's sources disagreed: from its queue round, else from its captured answer."""
    for where in ("queue", "capture"):
        d = (attrs.get(where) or {}).get("disagreement")
        if isinstance(d, dict) and isinstance(d.get("score"), int | float):
            return d
    return None


@serve.deployment
class Labelling:
    """Reads frames and label versions of the store; commits labellers' changes."""

    def __init__(self, args: LabellingArgs):
        quiet_expected_errors()  # a client's 4xx: one INFO line in this replica's log, no traceback
        start_heap_trimmer()
        self.args = args
        self._frames: tuple[str, float, dict[str, dict[str, Any]]] | None = None  # (manifest, mtime, rows)
        self.retrainer = RetrainRunner(replace(args.retrain, labels=args.store))
        # Label Studio projects' server and token, from their /setup: kept in memory only (a
        # restarted replica learns them again, since Label Studio sends /setup before predictions).
        self._ls_links: dict[str, tuple[str, str]] = {}

    def check_health(self) -> None:
        """Healthy without a store: the routes say there is none (404), the service stays up."""

    def _store(self):
        from livelens.loop.labels import LabelStore

        try:
            return LabelStore(self.args.store)
        except NotFoundError:
            raise NotFoundError(f"no label store at {self.args.store}; create one over a labelling queue with "
                                "'python -m livelens.loop labels --manifest <queue> --store <dir>'",
                                code="no_label_store") from None

    def _rows(self, store) -> dict[str, dict[str, Any]]:
        """The store's frames by id (cached until the manifest file changes)."""
        from livelens.data.manifest import MANIFEST_FILE, read_manifest

        path = str(store.manifest)
        mtime = os.stat(os.path.join(path, MANIFEST_FILE)).st_mtime
        if self._frames is None or self._frames[:2] != (path, mtime):
            table = read_manifest(path, columns=["id", "image_bytes", "image_uri", "width", "height", "attributes"])
            self._frames = (path, mtime, {r["id"]: r for r in table.to_pylist()})
        return self._frames[2]

    def _info(self) -> dict[str, Any]:
        store = self._store()
        version = store.latest()
        labelled = store.labels(version)
        events = store.events()
        return {"store": str(store.root), "manifest": str(store.manifest), "frames": len(store.frame_ids()),
                "labelled_frames": len(labelled), "version": version, "counts": store.counts(version),
                "labellers": sorted({e["by"] for e in events}), "labels": sorted(store.vocabulary)}

    async def info(self) -> dict[str, Any]:
        """The store: its manifest, frames, newest version, counts per label, who labelled."""
        return await asyncio.to_thread(self._info)

    def _page(self, offset: int, limit: int, unlabelled: bool, cluster: int | None = None,
              review: bool = False) -> dict[str, Any]:
        store = self._store()
        rows = self._rows(store)
        labelled = store.labels()
        members, _, _ = store.cluster_groups()  # the attached grouping, else the queue's own
        where = {rid: c for c, group in members.items() for rid in group}
        ids = list(rows)
        if cluster is not None:
            if cluster not in members:
                raise NotFoundError(f"no cluster {cluster} in the label store", code="cluster_not_found")
            ids = members[cluster]
        ids = [i for i in ids if not (unlabelled and i in labelled)]
        if review:
            # The review view: frames whose sources disagreed, the widest disagreement first.
            gap = {rid: (_disagreement(_attributes(rows[rid])) or {}).get("score", 0.0) for rid in ids}
            ids = sorted((i for i in ids if gap[i] >= REVIEW_MIN_DISAGREEMENT), key=lambda i: -gap[i])
        out = []
        attrs = {rid: _attributes(rows[rid]) for rid in ids[offset: offset + limit]}
        for rid in attrs:
            out.append({"id": rid, "width": rows[rid]["width"], "height": rows[rid]["height"],
                        "labels": labelled.get(rid, {}), "queue": attrs[rid].get("queue"), "cluster": where.get(rid),
                        "disagreement": _disagreement(attrs[rid])})
        return {"total": len(ids), "offset": offset, "version": store.latest(), "cluster": cluster, "review": review,
                "frames": out}

    async def frames(self, offset: int = 0, limit: int = 50, unlabelled: bool = False,
                     cluster: int | None = None, review: bool = False) -> dict[str, Any]:
        """A page of frames with their labels (who and when), why each was queued and where its sources
        disagreed; of one cluster if given; with ``review``, only frames whose sources disagreed."""
        from livelens.errors import InvalidArgumentError

        if not (offset >= 0 and 1 <= limit <= MAX_PAGE):
            raise InvalidArgumentError(f"offset ≥ 0 and 1 ≤ limit ≤ {MAX_PAGE}", code="bad_page")
        return await asyncio.to_thread(self._page, offset, limit, unlabelled, cluster, review)

    async def analysis(self) -> dict[str, Any]:
        """The dataset analysis at the newest version (see ``LabelStore.analysis``)."""
        return await asyncio.to_thread(lambda: self._store().analysis())

    async def clusters(self) -> dict[str, Any]:
        """The cluster gallery: per cluster its size, medoids, and frames labelled per label."""
        return await asyncio.to_thread(lambda: self._store().clusters())

    def _thumbnail(self, frame_id: str) -> bytes:
        from livelens.data.manifest import decode_row_image
        from livelens.imageio import thumbnail_jpeg

        row = self._rows(self._store()).get(frame_id)
        if row is None:
            raise NotFoundError(f"no frame {frame_id[:80]!r} in the label store", code="frame_not_found")
        return thumbnail_jpeg(decode_row_image(row["image_bytes"], row["image_uri"]), self.args.thumb_side, quality=85)

    async def thumbnail(self, frame_id: str) -> bytes:
        """One frame as a JPEG at most ``thumb_side`` on its long side."""
        return await asyncio.to_thread(self._thumbnail, frame_id)

    def _commit(self, ids: list[str], add: list[str], remove: list[str], by: str, note: str) -> dict[str, Any]:
        from dataclasses import asdict

        store = self._store()
        commit = store.commit(ids, add=add, remove=remove, by=by, note=note)
        return {**asdict(commit), "counts": store.counts(commit.version)}

    async def commit(self, ids: list[str], add: list[str], remove: list[str], by: str, note: str = "") -> dict[str, Any]:
        """Apply one labeller's change as a new version (see ``LabelStore.commit``)."""
        return await asyncio.to_thread(self._commit, ids, add, remove, by, note)

    def _image_bytes(self, frame_id: str) -> bytes:
        from livelens.data.manifest import row_image_bytes

        row = self._rows(self._store()).get(frame_id)
        if row is None:
            raise NotFoundError(f"no frame {frame_id[:80]!r} in the label store", code="frame_not_found")
        return row_image_bytes(row["image_bytes"], row["image_uri"])

    async def image_bytes(self, frame_id: str) -> bytes:
        """One frame's original bytes (what Label Studio's tasks and the ML backend's predictions use)."""
        return await asyncio.to_thread(self._image_bytes, frame_id)

    def _apply(self, frame_id: str, labels: list[str], whole: bool, by: str, note: str) -> dict[str, Any]:
        store = self._store()
        if frame_id not in self._rows(store):
            raise NotFoundError(f"no frame {frame_id[:80]!r} in the label store", code="frame_not_found")
        have = set(store.labels().get(frame_id, {}))
        add, remove = (sorted(set(labels) - have), sorted(have - set(labels))) if whole \
            else ([], sorted(have & set(labels)))
        if not add and not remove:
            return {"frame": frame_id, "version": store.latest(), "added": [], "removed": [], "changed": False}
        commit = store.commit([frame_id], add=add, remove=remove, by=by, note=note)
        return {"frame": frame_id, "version": commit.version, "added": add, "removed": remove, "changed": True}

    async def apply(self, frame_id: str, labels: list[str], whole: bool, by: str, note: str) -> dict[str, Any]:
        """One frame's labels from an outside tool: become ``labels`` (``whole``) or lose them.

        The difference from the newest version is one commit (none when nothing changes), so a
        labeller's edit in Label Studio shows in the events, the counts and the next retrain.
        """
        return await asyncio.to_thread(self._apply, frame_id, labels, whole, by, note)

    async def retrain(self, by: str) -> dict[str, Any]:
        """Start one retrain of the store's newest labels (see ``RetrainRunner``); 409 while one runs."""
        self._store()  # no store, no labels to train on: the same 404 as every route
        return await asyncio.to_thread(self.retrainer.start, by)

    async def retrain_status(self) -> dict[str, Any]:
        """The page's retrain: idle, running, or how the last one ended (gate verdict, published ref)."""
        return await asyncio.to_thread(self.retrainer.status)

    async def link_label_studio(self, project: str, hostname: str, token: str) -> None:
        """Keep where a Label Studio project's server is and its token (from its ``/setup``)."""
        if len(self._ls_links) >= 1000 and project not in self._ls_links:
            self._ls_links.pop(next(iter(self._ls_links)))  # bounded: the oldest project goes
        self._ls_links[project] = (hostname, token)

    async def label_studio_link(self, project: str) -> tuple[str, str] | None:
        """A project's Label Studio server and token, or None when its ``/setup`` never came."""
        return self._ls_links.get(project)

    async def events(self, since: int = 0) -> list[dict[str, Any]]:
        """Commits after version ``since``, oldest first."""
        store = self._store()
        return [e for e in await asyncio.to_thread(store.events) if e["version"] > since]


def bind_labelling(args: LabellingArgs | dict | None = None):
    """The labelling deployment, bound (for composition into the gateway)."""
    a = args if isinstance(args, LabellingArgs) else LabellingArgs.model_validate(args or {})
    # One replica serves the store and its frame cache (module docstring).
    return Labelling.options(**a.deploy.to_options(single_replica=True)).bind(a)


def build_app(args: LabellingArgs | dict | None = None):
    """Labelling alone (used through a handle)."""
    return bind_labelling(args)

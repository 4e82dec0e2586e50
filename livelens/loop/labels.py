"""Human labels on a labelling queue: versioned, atomic, safe for several labellers at once.

A :class:`LabelStore` sits next to the frames it labels (a queue manifest from
``python -m livelens.loop queue``, or any manifest). Each commit is one labeller's batch of changes
(``add`` and ``remove`` taxonomy labels on some frames, an undo being a commit too) and makes a new
version:

- ``versions/v000042.parquet`` holds every label then in force, one row per (frame, label) with
  who set it and when, so each version is complete on its own and small (no image bytes);
- ``events.jsonl`` keeps every commit in order (who, when, what, which version it made).

Commits take an exclusive ``flock`` on the store, read the newest version *inside* the lock and
apply their changes to it, so two people committing at once both land, one after the other; a
labeller's view being stale loses nothing. A version file is written to a temporary name, fsynced
and renamed, so a crash leaves the previous version whole.

:meth:`LabelStore.attach_clusters` groups the frames by cluster (a ``python -m livelens.loop
cluster`` run, or any id → cluster map) for the page's gallery; :meth:`LabelStore.clusters` sums
each group: size, medoids, how many are labelled and with what. Frames of a queue manifest carry
their cluster in ``attributes`` already, which serves when nothing was attached.

:meth:`LabelStore.materialise` writes a manifest version (the frames with their labels, and the
labellers in ``attributes``) that training and evaluation read like any other manifest.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from livelens.errors import ConfigError, InvalidArgumentError, NotFoundError

VERSIONS_DIR = "versions"
EVENTS_FILE = "events.jsonl"
SOURCE_FILE = "source.json"
CLUSTERS_FILE = "clusters.json"
LOCK_FILE = "LOCK"
_VERSION_RE = re.compile(r"^v(\d{6})\.parquet$")
#: A labeller's name: letters, digits and ``._@-`` (an API key id, an e-mail, a login).
_WHO_RE = re.compile(r"^[\w.@-]{1,128}$")
#: What a frame id may look like wherever a client names one (routes, Label Studio tasks).
FRAME_ID_PATTERN = r"^[\w.-]{1,128}$"
MAX_IDS_PER_COMMIT = 10_000

LABELS_SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("by", pa.string(), nullable=False),
    pa.field("at", pa.float64(), nullable=False),
])


@dataclass(frozen=True)
class Commit:
    """What one commit did."""

    version: int
    by: str
    at: float
    ids: int
    added: int
    removed: int


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LabelStore:
    """Versioned labels over one manifest's frames.

    Args:
        root: The store's directory (created on :meth:`create`).
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / SOURCE_FILE).is_file():
            raise NotFoundError(f"{self.root}: not a label store (no {SOURCE_FILE}); create one with LabelStore.create")
        doc = json.loads((self.root / SOURCE_FILE).read_text())
        self.manifest = Path(doc["manifest"])
        self.vocabulary = frozenset(doc["labels"])

    @classmethod
    def create(cls, root: str | Path, manifest: str | Path, labels: Iterable[str] | None = None) -> LabelStore:
        """A new store over ``manifest``'s frames (opened as it is when one already exists for it).

        Args:
            root: The store's directory.
            manifest: The frames to label (a manifest directory).
            labels: The labels a labeller may set (default: every taxonomy label).

        Raises:
            ConfigError: ``root`` already holds a store over another manifest.
        """
        from livelens.data.manifest import read_manifest

        root, manifest = Path(root), Path(manifest).resolve()
        read_manifest(manifest, columns=["id"])  # fail now on a path that is no manifest
        if labels is None:
            from livelens.taxonomy import load_taxonomy

            labels = load_taxonomy().labels
        src = root / SOURCE_FILE
        if src.is_file():
            have = json.loads(src.read_text())["manifest"]
            if Path(have) != manifest:
                raise ConfigError(f"{root} already labels {have}, not {manifest}")
            return cls(root)
        (root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        tmp = root / f".{SOURCE_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps({"manifest": str(manifest), "labels": sorted(set(labels))}, indent=1))
        os.replace(tmp, src)
        return cls(root)

    # -- reading -----------------------------------------------------------------------------

    def frame_ids(self) -> list[str]:
        """Ids of the frames this store labels, in manifest order."""
        from livelens.data.manifest import read_manifest

        return read_manifest(self.manifest, columns=["id"]).column("id").to_pylist()

    def versions(self) -> list[int]:
        """Version numbers, oldest first (0, the empty start, is implicit)."""
        out = []
        for p in (self.root / VERSIONS_DIR).iterdir():
            m = _VERSION_RE.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int:
        """The newest version (0 before the first commit)."""
        v = self.versions()
        return v[-1] if v else 0

    def _path(self, version: int) -> Path:
        return self.root / VERSIONS_DIR / f"v{version:06d}.parquet"

    def table(self, version: int | None = None) -> pa.Table:
        """Every (frame, label) in force at ``version`` (the newest by default), with who and when.

        Raises:
            NotFoundError: No such version.
        """
        version = self.latest() if version is None else version
        if version == 0:
            return LABELS_SCHEMA.empty_table()
        path = self._path(version)
        if not path.is_file():
            raise NotFoundError(f"label version {version} does not exist (newest: {self.latest()})")
        return pq.read_table(path, schema=LABELS_SCHEMA)

    def labels(self, version: int | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``{frame id: {label: {"by": who, "at": unix time}}}`` at ``version``."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for row in self.table(version).to_pylist():
            out.setdefault(row["id"], {})[row["label"]] = {"by": row["by"], "at": row["at"]}
        return out

    def events(self) -> list[dict[str, Any]]:
        """Every commit in order."""
        path = self.root / EVENTS_FILE
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def counts(self, version: int | None = None) -> dict[str, int]:
        """Frames per label at ``version``."""
        out: dict[str, int] = {}
        for lab in self.table(version).column("label").to_pylist():
            out[lab] = out.get(lab, 0) + 1
        return dict(sorted(out.items()))

    def analysis(self, version: int | None = None) -> dict[str, Any]:
        """The page's dataset analysis at ``version``: what is labelled, and how the served model did on it.

        The served model's side is the answer it gave when the frame was captured (the labels it
        raised to block or review, kept by ``samples_to_manifest``), scored against the labellers'
        labels. A labelled frame's labels are taken as complete: a label nobody set is a negative.

        Returns:
            ``version``; ``splits``: frames, labelled frames and frames per label in each split;
            ``coverage``: every label a labeller may set, with its labelled frames and the frames the
            served model raised it on (largest first, then the ones nobody has labelled);
            ``served``: over labelled frames with a captured answer, per label ``tp``/``fp``/``fn``
            and precision/recall (``None`` where undefined), and ``confusion``: for each true label,
            the frames per label the model raised (``"(none)"`` when it raised nothing).
        """
        from livelens.data.manifest import read_manifest

        version = self.latest() if version is None else version
        by_id = self.labels(version)
        table = read_manifest(self.manifest, columns=["id", "split", "attributes"])
        splits: dict[str, dict[str, Any]] = {}
        truth_n: dict[str, int] = {}
        raised_n: dict[str, int] = {}
        tp: dict[str, int] = {}
        fp: dict[str, int] = {}
        fn: dict[str, int] = {}
        confusion: dict[str, dict[str, int]] = {}
        scored = 0
        for rid, split, attrs in zip(*(table.column(c).to_pylist() for c in ("id", "split", "attributes")),
                                     strict=True):
            labs = set(by_id.get(rid, {}))
            sp = splits.setdefault(split or "train", {"frames": 0, "labelled": 0, "counts": {}})
            sp["frames"] += 1
            if not labs:
                continue
            sp["labelled"] += 1
            for lab in labs:
                sp["counts"][lab] = sp["counts"].get(lab, 0) + 1
                truth_n[lab] = truth_n.get(lab, 0) + 1
            capture = (json.loads(attrs or "{}") or {}).get("capture") or {}
            if "predicted" not in capture:
                continue  # no served answer was kept with this frame
            scored += 1
            pred = set(capture["predicted"] or ())
            for lab in pred:
                raised_n[lab] = raised_n.get(lab, 0) + 1
            for lab in labs | pred:
                bucket = tp if lab in labs and lab in pred else fp if lab in pred else fn
                bucket[lab] = bucket.get(lab, 0) + 1
            for lab in labs:
                row = confusion.setdefault(lab, {})
                for p in sorted(pred) or ["(none)"]:
                    row[p] = row.get(p, 0) + 1

        def ratio(a: int, b: int) -> float | None:
            return round(a / b, 4) if b else None

        per_label = {lab: {"tp": tp.get(lab, 0), "fp": fp.get(lab, 0), "fn": fn.get(lab, 0),
                           "precision": ratio(tp.get(lab, 0), tp.get(lab, 0) + fp.get(lab, 0)),
                           "recall": ratio(tp.get(lab, 0), tp.get(lab, 0) + fn.get(lab, 0))}
                     for lab in sorted(set(tp) | set(fp) | set(fn))}
        coverage = sorted(({"label": lab, "labelled": truth_n.get(lab, 0), "raised": raised_n.get(lab, 0)}
                           for lab in self.vocabulary), key=lambda r: (-r["labelled"], -r["raised"], r["label"]))
        for sp in splits.values():
            sp["counts"] = dict(sorted(sp["counts"].items()))
        return {"version": version, "splits": dict(sorted(splits.items())), "coverage": coverage,
                "served": {"frames": scored, "per_label": per_label,
                           "confusion": {k: dict(sorted(v.items())) for k, v in sorted(confusion.items())}}}

    def cluster_groups(self) -> tuple[dict[int, list[str]], dict[int, list[str]], str]:
        """``(members, medoids, source)``: frame ids per cluster, in manifest order, and medoids.

        From :meth:`attach_clusters` when a grouping was attached, else from the ``cluster`` each
        queue frame carries in ``attributes`` (medoids then: none). Empty when neither has one.
        """
        from livelens.data.manifest import read_manifest

        path = self.root / CLUSTERS_FILE
        members: dict[int, list[str]] = {}
        if path.is_file():
            doc = json.loads(path.read_text())
            assign = doc["assign"]
            for rid in self.frame_ids():
                if rid in assign:
                    members.setdefault(int(assign[rid]), []).append(rid)
            return members, {int(c): list(m) for c, m in (doc.get("medoids") or {}).items()}, doc.get("source", "")
        table = read_manifest(self.manifest, columns=["id", "attributes"])
        for row in table.to_pylist():
            c = json.loads(row["attributes"] or "{}").get("cluster")
            if isinstance(c, int):
                members.setdefault(c, []).append(row["id"])
        return members, {}, "manifest attributes" if members else ""

    def clusters(self, version: int | None = None, n_medoids: int = 4) -> dict[str, Any]:
        """The gallery: per cluster its size, medoids, frames labelled and frames per label at ``version``.

        Returns:
            ``{"version", "source", "clusters": [{"cluster", "size", "medoids", "labelled", "counts"}]}``,
            largest cluster first; a cluster without attached medoids shows its first frames.
        """
        version = self.latest() if version is None else version
        members, medoids, source = self.cluster_groups()
        labelled = self.labels(version)
        out = []
        for c, ids in members.items():
            counts: dict[str, int] = {}
            for rid in ids:
                for lab in labelled.get(rid, {}):
                    counts[lab] = counts.get(lab, 0) + 1
            idset = set(ids)
            shown = [m for m in medoids.get(c, []) if m in idset] or ids
            out.append({"cluster": c, "size": len(ids), "medoids": shown[:n_medoids],
                        "labelled": sum(rid in labelled for rid in ids),
                        "counts": dict(sorted(counts.items(), key=lambda kv: -kv[1]))})
        out.sort(key=lambda e: (-e["size"], e["cluster"]))
        return {"version": version, "source": source, "clusters": out}

    def attach_clusters(self, assign: Mapping[str, int], medoids: Mapping[int, Sequence[str]] | None = None,
                        source: str = "") -> int:
        """Group this store's frames by cluster for the gallery (replacing any earlier grouping).

        Args:
            assign: Frame id → cluster; ids that are not frames of this store are left out.
            medoids: Cluster → its most central frame ids (shown first).
            source: Where the grouping came from (a cluster run's directory), for the page.

        Returns:
            The number of frames grouped.

        Raises:
            ConfigError: None of ``assign``'s ids is a frame of this store.
        """
        known = set(self.frame_ids())
        kept = {str(rid): int(c) for rid, c in assign.items() if rid in known}
        if not kept:
            raise ConfigError(f"none of the {len(assign)} clustered ids is a frame of {self.manifest}")
        doc = {"source": source, "assign": kept,
               "medoids": {str(int(c)): [m for m in ids if m in known] for c, ids in (medoids or {}).items()}}
        tmp = self.root / f".{CLUSTERS_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.root / CLUSTERS_FILE)
        return len(kept)

    def attach_cluster_run(self, run_dir: str | Path) -> int:
        """:meth:`attach_clusters` from a ``python -m livelens.loop cluster`` output directory.

        Raises:
            NotFoundError: No ``clusters.parquet`` there.
        """
        run = Path(run_dir)
        if not (run / "clusters.parquet").is_file():
            raise NotFoundError(f"{run}: no clusters.parquet (write one with 'python -m livelens.loop cluster')")
        table = pq.read_table(run / "clusters.parquet")
        medoids = {}
        if (run / "summary.json").is_file():
            medoids = {int(e["cluster"]): e.get("medoids", [])
                       for e in json.loads((run / "summary.json").read_text()).get("clusters", [])}
        return self.attach_clusters(dict(zip(table.column("id").to_pylist(), table.column("cluster").to_pylist(),
                                             strict=True)), medoids, source=str(run))

    # -- writing -----------------------------------------------------------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / LOCK_FILE, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _check(self, ids: Sequence[str], add: Sequence[str], remove: Sequence[str], by: str) -> None:
        if not isinstance(by, str) or not _WHO_RE.match(by):
            raise InvalidArgumentError(f"labeller {by!r}: want 1-128 letters, digits or ._@-", code="bad_labeller")
        if not ids:
            raise InvalidArgumentError("no frame ids to label", code="no_ids")
        if len(ids) > MAX_IDS_PER_COMMIT:
            raise InvalidArgumentError(f"{len(ids)} frames in one commit; at most {MAX_IDS_PER_COMMIT}",
                                       code="too_many_ids")
        if not add and not remove:
            raise InvalidArgumentError("nothing to do: give labels to add or remove", code="no_labels")
        unknown = sorted({lab for lab in (*add, *remove) if lab not in self.vocabulary})
        if unknown:
            raise InvalidArgumentError(f"unknown labels {unknown[:10]}; labels come from the taxonomy",
                                       code="unknown_label")
        both = sorted(set(add) & set(remove))
        if both:
            raise InvalidArgumentError(f"labels both added and removed: {both}", code="conflicting_labels")
        known = set(self.frame_ids())
        missing = [i for i in ids if i not in known]
        if missing:
            raise NotFoundError(f"{len(missing)} frame ids are not in {self.manifest.name}: {missing[:5]}")

    def commit(self, ids: Sequence[str], *, add: Sequence[str] = (), remove: Sequence[str] = (),
               by: str, note: str = "") -> Commit:
        """Add and remove labels on frames, as one new version.

        Args:
            ids: The frames (a whole cluster, or a selection).
            add: Labels to set on every one of them.
            remove: Labels to take off them (an undo of an ``add``).
            by: Who labels (the API key id behind the page).
            note: Free text kept with the event (e.g. ``"cluster 7"``, ``"undo"``).

        Returns:
            The commit, with the version it made.

        Raises:
            InvalidArgumentError: Unknown or conflicting labels, no ids, a bad labeller name.
            NotFoundError: Ids that are not frames of this store's manifest.
        """
        ids, add, remove = list(dict.fromkeys(ids)), sorted(set(add)), sorted(set(remove))
        self._check(ids, add, remove, by)
        with self._locked():
            version = self.latest()
            current = {(r["id"], r["label"]): r for r in self.table(version).to_pylist()}
            now = time.time()
            added = removed = 0
            for rid in ids:
                for lab in remove:
                    removed += current.pop((rid, lab), None) is not None
                for lab in add:
                    if (rid, lab) not in current:  # a label already set keeps who set it first
                        current[(rid, lab)] = {"id": rid, "label": lab, "by": by, "at": now}
                        added += 1
            new = version + 1
            rows = sorted(current.values(), key=lambda r: (r["id"], r["label"]))
            table = pa.Table.from_pylist(rows, schema=LABELS_SCHEMA)
            tmp = self.root / VERSIONS_DIR / f".v{new:06d}.{uuid.uuid4().hex}.tmp"
            pq.write_table(table, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self._path(new))
            _fsync_dir(self.root / VERSIONS_DIR)
            event = {"version": new, "by": by, "at": now, "ids": ids, "add": add, "remove": remove, "note": note[:200]}
            with open(self.root / EVENTS_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(event) + "\n")
                f.flush()
                os.fsync(f.fileno())
        return Commit(version=new, by=by, at=now, ids=len(ids), added=added, removed=removed)

    def materialise(self, out: str | Path, version: int | None = None, labelled_only: bool = True) -> Path:
        """Write the frames with their labels at ``version`` as a manifest (for training).

        Each row's ``attributes`` gains ``labelled_by`` ({label: {"by", "at"}}) and the store's version.

        Args:
            out: The manifest directory to write.
            version: The label version (newest by default).
            labelled_only: Keep only frames with at least one label.

        Raises:
            ConfigError: Nothing labelled at that version.
        """
        from livelens.data.manifest import read_manifest, write_manifest

        version = self.latest() if version is None else version
        by_id = self.labels(version)
        table = read_manifest(self.manifest)
        rows = []
        for row in table.to_pylist():
            labs = by_id.get(row["id"], {})
            if labelled_only and not labs:
                continue
            attrs = json.loads(row.get("attributes") or "{}")
            attrs.update(labelled_by=labs, label_version=version)
            rows.append({**row, "labels": sorted(labs), "attributes": json.dumps(attrs, sort_keys=True)})
        if not rows:
            raise ConfigError(f"no labelled frames at version {version} of {self.root}")
        card = {"name": f"labels-{self.root.name}", "version": str(version), "generator": "livelens.loop.labels",
                "labelled_from": str(self.manifest), "label_store": str(self.root)}
        return write_manifest(rows, out, card, contact_sheet=False)

"""The labelling loop from the command line: embed, cluster, dedupe, queue, and captured traffic.

    python -m livelens.loop embed   --manifest runs/data/frames --out runs/loop/emb [--model safety@2]
    python -m livelens.loop cluster --embeddings runs/loop/emb --manifest runs/data/frames --out runs/loop/clusters [--k 16]
    python -m livelens.loop dedupe  --embeddings runs/loop/emb --manifest runs/data/frames --out runs/loop/dedup
    python -m livelens.loop queue   --embeddings runs/loop/emb --manifest runs/capture-set --out runs/loop/queue --budget 200
    python -m livelens.loop captured --uri runs/capture --out runs/capture-set
    python -m livelens.loop labels  --manifest runs/loop/queue --store runs/loop/labels [--clusters runs/loop/clusters] [--out runs/loop/labelled]
    python -m livelens.loop retrain --labels runs/loop/labels --base runs/data/frames [--app livelens]
    python -m livelens.loop ls-export --manifest runs/loop/queue --out runs/loop/ls [--storage-prefix loop/ls]
    python -m livelens.loop ls-import --export runs/loop/ls/export.json --images runs/loop/ls/images --out runs/loop/ls-labelled

Each command's flags come from its config dataclass (``--help`` lists them). Commands that run on
Ray join the cluster in ``RAY_ADDRESS`` or start a local one.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import MISSING, dataclass, fields
from typing import Any

from livelens.cli_config import config_from_args, config_parser
from livelens.errors import LivelensError


@dataclass
class ClusterJob:
    """Cluster embeddings and write the summary.

    Attributes:
        embeddings: The embedding job's output.
        out: Summary directory (``summary.json``, ``clusters.parquet``, ``sheets/``).
        manifest: The manifest they came from (for contact sheets; optional).
        k: Clusters; 0 chooses by silhouette.
        method: ``kmeans`` or ``hdbscan``.
        min_cluster_size: HDBSCAN's smallest cluster.
        seed: k-means seed.
    """

    embeddings: str
    out: str
    manifest: str | None = None
    k: int = 0
    method: str = "kmeans"
    min_cluster_size: int = 10
    seed: int = 0


@dataclass
class DedupeJob:
    """Find near-duplicates and write the de-duplicated manifest.

    Attributes:
        embeddings: The embedding job's output.
        manifest: The manifest they came from.
        out: The de-duplicated manifest (with ``duplicates.json``).
    """

    embeddings: str
    manifest: str
    out: str


@dataclass
class CapturedJob:
    """Turn the capture store into an unlabelled manifest.

    Attributes:
        uri: The store (``CaptureConfig.uri``).
        out: The manifest directory.
    """

    uri: str
    out: str


@dataclass
class LabelsJob:
    """Create the label store over a labelling queue, or write its labelled frames as a manifest.

    Attributes:
        store: The label store directory (the service's ``labelling.store``).
        manifest: The frames to label (a queue manifest); needed to create the store.
        out: Write the frames labelled so far, with their labels, as a manifest here.
        version: The label version to write (default: the newest).
        clusters: A ``cluster`` run's directory: group the store's frames by its clusters, for
            the page's cluster gallery.
    """

    store: str
    manifest: str | None = None
    out: str | None = None
    version: int | None = None
    clusters: str | None = None


def run_labels(job: LabelsJob) -> dict[str, Any]:
    from livelens.loop.labels import LabelStore

    store = LabelStore.create(job.store, job.manifest) if job.manifest else LabelStore(job.store)
    result: dict[str, Any] = {"store": str(store.root), "manifest": str(store.manifest),
                              "frames": len(store.frame_ids()), "version": store.latest(), "counts": store.counts()}
    if job.clusters:
        result["clustered_frames"] = store.attach_cluster_run(job.clusters)
    if job.out:
        result["written"] = str(store.materialise(job.out, job.version))
    return result


def _ray() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False)


def run_cluster(job: ClusterJob) -> dict[str, Any]:
    from livelens.loop import cluster
    from livelens.loop.embed import read_embeddings

    e = read_embeddings(job.embeddings)
    if job.method == "hdbscan":
        cl = cluster.hdbscan(e.vectors, job.min_cluster_size)
    elif job.method == "kmeans":
        cl = cluster.kmeans(e.vectors, job.k or None, seed=job.seed)
    else:
        from livelens.errors import ConfigError

        raise ConfigError(f"method must be kmeans or hdbscan, got {job.method!r}")
    labelled = any(e.labels)
    summary = cluster.summarize(e.vectors, cl, e.ids, e.labels if labelled else None)
    cluster.write_summary(job.out, summary, cl, e.ids, job.manifest)
    return {k: summary[k] for k in ("method", "k", "rows", "noise", "purity", "nmi") if k in summary}


def run_dedupe(job: DedupeJob) -> dict[str, Any]:
    from livelens.data.manifest import read_manifest
    from livelens.imageio import decode_image
    from livelens.loop import dedupe
    from livelens.loop.embed import read_embeddings

    e = read_embeddings(job.embeddings)
    table = read_manifest(job.manifest, columns=["id", "image_bytes"])
    pos = {rid: i for i, rid in enumerate(table.column("id").to_pylist())}
    data = table.column("image_bytes")
    h = dedupe.hashes([decode_image(data[pos[i]].as_py()) for i in e.ids])
    found = dedupe.find_duplicates(h, e.vectors)
    return dedupe.write_deduplicated(job.manifest, e.ids, found, job.out)


@dataclass
class LabelStudioExportJob:
    """Write frames as Label Studio tasks, pre-annotated by the serving code.

    Attributes:
        manifest: The frames (e.g. a labelling queue).
        out: The folder Label Studio imports (``tasks.json``, ``images/``, ``label_config.xml``).
        storage_prefix: The folder's path under Label Studio's ``LOCAL_FILES_DOCUMENT_ROOT``.
        safety_ref: The safety model that pre-annotates (the served one by default).
        limit: Export at most this many frames.
    """

    manifest: str
    out: str
    storage_prefix: str = ""
    safety_ref: str = "safety"
    limit: int | None = None


@dataclass
class LabelStudioImportJob:
    """Read a Label Studio JSON export (labels and boxes) into a manifest.

    Attributes:
        export: The export file (Label Studio's JSON format).
        out: The manifest directory to write.
        images: Where the task images are (default: next to the export).
    """

    export: str
    out: str
    images: str | None = None


def run_ls_export(job: LabelStudioExportJob) -> dict[str, Any]:
    from livelens.analyzer import LocalAnalyzer
    from livelens.loop.label_studio import export_tasks

    analyzer = LocalAnalyzer(safety_ref=job.safety_ref, caps=("moderate",), evidence="boxes")
    return export_tasks(job.manifest, job.out, analyzer, storage_prefix=job.storage_prefix, limit=job.limit)


def run_ls_import(job: LabelStudioImportJob) -> dict[str, Any]:
    from livelens.data.importers import import_label_studio
    from livelens.data.manifest import write_manifest

    rows = import_label_studio(job.export, job.images)
    out = write_manifest(rows, job.out, {"name": "label-studio", "imported_from": job.export}, contact_sheet=False)
    return {"manifest": str(out), "frames": len(rows), "labelled": sum(bool(r["labels"]) for r in rows)}


def main(argv: list[str] | None = None) -> int:
    from livelens.loop.capture import samples_to_manifest
    from livelens.loop.embed import EmbedConfig, embed_manifest
    from livelens.loop.queue import QueueJob, build_queue
    from livelens.loop.retrain import RetrainJob, retrain

    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"embed": EmbedConfig, "cluster": ClusterJob, "dedupe": DedupeJob, "queue": QueueJob,
                "captured": CapturedJob, "labels": LabelsJob, "retrain": RetrainJob,
                "ls-export": LabelStudioExportJob, "ls-import": LabelStudioImportJob}
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    name, rest = argv[0], argv[1:]
    cls = commands[name]
    parser = config_parser(cls, description=(cls.__doc__ or "").splitlines()[0])
    ns = parser.parse_args(rest)
    given = vars(ns)
    need = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    absent = [n for n in need if f"cfg:{n}" not in given]
    if absent:
        parser.error("missing " + ", ".join("--" + n.replace("_", "-") for n in absent))
    try:
        job = config_from_args(cls(**{n: given[f"cfg:{n}"] for n in need}), ns)
        if name == "embed":
            _ray()
            result: Any = embed_manifest(job)
        elif name == "cluster":
            result = run_cluster(job)
        elif name == "dedupe":
            result = run_dedupe(job)
        elif name == "queue":
            result = build_queue(job)
        elif name == "labels":
            result = run_labels(job)
        elif name == "ls-export":
            result = run_ls_export(job)
        elif name == "ls-import":
            result = run_ls_import(job)
        elif name == "retrain":
            report = retrain(job)
            result = {k: report[k] for k in ("gate", "published", "seconds", "dir")}
        else:
            result = {"manifest": samples_to_manifest(job.uri, job.out)}
    except LivelensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

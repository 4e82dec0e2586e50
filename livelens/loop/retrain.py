"""Retrain → gate → swap: the step that closes the labelling loop (``make retrain``).

1. **Data.** The newest label version of a label store is materialised and merged into the base
   training manifest as a new manifest (``<out>/<run>/manifest``). Labelled frames go to ``train``;
   one whose id is in the held-out split is refused (it would leak into the figure that gates).
2. **Train.** The safety job (:func:`train_jobs.safety.run`, Ray Train) trains a candidate into a
   *staging* store, where nothing serves it.
3. **Evaluate.** The served model and the candidate are both measured on the same fixed held-out
   split by :func:`livelens.evaluation.evaluate_service` over :class:`livelens.analyzer.LocalAnalyzer`:
   the engines and fusion that ``/v1/analyze`` runs.
4. **Gate** (:func:`gate`). Every label the served model covers (recall > 0 on the held-out split)
   must keep its recall and its precision within ``tolerance``; the report names each label that
   blocked, by how much.
5. **Publish and swap.** Only a candidate that passed is copied into the user store (a new
   version, its card carrying the gate's report), and, when a Serve application is named, swapped
   in live through ``serve_apps.admin.set_live`` (no request fails during a swap; tested there).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from livelens.errors import ConfigError, ManifestError
from livelens.store import user_store

#: A label counts as covered by the served model from this held-out recall up.
COVERED_RECALL = 1e-9


@dataclass
class RetrainJob:
    """One turn of the loop.

    Attributes:
        labels: The label store (:class:`livelens.loop.labels.LabelStore`) whose newest version is used.
        base: The training manifest the labels are added to.
        heldout: The manifest whose ``split`` rows are the fixed held-out set (default: ``base``).
        split: The held-out split.
        served: The model the candidate must not be worse than (``name@version``, in the store chain).
        tolerance: How far a covered label's recall or precision may fall before the gate blocks.
        out: Where each run writes its manifest, staging store and report.
        store: The user store a passed candidate is published to.
        app: A running Serve application to swap the new model into ('' = publish only).
        limit: Only the first ``limit`` held-out rows (smoke runs).
        train: Overrides of :class:`train_jobs.safety.SafetyTrainConfig` (flat keys, e.g. ``epochs``).
    """

    labels: str = "runs/loop/labels"
    base: str = "runs/data/frames"
    heldout: str = ""
    split: str = "test"
    served: str = "safety"
    tolerance: float = 0.02
    out: str = "runs/retrain"
    store: str = field(default_factory=user_store)
    app: str = ""
    limit: int | None = None
    train: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.tolerance <= 1.0:
            raise ConfigError(f"tolerance must be within [0, 1], got {self.tolerance}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        self.heldout = self.heldout or self.base


def merge_labelled(base: str | Path, labelled: str | Path, out: str | Path, heldout: str | Path,
                   split: str = "test") -> dict[str, Any]:
    """Write ``base`` plus the ``labelled`` frames (as ``train`` rows) as a new manifest.

    A labelled frame replaces a base frame with the same id. One whose id is in ``heldout``'s
    ``split`` is refused, and counted.

    Returns:
        ``{"manifest", "base_rows", "labelled_rows", "added", "replaced", "refused_heldout"}``.

    Raises:
        ManifestError: A manifest is missing or unreadable.
    """
    from livelens.data.manifest import load_card, read_manifest, write_manifest

    held = {r["id"] for r in read_manifest(heldout, columns=["id", "split"]).to_pylist() if r["split"] == split}
    rows = {r["id"]: r for r in read_manifest(base).to_pylist()}
    new = read_manifest(labelled).to_pylist()
    refused = [r["id"] for r in new if r["id"] in held]
    kept = [{**r, "split": "train"} for r in new if r["id"] not in held]
    replaced = sum(r["id"] in rows for r in kept)
    n_base = len(rows)
    rows.update({r["id"]: r for r in kept})
    card = {**load_card(base), "name": f"{Path(str(base)).name}+labels", "merged_from": [str(base), str(labelled)],
            "labelled_rows": len(kept), "refused_heldout": len(refused)}
    path = write_manifest(list(rows.values()), out, card, contact_sheet=False)
    return {"manifest": str(path), "base_rows": n_base, "labelled_rows": len(new), "added": len(kept) - replaced,
            "replaced": replaced, "refused_heldout": refused}


def _num(v: Any) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def gate(served: Mapping[str, Mapping[str, Any]], candidate: Mapping[str, Mapping[str, Any]],
         tolerance: float) -> dict[str, Any]:
    """Compare per-label held-out figures (:func:`livelens.evaluation.label_metrics` entries).

    A label is *covered* when the served model's recall on it is above 0. For each covered label
    the candidate's recall and precision must be at least the served ones less ``tolerance``
    (an undefined precision, from predicting the label nowhere, counts as 0). Labels the served
    model misses and the candidate finds are reported as gained.

    Returns:
        ``{"passed", "tolerance", "covered", "blocked": [{"label", "metric", "served", "candidate",
        "drop"}], "gained": [{"label", "recall"}]}``.
    """
    blocked, gained, covered = [], [], []
    for label in sorted(set(served) | set(candidate)):
        s, c = served.get(label, {}), candidate.get(label, {})
        s_rec, c_rec = _num(s.get("recall")), _num(c.get("recall"))
        if s_rec is None or s_rec < COVERED_RECALL:
            if c_rec:
                gained.append({"label": label, "recall": round(c_rec, 4)})
            continue
        covered.append(label)
        for metric in ("recall", "precision"):
            sv, cv = _num(s.get(metric)) or 0.0, _num(c.get(metric)) or 0.0
            if cv < sv - tolerance:
                blocked.append({"label": label, "metric": metric, "served": round(sv, 4), "candidate": round(cv, 4),
                                "drop": round(sv - cv, 4)})
    blocked.sort(key=lambda b: -b["drop"])
    return {"passed": not blocked, "tolerance": tolerance, "covered": covered, "blocked": blocked, "gained": gained}


def evaluate_refs(served: str, candidate: str, stores: list[str], staging: str, heldout: str, split: str,
                  limit: int | None) -> dict[str, dict[str, Any]]:
    """Per-label figures of the served and the candidate safety model as the service answers.

    Both run through :func:`livelens.evaluation.evaluate_services` over two
    :class:`~livelens.analyzer.LocalAnalyzer` s that share their OCR, quality and persons stages:
    only the moderation stage differs between them, so only it runs twice per frame.

    Returns:
        ``{"served": {...}, "candidate": {...}}``, each ``{"ref", "rows", "models", "fused", "seconds"}``.
    """
    from livelens.analyzer import LocalAnalyzer
    from livelens.evaluation import evaluate_services

    a_served = LocalAnalyzer(safety_ref=served, stores=stores)
    a_cand = LocalAnalyzer(safety_ref=candidate, stores=[staging, *stores], share_from=a_served)
    res = evaluate_services({"served": a_served, "candidate": a_cand}, heldout, split=split, limit=limit)
    return {name: {"ref": ref, "rows": res[name]["rows"], "models": res[name]["models"], "fused": res[name]["fused"],
                   "seconds": res[name]["seconds"]}
            for name, ref in (("served", served), ("candidate", candidate))}


def publish(staging: str, ref: str, store: str, report: Mapping[str, Any], chain: Sequence[str] = ()) -> str:
    """Copy a staged model into ``store`` as its next version, the gate's report in its card.

    The version is one above the newest of that name in ``store`` *and* in ``chain``: a serving
    chain resolves ``safety@1`` to its first store that has one, so a new ``safety@1`` in an empty
    store would shadow the served model, and a swap to that ref would change nothing.
    """
    from livelens.store import ModelStore

    stored = ModelStore(staging).load(ref)
    card = {k: v for k, v in stored.card.items() if k not in ("name", "version", "ref", "created_at")}
    card["gate"] = {k: report[k] for k in ("gate", "served", "manifest") if k in report}
    return ModelStore(store).save(stored.ref.split("@")[0], stored.state_dict, json.loads(json.dumps(card, default=str)),
                                  avoid=chain)


def retrain(job: RetrainJob) -> dict[str, Any]:
    """One turn: merge, train, evaluate both, gate, then publish and swap a candidate that passed.

    Returns:
        The report (also written to ``<out>/<run>/report.json`` and ``report.md``).

    Raises:
        ConfigError, ManifestError, NotFoundError: Bad job, no labels, unreadable manifests.
    """
    from livelens.cli_config import apply_flat
    from livelens.loop.labels import LabelStore
    from livelens.store import store_chain
    from train_jobs.safety import SafetyTrainConfig, run

    t0 = time.time()
    run_dir = Path(job.out) / time.strftime("retrain-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    labels = LabelStore(job.labels)
    labelled = labels.materialise(run_dir / "labelled")
    merged = merge_labelled(job.base, labelled, run_dir / "manifest", job.heldout, job.split)
    if merged["labelled_rows"] == len(merged["refused_heldout"]):
        raise ManifestError(f"every labelled frame of {job.labels} is in the held-out split: nothing to train on")
    staging = str(run_dir / "staging")
    cfg = apply_flat(SafetyTrainConfig(manifest=merged["manifest"], model_store=staging, register=True,
                                       storage_path=str((run_dir / "train").resolve()), run_name="candidate"),
                     job.train)
    t1 = time.time()
    summary = run(cfg)
    t2 = time.time()
    chain = list(store_chain())
    both = evaluate_refs(job.served, summary["ref"], chain, staging, job.heldout, job.split, job.limit)
    served, candidate = both["served"], both["candidate"]
    t3 = time.time()
    report: dict[str, Any] = {
        "labels": {"store": job.labels, "version": labels.latest()}, "manifest": merged,
        "served": {"ref": served["ref"], "rows": served["rows"]},
        "candidate": {"staged_ref": summary["ref"], "rows": candidate["rows"]},
        "gate": gate(served["fused"], candidate["fused"], job.tolerance),
        "per_label": {lab: {"served": served["fused"].get(lab), "candidate": candidate["fused"].get(lab)}
                      for lab in sorted(set(served["fused"]) | set(candidate["fused"]))},
        "job": asdict(job),
    }
    report["published"] = (publish(staging, summary["ref"], job.store, report, chain)
                           if report["gate"]["passed"] else None)
    if report["published"] and job.app:
        from serve_apps.admin import set_live

        report["live"] = set_live("moderate", {"safety_ref": report["published"]}, job.app)
    report["seconds"] = {"data": round(t1 - t0, 1), "train": round(t2 - t1, 1), "evaluate": round(t3 - t2, 1),
                         "total": round(time.time() - t0, 1)}
    (run_dir / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (run_dir / "report.md").write_text(format_report(report))
    report["dir"] = str(run_dir)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The report as Markdown: the decision, what blocked it, and the per-label table."""
    g = report["gate"]
    lines = [f"# Retrain: {'passed' if g['passed'] else 'blocked'}", "",
             f"Served `{report['served']['ref']}` against candidate `{report['candidate']['staged_ref']}` on "
             f"{report['served']['rows']} held-out frames; tolerance {g['tolerance']}; "
             f"published: {report.get('published') or 'nothing'}.", ""]
    for b in g["blocked"]:
        lines.append(f"- blocked by **{b['label']}**: {b['metric']} {b['served']} → {b['candidate']} (−{b['drop']})")
    for x in g["gained"]:
        lines.append(f"- gained **{x['label']}**: recall {x['recall']} (the served model finds none)")
    lines += ["", "| label | served R / P | candidate R / P |", "|---|---|---|"]

    def rp(m: Mapping[str, Any] | None) -> str:
        if not m:
            return "–"
        return " / ".join("–" if _num(m.get(k)) is None else f"{m[k]:.3f}" for k in ("recall", "precision"))

    for lab, row in report["per_label"].items():
        lines.append(f"| {lab} | {rp(row['served'])} | {rp(row['candidate'])} |")
    return "\n".join(lines) + "\n"


class RetrainRunner:
    """One retrain at a time as a child process, and what became of it (the labelling page's button).

    The child is ``python -m livelens.loop retrain`` with every field of the job as a flag, joined to
    this Ray cluster (``RAY_ADDRESS``): the same command as ``make retrain``, so a run from the page
    trains, gates, publishes and swaps exactly as one from a shell. Its log and report stay under
    ``<job.out>/page-<run id>/``.
    """

    def __init__(self, job: RetrainJob):
        self.job = job
        self._proc: Any = None
        self._run: dict[str, Any] | None = None

    def start(self, by: str) -> dict[str, Any]:
        """Start a run for ``by`` (the API key id); returns :meth:`status`.

        Raises:
            ConflictError: A run is still going.
            ConfigError: The base or held-out manifest is missing (nothing is started).
        """
        import os
        import subprocess
        import sys
        import uuid
        from dataclasses import replace

        from livelens.cli_config import config_argv
        from livelens.errors import ConflictError

        if self._proc is not None and self._proc.poll() is None:
            raise ConflictError(f"a retrain started by {self._run['by']} is still running (run {self._run['id']})",
                                code="retrain_running")
        for what in ("base", "heldout"):
            if not Path(getattr(self.job, what)).is_dir():
                raise ConfigError(f"retrain {what} manifest {getattr(self.job, what)} does not exist; build it with "
                                  "'make data' or set labelling.retrain in the app config", code="no_base_manifest")
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        out = Path(self.job.out) / f"page-{run_id}"
        out.mkdir(parents=True)
        env = dict(os.environ)
        try:
            import ray

            if ray.is_initialized():
                env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except ImportError:
            pass
        argv = [sys.executable, "-m", "livelens.loop", "retrain", *config_argv(replace(self.job, out=str(out)))]
        with open(out / "retrain.log", "wb") as log:
            self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._run = {"id": run_id, "by": by, "started_at": time.time(), "dir": str(out)}
        return self.status()

    def status(self) -> dict[str, Any]:
        """``idle``, ``running``, or the finished run's ``passed`` / ``blocked`` (with the gate's
        verdict, the published ref and the seconds per stage) or ``failed`` (with the log's tail)."""
        if self._run is None:
            return {"state": "idle"}
        run, rc = dict(self._run), self._proc.poll()
        run["seconds"] = round(time.time() - run["started_at"], 1)
        if rc is None:
            return {"state": "running", **run}
        reports = sorted(Path(run["dir"]).glob("retrain-*/report.json"))
        if rc != 0 or not reports:
            log = Path(run["dir"]) / "retrain.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            return {"state": "failed", "exit_code": rc, "log_tail": tail, **run}
        report = json.loads(reports[-1].read_text())
        g = report["gate"]
        return {"state": "passed" if g["passed"] else "blocked", **run, "exit_code": rc,
                "gate": {k: g.get(k) for k in ("passed", "covered", "gained", "blocked", "tolerance")},
                "published": report.get("published"), "live": report.get("live"), "took": report.get("seconds"),
                "report": str(reports[-1])}

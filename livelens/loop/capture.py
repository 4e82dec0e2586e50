"""Traffic capture: a bounded, rotating sample store of served frames for the labelling loop.

The gateway offers every answered frame to :class:`SampleStore`. :func:`sampling_reason` decides
in microseconds whether to keep it: frames the service was unsure of (a label score near its
threshold), frames where sources disagreed (OCR overruled the classifier), and a small random
share. Kept frames go into a bounded in-memory queue; a background thread writes them as Parquet
shards (image bytes, the answer, model versions, uncertainty, reason). The request path only
enqueues: a full queue or a broken disk drops samples (counted), never the request.

Commit protocol: a shard is written to a temporary name, flushed, then renamed. A sample counts as
committed once its shard has its final name; a crash loses at most the samples still in memory.
Rotation deletes the oldest shards while the store holds more than ``max_rows`` or ``max_bytes``.

Capture is off unless ``enabled``; ``privacy_mode`` turns it off whatever else says, and only the
key ids in ``keys`` (``["*"]`` = every key) are ever sampled.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, model_validator

from livelens.errors import ConfigError

log = logging.getLogger("livelens.capture")

SCHEMA = pa.schema([
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("captured_at", pa.float64(), nullable=False),
    pa.field("request_id", pa.string()),
    pa.field("key_id", pa.string()),
    pa.field("route", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("uncertainty", pa.float32()),
    pa.field("models", pa.list_(pa.string())),
    pa.field("decision", pa.string()),
    pa.field("answer", pa.string()),
    pa.field("image_bytes", pa.binary()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
])
SHARD_PREFIX = "shard-"


class CaptureConfig(BaseModel):
    """What the gateway samples into the store.

    Attributes:
        enabled: Opt in: nothing is captured unless this is on.
        privacy_mode: The privacy switch: on means no capture at all, whatever else is set.
        uri: Where shards go: a local directory or a pyarrow filesystem URI (``s3://…``, ``gs://…``).
        keys: API key ids whose traffic may be sampled; ``["*"]`` = every key. Requests without a
            key (auth off) are sampled only with ``"*"``.
        band: A label counts as uncertain when its score is within this of its acting threshold.
        uncertain_share: Share of uncertain or disagreeing frames kept.
        random_share: Share of all other frames kept (what the model does not know it misses).
        max_rows: Rows the store keeps at most; the oldest shards go first.
        max_bytes: Bytes the store keeps at most.
        shard_rows: Rows per shard (written sooner after ``flush_s``).
        flush_s: Longest a sample waits in memory before its shard is written.
        queue_size: Samples waiting for the writer; beyond it new samples are dropped.
        max_image_bytes: Larger images are not kept (the answer still is).
    """

    model_config = ConfigDict(extra="forbid")
    enabled: bool = False
    privacy_mode: bool = False
    uri: str = "runs/capture"
    keys: list[str] = Field(default_factory=list)
    band: float = Field(0.15, ge=0, le=1)
    uncertain_share: float = Field(1.0, ge=0, le=1)
    random_share: float = Field(0.01, ge=0, le=1)
    max_rows: int = Field(100_000, gt=0)
    max_bytes: int = Field(2 * 1024 ** 3, gt=0)
    shard_rows: int = Field(256, gt=0)
    flush_s: float = Field(10.0, gt=0)
    queue_size: int = Field(2048, gt=0)
    max_image_bytes: int = Field(4 * 1024 * 1024, gt=0)

    @model_validator(mode="after")
    def _check(self) -> CaptureConfig:
        if self.shard_rows > self.max_rows:
            raise ValueError(f"shard_rows ({self.shard_rows}) cannot exceed max_rows ({self.max_rows})")
        return self

    @property
    def active(self) -> bool:
        return self.enabled and not self.privacy_mode


def uncertainty_of(answer: Mapping[str, Any]) -> float:
    """The answer's most doubtful label, as :func:`livelens.loop.active.binary_uncertainty` scores it
    against each label's acting threshold (0 when no label has a threshold inside (0, 1))."""
    from livelens.loop.active import binary_uncertainty

    pairs = [(float(lab.get("score", 0.0)), float(lab.get("threshold", 0.5))) for lab in answer.get("labels", ())]
    pairs = [(s, t) for s, t in pairs if 0 < t < 1]
    if not pairs:
        return 0.0
    s, t = zip(*pairs, strict=True)
    return float(binary_uncertainty(np.asarray([s]), np.asarray(t))[0])


def sampling_reason(answer: Mapping[str, Any], cfg: CaptureConfig, rng: random.Random) -> tuple[str | None, float]:
    """Why to keep this answer's frame (``disagreeing``, ``near_threshold`` or ``random``), or None;
    and its uncertainty."""
    u = uncertainty_of(answer)
    labels = answer.get("labels", ())
    if any(lab.get("overruled") for lab in labels):
        reason = "disagreeing"
    elif any(abs(float(lab.get("score", 0)) - float(lab.get("threshold", 0.5))) <= cfg.band
             and float(lab.get("score", 0)) >= 0.05 for lab in labels):
        reason = "near_threshold"
    else:
        reason = None
    if reason is not None:
        return (reason if rng.random() < cfg.uncertain_share else None), u
    return ("random" if rng.random() < cfg.random_share else None), u


class SampleStore:
    """The gateway's sample store (one per replica; shards are named so replicas never collide).

    Args:
        cfg: The capture settings.
        start: Start the writer thread now (tests may drive :meth:`flush` by hand).
        on_event: Called with ``("sampled", reason)`` and ``("dropped", "queue_full" | "write_error")``
            (the gateway counts them in its metrics); it must not raise.
    """

    def __init__(self, cfg: CaptureConfig, start: bool = True,
                 on_event: Callable[[str, str], None] | None = None):
        import pyarrow.fs as pafs

        self.cfg = cfg
        self.on_event = on_event or (lambda kind, value: None)
        try:
            self.fs, self.root = pafs.FileSystem.from_uri(cfg.uri) if "://" in cfg.uri else (
                pafs.LocalFileSystem(), os.path.abspath(cfg.uri))
            self.fs.create_dir(self.root, recursive=True)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ConfigError(f"capture uri {cfg.uri!r} cannot be used: {exc}") from exc
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.q: queue.Queue[dict[str, Any]] = queue.Queue(maxsize=cfg.queue_size)
        self.rng = random.Random()
        self.writer = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.seq = 0
        self.stats = {"offered": 0, "sampled": 0, "dropped_full": 0, "write_errors": 0, "committed": 0,
                      "rotated_shards": 0}
        self._buf: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._clean_temp()
        self.thread = None
        if start:
            self.thread = threading.Thread(target=self._run, name="livelens-capture", daemon=True)
            self.thread.start()

    # ---- request path: never raises, never blocks -------------------------------------------

    def offer(self, *, image: bytes | None, answer: Mapping[str, Any], key_id: str | None,
              request_id: str | None = None, route: str | None = None) -> str | None:
        """Consider one answered frame; returns the sampling reason if it was queued."""
        try:
            cfg = self.cfg
            if not cfg.active or not self._key_allowed(key_id):
                return None
            self.stats["offered"] += 1
            reason, u = sampling_reason(answer, cfg, self.rng)
            if reason is None:
                return None
            sample = {"captured_at": time.time(), "request_id": request_id, "key_id": key_id, "route": route,
                      "reason": reason, "uncertainty": u, "answer": answer,
                      "image_bytes": image if image is not None and len(image) <= cfg.max_image_bytes else None}
            self.q.put_nowait(sample)
            self.stats["sampled"] += 1
            self.on_event("sampled", reason)
            return reason
        except queue.Full:
            self.stats["dropped_full"] += 1
            self.on_event("dropped", "queue_full")
            return None
        except Exception:  # capture must never fail a request
            log.exception("capture offer failed")
            return None

    def _key_allowed(self, key_id: str | None) -> bool:
        keys = self.cfg.keys
        return "*" in keys or (key_id is not None and key_id in keys)

    # ---- writer ----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                item = self.q.get(timeout=0.2)
                self._buf.append(item)
            except queue.Empty:
                pass
            due = time.monotonic() - self._last_flush >= self.cfg.flush_s
            if len(self._buf) >= self.cfg.shard_rows or (self._buf and due):
                self.flush()
        self.flush(drain=True)

    def _rows(self, items: Sequence[Mapping[str, Any]]) -> pa.Table:
        rows = []
        for it in items:
            ans = it["answer"]
            img = ans.get("image", {}) if isinstance(ans, Mapping) else {}
            rows.append({"sample_id": uuid.uuid4().hex, "captured_at": it["captured_at"],
                         "request_id": it["request_id"], "key_id": it["key_id"], "route": it["route"],
                         "reason": it["reason"], "uncertainty": it["uncertainty"],
                         "models": list(ans.get("models", ())), "decision": ans.get("decision"),
                         "answer": json.dumps(ans, default=str, ensure_ascii=False),
                         "image_bytes": it["image_bytes"], "width": img.get("width"), "height": img.get("height")})
        return pa.Table.from_pylist(rows, schema=SCHEMA)

    def flush(self, drain: bool = False) -> int:
        """Write what is buffered (and, with ``drain``, everything queued) as committed shards."""
        with self._lock:
            if drain or self.thread is None:
                while True:
                    try:
                        self._buf.append(self.q.get_nowait())
                    except queue.Empty:
                        break
            written = 0
            while self._buf:
                batch, self._buf = self._buf[: self.cfg.shard_rows], self._buf[self.cfg.shard_rows:]
                try:
                    self._commit(self._rows(batch))
                    written += len(batch)
                except Exception:  # a broken disk loses these samples, not the service
                    self.stats["write_errors"] += 1
                    for _ in batch:
                        self.on_event("dropped", "write_error")
                    log.exception("capture shard write failed; %d samples lost", len(batch))
            self._last_flush = time.monotonic()
            if written:
                self._rotate()
            return written

    def _commit(self, table: pa.Table) -> None:
        self.seq += 1
        name = f"{SHARD_PREFIX}{time.time_ns():020d}-{self.writer}-{self.seq:06d}-r{table.num_rows}.parquet"
        final, tmp = f"{self.root}/{name}", f"{self.root}/.{name}.tmp"
        with self.fs.open_output_stream(tmp) as out:
            # The images are JPEG/PNG already: compressing them again costs CPU and saves nothing.
            pq.write_table(table, out, compression={n: "none" if n == "image_bytes" else "zstd"
                                                    for n in table.column_names})
        if self.local:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        self.fs.move(tmp, final)
        self.stats["committed"] += table.num_rows

    def shards(self) -> list[tuple[str, int, int]]:
        """Committed shards, oldest first: (path, rows, bytes)."""
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.root))
        out = []
        for info in infos:
            base = info.base_name
            if info.type == pafs.FileType.File and base.startswith(SHARD_PREFIX) and base.endswith(".parquet"):
                rows = int(base.rsplit("-r", 1)[1].removesuffix(".parquet"))
                out.append((info.path, rows, int(info.size or 0)))
        return sorted(out, key=lambda t: t[0].rsplit("/", 1)[-1])

    def _rotate(self) -> None:
        shards = self.shards()
        rows, size = sum(s[1] for s in shards), sum(s[2] for s in shards)
        while shards and (rows > self.cfg.max_rows or size > self.cfg.max_bytes):
            path, r, b = shards.pop(0)
            try:
                self.fs.delete_file(path)
            except (OSError, pa.ArrowException):
                log.warning("capture rotation could not delete %s", path)
                break
            rows, size = rows - r, size - b
            self.stats["rotated_shards"] += 1

    def _clean_temp(self) -> None:
        """Temporary files of a writer that crashed mid-shard: never committed, removed."""
        import pyarrow.fs as pafs

        for info in self.fs.get_file_info(pafs.FileSelector(self.root)):
            if info.base_name.startswith(f".{SHARD_PREFIX}") and info.base_name.endswith(".tmp"):
                try:
                    if time.time() - (info.mtime.timestamp() if info.mtime else 0) > 60:
                        self.fs.delete_file(info.path)
                except (OSError, pa.ArrowException):
                    pass

    def close(self) -> None:
        """Stop the writer and commit everything queued."""
        self._stop.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
        else:
            self.flush(drain=True)


def read_samples(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed sample of a store (temporary files are never read)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), os.path.abspath(uri))
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                   if i.base_name.startswith(SHARD_PREFIX) and i.base_name.endswith(".parquet"))
    if not files:
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(columns)
    return pa.concat_tables([pq.read_table(f, filesystem=fs, columns=columns) for f in files])


def _answer_doc(answer: str | None) -> dict[str, Any]:
    try:
        doc = json.loads(answer or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _decided_labels(doc: Mapping[str, Any]) -> list[str]:
    """The labels the served answer raised (block or review): what the page's analysis scores."""
    from livelens.fusion import raised

    return sorted({lab["name"] for lab in raised(doc.get("labels"))})


def _disagreement(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    """Where the served answer's sources disagreed (the review view's input), or None."""
    from livelens.loop.queue import disagreement_detail

    d = disagreement_detail(doc)
    return {**d, "score": round(float(d["score"]), 4)} if d else None


def samples_to_manifest(uri: str, out: str, *, name: str = "captured") -> str:
    """The captured frames as an unlabelled manifest (split ``train``), ready to embed and queue."""
    from livelens.data.manifest import content_id, write_manifest

    table = read_samples(uri)
    rows, seen = [], set()
    for r in table.to_pylist():
        if not r["image_bytes"]:
            continue
        doc = _answer_doc(r["answer"])
        rid = content_id(r["image_bytes"])
        if rid in seen:
            continue
        seen.add(rid)
        rows.append({"id": rid, "image_bytes": r["image_bytes"], "width": r["width"] or 0,
                     "height": r["height"] or 0, "source": f"capture:{r['route'] or ''}", "split": "train",
                     "labels": [], "attributes": json.dumps({"capture": {
                         "reason": r["reason"], "uncertainty": r["uncertainty"], "models": r["models"],
                         "decision": r["decision"], "request_id": r["request_id"],
                         "predicted": _decided_labels(doc), "disagreement": _disagreement(doc)}})})
    if not rows:
        raise ConfigError(f"no captured images at {uri}")
    return str(write_manifest(rows, out, {"name": name, "captured_from": uri}))

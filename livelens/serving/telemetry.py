"""Service metrics (Prometheus text format) and one structured JSON log line per request.

Why the gateway's own ``/metrics`` and not ``ray.util.metrics``: the gateway is the one process
that sees every request with its route, status, key, stage timings, decisions and model versions,
so every metric here is counted where it happens, with no agent hop and no export delay; each
gateway replica is scraped on its own port (the direct-ingress port ``make run`` prints, or the
proxy for a single replica), and Prometheus sums the replicas. Ray's own metrics (replica queue
lengths, actor and object-store figures) still flow through Ray's exporter; the Grafana dashboard
(``cluster/grafana/livelens.json``) uses ours.

Label values are bounded by the code (route templates, stage names, taxonomy labels, decisions), never by
client input, so a hostile client cannot blow up the number of series.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
#: Seconds; from a cached 1 ms answer to a 60 s OCR of a huge frame.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Every metric the service exports (the dashboard test checks the dashboard uses no other).
METRIC_NAMES = ("livelens_requests_total", "livelens_request_seconds", "livelens_stage_seconds",
                "livelens_inflight_requests", "livelens_downstream_inflight", "livelens_rejections_total",
                "livelens_decisions_total", "livelens_model_info", "livelens_images_total",
                "livelens_capture_samples_total", "livelens_capture_dropped_total")

access_log = logging.getLogger("livelens.access")


class ServiceMetrics:
    """The gateway's metrics, in a registry of their own (one per gateway replica).

    Args:
        enabled: False makes every method a no-op (the benchmark's "metrics off" baseline).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("livelens_requests", "HTTP requests by route template and status", ["route", "status"],
                                registry=r)
        self.latency = Histogram("livelens_request_seconds", "Request latency by route", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stages = Histogram("livelens_stage_seconds", "Latency of each stage (decode, classify, detect, "
                                "recognise, fusion…)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("livelens_inflight_requests", "Requests in this gateway replica now", registry=r)
        self.downstream = Gauge("livelens_downstream_inflight", "Calls waiting on each capability deployment "
                                "(its queue as the gateway sees it)", ["deployment"], registry=r)
        self.rejections = Counter("livelens_rejections", "Requests refused for load or limits (429/503)",
                                  ["route", "status"], registry=r)
        self.decisions = Counter("livelens_decisions", "Labels answered, by label and decision",
                                 ["label", "decision"], registry=r)
        self.models = Gauge("livelens_model_info", "The model version each capability serves (1 = serving)",
                            ["capability", "model"], registry=r)
        self.images = Counter("livelens_images", "Images answered, by capability", ["capability"], registry=r)
        self.captured = Counter("livelens_capture_samples", "Served frames kept by traffic capture, by why "
                                "(near_threshold, disagreeing, random)", ["reason"], registry=r)
        self.capture_dropped = Counter("livelens_capture_dropped", "Sampled frames capture lost (queue full, "
                                       "write error)", ["why"], registry=r)
        self._served: dict[str, frozenset[str]] = {}

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def request_done(self, route: str, status: int, seconds: float) -> None:
        if not self.enabled:
            return
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status in (429, 503):
            self.rejections.labels(route, str(status)).inc()

    def stage_times(self, timings_ms: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        for stage, ms in timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)

    def answered(self, result: Mapping[str, Any], caps: Iterable[str]) -> None:
        """Count one image's answer: its label decisions, and which model each capability served."""
        if not self.enabled:
            return
        for cap in caps:
            self.images.labels(cap).inc()
        for lab in result.get("labels", ()):
            if "name" in lab and "decision" in lab:
                self.decisions.labels(lab["name"], lab["decision"]).inc()

    def capture_event(self, kind: str, value: str) -> None:
        """A capture store event: ``("sampled", reason)`` or ``("dropped", why)``."""
        if not self.enabled:
            return
        (self.captured if kind == "sampled" else self.capture_dropped).labels(value).inc()

    def serving(self, capability: str, refs: Iterable[str]) -> None:
        """Record the refs a capability answered with; a swap retires the old series."""
        if not self.enabled:
            return
        now = frozenset(refs)
        before = self._served.get(capability)
        if before == now:
            return
        for ref in (before or frozenset()) - now:
            with contextlib.suppress(KeyError):
                self.models.remove(capability, ref)
        for ref in now:
            self.models.labels(capability, ref).set(1)
        self._served[capability] = now


#: The process's service metrics (one gateway replica per process). Importers must use it as
#: ``telemetry.METRICS``: a name bound in another module is copied when Serve pickles a class by value.
METRICS = ServiceMetrics()


class AuditLog:
    """Who called what: one JSON line per answered ``/v1`` request, in a file per UTC day.

    Unlike the access log (the replica's stderr, at a configurable level), it is always written,
    to ``<dir>/audit-YYYY-MM-DD.jsonl``, and holds no image, no key and no query values: time,
    request id, key id, client address, method, route template, status, error code, image count
    and milliseconds. Every gateway replica on a node appends to the same file; each line is one
    ``O_APPEND`` write, so lines from different processes never interleave. Files older than
    ``retain_days`` are deleted when a new day's file is opened.

    Args:
        directory: Where the files go (created if needed).
        retain_days: Days of files kept.
    """

    def __init__(self, directory: str | os.PathLike, retain_days: int = 90):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.retain_days = retain_days
        self._day, self._fd = "", -1
        self._lock = threading.Lock()

    def path(self, day: str) -> Path:
        return self.dir / f"audit-{day}.jsonl"

    def write(self, entry: Mapping[str, object], now: float | None = None) -> None:
        """Append one entry; never raises (an audit write failure is logged, the request goes on)."""
        now = time.time() if now is None else now
        line = (json.dumps({"ts": round(now, 3), **entry}, separators=(",", ":"), ensure_ascii=False) + "\n").encode()
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        try:
            with self._lock:
                if day != self._day:
                    self._open(day, now)
                os.write(self._fd, line)
        except OSError as exc:
            logging.getLogger("livelens.audit").error("audit log write failed: %s", exc)

    def _open(self, day: str, now: float) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path(day), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._day = day
        cutoff = time.strftime("%Y-%m-%d", time.gmtime(now - self.retain_days * 86400))
        for old in self.dir.glob("audit-*.jsonl"):
            if old.stem.removeprefix("audit-") < cutoff:
                old.unlink(missing_ok=True)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
            self._fd, self._day = -1, ""


#: The process's audit log (set by the gateway; None: off). Used as ``telemetry.AUDIT`` for the
#: same reason as :data:`METRICS`.
AUDIT: AuditLog | None = None


def log_request(*, request_id: str, route: str, method: str, status: int, seconds: float, key_id: str | None,
                client: str | None, timings_ms: Mapping[str, float] | None = None,
                models: Iterable[str] = (), error: str | None = None, images: int | None = None) -> None:
    """One JSON line per request on ``livelens.access``: who called what, how it went, never the image or key.

    4xx answers log at INFO (a client's mistake is not the service's error), 5xx at ERROR. A
    ``/v1`` request also goes to the audit log (:data:`AUDIT`) when one is set.
    """
    if AUDIT is not None and route.startswith("/v1"):
        AUDIT.write({"request_id": request_id, "key_id": key_id, "client": client, "method": method, "route": route,
                     "status": status, "error": error, "images": images, "ms": round(seconds * 1000, 2)})
    level = logging.ERROR if status >= 500 else logging.INFO
    if not access_log.isEnabledFor(level):
        return
    line = {"ts": round(time.time(), 3), "request_id": request_id, "method": method, "route": route,
            "status": status, "ms": round(seconds * 1000, 2), "key_id": key_id, "client": client,
            "timings_ms": dict(timings_ms or {}), "models": sorted(set(models))}
    if error:
        line["error"] = error
    access_log.log(level, json.dumps(line, separators=(",", ":"), ensure_ascii=False))

"""The HTTP ingress: one FastAPI app in front of moderation, OCR, quality and streams.

It authenticates, parses and decodes input once (so bad input is a 4xx before any model runs), fans
out to the capability deployments through handles, merges their answers and wraps every failure in
the one error envelope. Deployments it does not get (None) answer 503 ``capability_unavailable``.

Run the whole graph with ``serve run serve_apps.gateway:build_app`` or ``python -m serve_apps``.
"""

import asyncio
import importlib.util
import inspect
import logging
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, StringConstraints
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException as StarletteHTTPException

from livelens import detection, fusion
from livelens.errors import (
    ConfigError,
    ForbiddenError,
    InvalidArgumentError,
    LivelensError,
    OverloadedError,
    unwrap,
)
from livelens.imageio import EncodedImage, ImageLimits, probe_image
from livelens.loop import label_studio
from livelens.loop.capture import CaptureConfig, SampleStore
from livelens.loop.labels import FRAME_ID_PATTERN
from livelens.serving import inputs, openapi, telemetry
from livelens.serving import options as answer_options
from livelens.serving.admission import Admission
from livelens.serving.auth import DEFAULT_KEY_FILE, KeyStore
from livelens.serving.envelope import REQUEST_ID_HEADER, Timings, error_body, error_item, new_request_id
from livelens.serving.heap import start_heap_trimmer
from livelens.serving.streams import check_stream_id, check_ts
from serve_apps.common import Args, Colocated, DeployOptions, LocalHandle, once_more
from serve_apps.detection import DetectionArgs, bind_detection
from serve_apps.labelling import LabellingArgs, bind_labelling
from serve_apps.moderation import Moderation, ModerationArgs, bind_moderation
from serve_apps.ocr import OcrArgs, bind_ocr
from serve_apps.persons import PersonsArgs, bind_persons
from serve_apps.quality import Quality, QualityArgs, bind_quality
from serve_apps.streams import StreamsArgs, bind_streams

log = logging.getLogger("ray.serve")
STATIC = Path(__file__).with_name("static")
CAPABILITIES = ("moderate", "ocr", "quality", "persons", "detect")
#: Faces and their attributes are personal data: /v1/analyze adds them only for keys with this scope.
PERSONAL = {"persons": "persons"}


#: A label commit may name up to 10,000 frame ids (a whole cluster): its body gets more than settings do.
MAX_LABEL_BODY = 1024 * 1024
#: Label Studio's /predict sends every selected task in one call, images inline for exported ones.
MAX_LS_TASKS = 1000
MAX_LS_BODY = 256 * 1024 * 1024
LS_CONCURRENCY, LS_OVERLOAD_TRIES = 4, 4
#: Frames per /v1/label/export page (each carries its image and, by default, a model run).
MAX_EXPORT = 200
_MODEL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_FRAME_ID = re.compile(FRAME_ID_PATTERN)


class LabelCommitBody(BaseModel):
    """``POST /v1/label/commit``: labels to add to and remove from frames (see ``LabelStore.commit``)."""

    model_config = ConfigDict(extra="forbid")
    ids: list[Annotated[str, StringConstraints(pattern=FRAME_ID_PATTERN)]] = Field(min_length=1, max_length=10_000)
    add: list[Annotated[str, StringConstraints(max_length=128)]] = Field(default_factory=list, max_length=200)
    remove: list[Annotated[str, StringConstraints(max_length=128)]] = Field(default_factory=list, max_length=200)
    note: str = Field("", max_length=200)


def _first_error(exc: ValueError) -> str:
    """Pydantic's first finding as ``field: message`` (the whole list is long and repeats the input)."""
    errors = getattr(exc, "errors", None)
    if callable(errors) and errors():
        e = errors()[0]
        return f"{'.'.join(map(str, e.get('loc', ()))) or 'body'}: {e.get('msg')}"
    return str(exc)[:200]


#: Default deadlines (s): generous for a CPU box; a deployment sets its own from its SLO.
DEFAULT_DEADLINES_S = {"analyze": 10.0, "ocr": 10.0, "streams": 10.0, "moderate": 5.0, "quality": 5.0,
                       "persons": 5.0}


class GatewayConfig(BaseModel):
    """Gateway knobs that change without a restart (the Gateway deployment's ``user_config``).

    Attributes:
        thresholds: Per label, a block ``threshold`` and/or ``review`` threshold replacing the
            taxonomy's; every answer's decisions follow them at once (``livelens.fusion.redecide``).
        moderation: The live config of colocated moderation (:class:`serve_apps.moderation.ModerationConfig`).
        quality: The live config of colocated quality (:class:`serve_apps.quality.QualityConfig`).
        capture: Traffic capture into the sample store (:class:`livelens.loop.capture.CaptureConfig`):
            off unless enabled, per key, with a privacy switch; a change applies at once.
        deadlines_s: Per route class (``analyze``, ``ocr``, ``moderate``, ``quality``, ``streams``,
            ``persons``), the
            seconds within which an admitted request should be answered. A request whose expected
            time passes it gets a fast 503 with ``Retry-After`` (:mod:`livelens.serving.admission`);
            a batch counts each image. A class left out is always admitted.
    """

    model_config = ConfigDict(extra="forbid")
    thresholds: dict[str, dict[str, float]] = Field(default_factory=dict)
    deadlines_s: dict[Literal["analyze", "ocr", "moderate", "quality", "streams", "persons"], PositiveFloat] = Field(
        default_factory=lambda: dict(DEFAULT_DEADLINES_S))
    moderation: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    capture: CaptureConfig = Field(default_factory=lambda: CaptureConfig())


class GatewayArgs(Args):
    """Gateway settings.

    Attributes:
        key_file: Hashed API keys (JSON); ``LIVELENS_API_KEYS`` adds more.
        require_auth: Off only for local experiments; every /v1 route then skips the key check.
        url_allowlist: Hosts ``{"url": ...}`` may fetch from; empty = no fetching (SSRF).
        max_bytes: Largest encoded image.
        max_pixels: Largest decoded image (width × height), checked before decoding.
        retry_after_s: What 503 answers suggest.
        audit_dir: Where the audit log goes (:class:`livelens.serving.telemetry.AuditLog`: one JSON
            line per /v1 request, a file per UTC day, no images or keys); ``None`` turns it off.
        audit_retain_days: Days of audit files kept.
        metrics: Count requests, stages, decisions and served models for ``/metrics`` (Prometheus).
        access_log_level: Level of the one-JSON-line-per-request log (``livelens.access``):
            ``INFO`` logs every request (4xx included, as info), ``ERROR`` only 5xx, ``OFF`` none.
        live: The starting :class:`GatewayConfig` (Serve's ``user_config`` replaces it live).
        colocate: Capabilities built inside the gateway replica instead of as deployments of their
            own (``moderate``, ``quality``). Each call then skips a Serve hop (about 1.3 ms of a
            ~4 ms per-request overhead here); the capability's CPUs are added to the gateway's, it
            scales with the gateway, and the gateway's queue limits are its limits. Keep the
            default (none) where the model wants its own replicas, e.g. on GPUs shared by many
            gateways.
        deploy: The gateway deployment's own options.
    """

    model_config = ConfigDict(extra="forbid")
    key_file: str = DEFAULT_KEY_FILE
    require_auth: bool = True
    url_allowlist: list[str] = Field(default_factory=list)
    max_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    retry_after_s: int = Field(1, ge=0)
    audit_dir: str | None = "runs/audit"
    audit_retain_days: int = Field(90, ge=1)
    metrics: bool = True
    access_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "OFF"] = "INFO"
    colocate: list[Literal["moderate", "quality"]] = Field(default_factory=list)
    live: GatewayConfig = Field(default_factory=lambda: GatewayConfig())
    deploy: DeployOptions = Field(default_factory=lambda: DeployOptions(max_ongoing_requests=64,
                                                                        max_queued_requests=512))


class _Api(FastAPI):
    """FastAPI whose OpenAPI document describes what the routes read themselves (:mod:`livelens.serving.openapi`)."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = openapi.describe(super().openapi())
        return self.openapi_schema


api = _Api(
    title="livelens",
    version="0.1.0",
    description="Image recognition for live streams: content safety with evidence, OCR with entities, "
    "picture quality and stream-level verdicts. Every answer carries a request id, model versions "
    "and per-stage timings; every error is `{error: {type, code, message}, request_id}`.",
    # /docs is served below from the swagger-ui-bundle package: FastAPI's own page loads Swagger UI
    # from a CDN, which is blank on an offline cluster.
    docs_url=None,
    redoc_url=None,
)
# The Swagger UI that swagger-ui-bundle ships (4.x) renders OpenAPI 3.0 only: a 3.1 document
# showed "Unable to render this definition". The document uses nothing 3.1 adds.
api.openapi_version = "3.0.3"


def _route_of(request: Request) -> str:
    """The matched route's template (``/v1/streams/{stream_id}/frames``), never the raw path:
    metric labels stay bounded whatever a client sends."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def _observe(request: Request, status: int) -> None:
    """Count and log one answered request, once, where its answer is made.

    Called from the answer and error paths rather than a middleware, so the status and the
    stage timings counted are exactly those of the answer sent.
    """
    seconds = time.perf_counter() - getattr(request.state, "t0", time.perf_counter())
    route = _route_of(request)
    state = request.state
    timings = getattr(state, "timings", None)
    timings_ms = timings.to_dict() if timings is not None else {}
    if getattr(state, "inflight", False):
        telemetry.METRICS.inflight.dec()
    if telemetry.METRICS.enabled:
        telemetry.METRICS.request_done(route, status, seconds)
        telemetry.METRICS.stage_times(timings_ms)
    telemetry.log_request(request_id=_rid(request), route=route, method=request.method, status=status,
                          seconds=seconds, key_id=getattr(state, "key_id", None),
                          client=request.client.host if request.client else None, timings_ms=timings_ms,
                          models=getattr(state, "models", ()), error=getattr(state, "error_code", None),
                          images=getattr(state, "images", None))


def _key_of(headers: Any) -> str | None:
    """The API key a request carries: ``Authorization: Bearer <key>``, ``X-API-Key``, or the password
    of HTTP basic auth (what tools such as Label Studio's ML backend connection can send)."""
    import base64
    import binascii

    header = headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2] or None
        except (binascii.Error, ValueError):
            return None
    return headers.get("x-api-key")


def _ok(request: Request, body: dict) -> JSONResponse:
    _observe(request, 200)
    return JSONResponse(body)


def _rid(request: Request) -> str:
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        request.state.t0 = time.perf_counter()
        if telemetry.METRICS.enabled:
            telemetry.METRICS.inflight.inc()
            request.state.inflight = True
        rid = request.headers.get(REQUEST_ID_HEADER) or new_request_id()
        request.state.request_id = rid
    return rid[:100]


def _error_response(request: Request, err: LivelensError, retry_after: float | None = None) -> JSONResponse:
    # Serve's proxy already puts the request id in X-Request-Id (it takes a client's if sent).
    headers = {}
    retry = retry_after if retry_after is not None else getattr(err, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, int(retry + 0.999)))
    request.state.error_code = err.code
    body = error_body(err, _rid(request))
    _observe(request, err.http_status)
    return JSONResponse(body, status_code=err.http_status, headers=headers)


@api.exception_handler(LivelensError)
async def _on_livelens_error(request: Request, exc: LivelensError) -> JSONResponse:
    return _error_response(request, exc)


@api.exception_handler(RequestValidationError)
async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    msg = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in exc.errors()[:5])
    return _error_response(request, InvalidArgumentError(msg or "invalid request"))


@api.exception_handler(StarletteHTTPException)
async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    err = LivelensError(str(exc.detail), code="not_found" if exc.status_code == 404 else "http_error")
    err.type = "not_found" if exc.status_code == 404 else "invalid_request"
    err.http_status = exc.status_code
    return _error_response(request, err)


@api.exception_handler(Exception)
async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    cause = unwrap(exc)
    if isinstance(cause, LivelensError):
        return _error_response(request, cause)
    if isinstance(cause, BackPressureError | DeploymentUnavailableError):
        return _error_response(request, overloaded(cause))
    log.exception("unexpected error in %s", request.url.path)
    return _error_response(request, LivelensError(f"internal error ({type(cause).__name__}); see server logs"))


# Defined before the deployment: Serve serialises the class when it is decorated, so helpers it
# calls must already exist at that point.
def _configure_access_log(level: str) -> None:
    """Send ``livelens.access`` lines, bare JSON, to the replica's stderr (its Serve log file)."""
    log_ = telemetry.access_log
    if level == "OFF":
        log_.setLevel(logging.CRITICAL + 1)
        return
    log_.setLevel(level)
    log_.propagate = False
    if not log_.handlers:
        import sys

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log_.addHandler(handler)


def overloaded(exc: BaseException, retry_after_s: float = 1.0) -> OverloadedError:
    """A downstream queue is full: our typed 503 with Retry-After.

    Converted inside the routes because Serve installs its own FastAPI handler for
    ``BackPressureError`` on the ingress app (a plain-text 503), which would replace ours.
    """
    err = OverloadedError(f"the service is at capacity; retry in {retry_after_s:g} s ({type(exc).__name__})")
    err.retry_after_s = retry_after_s  # type: ignore[attr-defined]
    return err


@serve.deployment
@serve.ingress(api)
class Gateway:
    """The FastAPI ingress; capability deployments arrive as handles (None = not deployed)."""

    def __init__(self, args: GatewayArgs, moderation=None, ocr=None, quality=None, streams=None, labelling=None,
                 persons=None, detection=None):
        from livelens.taxonomy import load_taxonomy

        self.args = args
        start_heap_trimmer()  # decoding large images leaves the heap at its peak otherwise
        self.base_tax = load_taxonomy()
        self.live, self.tax = args.live, self.base_tax.with_thresholds(args.live.thresholds)
        self.policy = inputs.InputPolicy(
            limits=ImageLimits(max_bytes=self.args.max_bytes, max_pixels=self.args.max_pixels),
            url_allowlist=frozenset(h.lower() for h in self.args.url_allowlist),
        )
        self.keys = KeyStore.load(self.args.key_file)
        telemetry.METRICS.enabled = args.metrics
        if args.audit_dir and telemetry.AUDIT is None:
            telemetry.AUDIT = telemetry.AuditLog(args.audit_dir, args.audit_retain_days)
        _configure_access_log(args.access_log_level)
        given = {"moderate": moderation, "ocr": ocr, "quality": quality, "streams": streams, "label": labelling,
                 "persons": persons, "detect": detection}
        # A colocated capability is built here, in this replica, and called without a hop.
        self.handles = {cap: h.build() if isinstance(h, Colocated) else h for cap, h in given.items()}
        self.capture = self._open_capture(args.live.capture)
        self.admission = Admission(dict(args.live.deadlines_s))
        self.started = time.time()
        if self.args.require_auth and not len(self.keys):
            log.warning("no API keys configured (%s / LIVELENS_API_KEYS): every /v1 request will get 401",
                        self.args.key_file)

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Apply a new ``user_config``: threshold overrides, and the live configs of colocated capabilities.

        Raises:
            ConfigError: An invalid config or threshold; nothing is changed then.
        """
        from livelens.errors import ConfigError

        try:
            live = GatewayConfig.model_validate(config or {})
        except ValueError as exc:
            raise ConfigError(f"gateway user_config: {exc}") from None
        tax = self.base_tax.with_thresholds(live.thresholds)
        # Opened before anything changes: a capture uri that cannot be used fails the whole update.
        capture_changed = live.capture != self.live.capture
        new_capture = self._open_capture(live.capture) if capture_changed else None
        try:
            for cap, key in (("moderate", "moderation"), ("quality", "quality")):
                h, given = self.handles.get(cap), getattr(live, key)
                if given is not None and not isinstance(h, LocalHandle):
                    raise ConfigError(f"gateway user_config has {key!r}, but {cap} is not colocated in the "
                                      "gateway; set it on its own deployment")
                if isinstance(h, LocalHandle) and given is not None and given != getattr(self.live, key):
                    result = h.instance.reconfigure(given)
                    if inspect.isawaitable(result):
                        await result
        except BaseException:
            if new_capture is not None:
                new_capture.close()
            raise
        if capture_changed:
            old, self.capture = self.capture, new_capture
            if old is not None:
                await asyncio.to_thread(old.close)
        self.admission.deadlines_s = dict(live.deadlines_s)
        self.live, self.tax = live, tax

    @staticmethod
    def _open_capture(cfg: CaptureConfig) -> SampleStore | None:
        return SampleStore(cfg, on_event=telemetry.METRICS.capture_event) if cfg.active else None

    def _capture(self, request: Request, image: EncodedImage, answer: dict) -> None:
        """Offer a served frame to the sample store (a no-op when capture is off; never raises)."""
        store = self.capture
        if store is not None:
            store.offer(image=image.data, answer=answer, key_id=getattr(request.state, "key_id", None),
                        request_id=getattr(request.state, "request_id", None), route=_route_of(request))

    def check_health(self) -> None:
        """Serve calls this periodically; colocated capabilities are checked here, deployments by Serve."""
        for h in self.handles.values():
            if isinstance(h, LocalHandle):
                h.instance.check_health()

    # ---- helpers ---------------------------------------------------------------------------

    def _auth(self, request: Request, scope: str) -> str | None:
        if not self.args.require_auth:
            return None
        key = _key_of(request.headers)
        try:
            entry = self.keys.authenticate(key, scope, request.client.host if request.client else None)
        except LivelensError as exc:
            request.state.key_id = getattr(exc, "key_id", None)  # a known key refused (403/429) is named
            raise
        request.state.key_id, request.state.key_entry = entry.id, entry
        return entry.id

    @staticmethod
    def _cluster_param(cluster: str) -> int | None:
        """The ``cluster`` query parameter: a string, not ``int | None``, since OpenAPI 3.0 has no
        nullable query type, and -1 is a real cluster (HDBSCAN's noise)."""
        try:
            return int(cluster) if cluster.strip() else None
        except ValueError:
            raise InvalidArgumentError(f"cluster must be an integer, got {cluster[:40]!r}", code="bad_cluster") from None

    def _handle(self, cap: str):
        h = self.handles.get(cap)
        if h is None:
            err = LivelensError(f"{cap} is not deployed in this application", code="capability_unavailable")
            err.type, err.http_status = "unavailable", 503
            raise err
        return h

    async def _read_images(self, request: Request, batch: bool) -> tuple[list[bytes | Exception], dict]:
        """Images (bytes or a per-item error) and options from multipart, JSON or a raw body."""
        inputs.check_declared_length(request.headers.get("content-length"), self.policy,
                                     self.policy.max_batch if batch else 1)
        mt = inputs.media_type(request.headers.get("content-type"))
        opts: dict[str, Any] = dict(request.query_params)
        if mt == "multipart/form-data":
            form = await request.form(max_files=self.policy.max_batch, max_fields=50)
            files = [v for k, v in form.multi_items() if k in ("file", "files", "image") and hasattr(v, "read")]
            opts.update({k: v for k, v in form.multi_items() if isinstance(v, str)})
            if not files:
                raise InvalidArgumentError("multipart body has no 'file' part")
            if not batch and len(files) > 1:
                raise InvalidArgumentError("send one file here, or use the /batch route")
            out: list[bytes | Exception] = []
            for f in files:
                data = await f.read()
                if len(data) > self.policy.limits.max_bytes:
                    out.append(inputs.ImageTooLargeError(
                        f"file is {len(data)} bytes; the limit is {self.policy.limits.max_bytes}"))
                else:
                    out.append(data)
            if not batch and isinstance(out[0], Exception):
                raise out[0]
            return out, opts
        body = await request.body()
        if mt == "application/json":
            images, rest = await asyncio.to_thread(inputs.images_from_json, body, self.policy, batch)
            return images, {**opts, **rest}
        if batch:
            raise InvalidArgumentError("a batch is multipart (several 'files') or JSON ({'images': [...]})")
        return [inputs.check_raw(request.headers.get("content-type"), body, self.policy)], opts

    def _probe(self, data: bytes | Exception) -> EncodedImage:
        """Refuse bad input from the header (format, bytes, pixels); the pixels are decoded where needed.

        A body that is corrupt past its header fails in the capability's decode with the same typed
        error (422), which comes back through the handle.
        """
        if isinstance(data, Exception):
            raise data
        return probe_image(data, self.policy.limits)

    def _options(self, opts: dict, caps: tuple[str, ...]) -> answer_options.AnswerOptions:
        """The request's answer options, validated once (a bad one is a 400 before any model runs)."""
        parsed = answer_options.parse_options(opts, self.tax)
        if parsed.model is not None and "moderate" not in caps:
            raise InvalidArgumentError(f"model={parsed.model!r} pins the safety classifier, which this route "
                                       "does not run; use /v1/moderate or /v1/analyze")
        return parsed

    async def _analyze_one(self, image: EncodedImage, caps: tuple[str, ...], opts: answer_options.AnswerOptions,
                           timings: Timings) -> dict:
        """Fan out to the capabilities in parallel and merge: OCR entities raise ads labels."""
        calls = {}
        if "moderate" in caps:
            h = self._handle("moderate")
            # The pin travels only when asked for, so the common call keeps its two arguments.
            calls["moderate"] = once_more(lambda: h.moderate.remote(image, opts.evidence, opts.model)) if opts.model \
                else once_more(lambda: h.moderate.remote(image, opts.evidence))
        # With the detection stage asked for, OCR leaves out its costly tiled QR pass: the stage
        # reads the codes in its boxes, or, when it cannot (no detector, switched off), runs the
        # pass itself as soon as it knows (_detect_then_classify).
        defer_qr = "ocr" in caps and "detect" in caps
        if "ocr" in caps:
            ocr = self._handle("ocr")
            calls["ocr"] = once_more(lambda: ocr.read.remote(image, False)) if defer_qr \
                else once_more(lambda: ocr.read.remote(image))
        if "quality" in caps:
            quality = self._handle("quality")
            calls["quality"] = once_more(lambda: quality.assess.remote(image))
        if "persons" in caps:
            persons = self._handle("persons")
            calls["persons"] = once_more(lambda: persons.analyze.remote(image))
        if "detect" in caps:
            det = self._handle("detect")
            calls["detect"] = self._detect_then_classify(det, image, caps, opts)
        t0 = time.perf_counter()
        if telemetry.METRICS.enabled:
            for cap in calls:
                telemetry.METRICS.downstream.labels(cap).inc()
        try:
            results = await asyncio.gather(*calls.values(), return_exceptions=True)
        finally:
            if telemetry.METRICS.enabled:
                for cap in calls:
                    telemetry.METRICS.downstream.labels(cap).dec()
        timings.add("fanout", (time.perf_counter() - t0) * 1000)
        results_by_cap = {}
        for cap, res in zip(calls, results, strict=True):
            if isinstance(res, BaseException):
                cause = unwrap(res)
                if isinstance(cause, BackPressureError | DeploymentUnavailableError):
                    raise overloaded(cause, self.args.retry_after_s) from None
                raise cause
            for stage, ms in res.pop("timings_ms", {}).items():
                timings.add(f"{cap}.{stage}", ms)
            telemetry.METRICS.serving(cap, res.get("models", ()))
            results_by_cap[cap] = res
        if defer_qr:
            detection.complete_qr(self.tax, results_by_cap)
        with timings.stage("fusion"):
            answer = fusion.assemble(self.tax, results_by_cap, (image.width, image.height))
        telemetry.METRICS.answered(answer, results_by_cap)
        return answer_options.apply(answer, opts, self.tax)

    async def _detect_then_classify(self, det: Any, image: EncodedImage, caps: tuple[str, ...],
                                    opts: answer_options.AnswerOptions) -> dict:
        """Detection, then its picture-in-picture windows to moderation for the second pass.

        The rest of the fan-out does not wait for it: only this call's answer waits for the windows.
        When the stage did not read QR boxes (no detector, switched off), OCR's deferred tiled QR
        pass runs here, beside the second pass, and goes back with the answer (``complete_qr``).
        """
        res = await once_more(lambda: det.analyze.remote(image))
        steps = {}
        if "ocr" in caps and not detection.reads_qr(res):
            ocr = self._handle("ocr")
            steps["tiles"] = once_more(lambda: ocr.tiled_qr.remote(image))
        boxes = detection.second_pass_boxes(res) if res.pop("second_pass_on", False) else []
        if boxes and "moderate" in caps:
            mod = self._handle("moderate")
            steps["second_pass"] = self._timed(once_more(lambda: mod.classify_regions.remote(image, boxes, opts.model)))
        done = dict(zip(steps, await asyncio.gather(*steps.values()), strict=True))
        if "second_pass" in done:
            per_box, ms = done["second_pass"]
            detection.attach_second_pass(self.tax, res, per_box)
            res["timings_ms"]["second_pass"] = ms
        if "tiles" in done:
            res[detection.QR_TILES] = done["tiles"]
        return res

    @staticmethod
    async def _timed(call: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        out = await call
        return out, round((time.perf_counter() - t0) * 1000, 3)

    async def _single(self, request: Request, caps: tuple[str, ...] | None, scope: str) -> JSONResponse:
        """One image through ``caps`` (None: every capability the key may use, as /v1/analyze)."""
        rid = _rid(request)
        timings = request.state.timings = Timings()
        with timings.stage("auth"):
            self._auth(request, scope)
        caps = caps if caps is not None else self._caps(request)
        with timings.stage("read"):
            images, opts = await self._read_images(request, batch=False)
        request.state.images = 1
        with timings.stage("probe"):
            image = self._probe(images[0])
        answer_opts = self._options(opts, caps)
        with self.admission.admit(scope), timings.stage("total_models"):
            result = await self._analyze_one(image, caps, answer_opts, timings)
        request.state.models = result.get("models", ())
        if self.capture is not None:
            with timings.stage("capture"):
                self._capture(request, image, result)
        return _ok(request, {"request_id": rid, **result, "timings_ms": timings.to_dict()})

    async def _batch(self, request: Request, caps: tuple[str, ...] | None, scope: str) -> JSONResponse:
        rid = _rid(request)
        timings = request.state.timings = Timings()
        with timings.stage("auth"):
            self._auth(request, scope)
        caps = caps if caps is not None else self._caps(request)
        with timings.stage("read"):
            images, opts = await self._read_images(request, batch=True)
        request.state.images = len(images)
        entry = getattr(request.state, "key_entry", None)
        if entry is not None:
            self.keys.charge(entry, len(images) - 1)  # auth took one token; a batch pays per image
        answer_opts = self._options(opts, caps)

        async def one(data):
            try:
                image = self._probe(data)
                t = Timings()
                res = await self._analyze_one(image, caps, answer_opts, t)
                self._capture(request, image, res)
                return {"status": 200, **res, "timings_ms": t.to_dict()}
            except Exception as exc:
                cause = unwrap(exc)
                if isinstance(cause, BackPressureError | DeploymentUnavailableError):
                    cause = overloaded(cause, self.args.retry_after_s)
                return error_item(cause)

        with self.admission.admit(scope, len(images)), timings.stage("items"):
            items = await asyncio.gather(*(one(d) for d in images))
        return _ok(request, {"request_id": rid, "results": items, "timings_ms": timings.to_dict()})

    # ---- routes ----------------------------------------------------------------------------

    @api.get("/", include_in_schema=False)
    async def console(self):
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api.get("/label", include_in_schema=False)
    async def label_page(self):
        """The labelling page: it holds no data and asks for a key; every call it makes is a /v1/label route."""
        return FileResponse(STATIC / "label.html", media_type="text/html")

    @api.get("/metrics", include_in_schema=False)
    async def metrics(self) -> Response:
        """Prometheus text format: requests, latency per route and stage, queues, decisions, models."""
        return Response(telemetry.METRICS.render(), media_type=telemetry.CONTENT_TYPE)

    @api.get("/healthz", summary="Liveness: answers as soon as the gateway is up")
    async def healthz(self) -> dict:
        return {"status": "ok", "uptime_s": round(time.time() - self.started, 1),
                "capabilities": [c for c, h in self.handles.items() if h is not None],
                "auth": self.args.require_auth,
                "capture": dict(self.capture.stats, uri=self.capture.cfg.uri) if self.capture else None,
                "admission": self.admission.snapshot()}

    @api.get("/v1/models/history", summary="Every version of a model in the serving chain: gate verdicts, changes")
    async def models_history(self, request: Request, name: str = "safety") -> JSONResponse:
        self._auth(request, "models")
        if not _MODEL_NAME.match(name):
            raise InvalidArgumentError(f"model name {name[:80]!r}: want lowercase letters, digits and _",
                                       code="bad_model_name")
        versions = await self._handle("moderate").history.remote(name)
        return _ok(request, {"request_id": _rid(request), "name": name, "versions": versions})

    @api.get("/v1/models", summary="Which models are served and where each came from")
    async def models(self, request: Request) -> JSONResponse:
        self._auth(request, "models")
        infos = {}
        for cap, h in self.handles.items():
            if h is not None and cap not in ("streams", "label"):
                infos[cap] = h.info.remote()
        done = await asyncio.gather(*infos.values(), return_exceptions=True)
        models: list[dict] = []
        problems = {}
        for cap, res in zip(infos, done, strict=True):
            if isinstance(res, BaseException):
                problems[cap] = str(unwrap(res))[:300]
            else:
                models += [{**m, "capability": cap} for m in res.get("models", [])]
                if res.get("missing"):
                    problems[cap] = res["missing"]
        from livelens.coverage import coverage_rows, summary

        rows = coverage_rows(self.tax, models)
        return JSONResponse({"request_id": _rid(request), "models": models, "problems": problems,
                             "coverage": {"summary": summary(rows), "labels": rows},
                             "thresholds": self.live.thresholds})

    @api.get("/v1/admin/live", summary="Each capability's live config (model versions, thresholds, batching)")
    async def live_configs(self, request: Request) -> JSONResponse:
        from serve_apps import admin

        self._auth(request, "admin")
        live = await asyncio.to_thread(admin.current_live, serve.get_replica_context().app_name)
        return JSONResponse({"request_id": _rid(request), "live": live})

    @api.put("/v1/admin/live/{capability}", summary="Change a capability's live config without a restart")
    async def set_live_config(self, capability: str, request: Request) -> JSONResponse:
        """The body is a JSON object of the fields to change, e.g. ``{"safety_ref": "safety@2"}``.

        The change goes through the Serve controller (as ``serve deploy`` of an edited config), so
        every replica, and every replica started later, runs it.
        """
        from serve_apps import admin

        self._auth(request, "admin")
        changes = await asyncio.to_thread(inputs.parse_json_object, await request.body(), self.policy)
        live = await asyncio.to_thread(admin.set_live, capability, changes, serve.get_replica_context().app_name)
        return JSONResponse({"request_id": _rid(request), "capability": capability, "live": live})

    @api.post("/v1/moderate", summary="Safety labels with pass/review/block and evidence")
    async def moderate(self, request: Request) -> JSONResponse:
        return await self._single(request, ("moderate",), "moderate")

    @api.post("/v1/ocr", summary="Text lines (polygon, text, score) and entities (phones, URLs, IDs, QR)")
    async def ocr(self, request: Request) -> JSONResponse:
        return await self._single(request, ("ocr",), "ocr")

    @api.post("/v1/quality", summary="Brightness, blur, occlusion, black frame")
    async def quality(self, request: Request) -> JSONResponse:
        return await self._single(request, ("quality",), "quality")

    @api.post("/v1/persons", summary="Faces with gender, age band and minors labels (scope persons: personal data)")
    async def persons(self, request: Request) -> JSONResponse:
        return await self._single(request, ("persons",), "persons")

    @api.post("/v1/analyze", summary="Moderation, OCR, quality, detection (and persons, for keys with that scope) in one call")
    async def analyze(self, request: Request) -> JSONResponse:
        return await self._single(request, None, "analyze")

    @api.post("/v1/moderate/batch", summary="Batch moderation: results and errors per item")
    async def moderate_batch(self, request: Request) -> JSONResponse:
        return await self._batch(request, ("moderate",), "moderate")

    @api.post("/v1/ocr/batch", summary="Batch OCR: results and errors per item")
    async def ocr_batch(self, request: Request) -> JSONResponse:
        return await self._batch(request, ("ocr",), "ocr")

    @api.post("/v1/quality/batch", summary="Batch quality: results and errors per item")
    async def quality_batch(self, request: Request) -> JSONResponse:
        return await self._batch(request, ("quality",), "quality")

    @api.post("/v1/persons/batch", summary="Batch persons: results and errors per item")
    async def persons_batch(self, request: Request) -> JSONResponse:
        return await self._batch(request, ("persons",), "persons")

    @api.post("/v1/analyze/batch", summary="Batch analyze: results and errors per item")
    async def analyze_batch(self, request: Request) -> JSONResponse:
        return await self._batch(request, None, "analyze")

    def _caps(self, request: Request | None = None) -> tuple[str, ...]:
        """Every deployed capability, less the personal ones the request's key has no scope for.

        With ``request`` None (a caller on the cluster, through a handle) or auth off, all of them.
        """
        entry = getattr(request.state, "key_entry", None) if request is not None else None
        return tuple(c for c in CAPABILITIES if self.handles.get(c) is not None
                     and (c not in PERSONAL or entry is None or entry.allows(PERSONAL[c])))

    @api.post("/v1/streams/{stream_id}/frames", summary="Analyze one frame of a stream; returns its verdict")
    async def stream_frame(self, stream_id: str, request: Request) -> JSONResponse:
        rid = _rid(request)
        timings = request.state.timings = Timings()
        self._auth(request, "streams")
        check_stream_id(stream_id)  # before any model runs
        streams = self._handle("streams")
        images, opts = await self._read_images(request, batch=False)
        image = self._probe(images[0])
        ts = check_ts(opts.get("ts"))  # a bad ts is a 400 before any model runs, and never reaches the state
        caps = self._caps(request)
        answer_opts = self._options(opts, caps)
        with self.admission.admit("streams"):
            result = await self._analyze_one(image, caps, answer_opts, timings)
            with timings.stage("streams"):
                try:
                    state = await streams.ingest.remote(stream_id, image, result, ts)
                except (BackPressureError, DeploymentUnavailableError) as exc:
                    raise overloaded(exc, self.args.retry_after_s) from None
        return _ok(request, {"request_id": rid, **result, "stream": state, "timings_ms": timings.to_dict()})

    @api.get("/v1/streams/{stream_id}", summary="A stream's state: window, escalation, evidence bundle")
    async def stream_state(self, stream_id: str, request: Request) -> JSONResponse:
        self._auth(request, "streams")
        state = await self._handle("streams").state.remote(stream_id)
        return _ok(request, {"request_id": _rid(request), "stream": state})

    # ---- labelling (scope "label"): the loop's human step, over the label store -------------

    @api.get("/v1/label/store", summary="The label store: frames, newest version, counts per label, labellers")
    async def label_store(self, request: Request) -> JSONResponse:
        self._auth(request, "label")
        return _ok(request, {"request_id": _rid(request), **await self._handle("label").info.remote()})

    @api.get("/v1/label/frames", summary="A page of frames to label, with their labels (who, when) and queue reason")
    async def label_frames(self, request: Request, offset: int = 0, limit: int = 50,
                           unlabelled: bool = False, cluster: str = "", review: bool = False) -> JSONResponse:
        """``review=true``: only frames whose sources disagreed, the widest disagreement first."""
        self._auth(request, "label")
        page = await self._handle("label").frames.remote(offset, limit, unlabelled, self._cluster_param(cluster), review)
        return _ok(request, {"request_id": _rid(request), **page})

    @api.get("/v1/label/clusters", summary="The cluster gallery: each cluster's size, medoids and labels so far")
    async def label_clusters(self, request: Request) -> JSONResponse:
        self._auth(request, "label")
        return _ok(request, {"request_id": _rid(request), **await self._handle("label").clusters.remote()})

    @api.get("/v1/label/analysis", summary="Labels per split, coverage, and the served answers' per-label P/R")
    async def label_analysis(self, request: Request) -> JSONResponse:
        self._auth(request, "label")
        return _ok(request, {"request_id": _rid(request), **await self._handle("label").analysis.remote()})

    @api.get("/v1/label/frames/{frame_id}/image", summary="One frame to label, as a JPEG thumbnail")
    async def label_image(self, frame_id: str, request: Request) -> Response:
        self._auth(request, "label")
        if not _FRAME_ID.match(frame_id):
            raise InvalidArgumentError("a frame id is 1-128 letters, digits, '_' or '-'", code="bad_frame_id")
        data = await self._handle("label").thumbnail.remote(frame_id)
        _observe(request, 200)
        return Response(data, media_type="image/jpeg", headers={"cache-control": "private, max-age=3600"})

    @api.post("/v1/label/commit", summary="Add or remove labels on frames, as one new version; the key is the labeller")
    async def label_commit(self, request: Request) -> JSONResponse:
        """The body is ``{"ids": [...], "add": [...], "remove": [...], "note": "..."}``.

        Who labelled is the API key's id, never a field a client could set.
        """
        who = self._auth(request, "label") or "anonymous"
        doc = await asyncio.to_thread(inputs.parse_json_object, await request.body(), self.policy, MAX_LABEL_BODY)
        try:
            body = LabelCommitBody.model_validate(doc)
        except ValueError as exc:
            raise InvalidArgumentError(f"label commit: {_first_error(exc)}", code="bad_label_commit") from None
        commit = await self._handle("label").commit.remote(body.ids, body.add, body.remove, who, body.note)
        return _ok(request, {"request_id": _rid(request), **commit})

    @api.get("/v1/label/events", summary="Label commits after a version: who changed what, and when")
    async def label_events(self, request: Request, since: int = 0) -> JSONResponse:
        self._auth(request, "label")
        events = await self._handle("label").events.remote(since)
        return _ok(request, {"request_id": _rid(request), "events": events})

    @api.post("/v1/label/retrain", summary="Retrain on the newest labels, gate, publish and swap (scope admin)")
    async def label_retrain(self, request: Request) -> JSONResponse:
        """The page's *Retrain* button: ``make retrain`` as a child job; 409 while one runs.

        It needs the ``admin`` scope as well as ``label``: a passed candidate replaces the served model.
        """
        status = await self._start_retrain(request, self._auth(request, "label") or "anonymous")
        _observe(request, 202)
        return JSONResponse({"request_id": _rid(request), **status}, status_code=202)

    async def _start_retrain(self, request: Request, who: str) -> dict:
        """Start the labelling deployment's retrain for the request's key (authenticated for ``label``),
        which needs ``admin`` too."""
        entry = getattr(request.state, "key_entry", None)
        if entry is not None and not entry.allows("admin"):
            raise ForbiddenError(f"key {entry.id!r} may label but not retrain: that needs the 'admin' scope",
                                 code="scope_denied")
        return await self._handle("label").retrain.remote(who)

    @api.get("/v1/label/retrain", summary="The page's retrain: running, or its gate verdict and published model")
    async def label_retrain_status(self, request: Request) -> JSONResponse:
        self._auth(request, "label")
        return _ok(request, {"request_id": _rid(request), **await self._handle("label").retrain_status.remote()})

    # ---- Label Studio's ML backend protocol (scope "label"): pre-annotations and labels back ----
    # Label Studio calls <url>/health, /setup, /predict and /webhook of the URL a project's Model
    # settings name; connect it to http://<gateway>/v1/label-studio with basic auth (the password is
    # an API key). See livelens.loop.label_studio.

    @api.get("/v1/label-studio", include_in_schema=False)
    @api.get("/v1/label-studio/health", summary="Label Studio ML backend: liveness")
    async def ls_health(self) -> dict:
        return {"status": "UP", "model_class": "livelens"}

    async def _served_refs(self) -> str:
        info = await self._handle("moderate").info.remote()
        return ",".join(sorted(m["ref"] for m in info.get("models", ()) if m.get("ref"))) or "livelens"

    @api.post("/v1/label-studio/setup", summary="Label Studio ML backend: the served model versions")
    async def ls_setup(self, request: Request) -> JSONResponse:
        self._auth(request, "label")
        doc = await asyncio.to_thread(inputs.parse_json_object, await request.body(), self.policy, MAX_LABEL_BODY)
        project, hostname, token = doc.get("project"), doc.get("hostname"), doc.get("access_token")
        if isinstance(project, str) and isinstance(hostname, str) and isinstance(token, str) and token \
                and self.handles.get("label") is not None:
            label_studio.server_url(hostname, "/")  # a malformed address is a 400 now, not at /predict
            await self._handle("label").link_label_studio.remote(project[:64], hostname, token[:4096])
        return _ok(request, {"model_version": await self._served_refs()})

    async def _ls_image(self, task: Any, project: Any) -> bytes:
        """A task's image bytes (see ``label_studio.task_image``); a frame missing from the store falls
        back to the task's own image when it has one.

        A path on the Label Studio server is fetched from the address the project's ``/setup`` gave,
        with its token, and only when that host is on ``url_allowlist``: the token never goes
        anywhere the operator has not allowed.
        """
        where = label_studio.task_image(task)
        if where.frame_id and self.handles.get("label") is not None:
            try:
                return await self._handle("label").image_bytes.remote(where.frame_id)
            except Exception as exc:
                if not isinstance(unwrap(exc), LivelensError) or not (where.data_uri or where.url or where.path):
                    raise unwrap(exc) from None
        if where.data_uri:
            return inputs.decode_b64(where.data_uri, "task image", self.policy)
        if where.url:
            return await asyncio.to_thread(inputs.fetch_url, where.url, self.policy)
        if where.path:
            link = None
            if isinstance(project, str) and self.handles.get("label") is not None:
                link = await self._handle("label").label_studio_link.remote(project[:64])
            if link is None:
                raise InvalidArgumentError(f"task image {where.path[:100]!r} is on the Label Studio server, whose "
                                           f"address and token come with /setup, which project {project!r} has not "
                                           "sent", code="unreadable_task_image")
            hostname, token = link
            return await asyncio.to_thread(inputs.fetch_url, label_studio.server_url(hostname, where.path),
                                           self.policy, 10.0, {"Authorization": f"Token {token}"})
        raise InvalidArgumentError(f"frame {where.frame_id!r} is not in the label store and the task carries no "
                                   "image livelens can read", code="unreadable_task_image")

    def _pre_annotation_plan(self) -> tuple[tuple[str, ...], answer_options.AnswerOptions]:
        """What a pre-annotation runs: the /v1/analyze capabilities less persons (personal data), with boxes."""
        caps = tuple(c for c in CAPABILITIES if c != "persons" and self.handles.get(c) is not None)
        return caps, self._options({"evidence": "boxes"}, caps)

    async def _pre_annotate(self, read: Any, gate: asyncio.Semaphore, offered: frozenset[str] | None,
                            plan: tuple[tuple[str, ...], answer_options.AnswerOptions]) -> dict:
        """One image (``await read()``) as a Label Studio prediction, through the /v1/analyze fan-out.

        Label Studio sends a whole selection in one call and waits for all of it, and an export is
        one download: a few images at a time (``gate``), each waiting out an overload a few times,
        rather than 503s that would drop a task. The image is read once, on the first try.

        Args:
            read: Gets the image's bytes.
            gate: Bounds the images in flight.
            offered: The labels the project's interface offers (None: all).
            plan: :meth:`_pre_annotation_plan`, computed once per request.

        Raises:
            LivelensError: The image cannot be read, or the service stayed overloaded.
        """
        caps, answer_opts = plan
        image = None
        for attempt in range(LS_OVERLOAD_TRIES):
            try:
                async with gate:
                    if image is None:
                        image = self._probe(await read())
                    with self.admission.admit("analyze"):
                        answer = await self._analyze_one(image, caps, answer_opts, Timings())
                return label_studio.prediction(answer, image.width, image.height, offered)
            except Exception as exc:
                cause = unwrap(exc)
                if isinstance(cause, BackPressureError | DeploymentUnavailableError):
                    cause = overloaded(cause, self.args.retry_after_s)
                if not isinstance(cause, OverloadedError) or attempt + 1 == LS_OVERLOAD_TRIES:
                    raise cause from None
                await asyncio.sleep(min(5.0, float(getattr(cause, "retry_after_s", None) or 1)) * (attempt + 1))
        raise AssertionError("unreachable")

    @api.post("/v1/label-studio/predict", summary="Label Studio ML backend: one pre-annotation per task")
    async def ls_predict(self, request: Request) -> JSONResponse:
        """``{"tasks": [...]}`` → ``{"results": [...]}``, one per task in order.

        Each prediction is the served answer (the same fan-out and fusion as ``/v1/analyze``, less
        persons: faces are personal data) as Label Studio ``choices`` and ``rectanglelabels``. A
        task that fails carries ``error`` and no ``result``, which Label Studio skips.
        """
        self._auth(request, "label")
        doc = await asyncio.to_thread(inputs.parse_json_object, await request.body(), self.policy,
                                      MAX_LS_BODY)
        tasks = doc.get("tasks")
        if not isinstance(tasks, list) or not tasks or len(tasks) > MAX_LS_TASKS:
            raise InvalidArgumentError(f"'tasks' must be a list of 1 to {MAX_LS_TASKS} Label Studio tasks",
                                       code="bad_tasks")
        entry = getattr(request.state, "key_entry", None)
        if entry is not None:
            self.keys.charge(entry, len(tasks) - 1)  # auth took one token; each task pays as an image
        offered = label_studio.config_labels(doc.get("label_config"))
        gate, plan = asyncio.Semaphore(LS_CONCURRENCY), self._pre_annotation_plan()

        async def one(task: Any) -> dict:
            try:
                return await self._pre_annotate(lambda: self._ls_image(task, doc.get("project")), gate, offered, plan)
            except Exception as exc:
                return {"error": error_item(unwrap(exc))["error"]}

        results = await asyncio.gather(*(one(t) for t in tasks))
        done = [r for r in results if "result" in r]
        version = done[0]["model_version"] if done else await self._served_refs()
        return _ok(request, {"results": results, "model_version": version})

    @api.post("/v1/label-studio/webhook", status_code=201,
              summary="Label Studio ML backend: annotations become label-store commits (201)")
    async def ls_webhook(self, request: Request) -> JSONResponse:
        """An ``ANNOTATION_CREATED`` / ``_UPDATED`` sets the frame's labels to the annotation's, an
        ``ANNOTATION_DELETED`` takes its labels back; the labeller is the key's id. Other actions are
        answered ``Unknown event`` (200), as the protocol does. ``START_TRAINING`` (Label Studio's
        *Start training*) starts the same retrain as the labelling page's button, on the label store's
        newest labels (the annotations its webhooks brought), and needs the ``admin`` scope too.
        """
        who = self._auth(request, "label") or "anonymous"
        payload = await asyncio.to_thread(inputs.parse_json_object, await request.body(), self.policy, MAX_LS_BODY)
        action = payload.get("action")
        if action == "START_TRAINING":
            status = await self._start_retrain(request, who)
            _observe(request, 201)
            return JSONResponse({"status": "ok", "result": status}, status_code=201)
        if action not in label_studio.TRAIN_EVENTS:
            return _ok(request, {"status": "Unknown event"})
        change = label_studio.annotation_change(payload)
        applied = await self._handle("label").apply.remote(change.frame_id, sorted(change.labels), change.replace,
                                                          who, change.note)
        _observe(request, 201)
        return JSONResponse({"status": "ok", "result": applied}, status_code=201)

    @api.get("/v1/label/export", summary="Frames as Label Studio tasks: images inline, served pre-annotations")
    async def label_export(self, request: Request, offset: int = 0, limit: int = 50, unlabelled: bool = False,
                           cluster: str = "", predictions: bool = True) -> JSONResponse:
        """A JSON list a Label Studio project imports as it is (``label_config`` at ``/v1/label/export/config``).

        Each task carries its frame's original bytes as a ``data:`` URI and its ``livelens_id``;
        with ``predictions`` the served answer comes along as the pre-annotation, as ``/predict``
        would give it.
        """
        self._auth(request, "label")
        which = self._cluster_param(cluster)
        page = await self._handle("label").frames.remote(offset, min(limit, MAX_EXPORT), unlabelled, which, False)
        gate, plan = asyncio.Semaphore(LS_CONCURRENCY), self._pre_annotation_plan()

        async def task(fid: str) -> dict:
            data = await self._handle("label").image_bytes.remote(fid)

            async def read() -> bytes:
                return data

            pred = await self._pre_annotate(read, gate, None, plan) if predictions else None
            return label_studio.make_task(fid, label_studio.data_uri(data), pred)

        tasks = await asyncio.gather(*(task(f["id"]) for f in page["frames"]))
        _observe(request, 200)
        return JSONResponse(tasks, headers={"x-total-count": str(page["total"])})

    @api.get("/v1/label/export/config", summary="The Label Studio labelling interface for exported tasks (XML)")
    async def label_export_config(self, request: Request) -> Response:
        self._auth(request, "label")
        info = await self._handle("label").info.remote()
        _observe(request, 200)
        return Response(label_studio.label_config(info["labels"]), media_type="application/xml")

    @api.get("/v1/taxonomy", summary="The label taxonomy: categories, their labels as a tree, thresholds")
    async def taxonomy(self, request: Request) -> JSONResponse:
        """What ``categories=`` accepts and every label an answer can carry, with the live thresholds."""
        self._auth(request, "models")
        return _ok(request, {"request_id": _rid(request), **answer_options.taxonomy_document(self.tax)})

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Response:
        root = request.scope.get("root_path", "").rstrip("/")
        return openapi.swagger_page(root, title="livelens API")

    @api.get("/docs-assets/{name}", include_in_schema=False)
    async def docs_asset(self, name: str) -> Response:
        return openapi.swagger_asset(name)

    # ---- Python callers on the cluster (Serve handles) ---------------------------------------

    async def analyze_image(self, data: bytes, capabilities: list[str] | None = None,
                            **options: Any) -> dict[str, Any]:
        """What ``POST /v1/analyze`` answers, for a caller holding a Serve handle (a notebook, a job).

        ``serve.get_app_handle("livelens").analyze_image.remote(jpeg_bytes, evidence="heatmap")``.
        Callers inside the cluster are already authenticated by its Ray token, so no API key is
        asked for; input checks, options and limits are the HTTP routes' own.

        Args:
            data: The encoded image.
            capabilities: A subset of ``moderate``, ``ocr``, ``quality``, ``persons``, ``detect``
                (default: every one deployed).
            **options: ``evidence``, ``min_confidence``, ``categories``, ``model``, as on the HTTP routes.

        Raises:
            LivelensError: The typed error the HTTP route would answer with.
        """
        caps = tuple(capabilities) if capabilities else self._caps()
        unknown = sorted(set(caps) - set(CAPABILITIES))
        if unknown:
            raise InvalidArgumentError(f"unknown capabilities {unknown}; choose from {list(CAPABILITIES)}")
        image = self._probe(inputs.check_raw("application/octet-stream", bytes(data), self.policy))
        timings = Timings()
        answer_opts = self._options(options, caps)
        with self.admission.admit("analyze"):
            result = await self._analyze_one(image, caps, answer_opts, timings)
        return {**result, "timings_ms": timings.to_dict()}


class AppArgs(BaseModel):
    """The whole graph, validated once; each capability can be switched off (None: its routes answer 503)."""

    model_config = ConfigDict(extra="forbid")
    gateway: GatewayArgs = Field(default_factory=GatewayArgs)
    moderation: ModerationArgs | None = Field(default_factory=ModerationArgs)
    ocr: OcrArgs | None = Field(default_factory=OcrArgs)
    quality: QualityArgs | None = Field(default_factory=QualityArgs)
    streams: StreamsArgs | None = Field(default_factory=StreamsArgs)
    # Off unless configured (the shipped config turns it on): faces and attributes are personal data,
    # and an app built for one capability should not load three more models.
    persons: PersonsArgs | None = None
    # Off unless configured (the shipped config and the RayService turn it on): an app built for one
    # capability should not carry a labelling replica.
    labelling: LabellingArgs | None = None
    # Off unless configured (the shipped config turns it on): the detector comes from
    # `make train-persons`, and an app built for one capability should not load it.
    detection: DetectionArgs | None = None


def colocated_args(args: AppArgs) -> AppArgs:
    """``args`` with each colocated capability's live config in the gateway's, where ``reconfigure`` finds it.

    A live config the gateway's already names wins, and becomes the capability's starting one.
    """
    live = args.gateway.live.model_copy()
    caps = {}
    for cap, key in (("moderate", "moderation"), ("quality", "quality")):
        cap_args = getattr(args, key)
        if cap not in args.gateway.colocate or cap_args is None:
            if getattr(live, key) is not None:
                raise ConfigError(f"gateway.live.{key} is set, but {cap} is not colocated (gateway.colocate)")
            continue
        given = getattr(live, key)
        if given is None:
            setattr(live, key, cap_args.live.model_dump())
        else:
            caps[key] = cap_args.model_copy(update={"live": type(cap_args.live).model_validate(given)})
    return args.model_copy(update={"gateway": args.gateway.model_copy(update={"live": live}), **caps})


def build_app(args: AppArgs | dict | None = None):
    """The full graph: gateway → moderation, OCR (detect → recognize), quality, streams.

    Args:
        args: ``AppArgs`` (or a dict of it, validated here once); a capability set to None is not deployed.

    Raises:
        ConfigError: Invalid args (the message lists pydantic's findings).
    """
    if not isinstance(args, AppArgs):
        try:
            args = AppArgs.model_validate(args or {})
        except ValueError as exc:
            raise ConfigError(f"invalid livelens app args: {exc}") from None
    # A capability whose library is not installed is left out (its routes answer 503) rather than
    # failing the whole graph: the gateway, quality and streams stay useful on their own.
    if args.ocr is not None and importlib.util.find_spec("livelens.ocr") is None:
        log.warning("livelens.ocr is not available: /v1/ocr is not deployed")
        args = args.model_copy(update={"ocr": None})
    args = colocated_args(args)
    colocate = set(args.gateway.colocate)
    handles: dict[str, Any] = {}
    extra_cpus = 0.0

    def capability(cap: str, cap_args: BaseModel, deployment: Any, bind: Any) -> Any:
        """The bound deployment, or (colocated) its class and args, whose CPUs the gateway then takes."""
        nonlocal extra_cpus
        if cap not in colocate:
            return bind(cap_args)
        extra_cpus += cap_args.deploy.num_cpus
        return Colocated(deployment.func_or_class, cap_args)

    if args.moderation is not None:
        handles["moderation"] = capability("moderate", args.moderation, Moderation, bind_moderation)
    if args.ocr is not None:
        handles["ocr"] = bind_ocr(args.ocr)
    if args.quality is not None:
        handles["quality"] = capability("quality", args.quality, Quality, bind_quality)
    if args.streams is not None:
        handles["streams"] = bind_streams(args.streams)
    if args.labelling is not None:
        handles["labelling"] = bind_labelling(args.labelling)
    if args.persons is not None:
        handles["persons"] = bind_persons(args.persons)
    if args.detection is not None:
        handles["detection"] = bind_detection(args.detection)
    options = args.gateway.deploy.to_options()
    options["ray_actor_options"]["num_cpus"] += extra_cpus  # the colocated models run in this replica
    return Gateway.options(**options, user_config=args.gateway.live.model_dump()).bind(args.gateway, **handles)

"""The gateway's OpenAPI document and its offline ``/docs`` page.

The routes read their bodies themselves (multipart, JSON or raw bytes, checked before any model
runs), so FastAPI cannot infer request bodies, parameters or error answers from signatures.
:func:`describe` adds them to the generated document, with the error envelope and the two ways
to send a key as security schemes, so that a client generated from ``/openapi.json`` works.

``/docs`` is Swagger UI from the ``swagger-ui-bundle`` package, served by the gateway itself:
FastAPI's default page loads its scripts from a CDN and is blank on an offline cluster.
"""

from __future__ import annotations

import copy
import mimetypes
from pathlib import Path
from typing import Any

from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from livelens.errors import LivelensError
from livelens.serving.inputs import MAX_BATCH, RAW_TYPES
from livelens.serving.options import EVIDENCE_MODES

#: The Swagger UI files the page loads (nothing else of the package is served).
SWAGGER_ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")

ERROR_STATUSES = {
    "400": "Invalid argument (bad option, bad JSON, missing file part)",
    "401": "Missing or unknown API key",
    "403": "The key lacks this route's scope",
    "404": "Not found (unknown route, stream, or pinned model version)",
    "413": "Image or body over the size or pixel limit",
    "415": "Unsupported media type",
    "422": "The image could not be decoded",
    "429": "Over the key's rate limit (see Retry-After)",
    "503": "At capacity or capability not deployed (see Retry-After)",
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["type", "code", "message"],
        "properties": {"type": {"type": "string", "example": "invalid_media"},
                       "code": {"type": "string", "example": "image_too_large"},
                       "message": {"type": "string"}},
    },
    "ErrorEnvelope": {
        "type": "object", "required": ["error", "request_id"],
        "properties": {"error": {"$ref": "#/components/schemas/Error"}, "request_id": {"type": "string"}},
    },
    "Evidence": {
        "type": "object",
        "properties": {"kind": {"type": "string", "example": "box"},
                       "box": {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4,
                               "description": "x0, y0, x1, y1 in pixels of the sent image"},
                       "score": {"type": "number"}, "source": {"type": "string", "example": "grad_cam"}},
        "additionalProperties": True,
    },
    "Label": {
        "type": "object", "required": ["name", "score", "decision"],
        "properties": {"name": {"type": "string", "example": "ads_phone"},
                       "parent": {"type": "string", "nullable": True},
                       "level": {"type": "integer"},
                       "score": {"type": "number", "minimum": 0, "maximum": 1},
                       "threshold": {"type": "number"},
                       "decision": {"type": "string", "enum": ["pass", "review", "block"]},
                       "model": {"type": "string", "example": "safety@1"},
                       "evidence": {"type": "array", "items": {"$ref": "#/components/schemas/Evidence"}},
                       "overruled": {"type": "string", "description": "why OCR set this label to pass"}},
        "additionalProperties": True,
    },
    "Filters": {
        "type": "object",
        "properties": {"min_confidence": {"type": "number", "nullable": True},
                       "categories": {"type": "array", "items": {"type": "string"}, "nullable": True},
                       "labels_dropped": {"type": "integer"},
                       "decision_unfiltered": {"type": "string", "enum": ["pass", "review", "block"]}},
    },
    "Answer": {
        "type": "object", "required": ["request_id", "labels", "decision", "models"],
        "properties": {"request_id": {"type": "string"},
                       "decision": {"type": "string", "enum": ["pass", "review", "block"]},
                       "labels": {"type": "array", "items": {"$ref": "#/components/schemas/Label"}},
                       "models": {"type": "array", "items": {"type": "string"}},
                       "image": {"type": "object", "properties": {"width": {"type": "integer"},
                                                                  "height": {"type": "integer"}}},
                       "moderation": {"type": "object", "additionalProperties": True},
                       "ocr": {"type": "object", "additionalProperties": True,
                               "description": "lines (polygon, text, score), entities, QR codes, text regions"},
                       "quality": {"type": "object", "additionalProperties": True},
                       "stream": {"type": "object", "additionalProperties": True,
                                  "description": "the stream's verdict (stream routes only)"},
                       "filters": {"$ref": "#/components/schemas/Filters"},
                       "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}}},
        "additionalProperties": True,
    },
    "BatchItem": {
        "type": "object", "required": ["status"],
        "properties": {"status": {"type": "integer", "description": "the HTTP status this item alone would get"},
                       "error": {"$ref": "#/components/schemas/Error"}},
        "additionalProperties": True,
        "description": "an Answer (status 200) or an error, per image, in the order sent",
    },
    "BatchAnswer": {
        "type": "object", "required": ["request_id", "results"],
        "properties": {"request_id": {"type": "string"},
                       "results": {"type": "array", "items": {"$ref": "#/components/schemas/BatchItem"}},
                       "timings_ms": {"type": "object", "additionalProperties": {"type": "number"}}},
    },
    "ImageRef": {
        "type": "object",
        "description": "one image: base64 bytes in 'image', or an allowlisted http(s) 'url' the gateway fetches",
        "properties": {"image": {"type": "string", "format": "byte"}, "url": {"type": "string", "format": "uri"}},
    },
}

_OPTION_PARAMS: list[dict[str, Any]] = [
    {"name": "evidence", "in": "query", "required": False,
     "description": "How much evidence to return: none, boxes (Grad-CAM boxes), heatmap (a PNG overlay), "
                    "polygons.",
     "schema": {"type": "string", "enum": list(EVIDENCE_MODES), "default": "boxes"}},
    {"name": "min_confidence", "in": "query", "required": False,
     "description": "Leave out labels scoring below this; decision is recomputed over the labels returned.",
     "schema": {"type": "number", "minimum": 0, "maximum": 1}},
    {"name": "categories", "in": "query", "required": False,
     "description": "Comma-separated level-1 categories (GET /v1/taxonomy) whose labels are returned.",
     "schema": {"type": "string", "example": "porn,ads"}},
    {"name": "model", "in": "query", "required": False,
     "description": "Pin the safety classifier's version, e.g. safety@1 (404 if no store has it).",
     "schema": {"type": "string", "example": "safety@1"}},
]
_TS_PARAM = {"name": "ts", "in": "query", "required": False,
             "description": "The frame's capture time (unix seconds); default: when it arrives.",
             "schema": {"type": "number"}}


def _image_body(batch: bool) -> dict[str, Any]:
    form_props: dict[str, Any] = {p["name"]: dict(p["schema"], description=p["description"]) for p in _OPTION_PARAMS}
    if batch:
        form = {"type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "maxItems": MAX_BATCH,
                                         "items": {"type": "string", "format": "binary"}}, **form_props}}
        json_body = {"type": "object", "required": ["images"],
                     "properties": {"images": {"type": "array", "maxItems": MAX_BATCH, "minItems": 1,
                                               "items": {"oneOf": [{"type": "string", "format": "byte"},
                                                                   {"$ref": "#/components/schemas/ImageRef"}]}},
                                    **form_props}}
        return {"required": True, "description": f"Up to {MAX_BATCH} images: multipart 'files' parts, or JSON.",
                "content": {"multipart/form-data": {"schema": form}, "application/json": {"schema": json_body}}}
    form = {"type": "object", "required": ["file"],
            "properties": {"file": {"type": "string", "format": "binary"}, **form_props}}
    json_body = {"allOf": [{"$ref": "#/components/schemas/ImageRef"},
                           {"type": "object", "properties": form_props}]}
    content: dict[str, Any] = {"multipart/form-data": {"schema": form}, "application/json": {"schema": json_body}}
    for mt in sorted(RAW_TYPES):
        content[mt] = {"schema": {"type": "string", "format": "binary"}}
    return {"required": True, "description": "One image: a multipart 'file' part, JSON, or the raw bytes.",
            "content": content}


def _errors(statuses: tuple[str, ...]) -> dict[str, Any]:
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    return {s: {"description": ERROR_STATUSES[s], "content": copy.deepcopy(ref)} for s in statuses}


def describe(schema: dict[str, Any]) -> dict[str, Any]:
    """Add request bodies, parameters, error answers and security to FastAPI's generated document.

    Args:
        schema: ``FastAPI.openapi()``'s document (updated and returned).
    """
    comps = schema.setdefault("components", {})
    comps.setdefault("schemas", {}).update(copy.deepcopy(_SCHEMAS))
    comps["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <key>"},
        "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "basicAuth": {"type": "http", "scheme": "basic",
                      "description": "any user name, the API key as the password (for tools such as Label Studio)"},
    }
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            if not path.startswith("/v1/") or path == "/v1/label-studio/health":
                op["security"] = []  # /healthz and Label Studio's health check answer without a key
                continue
            op["security"] = [{"bearerAuth": []}, {"apiKeyHeader": []}, {"basicAuth": []}]
            statuses: tuple[str, ...] = ("401", "403", "429")
            if method == "post" and path.startswith("/v1/label-studio/"):
                # Label Studio's ML backend protocol: its JSON bodies (tasks, webhook payloads).
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "additionalProperties": True}}}}
                statuses = ("400", "401", "403", "404", "413", "429", "503")
            elif method == "post" and path == "/v1/label/commit":
                # A JSON body of labels, not images: its schema is the gateway's LabelCommitBody.
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["ids"], "additionalProperties": False, "properties": {
                        "ids": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 10000},
                        "add": {"type": "array", "items": {"type": "string"}},
                        "remove": {"type": "array", "items": {"type": "string"}},
                        "note": {"type": "string", "maxLength": 200}}}}}}
                statuses = ("400", "401", "403", "404", "413", "429", "503")
            elif method == "post" and not path.startswith("/v1/admin"):
                batch = path.endswith("/batch")
                op["requestBody"] = _image_body(batch)
                # Keep the path parameters FastAPI found; the options are ours.
                path_params = [p for p in op.get("parameters", []) if p.get("in") == "path"]
                op["parameters"] = path_params + copy.deepcopy(_OPTION_PARAMS)
                if "/streams/" in path:
                    op["parameters"].append(dict(_TS_PARAM))
                ok = "BatchAnswer" if batch else "Answer"
                op.setdefault("responses", {})["200"] = {
                    "description": "The answer", "content": {"application/json": {
                        "schema": {"$ref": f"#/components/schemas/{ok}"}}}}
                statuses = ("400", "401", "403", "404", "413", "415", "422", "429", "503")
            elif method == "put":
                op["requestBody"] = {"required": True, "content": {"application/json": {
                    "schema": {"type": "object", "additionalProperties": True}}}}
                statuses = ("400", "401", "403", "404")
            elif "{" in path:
                statuses = ("400", "401", "403", "404", "429")
            responses = op.setdefault("responses", {})
            responses.pop("422", None)  # FastAPI's HTTPValidationError: our 4xx use the envelope
            responses.update(_errors(statuses))
    comps.get("schemas", {}).pop("HTTPValidationError", None)
    comps.get("schemas", {}).pop("ValidationError", None)
    return schema


def _swagger_dir() -> Path:
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


def swagger_page(root_path: str, title: str) -> HTMLResponse:
    """The Swagger UI page, loading its files from this gateway (``{root_path}/docs-assets/``)."""
    assets = f"{root_path}/docs-assets"
    return get_swagger_ui_html(openapi_url=f"{root_path}/openapi.json", title=title,
                               swagger_js_url=f"{assets}/swagger-ui-bundle.js",
                               swagger_css_url=f"{assets}/swagger-ui.css",
                               swagger_favicon_url=f"{assets}/favicon-32x32.png")


def swagger_asset(name: str) -> FileResponse:
    """One of :data:`SWAGGER_ASSETS` (anything else is a 404; no path is taken from the request)."""
    if name not in SWAGGER_ASSETS:
        err = LivelensError(f"no docs asset {name[:60]!r}", code="not_found")
        err.type, err.http_status = "not_found", 404
        raise err
    media = mimetypes.guess_type(name)[0] or "application/octet-stream"
    return FileResponse(_swagger_dir() / name, media_type=media,
                        headers={"Cache-Control": "public, max-age=86400"})

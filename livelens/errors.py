"""Typed errors shared by the library, the jobs and the HTTP service.

Every error carries a machine-readable ``type`` and ``code`` and the HTTP status the
gateway answers with, so the service maps any of them onto its one error envelope
without string matching.
"""

from __future__ import annotations


class LivelensError(Exception):
    """Base class: ``type`` groups errors, ``code`` names the exact case."""

    type: str = "internal_error"
    code: str = "internal"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, str]:
        """The ``error`` object of the HTTP envelope."""
        return {"type": self.type, "code": self.code, "message": self.message}


class InvalidImageError(LivelensError):
    """The bytes are not a decodable image (corrupt, truncated, empty, wrong type)."""

    type = "invalid_media"
    code = "invalid_image"
    http_status = 422


class UnsupportedMediaTypeError(LivelensError):
    """The declared or sniffed format is not one we accept."""

    type = "invalid_media"
    code = "unsupported_media_type"
    http_status = 415


class ImageTooLargeError(LivelensError):
    """Bytes or pixels exceed the configured limits (decompression-bomb guard)."""

    type = "invalid_media"
    code = "image_too_large"
    http_status = 413


class InvalidArgumentError(LivelensError):
    """A request argument or a job/config value is wrong."""

    type = "invalid_argument"
    code = "invalid_argument"
    http_status = 400


class ConfigError(InvalidArgumentError):
    """A configuration (job, taxonomy, serve config) is invalid; raised before work starts."""

    code = "invalid_config"


class TaxonomyError(ConfigError):
    """The taxonomy file is broken; the message names the offending line."""

    code = "invalid_taxonomy"


class ManifestError(ConfigError):
    """A dataset manifest is missing, corrupt or has the wrong schema."""

    code = "invalid_manifest"


class EmbeddingError(InvalidArgumentError):
    """Embeddings that cannot be used together: mismatched widths or models, empty, or unreadable."""

    code = "invalid_embeddings"


class ModelNotFoundError(LivelensError):
    """A ``name@version`` is not in the model store."""

    type = "not_found"
    code = "model_not_found"
    http_status = 404


class NotFoundError(LivelensError):
    """A named thing (a frame id, a label version, a store) does not exist."""

    type = "not_found"
    code = "not_found"
    http_status = 404


class AuthError(LivelensError):
    """Missing or unknown API key."""

    type = "auth_error"
    code = "unauthenticated"
    http_status = 401


class ForbiddenError(LivelensError):
    """The key is valid but not allowed to do this."""

    type = "auth_error"
    code = "forbidden"
    http_status = 403


class RateLimitedError(LivelensError):
    """The key exceeded its rate limit."""

    type = "usage_limit"
    code = "rate_limited"
    http_status = 429


class ConflictError(LivelensError):
    """The request clashes with work already under way (e.g. a second retrain while one runs)."""

    type = "conflict"
    code = "conflict"
    http_status = 409


class OverloadedError(LivelensError):
    """The service queue is full; the client should retry after a pause."""

    type = "usage_limit"
    code = "overloaded"
    http_status = 503


def unwrap(exc: BaseException) -> BaseException:
    """The original exception behind a Ray task error, so typed errors keep their type and code."""
    seen = 0
    # A RayTaskError already passes isinstance checks for its cause's class, but its own attributes
    # are Ray's; the cause carries the real message and code.
    while seen < 5 and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause  # type: ignore[assignment]
        seen += 1
    return exc

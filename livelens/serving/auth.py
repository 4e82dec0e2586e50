"""API keys (stored as sha256 hashes), scopes and per-key token-bucket rate limits.

Keys come from a JSON file (default ``runs/api_keys.json``) and/or the ``LIVELENS_API_KEYS``
environment variable. Only hashes are kept on disk and in memory after loading, so a leaked key
file does not leak keys. File format::

    {"keys": [{"id": "dev", "sha256": "<hex>", "scopes": ["*"], "rate_per_s": 20, "burst": 40}]}

``LIVELENS_API_KEYS`` holds the same JSON, or a comma-separated list of plain keys (hashed on
load, all scopes, default limits) for quick container setups.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from livelens.errors import AuthError, ConfigError, ForbiddenError, RateLimitedError

ENV_VAR = "LIVELENS_API_KEYS"
DEFAULT_KEY_FILE = "runs/api_keys.json"
KEY_PREFIX = "ll_"
ALL_SCOPES = ("moderate", "ocr", "quality", "analyze", "streams", "models", "admin")


def hash_key(key: str) -> str:
    """The sha256 hex digest a key is stored as."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_key() -> str:
    """A new random API key (32 bytes of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass
class ApiKey:
    """One key as stored: its hash, scopes and rate limit."""

    id: str
    sha256: str
    scopes: list[str] = field(default_factory=lambda: ["*"])
    rate_per_s: float = 20.0
    burst: float = 40.0

    def allows(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes


class TokenBucket:
    """A thread-safe token bucket: ``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float, clock=time.monotonic):
        if rate <= 0 or burst < 1:
            raise ConfigError(f"rate limit needs rate > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate, self.burst, self._clock = float(rate), float(burst), clock
        self._tokens, self._t = float(burst), clock()
        self._lock = threading.Lock()

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens; return 0 on success or the seconds to wait before retrying."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
            self._t = now
            if self._tokens >= n:
                self._tokens -= n
                return 0.0
            return (n - self._tokens) / self.rate


def _parse_entries(doc: object, source: str) -> list[ApiKey]:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ConfigError(f"{source}: expected {{'keys': [...]}}")
    out = []
    for i, item in enumerate(doc["keys"]):
        if not isinstance(item, dict) or not isinstance(item.get("sha256"), str) or len(item["sha256"]) != 64:
            raise ConfigError(f"{source}: key #{i} needs a 64-hex-digit 'sha256'")
        unknown = set(item) - {"id", "sha256", "scopes", "rate_per_s", "burst"}
        if unknown:
            raise ConfigError(f"{source}: key #{i} has unknown fields {sorted(unknown)}")
        out.append(ApiKey(id=str(item.get("id", f"key{i}")), sha256=item["sha256"].lower(),
                          scopes=list(item.get("scopes", ["*"])), rate_per_s=float(item.get("rate_per_s", 20.0)),
                          burst=float(item.get("burst", 40.0))))
    return out


class KeyStore:
    """Verifies keys and enforces scopes and rate limits.

    Args:
        keys: The known keys.
    """

    #: Failed key checks each client address may make (per second, and saved up): guessing keys
    #: used to cost nothing, since only known keys had a bucket.
    FAILED_AUTH_RATE = 2.0
    FAILED_AUTH_BURST = 20.0
    #: Addresses whose failure buckets are remembered (oldest forgotten first).
    MAX_TRACKED_CLIENTS = 10_000

    def __init__(self, keys: list[ApiKey]):
        self._keys = {k.sha256: k for k in keys}
        self._buckets = {k.sha256: TokenBucket(k.rate_per_s, k.burst) for k in keys}
        self._failures: OrderedDict[str, TokenBucket] = OrderedDict()
        self._failures_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, digest: str) -> ApiKey | None:
        """The key stored under a sha256 digest, if any."""
        return self._keys.get(digest)

    @classmethod
    def load(cls, path: str | Path | None = DEFAULT_KEY_FILE, env: dict[str, str] | None = None) -> KeyStore:
        """Load keys from ``path`` (if it exists) and the ``LIVELENS_API_KEYS`` environment variable."""
        env = os.environ if env is None else env
        keys: list[ApiKey] = []
        if path is not None and Path(path).is_file():
            try:
                doc = json.loads(Path(path).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON: {exc}") from exc
            keys += _parse_entries(doc, str(path))
        raw = (env.get(ENV_VAR) or "").strip()
        if raw.startswith("{"):
            try:
                keys += _parse_entries(json.loads(raw), ENV_VAR)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{ENV_VAR}: not valid JSON: {exc}") from exc
        elif raw:
            keys += [ApiKey(id=f"env{i}", sha256=hash_key(k.strip())) for i, k in enumerate(raw.split(",")) if k.strip()]
        return cls(keys)

    def authenticate(self, key: str | None, scope: str, client: str | None = None) -> ApiKey:
        """Check a presented key for ``scope`` and take one rate-limit token.

        Args:
            key: The presented key.
            scope: The route's scope.
            client: The caller's address: failed checks are rate limited per address.

        Raises:
            AuthError: No key, or an unknown key (401).
            ForbiddenError: The key lacks ``scope`` (403).
            RateLimitedError: The key is over its rate limit, or ``client`` over its failed-check
                limit (429); ``retry_after_s`` is set.
        """
        if not key:
            self._failed(client)
            raise AuthError("missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                            code="missing_api_key")
        digest = hash_key(key)
        # Constant-time compare against the matching entry so lookups leak no timing about prefixes.
        entry = self._keys.get(digest)
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            self._failed(client)
            raise AuthError("unknown API key", code="invalid_api_key")
        if not entry.allows(scope):
            raise ForbiddenError(f"key {entry.id!r} may not use {scope!r} (scopes: {entry.scopes})")
        self.charge(entry, 1)
        return entry

    def charge(self, entry: ApiKey, n: float) -> None:
        """Take ``n`` more tokens from a key's bucket: a batch costs one token per image.

        Raises:
            RateLimitedError: Not enough tokens (429); ``retry_after_s`` is set.
        """
        if n <= 0:
            return
        bucket = self._buckets[entry.sha256]
        if n > bucket.burst:
            err = RateLimitedError(f"a request of {n:g} images is more than key {entry.id!r} may send at once "
                                   f"(burst {bucket.burst:g}); send smaller batches")
            err.retry_after_s = n / bucket.rate  # type: ignore[attr-defined]
            raise err
        wait = bucket.take(n)
        if wait > 0:
            err = RateLimitedError(f"key {entry.id!r} is over its limit of {entry.rate_per_s:g} images/s")
            err.retry_after_s = wait  # type: ignore[attr-defined]
            raise err

    def _failed(self, client: str | None) -> None:
        """Count a failed key check against ``client``; past its limit the answer is 429, not 401."""
        if client is None:
            return
        with self._failures_lock:
            bucket = self._failures.get(client)
            if bucket is None:
                bucket = self._failures[client] = TokenBucket(self.FAILED_AUTH_RATE, self.FAILED_AUTH_BURST)
                while len(self._failures) > self.MAX_TRACKED_CLIENTS:
                    self._failures.popitem(last=False)
            else:
                self._failures.move_to_end(client)
        wait = bucket.take()
        if wait > 0:
            err = RateLimitedError(f"too many requests with a missing or unknown key from {client}")
            err.retry_after_s = wait  # type: ignore[attr-defined]
            raise err


def add_key_to_file(path: str | Path, key: str, key_id: str, scopes: list[str] | None = None,
                    rate_per_s: float = 20.0, burst: float = 40.0) -> ApiKey:
    """Store the hash of ``key`` in a key file (created if needed), replacing an entry with the same id."""
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"keys": []}
    entry = ApiKey(id=key_id, sha256=hash_key(key), scopes=scopes or ["*"], rate_per_s=rate_per_s, burst=burst)
    doc["keys"] = [k for k in doc.get("keys", []) if k.get("id") != key_id] + [asdict(entry)]
    write_private(path, json.dumps(doc, indent=2))
    return entry


def write_private(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (created 0600, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)

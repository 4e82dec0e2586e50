"""API keys (stored as sha256 hashes), scopes and per-key token-bucket rate limits.

Keys come from a JSON file (default ``runs/api_keys.json``) and/or the ``LIVELENS_API_KEYS``
environment variable. Only hashes are kept on disk and in memory after loading, so a leaked key
file does not leak keys. File format::

    {"keys": [{"id": "dev", "sha256": "<hex>", "scopes": ["*"], "rate_per_s": 20, "burst": 40,
               "quota_per_day": 100000, "expires_at": 1767225600}]}

``LIVELENS_API_KEYS`` holds the same JSON, or a comma-separated list of plain keys (hashed on
load, all scopes, default limits) for quick container setups.

The file is re-read when it changes (checked at most once a second), so keys are added, rotated
and revoked without a restart (``python -m livelens.serving.keys``); a file that no longer parses
leaves the keys as they were. ``quota_per_day`` counts images per UTC day in a SQLite file beside
the key file, shared by every gateway replica on the node and kept across restarts.
``expires_at`` (Unix seconds) ends a key: rotation keeps the old key valid for a grace period.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from livelens.errors import AuthError, ConfigError, ForbiddenError, RateLimitedError

log = logging.getLogger("livelens.auth")

ENV_VAR = "LIVELENS_API_KEYS"
DEFAULT_KEY_FILE = "runs/api_keys.json"
KEY_PREFIX = "ll_"
ALL_SCOPES = ("moderate", "ocr", "quality", "analyze", "streams", "models", "label", "persons", "admin")


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
    quota_per_day: int | None = None
    expires_at: float | None = None

    def allows(self, scope: str) -> bool:
        return "*" in self.scopes or scope in self.scopes

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (time.time() if now is None else now) >= self.expires_at


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
        unknown = set(item) - {"id", "sha256", "scopes", "rate_per_s", "burst", "quota_per_day", "expires_at"}
        if unknown:
            raise ConfigError(f"{source}: key #{i} has unknown fields {sorted(unknown)}")
        scopes = list(item.get("scopes", ["*"]))
        bad = [sc for sc in scopes if sc != "*" and sc not in ALL_SCOPES]
        if bad:
            raise ConfigError(f"{source}: key #{i} has unknown scopes {bad}; choose from {list(ALL_SCOPES)} or '*'")
        quota = item.get("quota_per_day")
        if quota is not None and (not isinstance(quota, int) or quota < 1):
            raise ConfigError(f"{source}: key #{i}: quota_per_day must be a positive integer, got {quota!r}")
        out.append(ApiKey(id=str(item.get("id", f"key{i}")), sha256=item["sha256"].lower(), scopes=scopes,
                          rate_per_s=float(item.get("rate_per_s", 20.0)), burst=float(item.get("burst", 40.0)),
                          quota_per_day=quota,
                          expires_at=None if item.get("expires_at") is None else float(item["expires_at"])))
    return out


class DailyQuota:
    """Images per key per UTC day, in SQLite: one atomic ``UPDATE`` per request, shared across processes.

    Args:
        path: The SQLite file (created with its table if missing).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._db() as db:
            db.execute("CREATE TABLE IF NOT EXISTS usage (key_id TEXT, day TEXT, n INTEGER, PRIMARY KEY (key_id, day))")

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
        return db

    @staticmethod
    def day(now: float | None = None) -> str:
        return time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))

    def take(self, key_id: str, n: int, limit: int, now: float | None = None) -> bool:
        """Count ``n`` images for ``key_id`` today if that stays within ``limit``; False (nothing counted) if not."""
        day, db = self.day(now), self._db()
        db.execute("INSERT OR IGNORE INTO usage (key_id, day, n) VALUES (?, ?, 0)", (key_id, day))
        cur = db.execute("UPDATE usage SET n = n + ? WHERE key_id = ? AND day = ? AND n + ? <= ?",
                         (n, key_id, day, n, limit))
        return cur.rowcount == 1

    def used(self, key_id: str, now: float | None = None) -> int:
        row = self._db().execute("SELECT n FROM usage WHERE key_id = ? AND day = ?",
                                 (key_id, self.day(now))).fetchone()
        return int(row[0]) if row else 0


def quota_path(key_file: str | Path) -> Path:
    """Where a key file's daily usage is kept: beside it."""
    return Path(key_file).with_suffix(".usage.sqlite")


def _seconds_to_utc_midnight(now: float | None = None) -> float:
    now = time.time() if now is None else now
    return 86400.0 - (now % 86400.0)


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

    #: Seconds between checks of the key file for changes.
    RELOAD_EVERY_S = 1.0

    def __init__(self, keys: list[ApiKey], path: str | Path | None = None, env: dict[str, str] | None = None):
        self._keys: dict[str, ApiKey] = {}
        self._buckets: dict[str, TokenBucket] = {}
        self._set_keys(keys)
        self._failures: OrderedDict[str, TokenBucket] = OrderedDict()
        self._failures_lock = threading.Lock()
        self._path = Path(path) if path is not None else None
        self._env = env
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()
        self._quota: DailyQuota | None = None

    def _set_keys(self, keys: list[ApiKey]) -> None:
        """Install a key list; a key whose limits are unchanged keeps its bucket (its tokens)."""
        old = self._buckets
        self._buckets = {k.sha256: old[k.sha256] if k.sha256 in old and (old[k.sha256].rate, old[k.sha256].burst)
                         == (k.rate_per_s, k.burst) else TokenBucket(k.rate_per_s, k.burst) for k in keys}
        self._keys = {k.sha256: k for k in keys}

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat() if self._path is not None else None
        except OSError:
            return None
        return None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)

    def refresh(self, force: bool = False) -> bool:
        """Re-read the key file if it changed (at most every :attr:`RELOAD_EVERY_S`); True if keys changed.

        A file that no longer parses is logged and ignored: the keys stay as they were.
        """
        if self._path is None or (not force and time.monotonic() - self._checked < self.RELOAD_EVERY_S):
            return False
        self._checked = time.monotonic()
        stamp = self._file_stamp()
        if stamp == self._stamp and not force:
            return False
        try:
            keys = self._read(self._path, self._env)
        except ConfigError as exc:
            log.error("key file %s changed but cannot be used; keeping the previous keys: %s", self._path, exc)
            return False
        self._stamp = stamp
        self._set_keys(keys)
        return True

    @property
    def quota(self) -> DailyQuota | None:
        """The daily usage store (opened on first use, beside the key file)."""
        if self._quota is None and self._path is not None:
            self._quota = DailyQuota(quota_path(self._path))
        return self._quota

    def __len__(self) -> int:
        return len(self._keys)

    def find(self, digest: str) -> ApiKey | None:
        """The key stored under a sha256 digest, if any."""
        return self._keys.get(digest)

    @classmethod
    def load(cls, path: str | Path | None = DEFAULT_KEY_FILE, env: dict[str, str] | None = None) -> KeyStore:
        """Load keys from ``path`` (if it exists; watched for changes) and the ``LIVELENS_API_KEYS`` environment variable."""
        return cls(cls._read(path, env), path, env)

    @staticmethod
    def _read(path: str | Path | None, env: dict[str, str] | None) -> list[ApiKey]:
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
        return keys

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
            raise AuthError("missing API key: send 'Authorization: Bearer <key>', 'X-API-Key: <key>' or the key as the basic-auth password",
                            code="missing_api_key")
        self.refresh()
        digest = hash_key(key)
        # Constant-time compare against the matching entry so lookups leak no timing about prefixes.
        entry = self._keys.get(digest)
        if entry is None or not hmac.compare_digest(entry.sha256, digest):
            self._failed(client)
            raise AuthError("unknown API key", code="invalid_api_key")
        if entry.expired():
            self._failed(client)
            raise AuthError(f"API key {entry.id!r} has expired (rotated); use its new key", code="expired_api_key")
        try:
            if not entry.allows(scope):
                raise ForbiddenError(f"key {entry.id!r} may not use {scope!r} (scopes: {entry.scopes})")
            self.charge(entry, 1)
        except (ForbiddenError, RateLimitedError) as exc:
            exc.key_id = entry.id  # type: ignore[attr-defined]  # the audit log names who was refused
            raise
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
        quota = self.quota if entry.quota_per_day is not None else None
        if quota is not None and not quota.take(entry.id, math.ceil(n), entry.quota_per_day):
            err = RateLimitedError(f"key {entry.id!r} has used its {entry.quota_per_day} images for today (UTC)",
                                   code="quota_exceeded")
            err.retry_after_s = _seconds_to_utc_midnight()  # type: ignore[attr-defined]
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
                    rate_per_s: float = 20.0, burst: float = 40.0, quota_per_day: int | None = None) -> ApiKey:
    """Store the hash of ``key`` in a key file (created if needed), replacing an entry with the same id."""
    path = Path(path)
    doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"keys": []}
    entry = ApiKey(id=key_id, sha256=hash_key(key), scopes=scopes or ["*"], rate_per_s=rate_per_s, burst=burst,
                   quota_per_day=quota_per_day)
    doc["keys"] = [k for k in doc.get("keys", []) if k.get("id") != key_id] + [_stored(entry)]
    _parse_entries(doc, str(path))  # never write a file the gateway would refuse
    write_private(path, json.dumps(doc, indent=2))
    return entry


def _stored(entry: ApiKey) -> dict:
    """A key's file entry, without the optional fields it does not use."""
    return {k: v for k, v in asdict(entry).items() if v is not None}


def write_private(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, readable by its owner only (created 0600, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    tmp.replace(path)

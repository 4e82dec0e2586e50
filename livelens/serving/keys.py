"""Manage API keys while the service runs: add, rotate, revoke, list.

The gateway re-reads the key file when it changes (within a second), so none of these needs a
restart. A new key is printed once and never stored: only its sha256 is.

    python -m livelens.serving.keys add partner-a --scopes moderate,ocr --quota 100000
    python -m livelens.serving.keys rotate partner-a --grace 3600   # the old key works one more hour
    python -m livelens.serving.keys revoke partner-a
    python -m livelens.serving.keys list
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from livelens.errors import ConfigError
from livelens.serving.auth import (
    ALL_SCOPES,
    DEFAULT_KEY_FILE,
    DailyQuota,
    _parse_entries,
    _stored,
    add_key_to_file,
    generate_key,
    hash_key,
    quota_path,
    write_private,
)


def _doc(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"keys": []}


def _write(path: Path, doc: dict) -> None:
    _parse_entries(doc, str(path))  # never write a file the gateway would refuse
    write_private(path, json.dumps(doc, indent=2))


def rotate(path: str | Path, key_id: str, grace_s: float = 0.0, now: float | None = None) -> str:
    """A new key for ``key_id`` with the same scopes and limits; the old one expires after ``grace_s``.

    Raises:
        ConfigError: No key has that id.
    """
    path, now = Path(path), time.time() if now is None else now
    doc = _doc(path)
    current = [k for k in doc["keys"] if k.get("id") == key_id and k.get("expires_at") is None]
    if not current:
        raise ConfigError(f"no live key with id {key_id!r} in {path}")
    key = generate_key()
    keep = [k for k in doc["keys"] if k.get("id") != key_id or k.get("expires_at") is not None]
    if grace_s > 0:
        keep += [{**k, "expires_at": now + grace_s} for k in current]
    keep.append({**current[-1], "sha256": hash_key(key)})
    _write(path, {**doc, "keys": keep})
    return key


def revoke(path: str | Path, key_id: str) -> int:
    """Remove every key (current and rotated-out) with ``key_id``; the number removed.

    Raises:
        ConfigError: No key has that id.
    """
    path = Path(path)
    doc = _doc(path)
    keep = [k for k in doc["keys"] if k.get("id") != key_id]
    removed = len(doc["keys"]) - len(keep)
    if not removed:
        raise ConfigError(f"no key with id {key_id!r} in {path}")
    _write(path, {**doc, "keys": keep})
    return removed


def listing(path: str | Path) -> list[dict]:
    """Every key's id, scopes, limits, expiry and images used today (never a hash)."""
    path = Path(path)
    keys = _parse_entries(_doc(path), str(path))
    quota = DailyQuota(quota_path(path)) if quota_path(path).is_file() else None
    return [{k: v for k, v in _stored(key).items() if k != "sha256"}
            | {"used_today": quota.used(key.id) if quota else 0} for key in keys]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--file", default=DEFAULT_KEY_FILE, help="the gateway's key file")
    sub = p.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="a new key (printed once)")
    add.add_argument("id")
    add.add_argument("--scopes", default="*", help=f"comma-separated: {','.join(ALL_SCOPES)} or *")
    add.add_argument("--rate", type=float, default=20.0, help="images/s")
    add.add_argument("--burst", type=float, default=40.0)
    add.add_argument("--quota", type=int, default=None, help="images per UTC day")
    rot = sub.add_parser("rotate", help="a new key for an id; the old one ends after --grace seconds")
    rot.add_argument("id")
    rot.add_argument("--grace", type=float, default=0.0)
    rev = sub.add_parser("revoke", help="remove an id's keys")
    rev.add_argument("id")
    sub.add_parser("list", help="ids, scopes, limits, usage today")
    a = p.parse_args(argv)
    try:
        if a.cmd == "add":
            key = generate_key()
            add_key_to_file(a.file, key, a.id, scopes=[s for s in a.scopes.split(",") if s], rate_per_s=a.rate,
                            burst=a.burst, quota_per_day=a.quota)
            print(key)
        elif a.cmd == "rotate":
            print(rotate(a.file, a.id, a.grace))
        elif a.cmd == "revoke":
            print(f"revoked {revoke(a.file, a.id)} key(s) with id {a.id!r}")
        else:
            print(json.dumps(listing(a.file), indent=2))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

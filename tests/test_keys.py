"""Keys without a restart (issue 19): hot reload, rotation with a grace period, revocation, daily quotas."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from livelens.errors import AuthError, ConfigError, ForbiddenError, RateLimitedError
from livelens.serving import keys as keycli
from livelens.serving.auth import KeyStore, add_key_to_file, generate_key


@pytest.fixture()
def store(tmp_path, monkeypatch):
    monkeypatch.setattr(KeyStore, "RELOAD_EVERY_S", 0.0)  # check the file on every request
    path = tmp_path / "keys.json"
    first = generate_key()
    add_key_to_file(path, first, "a", scopes=["moderate"])
    return path, first, KeyStore.load(path, env={})


def test_added_and_revoked_keys_apply_without_a_restart(store) -> None:
    path, first, ks = store
    assert ks.authenticate(first, "moderate").id == "a"
    with pytest.raises(ForbiddenError):
        ks.authenticate(first, "ocr")
    second = generate_key()
    add_key_to_file(path, second, "b", scopes=["ocr"])
    assert ks.authenticate(second, "ocr").id == "b"  # the running store picked the new file up
    assert keycli.revoke(path, "a") == 1
    with pytest.raises(AuthError) as exc:
        ks.authenticate(first, "moderate")
    assert exc.value.code == "invalid_api_key"
    with pytest.raises(ConfigError):
        keycli.revoke(path, "a")


def test_rotation_keeps_the_old_key_for_its_grace_period(store) -> None:
    path, old, ks = store
    new = keycli.rotate(path, "a", grace_s=3600)
    assert new != old and ks.authenticate(new, "moderate").id == "a" and ks.authenticate(old, "moderate").id == "a"
    newer = keycli.rotate(path, "a", grace_s=0)  # no grace: the previous key ends now
    assert ks.authenticate(newer, "moderate").id == "a"
    with pytest.raises(AuthError):
        ks.authenticate(new, "moderate")
    doc = json.loads(path.read_text())
    expired = next(k for k in doc["keys"] if k.get("expires_at"))
    expired["expires_at"] = time.time() - 1  # the old key's grace is over
    path.write_text(json.dumps(doc))
    with pytest.raises(AuthError) as exc:
        ks.authenticate(old, "moderate")
    assert exc.value.code == "expired_api_key"
    assert ks.authenticate(newer, "moderate").id == "a"


def test_a_broken_file_keeps_the_previous_keys(store) -> None:
    path, first, ks = store
    path.write_text("{not json")
    assert ks.authenticate(first, "moderate").id == "a"
    path.write_text(json.dumps({"keys": [{"id": "x", "sha256": "0" * 64, "scopes": ["persons!"]}]}))
    assert ks.authenticate(first, "moderate").id == "a"  # unknown scope: refused, old keys stay
    with pytest.raises(ConfigError):
        KeyStore.load(path, env={})


def test_daily_quota_counts_images_and_survives_a_restart(tmp_path) -> None:
    path, key = tmp_path / "keys.json", generate_key()
    add_key_to_file(path, key, "q", quota_per_day=5, rate_per_s=1000, burst=1000)
    ks = KeyStore.load(path, env={})
    entry = ks.authenticate(key, "moderate")  # 1
    ks.charge(entry, 3)  # a batch of 4 images: 4
    with pytest.raises(RateLimitedError) as exc:
        ks.charge(entry, 2)  # 6 > 5: refused, nothing counted
    assert exc.value.code == "quota_exceeded" and 0 < exc.value.retry_after_s <= 86400
    restarted = KeyStore.load(path, env={})
    assert restarted.authenticate(key, "moderate").id == "q"  # 5
    with pytest.raises(RateLimitedError):
        restarted.authenticate(key, "moderate")  # 6
    assert [row["used_today"] for row in keycli.listing(path)] == [5]


def test_cli_add_list_rotate_revoke(tmp_path, capsys) -> None:
    path = str(tmp_path / "keys.json")
    assert keycli.main(["--file", path, "add", "partner", "--scopes", "moderate,ocr", "--quota", "100"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("ll_") and KeyStore.load(path, env={}).authenticate(key, "ocr").id == "partner"
    assert keycli.main(["--file", path, "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [{"id": "partner", "scopes": ["moderate", "ocr"], "rate_per_s": 20.0, "burst": 40.0,
                       "quota_per_day": 100, "used_today": 1}]
    assert keycli.main(["--file", path, "add", "bad", "--scopes", "everything"]) == 2
    assert keycli.main(["--file", path, "rotate", "nobody"]) == 2
    assert keycli.main(["--file", path, "rotate", "partner"]) == 0
    assert keycli.main(["--file", path, "revoke", "partner"]) == 0
    assert json.loads(Path(path).read_text())["keys"] == []


def test_audit_log_appends_a_file_per_day_and_drops_old_ones(tmp_path) -> None:
    from livelens.serving.telemetry import AuditLog

    (tmp_path / "audit-2000-01-01.jsonl").write_text("{}\n")  # far past the retention
    audit = AuditLog(tmp_path, retain_days=30)
    day = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    audit.write({"key_id": "a", "route": "/v1/ocr", "status": 200}, now=day - 1)
    audit.write({"key_id": "b", "route": "/v1/moderate", "status": 403}, now=day + 1)
    audit.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit-2025-12-31.jsonl", "audit-2026-01-01.jsonl"]
    (line,) = (tmp_path / "audit-2026-01-01.jsonl").read_text().splitlines()
    assert json.loads(line) == {"ts": day + 1, "key_id": "b", "route": "/v1/moderate", "status": 403}
    audit.write({"key_id": "c"}, now=day + 2)  # reopened after close
    assert len((tmp_path / "audit-2026-01-01.jsonl").read_text().splitlines()) == 2

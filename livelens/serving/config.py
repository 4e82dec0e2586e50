"""Offline validation of Serve config YAML (``serve run`` / ``serve deploy`` files).

Ray's ``ServeDeploySchema`` silently accepts unknown keys (at least in a deployment entry, and in
Ray 2.60 also at the top level), so a typo such as ``max_queued_request`` would deploy with the default queue. We
check deployment keys against ``DeploymentSchema.model_fields`` ourselves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from livelens.errors import ConfigError


def validate_serve_config(source: str | Path | dict[str, Any]) -> Any:
    """Validate a Serve config; return the parsed ``ServeDeploySchema``.

    Args:
        source: A YAML file path or the already-loaded document.

    Raises:
        ConfigError: Not YAML, rejected by Ray's schema, or an unknown deployment key.
    """
    from pydantic import ValidationError
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    where = str(source) if not isinstance(source, dict) else "<config>"
    if isinstance(source, dict):
        doc = source
    else:
        try:
            doc = yaml.safe_load(Path(source).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{where}: cannot read Serve config: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"{where}: a Serve config is a mapping with 'applications'")
    # Checked here too: in Ray 2.60 the schema lets unknown top-level and application keys through.
    _check_keys(doc, set(ServeDeploySchema.model_fields), f"{where}: top level")
    known = set(DeploymentSchema.model_fields)
    for app in doc.get("applications") or []:
        _check_keys(app or {}, set(ServeApplicationSchema.model_fields), f"{where}: application {app.get('name')!r}")
        for dep in (app or {}).get("deployments") or []:
            unknown = set(dep or {}) - known
            if unknown:
                raise ConfigError(f"{where}: application {app.get('name')!r}, deployment {dep.get('name')!r}: "
                                  f"unknown keys {sorted(unknown)} (known: {sorted(known)})")
    try:
        return ServeDeploySchema.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _check_keys(obj: dict, known: set[str], where: str) -> None:
    unknown = set(obj) - known
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")

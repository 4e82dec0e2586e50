"""The model store: trained models as ``name@version`` with a model card each.

The store lives on a local path or any pyarrow filesystem URI (``s3://…``, ``gs://…``,
``file:///…``). Layout::

    <root>/<name>/<version>/model.pt    # a plain state dict, loaded with weights_only=True
    <root>/<name>/<version>/card.json   # the model card

A version is published by writing into a temporary directory and renaming it, so readers
never see a half-written model.

**The store chain.** Every job publishes into the *user store* (:func:`user_store`) and everything
that loads a model — serving, evaluations, ``make coverage`` — searches the chain
(:func:`store_chain`): the user store first, then the defaults shipped in
``livelens/resources/default_models``. So a model a job trains is the one serving loads next,
and a fresh clone still serves the shipped ones. ``LIVELENS_MODEL_STORE`` moves the user store
(a path or a pyarrow URI shared by the cluster, e.g. for ``ray job submit``);
``LIVELENS_MODEL_STORES`` (``os.pathsep``-separated) replaces the whole chain.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch

from livelens.errors import ConfigError, ModelNotFoundError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_PACKAGE = Path(__file__).resolve().parent
#: The models that ship with livelens (a store root inside the package).
SHIPPED_STORE = str(_PACKAGE / "resources" / "default_models")
#: The user store, relative to the project root (see :func:`user_store`).
DEFAULT_STORE = "runs/model_store"
USER_STORE_ENV = "LIVELENS_MODEL_STORE"
CHAIN_ENV = "LIVELENS_MODEL_STORES"


def project_root() -> Path:
    """The checkout livelens runs from (where ``runs/`` lives); the working directory for an installed package."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


def user_store() -> str:
    """Where jobs publish: ``$LIVELENS_MODEL_STORE``, else ``<project root>/runs/model_store``.

    Anchored at the project root rather than the working directory, so a job started from
    ``train_jobs/``, a Tune trial directory or a notebook publishes where serving looks.
    """
    env = os.environ.get(USER_STORE_ENV, "").strip()
    return env or str(project_root() / DEFAULT_STORE)


def store_chain() -> list[str]:
    """Stores to search, in order: the user store, then the shipped defaults (``$LIVELENS_MODEL_STORES`` overrides)."""
    env = os.environ.get(CHAIN_ENV, "")
    chain = [p for p in env.split(os.pathsep) if p.strip()]
    return chain or [user_store(), SHIPPED_STORE]


def find_in_stores(ref: str, stores: Sequence[str] | None = None) -> tuple[str, str] | None:
    """The first store of the chain holding ``ref`` and the resolved ``name@version``, or None.

    Args:
        ref: ``name``, ``name@latest`` or ``name@version``.
        stores: The chain to search; :func:`store_chain` when None or empty.

    Raises:
        ConfigError: ``ref`` is not a valid model name.
    """
    parse_ref(ref)
    for root in stores or store_chain():
        try:
            return str(root), ModelStore(root).resolve(ref)
        except (ModelNotFoundError, OSError):
            continue
    return None


def open_in_stores(ref: str, stores: Sequence[str] | None = None) -> tuple[ModelStore, str]:
    """Like :func:`find_in_stores`, but a missing model is a :class:`ModelNotFoundError` naming the chain."""
    found = find_in_stores(ref, stores)
    if found is None:
        chain = list(stores or store_chain())
        raise ModelNotFoundError(f"model {ref!r} is in none of the model stores {chain}")
    return ModelStore(found[0]), found[1]


def json_safe(obj: Any) -> Any:
    """Cards as strict JSON: non-finite floats (an AUC with no positives is NaN) become null."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def parse_ref(ref: str) -> tuple[str, str | None]:
    """Split ``name@version`` (version optional, or ``latest``)."""
    name, _, version = ref.partition("@")
    if not _NAME_RE.match(name):
        raise ConfigError(f"bad model name {name!r}: use lowercase letters, digits, '_', '.', '-'")
    return name, (version or None) if version != "latest" else None


def git_sha(repo: str | Path = ".") -> str:
    """The current commit (with ``-dirty`` when the tree has changes), or ``unknown``."""
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class StoredModel:
    """A loaded model: its state dict and card."""

    ref: str
    state_dict: dict[str, torch.Tensor]
    card: dict[str, Any]


class ModelStore:
    """Publish and load models by ``name@version``.

    Args:
        root: A local directory or a pyarrow filesystem URI.
    """

    def __init__(self, root: str | Path | ModelStore | None = None):
        if isinstance(root, ModelStore):
            root = root.uri
        elif root is not None and not isinstance(root, (str, os.PathLike)):
            # str() of anything else is a path too: a notebook's store object once became a
            # folder named "<livelens.store.ModelStore object at 0x…>" in the working directory.
            raise ConfigError(f"a model store is a path or URI, got {type(root).__name__}")
        root = str(root) if root is not None else user_store()
        if "://" in root:
            self.fs, self.root = pafs.FileSystem.from_uri(root)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), str(Path(root).resolve())
        self.uri = root

    def _path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def names(self) -> list[str]:
        """Model names in the store."""
        if not self._exists(self.root):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.root))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def versions(self, name: str) -> list[str]:
        """Published versions of ``name``, oldest first (numeric versions sort numerically)."""
        base = self._path(name)
        if not self._exists(base):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base))
        found = [i.base_name for i in infos if i.type == pafs.FileType.Directory
                 and not i.base_name.startswith(".") and self._exists(self._path(name, i.base_name, "card.json"))]
        return sorted(found, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))

    def resolve(self, ref: str) -> str:
        """Turn ``name`` or ``name@latest`` into ``name@<newest version>``."""
        name, version = parse_ref(ref)
        versions = self.versions(name)
        if version is None:
            if not versions:
                raise ModelNotFoundError(f"no versions of model {name!r} in store {self.uri}")
            version = versions[-1]
        elif version not in versions:
            raise ModelNotFoundError(f"model {name}@{version} not in store {self.uri} (have: {versions})")
        return f"{name}@{version}"

    def save(self, name: str, state_dict: dict[str, torch.Tensor], card: dict[str, Any],
             version: str | None = None, avoid: Sequence[str] = ()) -> str:
        """Publish a model atomically and return its ``name@version``.

        Args:
            name: Model name.
            state_dict: Tensors only; it is read back with ``weights_only=True``.
            card: The model card (JSON-serialisable). name, version, created_at and
                git_sha are filled in when absent.
            version: Explicit version; default is one more than the newest numeric version.
            avoid: Other stores (a serving chain) whose versions the default must not repeat: in a
                chain, ``safety@1`` names whichever store comes first, so a new ``safety@1`` in
                the first store would shadow the one being served, and a swap to it change nothing.
        """
        parse_ref(name)
        existing = self.versions(name)
        if version is None:
            numeric = [int(v) for v in existing if v.isdigit()]
            for other in avoid:
                numeric += [int(v) for v in ModelStore(other).versions(name) if v.isdigit()]
            version = str(max(numeric, default=0) + 1)
        elif version in existing:
            raise ConfigError(f"model {name}@{version} already exists in {self.uri}")
        card = {"name": name, "version": version, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "git_sha": git_sha(), **card, "ref": f"{name}@{version}"}
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
        tmp = self._path(name, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
        self.fs.create_dir(tmp, recursive=True)
        with self.fs.open_output_stream(f"{tmp}/model.pt") as f:
            f.write(buf.getvalue())
        with self.fs.open_output_stream(f"{tmp}/card.json") as f:
            f.write(json.dumps(json_safe(card), indent=2, ensure_ascii=False, default=str, allow_nan=False).encode())
        self.fs.move(tmp, self._path(name, version))
        return f"{name}@{version}"

    def card(self, ref: str) -> dict[str, Any]:
        """The model card of ``ref``."""
        name, version = self.resolve(ref).split("@")
        with self.fs.open_input_stream(self._path(name, version, "card.json")) as f:
            return json_safe(json.loads(f.read()))

    def load(self, ref: str) -> StoredModel:
        """Load a model's state dict (``weights_only=True``) and card."""
        full = self.resolve(ref)
        name, version = full.split("@")
        with self.fs.open_input_stream(self._path(name, version, "model.pt")) as f:
            data = f.read()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return StoredModel(ref=full, state_dict=state, card=self.card(full))

    def list(self) -> list[dict[str, Any]]:
        """The cards of every version of every model."""
        return [self.card(f"{n}@{v}") for n in self.names() for v in self.versions(n)]


def _label_figures(card: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{label: {"precision", "recall"}}`` from a card's validation metrics (per head, per label)."""
    out: dict[str, dict[str, float]] = {}
    for head in ((card.get("metrics") or {}).get("per_label") or {}).values():
        for label, m in ((head or {}).get("labels") or {}).items():
            if isinstance(m, Mapping) and m.get("recall") is not None:
                out[label] = {k: round(float(m[k]), 4) for k in ("precision", "recall") if m.get(k) is not None}
    return out


def model_history(name: str, stores: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every version of ``name`` in the store chain, oldest first, with what changed from the one before.

    Each entry: ``ref``, ``store``, ``created_at``, ``datasets``, ``macro_f1``, the retrain gate's
    verdict where the version was published by a retrain (passed, covered, gained, blocked), and
    ``diff``: per label, the change of validation precision and recall against the previous
    version (labels only one of the two reports are listed as ``new`` or ``dropped``). The
    validation figures are each run's own split, so a diff between runs on different data says
    where to look, not which model is better: the gate's held-out comparison says that.
    ``shadowed`` is true for a copy of a ref that an earlier store of the chain also holds: serving
    loads the earlier one, so the copy is listed but takes no part in the diffs.

    Raises:
        ConfigError: ``name`` is not a valid model name.
        ModelNotFoundError: No store of the chain has a version of ``name``.
    """
    parse_ref(name)
    entries, seen = [], set()
    for root in stores or store_chain():
        try:
            store = ModelStore(root)
            versions = store.versions(name)
        except OSError:
            continue
        for v in versions:
            card = store.card(f"{name}@{v}")
            gate = (card.get("gate") or {}).get("gate") or {}
            ref = f"{name}@{v}"
            entries.append({"ref": ref, "store": str(root), "created_at": card.get("created_at", ""),
                            # Serving loads a ref from the first store that holds it; a copy further
                            # down the chain is listed so the user sees it, but never served or diffed.
                            "shadowed": ref in seen,
                            "datasets": card.get("datasets") or [],
                            "macro_f1": (card.get("metrics") or {}).get("macro_f1"),
                            "gate": {k: gate.get(k) for k in ("passed", "covered", "gained", "blocked")} if gate else None,
                            "_labels": _label_figures(card)})
            seen.add(ref)
    if not entries:
        raise ModelNotFoundError(f"model {name!r} is in none of the model stores {list(stores or store_chain())}")
    entries.sort(key=lambda e: (e["created_at"], e["ref"]))
    prev: dict[str, dict[str, float]] | None = None
    for e in entries:
        now = e.pop("_labels")
        diff: dict[str, Any] = {}
        if e["shadowed"]:
            e["labels"], e["diff"] = now, diff
            continue
        if prev is not None:
            for label in sorted(set(now) | set(prev)):
                if label not in prev:
                    diff[label] = {"new": now[label]}
                elif label not in now:
                    diff[label] = {"dropped": prev[label]}
                else:
                    d = {k: round(now[label][k] - prev[label][k], 4) for k in now[label] if k in prev[label]}
                    if any(d.values()):
                        diff[label] = d
        e["labels"], e["diff"] = now, diff
        prev = now
    return entries

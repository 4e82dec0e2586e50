"""The dataset manifest: one Parquet schema for every image set livelens trains or evaluates on.

A manifest is a directory holding ``manifest.parquet`` (one row per image), ``card.json``
(name, version, generator, seed, counts per label and split) and ``contact_sheet.png``.
It is read with plain pyarrow (:func:`read_manifest`) or with Ray Data (:func:`read_ray`,
then ``map_batches(decode_batch)``). Writes are atomic at the directory level: the new
version is built next to the old one and swapped in with renames, so a crash mid-write
leaves the previous version readable.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from livelens.errors import InvalidImageError, ManifestError

MANIFEST_FILE = "manifest.parquet"
CARD_FILE = "card.json"
CONTACT_SHEET_FILE = "contact_sheet.png"
SCHEMA_VERSION = 1
SPLITS = ("train", "val", "test")
#: Percent of ids that go to train and val; the rest is test.
SPLIT_PERCENT = (80, 10)

BOX_TYPE = pa.struct(
    [
        ("label", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
    ]
)
TEXT_TYPE = pa.struct([("polygon", pa.list_(pa.float32())), ("text", pa.string())])
QUALITY_TYPE = pa.struct([("distortion", pa.string()), ("level", pa.int32()), ("score", pa.float32())])

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("image_uri", pa.string()),
        pa.field("image_bytes", pa.binary()),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("labels", pa.list_(pa.string())),
        pa.field("boxes", pa.list_(BOX_TYPE)),
        pa.field("texts", pa.list_(TEXT_TYPE)),
        pa.field("quality", QUALITY_TYPE),
        pa.field("attributes", pa.string()),
    ],
    metadata={"livelens.manifest.schema_version": str(SCHEMA_VERSION)},
)
COLUMNS = tuple(SCHEMA.names)


def content_id(data: bytes) -> str:
    """The row id: sha256 of the encoded image bytes, so identical images get one id."""
    return hashlib.sha256(data).hexdigest()


def split_for_key(key: str, percent: tuple[int, int] = SPLIT_PERCENT) -> str:
    """Deterministic split from any string key (an id, or a source photo name).

    The key is hashed again so that ids that are themselves hashes and plain names both
    spread evenly; the same key always lands in the same split on every machine.
    """
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < percent[0]:
        return "train"
    if bucket < percent[0] + percent[1]:
        return "val"
    return "test"


def _normalise_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults and derived fields (id from bytes, split from id) of one row."""
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ManifestError(f"unknown manifest columns {sorted(unknown)}; the schema has {list(COLUMNS)}")
    out = dict(row)
    data = out.get("image_bytes")
    if data is not None and not isinstance(data, bytes | bytearray | memoryview):
        raise ManifestError(f"image_bytes must be bytes, got {type(data).__name__}")
    if not out.get("id"):
        if data is None:
            raise ManifestError("a row without image_bytes needs an explicit id")
        out["id"] = content_id(bytes(data))
    if data is None and not out.get("image_uri"):
        raise ManifestError(f"row {out['id']}: needs image_bytes or image_uri")
    out.setdefault("image_uri", None)
    out.setdefault("image_bytes", None)
    out.setdefault("split", split_for_key(out["id"]))
    out.setdefault("labels", [])
    out.setdefault("boxes", [])
    out.setdefault("texts", [])
    out.setdefault("quality", None)
    attrs = out.get("attributes")
    if attrs is None:
        attrs = {}
    out["attributes"] = attrs if isinstance(attrs, str) else json.dumps(attrs, ensure_ascii=False, sort_keys=True)
    return out


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Build a manifest table from row dicts (missing optional fields get defaults)."""
    norm = [_normalise_row(r) for r in rows]
    try:
        return pa.Table.from_pylist(norm, schema=SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, KeyError) as exc:
        raise ManifestError(f"rows do not fit the manifest schema: {exc}") from exc


def _conform(table: pa.Table) -> pa.Table:
    """Cast a table onto the schema; extra columns (e.g. embeddings) are kept after the core ones."""
    missing = [n for n in COLUMNS if n not in table.column_names]
    if missing:
        raise ManifestError(f"manifest is missing columns {missing}")
    extra = [n for n in table.column_names if n not in COLUMNS]
    try:
        core = table.select(list(COLUMNS)).cast(SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ManifestError(f"manifest columns have the wrong types: {exc}") from exc
    for name in extra:
        core = core.append_column(table.schema.field(name), table.column(name))
    return core.replace_schema_metadata({**(table.schema.metadata or {}), **SCHEMA.metadata})


def validate_table(table: pa.Table, taxonomy: Any | None = None) -> None:
    """Check values the schema cannot: taxonomy names, splits, sizes, boxes inside the image.

    Raises:
        ManifestError: The first problem found, naming the row id.
    """
    if taxonomy is None:
        from livelens.taxonomy import load_taxonomy

        taxonomy = load_taxonomy()
    known = set(taxonomy.labels)
    for group in taxonomy.groups.values():
        known.update(group.classes)
    data = table.select(["id", "width", "height", "split", "labels", "boxes"]).to_pylist()
    seen: set[str] = set()
    for row in data:
        rid = row["id"]
        if rid in seen:
            raise ManifestError(f"duplicate id {rid}")
        seen.add(rid)
        if row["split"] not in SPLITS:
            raise ManifestError(f"row {rid}: split {row['split']!r} is not one of {SPLITS}")
        if row["width"] <= 0 or row["height"] <= 0:
            raise ManifestError(f"row {rid}: size {row['width']}x{row['height']} is not positive")
        names = list(row["labels"] or []) + [b["label"] for b in row["boxes"] or []]
        bad = sorted({n for n in names if n not in known})
        if bad:
            raise ManifestError(f"row {rid}: labels {bad} are not in taxonomy {taxonomy.version}")
        for b in row["boxes"] or []:
            if not (0 <= b["x0"] < b["x1"] <= row["width"] and 0 <= b["y0"] < b["y1"] <= row["height"]):
                raise ManifestError(f"row {rid}: box {b} is empty or outside the {row['width']}x{row['height']} image")


def _counts(table: pa.Table) -> dict[str, Any]:
    """Counts per split and per label × split, for the dataset card."""
    splits = table.column("split").to_pylist()
    labels = table.column("labels").to_pylist()
    per_label: dict[str, Counter] = {}
    for split, names in zip(splits, labels, strict=True):
        for name in set(names or []) or {"<none>"}:
            per_label.setdefault(name, Counter())[split] += 1
    out: dict[str, Any] = {
        "rows": table.num_rows,
        "splits": dict(sorted(Counter(splits).items())),
        "labels": {k: dict(sorted(v.items())) for k, v in sorted(per_label.items())},
    }
    if "quality" in table.column_names:
        q = [x for x in table.column("quality").to_pylist() if x]
        if q:
            out["distortions"] = dict(sorted(Counter(x["distortion"] for x in q).items()))
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(
    rows_or_table: pa.Table | Iterable[Mapping[str, Any]],
    out_dir: str | Path,
    card: Mapping[str, Any],
    *,
    contact_sheet: bool = True,
    taxonomy: Any | None = None,
    row_group_size: int = 256,
) -> Path:
    """Validate and write a manifest directory atomically.

    The new version is written into a temporary sibling directory, then swapped in:
    the old directory is renamed aside, the new one renamed into place, and the old one
    deleted. A crash before the swap leaves the old version untouched; a crash between the
    two renames leaves it under ``.<name>.previous``, which :func:`read_manifest` falls back to.

    Args:
        rows_or_table: Row dicts (see the schema) or a pyarrow table with the manifest columns
            (extra columns such as fixed-shape-tensor embeddings are kept).
        out_dir: The manifest directory to create or replace.
        card: Dataset card fields: at least ``name``; ``version``, ``generator``, ``seed`` advised.
            Counts per label and split are added here.
        contact_sheet: Also render ``contact_sheet.png`` from the first rows.
        taxonomy: Taxonomy to check label names against (default: the packaged one).
        row_group_size: Rows per Parquet row group: the unit :func:`read_manifest_rows` and the
            embedding job's blocks read.

    Returns:
        The manifest directory.

    Raises:
        ManifestError: Rows that do not fit the schema, unknown labels, bad boxes or splits.
    """
    if "name" not in card:
        raise ManifestError("the dataset card needs a 'name'")
    table = rows_or_table if isinstance(rows_or_table, pa.Table) else rows_to_table(rows_or_table)
    table = _conform(table)
    validate_table(table, taxonomy)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    full_card = {
        "schema_version": SCHEMA_VERSION,
        "version": 1,
        **dict(card),
        "counts": _counts(table),
        "columns": table.column_names,
    }
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        pq.write_table(table, tmp / MANIFEST_FILE, compression="zstd", row_group_size=row_group_size)
        (tmp / CARD_FILE).write_text(json.dumps(full_card, indent=2, ensure_ascii=False, default=_json_default))
        if contact_sheet:
            from livelens.data.contact import contact_sheet_png

            (tmp / CONTACT_SHEET_FILE).write_bytes(contact_sheet_png(table, title=str(card["name"])))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        previous = out_dir.parent / f".{out_dir.name}.previous"
        if previous.exists():
            shutil.rmtree(previous)
        if out_dir.exists():
            os.rename(out_dir, previous)
        os.rename(tmp, out_dir)
        _fsync_dir(out_dir.parent)
        if previous.exists():
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def _resolve_dir(path: str | Path) -> Path:
    """The manifest directory, falling back to the previous version after an interrupted swap."""
    path = Path(path)
    if path.is_file() and path.name == MANIFEST_FILE:
        path = path.parent
    if not (path / MANIFEST_FILE).is_file():
        previous = path.parent / f".{path.name}.previous"
        if (previous / MANIFEST_FILE).is_file():
            return previous
        raise ManifestError(f"no manifest at {path}: expected {path / MANIFEST_FILE} (run `make data`?)")
    return path


def read_manifest(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a manifest with plain pyarrow.

    Args:
        path: The manifest directory (or its ``manifest.parquet``).
        columns: Only these columns (default all).

    Raises:
        ManifestError: Missing, truncated or corrupt file, or a table without the manifest columns.
    """
    file = _resolve_dir(path) / MANIFEST_FILE
    try:
        table = pq.read_table(file, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ManifestError(f"manifest {file} is corrupt or truncated: {exc}") from exc
    if columns is None:
        table = _conform(table)
    return table


def read_manifest_rows(path: str | Path, indices: Iterable[int], columns: list[str] | None = None) -> pa.Table:
    """Rows ``indices`` of a manifest, in that order, reading only the row groups that hold them.

    Manifests are written in row groups of 256, so a worker that needs 250 images decompresses
    one or two groups instead of the whole image column (180 MB for the 4,000-image quality set).

    Raises:
        ManifestError: Missing, truncated or corrupt file, or an index out of range.
    """
    file = _resolve_dir(path) / MANIFEST_FILE
    wanted = [int(i) for i in indices]
    try:
        pf = pq.ParquetFile(file)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)]
        starts = np.cumsum([0, *sizes])
        if any(i < 0 or i >= starts[-1] for i in wanted):
            raise ManifestError(f"row index out of range for {file} ({starts[-1]} rows)")
        group_of = (np.searchsorted(starts, wanted, side="right") - 1).tolist()
        groups = sorted(set(group_of))
        table = pf.read_row_groups(groups, columns=columns)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ManifestError(f"manifest {file} is corrupt or truncated: {exc}") from exc
    # Position of each selected group's first row inside the table just read.
    base, offset = {}, 0
    for g in groups:
        base[g], offset = offset, offset + sizes[g]
    return table.take([base[g] + i - int(starts[g]) for i, g in zip(wanted, group_of, strict=True)])


def load_card(path: str | Path) -> dict[str, Any]:
    """The dataset card of a manifest directory."""
    file = _resolve_dir(path) / CARD_FILE
    try:
        return json.loads(file.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"manifest {file.parent} has no {CARD_FILE}") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{file} is not valid JSON: {exc}") from exc


def use_arrow_native_tensors() -> None:
    """Make Ray Data write tensor columns as canonical ``arrow.fixed_shape_tensor``.

    Must run before a dataset with tensor columns is created, so that embeddings written by
    Ray can be read back by plain pyarrow (and by anything else that speaks Arrow).
    """
    from ray.data import DataContext
    from ray.data.extensions import FixedShapeTensorFormat

    DataContext.get_current().arrow_fixed_shape_tensor_format = FixedShapeTensorFormat.ARROW_NATIVE


def read_ray(path: str | Path, split: str | None = None, columns: list[str] | None = None):
    """Read a manifest as a Ray Dataset (rows undecoded; add ``map_batches(decode_batch)``).

    For data-parallel training pass the dataset to ``TorchTrainer(datasets={"train": ds})``
    and take ``ray.train.get_dataset_shard("train")`` in each worker: Ray shards it.

    Args:
        path: The manifest directory.
        split: Keep only ``'train'``, ``'val'`` or ``'test'`` rows.
        columns: Only these columns.

    Raises:
        ManifestError: Missing or corrupt manifest, or an unknown split.
    """
    import ray.data
    from ray.data.expressions import col

    use_arrow_native_tensors()
    file = _resolve_dir(path) / MANIFEST_FILE
    # Fail here, with our error, rather than deep inside a Ray task on a corrupt footer.
    try:
        pq.read_metadata(file)
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as exc:
        raise ManifestError(f"manifest {file} is corrupt or truncated: {exc}") from exc
    ds = ray.data.read_parquet(str(file), columns=columns)
    if split is not None:
        if split not in SPLITS:
            raise ManifestError(f"split {split!r} is not one of {SPLITS}")
        ds = ds.filter(expr=col("split") == split)
    return ds


def row_image_bytes(image_bytes: bytes | None, image_uri: str | None) -> bytes:
    """One manifest image's original bytes (bytes first, else the URI as a local path or ``file://``).

    Raises:
        InvalidImageError: Neither is set, or the URI is not a readable file.
        ImageTooLargeError: The file is over the service's byte limit.
    """
    from livelens.imageio import read_image_file

    if image_bytes is not None and len(image_bytes):
        return bytes(image_bytes)
    if not image_uri:
        raise InvalidImageError("manifest row has neither image_bytes nor image_uri")
    return read_image_file(image_uri[len("file://") :] if image_uri.startswith("file://") else image_uri)


def decode_row_image(image_bytes: bytes | None, image_uri: str | None) -> np.ndarray:
    """Decode one manifest image (bytes first, else the URI as a local path or ``file://``)."""
    from livelens.imageio import decode_image

    return decode_image(row_image_bytes(image_bytes, image_uri))


def decode_batch(batch: dict[str, Any], size: tuple[int, int] | None = None) -> dict[str, Any]:
    """``map_batches`` function: add an ``image`` column of RGB uint8 arrays.

    Args:
        batch: A numpy-format batch with ``image_bytes`` and/or ``image_uri``.
        size: Optional (width, height) to resize every image to, which makes ``image`` one
            (B, H, W, 3) tensor instead of a ragged column.

    Returns:
        The batch with ``image`` added and ``image_bytes`` dropped (it is no longer needed
        downstream and would double the block size).
    """
    import cv2

    n = len(batch["id"])
    blobs = batch.get("image_bytes")
    uris = batch.get("image_uri")
    images = []
    for i in range(n):
        img = decode_row_image(
            None if blobs is None else blobs[i],
            None if uris is None else uris[i],
        )
        if size is not None:
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        images.append(img)
    out = {k: v for k, v in batch.items() if k != "image_bytes"}
    if size is not None:
        out["image"] = np.stack(images) if images else np.zeros((0, size[1], size[0], 3), np.uint8)
    else:
        arr = np.empty(n, dtype=object)
        for i, img in enumerate(images):
            arr[i] = img
        out["image"] = arr
    return out


def attributes(row: Mapping[str, Any]) -> dict[str, Any]:
    """The parsed ``attributes`` JSON of a row (empty dict when absent)."""
    raw = row.get("attributes")
    if isinstance(raw, Mapping):
        return dict(raw)  # generator rows, before write_manifest serialises them
    return json.loads(raw) if raw else {}


def attach_column(table: pa.Table, ids: pa.Array | pa.ChunkedArray, values: pa.Array | pa.ChunkedArray,
                  name: str) -> pa.Table:
    """Add a column (e.g. embeddings computed in Ray) to a manifest table, matched by row id.

    Ray Data turns nested columns into pickled Python objects when a numpy-format
    ``map_batches`` touches them, so compute extras on ``columns=["id", ...]`` and attach here.

    Raises:
        ManifestError: Some manifest rows have no value, or ``name`` already exists.
    """
    if name in table.column_names:
        raise ManifestError(f"column {name!r} already exists")
    where = {k: i for i, k in enumerate(ids.to_pylist())}
    try:
        order = [where[k] for k in table.column("id").to_pylist()]
    except KeyError as exc:
        raise ManifestError(f"no {name} value for row {exc.args[0]}") from exc
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return table.append_column(name, values.take(pa.array(order, pa.int64())))

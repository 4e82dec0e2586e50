"""Datasets: the Parquet manifest, importers of real sets, and generators of labelled frames.

See ``docs/data.md``. The manifest API is re-exported here; generators and importers live in
their own modules (``livelens.data.frames``, ``.text``, ``.quality``, ``.importers``).
"""

from livelens.data.manifest import (
    COLUMNS,
    SCHEMA,
    SPLITS,
    attach_column,
    attributes,
    content_id,
    decode_batch,
    decode_row_image,
    load_card,
    read_manifest,
    read_ray,
    rows_to_table,
    split_for_key,
    use_arrow_native_tensors,
    validate_table,
    write_manifest,
)

__all__ = [
    "COLUMNS",
    "SCHEMA",
    "SPLITS",
    "attach_column",
    "attributes",
    "content_id",
    "decode_batch",
    "decode_row_image",
    "load_card",
    "read_manifest",
    "read_ray",
    "rows_to_table",
    "split_for_key",
    "use_arrow_native_tensors",
    "validate_table",
    "write_manifest",
]

"""Embed a manifest: a Ray Data job with an actor pool, resumable block by block.

The job splits the manifest into blocks of whole Parquet row groups and turns the block indices
into a Ray Dataset. ``map_batches`` runs an actor pool of :class:`BlockEmbedder`: each actor loads
the model once, reads only its block's row groups, embeds them with the serving preprocessing and
writes ``part-<block>.parquet`` atomically (temp file, fsync, rename). A rerun lists the parts
already there and embeds only the missing blocks, so a crash costs at most the blocks in flight.

The output is a directory of Parquet parts readable by plain pyarrow: ``id``, ``split``,
``labels``, ``source`` and ``embedding`` as a canonical ``arrow.fixed_shape_tensor`` of float32,
with the model ref in the schema metadata and in ``embeddings.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from livelens.errors import ConfigError, EmbeddingError, ManifestError, ModelNotFoundError

PART_GLOB = "part-*.parquet"
INFO_FILE = "embeddings.json"
META_MODEL = b"livelens.embedding.model"
#: Manifest columns copied next to each embedding (what cluster summaries and queues need).
CARRIED = ("id", "split", "labels", "source")


@dataclass
class Embedder:
    """A model that maps RGB frames to vectors, with the preprocessing it was served with.

    Attributes:
        ref: What the vectors came from: ``mobilenet_v2:imagenet`` or a stored ``name@version``.
        module: The classifier whose pooled pre-logit features are the embedding.
        input_hw: Input size.
        mean: Normalisation mean.
        std: Normalisation std.
        dim: Embedding width.
    """

    ref: str
    module: Any
    input_hw: tuple[int, int]
    mean: Sequence[float]
    std: Sequence[float]
    dim: int

    def __call__(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """(N, dim) float32 embeddings of RGB uint8 frames."""
        import torch

        from livelens.models.transforms import preprocess

        x = preprocess(frames, self.input_hw, self.mean, self.std)
        with torch.inference_mode():
            z = self.module.forward_head(self.module.forward_features(x), pre_logits=True)
        return z.float().numpy()


def load_embedder(model: str = "mobilenet_v2", stores: Sequence[str] | None = None, pool: str = "avg") -> Embedder:
    """The embedder for a factory backbone name or a stored model ref.

    Args:
        model: A backbone name from :func:`livelens.models.list_models` (ImageNet weights, global
            average pool), or ``name@version`` / ``name`` of a stored classifier such as the served
            ``safety@2``: its backbone and pooling give the embedding, preprocessed as it is served.
        stores: The store chain for stored refs (default: the serving chain).
        pool: The pooling of a backbone's feature map (``avg``; ``avgmax`` also keeps each
            channel's strongest cell, where small overlays show). A stored model keeps its own.

    Raises:
        ModelNotFoundError: ``model`` is neither a backbone name nor in any store.
        ConfigError: The offline ImageNet weights are missing.
    """
    from livelens.models.factory import list_models

    if model in list_models():
        from livelens.models.factory import IMAGENET_MEAN, IMAGENET_STD, create_model

        net = create_model(model, pool, num_classes=2, pretrained=True).eval()  # the head is unused
        ref = f"{model}:imagenet" + ("" if pool == "avg" else f":{pool}")
        return Embedder(ref, net, (224, 224), IMAGENET_MEAN, IMAGENET_STD, net.num_features)
    from livelens.moderation import load_safety

    try:
        loaded = load_safety(model, stores)
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(f"embedding model {model!r} is neither a backbone ({', '.join(list_models())}) "
                                 f"nor a stored model: {exc}") from None
    net = loaded.model.eval()
    return Embedder(loaded.ref, net, loaded.input_hw, tuple(loaded.mean), tuple(loaded.std), net.num_features)


@dataclass
class EmbedConfig:
    """An embedding job.

    Attributes:
        manifest: The manifest directory to embed.
        out: The output directory of Parquet parts (created; reused by a resume).
        model: Backbone name or stored model ref (see :func:`load_embedder`).
        pool: A backbone's pooling (see :func:`load_embedder`).
        block_groups: Parquet row groups per block (the unit of work and of resume).
        batch_size: Images per forward pass inside a block.
        actors: Size of the actor pool.
        cpus_per_actor: Logical CPUs each actor reserves.
        threads_per_actor: torch intra-op threads per actor (0 = torch's default).
        limit: Embed only the first ``limit`` blocks (smoke runs).
        progress: Show a progress bar over blocks.
        stores: The model store chain for stored refs (default: the serving chain).
    """

    manifest: str
    out: str
    model: str = "mobilenet_v2"
    pool: str = "avg"
    block_groups: int = 1
    batch_size: int = 32
    actors: int = 2
    cpus_per_actor: float = 1.0
    threads_per_actor: int = 1
    limit: int | None = None
    progress: bool = True
    stores: list[str] | None = None


def manifest_blocks(manifest: str | Path, block_groups: int = 1) -> list[tuple[int, list[int]]]:
    """The job's blocks: ``(block index, row-group indices)``, covering the manifest in order.

    Raises:
        ManifestError: No manifest, or one without rows.
    """
    from livelens.data.manifest import MANIFEST_FILE, _resolve_dir

    if block_groups < 1:
        raise ConfigError(f"block_groups must be ≥1, got {block_groups}")
    file = _resolve_dir(manifest) / MANIFEST_FILE
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"manifest {file} is corrupt or truncated: {exc}") from exc
    if pf.metadata.num_rows == 0:
        raise ManifestError(f"manifest {file} has no rows: nothing to embed")
    groups = list(range(pf.num_row_groups))
    return [(i, groups[s:s + block_groups]) for i, s in enumerate(range(0, len(groups), block_groups))]


def part_path(out: str | Path, block: int) -> Path:
    return Path(out) / f"part-{block:05d}.parquet"


def _write_atomic(table: pa.Table, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(dst)


def embedding_table(rows: pa.Table, vectors: np.ndarray, ref: str) -> pa.Table:
    """The carried manifest columns plus ``embedding`` as a fixed-shape tensor, tagged with ``ref``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    emb = pa.FixedShapeTensorArray.from_numpy_ndarray(vectors)
    cols = {name: rows.column(name) for name in CARRIED if name in rows.column_names}
    table = pa.table({**cols, "embedding": emb})
    return table.replace_schema_metadata({META_MODEL: ref.encode()})


class BlockEmbedder:
    """The actor class of the Ray Data job: embeds whole blocks and writes their parts.

    Args:
        manifest: The manifest directory (a path every node can read).
        out: The output directory (likewise shared).
        model: Backbone name or stored ref.
        block_groups: Row groups per block, as in :func:`manifest_blocks`.
        batch_size: Images per forward pass.
        threads: torch intra-op threads (0 keeps torch's default).
        stores: The store chain for stored refs.
    """

    def __init__(self, manifest: str, out: str, model: str, block_groups: int, batch_size: int,
                 threads: int = 1, stores: list[str] | None = None, pool: str = "avg"):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.manifest, self.out, self.batch_size = manifest, Path(out), batch_size
        self.blocks = dict(manifest_blocks(manifest, block_groups))
        self.embedder = load_embedder(model, stores, pool)

    def embed_block(self, block: int) -> dict[str, Any]:
        from livelens.data.manifest import MANIFEST_FILE, _resolve_dir, decode_row_image

        t0 = time.perf_counter()
        pf = pq.ParquetFile(_resolve_dir(self.manifest) / MANIFEST_FILE)
        rows = pf.read_row_groups(self.blocks[block], columns=[*CARRIED, "image_bytes", "image_uri"])
        images, uris = rows.column("image_bytes").to_pylist(), rows.column("image_uri").to_pylist()
        vectors = []
        for s in range(0, rows.num_rows, self.batch_size):
            frames = [decode_row_image(b, u) for b, u in zip(images[s:s + self.batch_size],
                                                               uris[s:s + self.batch_size], strict=True)]
            vectors.append(self.embedder(frames))
        table = embedding_table(rows.drop_columns(["image_bytes", "image_uri"]), np.concatenate(vectors),
                                self.embedder.ref)
        _write_atomic(table, part_path(self.out, block))
        return {"block": block, "rows": rows.num_rows, "seconds": time.perf_counter() - t0}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [self.embed_block(int(b)) for b in batch["block"]]
        return {k: np.asarray([d[k] for d in done]) for k in ("block", "rows", "seconds")}


def done_blocks(out: str | Path, ref: str | None = None) -> set[int]:
    """Blocks whose part is already written (by the model ``ref`` if given).

    Raises:
        EmbeddingError: A part was written by another model (mixing them would be silent garbage).
    """
    done = set()
    for p in sorted(Path(out).glob(PART_GLOB)):
        if ref is not None:
            meta = pq.read_schema(p).metadata or {}
            have = meta.get(META_MODEL, b"").decode()
            if have != ref:
                raise EmbeddingError(f"{p} holds embeddings of {have!r}, not {ref!r}: use another output "
                                     "directory or delete it")
        done.add(int(p.stem.split("-")[1]))
    return done


def embed_manifest(cfg: EmbedConfig) -> dict[str, Any]:
    """Run the embedding job on the connected (or a new local) Ray cluster.

    Returns:
        The job record (also written to ``out/embeddings.json``): model ref, width, blocks done
        now and skipped, rows, seconds and embeddings per second.

    Raises:
        ManifestError: An empty or unreadable manifest.
        ModelNotFoundError: An unknown model.
        EmbeddingError: ``out`` already holds another model's embeddings.
    """
    import ray

    blocks = manifest_blocks(cfg.manifest, cfg.block_groups)
    if cfg.limit is not None:
        blocks = blocks[: cfg.limit]
    probe = load_embedder(cfg.model, cfg.stores, cfg.pool)  # fails fast on a bad ref, before any actor starts
    ref, dim = probe.ref, probe.dim
    del probe
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    skipped = done_blocks(out, ref)
    todo = [b for b, _ in blocks if b not in skipped]
    t0 = time.perf_counter()
    rows, busy = 0, 0.0
    actors = max(1, min(cfg.actors, len(todo)))
    if todo:
        ds = ray.data.from_items([{"block": b} for b in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(
            BlockEmbedder, batch_size=1, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cfg.cpus_per_actor,
            fn_constructor_kwargs={"manifest": str(cfg.manifest), "out": str(out), "model": cfg.model,
                                   "block_groups": cfg.block_groups, "batch_size": cfg.batch_size,
                                   "threads": cfg.threads_per_actor, "stores": cfg.stores, "pool": cfg.pool})
        bar = _bar(len(todo), cfg.progress)
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            rows += int(batch["rows"].sum())
            busy += float(batch["seconds"].sum())
            bar.update(len(batch["block"]))
        bar.close()
    seconds = time.perf_counter() - t0
    record = {"model": ref, "dim": dim, "manifest": str(cfg.manifest), "blocks": len(blocks),
              "embedded_blocks": len(todo), "skipped_blocks": len(blocks) - len(todo), "rows_embedded": rows,
              "seconds": round(seconds, 3), "embeddings_per_s": round(rows / seconds, 2) if rows else None,
              # Without actor start-up: rows over the actors' busy time shared by the pool.
              "actors": actors, "steady_embeddings_per_s": round(rows * actors / busy, 2) if busy else None}
    (out / INFO_FILE).write_text(json.dumps(record, indent=2))
    return record


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="block", desc="embed", disable=not enabled)


@dataclass
class Embeddings:
    """Embeddings read back: ids, vectors and the carried manifest columns.

    Attributes:
        ids: Row ids.
        vectors: (N, dim) float32.
        model: The model ref they came from.
        table: The carried columns (``id``, ``split``, ``labels``, ``source``).
    """

    ids: list[str]
    vectors: np.ndarray
    model: str
    table: pa.Table

    @property
    def labels(self) -> list[list[str]]:
        return self.table.column("labels").to_pylist() if "labels" in self.table.column_names else []


def tensor_to_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor (or fixed-size list) column as one (N, dim) float32 array."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    out = []
    for c in chunks:
        if isinstance(c, pa.FixedShapeTensorArray):
            out.append(c.to_numpy_ndarray().reshape(len(c), -1))
        elif pa.types.is_fixed_size_list(c.type):
            out.append(c.values.to_numpy(zero_copy_only=False).reshape(len(c), -1))
        else:
            raise EmbeddingError(f"embedding column has type {c.type}, not a fixed-shape tensor")
    return np.concatenate(out).astype(np.float32, copy=False) if out else np.zeros((0, 0), np.float32)


def read_embeddings(path: str | Path) -> Embeddings:
    """Read an embedding directory (or one part file) with plain pyarrow.

    Raises:
        EmbeddingError: Nothing there, or parts of different widths or models.
    """
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.glob(PART_GLOB))
    if not files:
        raise EmbeddingError(f"no embeddings at {path} (expected {PART_GLOB})")
    tables, refs, dims = [], set(), set()
    for f in files:
        try:
            t = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as exc:
            raise EmbeddingError(f"{f} is corrupt: {exc}") from exc
        meta = t.schema.metadata or {}
        refs.add(meta.get(META_MODEL, b"?").decode())
        dims.add(int(t.schema.field("embedding").type.shape[0]) if isinstance(
            t.schema.field("embedding").type, pa.FixedShapeTensorType) else -1)
        tables.append(t)
    if len(dims) > 1:
        raise EmbeddingError(f"embeddings at {path} have mismatched widths {sorted(dims)}")
    if len(refs) > 1:
        raise EmbeddingError(f"embeddings at {path} come from different models {sorted(refs)}")
    table = pa.concat_tables(tables)
    vectors = tensor_to_numpy(table.column("embedding"))
    return Embeddings(table.column("id").to_pylist(), vectors, refs.pop(), table.drop_columns(["embedding"]))


def check_compatible(*arrays: np.ndarray) -> int:
    """The common width of embedding arrays.

    Raises:
        EmbeddingError: An array that is not 2-D, empty, not finite, or of another width.
    """
    widths = set()
    for a in arrays:
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[0] == 0:
            raise EmbeddingError(f"embeddings must be a non-empty (N, dim) array, got shape {a.shape}")
        if not np.isfinite(a).all():
            raise EmbeddingError("embeddings contain NaN or inf")
        widths.add(a.shape[1])
    if len(widths) > 1:
        raise EmbeddingError(f"embeddings of mismatched widths {sorted(widths)}")
    return widths.pop()

"""Multi-head image classification from a manifest: data checks, Ray Data preprocessing, loss, evaluation.

The safety job (and the sweep, and the default-models job) are thin scripts over these
functions. Heads follow the taxonomy groups: exclusive groups are softmax heads, multilabel
groups sigmoid heads (``livelens.models.heads_from_taxonomy``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from livelens.errors import ConfigError, ManifestError
from livelens.taxonomy import Taxonomy, load_taxonomy
from livelens.train.metrics import confusion_png, format_label_table, multihead_metrics, served_thresholds
from livelens.train.targets import covered_groups, target_key, targets_from_labels

if TYPE_CHECKING:
    import pyarrow as pa
    from ray.data import MaterializedDataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
REQUIRED_COLUMNS = ("id", "image_bytes", "image_uri", "split", "labels", "boxes")
#: How every classifier figure counts a label as predicted (see :meth:`Taxonomy.raise_threshold`).
THRESHOLD_RULE = "served: review threshold (tag threshold for informational groups)"
# Labels no single frame can show: frozen is a property of a sequence (see the frames card).
TEMPORAL_LABELS = ("quality_frozen",)
#: An evaluation split whose preprocessed tensors fit in this many bytes (and in a quarter of the
#: cluster's object store) is preprocessed once, before training, instead of streaming through Ray
#: Data's read and decode again on every epoch: its frames never change (no augmentation), and a
#: small split's streaming start-up costs far more than its tensors.
MATERIALIZE_EVAL_BYTES = 256 * 2**20
#: Splits of at most this many rows in all are read and preprocessed in the driver, train included,
#: and handed to the trainer as in-memory datasets. Ray Data's read and map tasks start worker
#: processes that import torch, once per execution and again every epoch for a streamed split, which
#: costs far more than decoding a few hundred frames; and the tensors are the same, because the
#: training crop is seeded by the row (the flips, which vary per epoch, are the worker's).
LOCAL_PREPROCESS_ROWS = 512
#: The manifest columns preprocessing reads.
PREPROCESS_COLUMNS = ["id", "image_bytes", "image_uri", "labels", "boxes", "texts"]


@dataclass
class ClassificationData:
    """What the driver learned about a manifest while validating it."""

    groups: list[str]
    card: dict[str, Any]
    taxonomy_version: str
    label_counts: dict[str, int] = field(default_factory=dict)
    train_label_counts: dict[str, int] = field(default_factory=dict)
    split_rows: dict[str, int] = field(default_factory=dict)
    ignore_labels: tuple[str, ...] = TEMPORAL_LABELS


def dataset_id(card: Mapping[str, Any]) -> str:
    """A dataset card's id for model cards: ``name@version`` (plus the seed when there is one)."""
    base = f"{card.get('name', 'unknown')}@{card.get('version', '?')}"
    return base + (f"#seed={card['seed']}" if "seed" in card else "")


def validate_manifest(manifest: str, tax: Taxonomy, groups: Sequence[str] | None = None,
                      ignore_labels: Sequence[str] = TEMPORAL_LABELS) -> ClassificationData:
    """Check a manifest before training: it exists, has the schema, fits the taxonomy, has train and val rows.

    Args:
        manifest: Manifest directory.
        tax: The taxonomy the model will predict.
        groups: Heads to train; default: every group with positives in the data.
        ignore_labels: Labels left out of the targets (not visible in one frame).

    Raises:
        ManifestError: Missing/corrupt manifest or card, missing columns, empty splits.
        ConfigError: Labels outside the taxonomy, unknown or uncovered groups.
    """
    from livelens.data import load_card, read_manifest

    table = read_manifest(manifest, columns=None)
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"manifest {manifest} lacks columns {missing} (has {table.column_names})")
    card = load_card(manifest)
    counts: dict[str, int] = {}
    train_counts: dict[str, int] = {}
    val_labels: set[str] = set()
    for names, split in zip(table.column("labels").to_pylist(), table.column("split").to_pylist(), strict=True):
        for n in set(names or []):
            if n not in ignore_labels:
                counts[n] = counts.get(n, 0) + 1
                if split == "train":
                    train_counts[n] = train_counts.get(n, 0) + 1
                elif split == "val":
                    val_labels.add(n)
    covered = covered_groups(tax, counts)
    if groups:
        bad = [g for g in groups if g not in tax.groups]
        if bad:
            raise ConfigError(f"unknown groups {bad} for taxonomy {tax.version}; known: {list(tax.groups)}")
        empty = [g for g in groups if g not in covered]
        if empty:
            raise ConfigError(f"groups {empty} have no positive example in {manifest}; covered: {covered}")
        chosen = [g for g in tax.groups if g in groups]
    else:
        chosen = covered
    if not chosen:
        raise ConfigError(f"manifest {manifest} has no label of taxonomy {tax.version}: nothing to train")
    splits: dict[str, int] = {}
    for s in table.column("split").to_pylist():
        splits[s] = splits.get(s, 0) + 1
    for need in ("train", "val"):
        if not splits.get(need):
            raise ManifestError(f"manifest {manifest} has no {need!r} rows (splits: {splits})")
    if not any(n in tax.labels and tax.labels[n].group in chosen for n in val_labels):
        # Precision, recall and macro-F1 would all be undefined, and a sweep could rank nothing.
        raise ManifestError(f"the 'val' split of {manifest} ({splits['val']} rows) has no positive label of groups "
                            f"{chosen}: precision and recall are undefined there")
    return ClassificationData(groups=chosen, card=card, taxonomy_version=tax.version, label_counts=counts,
                              train_label_counts=train_counts, split_rows=splits, ignore_labels=tuple(ignore_labels))


def heads_for(tax: Taxonomy, groups: Sequence[str]) -> dict[str, Any]:
    """The model heads (``HeadSpec`` per group) for ``groups``."""
    from livelens.models import heads_from_taxonomy

    return heads_from_taxonomy(tax, groups=list(groups))


def build_classifier(backbone: str, pool: str, tax: Taxonomy, groups: Sequence[str], *, pretrained: bool,
                     pool_kw: Mapping[str, Any] | None = None, freeze_backbone: bool = False) -> nn.Module:
    """A taxonomy classifier from the model zoo, optionally with a frozen backbone.

    Freezing keeps CPU training cheap: only the pooling and the heads learn, and the frozen
    ImageNet features are already good at the overlays and HUDs the generator draws.
    """
    from livelens.models import create_model

    model = create_model(backbone, pool, heads=heads_for(tax, groups), pretrained=pretrained, **dict(pool_kw or {}))
    if freeze_backbone:
        head_params = {id(p) for p in head_parameters(model)}
        for p in model.parameters():
            p.requires_grad_(id(p) in head_params)
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the pooling and the heads (what stays trainable with a frozen backbone)."""
    params: list[nn.Parameter] = []
    for name in ("pool", "heads", "head", "classifier"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            params.extend(mod.parameters())
        elif isinstance(mod, Mapping):
            for m in mod.values():
                if isinstance(m, nn.Module):
                    params.extend(m.parameters())
    return params


def evidence_crop_transform(size: int) -> Any:
    """The models engineer's ``EvidenceCrop`` (random resized crop that keeps a labelled box).

    Raises:
        ConfigError: ``livelens.evidence`` is not available in this checkout.
    """
    try:
        from livelens.evidence import EvidenceCrop
    except ImportError as e:
        raise ConfigError(f"evidence_crop needs livelens.evidence.EvidenceCrop ({e}); "
                          "pass evidence_crop=False / --no-evidence-crop") from e
    return EvidenceCrop(size)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)


def preprocess_batch(batch: dict[str, Any], *, size: int, groups: Sequence[str], taxonomy: str | None,
                     train: bool, evidence_crop: bool = True, ignore_labels: Sequence[str] = TEMPORAL_LABELS,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """``map_batches`` function: decode, augment (train), resize, normalise, and build targets.

    Training crops keep the evidence: a random resized crop that contains a labelled box
    (``EvidenceCrop``), so a small QR code or phone number is never cropped away while its
    label stays on. Resizing happens here, in Ray Data tasks, not in the training loop.

    The crop is seeded by the row, so it is the same on every epoch: these tasks are not told the
    epoch (``fn_kwargs`` are fixed when the dataset is built). The mirror flip, which needs no
    pixels the crop dropped, is left to the worker, which knows the epoch
    (:func:`flip_per_epoch`); this function only says which rows may be mirrored.

    Returns:
        ``{"x": float32 (B, 3, size, size), "t_<group>": targets}``, and with ``train``
        ``"flip_ok"`` (bool (B,)): the row shows no text.
    """
    from livelens.data import decode_batch

    tax = load_taxonomy(taxonomy)
    decoded = decode_batch(batch)
    images = decoded["image"]
    ids = [str(i) for i in batch["id"]]
    out = np.empty((len(images), 3, size, size), dtype=np.float32)
    crop = evidence_crop_transform(size) if train and evidence_crop else None
    m = np.asarray(mean, dtype=np.float32)[:, None, None]
    s = np.asarray(std, dtype=np.float32)[:, None, None]
    for i, img in enumerate(images):
        if train:
            # Seeded by the row: the same crop on every epoch (the task is not told the epoch).
            rng = np.random.default_rng([seed, int(ids[i][:8], 16) if ids[i][:8].isalnum() else i])
            boxes = [(b["x0"], b["y0"], b["x1"], b["y1"]) for b in (batch["boxes"][i] if "boxes" in batch else [])
                     if b["label"] not in ignore_labels]
            img = crop(img, boxes, rng=rng) if crop is not None else img
            img = _resize(np.asarray(img), size)
        else:
            img = _resize(img, size)
        out[i] = (np.ascontiguousarray(img).transpose(2, 0, 1).astype(np.float32) / 255.0 - m) / s
    labels = [[n for n in (row if row is not None else []) if n not in ignore_labels] for row in batch["labels"]]
    extra = {"flip_ok": np.array([not _has_text(batch, i) for i in range(len(images))], bool)} if train else {}
    return {"x": out, **targets_from_labels(labels, tax, groups), **extra}


def flip_per_epoch(batches: Iterable[dict[str, torch.Tensor]], seed: int, epoch: int,
                   rank: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Mirror half of each batch's ``flip_ok`` rows, a different half every epoch.

    The coin is seeded by ``(seed, epoch, rank)``: two epochs differ, a rerun (or a run resumed
    from a checkpoint at ``epoch``) draws the same flips, and ranks draw their own.

    Args:
        batches: Training batches as :func:`preprocess_batch` makes them (``x`` is ``(B, 3, H, W)``).
        seed: The run's seed.
        epoch: The epoch these batches are for.
        rank: The worker's rank.
    """
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{epoch}|{rank}".encode()))
    for batch in batches:
        ok = batch.get("flip_ok")
        if ok is not None:
            flip = (torch.rand(len(ok), generator=gen) < 0.5).to(ok.device) & ok.bool()
            if flip.any():
                x = batch["x"].clone()
                x[flip] = x[flip].flip(-1)
                batch = {**batch, "x": x}
        yield batch


def _has_text(batch: Mapping[str, Any], i: int) -> bool:
    """Mirroring text makes it unreadable, which would teach the model mirrored-text ads."""
    texts = batch.get("texts")
    return texts is not None and texts[i] is not None and len(texts[i]) > 0


def make_forward_loss(heads: Mapping[str, Any]) -> Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]:
    """``(model, batch) -> loss``: the multitask loss over the heads."""
    from livelens.models import multitask_loss

    def forward_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["x"])
        targets = {h: batch[target_key(h)] for h in heads}
        total, _ = multitask_loss({h: v.float() for h, v in logits.items()}, targets, heads)
        return total

    return forward_loss


def collect_predictions(model: nn.Module, batches, heads: Mapping[str, Any],
                        device: torch.device | str = "cpu") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Probabilities and targets per head over an iterable of torch batches."""
    from livelens.models import predict

    probs: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    targets: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    for batch in batches:
        p = predict(model, batch["x"].to(device))
        for h in heads:
            probs[h].append(p[h].float().cpu().numpy())
            targets[h].append(batch[target_key(h)].cpu().numpy())
    return ({h: np.concatenate(v) if v else np.zeros((0, len(heads[h].classes))) for h, v in probs.items()},
            {h: np.concatenate(v) if v else np.zeros((0,)) for h, v in targets.items()})


def evaluate_predictions(probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                         heads: Mapping[str, Any], title: str = "", taxonomy: str | Taxonomy | None = None
                         ) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Scalars for the report, the full per-label details, and the confusion PNG.

    Every label is counted as predicted at its served threshold (the score at which the service
    reviews, blocks or tags it), so these figures are what the answers would show.
    """
    tax = taxonomy if isinstance(taxonomy, Taxonomy) else load_taxonomy(taxonomy)
    thresholds = {h: served_thresholds(tax, spec) for h, spec in heads.items()}
    m = multihead_metrics(probs, targets, heads, thresholds)
    scalars: dict[str, Any] = dict(m["scalars"])
    scalars["details"] = m["heads"]
    scalars["report"] = format_label_table(m)
    scalars["threshold_rule"] = THRESHOLD_RULE
    files = {"confusion.png": confusion_png(probs, targets, heads, title=title, thresholds=thresholds)}
    return scalars, files


def make_evaluate(val_shard, heads: Mapping[str, Any], batch_size: int, device: torch.device,
                  taxonomy: str | None = None):
    """The ``evaluate`` callback of :func:`livelens.train.fit` over a (full, unsplit) val dataset."""

    def evaluate(model: nn.Module, epoch: int) -> tuple[dict[str, Any], dict[str, bytes]]:
        probs, targets = collect_predictions(model, val_shard.iter_torch_batches(batch_size=batch_size, device=device),
                                             heads, device)
        return evaluate_predictions(probs, targets, heads, title=f"val, epoch {epoch}", taxonomy=taxonomy)

    return evaluate


def prepare_datasets(manifest: str, data: ClassificationData, size: int, evidence_crop: bool,
                     taxonomy: str | None, splits: Mapping[str, str] | None = None,
                     batch_size: int = 32, num_cpus: float = 0.5, eval_once: bool = True,
                     local_rows: int | None = None) -> dict[str, Any]:
    """Ray Datasets ``{"train": …, "val": …}`` decoded and preprocessed, in Ray Data tasks or here.

    Splits of at most ``local_rows`` rows in all are preprocessed here, in the driver, once
    (:data:`LOCAL_PREPROCESS_ROWS`). Otherwise every split but ``train`` whose tensors fit
    :data:`MATERIALIZE_EVAL_BYTES` is preprocessed in Ray Data tasks, once; ``train`` streams
    through its augmentation every epoch (which, seeded by the row, keeps each row's crop on every
    epoch; the worker's :func:`flip_per_epoch` varies the flips). Either way a row's tensors are
    the same: :func:`preprocess_batch` makes them.

    Args:
        splits: Dataset name → manifest split (default train→train, val→val).
        num_cpus: Logical CPUs per preprocessing task (fractional so the trainer's workers fit).
        eval_once: Materialize small evaluation splits (False: every split streams, unless the
            splits are small enough to preprocess here).
        local_rows: Preprocess in the driver up to this many rows (default
            :data:`LOCAL_PREPROCESS_ROWS`; 0: always in Ray Data tasks).
    """
    import pyarrow.compute as pc
    import ray

    from livelens.data import read_manifest, read_ray

    splits = dict(splits or {"train": "train", "val": "val"})
    local_rows = LOCAL_PREPROCESS_ROWS if local_rows is None else local_rows
    store = ray.cluster_resources().get("object_store_memory", 0) if ray.is_initialized() else 0
    budget = min(MATERIALIZE_EVAL_BYTES, store / 4)  # without a running Ray, everything streams

    def tensor_bytes(n_rows: int) -> int:  # float32 image tensors of n_rows rows
        return n_rows * size * size * 3 * 4

    rows = sum(data.split_rows.get(s, 0) for s in splits.values())
    local = ray.is_initialized() and rows <= local_rows and tensor_bytes(rows) <= budget
    # The driver path reads the manifest once for all its splits.
    table = read_manifest(manifest, columns=[*PREPROCESS_COLUMNS, "split"]) if local else None
    out = {}
    for name, split in splits.items():
        kwargs = {"size": size, "groups": data.groups, "taxonomy": taxonomy, "train": name == "train",
                  "evidence_crop": evidence_crop, "ignore_labels": data.ignore_labels}
        if table is not None:
            rows_of_split = table.filter(pc.equal(table["split"], split)).drop_columns(["split"])
            out[name] = preprocess_locally(rows_of_split, batch_size, **kwargs)
            continue
        ds = read_ray(manifest, split=split, columns=PREPROCESS_COLUMNS)
        ds = ds.map_batches(preprocess_batch, batch_format="numpy", batch_size=batch_size, num_cpus=num_cpus,
                            fn_kwargs=kwargs)
        if eval_once and name != "train" and tensor_bytes(data.split_rows.get(split, 0)) <= budget:
            ds = ds.materialize()
        out[name] = ds
    return out


def preprocess_locally(table: pa.Table, batch_size: int, **kwargs: Any) -> MaterializedDataset:
    """Manifest rows (one split's :data:`PREPROCESS_COLUMNS`) preprocessed in this process, as an
    in-memory Ray Dataset.

    The rows go through :func:`preprocess_batch` in ``batch_size`` chunks (one block each), as the
    Ray Data tasks would give them; tensors become Arrow's canonical fixed-shape tensor columns.

    Args:
        kwargs: :func:`preprocess_batch`'s keyword arguments.
    """
    import pyarrow as pa
    import ray.data

    blocks = []
    for start in range(0, max(table.num_rows, 1), batch_size):
        chunk = table.slice(start, batch_size)
        batch = {c: chunk.column(c).to_numpy(zero_copy_only=False) for c in chunk.column_names}
        done = preprocess_batch(batch, **kwargs)
        blocks.append(pa.table({k: pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(v))
                                if v.ndim > 1 else pa.array(v) for k, v in done.items()}))
    return ray.data.from_arrow(blocks)


def evaluate_split(model: nn.Module, manifest: str, data: ClassificationData, split: str, size: int,
                   taxonomy: str | None, batch_size: int = 64) -> tuple[dict[str, Any], dict[str, bytes]] | None:
    """Evaluate a trained model on one manifest split (e.g. the held-out ``test``), on the driver.

    Returns:
        (scalars with ``details`` and ``report``, {"confusion.png": …}), or None when the split is empty.
    """
    if not data.split_rows.get(split):
        return None
    tax = load_taxonomy(taxonomy)
    heads = heads_for(tax, data.groups)
    ds = prepare_datasets(manifest, data, size, False, taxonomy, splits={split: split}, batch_size=batch_size)[split]
    model.eval()
    with torch.no_grad():
        probs, targets = collect_predictions(model, ds.iter_torch_batches(batch_size=batch_size), heads)
    return evaluate_predictions(probs, targets, heads, title=f"{split} split", taxonomy=tax)

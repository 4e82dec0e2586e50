"""Train the content-safety classifier with Ray Train V2 and publish it to the model store.

    python -m train_jobs.safety                         # defaults: runs/data/frames → runs/model_store
    python -m train_jobs.safety --epochs 3 --pool gated --comm-hook powersgd --powersgd-rank 4
    ray job submit --working-dir . -- python -m train_jobs.safety --storage-path s3://bucket/train

Rerunning with the same ``--run-name`` and ``--storage-path`` resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from livelens.errors import ConfigError, ManifestError
from livelens.store import user_store
from livelens.train import LoopConfig
from livelens.train.classification import (
    LOCAL_PREPROCESS_ROWS,
    ClassificationData,
    build_classifier,
    dataset_id,
    evaluate_split,
    evidence_crop_transform,
    flip_per_epoch,
    heads_for,
    make_evaluate,
    make_forward_loss,
    prepare_datasets,
    validate_manifest,
)
from livelens.train.driver import init_ray, make_run_config, read_checkpoint, storage_path


@dataclass
class SafetyTrainConfig:
    """Everything the safety job needs; validated on the driver before any worker starts.

    Attributes:
        manifest: Frames manifest (``make data``).
        taxonomy: Taxonomy file (default: the packaged one).
        groups: Heads to train (default: every group the data has positives of).
        backbone: Backbone name (``livelens.models.list_models``).
        pool: Pooling name (``livelens.models.list_pools``).
        pool_kw: Pooling options as JSON, e.g. '{"reduce_dim": 32}'; dry-built before any worker starts.
        pretrained: Start from the offline ImageNet weights.
        freeze_backbone: Train only the pooling and heads (a frozen ImageNet backbone).
        image_size: Input side in pixels.
        evidence_crop: Random resized crops that keep the labelled boxes.
        local_rows: Preprocess the splits in the driver, once, when they hold at most this many
            rows in all (default ``LOCAL_PREPROCESS_ROWS``); 0: always in Ray Data tasks, the train
            split streaming every epoch.
        num_workers: Ray Train workers (with ``min_workers``: the most).
        min_workers: Elastic training (Train V2): run with as few as this many workers when
            nodes are lost, and grow back to ``num_workers`` when they return. 0: a fixed size.
        resize_check_s: Elastic: how often the controller looks for room to grow.
        cpus_per_worker: Logical CPUs each worker reserves.
        placement_strategy: PACK, SPREAD, STRICT_PACK or STRICT_SPREAD (one worker per node).
        storage_path: Ray Train storage (a path or URI); checkpoints and results go here.
        run_name: Run name; rerunning with the same one resumes from its last checkpoint.
        max_failures: Worker-group restarts from the last checkpoint before the run fails.
        model_store: Where the model is registered (default: the user store serving searches first).
        model_name: Name in the store.
        register: Publish the trained model into the store.
        loop: The shared loop's settings.
    """

    manifest: str = "runs/data/frames"
    taxonomy: str | None = None
    groups: list[str] | None = None
    backbone: str = "mobilenet_v2"
    pool: str = "avg"
    pool_kw: dict[str, Any] = field(default_factory=dict)
    pretrained: bool = True
    freeze_backbone: bool = True
    image_size: int = 128
    evidence_crop: bool = True
    local_rows: int = LOCAL_PREPROCESS_ROWS
    num_workers: int = 2
    min_workers: int = 0
    resize_check_s: float = 60.0
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    storage_path: str = "runs/train"
    run_name: str = ""
    max_failures: int = 1
    model_store: str = field(default_factory=user_store)
    model_name: str = "safety"
    register: bool = True
    # fp32 by default: on CPUs without AVX512-BF16/AMX (like this 2-core host) bf16 autocast is
    # emulated and ran at 11.6 img/s; pass --precision bf16 on GPUs or AMX CPUs.
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=4, lr=3e-3, batch_size=32, precision="fp32"))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SafetyTrainConfig:
        """Rebuild from :func:`dataclasses.asdict` output (what Ray passes to the workers)."""
        known = {f.name for f in fields(cls)}
        if unknown := set(d) - known:
            raise ConfigError(f"unknown safety config keys {sorted(unknown)}")
        d = dict(d)
        loop = d.pop("loop", {})
        return cls(**d, loop=loop if isinstance(loop, LoopConfig) else LoopConfig.from_dict(loop))

    def validate(self) -> ClassificationData:
        """Check every setting and the data; returns what the driver learned about the data.

        Raises:
            ConfigError: Unknown backbone/pool/group, bad taxonomy, missing or malformed manifest,
                impossible precision or comm hook, bad sizes.
        """
        from livelens.models.factory import check_model
        from livelens.taxonomy import load_taxonomy

        self.loop.validate()
        if not isinstance(self.pool_kw, dict):
            raise ConfigError(f"pool_kw must be a mapping of pooling options, got {self.pool_kw!r}")
        check_model(self.backbone, self.pool, **self.pool_kw)  # the pooling, dry-built at the backbone's width
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [16, 1024], got {self.image_size}")
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("num_workers must be >= 1 and cpus_per_worker > 0")
        if self.local_rows < 0:
            raise ConfigError(f"local_rows must be >= 0, got {self.local_rows}")
        if not 0 <= self.min_workers <= self.num_workers or self.resize_check_s < 0:
            raise ConfigError(f"min_workers must be in [0, num_workers={self.num_workers}] and resize_check_s >= 0")
        if self.min_workers and self.loop.strategy == "ps":
            # A shard waits for one gradient per worker it was started for; a group that shrank would never finish a round.
            raise ConfigError("strategy 'ps' needs a fixed worker count: leave min_workers at 0")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"unknown placement_strategy {self.placement_strategy!r}")
        if self.evidence_crop:
            evidence_crop_transform(self.image_size)
        tax = load_taxonomy(self.taxonomy)
        data = validate_manifest(self.manifest, tax, self.groups)
        storage_path(self.storage_path)
        return data


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    cfg = SafetyTrainConfig.from_dict(config)
    import ray.train
    import ray.train.torch

    from livelens.taxonomy import load_taxonomy
    from livelens.train import fit

    tax = load_taxonomy(cfg.taxonomy)
    groups = list(cfg.groups or [])

    def build():
        return build_classifier(cfg.backbone, cfg.pool, tax, groups, pretrained=cfg.pretrained, pool_kw=cfg.pool_kw,
                                freeze_backbone=cfg.freeze_backbone)

    train = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")
    device = ray.train.torch.get_device()
    heads = heads_for(tax, groups)
    rank = ray.train.get_context().get_world_rank()
    fit(build, make_forward_loss(heads),
        lambda epoch: flip_per_epoch(train.iter_torch_batches(batch_size=cfg.loop.batch_size, device=device,
                                                              drop_last=True), cfg.loop.seed, epoch, rank),
        cfg.loop, evaluate=make_evaluate(val, heads, cfg.loop.batch_size, device, cfg.taxonomy))


def run(cfg: SafetyTrainConfig) -> dict[str, Any]:
    """Validate, train, and publish; returns a summary with the model ref and metrics."""
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = cfg.validate()
    cfg.groups = data.groups
    cfg.run_name = cfg.run_name or time.strftime("safety-%Y%m%d-%H%M%S")
    init_ray()
    t0 = time.time()
    datasets = prepare_datasets(cfg.manifest, data, cfg.image_size, cfg.evidence_crop, cfg.taxonomy,
                                local_rows=cfg.local_rows)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=(cfg.min_workers, cfg.num_workers) if cfg.min_workers
                                     else cfg.num_workers,
                                     elastic_resize_monitor_interval_s=cfg.resize_check_s,
                                     use_gpu=cfg.loop.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     placement_strategy=cfg.placement_strategy),
        # Only train is sharded: rank 0 evaluates on the whole val split, so metrics are global.
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=make_run_config(cfg.run_name, cfg.storage_path, max_failures=cfg.max_failures),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training {cfg.run_name} finished without a checkpoint: {result.error}")
    state, metrics, files = read_checkpoint(result.checkpoint)
    from livelens.taxonomy import load_taxonomy

    model = build_classifier(cfg.backbone, cfg.pool, load_taxonomy(cfg.taxonomy), cfg.groups, pretrained=False,
                             pool_kw=cfg.pool_kw)
    model.load_state_dict(state["model"])
    held_out = evaluate_split(model, cfg.manifest, data, "test", cfg.image_size, cfg.taxonomy)
    summary: dict[str, Any] = {"val": metrics, "checkpoint": result.checkpoint.path, "wall_time_s": time.time() - t0}
    if held_out is not None:
        summary["test"], test_files = held_out
        files.update({f"test_{k}": v for k, v in test_files.items()})
    if cfg.register:
        from livelens.models.io import save_to_store
        from livelens.store import ModelStore

        final = summary.get("test", metrics)
        card = {"task": "safety", "datasets": [dataset_id(data.card)], "taxonomy_version": data.taxonomy_version,
                "backbone": cfg.backbone, "pooling": cfg.pool, "pool_kw": cfg.pool_kw, "groups": cfg.groups,
                "input_size": cfg.image_size, "eval_split": "test" if held_out else "val",
                "metrics": {"macro_f1": final.get("val_macro_f1"), "min_recall": final.get("val_min_recall"),
                            "min_precision": final.get("val_min_precision"), "accuracy": final.get("val_accuracy"),
                            "per_label": final.get("details")},
                "threshold_rule": final.get("threshold_rule"), "train_label_counts": data.train_label_counts,
                "train_time_s": metrics.get("train_time_s"), "wall_time_s": summary["wall_time_s"],
                "checkpoint": result.checkpoint.path, "config": asdict(cfg)}
        summary["ref"] = save_to_store(ModelStore(cfg.model_store), cfg.model_name, model, card)
    out = Path(storage_path(cfg.storage_path)) / cfg.run_name if "://" not in cfg.storage_path else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for name, blob in files.items():
            (out / name).write_bytes(blob)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def parse_args(argv: list[str] | None = None) -> SafetyTrainConfig:
    """Command-line flags onto :class:`SafetyTrainConfig` (one flag per field, :mod:`livelens.cli_config`)."""
    from livelens.cli_config import config_from_args, config_parser

    return config_from_args(SafetyTrainConfig(), config_parser(SafetyTrainConfig, description=__doc__).parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``make train-safety``)."""
    cfg = parse_args(argv)
    try:
        summary = run(cfg)
    except (ConfigError, ManifestError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary[k] for k in ("ref", "checkpoint", "wall_time_s") if k in summary}, default=str))
    final = summary.get("test", summary["val"])
    print(f"held-out ({'test' if 'test' in summary else 'val'}) at the served thresholds: macro-F1 "
          f"{final.get('val_macro_f1'):.4f}, worst recall {final.get('val_min_recall'):.4f}, worst precision "
          f"{final.get('val_min_precision'):.4f}")
    print(final.get("report", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

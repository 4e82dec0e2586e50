"""Train the content-safety classifier with Ray Train V2 and publish it to the model store.

    python -m train_jobs.safety                         # defaults: runs/data/frames → runs/model_store
    python -m train_jobs.safety --epochs 3 --pool gated --comm-hook powersgd --powersgd-rank 4
    ray job submit --working-dir . -- python -m train_jobs.safety --storage-path s3://bucket/train

Rerunning with the same ``--run-name`` and ``--storage-path`` resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
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
    ClassificationData,
    build_classifier,
    dataset_id,
    evaluate_split,
    evidence_crop_transform,
    heads_for,
    make_evaluate,
    make_forward_loss,
    prepare_datasets,
    validate_manifest,
)
from livelens.train.driver import init_ray, make_run_config, read_checkpoint, storage_path


@dataclass
class SafetyTrainConfig:
    """Everything the safety job needs; validated on the driver before any worker starts."""

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
    num_workers: int = 2
    cpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"
    storage_path: str = "runs/train"
    run_name: str = "safety"
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
        from livelens.models import list_models, list_pools
        from livelens.taxonomy import load_taxonomy

        self.loop.validate()
        if self.backbone not in list_models():
            raise ConfigError(f"unknown backbone {self.backbone!r}; choose one of {list_models()}")
        if self.pool not in list_pools():
            raise ConfigError(f"unknown pooling {self.pool!r}; choose one of {list_pools()}")
        if not 16 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be in [16, 1024], got {self.image_size}")
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ConfigError("num_workers must be >= 1 and cpus_per_worker > 0")
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
    fit(build, make_forward_loss(heads),
        lambda epoch: train.iter_torch_batches(batch_size=cfg.loop.batch_size, device=device, drop_last=True),
        cfg.loop, evaluate=make_evaluate(val, heads, cfg.loop.batch_size, device))


def run(cfg: SafetyTrainConfig) -> dict[str, Any]:
    """Validate, train, and publish; returns a summary with the model ref and metrics."""
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data = cfg.validate()
    cfg.groups = data.groups
    init_ray()
    t0 = time.time()
    datasets = prepare_datasets(cfg.manifest, data, cfg.image_size, cfg.evidence_crop, cfg.taxonomy)
    trainer = TorchTrainer(
        train_fn_per_worker,
        train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.loop.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
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
                "metrics": {"accuracy": final.get("val_accuracy"), "macro_f1": final.get("val_macro_f1"),
                            "per_label": final.get("details")},
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
    """Command-line flags onto :class:`SafetyTrainConfig` (flags mirror the field names)."""
    base = SafetyTrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=base.manifest)
    p.add_argument("--taxonomy", default=None)
    p.add_argument("--groups", nargs="*", default=None, help="heads to train (default: those the data covers)")
    p.add_argument("--backbone", default=base.backbone)
    p.add_argument("--pool", default=base.pool)
    p.add_argument("--pool-kw", type=json.loads, default={}, help='JSON, e.g. \'{"dim": 512}\'')
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--train-backbone", action="store_true", help="fine-tune the whole backbone")
    p.add_argument("--image-size", type=int, default=base.image_size)
    p.add_argument("--no-evidence-crop", action="store_true")
    p.add_argument("--num-workers", type=int, default=base.num_workers)
    p.add_argument("--cpus-per-worker", type=float, default=base.cpus_per_worker)
    p.add_argument("--placement-strategy", default=base.placement_strategy, help="STRICT_SPREAD: one worker per node")
    p.add_argument("--storage-path", default=base.storage_path)
    p.add_argument("--run-name", default=None, help="default: safety-<timestamp>; reuse one to resume")
    p.add_argument("--max-failures", type=int, default=base.max_failures)
    p.add_argument("--model-store", default=base.model_store)
    p.add_argument("--model-name", default=base.model_name)
    p.add_argument("--no-register", action="store_true")
    lp = base.loop
    p.add_argument("--epochs", type=int, default=lp.epochs)
    p.add_argument("--lr", type=float, default=lp.lr)
    p.add_argument("--batch-size", type=int, default=lp.batch_size)
    p.add_argument("--precision", default=lp.precision, help="fp32 | bf16 | fp16 (GPU)")
    p.add_argument("--use-gpu", action="store_true")
    p.add_argument("--comm-hook", default=lp.comm_hook, help="none | fp16 | powersgd")
    p.add_argument("--powersgd-rank", type=int, default=lp.powersgd_rank)
    p.add_argument("--max-steps-per-epoch", type=int, default=None)
    a = p.parse_args(argv)
    loop = LoopConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, precision=a.precision, use_gpu=a.use_gpu,
                      comm_hook=a.comm_hook, powersgd_rank=a.powersgd_rank, max_steps_per_epoch=a.max_steps_per_epoch)
    return SafetyTrainConfig(
        manifest=a.manifest, taxonomy=a.taxonomy, groups=a.groups, backbone=a.backbone, pool=a.pool,
        pool_kw=a.pool_kw, pretrained=not a.no_pretrained, freeze_backbone=not a.train_backbone,
        image_size=a.image_size, evidence_crop=not a.no_evidence_crop, num_workers=a.num_workers,
        cpus_per_worker=a.cpus_per_worker, placement_strategy=a.placement_strategy, storage_path=a.storage_path,
        run_name=a.run_name or time.strftime("safety-%Y%m%d-%H%M%S"), max_failures=a.max_failures,
        model_store=a.model_store, model_name=a.model_name, register=not a.no_register, loop=loop)


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
    print(f"held-out ({'test' if 'test' in summary else 'val'}) accuracy {final.get('val_accuracy'):.4f}")
    print(final.get("report", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

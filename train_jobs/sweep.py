"""Ray Tune sweep of the safety classifier: ASHA over a backbone × pooling (× bilinear variant) grid, lr sampled.

    python -m train_jobs.sweep                      # runs/sweep/{results.md,results.csv,accuracy_vs_cost.png}
    python -m train_jobs.sweep --num-samples 2 --epochs 4 --backbones mobilenet_v2 resnet18 --no-pretrained

Each trial is a driver function that runs its own Train V2 ``TorchTrainer``; a
``TuneReportCallback`` forwards every epoch's metrics to Tune, where ASHA stops weak trials
early. The best trial's checkpoint is registered in the model store.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from livelens.errors import ConfigError
from livelens.train import LoopConfig
from train_jobs.safety import SafetyTrainConfig

COLUMNS = ("name", "backbone", "pool", "bilinear_variant", "lr", "val_accuracy", "val_macro_f1", "epochs",
           "latency_ms", "params", "status")


@dataclass
class SweepConfig:
    """The search space and the budget; ``base`` holds every fixed training setting."""

    # fp32 on CPU: bf16 is emulated without AVX512-BF16/AMX (11.6 vs 40-54 img/s measured here).
    # Only mobilenet_v2 has offline ImageNet weights; add resnet18/50 with --no-pretrained or a weight cache.
    base: SafetyTrainConfig = field(default_factory=lambda: SafetyTrainConfig(
        num_workers=1, cpus_per_worker=1.0, register=False, max_failures=0,
        loop=LoopConfig(epochs=3, lr=3e-3, batch_size=32, precision="fp32")))
    backbones: list[str] = field(default_factory=lambda: ["mobilenet_v2"])
    pools: list[str] = field(default_factory=lambda: ["avg", "max", "gated", "tree", "bilinear"])
    bilinear_variants: list[str] = field(default_factory=lambda: ["full", "compact"])
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    num_samples: int = 1
    max_concurrent: int = 2
    grace_period: int = 1
    seed: int = 0
    out: str = "runs/sweep"
    model_name: str = "safety-sweep"

    def validate(self) -> None:
        """Check the space and the base config (which also checks the data) before any trial starts."""
        from livelens.models import list_models, list_pools

        for b in self.backbones:
            if b not in list_models():
                raise ConfigError(f"unknown backbone {b!r}; choose from {list_models()}")
        for p in self.pools:
            if p not in list_pools():
                raise ConfigError(f"unknown pooling {p!r}; choose from {list_pools()}")
        if bad := set(self.bilinear_variants) - {"full", "compact"}:
            raise ConfigError(f"unknown bilinear variants {sorted(bad)}; use 'full' or 'compact'")
        if self.num_samples < 1 or self.max_concurrent < 1 or not self.lrs:
            raise ConfigError("num_samples, max_concurrent >= 1 and at least one lr are required")


def pool_grid(pools: list[str], variants: list[str]) -> list[tuple[str, str]]:
    """Every (pool, bilinear variant) pair worth a trial: the variant only multiplies ``bilinear``.

    A grid (not random choice) so that each pooling is tried ``num_samples`` times, none twice by chance.
    """
    return [(p, v) for p in pools for v in (variants if p == "bilinear" else ["-"])]


def absolute_paths(base: SafetyTrainConfig) -> SafetyTrainConfig:
    """``base`` with local relative paths made absolute.

    Tune runs each trial driver in its own trial directory, so ``runs/data/frames`` would resolve
    there and every trial would fail with "no manifest". URIs (``s3://…``) are left alone.
    """
    def fix(path: str | None) -> str | None:
        return path if not path or "://" in path else str(Path(path).resolve())

    return replace(base, manifest=fix(base.manifest), taxonomy=fix(base.taxonomy),
                   storage_path=fix(base.storage_path), model_store=fix(base.model_store))


def effective_pool(pool: str, variant: str) -> str:
    """``bilinear`` + ``compact`` is compact bilinear pooling (Gao et al.); other pools ignore the variant."""
    return "compact_bilinear" if pool == "bilinear" and variant == "compact" else pool


def trial_config(base: SafetyTrainConfig, params: dict[str, Any], name: str) -> SafetyTrainConfig:
    """The training config of one trial."""
    return replace(base, backbone=params["backbone"], pool=effective_pool(params["pool"], params["bilinear_variant"]),
                   run_name=name, loop=replace(base.loop, lr=float(params["lr"])))


def trial_driver(config: dict[str, Any]) -> None:
    """One Tune trial: a Train V2 run whose reports reach Tune through TuneReportCallback."""
    import ray.data
    import ray.train
    import ray.tune
    from ray.train import DataConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from livelens.train.classification import ClassificationData, prepare_datasets
    from livelens.train.driver import storage_path
    from train_jobs.safety import train_fn_per_worker

    # Six trials' worth of Ray Data progress bars interleave into one unreadable driver log.
    ray.data.DataContext.get_current().enable_progress_bars = False
    base = SafetyTrainConfig.from_dict(config["base"])
    name = f"trial-{ray.tune.get_context().get_trial_id()}"
    cfg = trial_config(base, config, name)
    data = ClassificationData(**config["data"])
    datasets = prepare_datasets(cfg.manifest, data, cfg.image_size, cfg.evidence_crop, cfg.taxonomy)
    TorchTrainer(
        train_fn_per_worker, train_loop_config=asdict(cfg),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, resources_per_worker={"CPU": cfg.cpus_per_worker}),
        datasets=datasets, dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path(cfg.storage_path),
                                       callbacks=[TuneReportCallback()]),
    ).fit()


def run(sc: SweepConfig) -> dict[str, Any]:
    """Validate, sweep, write the table and plot, register the best trial; returns a summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from livelens.store import ModelStore
    from livelens.taxonomy import load_taxonomy
    from livelens.train.classification import build_classifier, dataset_id
    from livelens.train.driver import init_ray, read_checkpoint, storage_path
    from livelens.train.report import model_cost, plot_accuracy_vs_cost, write_table

    sc.validate()
    sc = replace(sc, base=absolute_paths(sc.base))
    data = sc.base.validate()
    init_ray()
    sc.base.groups = data.groups
    out = Path(sc.out)
    out.mkdir(parents=True, exist_ok=True)
    space = {"backbone": tune.grid_search(sc.backbones),
             "pool_variant": tune.grid_search([list(pv) for pv in pool_grid(sc.pools, sc.bilinear_variants)]),
             "pool": tune.sample_from(lambda spec: spec.config.pool_variant[0]),
             "bilinear_variant": tune.sample_from(lambda spec: spec.config.pool_variant[1]),
             "lr": tune.choice(sc.lrs), "base": asdict(sc.base), "data": asdict(data)}
    tuner = tune.Tuner(
        tune.with_resources(trial_driver, {"cpu": 0.01}),  # the driver only waits; workers hold the CPUs
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=sc.num_samples,
                                    max_concurrent_trials=sc.max_concurrent,
                                    scheduler=ASHAScheduler(time_attr="training_iteration", max_t=sc.base.loop.epochs,
                                                            grace_period=sc.grace_period, reduction_factor=2),
                                    search_alg=tune.search.BasicVariantGenerator(
                                        random_state=sc.seed, max_concurrent=sc.max_concurrent)),
        run_config=tune.RunConfig(name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                  storage_path=storage_path(sc.base.storage_path)),
    )
    t0 = time.time()
    grid = tuner.fit()
    tax = load_taxonomy(sc.base.taxonomy)
    rows = []
    for r in grid:
        p, m = r.config, r.metrics or {}
        pool = effective_pool(p["pool"], p["bilinear_variant"])
        model = build_classifier(p["backbone"], pool, tax, data.groups, pretrained=False)
        rows.append({"name": f"{p['backbone']}/{pool}/lr={p['lr']:g}", "backbone": p["backbone"], "pool": pool,
                     "bilinear_variant": p["bilinear_variant"] if p["pool"] == "bilinear" else "-",
                     "lr": float(p["lr"]), "val_accuracy": float(m.get("val_accuracy", float("nan"))),
                     "val_macro_f1": float(m.get("val_macro_f1", float("nan"))),
                     "epochs": int(m.get("training_iteration", 0)), **model_cost(model, sc.base.image_size),
                     "status": "error" if r.error else "ok", "checkpoint_path": m.get("checkpoint_path")})
    rows.sort(key=lambda r: -r["val_accuracy"] if r["val_accuracy"] == r["val_accuracy"] else 1.0)
    write_table(rows, COLUMNS, out)
    plot_accuracy_vs_cost(rows, out / "accuracy_vs_cost.png")
    if not any(r["status"] == "ok" and r["val_accuracy"] == r["val_accuracy"] for r in rows):
        first = next((r.error for r in grid if r.error), None)
        raise ConfigError(f"all {len(rows)} sweep trials failed; table in {out / 'results.md'}; first error: "
                          f"{str(first).strip().splitlines()[-1] if first else 'no metrics reported'}")
    best = grid.get_best_result(metric="val_accuracy", mode="max", filter_nan_and_inf=True)
    bp = best.config
    best_cfg = trial_config(sc.base, bp, "best")
    ckpt = _checkpoint(best.metrics["checkpoint_path"], sc.base.storage_path)
    state, metrics, _ = read_checkpoint(ckpt)
    model = build_classifier(best_cfg.backbone, best_cfg.pool, tax, data.groups, pretrained=False)
    model.load_state_dict(state["model"])
    from livelens.models.io import save_to_store

    card = {"task": "safety", "datasets": [dataset_id(data.card)], "taxonomy_version": data.taxonomy_version,
            "backbone": best_cfg.backbone, "pooling": best_cfg.pool, "groups": data.groups,
            "input_size": best_cfg.image_size, "metrics": {"accuracy": metrics.get("val_accuracy"),
                                                           "macro_f1": metrics.get("val_macro_f1"),
                                                           "per_label": metrics.get("details")},
            "train_time_s": metrics.get("train_time_s"), "sweep": {"trials": len(rows), "table": str(out / "results.md")},
            "config": asdict(best_cfg)}
    ref = save_to_store(ModelStore(sc.base.model_store), sc.model_name, model, card)
    summary = {"ref": ref, "best": {k: bp[k] for k in ("backbone", "pool", "bilinear_variant", "lr")},
               "best_val_accuracy": metrics.get("val_accuracy"), "trials": len(rows),
               "errors": sum(r["status"] == "error" for r in rows), "wall_time_s": time.time() - t0,
               "outputs": [str(out / n) for n in ("results.md", "results.csv", "accuracy_vs_cost.png")]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _checkpoint(path: str, storage: str):
    """A Train checkpoint object for a path inside the sweep's storage (local or URI)."""
    from ray.train import Checkpoint

    if "://" in storage:
        import pyarrow.fs as pafs

        return Checkpoint(path, filesystem=pafs.FileSystem.from_uri(storage)[0])
    return Checkpoint(path)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``make sweep``)."""
    sc = SweepConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default=sc.base.manifest)
    p.add_argument("--backbones", nargs="+", default=sc.backbones)
    p.add_argument("--pools", nargs="+", default=sc.pools)
    p.add_argument("--bilinear-variants", nargs="+", default=sc.bilinear_variants)
    p.add_argument("--lrs", nargs="+", type=float, default=sc.lrs)
    p.add_argument("--num-samples", type=int, default=sc.num_samples)
    p.add_argument("--max-concurrent", type=int, default=sc.max_concurrent)
    p.add_argument("--epochs", type=int, default=sc.base.loop.epochs)
    p.add_argument("--image-size", type=int, default=sc.base.image_size)
    p.add_argument("--no-pretrained", action="store_true")
    p.add_argument("--storage-path", default="runs/sweep/train")
    p.add_argument("--model-store", default=sc.base.model_store)
    p.add_argument("--out", default=sc.out)
    a = p.parse_args(argv)
    sc = replace(sc, backbones=a.backbones, pools=a.pools, bilinear_variants=a.bilinear_variants, lrs=a.lrs,
                 num_samples=a.num_samples, max_concurrent=a.max_concurrent, out=a.out,
                 base=replace(sc.base, manifest=a.manifest, image_size=a.image_size, pretrained=not a.no_pretrained,
                              storage_path=a.storage_path, model_store=a.model_store,
                              loop=replace(sc.base.loop, epochs=a.epochs)))
    try:
        summary = run(sc)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2, default=str))
    print(Path(sc.out, "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

